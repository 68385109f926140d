"""Bad input never yields a 5xx: each of these gets a 4xx in the JSON error shape, and
the server is still ready afterwards. Real HTTP against an embedded server on the real
engine and memory (smoke bundle)."""

from __future__ import annotations

import json
import struct
import zlib

import httpx
import numpy as np
import pytest

from app.images import b64, png_b64
from tests.live import live_app, png_bytes, real_models, solid_image  # noqa: F401 - fixture

MAX_BODY = 2 * 1024 * 1024
MAX_IMAGE = 1024 * 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int, idat: bytes, bit_depth: int = 8, colour: int = 2):
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(
        b"IEND", b""
    )


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side zeros: ~50 MB of pixels in a few tens of kB."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)] + [comp.flush()]
    return png_with_header(side, side, b"".join(parts), bit_depth=1, colour=0)


BLUE = png_b64(solid_image("blue"))
TRUNCATED = b64(png_bytes(solid_image("red"))[:60])
ZERO_SIZE = b64(png_with_header(0, 0, zlib.compress(b"")))
BOMB = b64(png_bomb())
SMALL_MASK = png_b64(np.zeros((16, 16, 4), dtype=np.uint8))
OPAQUE_MASK = png_b64(np.full((32, 32, 4), 255, dtype=np.uint8))
HUGE_B64 = "A" * (MAX_IMAGE * 4 // 3 + 400)
GEN = "/v1/images/generations"
CAP = "/v1/images/captions"
INF = "/v1/images/infill"
CLS = "/v1/images/classify"
JSON = {"content-type": "application/json"}
PNG_FILE = ("a.png", png_bytes(solid_image("white")), "image/png")

# (id, method, path, httpx kwargs, expected status)
CASES = [
    ("invalid_base64", "POST", CAP, {"json": {"image": "!!not*base64!!"}}, 422),
    ("truncated_png", "POST", CAP, {"json": {"image": TRUNCATED}}, 422),
    ("zero_by_zero_png", "POST", CAP, {"json": {"image": ZERO_SIZE}}, 422),
    ("png_bomb_20000", "POST", CAP, {"json": {"image": BOMB}}, 413),
    ("not_an_image", "POST", CAP, {"json": {"image": b64(b"hello, I am text")}}, 422),
    ("svg_is_not_allowed", "POST", CAP, {"json": {"image": b64(b"<svg xmlns='x'/>")}}, 422),
    ("data_url_not_base64", "POST", CAP, {"json": {"image": "data:image/png,abc"}}, 422),
    ("image_too_many_bytes", "POST", CAP, {"json": {"image": HUGE_B64}}, 413),
    ("wrong_mask_size", "POST", INF, {"json": {"image": BLUE, "mask": SMALL_MASK}}, 422),
    ("mask_selects_nothing", "POST", INF, {"json": {"image": BLUE, "mask": OPAQUE_MASK}}, 422),
    ("mask_and_box", "POST", INF,
     {"json": {"image": BLUE, "mask": SMALL_MASK, "box": [0, 0, 1, 1]}}, 422),
    ("box_outside_image", "POST", INF, {"json": {"image": BLUE, "box": [0, 0, 64, 8]}}, 422),
    ("box_wrong_arity", "POST", INF, {"json": {"image": BLUE, "box": [0, 0, 8]}}, 422),
    ("prompt_too_long", "POST", GEN, {"json": {"prompt": "x" * 5000}}, 422),
    ("prompt_blank", "POST", GEN, {"json": {"prompt": "   "}}, 422),
    ("n_zero", "POST", GEN, {"json": {"prompt": "a", "n": 0}}, 422),
    ("n_too_large", "POST", GEN, {"json": {"prompt": "a", "n": 100}}, 422),
    ("n_fractional", "POST", GEN, {"json": {"prompt": "a", "n": 1.5}}, 422),
    ("candidates_below_n", "POST", GEN,
     {"json": {"prompt": "a", "n": 3, "num_candidates": 2}}, 422),
    ("wrong_content_type", "POST", GEN,
     {"content": b"prompt=a", "headers": {"content-type": "text/plain"}}, 422),
    ("non_utf8_body", "POST", GEN,
     {"content": b'{"prompt": "\xff\xfe\xfa"}', "headers": JSON}, 422),
    ("malformed_json", "POST", GEN, {"content": b'{"prompt": ', "headers": JSON}, 422),
    ("json_array_body", "POST", GEN, {"json": ["a red square"]}, 422),
    ("empty_body", "POST", GEN, {"content": b"", "headers": JSON}, 422),
    ("missing_field", "POST", GEN, {"json": {"n": 1}}, 422),
    ("wrong_type", "POST", GEN, {"json": {"prompt": 123}}, 422),
    ("unknown_field", "POST", GEN, {"json": {"prompt": "a", "temprature": 0.5}}, 422),
    ("negative_temperature", "POST", GEN, {"json": {"prompt": "a", "temperature": -1}}, 422),
    ("nan_temperature", "POST", GEN,
     {"content": b'{"prompt": "a", "temperature": NaN}', "headers": JSON}, 422),
    ("infinite_guidance", "POST", GEN,
     {"content": b'{"prompt": "a", "guidance_scale": Infinity}', "headers": JSON}, 422),
    ("top_p_above_one", "POST", GEN, {"json": {"prompt": "a", "top_p": 1.5}}, 422),
    ("top_k_zero", "POST", GEN, {"json": {"prompt": "a", "top_k": 0}}, 422),
    ("negative_seed", "POST", GEN, {"json": {"prompt": "a", "seed": -5}}, 422),
    ("url_response_format", "POST", GEN, {"json": {"prompt": "a", "response_format": "url"}}, 422),
    ("unsupported_size", "POST", GEN, {"json": {"prompt": "a", "size": "1024x1024"}}, 422),
    ("retrieval_k_too_large", "POST", GEN, {"json": {"prompt": "a", "retrieval": {"k": 1000}}},
     422),
    ("duplicate_labels", "POST", CLS, {"json": {"image": BLUE, "labels": ["a", "a"]}}, 422),
    ("no_labels", "POST", CLS, {"json": {"image": BLUE, "labels": []}}, 422),
    ("retrieve_without_query", "POST", "/v1/retrieve", {"json": {"k": 2}}, 422),
    ("retrieve_k_zero", "POST", "/v1/retrieve", {"json": {"text": "a", "k": 0}}, 422),
    ("knn_image_url", "POST", "/knn-service",
     {"json": {"image_url": "http://169.254.169.254/latest", "num_images": 2}}, 422),
    ("knn_embedding_wrong_dim", "POST", "/knn-service",
     {"json": {"embedding_input": [0.1, 0.2], "num_images": 2}}, 422),
    ("knn_embedding_nan", "POST", "/knn-service",
     {"content": b'{"embedding_input": [NaN, 1.0], "num_images": 2}', "headers": JSON}, 422),
    ("knn_too_many_results", "POST", "/knn-service", {"json": {"text": "a", "num_images": 10**6}},
     422),
    ("edit_not_an_image", "POST", "/v1/images/edits",
     {"files": {"image": ("a.png", b"plain text", "image/png")}, "data": {"prompt": "a"}}, 422),
    ("edit_opaque_without_mask", "POST", "/v1/images/edits",
     {"files": {"image": PNG_FILE}, "data": {"prompt": "a"}}, 422),
    ("edit_missing_image", "POST", "/v1/images/edits", {"data": {"prompt": "a"}}, 422),
    ("edit_as_json", "POST", "/v1/images/edits", {"json": {"prompt": "a", "image": BLUE}}, 422),
    ("edit_n_not_a_number", "POST", "/v1/images/edits",
     {"files": {"image": PNG_FILE}, "data": {"prompt": "a", "n": "abc"}}, 422),
    ("edit_mask_wrong_size", "POST", "/v1/images/edits",
     {"files": {"image": PNG_FILE, "mask": ("m.png", png_bytes(np.zeros((8, 8, 4), np.uint8)),
                                             "image/png")}, "data": {"prompt": "a"}}, 422),
    ("body_too_large", "POST", GEN, {"content": b"x" * (MAX_BODY + 10), "headers": JSON}, 413),
    ("chunked_body_too_large", "POST", GEN,
     {"content": (b"x" * 65536 for _ in range(MAX_BODY // 65536 + 2)), "headers": JSON}, 413),
    ("wrong_method", "GET", GEN, {}, 405),
    ("unknown_route", "POST", "/v1/images/variations", {"json": {}}, 404),
]


@pytest.fixture(scope="module")
def server(real_models):  # noqa: F811 - fixture
    app = real_models.app(
        gateway={"max_body_bytes": MAX_BODY, "max_image_bytes": MAX_IMAGE,
                 "max_image_pixels": 1024 * 1024, "max_image_side": 2048,
                 "max_prompt_chars": 1000},
        generator={"max_wait_ms": 1},
    )
    with live_app(app) as live:
        yield live


def test_there_are_at_least_30_distinct_bad_inputs():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("name,method,path,kwargs,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_json_4xx(server, name, method, path, kwargs, status):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.request(method, path, **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_still_ready_and_serving_after_bad_inputs(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for name, method, path, kwargs, _ in CASES:
            if "chunked" in name:
                continue  # a generator body can be sent once only
            assert client.request(method, path, **kwargs).status_code < 500, name
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        ok = client.post(GEN, json={"prompt": "a red square"})
        assert ok.status_code == 200
        text = client.get("/metrics").text
    assert 'racm3_errors_total{type="invalid_request_error"}' in text
    assert 'racm3_errors_total{type="server_error"}' not in text


def test_error_json_says_which_parameter(server):
    r = httpx.post(f"{server.url}{GEN}", json={"prompt": "a", "top_p": 2}, timeout=10)
    assert r.json()["error"]["param"] == "top_p"
    r = httpx.post(f"{server.url}{GEN}", json={"prompt": "a", "response_format": "url"}, timeout=10)
    assert "never hosts files" in r.json()["error"]["message"]
    body = json.dumps({"image": BLUE, "mask": SMALL_MASK})
    r = httpx.post(f"{server.url}{INF}", content=body, headers=JSON, timeout=10)
    assert r.json()["error"]["code"] == "mask_size_mismatch"
