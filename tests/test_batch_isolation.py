"""One request must never fail the others batched with it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.batching import DynamicBatcher
from model.sampling import SamplingParams, sample
from tests.live import live_app, real_models  # noqa: F401 - fixture

GEN = "/v1/images/generations"


async def test_a_failing_job_fails_alone_and_the_rest_of_its_batch_completes():
    def run_batch(task, jobs):
        if "bad" in jobs:
            raise RuntimeError("the engine cannot take 'bad'")
        return [j.upper() for j in jobs]

    batcher = DynamicBatcher("test", run_batch, max_batch_size=8, max_wait_ms=200, max_queue=16)
    await batcher.start()
    try:
        names = ["a", "b", "bad", "c", "d", "e", "f", "g"]
        out = await asyncio.gather(*(batcher.submit("t", n) for n in names),
                                   return_exceptions=True)
    finally:
        await batcher.stop()
    assert [o for o in out if not isinstance(o, Exception)] == ["A", "B", "C", "D", "E", "F",
                                                                  "G"]
    assert isinstance(out[2], RuntimeError)


@pytest.mark.parametrize("params", [SamplingParams(top_p=1e-300, temperature=1.0),
                                    SamplingParams(temperature=1e-300)])
def test_extreme_sampling_values_still_sample_the_top_token(params):
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, params, gen).tolist() == [1, 0]


def test_a_request_retrieving_more_than_the_window_holds_does_not_fail_the_batch(real_models):  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    app = real_models.app(generator={"max_batch_size": 8})
    with live_app(app) as server:
        def post(i: int) -> httpx.Response:
            body = {"prompt": f"a red square {i}", "seed": i, "retrieval_guidance": 0}
            if i == 3:  # six documents of ~70 tokens do not fit a 512-token window
                body["retrieval"] = {"k": 6}
            if i == 5:
                body["top_p"] = 1e-300
            return httpx.post(f"{server.url}{GEN}", json=body, timeout=120)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text[:200] for r in responses]
