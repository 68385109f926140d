"""Load behaviour through real HTTP: dynamic batching, overload (429, never a hang),
per-request timeout (504), cancellation on client disconnect, and API keys.

The engine sleeps a fixed time per batch (like a forward pass), so batching and queueing
are observable; see tests/fakes.py.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.serve import create_role_app
from app.settings import GatewaySettings, GeneratorSettings, RetrieverSettings
from tests.fakes import fake_factories, live_app

GEN = "/v1/images/generations"


def embedded(tmp_path, *, delay_s: float, api_keys: list[str] | None = None, **generator):
    factories = fake_factories(batch_delay_s=delay_s)
    return create_role_app(
        "embedded",
        gateway_settings=GatewaySettings(api_keys=api_keys or [], request_timeout_s=20),
        retriever_settings=RetrieverSettings(memory_dir=tmp_path),
        generator_settings=GeneratorSettings(**generator),
        engine_factory=factories.engine,
        backend_factory=factories.backend,
    )


def engine_of(app):
    return app.state.components.generator.engine


def post_many(url: str, n: int, body: dict | None = None, timeout: float = 30.0):
    def one(i: int) -> httpx.Response:
        payload = body or {"prompt": f"a red square {i}", "retrieval": {"enabled": False}}
        return httpx.post(f"{url}{GEN}", json=payload, timeout=timeout)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_requests_are_batched(tmp_path):
    app = embedded(tmp_path, delay_s=0.2, max_batch_size=8, max_wait_ms=100)
    with live_app(app) as server:
        engine = engine_of(app)
        engine.batches.clear()
        responses = post_many(server.url, 8)
        assert all(r.status_code == 200 for r in responses)
        sizes = [n for task, n in engine.batches if task == "text_to_image"]
        assert sum(sizes) == 8
        assert max(sizes) >= 4, sizes  # 8 requests in ~2 batches, not 8 batches of one
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'racm3_batch_size_bucket{le="4.0",queue="generate"}' in metrics


def test_max_batch_size_one_disables_batching(tmp_path):
    app = embedded(tmp_path, delay_s=0.02, max_batch_size=1, max_wait_ms=50)
    with live_app(app) as server:
        engine = engine_of(app)
        engine.batches.clear()
        assert all(r.status_code == 200 for r in post_many(server.url, 4))
        assert [n for _, n in engine.batches] == [1, 1, 1, 1]


def test_overload_answers_429_with_retry_after_instead_of_hanging(tmp_path):
    app = embedded(tmp_path, delay_s=0.3, max_batch_size=1, max_wait_ms=0, queue_size=2)
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
        assert elapsed < 5, elapsed  # the rejected ones came back at once
        assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_request_timeout_gives_504(tmp_path):
    app = embedded(tmp_path, delay_s=0.6, max_batch_size=1, max_wait_ms=0,
                   request_timeout_s=0.2)
    with live_app(app) as server:
        r = httpx.post(f"{server.url}{GEN}", json={"prompt": "a red square"}, timeout=10)
        assert r.status_code == 504
        assert r.json()["error"]["type"] == "timeout_error"


def test_disconnected_client_job_is_dropped_before_running(tmp_path):
    app = embedded(tmp_path, delay_s=0.5, max_batch_size=1, max_wait_ms=0)
    with live_app(app) as server:
        engine = engine_of(app)
        engine.batches.clear()
        with ThreadPoolExecutor(2) as pool:
            # The first request occupies the engine for 0.5 s...
            busy = pool.submit(
                httpx.post, f"{server.url}{GEN}", json={"prompt": "first"}, timeout=10
            )
            time.sleep(0.1)
            # ...the second gives up while still queued.
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}{GEN}", json={"prompt": "second"}, timeout=0.2)
            assert busy.result().status_code == 200
        time.sleep(0.8)  # long enough for the dropped job to have run, had it not been dropped
        assert [n for task, n in engine.batches if task == "text_to_image"] == [1]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'racm3_jobs_cancelled_total{queue="generate"} 1.0' in metrics


@pytest.mark.parametrize("header,status", [
    (None, 401),
    ("Bearer wrong", 401),
    ("Basic c2VjcmV0", 401),
    ("Bearer secret-key", 200),
])
def test_api_keys_protect_inference_routes(tmp_path, header, status):
    app = embedded(tmp_path, delay_s=0.0, api_keys=["secret-key", "other"])
    with live_app(app) as server:
        headers = {"Authorization": header} if header else {}
        r = httpx.post(f"{server.url}/v1/retrieve", json={"text": "a"}, headers=headers)
        assert r.status_code == status
        if status == 401:
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # probes need no key
        assert httpx.get(f"{server.url}/metrics").status_code == 200
