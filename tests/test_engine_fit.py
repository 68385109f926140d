"""What the decoder's window holds is checked before a job joins a batch (`Engine.fit`):
a request that cannot fit is a 422 of its own, in embedded and multi-service mode and for
every task, while the jobs batched beside it complete; `/v1/info` says what fits.

On the smoke bundle's real engine and memory: a 512-token window and an 8x8 image grid,
as the demo bundle has, and a tokenizer whose "q"s are one token each, so prompts of an
exact length are easy to write.
"""

from __future__ import annotations

import base64
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from app.serve import create_role_app
from app.settings import GatewaySettings
from model.jobs import ClassifyJob, FewShotExample, InfillJob, NeighbourDoc, T2IJob, Unfit
from model.jobs import SamplingParams as RequestSampling
from tests.live import LiveServer, live_app, png_bytes, real_models, solid_image, wait_ready  # noqa: F401

GEN = "/v1/images/generations"
LONG_PROMPTS = {"max_prompt_chars": 4000, "max_examples": 16}


@pytest.fixture(scope="module")
def engine(real_models, one_thread):  # noqa: F811 - fixture
    return real_models.engine()


def prompt_of(engine, tokens: int) -> str:
    """A prompt of exactly `tokens` BPE tokens."""
    text = "a red square " + "q" * max(0, tokens - 10)
    assert len(engine.tokenizer.encode(text)) == tokens
    return text


def docs(engine, k: int, caption: str | None = "a blue circle") -> list[NeighbourDoc]:
    codes = np.zeros(engine.space.image_grid, dtype=np.int64)
    text = None if caption is None else engine.tokenizer.encode(caption)
    return [NeighbourDoc(i, 0.5, caption, text, codes + i) for i in range(k)]


def t2i(prompt: str, neighbours=(), seed: int = 0, **sampling) -> T2IJob:
    return T2IJob(prompt, list(neighbours), n=1, num_candidates=1,
                  sampling=RequestSampling(seed=seed, **sampling), retrieval_guidance=0)


def infill(prompt: str | None, mask: np.ndarray, neighbours=(), seed: int = 0) -> InfillJob:
    return InfillJob(solid_image("red"), mask, prompt, list(neighbours), n=1, num_candidates=1,
                     sampling=RequestSampling(seed=seed))


# --- the engine ----------------------------------------------------------------------------


def test_the_window_limits_are_what_the_engine_takes(engine):
    block, n = engine.decoder.config.block_size, engine.space.image_len
    window = engine.window()
    assert window == engine.info()["window"]
    assert window["tokens"] == block == 512 and n == 64
    assert window["max_prompt_tokens"] == block - n - 2 == 446
    assert window["max_k"] == 6
    # The longest prompt runs, beside as many retrieved documents as still fit...
    longest = prompt_of(engine, window["max_prompt_tokens"])
    engine.fit("text_to_image", t2i(longest))
    [[image]] = engine.text_to_image([t2i(longest, docs(engine, 2))])
    assert image.codes.shape == engine.space.image_grid
    # ...one token more does not.
    with pytest.raises(Unfit) as refused:
        engine.fit("text_to_image", t2i(prompt_of(engine, window["max_prompt_tokens"] + 1)))
    assert refused.value.param == "prompt" and refused.value.code == "context_length_exceeded"
    # max_k image-only documents fit beside the shortest prompt, and one more never does.
    beside = engine._t2i_tokens(1)
    kept = engine.context_ids(docs(engine, window["max_k"] + 1, caption=None), beside)
    assert len(kept) == window["max_k"] * (n + 4)


@pytest.mark.parametrize("sampling,param", [
    ({"temperature": math.nan}, "temperature"),
    ({"guidance_scale": math.inf}, "guidance_scale"),
])
def test_fit_refuses_sampling_values_the_engine_cannot_represent(engine, sampling, param):
    with pytest.raises(Unfit) as refused:
        engine.fit("text_to_image", t2i("a red square", **sampling))
    assert refused.value.param == param


