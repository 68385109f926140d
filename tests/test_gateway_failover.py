"""The gateway picks generator workers by readiness, and moves a job on when a worker
answers 503.

Real HTTP throughout: a gateway role, a retriever role and generator roles, each a
uvicorn server on the smoke bundle's real engine and memory.
- A worker whose engine is still loading (its factory waits for the test's signal) is a
  real generator answering 503 to `/readyz` and to jobs: it must get no job, and get
  jobs once it has loaded.
- A worker that turns unready between two readiness probes cannot be timed with a real
  generator, whose readiness only ever goes from loading to ready. A small server stands
  in for it: `/readyz` says ready, every job is answered 503 `not_ready`, the way a
  loading generator answers. Jobs sent to it must go on to the ready worker.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from app.serve import create_role_app
from app.settings import GatewaySettings
from tests.live import LiveServer, real_models, wait_ready  # noqa: F401 - fixture

GEN = "/v1/images/generations"
JOB_ROUTE = "/internal/text_to_image"


def job_count(url: str) -> float:
    """How many jobs a generator worker was sent, from its own /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f'racm3_requests_total{{route="{JOB_ROUTE}"'):
            total += float(line.rsplit(" ", 1)[1])
    return total


class AlwaysUnavailableWorker:
    """Says ready on /readyz, answers every job 503 not_ready, counts the jobs."""

    def __init__(self) -> None:
        self.jobs = 0
        app = FastAPI()

        @app.get("/readyz")
        async def readyz() -> dict:
            return {"status": "ready", "checks": {"generator": "ready"}}

        @app.post(JOB_ROUTE)
        async def job() -> JSONResponse:
            self.jobs += 1
            body = {"error": {"message": "generator is not ready (loading)",
                              "type": "service_unavailable", "param": None, "code": "not_ready"}}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

        self.server = LiveServer(app)


@pytest.fixture(scope="module")
def backends(real_models):  # noqa: F811 - fixture
    release = threading.Event()

    def slow_engine(settings):
        release.wait(120)
        return real_models.engine(settings)

    retriever = LiveServer(create_role_app(
        "retriever", retriever_settings=real_models.retriever_settings(),
        backend_factory=real_models.backend,
    ))
    ready = LiveServer(create_role_app(
        "generator", generator_settings=real_models.generator_settings(max_wait_ms=1),
        engine_factory=real_models.engine,
    ))
    loading = LiveServer(create_role_app(
        "generator", generator_settings=real_models.generator_settings(max_wait_ms=1),
        engine_factory=slow_engine,
    ))
    flaky = AlwaysUnavailableWorker()
    servers = [retriever, ready, loading, flaky.server]
    try:
        for s in servers:
            s.__enter__()
        wait_ready(retriever.url)
        wait_ready(ready.url)
        yield {"retriever": retriever, "ready": ready, "loading": loading, "flaky": flaky,
               "release": release}
    finally:
        release.set()
        for s in reversed(servers):
            s.__exit__(None, None, None)


def gateway(backends, *workers: str) -> LiveServer:
    settings = GatewaySettings(
        retriever_url=backends["retriever"].url, generator_urls=list(workers)
    )
    return LiveServer(create_role_app("gateway", gateway_settings=settings))


def generate(url: str, count: int, concurrency: int = 4) -> list[httpx.Response]:
    def one(i: int) -> httpx.Response:
        body = {"prompt": f"a red square {i}", "seed": i, "retrieval": {"k": 1}}
        return httpx.post(f"{url}{GEN}", json=body, timeout=60)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(count)))


def test_a_loading_worker_gets_no_jobs_until_it_is_ready(backends):
    loading, ready = backends["loading"], backends["ready"]
    assert httpx.get(f"{loading.url}/readyz", timeout=5).status_code == 503
    # The loading worker is listed first: a balancer blind to readiness sends it half.
    with gateway(backends, loading.url, ready.url) as gw:
        wait_ready(gw.url)
        answers = generate(gw.url, 8)
        assert [r.status_code for r in answers] == [200] * 8, [r.text[:200] for r in answers]
        assert job_count(loading.url) == 0

        backends["release"].set()
        wait_ready(loading.url)
        deadline = time.monotonic() + 30
        while job_count(loading.url) == 0:
            assert time.monotonic() < deadline, "the worker got no job after it became ready"
            assert all(r.status_code == 200 for r in generate(gw.url, 4))


def test_a_503_moves_the_job_on_to_a_ready_worker(backends):
    flaky, ready = backends["flaky"], backends["ready"]
    with gateway(backends, flaky.server.url, ready.url) as gw:
        wait_ready(gw.url)
        answers = generate(gw.url, 8)
    assert [r.status_code for r in answers] == [200] * 8, [r.text[:200] for r in answers]
    assert flaky.jobs >= 1, "the 503 worker was never tried: this test tested nothing"
