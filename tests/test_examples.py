"""Demonstrations (`examples: [{image, caption}]`): user-given documents in context, laid
out as retrieved documents and placed before them, on /v1/images/generations, /infill and
/captions; the same limits and errors as /v1/images/classify's examples. Real HTTP, the
real engine and memory of the smoke bundle."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from app.images import png_b64
from app.schemas import T2IJobWire
from model.jobs import FewShotExample, NeighbourDoc, SamplingParams, T2IJob
from tests.live import live_app, real_models, solid_image  # noqa: F401 - fixture

GEN = "/v1/images/generations"
BLUE = {"image": png_b64(solid_image("blue")), "caption": "a big blue triangle on the left"}
RED = {"image": png_b64(solid_image("red")), "caption": "a small red circle at the top"}


@pytest.fixture(scope="module")
def http(real_models):  # noqa: F811 - fixture
    app = real_models.app(gateway={"max_examples": 2}, generator={"max_wait_ms": 2})
    with live_app(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def images(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [d["b64_json"] for d in r.json()["data"]]


def test_examples_steer_generation_with_and_without_retrieval(http):
    for retrieval in (True, False):
        base = {"prompt": "a shape on the left", "seed": 3, "n": 2,
                "retrieval": {"enabled": retrieval}}
        plain = images(http.post(GEN, json=base))
        blue = images(http.post(GEN, json={**base, "examples": [BLUE, BLUE]}))
        red = images(http.post(GEN, json={**base, "examples": [RED, RED]}))
        assert blue != plain and red != plain and blue != red
        assert blue == images(http.post(GEN, json={**base, "examples": [BLUE, BLUE]}))


def test_demonstrations_take_the_place_of_retrieved_documents(http):
    """The decoder saw at most K=2 documents in training: by default each example takes a
    retrieved document's place; an explicit retrieval.k is honoured."""
    body = {"prompt": "a shape on the left", "seed": 3, "return_neighbours": True}
    one = http.post(GEN, json={**body, "examples": [BLUE]}).json()
    assert len(one["neighbours"]) <= 1
    two = http.post(GEN, json={**body, "examples": [BLUE, RED]}).json()
    assert two["neighbours"] == []
    pure = http.post(GEN, json={**body, "examples": [BLUE, RED],
                                "retrieval": {"enabled": False}}).json()
    assert [d["b64_json"] for d in pure["data"]] == [d["b64_json"] for d in two["data"]]
    explicit = http.post(GEN, json={**body, "examples": [BLUE, RED],
                                    "retrieval": {"k": 2}}).json()
    assert len(explicit["neighbours"]) >= 1
    assert explicit["data"][0]["b64_json"] != two["data"][0]["b64_json"]


def test_examples_on_infill_and_captions(http):
    image = png_b64(solid_image("white"))
    body = {"image": image, "box": [0, 0, 16, 32], "prompt": "a shape", "seed": 1,
            "retrieval": {"enabled": False}}
    plain = images(http.post("/v1/images/infill", json=body))
    steered = images(http.post("/v1/images/infill", json={**body, "examples": [BLUE, BLUE]}))
    assert plain != steered
    cap = {"image": png_b64(solid_image("blue")), "seed": 1, "temperature": 0,
           "retrieval": {"enabled": False}}
    r = http.post("/v1/images/captions", json={**cap, "examples": [RED, BLUE]})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["text"]


@pytest.mark.parametrize("examples,param", [
    ([BLUE, BLUE, BLUE], "examples"),  # over max_examples (2 here)
    ([{"image": "not base64!", "caption": "x"}], "examples.0.image"),
    ([BLUE, {"image": png_b64(solid_image("red")), "caption": "   "}], "examples.1.caption"),
    ([{"image": png_b64(solid_image("red"))}], "examples.0.caption"),
])
def test_bad_examples_are_refused_as_classify_refuses_them(http, examples, param):
    image = png_b64(solid_image("white"))
    answers = [
        http.post(GEN, json={"prompt": "a shape", "examples": examples}),
        http.post("/v1/images/infill", json={"image": image, "box": [0, 0, 8, 8],
                                             "examples": examples}),
        http.post("/v1/images/captions", json={"image": image, "examples": examples}),
        http.post("/v1/images/classify", json={"image": image, "labels": ["a", "b"],
                                               "examples": examples}),
    ]
    errors = [r.json()["error"] for r in answers]
    assert [r.status_code for r in answers] == [422] * 4
    assert {e["param"].removeprefix("body.") for e in errors} == {param}
    assert len({(e["type"], e["code"]) for e in errors}) == 1, errors


def test_examples_are_documents_before_the_neighbours(real_models):  # noqa: F811
    """An example is exactly a retrieved document with its image's codes and caption, and
    it goes before the retrieved ones."""
    engine = real_models.engine()
    image, caption = solid_image("blue"), "a big blue triangle on the left"
    as_doc = NeighbourDoc(-1, 1.0, caption, engine.tokenizer.encode(caption),
                          engine.encode_images([image])[0])
    retrieved = NeighbourDoc(7, 0.5, "a small red circle at the top",
                             engine.tokenizer.encode("a small red circle at the top"),
                             engine.encode_images([solid_image("red")])[0])

    def job(neighbours, examples):
        return T2IJob("a shape", neighbours, n=2, num_candidates=2,
                      sampling=SamplingParams(seed=5), examples=examples)

    example = FewShotExample(image, caption)
    by_example = engine.text_to_image([job([retrieved], [example])])[0]
    by_documents = engine.text_to_image([job([as_doc, retrieved], [])])[0]
    after = engine.text_to_image([job([retrieved, as_doc], [])])[0]
    assert [g.codes.tolist() for g in by_example] == [g.codes.tolist() for g in by_documents]
    assert [g.codes.tolist() for g in by_example] != [g.codes.tolist() for g in after]


def test_examples_cross_the_worker_wire():
    job = T2IJob("a shape", [], n=1, num_candidates=1, sampling=SamplingParams(seed=1),
                 examples=[FewShotExample(solid_image("blue"), "a blue ring")])
    back = T2IJobWire.model_validate_json(T2IJobWire.from_job(job).model_dump_json()).to_job()
    assert [e.caption for e in back.examples] == ["a blue ring"]
    assert np.array_equal(back.examples[0].image, job.examples[0].image)
