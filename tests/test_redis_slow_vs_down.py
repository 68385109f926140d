"""A slow Redis is not a dead one. A timeout is a miss for that request; only several in
a row open the circuit breaker, while a refused connection opens it at once.

Each test runs its own redis-server on a free port: SIGSTOP makes it slow (the kernel
still accepts the connection, nothing answers), SIGCONT brings it back, SIGKILL makes it
dead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest

from app.cache import RedisNeighbourCache, cache_key
from app.metrics import Metrics
from tests.live import free_port, live_app, real_models  # noqa: F401 - fixture
from tests.test_redis_fault import cache_hits, start_redis

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

HITS = [(3, 0.9), (5, 0.7)]


@pytest.fixture
def redis_proc():
    proc = start_redis(free_port())
    yield proc
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait(timeout=10)


def port_of(proc: subprocess.Popen) -> int:
    return int(proc.args[proc.args.index("--port") + 1])


def results(metrics: Metrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in metrics.cache_requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["result"]] = sample.value
    return out


async def compute():
    return HITS


def make_cache(proc: subprocess.Popen, metrics: Metrics, **kw) -> RedisNeighbourCache:
    # retry_s is long so that a tripped breaker stays open for the whole test.
    kw = {"ttl_s": 60, "timeout_s": 0.05, "retry_s": 30.0, **kw}
    return RedisNeighbourCache(f"redis://127.0.0.1:{port_of(proc)}/0", metrics=metrics, **kw)


async def test_one_timeout_is_a_miss_and_the_cache_is_used_again_at_once(redis_proc):
    metrics = Metrics()
    cache = make_cache(redis_proc, metrics)
    key = cache_key("v1", b"a slow moment", 2, "s")
    try:
        os.kill(redis_proc.pid, signal.SIGSTOP)
        assert await cache.get_or_compute(key, compute) == (HITS, False)
        os.kill(redis_proc.pid, signal.SIGCONT)
        assert cache.status() == "ok"
        assert await cache.get_or_compute(key, compute) == (HITS, False)  # miss, then stored
        assert await cache.get_or_compute(key, compute) == (HITS, True)
    finally:
        await cache.close()
    counts = results(metrics)
    assert counts.get("timeout") == 1 and counts.get("hit") == 1
    assert not counts.get("error") and not counts.get("skipped")


async def test_timeouts_in_a_row_open_the_breaker(redis_proc):
    metrics = Metrics()
    cache = make_cache(redis_proc, metrics, timeouts_to_trip=3)
    try:
        os.kill(redis_proc.pid, signal.SIGSTOP)
        for i in range(2):
            await cache.get_or_compute(cache_key("v1", f"q{i}".encode(), 2, "s"), compute)
        assert cache.status() == "ok"
        await cache.get_or_compute(cache_key("v1", b"q2", 2, "s"), compute)
        assert cache.status().startswith("degraded")
        # Open: the next look-up does not wait for Redis at all.
        start = time.perf_counter()
        assert await cache.get_or_compute(cache_key("v1", b"q3", 2, "s"), compute) == (
            HITS, False)
        assert time.perf_counter() - start < 0.05
    finally:
        os.kill(redis_proc.pid, signal.SIGCONT)
        await cache.close()
    counts = results(metrics)
    assert counts.get("timeout") == 2 and counts.get("error") == 1
    assert counts.get("skipped") == 1


async def test_a_dead_redis_opens_the_breaker_at_once(redis_proc):
    metrics = Metrics()
    cache = make_cache(redis_proc, metrics, timeouts_to_trip=3)
    try:
        assert await cache.check() == "ok"
        redis_proc.kill()
        redis_proc.wait(timeout=10)
        await cache.get_or_compute(cache_key("v1", b"gone", 2, "s"), compute)
        assert cache.status().startswith("degraded")
    finally:
        await cache.close()
    assert results(metrics).get("error") == 1


def test_a_redis_pause_shorter_than_the_timeout_keeps_readiness_and_cache(
    real_models, redis_proc  # noqa: F811 - fixture
):
    """With the default settings, a 0.2 s stall of Redis (what a busy CPU looks like) is
    waited out: the request is served from the cache, and /readyz stays 'ready'."""
    app = real_models.app(
        retriever={"redis_url": f"redis://127.0.0.1:{port_of(redis_proc)}/0"},
        generator={"max_wait_ms": 1},
    )
    body = {"text": "a blue circle on the left", "k": 2}
    with live_app(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/v1/retrieve", json=body).status_code == 200  # stores
        hits_before = cache_hits(server.url)
        answer: list[httpx.Response] = []
        os.kill(redis_proc.pid, signal.SIGSTOP)
        request = threading.Thread(target=lambda: answer.append(
            client.post("/v1/retrieve", json=body)))
        request.start()
        time.sleep(0.2)
        os.kill(redis_proc.pid, signal.SIGCONT)
        request.join(timeout=30)
        assert answer and answer[0].status_code == 200
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready", ready
        assert cache_hits(server.url) == hits_before + 1
