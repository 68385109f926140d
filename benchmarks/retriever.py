"""Retriever index families against each other and against numpy brute force
(`racm3 bench retriever`).

For each of flat, hnsw, ivf, ivfpq and auto, over the same n x dim clustered unit
vectors (an `.npy` on disk, as a memory version keeps them):
- build_s: train + add + build-time tuning (recall@10 >= 0.95), from the memory-mapped
  vectors, as `retrieval.build` does;
- load_ms: memory-mapped load of the saved index (page cache warm: it was just written);
- p50_ms / p99_ms: single-query latency, k=10;
- qps_batch: queries per second for one batch of all queries;
- recall_at_10: against exact search, on queries the tuning never saw;
- rss_mb: resident memory added by loading and querying (anonymous + mapped file pages;
  rss_anon_mb is the private part that replicas cannot share).

The peer row (`index: "numpy"`) is exact search with numpy over the same memory-mapped
vectors: a matrix-vector product and argpartition.

Each build and each serve phase runs in a fresh process, so that memory numbers are not
polluted by earlier phases and every family starts cold in the same way.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import cpu_name
from benchmarks.output import publish

FAMILIES = ("flat", "hnsw", "ivf", "ivfpq", "auto")
K = 10


# --- the data --------------------------------------------------------------------------


def write_vectors(path: Path, n: int, dim: int, seed: int = 0, centers: int = 256,
                  spread: float = 0.6, chunk: int = 100_000) -> None:
    """Unit vectors around random centres (like CLIP vectors, they cluster), to disk."""
    from retrieval.store import EmbeddingsWriter

    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    with EmbeddingsWriter(path, dim) as w:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x = c[rng.integers(0, centers, m)] + spread * rng.standard_normal(
                (m, dim), dtype=np.float32) / np.sqrt(dim)
            w.append(x / np.linalg.norm(x, axis=1, keepdims=True))


# --- phases, each in a fresh process -------------------------------------------------------


def _rss_mb() -> tuple[float, float]:
    """(resident, resident anonymous) MB of this process."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["RssAnon"]


def _set_threads(threads: int) -> None:
    import faiss

    faiss.omp_set_num_threads(threads)


def build_phase(vectors: str, family: str, out: str, threads: int) -> dict[str, Any]:
    from retrieval.faiss_index import build_index, write_index
    from retrieval.store import open_embeddings

    _set_threads(threads)
    emb = open_embeddings(vectors)
    w0, c0 = time.perf_counter(), time.process_time()
    index, info = build_index(emb, family)
    build_s, build_cpu_s = time.perf_counter() - w0, time.process_time() - c0
    write_index(index, out)
    return {"build_s": build_s, "build_cpu_s": build_cpu_s, "factory": info.factory,
            "params": info.params, "tuned_recall_at_10": info.recall_at_10}


def serve_phase(vectors: str, index_path: str | None, params: dict[str, int], queries: str,
                truth: str, threads: int, single: int) -> dict[str, Any]:
    """Load (index or, for the numpy peer, just the vectors) and query."""
    from retrieval.faiss_index import VectorIndex, recall_at
    from retrieval.store import open_embeddings

    _set_threads(threads)
    q, exact = np.load(queries), np.load(truth)
    rss0, anon0 = _rss_mb()
    t0 = time.perf_counter()
    emb = open_embeddings(vectors)
    if index_path is None:
        search: Callable[[np.ndarray], np.ndarray] = lambda x: _numpy_knn(emb, x)  # noqa: E731
    else:
        index = VectorIndex.load(index_path, params, emb)
        search = lambda x: index.search(x, K)[1]  # noqa: E731
    load_ms = 1e3 * (time.perf_counter() - t0)

    search(q[:1])  # first touch of the code paths, not of the data
    lat = []
    for i in range(min(single, len(q))):
        s = time.perf_counter()
        search(q[i : i + 1])
        lat.append(1e3 * (time.perf_counter() - s))
    s = time.perf_counter()
    found = search(q)
    batch_s = time.perf_counter() - s
    rss1, anon1 = _rss_mb()
    return {
        "load_ms": load_ms,
        "p50_ms": statistics.median(lat),
        "p99_ms": float(np.percentile(lat, 99)),
        "qps_batch": len(q) / batch_s,
        "recall_at_10": recall_at(found, exact, K),
        "rss_mb": rss1 - rss0,
        "rss_anon_mb": anon1 - anon0,
    }