@pytest.mark.parametrize("sampling,name", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
])
def test_sampling_values_out_of_range_are_refused_when_the_job_is_made(sampling, name):
    # SamplingParams checks its own ranges; Engine.fit adds what a range cannot say
    with pytest.raises(ValueError, match=name):
        RequestSampling(seed=0, **sampling)


def test_infill_jobs_that_fit_alone_decode_together_with_their_documents(engine):
    """A long prompt with a small mask and a short prompt with the whole image masked each
    fit the window alone, with retrieved documents; one decode of both would not (its
    cache holds the longest prompt plus the most generated tokens), so they decode apart."""
    small = np.zeros((32, 32), dtype=bool)
    small[:4, :4] = True
    whole = np.ones((32, 32), dtype=bool)
    longest = engine.window()["max_edit_prompt_tokens"]
    long_job = infill(prompt_of(engine, longest), small, docs(engine, 2), seed=1)
    short_job = infill("a red square", whole, docs(engine, 2), seed=2)
    out = engine.infill([long_job, short_job])
    assert [len(r) for r in out] == [1, 1]
    # outside its mask the image is kept exactly
    assert (out[0][0].image[~small] == long_job.image[~small]).all()
    for job in (long_job, short_job):
        engine.fit("infill", job)
    with pytest.raises(Unfit) as refused:
        engine.fit("infill", infill(prompt_of(engine, 512 - 64 - 5), small))
    assert refused.value.param == "prompt"
    with pytest.raises(Unfit) as empty:
        engine.fit("infill", infill("a", np.zeros((32, 32), dtype=bool)))
    assert empty.value.param == "mask"


def test_classify_keeps_its_examples_and_documents_only_where_they_fit(engine):
    red = solid_image("red")
    examples = [FewShotExample(red, "a red square") for _ in range(3)]
    job = ClassifyJob(red, ["a red square", "a blue circle"], docs(engine, 6), examples)
    [result] = engine.classify([job])  # six documents do not fit beside the examples
    assert set(result.scores) == {"a red square", "a blue circle"}
    engine.fit("classify", job)
    crowded = ClassifyJob(red, ["red"], [], [FewShotExample(red, "a red square")] * 8)
    with pytest.raises(Unfit) as refused:
        engine.fit("classify", crowded)
    assert refused.value.param == "examples"


# --- the service -----------------------------------------------------------------------------


def b64png(image: np.ndarray, mode: str | None = None) -> str:
    return base64.b64encode(png_bytes(image, mode)).decode()


def assert_refused(response: httpx.Response, param: str, code: str | None = None) -> None:
    assert response.status_code == 422, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


@pytest.fixture(scope="module")
def server(real_models):  # noqa: F811 - fixture
    app = real_models.app(gateway=LONG_PROMPTS, generator={"max_batch_size": 8})
    with live_app(app) as live:
        yield live


