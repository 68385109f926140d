"""FAISS indexes over normalised CLIP vectors: maximum inner product search.

The family follows the size, as autofaiss chooses (FAISS index-factory strings):

    n < 50k        Flat                            exact
    n <= 1M        IVF{k},Flat   (or HNSW32)       k ~ 4·sqrt(n) lists
    n > 1M         OPQ{m}_{d},IVF{k}_HNSW32,PQ{m}  compressed codes, HNSW coarse quantiser

`auto` picks IVF-Flat rather than HNSW in the middle band: it builds ~2x faster (and
HNSW's insertion cost grows with n), its recall is tuned by one knob up to exact, and on
load it touches nothing, while an HNSW load reads its whole graph through the page cache
(`racm3 bench retriever` measures all of this).

The search-time knobs are tuned at build time to the cheapest setting that reaches
recall@10 >= 0.95 against exact search on held-out queries, and recorded in the
manifest: FAISS does not serialise all of them (efSearch, quantizer_efSearch), so they
are re-applied at load. recall@10 here is the strict one: the fraction of the exact top
10 found in the returned top 10.

PQ codes alone rarely reach that recall, so IVF-PQ searches with a *refine factor*: it
fetches `refine_factor · k` candidates and re-scores them exactly against the stored
float32 vectors (`embeddings.npy`, memory-mapped; the memory keeps it anyway for the
diversity rule and for appends). This is FAISS's IndexRefine idea without a second copy
of the vectors inside the index file.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
EXACT_BELOW = 50_000
IVF_FLAT_UP_TO = 1_000_000
TARGET_RECALL = 0.95
MAX_TRAIN = 100_000
TRAIN_PER_LIST = 64  # autofaiss trains IVF on ~64 vectors per list; FAISS caps at 256
MIN_PER_LIST = 39  # below this FAISS k-means warns that lists are poorly trained
PQ_MIN_TRAIN = 256 * MIN_PER_LIST  # 8-bit PQ: 256 centroids per sub-quantiser
IVF_MIN_N = 1_000  # fewer vectors than this: exact search is both exact and fastest
TUNE_QUERIES = 500
QUERY_NOISE = 0.5  # norm of the noise added to a stored vector to make a tuning query

EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
REFINE_FACTORS = (1, 2, 4, 8, 16, 32)
OPQ_ITERATIONS = 25  # FAISS's default is 50

# How an index was loaded. With IO_FLAG_MMAP_IFC (FAISS 1.15) every family we build maps
# its arrays (measured: RssAnon does not grow; an HNSW load does read its graph through
# the mapping, ~n*256 bytes of page cache for HNSW32). IO_FLAG_MMAP alone would copy a
# Flat index into RAM.
MMAP = "mmap"
IN_RAM = "ram"


@dataclass
class IndexInfo:
    """What was built and how to search it; stored in the manifest under `index`."""

    type: str  # flat | hnsw | ivf | ivfpq (the family actually built)
    factory: str  # FAISS index-factory string
    n: int
    dim: int
    params: dict[str, int] = field(default_factory=dict)  # nprobe, efSearch, refine_factor…
    recall_at_10: float = 1.0  # measured against exact search on held-out queries
    requested_type: str = "auto"
    train_size: int = 0
    build_s: float = 0.0
    mmap_mode: str = MMAP  # how the saved file actually loads; set after saving

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexInfo:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# --- choosing -------------------------------------------------------------------------


def resolve_index_type(n: int, index_type: str = "auto") -> str:
    """The family to build for n vectors: `auto` by size, and a requested family falls
    back to a simpler one when there are too few vectors to train it."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose from {INDEX_TYPES}")
    if index_type == "auto":
        if n < EXACT_BELOW:
            return "flat"
        return "ivf" if n <= IVF_FLAT_UP_TO else "ivfpq"
    if index_type == "ivfpq" and n < PQ_MIN_TRAIN:
        log.warning("ivfpq needs >= %d vectors to train its codebooks; building ivf", PQ_MIN_TRAIN)
        index_type = "ivf"
    if index_type == "ivf" and n < IVF_MIN_N:
        log.warning("ivf needs >= %d vectors to train its lists; building flat", IVF_MIN_N)
        index_type = "flat"
    return index_type


