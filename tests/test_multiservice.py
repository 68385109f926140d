"""Multi-service mode end to end: retriever, generator and gateway as three processes,
configured only through RACM3_* environment variables, talking HTTP.

The roles run `tests/fakes.py`'s entry point (the real `serve` with the temporary fake
engine and memory); switch it to `racm3 serve --role ...` with the smoke bundle once the
real components land.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.images import png_b64
from tests.fakes import free_port, solid_image, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def spawn(role: str, port: int, log: Path, env: dict[str, str], *extra: str
          ) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fakes", "--role", role, "--port", str(port), *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RACM3_LOG_LEVEL": "warning", **env},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),  # a file, not a pipe: a full pipe would block the server
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    memory = tmp_path_factory.mktemp("memory")
    (memory / "CURRENT").write_text("v1")
    ports = {role: free_port() for role in ("retriever", "generator", "gateway")}
    urls = {role: f"http://127.0.0.1:{p}" for role, p in ports.items()}
    dead_worker = f"http://127.0.0.1:{free_port()}"  # nothing listens: must be skipped
    logs = {role: memory.parent / f"{role}.log" for role in ports}
    procs = {
        "retriever": spawn(
            "retriever", ports["retriever"], logs["retriever"], {"RACM3_MEMORY_DIR": str(memory)}
        ),
        "generator": spawn(
            "generator", ports["generator"], logs["generator"],
            {"RACM3_MAX_BATCH_SIZE": "4", "RACM3_MAX_WAIT_MS": "30", "RACM3_QUEUE_SIZE": "6"},
            "--batch-delay-s", "0.1",
        ),
        "gateway": spawn("gateway", ports["gateway"], logs["gateway"], {
            "RACM3_RETRIEVER_URL": urls["retriever"],
            "RACM3_GENERATOR_URLS": f"{dead_worker},{urls['generator']}",
        }),
    }
    try:
        for role in ("retriever", "generator", "gateway"):
            try:
                wait_ready(urls[role], timeout_s=90)
            except TimeoutError:
                procs[role].kill()
                raise RuntimeError(logs[role].read_text()[-3000:]) from None
        yield {"urls": urls, "procs": procs, "memory": memory}
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def gateway(cluster):
    with httpx.Client(base_url=cluster["urls"]["gateway"], timeout=30) as client:
        yield client


def test_gateway_readiness_reports_both_dependencies(gateway):
    ready = gateway.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["checks"]["retriever.memory"] == "ready"
    assert "ready" in ready["checks"].values()


def test_every_endpoint_across_processes(gateway):
    blue = png_b64(solid_image("blue"))
    gen = gateway.post(
        "/v1/images/generations",
        json={"prompt": "a red square", "n": 2, "seed": 5, "return_neighbours": True},
    )
    assert gen.status_code == 200, gen.text
    assert gen.json()["seed"] == 5 and len(gen.json()["data"]) == 2
    assert "red" in gen.json()["neighbours"][0]["caption"]
    assert gen.json()["neighbours"][0]["thumbnail"]

    cap = gateway.post("/v1/images/captions", json={"image": blue}).json()
    assert cap["data"][0]["text"] == "a blue image"

    inf = gateway.post("/v1/images/infill", json={"image": blue, "box": [0, 0, 8, 8]})
    assert inf.status_code == 200

    cls = gateway.post("/v1/images/classify", json={"image": blue, "labels": ["red", "blue"]})
    assert cls.json()["label"] == "blue"

    ret = gateway.post("/v1/retrieve", json={"text": "a green circle", "k": 2}).json()
    assert ret["memory_version"] == "v1" and "green" in ret["data"][0]["caption"]

    knn = gateway.post("/knn-service", json={"text": "yellow", "num_images": 3,
                                              "deduplicate": False})
    assert len(knn.json()) == 3 and knn.json()[0]["image"]

    rgba = np.full((32, 32, 4), 255, dtype=np.uint8)
    rgba[:8, :, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    edit = gateway.post(
        "/v1/images/edits", files={"image": ("a.png", buf.getvalue(), "image/png")},
        data={"prompt": "green"},
    )
    assert edit.status_code == 200, edit.text

    info = gateway.get("/v1/info").json()
    assert info["role"] == "gateway"
    assert info["generator"]["image_size"] == [32, 32]
    assert info["memory"]["version"] == "v1"


def test_bad_input_is_rejected_at_the_gateway(gateway):
    r = gateway.post("/v1/images/captions", json={"image": "not base64!"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_base64"


def test_worker_batches_concurrent_requests(cluster, gateway):
    def one(i: int) -> int:
        return gateway.post("/v1/images/generations", json={"prompt": f"a red square {i}"}
                            ).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4))) == [200] * 4
    metrics = httpx.get(f"{cluster['urls']['generator']}/metrics").text
    sizes = {
        line.split('le="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('racm3_batch_size_bucket{le="1.0"') or line.startswith(
            'racm3_batch_size_bucket{le="+Inf"')
    }
    assert sizes["+Inf"] > sizes["1.0"], "some batch held more than one job"


def test_worker_overload_passes_through_as_429(gateway):
    def one(i: int) -> httpx.Response:
        return gateway.post("/v1/images/generations",
                            json={"prompt": f"x {i}", "retrieval": {"enabled": False}})

    with ThreadPoolExecutor(24) as pool:
        codes = [r.status_code for r in pool.map(one, range(24))]
    assert set(codes) <= {200, 429}, codes
    assert 429 in codes and 200 in codes


def test_reload_through_the_retriever_role(cluster, gateway):
    (cluster["memory"] / "CURRENT").write_text("v2")
    r = httpx.post(f"{cluster['urls']['retriever']}/admin/reload", timeout=30)
    assert r.status_code == 200 and r.json()["memory_version"] == "v2"
    ret = gateway.post("/v1/retrieve", json={"text": "a green circle", "k": 2}).json()
    assert ret["memory_version"] == "v2"


def test_generator_down_gives_503_and_not_ready(cluster, gateway):
    proc = cluster["procs"]["generator"]
    proc.terminate()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while gateway.get("/readyz").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = gateway.post("/v1/images/generations", json={"prompt": "a red square"})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"
    assert gateway.post("/v1/retrieve", json={"text": "a"}).status_code == 200