def test_a_prompt_too_long_for_the_window_fails_alone_in_its_batch(server, engine):
    too_long = prompt_of(engine, 447)

    def post(i: int) -> httpx.Response:
        body = {"prompt": too_long if i == 3 else f"a red square {i}", "seed": i,
                "retrieval_guidance": 0}
        return httpx.post(f"{server.url}{GEN}", json=body, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert_refused(responses[3], "prompt", "context_length_exceeded")
    assert "446" in responses[3].json()["error"]["message"]
    assert [r.status_code for i, r in enumerate(responses) if i != 3] == [200] * 7


def test_every_task_refuses_what_does_not_fit_with_a_422(server, engine):
    url = server.url
    image = b64png(solid_image("red"))
    too_long = prompt_of(engine, 500)
    infill_body = {"image": image, "box": [0, 0, 8, 8], "prompt": too_long}
    assert_refused(httpx.post(f"{url}/v1/images/infill", json=infill_body, timeout=60),
                   "prompt", "context_length_exceeded")
    rgba = np.full((32, 32, 4), 255, dtype=np.uint8)
    rgba[24:, :, 3] = 0
    edit = httpx.post(f"{url}/v1/images/edits", timeout=60, data={"prompt": too_long},
                      files={"image": ("x.png", png_bytes(rgba, "RGBA"), "image/png")})
    assert_refused(edit, "prompt", "context_length_exceeded")
    crowded = {"image": image, "labels": ["red", "blue"],
               "examples": [{"image": image, "caption": "a red square"}] * 8}
    assert_refused(httpx.post(f"{url}/v1/images/classify", json=crowded, timeout=60),
                   "examples", "context_length_exceeded")
    # Captioning always fits: the most documents and demonstrations are trimmed to fit.
    caption = {"image": image, "retrieval": {"k": 6},
               "examples": [{"image": image, "caption": "a red square"}] * 4}
    assert httpx.post(f"{url}/v1/images/captions", json=caption, timeout=60).status_code == 200


def test_info_says_what_fits_and_k_beyond_it_is_refused(server):
    limits = httpx.get(f"{server.url}/v1/info").json()["limits"]
    assert limits["max_k"] == 6  # configured 16; the window holds 6 documents
    assert limits["max_prompt_tokens"] == 446
    assert 0 < limits["max_edit_prompt_tokens"] < 446
    doc = httpx.get(f"{server.url}/openapi.json").json()
    k = doc["components"]["schemas"]["RetrievalOptions"]["properties"]["k"]
    assert [b["maximum"] for b in k["anyOf"] if b.get("type") == "integer"] == [6]
    body = {"prompt": "a red square", "retrieval": {"k": 7}}
    assert_refused(httpx.post(f"{server.url}{GEN}", json=body, timeout=60), "retrieval.k")
    body["retrieval"]["k"] = 6
    assert httpx.post(f"{server.url}{GEN}", json=body, timeout=60).status_code == 200
    rgba = np.full((32, 32, 4), 255, dtype=np.uint8)
    rgba[24:, :, 3] = 0
    edit = httpx.post(f"{server.url}/v1/images/edits", timeout=60,
                      data={"prompt": "a red circle", "retrieval_k": "7"},
                      files={"image": ("x.png", png_bytes(rgba, "RGBA"), "image/png")})
    assert_refused(edit, "retrieval_k")


def test_multi_service_refuses_what_does_not_fit_with_a_422(real_models, engine):  # noqa: F811
    retriever = create_role_app(
        "retriever", retriever_settings=real_models.retriever_settings(),
        backend_factory=real_models.backend)
    generator = create_role_app(
        "generator", generator_settings=real_models.generator_settings(max_wait_ms=0),
        engine_factory=real_models.engine)
    with LiveServer(retriever) as r, LiveServer(generator) as g:
        wait_ready(r.url)
        wait_ready(g.url)
        gateway = create_role_app("gateway", gateway_settings=GatewaySettings(
            retriever_url=r.url, generator_urls=[g.url], **LONG_PROMPTS))
        with live_app(gateway) as gw:
            too_long = prompt_of(engine, 447)
            for stream in (False, True):
                r1 = httpx.post(f"{gw.url}{GEN}", timeout=60,
                                json={"prompt": too_long, "stream": stream})
                assert r1.headers["content-type"] == "application/json"
                assert_refused(r1, "prompt", "context_length_exceeded")
            image = b64png(solid_image("red"))
            body = {"image": image, "box": [0, 0, 8, 8], "prompt": prompt_of(engine, 500)}
            assert_refused(httpx.post(f"{gw.url}/v1/images/infill", json=body, timeout=60),
                           "prompt", "context_length_exceeded")
            assert httpx.get(f"{gw.url}/v1/info").json()["limits"]["max_k"] == 6
            body = {"prompt": "a red square", "retrieval": {"k": 7}}
            assert_refused(httpx.post(f"{gw.url}{GEN}", json=body, timeout=60), "retrieval.k")
            ok = httpx.post(f"{gw.url}{GEN}", json={"prompt": "a red square"}, timeout=60)
            assert ok.status_code == 200
