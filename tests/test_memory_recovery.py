"""A damaged CURRENT at start-up: the service starts on the newest valid memory version,
says so in the log, in /readyz and in /v1/info, and takes `POST /admin/reload` once
CURRENT is fixed. Real HTTP (uvicorn), the real smoke memory and the real index builder;
the damage is done to the files on disk."""

from __future__ import annotations

import logging
import shutil
import time

import httpx
import pytest

from app.serve import create_role_app
from retrieval import publish as pub
from tests.live import (  # noqa: F401 - fixture
    LiveServer,
    append_documents,
    live_app,
    real_models,
)
from tests.test_api_reload import corrupt_middle_byte


@pytest.fixture(scope="module")
def two_versions(real_models, tmp_path_factory):  # noqa: F811
    """v000001 (the smoke memory) and v000002 (one document appended); CURRENT -> v2."""
    root = tmp_path_factory.mktemp("recovery")
    memory = real_models.copy_memory(root / "memory")
    v1 = pub.current_version(memory)
    v2 = append_documents(real_models, memory, ["the flag of Quorvia"], ["yellow"], root / "d")
    return memory, v1, v2


@pytest.fixture
def memory(two_versions, tmp_path):
    src, v1, v2 = two_versions
    dest = tmp_path / "memory"
    shutil.copytree(src, dest)
    return dest, v1, v2


def status(url: str) -> tuple[dict, dict]:
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    info = httpx.get(f"{url}/v1/info", timeout=10).json()["memory"]
    return ready, info


def wait_for_start(url: str, timeout_s: float = 120.0) -> httpx.Response:
    """/readyz once the start-up has finished, however it ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = httpx.get(f"{url}/readyz", timeout=10)
        if ready.json()["checks"].get("memory") != "loading":
            return ready
        time.sleep(0.1)
    raise TimeoutError(f"{url} still loading after {timeout_s} s")


def retrieve(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/retrieve", json={"text": "a red square", "k": 1}, timeout=60)


def test_unreadable_current_starts_on_the_newest_valid_version_until_fixed(
        real_models, memory, caplog):  # noqa: F811
    root, v1, v2 = memory
    (root / "CURRENT").write_bytes(b"v0\x00\xff garbage")
    caplog.set_level(logging.WARNING, logger="retrieval.memory")

    with live_app(real_models.app(memory_dir=root)) as server:
        ready, info = status(server.url)
        assert ready["status"] == "degraded", ready
        check = ready["checks"]["retriever.memory"]
        assert check.startswith("degraded:") and "CURRENT" in check and f"serving {v2}" in check
        assert info["version"] == v2 and f"serving {v2}" in info["warning"]
        assert str(root) not in check + info["warning"]  # versions, not paths, for clients
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("CURRENT" in m and f"serving {v2}" in m for m in logged), logged
        r = retrieve(server.url)
        assert r.status_code == 200 and r.json()["memory_version"] == v2

        pub.set_current(root, v1)  # the operator repairs CURRENT
        reloaded = httpx.post(f"{server.url}/admin/reload", timeout=60)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["memory_version"] == v1 and reloaded.json()["changed"]
        ready, info = status(server.url)
        assert ready["status"] == "ready" and ready["checks"]["retriever.memory"] == "ready"
        assert info["version"] == v1 and "warning" not in info
        assert retrieve(server.url).json()["memory_version"] == v1


def test_a_damaged_current_version_is_skipped_and_a_refused_reload_stays_degraded(
        real_models, memory):  # noqa: F811
    root, v1, v2 = memory
    corrupt_middle_byte(pub.version_dir(root, v2) / "store.arrow")  # CURRENT still names v2

    with live_app(real_models.app(memory_dir=root)) as server:
        ready, info = status(server.url)
        assert ready["status"] == "degraded"
        assert f"refusing memory {v2}" in ready["checks"]["retriever.memory"]
        assert info["version"] == v1 and f"serving {v1}" in info["warning"]

        refused = httpx.post(f"{server.url}/admin/reload", timeout=60)  # CURRENT unchanged
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "reload_refused"
        assert f"still serving {v1}" in refused.json()["error"]["message"]
        assert status(server.url)[0]["status"] == "degraded"

        pub.set_current(root, v1)  # point CURRENT at what is served: nothing to load
        same = httpx.post(f"{server.url}/admin/reload", timeout=60)
        assert same.status_code == 200 and not same.json()["changed"]
        assert status(server.url)[0]["status"] == "ready"


def test_a_reload_refused_at_run_time_is_not_reported_as_ready(real_models, memory):  # noqa: F811
    root, v1, v2 = memory
    pub.set_current(root, v1)
    with live_app(real_models.app(memory_dir=root)) as server:
        assert status(server.url)[0]["status"] == "ready"
        corrupt_middle_byte(pub.version_dir(root, v2) / "store.arrow")
        pub.set_current(root, v2)
        assert httpx.post(f"{server.url}/admin/reload", timeout=60).status_code == 409
        ready, info = status(server.url)
        assert ready["status"] == "degraded" and v2 in ready["checks"]["retriever.memory"]
        assert info["version"] == v1 and f"still serving {v1}" in info["warning"]
        assert retrieve(server.url).json()["memory_version"] == v1


def test_with_no_valid_version_a_reload_after_the_repair_starts_serving(
        real_models, memory):  # noqa: F811
    root, v1, v2 = memory
    store = pub.version_dir(root, v1) / "store.arrow"
    intact = store.read_bytes()
    corrupt_middle_byte(store)
    shutil.rmtree(pub.version_dir(root, v2))
    (root / "CURRENT").write_text("garbage\n")

    app = create_role_app(
        "retriever", retriever_settings=real_models.retriever_settings(root),
        backend_factory=real_models.backend)
    with LiveServer(app) as server:  # not live_app: it waits for a ready that never comes
        url = server.url
        ready = wait_for_start(url)
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        assert ready.json()["checks"]["memory"].startswith("failed")

        refused = httpx.post(f"{url}/admin/reload", timeout=60)  # nothing repaired yet
        assert refused.status_code == 409, refused.text
        assert "nothing is served" in refused.json()["error"]["message"]

        store.write_bytes(intact)
        pub.set_current(root, v1)
        reloaded = httpx.post(f"{url}/admin/reload", timeout=60)
        assert reloaded.status_code == 200, reloaded.text
        body = reloaded.json()
        assert body["memory_version"] == v1 and body["previous_version"] is None
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        search = httpx.post(f"{url}/internal/search", timeout=60,
                            json={"queries": [{"text": "a red square"}], "k": 1})
        assert search.status_code == 200 and search.json()["memory_version"] == v1