def _numpy_knn(emb: np.ndarray, q: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Exact top K by inner product, streaming over the vectors in row blocks."""
    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.full((len(q), K), -1, np.int64)
    for start in range(0, len(emb), chunk):
        s = q @ np.asarray(emb[start : start + chunk]).T
        top = np.argpartition(-s, K - 1, axis=1)[:, :K]
        cand_s = np.hstack([best_s, np.take_along_axis(s, top, 1)])
        cand_i = np.hstack([best_i, top + start])
        keep = np.argpartition(-cand_s, K - 1, axis=1)[:, :K]
        best_s = np.take_along_axis(cand_s, keep, 1)
        best_i = np.take_along_axis(cand_i, keep, 1)
    return np.take_along_axis(best_i, np.argsort(-best_s, axis=1), 1)


@contextmanager
def _child_threads(threads: int) -> Iterator[None]:
    """BLAS and OpenMP fix their thread counts when they load: set them for the children."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    before = {k: os.environ.get(k) for k in names}
    os.environ.update({k: str(threads) for k in names})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fresh(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run fn in a new interpreter (spawn), so each phase starts with a clean RSS."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --- the run ---------------------------------------------------------------------------


def run(n: int = 100_000, dim: int = 128, families: tuple[str, ...] = FAMILIES,
        n_queries: int = 1_000, single: int = 200, threads: int = 1,
        workdir: Path | None = None, seed: int = 0) -> dict[str, Any]:
    import faiss

    from retrieval.faiss_index import exact_search, tuning_queries
    from retrieval.store import open_embeddings

    with _child_threads(threads), tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        vectors, queries, truth = root / "embeddings.npy", root / "q.npy", root / "truth.npy"
        write_vectors(vectors, n, dim, seed)
        emb = open_embeddings(vectors)
        q = tuning_queries(emb, n_queries, np.random.default_rng(seed + 1))  # held out
        np.save(queries, q)
        np.save(truth, exact_search(emb, q, K)[1])
        del emb

        results = []
        for family in families:
            out = root / f"{family}.faiss"
            built = _fresh(build_phase, str(vectors), family, str(out), threads)
            served = _fresh(serve_phase, str(vectors), str(out), built["params"], str(queries),
                            str(truth), threads, single)
            results.append({"index": family, **built, **served,
                            "index_mb": out.stat().st_size / 2**20})
            out.unlink()
        peer = _fresh(serve_phase, str(vectors), None, {}, str(queries), str(truth), threads,
                      single)
        results.append({"index": "numpy", "factory": "numpy brute force", "build_s": 0.0,
                        "params": {}, **peer, "index_mb": 0.0})
    return {
        "n": n,
        "dim": dim,
        "k": K,
        "queries": n_queries,
        "single_queries": single,
        "threads": threads,
        "results": results,
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "load_avg_at_start": os.getloadavg()[0],
            "python": platform.python_version(),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
    }



def format_table(r: dict[str, Any]) -> str:
    m = r["machine"]
    head = (f"retriever bench: n={r['n']} dim={r['dim']} k={r['k']} "
            f"queries={r['queries']} threads={r['threads']} | {m['cpu']} x{m['cores']}, "
            f"load {m['load_avg_at_start']:.1f}, faiss {m['faiss']}")
    peer = next(x for x in r["results"] if x["index"] == "numpy")
    rows = [f"{'index':<7} {'factory':<30} {'build s':>8} {'load ms':>8} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'QPS':>9} {'recall':>7} {'RSS MB':>7} {'anon MB':>7} {'p50 vs np':>9} "
            f"{'QPS vs np':>9}"]
    for x in r["results"]:
        rows.append(
            f"{x['index']:<7} {x['factory'][:30]:<30} {x['build_s']:>8.1f} {x['load_ms']:>8.1f} "
            f"{x['p50_ms']:>7.2f} {x['p99_ms']:>7.2f} {x['qps_batch']:>9.0f} "
            f"{x['recall_at_10']:>7.3f} {x['rss_mb']:>7.1f} {x['rss_anon_mb']:>7.1f} "
            f"{peer['p50_ms'] / x['p50_ms']:>8.1f}x {x['qps_batch'] / peer['qps_batch']:>8.1f}x")
    params = ", ".join(f"{x['index']}: {x['params']}" for x in r["results"] if x["params"])
    return head + "\n" + "\n".join(rows) + f"\ntuned: {params}"


def main(json_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    result = run(**kwargs)
    return publish(result, format_table(result), json_path, print_json=False)
