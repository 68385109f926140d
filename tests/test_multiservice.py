"""Multi-service mode end to end: retriever, generator and gateway as three `racm3 serve
--role ...` processes on the smoke bundle, configured only through RACM3_* environment
variables, talking HTTP. The gateway also lists a generator URL where nothing listens,
which its balancer must skip."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.images import png_b64
from retrieval import publish as pub
from tests.live import (  # noqa: F401 - fixture
    append_documents,
    free_port,
    png_bytes,
    real_models,
    solid_image,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent


def spawn(role: str, port: int, log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "racm3.cli", "serve", "--role", role, "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RACM3_LOG_LEVEL": "warning", **env},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),  # a file, not a pipe: a full pipe would block the server
    )


@pytest.fixture(scope="module")
def cluster(real_models, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("cluster")
    memory = real_models.copy_memory(tmp / "memory")
    v1 = pub.current_version(memory)
    v2 = append_documents(real_models, memory, ["the flag of Quorvia"], ["yellow"], tmp / "docs")
    pub.set_current(memory, v1)  # v2 is published but not yet served
    ports = {role: free_port() for role in ("retriever", "generator", "gateway")}
    urls = {role: f"http://127.0.0.1:{p}" for role, p in ports.items()}
    dead_worker = f"http://127.0.0.1:{free_port()}"  # nothing listens: must be skipped
    logs = {role: tmp / f"{role}.log" for role in ports}
    models = {"RACM3_BUNDLE_DIR": str(real_models.bundle_dir), "RACM3_MEMORY_DIR": str(memory)}
    procs = {
        "retriever": spawn("retriever", ports["retriever"], logs["retriever"], models),
        "generator": spawn("generator", ports["generator"], logs["generator"], {
            **models, "RACM3_MAX_BATCH_SIZE": "4", "RACM3_MAX_WAIT_MS": "30",
            "RACM3_QUEUE_SIZE": "6",
        }),
        "gateway": spawn("gateway", ports["gateway"], logs["gateway"], {
            "RACM3_RETRIEVER_URL": urls["retriever"],
            "RACM3_GENERATOR_URLS": f"{dead_worker},{urls['generator']}",
        }),
    }
    try:
        for role in ("retriever", "generator", "gateway"):
            try:
                wait_ready(urls[role], timeout_s=240)
            except (TimeoutError, RuntimeError):
                procs[role].kill()
                raise RuntimeError(logs[role].read_text()[-3000:]) from None
        yield {"urls": urls, "procs": procs, "memory": memory, "versions": (v1, v2)}
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
    with httpx.Client(base_url=cluster["urls"]["gateway"], timeout=60) as client:
        yield client


def test_gateway_readiness_reports_both_dependencies(gateway):
    ready = gateway.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["checks"]["retriever.memory"] == "ready"
    assert ready["checks"]["generator.generator[1]"] == "ready"
    assert ready["checks"]["generator.generator[0]"].startswith("not_ready")  # the dead one


def test_every_endpoint_across_processes(cluster, gateway):
    v1 = cluster["versions"][0]
    blue = png_b64(solid_image("blue"))
    body = {"prompt": "a red square", "n": 2, "seed": 5, "return_neighbours": True}
    gen = gateway.post("/v1/images/generations", json=body)
    assert gen.status_code == 200, gen.text
    assert gen.json()["seed"] == 5 and len(gen.json()["data"]) == 2
    assert gen.json()["memory_version"] == v1
    assert gen.json()["neighbours"][0]["caption"] and gen.json()["neighbours"][0]["thumbnail"]
    # the neighbours' tokens crossed two HTTP hops: same seed, same image
    again = gateway.post("/v1/images/generations", json=body).json()
    assert again["data"][0]["b64_json"] == gen.json()["data"][0]["b64_json"]

    cap = gateway.post("/v1/images/captions", json={"image": blue, "n": 2, "num_candidates": 3})
    assert cap.status_code == 200, cap.text
    assert len(cap.json()["data"]) == 2

    inf = gateway.post("/v1/images/infill", json={"image": blue, "box": [0, 0, 8, 8]})
    assert inf.status_code == 200, inf.text

    cls = gateway.post("/v1/images/classify", json={"image": blue, "labels": ["red", "blue"]})
    assert cls.status_code == 200 and cls.json()["label"] in ("red", "blue")

    ret = gateway.post("/v1/retrieve", json={"text": "a green circle", "k": 2}).json()
    assert ret["memory_version"] == v1 and ret["data"][0]["caption"]

    knn = gateway.post("/knn-service", json={"text": "yellow", "num_images": 3,
                                              "deduplicate": False})
    assert len(knn.json()) == 3 and knn.json()[0]["image"]

    rgba = np.full((32, 32, 4), 255, dtype=np.uint8)
    rgba[:8, :, 3] = 0
    edit = gateway.post(
        "/v1/images/edits", files={"image": ("a.png", png_bytes(rgba, "RGBA"), "image/png")},
        data={"prompt": "a green circle"},
    )
    assert edit.status_code == 200, edit.text

    info = gateway.get("/v1/info").json()
    assert info["role"] == "gateway"
    assert info["generator"]["image_size"] == [32, 32]
    assert info["memory"]["version"] == v1


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
    # 8 candidates per job make each batch of 4 a 32-row decode, so 24 requests at once
    # outrun a queue of 6.
    def one(i: int) -> httpx.Response:
        return gateway.post("/v1/images/generations", json={
            "prompt": f"x {i}", "num_candidates": 8, "retrieval": {"enabled": False}})

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(one, range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert 429 in codes and 200 in codes
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["retry-after"].isdigit()


def test_reload_through_the_retriever_role(cluster, gateway):
    v1, v2 = cluster["versions"]
    pub.set_current(cluster["memory"], v2)
    r = httpx.post(f"{cluster['urls']['retriever']}/admin/reload", timeout=60)
    assert r.status_code == 200 and r.json()["memory_version"] == v2
    assert r.json()["previous_version"] == v1 and r.json()["documents"] == 801
    ret = gateway.post("/v1/retrieve", json={"text": "the flag of Quorvia", "k": 2}).json()
    assert ret["memory_version"] == v2
    # hybrid by default, across the wire: the appended name comes first, marked as a match
    assert ret["data"][0]["caption"] == "the flag of Quorvia" and ret["data"][0]["name_match"]


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
