"""Redis dies mid-run and comes back: zero failed requests, /readyz says degraded (still
200) meanwhile, and caching resumes. Uses its own redis-server on a free port, and the
real retriever (smoke bundle CLIP + memory) behind the real embedded server."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time

import httpx
import pytest
import redis

from tests.live import free_port, live_app, real_models  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
         "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def cache_hits(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(r'racm3_cache_requests_total\{backend="redis",result="hit"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_redis_killed_and_restarted_mid_run(real_models):  # noqa: F811
    port = free_port()
    proc = start_redis(port)
    app = real_models.app(
        retriever={
            "redis_url": f"redis://127.0.0.1:{port}/0", "redis_retry_s": 0.2,
            "redis_timeout_s": 0.25,  # generous: CI shares two cores with the whole suite
        },
        generator={"max_wait_ms": 2},
    )
    failures: list[str] = []
    sent = [0]
    done = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            i = 0
            while not done.is_set():
                i += 1
                r = client.post("/v1/retrieve", json={"text": f"a red circle {i % 4}", "k": 2})
                sent[0] += 1
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                time.sleep(0.005)

    try:
        with live_app(app) as server:
            threads = [threading.Thread(target=traffic) for _ in range(3)]
            for t in threads:
                t.start()
            try:
                wait_until(lambda: cache_hits(server.url) > 0, 20, "no cache hits before kill")

                proc.kill()
                proc.wait()
                sent_at_kill = sent[0]
                wait_until(lambda: sent[0] > sent_at_kill + 20, 20, "traffic stalled")
                down = httpx.get(f"{server.url}/readyz")
                assert down.status_code == 200
                assert down.json()["status"] == "degraded"
                assert down.json()["checks"]["retriever.cache"].startswith("degraded")

                proc = start_redis(port)
                hits_at_restart = cache_hits(server.url)
                wait_until(
                    lambda: cache_hits(server.url) > hits_at_restart, 20, "caching did not resume"
                )
            finally:
                done.set()
                for t in threads:
                    t.join()
            assert failures == []
            assert sent[0] > 50
            assert redis.Redis(port=port).keys("racm3:nb:*"), "new entries in the new Redis"
            ready = httpx.get(f"{server.url}/readyz").json()
            assert ready["status"] == "ready", ready
    finally:
        proc.kill()
        proc.wait()
