"""`POST /admin/reload` switches memory versions under traffic with zero failed requests,
refuses a corrupt version while the old one keeps serving, and never serves neighbours
cached for another version."""

from __future__ import annotations

import threading
import time

import httpx

from app.serve import create_role_app
from app.settings import GatewaySettings, GeneratorSettings, RetrieverSettings
from tests.fakes import fake_factories, live_app


def test_reload_during_traffic_has_zero_failures(tmp_path):
    (tmp_path / "CURRENT").write_text("v1")
    factories = fake_factories()
    app = create_role_app(
        "embedded",
        gateway_settings=GatewaySettings(),
        retriever_settings=RetrieverSettings(memory_dir=tmp_path),
        generator_settings=GeneratorSettings(max_wait_ms=2),
        engine_factory=factories.engine,
        backend_factory=factories.backend,
    )
    failures: list[str] = []
    versions: set[str] = set()
    done = threading.Event()
    counts = [0]

    def traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            i = 0
            while not done.is_set():
                i += 1
                if i % 2:
                    r = client.post("/v1/retrieve", json={"text": f"a red square {i % 5}"})
                else:
                    r = client.post("/v1/images/generations", json={
                        "prompt": f"a blue circle {i % 5}", "return_neighbours": True})
                counts[0] += 1
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    versions.add(r.json()["memory_version"])

    with live_app(app) as server:
        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            for version in ("v2", "v3"):
                (tmp_path / "CURRENT").write_text(version)
                r = httpx.post(f"{server.url}/admin/reload", timeout=30)
                assert r.status_code == 200, r.text
                assert r.json()["memory_version"] == version and r.json()["changed"]
                time.sleep(0.3)
            (tmp_path / "CURRENT").write_text("corrupt")
            refused = httpx.post(f"{server.url}/admin/reload", timeout=30)
            time.sleep(0.3)
        finally:
            done.set()
            for t in threads:
                t.join()
        assert refused.status_code == 409
        assert "still serving v3" in refused.json()["error"]["message"]
        assert failures == []
        assert counts[0] > 40
        assert {"v1", "v2", "v3"} <= versions
        after = httpx.post(f"{server.url}/v1/retrieve", json={"text": "a red square 1"}).json()
        assert after["memory_version"] == "v3"
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "ready"
