"""The `retrieval_guidance` request control through real HTTP (embedded server, smoke
bundle): validated before any model runs, passed to the engine, default in /v1/info."""

from __future__ import annotations

import httpx
import pytest

from app.images import png_b64
from model.retrieval_guidance import DEFAULT_WEIGHT, MAX_WEIGHT
from tests.live import live_app, real_models, solid_image  # noqa: F401 - fixture

GEN = "/v1/images/generations"
CAP = "/v1/images/captions"


@pytest.fixture(scope="module")
def http(real_models):  # noqa: F811 - fixture
    with live_app(real_models.app(generator={"max_wait_ms": 2})) as live, \
            httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("value", [-0.1, MAX_WEIGHT + 0.5, "strong", None])
@pytest.mark.parametrize("path", [GEN, CAP])
def test_out_of_range_guidance_is_a_422_naming_the_field(http, path, value):
    body = {"prompt": "a red square"} if path == GEN else {"image": png_b64(solid_image("red"))}
    if value is None:  # JSON has no NaN: a non-finite number arrives as a string
        body["retrieval_guidance"] = "NaN"
    else:
        body["retrieval_guidance"] = value
    r = http.post(path, json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "retrieval_guidance"
    assert set(error) == {"message", "type", "param", "code"}


def test_guidance_changes_the_image_and_zero_is_reproducible(http):
    body = {"prompt": "a big red circle on the left", "seed": 5, "return_neighbours": True}
    paper = http.post(GEN, json={**body, "retrieval_guidance": 0})
    again = http.post(GEN, json={**body, "retrieval_guidance": 0.0})
    full = http.post(GEN, json={**body, "retrieval_guidance": 1})
    assert paper.status_code == again.status_code == full.status_code == 200
    assert paper.json()["data"] == again.json()["data"]
    caption = http.post(CAP, json={"image": png_b64(solid_image("blue")),
                                   "retrieval_guidance": 0.5})
    assert caption.status_code == 200, caption.text


def test_info_reports_the_served_default(http):
    info = http.get("/v1/info").json()
    assert info["generator"]["retrieval_guidance"] == {"default": DEFAULT_WEIGHT,
                                                       "range": [0.0, MAX_WEIGHT]}
