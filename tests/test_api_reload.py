"""`POST /admin/reload` switches memory versions under traffic with zero failed requests,
refuses a corrupt version while the old one keeps serving, and serves the documents the
new version added. The versions are real: the smoke memory plus documents appended by
the real index builder, published atomically, one of them then damaged on disk."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np

from retrieval import publish as pub
from retrieval.memory import Memory
from tests.live import append_documents, live_app, real_models  # noqa: F401 - fixture


def corrupt_middle_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


def served_by_traffic(version: str, seen: set[str], timeout_s: float = 60.0) -> None:
    """Wait until the traffic threads have had an answer from `version` (a fixed sleep is
    too short on a loaded machine, where one generation can take longer)."""
    deadline = time.monotonic() + timeout_s
    while version not in seen and time.monotonic() < deadline:
        time.sleep(0.05)


def test_reload_during_traffic_has_zero_failures(real_models, tmp_path):  # noqa: F811
    memory_dir = real_models.copy_memory(tmp_path / "memory")
    v1 = pub.current_version(memory_dir)
    v2 = append_documents(real_models, memory_dir, ["the flag of Quorvia"], ["yellow"],
                          tmp_path / "docs2")
    v3 = append_documents(real_models, memory_dir, ["the flag of Zentara"], ["green"],
                          tmp_path / "docs3")
    v4 = append_documents(real_models, memory_dir, ["a damaged version"], ["red"],
                          tmp_path / "docs4")
    corrupt_middle_byte(pub.version_dir(memory_dir, v4) / "store.arrow")
    pub.set_current(memory_dir, v1)

    app = real_models.app(memory_dir=memory_dir, generator={"max_wait_ms": 2})
    failures: list[str] = []
    versions: set[str] = set()
    done = threading.Event()
    counts = [0]

    def traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
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
        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            served_by_traffic(v1, versions)
            for version in (v2, v3):
                pub.set_current(memory_dir, version)
                r = httpx.post(f"{server.url}/admin/reload", timeout=60)
                assert r.status_code == 200, r.text
                assert r.json()["memory_version"] == version and r.json()["changed"]
                served_by_traffic(version, versions)
            pub.set_current(memory_dir, v4)
            refused = httpx.post(f"{server.url}/admin/reload", timeout=60)
            time.sleep(0.5)
        finally:
            done.set()
            for t in threads:
                t.join()
        assert refused.status_code == 409, refused.text
        assert f"still serving {v3}" in refused.json()["error"]["message"]
        assert failures == []
        assert counts[0] > 10
        assert {v1, v2, v3} <= versions
        info = httpx.get(f"{server.url}/v1/info").json()["memory"]
        assert info["version"] == v3 and info["documents"] == 802 and info["parent"] == v2
        # The appended document is served: its own vector finds it.
        new_doc = Memory.load(memory_dir, v3)
        vector = np.asarray(new_doc.embeddings[801], dtype=np.float32).tolist()
        knn = httpx.post(f"{server.url}/knn-service",
                         json={"embedding_input": vector, "num_images": 1}).json()
        assert knn[0]["id"] == 801 and knn[0]["caption"] == "the flag of Zentara"
        # CURRENT still names the refused version: serving, but not plain "ready"
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "degraded" and v4 in ready["checks"]["retriever.memory"]
        pub.set_current(memory_dir, v3)
        assert httpx.post(f"{server.url}/admin/reload", timeout=60).status_code == 200
        assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
