"""Every public endpoint through real HTTP against an embedded server (uvicorn on a free port).

The engine and memory come from `model_factories` (temporary fakes, see tests/fakes.py);
everything else (routing, validation, batching, cache, encoding) is the real service.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from app.images import png_b64
from app.serve import create_role_app
from app.settings import GatewaySettings, GeneratorSettings, RetrieverSettings
from tests.fakes import live_app, model_factories, solid_image  # noqa: F401 - fixture

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(model_factories, tmp_path_factory):  # noqa: F811 - fixture
    app = create_role_app(
        "embedded",
        gateway_settings=GatewaySettings(),
        retriever_settings=RetrieverSettings(memory_dir=tmp_path_factory.mktemp("memory")),
        generator_settings=GeneratorSettings(max_wait_ms=2),
        engine_factory=model_factories.engine,
        backend_factory=model_factories.backend,
    )
    with live_app(app) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_health_and_readiness(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["checks"]["generator.generator"] == "ready"


def test_generation_returns_images_seed_and_neighbours(http):
    body = {"prompt": "a red square", "n": 2, "seed": 7, "return_neighbours": True}
    r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seed"] == 7
    assert len(out["data"]) == 2
    image = decode_png(out["data"][0]["b64_json"])
    assert image.shape == (32, 32, 3)
    assert image[..., 0].mean() > 150  # the fake paints the prompt's colour: red
    assert len(out["neighbours"]) == 2  # K=2 by default, as in the paper
    nb = out["neighbours"][0]
    assert "red" in nb["caption"] and nb["thumbnail"] and isinstance(nb["id"], int)
    assert out["memory_version"] == "v1"
    again = http.post("/v1/images/generations", json=body).json()
    assert again["data"][0]["b64_json"] == out["data"][0]["b64_json"]  # same seed, same image


def test_generation_draws_and_returns_a_seed_when_none_given(http):
    out = http.post("/v1/images/generations", json={"prompt": "a blue circle"}).json()
    assert isinstance(out["seed"], int) and "neighbours" not in out


def test_retrieval_can_be_disabled(http):
    body = {"prompt": "a red square", "retrieval": {"enabled": False}, "return_neighbours": True}
    out = http.post("/v1/images/generations", json=body).json()
    assert out["neighbours"] == []


def test_infill_keeps_pixels_outside_the_box(http):
    image = solid_image("blue")
    body = {"image": png_b64(image), "box": [0, 0, 16, 32], "prompt": "make it green", "seed": 1}
    r = http.post("/v1/images/infill", json=body)
    assert r.status_code == 200, r.text
    out = decode_png(r.json()["data"][0]["b64_json"])
    assert np.array_equal(out[:, 16:], image[:, 16:])
    assert not np.array_equal(out[:, :16], image[:, :16])


def test_infill_with_alpha_mask(http):
    image = solid_image("white")
    mask = np.full((32, 32, 4), 255, dtype=np.uint8)
    mask[8:16, 8:16, 3] = 0  # alpha 0 = regenerate
    body = {"image": png_b64(image), "mask": png_b64(mask), "prompt": "red"}
    out = decode_png(http.post("/v1/images/infill", json=body).json()["data"][0]["b64_json"])
    assert out[10, 10, 0] > 150 and out[10, 10, 1] < 100
    assert np.array_equal(out[20:, 20:], image[20:, 20:])


def test_captions(http):
    body = {"image": png_b64(solid_image("green")), "n": 2, "return_neighbours": True}
    out = http.post("/v1/images/captions", json=body).json()
    assert [c["text"] for c in out["data"]] == ["a green image", "a green image"]
    assert out["data"][0]["score"] >= out["data"][1]["score"]
    assert all("green" in n["caption"] for n in out["neighbours"])


def test_classify(http):
    body = {
        "image": png_b64(solid_image("yellow")),
        "labels": ["a red thing", "a yellow thing", "a blue thing"],
        "examples": [{"image": png_b64(solid_image("red")), "caption": "a red thing"}],
    }
    out = http.post("/v1/images/classify", json=body).json()
    assert out["label"] == "a yellow thing"
    assert abs(sum(out["scores"].values()) - 1) < 1e-6


def test_retrieve_by_text_and_by_image(http):
    by_text = http.post("/v1/retrieve", json={"text": "a purple circle", "k": 3}).json()
    assert by_text["memory_version"] == "v1"
    assert len(by_text["data"]) == 3
    assert "purple" in by_text["data"][0]["caption"]
    assert by_text["data"][0]["score"] >= by_text["data"][-1]["score"]
    assert decode_png(by_text["data"][0]["thumbnail"]).shape == (32, 32, 3)
    body = {"image": png_b64(solid_image("orange")), "k": 2, "return_thumbnails": False}
    by_image = http.post("/v1/retrieve", json=body).json()
    assert all("orange" in d["caption"] for d in by_image["data"])
    assert "thumbnail" not in by_image["data"][0]


def test_knn_service_accepts_a_clip_client_request(server):
    # Exactly what clip-retrieval's ClipClient sends: json.dumps body, no Content-Type.
    payload = {
        "text": "a black triangle",
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "deduplicate": False,
        "use_safety_model": True,
        "use_violence_detector": True,
        "indice_name": "laion5B-L-14",
        "use_mclip": False,
        "aesthetic_score": 9,
        "aesthetic_weight": 0.5,
        "modality": "image",
        "num_images": 4,
        "num_result_ids": 4,
        "verbose": False,
    }
    r = httpx.post(f"{server.url}/knn-service", content=json.dumps(payload), timeout=30)
    assert "content-type" not in r.request.headers
    assert r.status_code == 200, r.text
    results = r.json()
    assert len(results) == 4
    first = results[0]
    assert set(first) >= {"id", "similarity", "caption", "image"}
    assert "black" in first["caption"]
    assert decode_png(first["image"]).mean() < 40


def test_knn_service_by_image_and_embedding(http):
    by_image = http.post(
        "/knn-service",
        json={"image": png_b64(solid_image("green")), "modality": "image", "num_images": 2},
    ).json()
    assert "green" in by_image[0]["caption"]
    vec = [0.0] * 64
    vec[3] = 1.0
    by_embedding = http.post(
        "/knn-service", json={"embedding_input": vec, "num_images": 3, "deduplicate": False}
    ).json()
    assert len(by_embedding) == 3


def test_info(http):
    info = http.get("/v1/info").json()
    assert info["role"] == "embedded"
    assert info["generator"]["image_size"] == [32, 32]
    assert info["memory"]["version"] == "v1" and info["memory"]["documents"] > 0
    assert info["cache"]["backend"] == "memory"
    assert info["limits"]["max_n"] == 8


def test_metrics_exposes_stages_queue_batches_tokens_cache_and_errors(http):
    http.post("/v1/images/generations", json={"prompt": "a red square", "n": 20})  # 422
    http.post("/v1/retrieve", json={"text": "a white circle", "k": 2})
    http.post("/v1/retrieve", json={"text": "a white circle", "k": 2})
    http.post("/v1/images/generations", json={"prompt": "a red square"})
    text = http.get("/metrics").text
    for name in (
        'racm3_stage_latency_seconds_bucket{le="0.001",stage="knn_search"}',
        'racm3_stage_latency_seconds_count{stage="generate"}',
        'racm3_queue_depth{queue="generate"}',
        'racm3_batch_size_count{queue="generate"}',
        "racm3_tokens_generated_total",
        'racm3_cache_requests_total{backend="memory",result="hit"}',
        'racm3_cache_requests_total{backend="memory",result="miss"}',
        'racm3_errors_total{type="invalid_request_error"}',
        'racm3_requests_total{route="/v1/images/generations",status="200"}',
    ):
        assert name in text, name
    tokens = [ln for ln in text.splitlines() if ln.startswith("racm3_tokens_generated_total ")]
    assert float(tokens[0].split()[1]) > 0


def test_openai_client_generate(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        prompt="a green circle", n=2, response_format="b64_json", size="32x32",
        extra_body={"seed": 3},
    )
    assert len(result.data) == 2
    assert decode_png(result.data[0].b64_json)[..., 1].mean() > 120


def test_openai_client_edit_with_mask(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    image = solid_image("white")
    mask = np.full((32, 32, 4), 255, dtype=np.uint8)
    mask[:16, :, 3] = 0  # top half transparent: edit there
    buf_i, buf_m = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(buf_i, format="PNG")
    Image.fromarray(mask, "RGBA").save(buf_m, format="PNG")
    result = client.images.edit(
        image=("image.png", buf_i.getvalue(), "image/png"),
        mask=("mask.png", buf_m.getvalue(), "image/png"),
        prompt="a blue sky",
        n=1,
    )
    out = decode_png(result.data[0].b64_json)
    assert out[:16, :, 2].mean() > 150 and out[:16, :, 0].mean() < 100  # edited: blue
    assert np.array_equal(out[16:], image[16:])  # kept exactly


def test_openai_client_edit_uses_image_alpha_without_mask(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    rgba = np.full((32, 32, 4), 255, dtype=np.uint8)
    rgba[20:, :, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    result = client.images.edit(image=("x.png", buf.getvalue(), "image/png"), prompt="red")
    out = decode_png(result.data[0].b64_json)
    assert out[25, 5, 0] > 150 and out[25, 5, 1] < 100
    assert out[5, 5].tolist() == [255, 255, 255]


def test_edits_multipart_extensions(http):
    buf = io.BytesIO()
    Image.fromarray(solid_image("black")).save(buf, format="PNG")
    mask = io.BytesIO()
    Image.fromarray(np.where(np.arange(32)[None, :, None] < 8, 255, 0).astype(np.uint8).repeat(
        32, 0).squeeze(-1), "L").save(mask, format="PNG")
    r = http.post(
        "/v1/images/edits",
        files={"image": ("a.png", buf.getvalue(), "image/png"),
               "mask": ("m.png", mask.getvalue(), "image/png")},
        data={"prompt": "yellow", "n": "2", "seed": "11", "return_neighbours": "true"},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seed"] == 11 and len(out["data"]) == 2 and len(out["neighbours"]) == 2
