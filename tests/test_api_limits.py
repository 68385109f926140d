"""Load behaviour through real HTTP on the real engine: dynamic batching, overload (429,
never a hang), per-request timeout (504), cancellation on client disconnect, API keys;
and the batcher's anticipation (waiting for announced jobs only) on its own.

Batching is observed on the real engine through `/metrics` (the batch-size histogram).
The overload, timeout and disconnect tests wrap the real engine in `SlowEngine`
(tests/fakes.py), which sleeps a fixed time per batch: they need an engine call that
reliably outlasts a client's patience or a queue's capacity, whatever the CPU load.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.batching import DynamicBatcher
from tests.fakes import SlowEngine
from tests.live import live_app, real_models  # noqa: F401 - fixture

GEN = "/v1/images/generations"


def slow(models, delay_s: float):
    """An engine factory: the real engine behind `delay_s` of sleep per batch."""
    return lambda settings: SlowEngine(models.engine(), delay_s)


def post_many(url: str, n: int, *, retrieval: bool = False, timeout: float = 60.0):
    def one(i: int) -> httpx.Response:
        # retrieval_guidance 0: a relevant neighbour would otherwise be copied whatever the
        # seed, and these tests tell requests apart by their seeds' samples
        payload = {"prompt": f"a red square {i}", "seed": i,
                   "retrieval": {"enabled": retrieval}, "retrieval_guidance": 0}
        return httpx.post(f"{url}{GEN}", json=payload, timeout=timeout)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def batch_histogram(url: str) -> tuple[float, float, float]:
    """(batches, jobs, batches of one) of the generator queue, from /metrics."""
    text = httpx.get(f"{url}/metrics").text

    def value(pattern: str) -> float:
        m = re.search(pattern + r" (\S+)", text)
        return float(m.group(1)) if m else 0.0

    return (value(r'racm3_batch_size_count\{queue="generate"\}'),
            value(r'racm3_batch_size_sum\{queue="generate"\}'),
            value(r'racm3_batch_size_bucket\{le="1.0",queue="generate"\}'))


def recording_batcher(**kw) -> tuple[DynamicBatcher, list[list[str]]]:
    batches: list[list[str]] = []

    def run_batch(task, jobs):
        batches.append(list(jobs))
        return [j.upper() for j in jobs]

    return DynamicBatcher("test", run_batch, max_queue=16, **kw), batches


async def test_a_lone_job_runs_at_once_when_nothing_else_is_announced():
    batcher, batches = recording_batcher(max_batch_size=8, max_wait_ms=2000,
                                         max_expected_wait_ms=2000)
    await batcher.start()
    try:
        with batcher.expecting("t") as ticket:  # the gateway's request, being retrieved
            ticket.arrived()
            start = time.perf_counter()
            assert await batcher.submit("t", "a") == "A"
        assert time.perf_counter() - start < 0.5  # not the 2 s a blind wait would take
    finally:
        await batcher.stop()


async def test_a_batch_waits_for_announced_jobs_and_only_for_them():
    batcher, batches = recording_batcher(max_batch_size=8, max_wait_ms=0,
                                         max_expected_wait_ms=2000)
    await batcher.start()
    try:
        async def request(name: str, retrieval_s: float) -> str:
            with batcher.expecting("t") as ticket:
                await asyncio.sleep(retrieval_s)  # neighbours being retrieved
                ticket.arrived()
                return await batcher.submit("t", name)

        out = await asyncio.gather(request("a", 0.0), request("b", 0.15), request("c", 0.3))
        assert out == ["A", "B", "C"]
        assert batches == [["a", "b", "c"]]  # one batch, though b and c came 150/300 ms late
        start = time.perf_counter()
        await request("d", 0.0)
        assert time.perf_counter() - start < 0.5 and batches[-1] == ["d"]
    finally:
        await batcher.stop()


async def test_waiting_for_announced_jobs_is_capped():
    batcher, batches = recording_batcher(max_batch_size=8, max_wait_ms=0,
                                         max_expected_wait_ms=100)
    await batcher.start()
    try:
        with batcher.expecting("t"):  # announced, but never comes within the cap
            start = time.perf_counter()
            assert await batcher.submit("t", "a") == "A"
            waited = time.perf_counter() - start
        assert 0.09 <= waited < 1.0
    finally:
        await batcher.stop()


def test_concurrent_requests_are_batched(real_models):  # noqa: F811
    app = real_models.app(generator={"max_batch_size": 8})
    with live_app(app) as server:
        responses = post_many(server.url, 8, retrieval=True)
        assert [r.status_code for r in responses] == [200] * 8
        assert len({r.json()["data"][0]["b64_json"] for r in responses}) == 8  # own seeds
        batches, jobs, singles = batch_histogram(server.url)
        assert jobs == 8
        # The gateway announces each job while its neighbours are retrieved, and the batch
        # waits for the announced ones: 8 requests in a batch or two, not 8 of one.
        assert batches <= 3, (batches, singles)


def test_max_batch_size_one_disables_batching(real_models):  # noqa: F811
    app = real_models.app(generator={"max_batch_size": 1, "max_wait_ms": 50})
    with live_app(app) as server:
        assert all(r.status_code == 200 for r in post_many(server.url, 4))
        assert batch_histogram(server.url) == (4, 4, 4)


def test_overload_answers_429_with_retry_after_instead_of_hanging(real_models):  # noqa: F811
    app = real_models.app(
        generator={"max_batch_size": 1, "max_wait_ms": 0, "queue_size": 2},
        engine_factory=slow(real_models, 0.3),
    )
    with live_app(app) as server:
        start = time.monotonic()
        responses = post_many(server.url, 12)
        elapsed = time.monotonic() - start
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429}
        assert codes.count(429) >= 6, codes
        assert codes.count(200) >= 2, codes
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.headers["retry-after"].isdigit()
        assert busy.json()["error"]["type"] == "rate_limit_error"
        assert elapsed < 10, elapsed  # the rejected ones came back at once
        assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_request_timeout_gives_504(real_models):  # noqa: F811
    app = real_models.app(
        generator={"max_batch_size": 1, "max_wait_ms": 0, "request_timeout_s": 0.2},
        engine_factory=slow(real_models, 0.6),
    )
    with live_app(app) as server:
        r = httpx.post(f"{server.url}{GEN}", json={"prompt": "a red square"}, timeout=10)
        assert r.status_code == 504
        assert r.json()["error"]["type"] == "timeout_error"


def test_disconnected_client_job_is_dropped_before_running(real_models):  # noqa: F811
    engine = SlowEngine(real_models.engine(), 0.8)
    app = real_models.app(generator={"max_batch_size": 1, "max_wait_ms": 0},
                          engine_factory=lambda settings: engine)
    with live_app(app) as server:
        with ThreadPoolExecutor(2) as pool:
            # The first request occupies the engine for 0.8 s...
            busy = pool.submit(
                httpx.post, f"{server.url}{GEN}", json={"prompt": "first"}, timeout=30
            )
            time.sleep(0.2)
            # ...the second gives up while still queued.
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}{GEN}", json={"prompt": "second"}, timeout=0.3)
            assert busy.result().status_code == 200
        time.sleep(1.2)  # long enough for the dropped job to have run, had it not been dropped
        assert [n for task, n in engine.batches if task == "text_to_image"] == [1]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'racm3_jobs_cancelled_total{queue="generate",when="queued"} 1.0' in metrics


@pytest.fixture(scope="module")
def keyed_server(real_models):  # noqa: F811
    with live_app(real_models.app(gateway={"api_keys": ["secret-key", "other"]})) as server:
        yield server


@pytest.mark.parametrize("header,status", [
    (None, 401),
    ("Bearer wrong", 401),
    ("Basic c2VjcmV0", 401),
    ("Bearer secret-key", 200),
    ("Bearer other", 200),
])
def test_api_keys_protect_inference_routes(keyed_server, header, status):
    url = keyed_server.url
    headers = {"Authorization": header} if header else {}
    r = httpx.post(f"{url}/v1/retrieve", json={"text": "a"}, headers=headers, timeout=30)
    assert r.status_code == status
    if status == 401:
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no key
    assert httpx.get(f"{url}/metrics").status_code == 200
