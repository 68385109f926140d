"""Streamed generation (`stream: true, partial_images: N`) through real HTTP: the official
`openai` SDK iterates the events unchanged; partial images are real VQ decodes with the
cells not yet generated in gray; errors before the first byte are JSON, after it an
`error` event; a client that leaves stops its decoding; multi-service mode streams from
the worker through the gateway as it happens.

The disconnect and arrival-time tests need an image that takes seconds to decode, so
they run the real engine on a decoder slowed per step (`slow_step_engine`, tests/fakes.py).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from tests.fakes import SlowEngine, slow_step_engine
from tests.live import live_app, png_bytes, real_models, role_cluster, solid_image  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GEN = "/v1/images/generations"
GRAY = 128


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """Server-sent events as (event name, JSON data), in order."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())
        elif not line and data:
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return events


def gray_cells(image: np.ndarray, grid: int = 8) -> int:
    """Grid cells painted exactly the neutral gray (cells not generated yet)."""
    c = image.shape[0] // grid
    return sum(
        bool((image[r * c:(r + 1) * c, k * c:(k + 1) * c] == GRAY).all())
        for r in range(grid) for k in range(grid)
    )


@pytest.fixture(scope="module")
def server(real_models):  # noqa: F811 - fixture
    with live_app(real_models.app(generator={"max_wait_ms": 2})) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_sdk_iterates_partial_and_completed_events(server, client):
    events = list(client.images.generate(
        prompt="a red square on the left", stream=True, partial_images=2, size="32x32",
        extra_body={"seed": 5}))
    types = [e.type for e in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    partials, done = events[:2], events[2]
    assert [p.partial_image_index for p in partials] == [0, 1]
    for e in events:
        assert e.size == "32x32" and e.output_format == "png" and e.background == "opaque"
        assert isinstance(e.created_at, int)
    assert done.usage.output_tokens == 64 and done.usage.total_tokens > 64
    # Raster order: a third of the 64 codes, then two thirds; the rest is gray.
    first, second = (decode_png(p.b64_json) for p in partials)
    assert gray_cells(first) == 64 - 21 and gray_cells(second) == 64 - 42
    assert (first[-4:] == GRAY).all() and not (first[:4] == GRAY).all()
    final = decode_png(done.b64_json)
    assert final.shape == (32, 32, 3) and gray_cells(final) < 64 - 42
    # Streaming changes how the image is delivered, not which image it is.
    plain = httpx.post(f"{server.url}{GEN}", json={"prompt": "a red square on the left",
                                                   "seed": 5}, timeout=60).json()
    assert plain["data"][0]["b64_json"] == done.b64_json


def test_partial_images_zero_sends_only_the_completed_events(client):
    # retrieval_guidance 0: a copied neighbour would make both images the same
    events = list(client.images.generate(prompt="a blue circle", n=2, stream=True,
                                         partial_images=0,
                                         extra_body={"seed": 1, "retrieval_guidance": 0}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert events[0].b64_json != events[1].b64_json


def test_neighbours_event_comes_first(server):
    body = {"prompt": "a red square", "stream": True, "partial_images": 1, "seed": 2,
            "return_neighbours": True}
    with httpx.stream("POST", f"{server.url}{GEN}", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r)
    names = [name for name, _ in events]
    assert names == ["racm3.neighbours", "image_generation.partial_image",
                     "image_generation.completed"]
    intro = events[0][1]
    assert intro["type"] == "racm3.neighbours" and intro["seed"] == 2
    assert 1 <= len(intro["neighbours"]) <= 2 and intro["memory_version"]
    assert all(n["thumbnail"] for n in intro["neighbours"])
    # The SDK passes racm3's event through too; a client tells it apart by its type.
    sdk = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with sdk.images.generate(prompt="a red square", stream=True, partial_images=1,
                             extra_body={"seed": 2, "return_neighbours": True}) as stream:
        first = next(iter(stream))
    assert first.type == "racm3.neighbours"
    assert first.model_extra["neighbours"] == intro["neighbours"]


def test_openai_sdk_streams_an_edit(client):
    image = solid_image("white")
    mask = np.full((32, 32, 4), 255, dtype=np.uint8)
    mask[:16, :, 3] = 0  # top half transparent: edit there
    events = list(client.images.edit(
        image=("image.png", png_bytes(image), "image/png"),
        mask=("mask.png", png_bytes(mask, "RGBA"), "image/png"),
        prompt="a blue square on the left", stream=True, partial_images=1))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    partial, final = decode_png(events[0].b64_json), decode_png(events[1].b64_json)
    assert np.array_equal(partial[16:], image[16:]) and np.array_equal(final[16:], image[16:])
    assert gray_cells(partial) == 16  # half of the 32 edited cells are still to come
    assert (partial[12:16] == GRAY).all() and not (final[:16] == GRAY).all()


def test_bad_stream_request_is_a_json_error_before_the_stream(server, client):
    r = httpx.post(f"{server.url}{GEN}", timeout=30,
                   json={"prompt": "a red square", "stream": True, "partial_images": 4})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["param"] == "partial_images"
    with pytest.raises(openai.UnprocessableEntityError):
        list(client.images.generate(prompt="", stream=True, partial_images=1))


def test_full_queue_is_429_json_and_timeout_after_start_is_an_error_event(real_models):  # noqa: F811
    engine = SlowEngine(real_models.engine(), 1.5)
    app = real_models.app(
        gateway={"request_timeout_s": 1.0},
        generator={"max_batch_size": 1, "max_wait_ms": 0, "queue_size": 1},
        engine_factory=lambda settings: engine)
    body = {"prompt": "a red square", "stream": True, "partial_images": 1,
            "retrieval": {"enabled": False}}
    with live_app(app) as server:
        with httpx.stream("POST", f"{server.url}{GEN}", json=body, timeout=30) as first:
            assert first.status_code == 200  # the stream started: its job is running
            time.sleep(0.2)
            with httpx.stream("POST", f"{server.url}{GEN}", json=body, timeout=30) as queued:
                assert queued.status_code == 200  # queued behind it (queue_size 1)
                busy = httpx.post(f"{server.url}{GEN}", json=body, timeout=30)
                assert busy.status_code == 429
                assert busy.headers["content-type"] == "application/json"
                assert busy.json()["error"]["type"] == "rate_limit_error"
                assert "retry-after" in busy.headers
            events = read_events(first)
        # The slow engine outlasts the 1 s budget: the stream ends with an error event.
        assert [name for name, _ in events] == ["error"]
        assert events[0][1]["error"]["type"] == "timeout_error"
        sdk = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="longer than the request timeout"):
            list(sdk.images.generate(prompt="a red square", stream=True, partial_images=1,
                                     extra_body={"retrieval": {"enabled": False}}))


def tokens_generated(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^racm3_tokens_generated_total (\S+)", text, re.M).group(1))


def first_partial_then_leave(url: str, body: dict) -> float:
    """Open a stream, read up to the first partial image, then drop the connection.
    Returns when the partial image arrived (monotonic)."""
    with httpx.stream("POST", f"{url}{GEN}", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: image_generation.partial_image"):
                return time.monotonic()
    raise AssertionError("no partial image")


def test_client_leaving_stops_its_decoding_and_frees_the_batcher(real_models):  # noqa: F811
    engine = slow_step_engine(real_models.engine(), 0.05)  # 64 steps: >= 3.2 s an image
    app = real_models.app(generator={"max_batch_size": 1, "max_wait_ms": 0},
                          engine_factory=lambda settings: engine)
    body = {"prompt": "a red square", "stream": True, "partial_images": 3,
            "retrieval": {"enabled": False}, "seed": 1}
    with live_app(app) as server:
        before = tokens_generated(server.url)
        first_partial_then_leave(server.url, body)  # after 16 of 64 codes
        start = time.monotonic()
        r = httpx.post(f"{server.url}{GEN}", json={**body, "stream": False}, timeout=60)
        waited = time.monotonic() - start
        assert r.status_code == 200
        # The abandoned image stopped within a few steps of its client leaving: far fewer
        # than its 64 codes were sampled, and the next request's whole image was.
        spent = tokens_generated(server.url) - before
        assert 64 <= spent < 64 + 40, spent
        assert 'racm3_jobs_cancelled_total{queue="generate",when="running"} 1.0' in httpx.get(
            f"{server.url}/metrics").text
        print(f"next request after a disconnect: {waited:.2f} s, tokens {spent:.0f}")


@pytest.fixture(scope="module")
def cluster(real_models):  # noqa: F811 - fixture
    """Retriever, a slowed generator worker and a gateway, each its own app and port."""
    engine = slow_step_engine(real_models.engine(), 0.03)
    with role_cluster(real_models, engine, max_wait_ms=0) as urls:
        yield urls


def test_multi_service_streams_through_the_gateway_as_it_decodes(cluster):
    client = OpenAI(base_url=f"{cluster['gateway']}/v1", api_key="unused", max_retries=0)
    arrivals, events = [], []
    for event in client.images.generate(prompt="a green circle", stream=True,
                                        partial_images=3, extra_body={"seed": 4}):
        arrivals.append(time.monotonic())
        events.append(event)
    assert [e.type for e in events] == (["image_generation.partial_image"] * 3
                                        + ["image_generation.completed"])
    assert [gray_cells(decode_png(e.b64_json)) for e in events[:3]] == [48, 32, 16]
    # Each event left the worker when it happened: a quarter of the decode (16 steps of
    # >= 30 ms) separates consecutive events; a buffered stream would deliver them together.
    gaps = np.diff(arrivals)
    assert (gaps > 0.3).all(), gaps


def test_multi_service_disconnect_stops_the_worker(cluster):
    body = {"prompt": "a red square", "stream": True, "partial_images": 3, "seed": 9}
    before = tokens_generated(cluster["generator"])
    first_partial_then_leave(cluster["gateway"], body)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the worker notices between two steps
        text = httpx.get(f"{cluster['generator']}/metrics").text
        if 'racm3_jobs_cancelled_total{queue="generate",when="running"} 1.0' in text:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    assert tokens_generated(cluster["generator"]) - before < 40


def test_multi_service_streams_an_edit_and_rejects_bad_input_as_json(cluster):
    r = httpx.post(f"{cluster['gateway']}{GEN}", timeout=30,
                   json={"prompt": "x", "stream": True, "partial_images": 9})
    assert r.status_code == 422 and r.json()["error"]["param"] == "partial_images"
    client = OpenAI(base_url=f"{cluster['gateway']}/v1", api_key="unused", max_retries=0)
    rgba = np.full((32, 32, 4), 255, dtype=np.uint8)
    rgba[24:, :, 3] = 0
    events = list(client.images.edit(
        image=("x.png", png_bytes(rgba, "RGBA"), "image/png"), prompt="a red circle",
        stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + [
        "image_edit.completed"]
    final = decode_png(events[-1].b64_json)
    assert (final[:24] == 255).all()  # kept exactly outside the edit
