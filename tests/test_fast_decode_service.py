"""The decoding fast path in the served app: the settings that configure it, the same
images as the plain path, and the prefix cache in /metrics (the smoke bundle's engine
built from the settings, its real memory, real HTTP)."""

from __future__ import annotations

import re

import httpx
import pytest

from app.serve import default_engine_factory
from tests.live import live_app, real_models  # noqa: F401 - fixture

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REQUESTS = [
    {"prompt": "a big red square on the left", "seed": 11},
    {"prompt": "a big red square on the left", "seed": 12},  # same neighbours: cache hits
    {"prompt": "a small blue circle", "seed": 13, "num_candidates": 3, "n": 2},
]


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


def _serve(models, **generator) -> tuple[list[list[str]], str, dict]:  # noqa: ANN001
    app = models.app(generator={"max_wait_ms": 2, **generator},
                     engine_factory=default_engine_factory)
    with live_app(app) as live, httpx.Client(base_url=live.url, timeout=120) as client:
        images = []
        for body in REQUESTS:
            r = client.post("/v1/images/generations", json=body)
            assert r.status_code == 200, r.text
            images.append([d["b64_json"] for d in r.json()["data"]])
        info = client.get("/v1/info").json()["generator"]
        return images, client.get("/metrics").text, info


def test_fast_path_draws_the_plain_paths_images_and_reports_its_cache(real_models):  # noqa: F811
    fast, metrics, info = _serve(real_models, fast_decode=True, decode_compile="off",
                                 prefix_cache_bytes=8 * 2**20)
    plain, plain_metrics, plain_info = _serve(real_models, fast_decode=False)
    assert fast == plain  # same seeds, same images, whichever path decoded them
    assert info["fast_decode"] == {"compile": "off", "compiled_shapes": 0,
                                   "prefix_cache_bytes": 8 * 2**20}
    assert plain_info["fast_decode"] is None
    # the second request reuses the first one's documents (and the unconditional prompt)
    hits = _metric(metrics, "racm3_prefix_cache_hits_total")
    misses = _metric(metrics, "racm3_prefix_cache_misses_total")
    assert hits >= 3 and misses >= 1
    assert _metric(metrics, "racm3_prefix_cache_hit_tokens_total") > 0
    assert 0 < _metric(metrics, "racm3_prefix_cache_bytes") <= 8 * 2**20
    assert _metric(metrics, "racm3_prefix_cache_max_bytes") == 8 * 2**20
    assert "racm3_prefix_cache" not in plain_metrics

