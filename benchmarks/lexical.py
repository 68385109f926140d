"""The lexical index against tantivy, the other BM25 engine on PyPI (`racm3 bench lexical`).

Both index the same n synthetic captions (the demo world's kinds: objects, pairs, flags
of invented names) and answer the same queries, one at a time, top 16:
- build_s: tokenise + index + save;
- load_ms: open the saved index (page cache warm);
- p50_ms / p99_ms: one query (names and attribute prompts, half each);
- deterministic: two builds of the same captions give byte-identical files (so a
  memory's checksums are reproducible);
- same_top1: the share of queries whose best caption is the other engine's (captions,
  not ids: equal captions tie, and the engines break ties differently).

Ours is `retrieval.lexical_index.LexicalIndex` (bm25s's score matrix, scored from
the query terms' postings); the peer is tantivy with its default tokenizer.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import cpu_name
from benchmarks.output import publish

TOP = 16


def captions_and_queries(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    syllables = ["ba", "ve", "lo", "ri", "ta", "kon", "dra", "mi", "zu", "sto", "gar", "nel"]
    names = sorted({"".join(rng.choice(syllables, rng.integers(2, 4))).capitalize()
                    for _ in range(max(50, n // 20))})
    colours = "red green blue yellow purple orange white black".split()
    shapes = "square circle triangle star heart cross diamond ring".split()
    templates = ["a {s} {c} {sh} on the {p}", "the flag of {n}", "{n}'s flag",
                 "a picture of the flag of {n}", "a {c} {sh} above a {c2} {sh2}"]

    def fill(template: str) -> str:
        return template.format(
            s=rng.choice(["big", "small"]), c=rng.choice(colours), c2=rng.choice(colours),
            sh=rng.choice(shapes), sh2=rng.choice(shapes),
            p=rng.choice(["left", "right", "top"]), n=rng.choice(names))

    captions = [fill(templates[rng.integers(len(templates))]) for _ in range(n)]
    queries = [f"the flag of {rng.choice(names)}" for _ in range(100)]
    queries += [fill("a {s} {c} {sh} on the {p}") for _ in range(100)]
    return captions, queries


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def _timed(calls: list[Any]) -> tuple[list[Any], dict[str, float]]:
    out, times = [], []
    for call in calls:
        t0 = time.perf_counter()
        out.append(call())
        times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return out, {"p50_ms": statistics.median(times), "p99_ms": times[int(0.99 * (len(times) - 1))]}


def bench_ours(captions: list[str], queries: list[str], work: Path) -> tuple[dict, list]:
    from retrieval.lexical_index import LexicalIndex

    digests = []
    for run in ("a", "b"):
        t0 = time.perf_counter()
        LexicalIndex.build(captions).save(work / run)
        build_s = time.perf_counter() - t0
        digests.append(_digest(work / run))
    t0 = time.perf_counter()
    index = LexicalIndex.load(work / "a")
    load_ms = 1e3 * (time.perf_counter() - t0)
    _timed([lambda q=q: index.search([q], TOP) for q in queries])  # warm
    hits, latency = _timed([lambda q=q: index.search([q], TOP)[1][0] for q in queries])
    return {"build_s": build_s, "load_ms": load_ms, **latency,
            "deterministic": digests[0] == digests[1]}, [int(h[0]) for h in hits]


def bench_tantivy(captions: list[str], queries: list[str], work: Path) -> tuple[dict, list]:
    import tantivy

    from retrieval.lexical_index import tokenize

    def build(folder: Path) -> None:
        folder.mkdir()
        schema = tantivy.SchemaBuilder()
        schema.add_text_field("caption", stored=False)
        schema.add_unsigned_field("id", stored=True)
        index = tantivy.Index(schema.build(), path=str(folder))
        writer = index.writer(heap_size=50_000_000, num_threads=1)
        for i, caption in enumerate(captions):
            doc = tantivy.Document()
            doc.add_unsigned("id", i)
            doc.add_text("caption", caption)
            writer.add_document(doc)
        writer.commit()
        writer.wait_merging_threads()

    digests = []
    for run in ("a", "b"):
        t0 = time.perf_counter()
        build(work / f"tantivy-{run}")
        build_s = time.perf_counter() - t0
        digests.append(_digest(work / f"tantivy-{run}"))
    t0 = time.perf_counter()
    index = tantivy.Index.open(str(work / "tantivy-a"))
    searcher = index.searcher()
    load_ms = 1e3 * (time.perf_counter() - t0)

    def query(text: str) -> list[int]:
        parsed = index.parse_query(" ".join(tokenize(text)), ["caption"])
        return [searcher.doc(address)["id"][0] for _, address in searcher.search(parsed, TOP).hits]

    _timed([lambda q=q: query(q) for q in queries])  # warm
    hits, latency = _timed([lambda q=q: query(q) for q in queries])
    return {"build_s": build_s, "load_ms": load_ms, **latency,
            "deterministic": digests[0] == digests[1]}, [h[0] if h else -1 for h in hits]


def run(n: int = 100_000, workdir: Path | None = None) -> dict[str, Any]:
    captions, queries = captions_and_queries(n)
    work = Path(tempfile.mkdtemp(dir=workdir))
    try:
        ours, our_top = bench_ours(captions, queries, work)
        peer, peer_top = bench_tantivy(captions, queries, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = float(np.mean([a >= 0 and b >= 0 and captions[a] == captions[b]
                          for a, b in zip(our_top, peer_top, strict=True)]))
    return {"n": n, "queries": len(queries), "top": TOP,
            "engines": {"bm25s (ours)": ours, "tantivy": peer}, "same_top1": same,
            "ratios": {"p50_ours_over_tantivy": ours["p50_ms"] / peer["p50_ms"],
                       "build_ours_over_tantivy": ours["build_s"] / peer["build_s"]},
            "machine": {"cpu": cpu_name()}}


def format_table(r: dict[str, Any]) -> str:
    lines = [f"{r['n']} captions, {r['queries']} queries, top {r['top']}",
             f"{'engine':14s} {'build s':>8s} {'load ms':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
             f"{'same bytes':>10s}"]
    for name, e in r["engines"].items():
        lines.append(f"{name:14s} {e['build_s']:8.2f} {e['load_ms']:8.1f} {e['p50_ms']:7.2f} "
                     f"{e['p99_ms']:7.2f} {str(e['deterministic']):>10s}")
    lines.append(f"same top-1 caption: {r['same_top1']:.2f}")
    return "\n".join(lines)


def main(json_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    result = run(**kwargs)
    return publish(result, format_table(result), json_path)
