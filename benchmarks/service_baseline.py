"""The decoding fast path against the plain path, over HTTP, in one run
(`racm3 bench service --baseline`).

Two embedded servers in this process: one with the plain path (`fast_decode=False`: every
row prefilled in one padded batch, a cached forward per step), one with the fast path
(shared prefill, prefix cache, static step, compiled where warm-up measured it faster).
They get the same requests (same prompts, same seeds), alternately in rounds so that
load from other processes hits both alike, and their images are compared: the fast path
must draw the same images.

Measured:
- text-to-image p50 latency and throughput at concurrency 1 and 8, old over new;
- the prefix cache's hit rate on a repeated-prompt workload (a few prompts again and
  again, as a popular query would), and on the distinct prompts;
- optionally a soak: the fast server under distinct prompts for a while, its RSS and
  prefix-cache bytes sampled, to show the cache stays within its bound.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.service import Run, embedded_server

T2I = "/v1/images/generations"


def rss_mb() -> float:
    """This process's resident set (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _post_all(url: str, bodies: list[dict], concurrency: int
                    ) -> tuple[Run, dict[int, list[str]]]:
    """Like `benchmarks.service.closed_loop`, and keep each answer's images by body index."""
    run, images = Run(), {}
    queue = iter(enumerate(bodies))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def worker() -> None:
            for i, body in queue:
                t0 = time.perf_counter()
                r = await client.post(T2I, json=body)
                elapsed = time.perf_counter() - t0
                if r.status_code == 200:
                    run.latencies_s.append(elapsed)
                    images[i] = [d["b64_json"] for d in r.json()["data"]]
                else:
                    run.errors[str(r.status_code)] = run.errors.get(str(r.status_code), 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - t0
    return run, images


def _cache_stats(app: Any) -> dict[str, Any]:
    stats = app.state.components.generator.engine.fast_decode_stats() or {}
    return dict(stats.get("prefix_cache") or {})


def _hit_rate(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    hits = after.get("hits", 0) - before.get("hits", 0)
    misses = after.get("misses", 0) - before.get("misses", 0)
    return hits / (hits + misses) if hits + misses else None


def compare(
    loop: asyncio.AbstractEventLoop,
    prompts: Iterator[str],
    *,
    requests: int = 24,
    repeated_prompts: int = 4,
    soak_s: float = 0.0,
    progress: Callable[[str], None] = print,
    fast_url_app: tuple[str, Any] | None = None,
) -> dict[str, Any]:
    """Old (plain) path against the new (fast) one; `fast_url_app` reuses a running server
    started with the fast path on instead of starting one."""
    out: dict[str, Any] = {}
    with embedded_server(fast_decode=False) as (old_url, old_app), (
            _reuse(fast_url_app) if fast_url_app else embedded_server(fast_decode=True)
    ) as (new_url, new_app):
        arms = {"baseline": (old_url, old_app), "fast": (new_url, new_app)}
        out["fast_decode"] = new_app.state.components.generator.engine_info.get("fast_decode")
        for url, _ in arms.values():  # warm-up: allocator, retriever caches of fixed docs
            loop.run_until_complete(_post_all(url, [{"prompt": "a red square", "seed": 1}], 1))
        same, compared = 0, 0
        for c in (1, 8):
            n = max(requests, 4 * c)
            progress(f"baseline vs fast path: text-to-image at concurrency {c} "
                     f"({n} requests per arm)")
            runs = {k: Run() for k in arms}
            before = _cache_stats(new_app)
            for round_ in range(2):
                bodies = [{"prompt": next(prompts), "seed": 1000 * c + 100 * round_ + i}
                          for i in range(n // 2)]
                answers = {}
                order = list(arms) if round_ == 0 else list(arms)[::-1]
                for arm in order:
                    run, answers[arm] = loop.run_until_complete(
                        _post_all(arms[arm][0], bodies, c))
                    runs[arm] = runs[arm].merge(run)
                for i, images in answers["baseline"].items():
                    if i in answers["fast"]:
                        compared += 1
                        same += images == answers["fast"][i]
            out[f"prefix_cache_hit_rate_distinct_c{c}"] = _hit_rate(before, _cache_stats(new_app))
            for arm, run in runs.items():
                out[f"{arm}_t2i_p50_ms_c{c}"] = run.percentile_ms(50)
                out[f"{arm}_t2i_p99_ms_c{c}"] = run.percentile_ms(99)
                out[f"{arm}_t2i_rps_c{c}"] = run.throughput
                if run.errors:
                    out[f"{arm}_t2i_errors_c{c}"] = run.errors
            out[f"p50_speedup_vs_baseline_c{c}"] = (out[f"baseline_t2i_p50_ms_c{c}"]
                                                    / out[f"fast_t2i_p50_ms_c{c}"])
            out[f"rps_speedup_vs_baseline_c{c}"] = (out[f"fast_t2i_rps_c{c}"]
                                                    / out[f"baseline_t2i_rps_c{c}"])
        # the headline keys (TARGETS): latency at c=1, throughput at c=8
        out["speedup_vs_baseline_c1"] = out["p50_speedup_vs_baseline_c1"]
        out["speedup_vs_baseline_c8"] = out["rps_speedup_vs_baseline_c8"]
        out["same_images_as_baseline"] = same / compared if compared else None

        progress(f"repeated prompts ({repeated_prompts} prompts, {requests} requests per arm)")
        popular = [next(prompts) for _ in range(repeated_prompts)]
        bodies = [{"prompt": popular[i % repeated_prompts], "seed": 5000 + i}
                  for i in range(requests)]
        before = _cache_stats(new_app)
        for arm in ("baseline", "fast"):
            run, _ = loop.run_until_complete(_post_all(arms[arm][0], bodies, 1))
            out[f"{arm}_t2i_p50_ms_repeated"] = run.percentile_ms(50)
        after = _cache_stats(new_app)
        out["prefix_cache_hit_rate"] = _hit_rate(before, after)
        out["p50_speedup_vs_baseline_repeated"] = (out["baseline_t2i_p50_ms_repeated"]
                                                   / out["fast_t2i_p50_ms_repeated"])
        out["prefix_cache"] = after
        if soak_s > 0:
            progress(f"soak: the fast server for {soak_s:.0f} s, distinct prompts at c=8")
            out["soak"] = soak(loop, new_url, new_app, prompts, soak_s)
    return out


class _reuse:
    def __init__(self, url_app: tuple[str, Any]) -> None:
        self.url_app = url_app

    def __enter__(self) -> tuple[str, Any]:
        return self.url_app

    def __exit__(self, *exc: Any) -> None:
        return None


def soak(loop: asyncio.AbstractEventLoop, url: str, app: Any, prompts: Iterator[str],
         seconds: float, sample_every: int = 16) -> dict[str, Any]:
    """Distinct prompts at c=8 until `seconds` pass; RSS and cache bytes every batch."""
    samples = []
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    seed = 90_000
    while time.monotonic() < deadline:
        bodies = [{"prompt": next(prompts), "seed": seed + i} for i in range(sample_every)]
        seed += sample_every
        loop.run_until_complete(_post_all(url, bodies, 8))
        stats = _cache_stats(app)
        samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_mb": round(rss_mb(), 1),
                        "cache_bytes": stats.get("bytes", 0),
                        "cache_entries": stats.get("entries", 0),
                        "evictions": stats.get("evictions", 0)})
    rss = [s["rss_mb"] for s in samples]
    half = rss[len(rss) // 2:]
    return {
        "seconds": round(time.monotonic() - t0, 1),
        "requests": seed - 90_000,
        "max_bytes": _cache_stats(app).get("max_bytes"),
        "max_cache_bytes": max(s["cache_bytes"] for s in samples),
        "rss_mb_first": rss[0],
        "rss_mb_last": rss[-1],
        "rss_mb_max": max(rss),
        "rss_mb_second_half_spread": max(half) - min(half),
        "rss_mb_median": statistics.median(rss),
        "samples": samples,
    }


def format_table(r: dict[str, Any]) -> str:
    def f(v: Any, d: int = 1) -> str:
        return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

    fd = r.get("fast_decode") or {}
    lines = [
        f"fast path vs plain path (same run, same requests): compile={fd.get('compile')} "
        f"({fd.get('compiled_shapes')} shapes compiled), prefix cache "
        f"{(fd.get('prefix_cache_bytes') or 0) / 2**20:.0f} MiB",
        f"{'':30}{'plain':>10}{'fast':>10}{'old/new':>10}",
    ]
    for c in (1, 8):
        lines.append(f"{f'text-to-image p50 ms, c={c}':30}{f(r[f'baseline_t2i_p50_ms_c{c}']):>10}"
                     f"{f(r[f'fast_t2i_p50_ms_c{c}']):>10}"
                     f"{f(r[f'p50_speedup_vs_baseline_c{c}'], 2) + 'x':>10}")
        lines.append(f"{f'text-to-image req/s, c={c}':30}"
                     f"{f(r[f'baseline_t2i_rps_c{c}'], 2):>10}{f(r[f'fast_t2i_rps_c{c}'], 2):>10}"
                     f"{f(r[f'rps_speedup_vs_baseline_c{c}'], 2) + 'x':>10}")
    lines.append(f"{'repeated prompts p50 ms, c=1':30}{f(r['baseline_t2i_p50_ms_repeated']):>10}"
                 f"{f(r['fast_t2i_p50_ms_repeated']):>10}"
                 f"{f(r['p50_speedup_vs_baseline_repeated'], 2) + 'x':>10}")
    lines.append(
        f"prefix cache hit rate: repeated prompts {f(r['prefix_cache_hit_rate'], 2)}, "
        f"distinct prompts c=1 {f(r.get('prefix_cache_hit_rate_distinct_c1'), 2)}, "
        f"c=8 {f(r.get('prefix_cache_hit_rate_distinct_c8'), 2)}; same images as the plain "
        f"path: {f(r['same_images_as_baseline'], 3)}")
    if "soak" in r:
        s = r["soak"]
        lines.append(
            f"soak {s['seconds']:.0f} s, {s['requests']} requests: cache bytes max "
            f"{s['max_cache_bytes'] / 2**20:.1f} of {(s['max_bytes'] or 0) / 2**20:.1f} MiB; "
            f"RSS {s['rss_mb_first']:.0f} -> {s['rss_mb_last']:.0f} MiB (max "
            f"{s['rss_mb_max']:.0f}, second-half spread {s['rss_mb_second_half_spread']:.0f})")
    return "\n".join(lines)
