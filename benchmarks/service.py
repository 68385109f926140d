"""Service latency and throughput (`racm3 bench service`).

Everything runs in this process, over real HTTP: the embedded mode (gateway + retriever +
generator) is served by uvicorn on a free port on a background thread, and an asyncio
httpx client drives it with a closed loop of C concurrent requests. Measured:

- text-to-image and caption latency (p50, p99) and throughput at concurrency 1, 8, 32,
  with the server's default settings (dynamic batching: max batch 8);
- text-to-image throughput at concurrency 8 with batching (max batch 8) against without
  (max batch 1): two servers side by side, run alternately so that load from other
  processes on a shared machine hits both alike;
- retrieval latency on a neighbour-cache hit against a miss, at the retriever service
  (`RetrieverService.search`: cache lookup, or CLIP + FAISS + the rules, then the
  document store), with Redis and with the in-process LRU; and end to end over HTTP.

Every request uses a prompt or image not seen before in the run, so each pays for its
own retrieval (a cache miss) unless the measurement is about hits. The client shares the
process (and the cores) with the server, so latencies include its share of the CPU; the
machine's load average is recorded beside the numbers.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import platform
import secrets
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.machine import cpu_name
from benchmarks.output import publish

log = logging.getLogger(__name__)

CONCURRENCY = (1, 8, 32)
# What the service is held to (BENCHMARKS.md, "Service"): a lone text-to-image request,
# the gain of batching, a cached retrieval, and the fast decoding path over the plain one.
TARGETS = {
    "t2i_p50_ms_c1": ("<=", 300.0),
    "batching_throughput_ratio_c8": (">=", 3.0),
    "cache_hit_ms": ("<=", 2.0),
    "speedup_vs_baseline_c1": (">=", 2.0),
    "speedup_vs_baseline_c8": (">=", 2.0),
}
SIZES = ("small", "big")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SHAPES = ("square", "circle", "triangle", "diamond", "ring")
PLACES = ("on the left", "on the right", "at the top", "at the bottom")
RELATIONS = ("left of", "right of", "above", "below")


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def prompts() -> Iterator[str]:
    """Distinct demo-world captions, one or two objects (6,720 before the cycle repeats),
    so that no request in a run hits the neighbour cache by accident."""
    singles = [f"a {size} {colour} {shape} {place}" for size, colour, shape, place
               in itertools.product(SIZES, COLOURS, SHAPES, PLACES)]
    pairs = [f"{_a(c1)} {s1} {rel} {_a(c2)} {s2}" for c1, s1, rel, c2, s2
             in itertools.product(COLOURS, SHAPES, RELATIONS, COLOURS, SHAPES)]
    combos = singles + pairs
    order = np.random.default_rng(0).permutation(len(combos))
    for i in itertools.cycle(order):
        yield combos[i]


# --- an in-process server ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def embedded_server(**generator: Any) -> Iterator[tuple[str, Any]]:
    """The embedded app under uvicorn on a free port; yields (url, app) once ready."""
    import uvicorn

    from app.serve import create_role_app
    from app.settings import GeneratorSettings, get_generator_settings

    settings = GeneratorSettings(**{**get_generator_settings().model_dump(), **generator})
    app = create_role_app("embedded", generator_settings=settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, thread)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _wait_ready(url: str, thread: threading.Thread, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline and thread.is_alive():
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            last = r.json()
            if r.status_code == 200:
                return
            if any(str(v).startswith("failed") for v in last.get("checks", {}).values()):
                break
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"the embedded server did not become ready: {last}")


def _batch_stats(app: Any) -> tuple[float, float, float]:
    """(batches, jobs, engine seconds) the generator has run so far."""
    registry = app.state.metrics.registry
    count = registry.get_sample_value("racm3_batch_size_count", {"queue": "generate"}) or 0.0
    total = registry.get_sample_value("racm3_batch_size_sum", {"queue": "generate"}) or 0.0
    busy = registry.get_sample_value("racm3_stage_latency_seconds_sum",
                                     {"stage": "generate_text_to_image"}) or 0.0
    return count, total, busy


STAGES = ("request", "retrieve", "generate", "generate_queue_wait", "generate_text_to_image")


def _stage_sums(app: Any) -> dict[str, tuple[float, float]]:
    registry = app.state.metrics.registry
    out = {}
    for stage in STAGES:
        labels = {"stage": stage}
        out[stage] = (
            registry.get_sample_value("racm3_stage_latency_seconds_sum", labels) or 0.0,
            registry.get_sample_value("racm3_stage_latency_seconds_count", labels) or 0.0,
        )
    return out


def _stage_means_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per observation of each stage between two `_stage_sums` snapshots."""
    return {k: 1000 * (after[k][0] - before[k][0]) / max(after[k][1] - before[k][1], 1)
            for k in before}