def n_lists(n: int, per_sqrt: float = 4.0) -> int:
    """IVF list count: ~4·sqrt(n) (autofaiss), at most n/39 so every list is trainable."""
    return max(1, min(int(per_sqrt * math.sqrt(max(n, 1))), n // MIN_PER_LIST))


def pq_subquantizers(dim: int) -> int:
    """PQ bytes per vector: ~dim/8, a divisor of dim. The exact re-scoring (refine
    factor) recovers the recall that the coarse codes lose."""
    for m in range(max(1, dim // 8), 0, -1):
        if dim % m == 0:
            return m
    return 1


def choose_index(n: int, dim: int, index_type: str = "auto") -> str:
    """FAISS index-factory string for n vectors of dim dimensions."""
    kind = resolve_index_type(n, index_type)
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32"
    if kind == "ivf":
        return f"IVF{n_lists(n)},Flat"
    m = pq_subquantizers(dim)
    # beyond a million vectors, more (smaller) lists keep the scanned fraction small
    lists = n_lists(n, per_sqrt=16.0 if n > IVF_FLAT_UP_TO else 4.0)
    return f"OPQ{m}_{dim},IVF{lists}_HNSW32,PQ{m}"


def _type_of(factory: str) -> str:
    if factory == "Flat":
        return "flat"
    if factory.startswith("HNSW"):
        return "hnsw"
    return "ivfpq" if "PQ" in factory else "ivf"


# --- search parameters ------------------------------------------------------------------


def set_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply FAISS search parameters (the refine factor is ours, applied by VectorIndex)."""
    faiss_params = {k: v for k, v in params.items() if k != "refine_factor"}
    if not faiss_params:
        return
    ps = faiss.ParameterSpace()
    for key, value in faiss_params.items():
        ps.set_index_parameter(index, key, int(value))


def _with_quantizer_ef(nprobe: int) -> dict[str, int]:
    # the HNSW coarse quantiser must explore at least nprobe centroids to return them
    return {"nprobe": nprobe, "quantizer_efSearch": max(32, 2 * nprobe)}


class VectorIndex:
    """A FAISS index plus the search parameters it was tuned to, and (for PQ) the exact
    vectors it re-scores candidates with. `search` keeps FAISS's -1 padding."""

    def __init__(self, index: faiss.Index, params: dict[str, int] | None = None,
                 vectors: np.ndarray | None = None, mmap_mode: str = IN_RAM) -> None:
        self.index = index
        self.params = dict(params or {})
        self.refine_factor = int(self.params.get("refine_factor", 1))
        if self.refine_factor > 1 and vectors is None:
            raise ValueError("this index re-scores with the stored vectors: pass `vectors`")
        self.vectors = vectors
        self.mmap_mode = mmap_mode
        set_search_params(index, self.params)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, ids (Q, k) int64), best first; ids -1 where FAISS found
        fewer than k (scores there are -inf)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {q.shape}")
        if self.refine_factor <= 1:
            scores, ids = self.index.search(q, k)
            scores[ids < 0] = -np.inf
            return scores, ids
        _, cand = self.index.search(q, k * self.refine_factor)
        return rescore(q, cand, self.vectors, k)

    @classmethod
    def load(cls, path: str | Path, params: dict[str, int] | None = None,
             vectors: np.ndarray | None = None, mmap: bool = True) -> VectorIndex:
        index, mode = read_index(path, mmap=mmap)
        return cls(index, params, vectors, mode)


def rescore(queries: np.ndarray, candidates: np.ndarray, vectors: np.ndarray,
            k: int, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products for candidate ids (Q, C) read from `vectors`; top k of them.
    Queries go in blocks so the gathered (block, C, D) rows stay a few MB."""
    nq = len(queries)
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for start in range(0, nq, block):
        cand = candidates[start : start + block]
        valid = cand >= 0
        wanted = np.unique(cand[valid])
        if not wanted.size:
            continue
        rows = np.asarray(vectors[wanted], dtype=np.float32)  # sorted reads: kind to a mmap
        pos = np.searchsorted(wanted, np.where(valid, cand, wanted[0]))
        sims = np.einsum("qd,qcd->qc", queries[start : start + block], rows[pos])
        scores[start : start + block] = np.where(valid, sims, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_s = np.take_along_axis(scores, order, 1)
    top_i = np.take_along_axis(candidates, order, 1)
    top_i[~np.isfinite(top_s)] = -1
    if top_s.shape[1] < k:  # fewer candidates than k (tiny index): pad like FAISS
        pad = k - top_s.shape[1]
        top_s = np.hstack([top_s, np.full((nq, pad), -np.inf, np.float32)])
        top_i = np.hstack([top_i, np.full((nq, pad), -1, np.int64)])
    return top_s, top_i


# --- building and tuning ---------------------------------------------------------------


def build_index(
    vectors: np.ndarray,
    index_type: str = "auto",
    *,
    factory: str | None = None,
    seed: int = 0,
    train_size: int | None = None,
    chunk_rows: int = 65_536,
    target_recall: float = TARGET_RECALL,
    n_queries: int = TUNE_QUERIES,
) -> tuple[VectorIndex, IndexInfo]:
    """Build, fill and tune an index over `vectors`: (N, D) float32, normalised, in RAM or
    a disk memmap (read in chunks). `factory` overrides the family's default string."""
    t0 = time.perf_counter()
    n, dim = vectors.shape
    factory = factory or choose_index(n, dim, index_type)
    kind = _type_of(factory)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    _lighten_training(index)
    rng = np.random.default_rng(seed)
    n_train = 0
    if not index.is_trained:
        n_train = train_size or _default_train_size(n, factory)
        sample = np.sort(rng.choice(n, size=min(n, n_train), replace=False))
        log.info("training %s on %d vectors", factory, len(sample))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        n_train = len(sample)
    for start in range(0, n, chunk_rows):
        index.add(np.ascontiguousarray(vectors[start : start + chunk_rows], dtype=np.float32))
    info = IndexInfo(type=kind, factory=factory, n=n, dim=dim, requested_type=index_type,
                     train_size=n_train)
    handle = VectorIndex(index, {}, vectors if kind == "ivfpq" else None)
    if kind != "flat" and n > 0:
        queries = tuning_queries(vectors, n_queries, rng)
        _, truth = exact_search(vectors, queries, 10, chunk_rows)
        info.params, info.recall_at_10 = tune(handle, kind, queries, truth, target_recall)
        handle = VectorIndex(index, info.params, handle.vectors)
    info.build_s = time.perf_counter() - t0
    log.info("built %s over %d vectors in %.1f s: %s recall@10 %.3f", factory, n, info.build_s,
             info.params, info.recall_at_10)
    return handle, info


def _lighten_training(index: faiss.Index) -> None:
    """Skip training work whose benefit the exact re-scoring makes moot: polysemous
    codes (which the factory turns on for PQ, and which only speed up Hamming-filtered
    L2 search) and half of OPQ's rotation iterations."""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = OPQ_ITERATIONS
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an IVF index
        return
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False


def _default_train_size(n: int, factory: str) -> int:
    lists = int(factory.split("IVF")[1].split(",")[0].split("_")[0]) if "IVF" in factory else 1
    wanted = TRAIN_PER_LIST * lists
    if "PQ" in factory:
        wanted = max(wanted, PQ_MIN_TRAIN)
    return min(n, MAX_TRAIN, max(wanted, 1))


def tuning_queries(vectors: np.ndarray, n_queries: int, rng: np.random.Generator) -> np.ndarray:
    """Stored vectors plus noise of norm QUERY_NOISE, renormalised: near the documents
    like real queries, but not on them (a stored vector trivially finds itself)."""
    n, dim = vectors.shape
    picks = np.sort(rng.choice(n, size=min(n, n_queries), replace=False))
    q = np.asarray(vectors[picks], dtype=np.float32)
    noise = rng.standard_normal(q.shape).astype(np.float32)
    noise *= QUERY_NOISE / np.linalg.norm(noise, axis=1, keepdims=True)
    q = q + noise
    faiss.normalize_L2(q)
    return q


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int,
                 chunk_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top k by inner product, streaming over `vectors` (which may be a
    memmap much larger than RAM)."""
    nq = len(queries)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    for start in range(0, len(vectors), chunk_rows):
        block = np.asarray(vectors[start : start + chunk_rows], dtype=np.float32)
        s = queries @ block.T
        all_s = np.hstack([best_s, s])
        all_i = np.hstack([best_i, np.broadcast_to(np.arange(start, start + len(block)),
                                                    s.shape)])
        top = np.argpartition(-all_s, min(k, all_s.shape[1]) - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(all_s, top, 1)
        best_i = np.take_along_axis(all_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's exact top k (ignoring -1) found in its top k."""
    hits = []
    for f, t in zip(found[:, :k], truth[:, :k], strict=True):
        t = set(t[t >= 0].tolist())
        if t:
            hits.append(len(t & set(f[f >= 0].tolist())) / len(t))
    return float(np.mean(hits)) if hits else 1.0


def tune(handle: VectorIndex, kind: str, queries: np.ndarray, truth: np.ndarray,
         target: float = TARGET_RECALL) -> tuple[dict[str, int], float]:
    """The cheapest search parameters reaching `target` recall@10 (or the best seen)."""

    def measure(params: dict[str, int]) -> float:
        probe = VectorIndex(handle.index, params, handle.vectors)
        return recall_at(probe.search(queries, 10)[1], truth)

    if kind == "hnsw":
        return _first_reaching([{"efSearch": ef} for ef in EF_SEARCH], measure, target)
    nlist = faiss.extract_index_ivf(handle.index).nlist
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p < nlist] + [nlist]
    if kind == "ivf":
        return _first_reaching([{"nprobe": p} for p in probes], measure, target)
    # ivfpq: the code error needs a refine factor whatever nprobe is; find the factor with
    # many lists probed, then the fewest lists with that factor
    wide = _with_quantizer_ef(min(nlist, 256))
    factor, _ = _first_reaching([{**wide, "refine_factor": f} for f in REFINE_FACTORS],
                                measure, target)
    rf = factor["refine_factor"]
    return _first_reaching([{**_with_quantizer_ef(p), "refine_factor": rf} for p in probes],
                           measure, target)


def _first_reaching(candidates: Sequence[dict[str, int]], measure: Any,
                    target: float) -> tuple[dict[str, int], float]:
    best: tuple[dict[str, int], float] = (dict(candidates[-1]), -1.0)
    for params in candidates:
        recall = measure(params)
        log.debug("tuning %s: recall@10 %.4f", params, recall)
        if recall >= target:
            return dict(params), recall
        if recall > best[1]:
            best = (dict(params), recall)
    log.warning("no setting reached recall@10 %.2f; using %s (%.3f)", target, *best)
    return best


# --- files ---------------------------------------------------------------------------


def write_index(index: faiss.Index | VectorIndex, path: str | Path) -> None:
    raw = index.index if isinstance(index, VectorIndex) else index
    faiss.write_index(raw, str(path))


def read_index(path: str | Path, mmap: bool = True) -> tuple[faiss.Index, str]:
    """Load an index memory-mapped (read-only), and say how it was loaded: MMAP, or
    IN_RAM where FAISS refuses to map it (an index type it cannot map) or `mmap=False`."""
    if mmap:
        try:
            flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
            return faiss.read_index(str(path), flags), MMAP
        except RuntimeError as e:
            log.warning("%s cannot be memory-mapped (%s); reading it into RAM", path,
                        str(e).splitlines()[0])
    return faiss.read_index(str(path)), IN_RAM
