"""Two overload measurements against a running server (`python -m benchmarks.overload`):

- `abandon`: eight clients each ask for n=8 of `--candidates` candidates, and all leave
  once their batch runs; how long the next request then takes, against the same request
  on the idle server. A batch nobody wants should stop at once, not delay the next one.
- `admission`: `--concurrency` clients send text-to-image requests for `--seconds`; the
  latency of the 429s (and of the 200s), and how many retrievals were done (the memory's
  search counter). Start the server with a small queue (RACM3_QUEUE_SIZE=4): a refusal
  should come before any retrieval is done.

The server is started separately (`racm3 serve`), so the same script measures any
version of it. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import time
from typing import Any
from urllib.parse import urlparse

import httpx

GEN = "/v1/images/generations"


def _metric(url: str, pattern: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search("^" + pattern + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _jobs_taken(url: str) -> float:
    return _metric(url, r'racm3_batch_size_sum\{queue="generate"\}')


def _open(url: str, body: dict) -> socket.socket:
    where = urlparse(url)
    sock = socket.create_connection((where.hostname, where.port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {GEN} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _timed_post(url: str, body: dict) -> float:
    start = time.perf_counter()
    r = httpx.post(f"{url}{GEN}", json=body, timeout=300)
    r.raise_for_status()
    return time.perf_counter() - start


def abandon(url: str, rounds: int, candidates: int, run_s: float) -> dict[str, Any]:
    nxt = {"prompt": "a green circle", "seed": 1}
    _timed_post(url, nxt)  # warm
    idle = [_timed_post(url, {**nxt, "seed": i}) for i in range(rounds)]
    after = []
    for r in range(rounds):
        taken = _jobs_taken(url)
        socks = [_open(url, {"prompt": f"a blue circle {i}", "seed": 100 * r + i, "n": 8,
                             "num_candidates": candidates}) for i in range(8)]
        deadline = time.monotonic() + 60
        while _jobs_taken(url) < taken + 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(run_s)  # the batch runs a while
        for s in socks:
            s.close()
        after.append(_timed_post(url, {**nxt, "seed": 50 + r}))
        time.sleep(0.5)
    return {"idle_s": idle, "after_abandon_s": after,
            "idle_median_s": statistics.median(idle),
            "after_abandon_median_s": statistics.median(after),
            "cancelled": {w: _metric(url, r'racm3_jobs_cancelled_total\{queue="generate",'
                                          f'when="{w}"' + r'\}') for w in ("queued", "running")}}


def _searches(url: str) -> float:
    return _metric(url, r'racm3_memory_searches_total\{memory="default"\}')


async def _admission(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    results: list[tuple[int, float]] = []
    searches = _searches(url)
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker(w: int) -> None:
            i = 0
            while time.monotonic() < stop:
                body = {"prompt": f"a red square number {w} {i}", "seed": i}
                start = time.perf_counter()
                try:
                    r = await client.post(f"{url}{GEN}", json=body)
                except httpx.TransportError:  # e.g. a kept-alive connection closed under it
                    results.append((0, time.perf_counter() - start))
                    continue
                results.append((r.status_code, time.perf_counter() - start))
                if r.status_code == 429:
                    await asyncio.sleep(0.05)  # a client honouring a short backoff
                i += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    # every admitted request retrieves once; a refused one should not have
    out: dict[str, Any] = {"requests": len(results), "searches": _searches(url) - searches}
    for status in sorted({s for s, _ in results}):
        lat = sorted(t for s, t in results if s == status)
        out[str(status)] = {"count": len(lat), "p50_s": lat[len(lat) // 2],
                            "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["abandon", "admission"])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--run-s", type=float, default=0.5,
                        help="how long the abandoned batch runs before its clients leave")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    if args.scenario == "abandon":
        out = abandon(args.url, args.rounds, args.candidates, args.run_s)
    else:
        out = asyncio.run(_admission(args.url, args.concurrency, args.seconds))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