def engine_batch_scaling(app: Any, repeats: int = 5) -> dict[str, float]:
    """The engine alone, called directly (no HTTP, no retrieval, no queue): text-to-image
    with 1 job vs 8 jobs in one call, default sampling, two neighbours in context. This is
    the ceiling for what dynamic batching can gain in the service."""
    from model.jobs import SamplingParams, T2IJob

    engine = app.state.components.generator.engine
    snap = app.state.components.retriever.snapshot()
    docs = snap.neighbours([(0, 0.5), (1, 0.5)], None, tokens=True, thumbnails=False)
    gen = prompts()

    def batch(size: int) -> list[T2IJob]:
        return [T2IJob(next(gen), docs, 1, 1, SamplingParams(seed=i, guidance_scale=3.0))
                for i in range(size)]

    timings: dict[int, list[float]] = {1: [], 8: []}
    for _ in range(repeats):  # alternate sizes, so drifting load hits both alike
        for size in (1, 8):
            jobs = batch(size)
            t0 = time.perf_counter()
            engine.text_to_image(jobs)
            timings[size].append(time.perf_counter() - t0)
    b1, b8 = statistics.median(timings[1]), statistics.median(timings[8])
    return {"engine_t2i_ms_b1": b1 * 1000, "engine_t2i_ms_b8": b8 * 1000,
            "engine_batch_ratio_b8": 8 * b1 / b8}


# --- load generation -----------------------------------------------------------------------


@dataclass
class Run:
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float(
            "nan")

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def merge(self, other: Run) -> Run:
        errors = dict(self.errors)
        for k, v in other.errors.items():
            errors[k] = errors.get(k, 0) + v
        return Run(self.latencies_s + other.latencies_s, errors, self.wall_s + other.wall_s)


