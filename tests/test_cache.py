"""The neighbour cache against the real Redis on 127.0.0.1:6379, and the in-process LRU;
end to end on the real retriever (smoke bundle CLIP + memory)."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import replace

import httpx
import pytest
import redis

from app.cache import (
    LruNeighbourCache,
    RedisNeighbourCache,
    cache_key,
    decode_hits,
)
from app.metrics import Metrics
from app.retriever.service import RetrievalQuery
from tests.live import free_port, live_app, real_models  # noqa: F401 - fixture

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_sync():
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # the suite runs against a real Redis (.ci/run starts one)
    yield client
    client.close()


@pytest.fixture
def version():
    return f"test-{secrets.token_hex(4)}"


@pytest.fixture(autouse=True)
def _cleanup(redis_sync, version):
    yield
    for key in redis_sync.scan_iter(f"racm3:nb:{version}:*"):
        redis_sync.delete(key)


def counting(hits):
    calls = []

    async def compute():
        calls.append(1)
        await asyncio.sleep(0.05)
        return hits

    return compute, calls


def test_key_carries_version_query_hash_k_and_strategy():
    key = cache_key("v7", b"query", 2, "abc123")
    prefix, nb, version, digest, k, strategy = key.split(":")
    assert (prefix, nb, version, k, strategy) == ("racm3", "nb", "v7", "2", "abc123")
    assert len(digest) == 64
    assert cache_key("v8", b"query", 2, "abc123") != key


async def test_redis_miss_then_hit_with_ttl(redis_sync, version):
    metrics = Metrics()
    cache = RedisNeighbourCache(REDIS_URL, ttl_s=60, metrics=metrics)
    key = cache_key(version, b"a red square", 2, "s")
    compute, calls = counting([(3, 0.9), (8, 0.7)])
    first, cached1 = await cache.get_or_compute(key, compute)
    second, cached2 = await cache.get_or_compute(key, compute)
    await cache.close()
    assert (cached1, cached2) == (False, True)
    assert first == second == [(3, 0.9), (8, 0.7)]
    assert len(calls) == 1
    assert 0 < redis_sync.ttl(key) <= 60
    assert decode_hits(redis_sync.get(key)) == [(3, 0.9), (8, 0.7)]
    assert not redis_sync.exists(f"{key}:lock")  # the stampede lock was released
    assert metrics.cache_requests.labels("redis", "hit")._value.get() == 1
    assert metrics.cache_requests.labels("redis", "miss")._value.get() == 1


async def test_redis_set_is_nx_a_racing_writer_does_not_overwrite(redis_sync, version):
    cache = RedisNeighbourCache(REDIS_URL, ttl_s=60)
    key = cache_key(version, b"q", 1, "s")
    redis_sync.set(key, "[[1,0.5]]", ex=60)
    hits, cached = await cache.get_or_compute(key, counting([(2, 0.1)])[0])
    await cache.close()
    assert cached and hits == [(1, 0.5)]


async def test_stampede_lock_two_processes_compute_once(version):
    # Two cache objects with their own connections stand for two retriever replicas.
    a = RedisNeighbourCache(REDIS_URL, ttl_s=60, lock_wait_ms=2000)
    b = RedisNeighbourCache(REDIS_URL, ttl_s=60, lock_wait_ms=2000)
    key = cache_key(version, b"popular query", 2, "s")
    compute, calls = counting([(5, 0.5)])
    results = await asyncio.gather(*(c.get_or_compute(key, compute) for c in (a, b, a, b)))
    await a.close()
    await b.close()
    assert len(calls) == 1
    assert all(hits == [(5, 0.5)] for hits, _ in results)
    assert sum(cached for _, cached in results) == 3


async def test_dead_redis_falls_back_without_adding_latency(version):
    metrics = Metrics()
    cache = RedisNeighbourCache(
        f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, retry_s=30, metrics=metrics
    )
    key = cache_key(version, b"q", 2, "s")
    hits, cached = await cache.get_or_compute(key, counting([(1, 0.2)])[0])
    assert hits == [(1, 0.2)] and not cached
    assert cache.status().startswith("degraded")
    start = time.perf_counter()
    for _ in range(20):
        await cache.get_or_compute(key, counting([(1, 0.2)])[0])
    per_call = (time.perf_counter() - start) / 20
    await cache.close()
    assert per_call < 0.07  # the compute's own 50 ms, no Redis timeout on top
    assert metrics.cache_requests.labels("redis", "skipped")._value.get() == 20
    assert metrics.cache_requests.labels("redis", "error")._value.get() >= 1


async def test_lru_hit_miss_eviction_and_ttl():
    cache = LruNeighbourCache(capacity=2, ttl_s=0.2)
    for name in ("a", "b", "c"):
        assert (await cache.get_or_compute(name, counting([(1, 1.0)])[0]))[1] is False
    assert cache.get("a") is None  # evicted: least recently used
    assert (await cache.get_or_compute("c", counting([(1, 1.0)])[0]))[1] is True
    await asyncio.sleep(0.25)
    assert cache.get("c") is None  # expired


async def test_identical_concurrent_misses_share_one_computation():
    cache = LruNeighbourCache(capacity=10, ttl_s=60)
    compute, calls = counting([(4, 0.4)])
    results = await asyncio.gather(*(cache.get_or_compute("k", compute) for _ in range(5)))
    assert len(calls) == 1
    assert all(hits == [(4, 0.4)] for hits, _ in results)


def metric(text: str, pattern: str) -> float:
    m = re.search(pattern + r" (\S+)", text)
    return float(m.group(1)) if m else 0.0


def test_retriever_service_hits_redis_and_skips_the_encoder(
    redis_sync, real_models, version  # noqa: F811
):
    memory_version = real_models.memory().version
    app = real_models.app(retriever={"redis_url": REDIS_URL})
    # A query no earlier run can have cached (entries live for an hour).
    query = {"text": f"a green triangle {version}", "k": 3}
    encoded = r'racm3_stage_latency_seconds_count\{stage="compute_query"\}'
    with live_app(app) as server:
        before = metric(httpx.get(f"{server.url}/metrics").text, encoded)
        first = httpx.post(f"{server.url}/v1/retrieve", json=query, timeout=30).json()
        second = httpx.post(f"{server.url}/v1/retrieve", json=query, timeout=30).json()
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric(metrics, encoded) - before == 1  # the hit needed no CLIP pass
        assert first == second and len(first["data"]) >= 1
        service = app.state.components.retriever
        strategy = replace(service.strategies["rag"], mode=service.default_mode)
        key = cache_key(memory_version, RetrievalQuery(text=query["text"]).canonical(), 3,
                        strategy.cache_hash(), memory="default")
        stored = decode_hits(redis_sync.get(key))  # cached under the memory version
        assert [i for i, _ in stored] == [d["id"] for d in first["data"]]
        assert 0 < redis_sync.ttl(key) <= 3600
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "ready" and ready["checks"]["retriever.cache"] == "ok"
        assert 'racm3_cache_requests_total{backend="redis",result="hit"} 1.0' in metrics
        redis_sync.delete(key)
