"""`POST /admin/documents`, the Studio's "add documents": the real index builder appends
the uploads as a new memory version, publishes it atomically and the running service
serves it. Real HTTP servers on the smoke bundle, each with a private copy of the memory."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from app.serve import create_role_app
from app.settings import GatewaySettings
from retrieval import publish as pub
from retrieval.manifest import read_manifest
from tests.live import (  # noqa: F401 - fixture
    LiveServer,
    free_port,
    live_app,
    png_bytes,
    real_models,
    solid_image,
)

KEY = "admin-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(real_models, tmp_path_factory):  # noqa: F811 - fixture
    memory_dir = real_models.copy_memory(tmp_path_factory.mktemp("docs") / "memory")
    app = real_models.app(memory_dir=memory_dir, gateway={"api_keys": [KEY]},
                          generator={"max_wait_ms": 2})
    with live_app(app) as live:
        yield live, memory_dir


def striped(colours: list[tuple[int, int, int]]) -> np.ndarray:
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        img[:, i * 32 // len(colours):(i + 1) * 32 // len(colours)] = colour
    return img


def post_documents(url: str, docs: list[tuple[str, bytes]], captions: list[str] | None = None,
                   headers: dict | None = None) -> httpx.Response:
    files = [("image", (name, data, "image/png")) for name, data in docs]
    data = {"caption": captions if captions is not None else [n.split(".")[0] for n, _ in docs]}
    return httpx.post(f"{url}/admin/documents", files=files, data=data,
                      headers=AUTH if headers is None else headers, timeout=120)


def memory_state(memory_dir) -> tuple[str | None, list[str]]:
    return pub.current_version(memory_dir), pub.list_versions(memory_dir)


def test_added_documents_are_published_and_served(served):
    live, memory_dir = served
    before = httpx.get(f"{live.url}/v1/info", headers=AUTH).json()["memory"]
    flags = [striped([(220, 30, 30), (250, 250, 250), (30, 60, 220)]),
             striped([(30, 180, 60), (10, 10, 10)])]
    r = post_documents(live.url, [("a.png", png_bytes(flags[0])), ("b.png", png_bytes(flags[1]))],
                       ["the flag of Merovia", "the flag of   Tessaly\n"])
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["previous_version"] == before["version"]
    assert out["memory_version"] == pub.current_version(memory_dir) != before["version"]
    assert out["added"] == 2 and out["documents"] == before["documents"] + 2
    assert out["ids"] == [before["documents"], before["documents"] + 1]
    manifest = read_manifest(pub.version_dir(memory_dir, out["memory_version"]))
    assert manifest.parent == before["version"] and manifest.counts["added"] == 2

    info = httpx.get(f"{live.url}/v1/info", headers=AUTH).json()["memory"]
    assert (info["version"], info["documents"]) == (out["memory_version"], out["documents"])
    for doc_id, caption, image in zip(out["ids"], ["the flag of Merovia", "the flag of Tessaly"],
                                      flags, strict=True):
        found = httpx.post(f"{live.url}/v1/retrieve", headers=AUTH, timeout=60,
                           json={"text": caption, "k": 3, "strategy": "knn"}).json()
        assert found["memory_version"] == out["memory_version"]
        hit = next(d for d in found["data"] if d["id"] == doc_id)
        assert hit["caption"] == caption  # whitespace normalised
        stored = Image.open(io.BytesIO(base64.b64decode(hit["thumbnail"])))
        assert np.array_equal(np.asarray(stored.convert("RGB")), image)


def bomb_png() -> bytes:
    """A 1x1 PNG whose header claims 30000x30000 pixels: refused before decoding."""
    png = bytearray(png_bytes(solid_image("red", size=1)))
    png[16:24] = struct.pack(">II", 30000, 30000)  # IHDR width, height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # IHDR's CRC
    return bytes(png)


@pytest.mark.parametrize("case, status, param", [
    ("no key", 401, None),
    ("one caption short", 422, "caption"),
    ("empty caption", 422, "caption.1"),
    ("not an image", 422, "image.0"),
    ("empty file", 422, "image.0"),
    ("decompression bomb", 413, "image.0"),
    ("too many", 422, "image"),
    ("no image field", 422, "image"),
])
def test_bad_input_is_refused_and_nothing_is_published(served, case, status, param):
    live, memory_dir = served
    state = memory_state(memory_dir)
    ok = png_bytes(solid_image("red"))
    if case == "no key":
        r = post_documents(live.url, [("a.png", ok)], headers={})
    elif case == "one caption short":
        r = post_documents(live.url, [("a.png", ok), ("b.png", ok)], ["only one"])
    elif case == "empty caption":
        r = post_documents(live.url, [("a.png", ok), ("b.png", ok)], ["fine", " \n "])
    elif case == "not an image":
        r = post_documents(live.url, [("a.png", b"this is not a png")])
    elif case == "empty file":
        r = post_documents(live.url, [("a.png", b"")])
    elif case == "decompression bomb":
        r = post_documents(live.url, [("a.png", bomb_png())])
    elif case == "too many":
        r = post_documents(live.url, [(f"{i}.png", ok) for i in range(65)])
    else:
        r = httpx.post(f"{live.url}/admin/documents", data={"caption": ["x"]}, headers=AUTH)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    assert memory_state(memory_dir) == state


def test_appends_run_off_the_event_loop_one_at_a_time(served):
    """Each build runs on a thread, and the second waits for the first: held at the start
    of the first build, the server still answers, and only one build has begun."""
    live, memory_dir = served
    appender = live.app.state.document_appender
    real_build = appender._build
    gate = threading.Event()
    started: list[int] = []

    def held_build(docs):
        started.append(len(docs))
        assert gate.wait(60)
        return real_build(docs)

    appender._build = held_build
    before = httpx.get(f"{live.url}/v1/info", headers=AUTH).json()["memory"]
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post_documents, live.url,
                                [("c.png", png_bytes(solid_image("yellow")))], ["concurrent one"])
            deadline = time.monotonic() + 30
            while not started and time.monotonic() < deadline:
                time.sleep(0.02)
            second = pool.submit(post_documents, live.url,
                                 [("d.png", png_bytes(solid_image("green")))], ["concurrent two"])
            time.sleep(0.3)
            t0 = time.perf_counter()
            assert httpx.get(f"{live.url}/healthz", timeout=5).status_code == 200
            found = httpx.post(f"{live.url}/v1/retrieve", headers=AUTH, timeout=10,
                               json={"text": "a red square", "k": 1})
            assert found.status_code == 200 and time.perf_counter() - t0 < 5
            assert started == [1]  # the second append waits for the first
            gate.set()
            answers = [first.result(timeout=120), second.result(timeout=120)]
    finally:
        appender._build = real_build
        gate.set()
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    versions = [a.json()["memory_version"] for a in answers]
    assert answers[1].json()["previous_version"] == versions[0] != versions[1]
    assert answers[1].json()["documents"] == before["documents"] + 2
    assert pub.current_version(memory_dir) == versions[1]


def test_a_gateway_forwards_to_its_retriever(real_models, tmp_path):  # noqa: F811
    memory_dir = real_models.copy_memory(tmp_path / "memory")
    retriever_app = create_role_app(
        "retriever", retriever_settings=real_models.retriever_settings(memory_dir, api_keys=[KEY]),
        backend_factory=real_models.backend)
    with live_app(retriever_app) as retriever:
        gateway_app = create_role_app("gateway", gateway_settings=GatewaySettings(
            # No generator is needed to add documents; nothing listens there.
            retriever_url=retriever.url, generator_urls=[f"http://127.0.0.1:{free_port()}"],
            api_keys=[KEY]))
        with LiveServer(gateway_app) as gateway:
            before = pub.current_version(memory_dir)
            refused = post_documents(gateway.url, [("e.png", b"not an image")])
            assert refused.status_code == 422 and refused.json()["error"]["param"] == "image.0"
            r = post_documents(gateway.url, [("e.png", png_bytes(solid_image("blue")))],
                               ["the flag of Forwardia"])
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["previous_version"] == before
            assert out["memory_version"] == pub.current_version(memory_dir) != before
            info = httpx.get(f"{retriever.url}/v1/info").json()["memory"]
            assert info["version"] == out["memory_version"]
            no_key = post_documents(gateway.url, [("e.png", b"x")], headers={})
            assert no_key.status_code == 401