async def closed_loop(url: str, path: str, bodies: list[dict], concurrency: int) -> Run:
    """Send every body, `concurrency` at a time, each worker starting its next request when
    its last one finished; latency is per request, throughput over the whole run."""
    run = Run()
    queue = iter(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def worker() -> None:
            for body in queue:
                t0 = time.perf_counter()
                r = await client.post(path, json=body)
                elapsed = time.perf_counter() - t0
                if r.status_code == 200:
                    run.latencies_s.append(elapsed)
                else:
                    key = str(r.status_code)
                    run.errors[key] = run.errors.get(key, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - t0
    return run


def _requests_for(concurrency: int, per_level: int) -> int:
    # At least 4 rounds of the concurrency, so the p99 is not one request's luck.
    return max(per_level, 4 * concurrency)


# --- retrieval: cache hit vs miss ------------------------------------------------------------


async def _time_search(svc: Any, queries: list[Any]) -> list[float]:
    """Seconds per `search` call, one query at a time, as the gateway asks for generation."""
    out = []
    for q in queries:
        t0 = time.perf_counter()
        await svc.search([q], 2, "rag", tokens=True, thumbnails=False)
        out.append(time.perf_counter() - t0)
    return out


async def retrieval_cache(clip: Any, redis_url: str | None, n: int) -> dict[str, float]:
    """p50/p99 of `RetrieverService.search` on hits and on misses, for one cache backend."""
    from app.metrics import Metrics
    from app.retriever.service import CoreRetrieverBackend, RetrievalQuery, RetrieverService
    from app.settings import get_retriever_settings

    settings = get_retriever_settings().model_copy(
        update={"redis_url": redis_url, "cache_ttl_s": 120})  # bench keys expire soon
    svc = RetrieverService(settings, lambda s: CoreRetrieverBackend(s, clip), Metrics())
    await svc.start()
    if not svc.ready:
        raise RuntimeError(f"retriever did not start: {svc.state}")
    try:
        nonce = secrets.token_hex(4)  # never cached by an earlier run
        gen = prompts()
        misses = [RetrievalQuery(text=f"{next(gen)} {nonce}{i}") for i in range(n)]
        miss_s = await _time_search(svc, misses)
        hit_query = RetrievalQuery(text=f"a big red square on the left {nonce}")
        await svc.search([hit_query], 2, "rag")  # fill the cache
        hit_s = await _time_search(svc, [hit_query] * (4 * n))
        status = await svc.cache.check()
    finally:
        await svc.stop()
    return {
        "hit_p50_ms": statistics.median(hit_s) * 1000,
        "hit_p99_ms": float(np.percentile(hit_s, 99) * 1000),
        "miss_p50_ms": statistics.median(miss_s) * 1000,
        "miss_p99_ms": float(np.percentile(miss_s, 99) * 1000),
        "status": status,  # type: ignore[dict-item]
    }


async def retrieval_http(url: str, n: int) -> dict[str, float]:
    """/v1/retrieve end to end (embedded server, its in-process LRU): hit vs miss."""
    nonce = secrets.token_hex(4)
    gen = prompts()
    miss = [{"text": f"{next(gen)} {nonce}{i}", "k": 2, "return_thumbnails": False}
            for i in range(n)]
    hit = [{"text": f"a big red square {nonce}", "k": 2, "return_thumbnails": False}] * (4 * n)
    miss_run = await closed_loop(url, "/v1/retrieve", miss, 1)
    await closed_loop(url, "/v1/retrieve", hit[:1], 1)
    hit_run = await closed_loop(url, "/v1/retrieve", hit, 1)
    return {"hit_p50_ms": hit_run.percentile_ms(50), "miss_p50_ms": miss_run.percentile_ms(50)}


# --- the benchmark ---------------------------------------------------------------------------


def _caption_bodies(memory_dir: Path, start: int, n: int) -> list[dict]:
    """Stored memory images, base64 PNG, one per request (distinct: each a retrieval miss)."""
    from retrieval.memory import Memory

    memory = Memory.load(memory_dir)
    ids = [(start + i) % len(memory) for i in range(n)]
    return [{"image": base64.b64encode(d.image_bytes).decode(), "seed": i}
            for i, d in enumerate(memory.documents(ids, with_image=True))]


def _t2i_bodies(gen: Iterator[str], n: int, seed0: int) -> list[dict]:
    return [{"prompt": next(gen), "seed": seed0 + i} for i in range(n)]


def run(
    bundle_dir: Path | None = None,
    memory_dir: Path | None = None,
    *,
    requests: int = 24,
    batching_requests: int = 48,
    retrieval_queries: int = 50,
    redis_url: str = "redis://127.0.0.1:6379/0",
    threads: int = 1,
    baseline: bool = False,
    full: bool = True,
    soak_s: float = 0.0,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """`full`: the latency, batching and retrieval measurements; `baseline`: the plain
    decoding path against the fast one (benchmarks/service_baseline.py)."""
    from benchmarks.service_baseline import compare

    rs = _serve_from(bundle_dir, memory_dir, threads)
    result: dict[str, Any] = {
        "bundle": str(rs.bundle_dir),
        "memory": str(rs.memory_dir),
        "machine": f"{platform.machine()} {cpu_name()}, {os.cpu_count()} cores",
        "torch_threads": threads,
        "loadavg_start": list(os.getloadavg()),
        "requests_per_level": requests,
    }
    gen = prompts()
    loop = asyncio.new_event_loop()
    if not full:
        try:
            result.update(compare(loop, gen, requests=requests, soak_s=soak_s,
                                  progress=progress))
        finally:
            loop.close()
        return _finish(result)
    try:
        # With --baseline this server is the fast path's arm, so it runs the fast path
        # whatever the device's default.
        with embedded_server(**({"fast_decode": True} if baseline else {})) as (url, app):
            result["server"] = {k: app.state.components.generator.describe()[k]
                                for k in ("max_batch_size", "max_wait_ms",
                                          "max_expected_wait_ms", "queue_size")}
            result["decoder_params"] = app.state.components.generator.engine_info.get(
                "decoder_params")
            result.update(_latencies(loop, url, app, gen, rs.memory_dir, requests,
                                     retrieval_queries, progress))
            result.update(_batching(loop, url, app, gen, batching_requests, progress))
            progress("the engine alone: 1 job vs 8 jobs per call")
            result.update(engine_batch_scaling(app))
            result.update(_cache_backends(loop, app, redis_url, retrieval_queries, progress))
            if baseline:
                result.update(compare(loop, gen, requests=requests, soak_s=soak_s,
                                      progress=progress, fast_url_app=(url, app)))
    finally:
        loop.close()
    # Headline: the deployed configuration (Redis) when it answered, else the LRU.
    backend = "redis" if result.get("cache_redis_status") == "ok" else "lru"
    result["cache_backend"] = backend
    result["cache_hit_ms"] = result.get(f"cache_{backend}_hit_p50_ms")
    result["cache_miss_ms"] = result.get(f"cache_{backend}_miss_p50_ms")
    return _finish(result)


def _serve_from(bundle_dir: Path | None, memory_dir: Path | None, threads: int) -> Any:
    """Point the services' RACM3_* settings at this bundle and memory; their settings."""
    import torch

    from app.serve import preflight
    from app.settings import clear_settings_cache, get_retriever_settings

    if bundle_dir is not None:
        os.environ["RACM3_BUNDLE_DIR"] = str(bundle_dir)
    if memory_dir is not None:
        os.environ["RACM3_MEMORY_DIR"] = str(memory_dir)
    os.environ.pop("RACM3_REDIS_URL", None)  # the served app uses its in-process LRU
    clear_settings_cache()
    torch.set_num_threads(threads)
    settings = get_retriever_settings()
    preflight("embedded")
    return settings


def _latencies(loop: asyncio.AbstractEventLoop, url: str, app: Any, gen: Iterator[str],
               memory_dir: Path, requests: int, retrieval_queries: int,
               progress: Callable[[str], None]) -> dict[str, Any]:
    """Text-to-image and caption latency at each concurrency, text-to-image without
    guidance, and a retrieval over HTTP hit against a miss."""
    result: dict[str, Any] = {}
    loop.run_until_complete(closed_loop(url, "/v1/images/generations",
                                        _t2i_bodies(gen, 4, 10_000), 4))  # warm-up
    for c in CONCURRENCY:
        n = _requests_for(c, requests)
        progress(f"text-to-image at concurrency {c} ({n} requests)")
        stages = _stage_sums(app)
        t2i = loop.run_until_complete(closed_loop(
            url, "/v1/images/generations", _t2i_bodies(gen, n, 1000 * c), c))
        if c == 1:  # where a lone request's time goes, by server-side stage
            result["t2i_stages_ms_c1"] = _stage_means_ms(stages, _stage_sums(app))
        progress(f"captions at concurrency {c} ({n} requests)")
        cap = loop.run_until_complete(closed_loop(
            url, "/v1/images/captions", _caption_bodies(memory_dir, 100 * c, n), c))
        for name, r in (("t2i", t2i), ("caption", cap)):
            result[f"{name}_p50_ms_c{c}"] = r.percentile_ms(50)
            result[f"{name}_p99_ms_c{c}"] = r.percentile_ms(99)
            result[f"{name}_rps_c{c}"] = r.throughput
            if r.errors:
                result[f"{name}_errors_c{c}"] = r.errors
    progress("text-to-image at concurrency 1 without classifier-free guidance")
    no_cfg = [{**b, "guidance_scale": 1.0} for b in _t2i_bodies(gen, requests, 7000)]
    result["t2i_p50_ms_c1_no_cfg"] = loop.run_until_complete(closed_loop(
        url, "/v1/images/generations", no_cfg, 1)).percentile_ms(50)
    progress("retrieval over HTTP: hit vs miss")
    http = loop.run_until_complete(retrieval_http(url, retrieval_queries))
    result["cache_hit_http_ms"] = http["hit_p50_ms"]
    result["cache_miss_http_ms"] = http["miss_p50_ms"]
    return result


def _batching(loop: asyncio.AbstractEventLoop, url: str, app: Any, gen: Iterator[str],
              batching_requests: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """The served app (max batch 8) against a second one that never batches, at
    concurrency 8, in alternating rounds."""
    progress("batching (max batch 8) vs none (max batch 1) at concurrency 8")
    with embedded_server(max_batch_size=1) as (url1, _):
        half = max(8, batching_requests // 2)
        runs = {8: Run(), 1: Run()}
        before = _batch_stats(app)
        for round_ in range(2):  # alternate, so drifting load hits both alike
            for size, u in ((8, url), (1, url1)):
                bodies = _t2i_bodies(gen, half, 50_000 + 1000 * round_ + size)
                runs[size] = runs[size].merge(loop.run_until_complete(
                    closed_loop(u, "/v1/images/generations", bodies, 8)))
        after = _batch_stats(app)
    return {
        "t2i_rps_c8_batched": runs[8].throughput,
        "t2i_rps_c8_unbatched": runs[1].throughput,
        "t2i_p50_ms_c8_unbatched": runs[1].percentile_ms(50),
        "batching_throughput_ratio_c8": runs[8].throughput / runs[1].throughput,
        "mean_batch_size_c8": (after[1] - before[1]) / max(after[0] - before[0], 1),
        # How much of the batched arm's wall time the engine thread was computing.
        "engine_busy_frac_c8": (after[2] - before[2]) / runs[8].wall_s,
    }


def _cache_backends(loop: asyncio.AbstractEventLoop, app: Any, redis_url: str,
                    retrieval_queries: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """The retriever's cache hit against a miss, with Redis and with the in-process LRU."""
    result: dict[str, Any] = {}
    clip = _shared_clip(app)
    for backend, url_ in (("redis", redis_url), ("lru", None)):
        progress(f"retriever cache hit vs miss ({backend})")
        try:
            r = loop.run_until_complete(retrieval_cache(clip, url_, retrieval_queries))
        except Exception as exc:  # noqa: BLE001 - report, don't abort the run
            result[f"cache_{backend}_error"] = f"{type(exc).__name__}: {exc}"
            continue
        result[f"cache_{backend}_status"] = r.pop("status")
        for k, v in r.items():
            result[f"cache_{backend}_{k}"] = v
    return result


def _finish(result: dict[str, Any]) -> dict[str, Any]:
    result["loadavg_end"] = list(os.getloadavg())
    result["targets"] = {k: {"target": f"{op} {v:g}", "met": _meets(result.get(k), op, v)}
                         for k, (op, v) in TARGETS.items() if k in result}
    return result


def _shared_clip(app: Any) -> Any:
    backend = app.state.components.retriever.backend
    return backend.clip


def _meets(value: float | None, op: str, target: float) -> bool | None:
    if value is None or value != value:
        return None
    return value <= target if op == "<=" else value >= target



def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def format_table(r: dict[str, Any]) -> str:
    from benchmarks.service_baseline import format_table as baseline_table

    if "t2i_p50_ms_c1" not in r:  # --baseline-only
        return "\n".join([f"racm3 service benchmark: {r['bundle']} + {r['memory']}",
                          f"{r['machine']}; torch threads {r['torch_threads']}; load "
                          f"average {_fmt(r['loadavg_start'][0], 2)} at start, "
                          f"{_fmt(r['loadavg_end'][0], 2)} at end", "",
                          baseline_table(r), "", *_target_lines(r)])
    lines = [
        f"racm3 service benchmark: {r['bundle']} + {r['memory']}",
        f"{r['machine']}; torch threads {r['torch_threads']}; load average "
        f"{_fmt(r['loadavg_start'][0], 2)} at start, {_fmt(r['loadavg_end'][0], 2)} at end",
        f"server: max batch {r['server']['max_batch_size']}, waits up to "
        f"{r['server']['max_expected_wait_ms']:g} ms for jobs announced as on their way "
        f"(blind wait {r['server']['max_wait_ms']:g} ms), queue {r['server']['queue_size']}",
        "",
        f"{'':28}" + "".join(f"{f'c={c}':>12}" for c in CONCURRENCY),
    ]
    for task, label in (("t2i", "text-to-image"), ("caption", "caption")):
        for stat, unit in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("rps", "req/s")):
            row = f"{label + ' ' + unit:28}"
            row += "".join(f"{_fmt(r.get(f'{task}_{stat}_c{c}'), 2 if stat == 'rps' else 1):>12}"
                           for c in CONCURRENCY)
            lines.append(row)
    lines.append(f"text-to-image p50 at c=1 without guidance (guidance_scale 1): "
                 f"{_fmt(r.get('t2i_p50_ms_c1_no_cfg'))} ms")
    if "t2i_stages_ms_c1" in r:
        lines.append("text-to-image at c=1, mean ms per server stage: " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in r["t2i_stages_ms_c1"].items()))
    lines += [
        "",
        f"text-to-image throughput at c=8: batched {_fmt(r['t2i_rps_c8_batched'], 2)} req/s "
        f"(mean batch {_fmt(r['mean_batch_size_c8'], 2)}), unbatched "
        f"{_fmt(r['t2i_rps_c8_unbatched'], 2)} req/s -> ratio "
        f"{_fmt(r['batching_throughput_ratio_c8'], 2)}x",
        f"  engine busy {_fmt(100 * r['engine_busy_frac_c8'], 0)}% of the batched arm; the "
        f"engine alone: {_fmt(r['engine_t2i_ms_b1'])} ms for 1 job, "
        f"{_fmt(r['engine_t2i_ms_b8'])} ms for 8 -> {_fmt(r['engine_batch_ratio_b8'], 2)}x",
        "",
        f"{'retrieval (p50 ms)':28}{'hit':>12}{'miss':>12}",
    ]
    for backend, label in (("redis", "service, Redis"), ("lru", "service, in-process LRU")):
        if f"cache_{backend}_error" in r:
            lines.append(f"{label:28}  unavailable: {r[f'cache_{backend}_error'][:60]}")
            continue
        lines.append(f"{label:28}{_fmt(r.get(f'cache_{backend}_hit_p50_ms'), 2):>12}"
                     f"{_fmt(r.get(f'cache_{backend}_miss_p50_ms'), 2):>12}")
    lines.append(f"{'HTTP /v1/retrieve (LRU)':28}{_fmt(r.get('cache_hit_http_ms'), 2):>12}"
                 f"{_fmt(r.get('cache_miss_http_ms'), 2):>12}")
    if "speedup_vs_baseline_c1" in r:
        lines += ["", baseline_table(r)]
    lines += ["", *_target_lines(r)]
    return "\n".join(lines)


def _target_lines(r: dict[str, Any]) -> list[str]:
    lines = ["targets:"]
    for key, t in r["targets"].items():
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"  {key} = {_fmt(r.get(key), 2)} (target {t['target']}): {mark}")
    return lines


def main(json_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    result = run(progress=lambda msg: print(f"... {msg}", flush=True),  # noqa: T201
                 **kwargs)
    publish(result, format_table(result), json_path, print_json=False, sort_keys=True)
    if json_path is not None:
        print(f"wrote {json_path}")  # noqa: T201
    return result
