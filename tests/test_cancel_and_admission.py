"""Work nobody wants stops, and work that cannot be taken is refused before it starts.

- Disconnects: the rows of a running batch whose clients have all gone leave it between
  two decoding steps (`CM3Decoder.generate(stopped=...)`), so the batch ends early and
  the next request does not wait for it; `racm3_jobs_cancelled_total` counts each job
  once, with `when` queued or running. In embedded mode and through the gateway, whose
  call to the worker is cancelled with its client.
- Admission: with a small queue a 429 is answered before any retrieval is done.

The disconnect tests need a batch that takes seconds to decode, so they run the real
engine on a decoder slowed per step (`slow_step_engine`, tests/fakes.py); clients are raw
sockets, so that a test decides exactly when each one goes away.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import torch

from model.decoder import left_pad
from model.jobs import NeighbourDoc, T2IJob
from model.jobs import SamplingParams as RequestSampling
from model.sampling import SamplingParams, make_generator
from model.tokens import PAD_ID
from tests.fakes import SlowEngine, slow_step_engine
from tests.live import live_app, real_models, role_cluster  # noqa: F401

GEN = "/v1/images/generations"
STEP_S = 0.02  # per decoding step: 64 steps, an image of >= 1.3 s
FULL_BATCH_TOKENS = 8 * 8 * 64  # eight jobs of eight candidates, 64 codes each


@pytest.fixture(scope="module")
def engine(real_models, one_thread):  # noqa: F811 - fixture
    return real_models.engine()


# --- the decoder -------------------------------------------------------------------------------


@pytest.mark.parametrize("guided", [False, True])
def test_rows_nobody_wants_leave_the_batch_and_the_others_decode_unchanged(engine, guided):
    decoder = engine.decoder
    idx, mask = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]])
    uncond = left_pad([[5], [5], [5]]) if guided else (None, None)
    params = SamplingParams(temperature=1.0, max_new_tokens=12,
                            guidance_scale=2.0 if guided else 1.0)
    widths: list[int] = []
    hook = decoder.register_forward_pre_hook(lambda m, args: widths.append(args[0].size(0)))

    def run(stopped: Callable[[], torch.Tensor | None] | None) -> torch.Tensor:
        widths.clear()
        return decoder.generate(idx, params, attention_mask=mask, uncond_idx=uncond[0],
                                uncond_mask=uncond[1], eos_id=None, stopped=stopped,
                                generator=[make_generator(s) for s in (1, 2, 3)])

    steps = iter(range(100))

    def second_row_goes_at_step_4() -> torch.Tensor | None:
        return torch.tensor([False, True, False]) if next(steps) >= 4 else None

    try:
        alone = run(None)
        shrunk = run(second_row_goes_at_step_4)
        shrunk_widths = list(widths)
        ended = run(lambda: torch.tensor([True, True, True]))
    finally:
        hook.remove()
    both = 2 if guided else 1
    # prefill, 4 steps of all three rows, then 7 of the two still wanted
    assert shrunk_widths == [3 * both] * 5 + [2 * both] * 7
    assert torch.equal(shrunk[[0, 2]], alone[[0, 2]])
    assert torch.equal(shrunk[1, :4], alone[1, :4]) and (shrunk[1, 4:] == PAD_ID).all()
    assert ended.size(1) == 0  # nobody left before the first token: no step at all


class StopAfter:
    """A job's stop flag that is set from its `n`-th question on (the engine asks once
    before decoding and then once per step)."""

    def __init__(self, n: int) -> None:
        self.n, self.asked = n, 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked >= self.n


def test_a_job_that_leaves_mid_decode_costs_its_batch_mates_nothing(engine):
    codes = np.arange(64).reshape(8, 8) % 16
    neighbours = [NeighbourDoc(0, 0.9, "a red square", engine.tokenizer.encode("a red square"),
                               codes)]

    def job(seed: int, stop=None) -> T2IJob:
        return T2IJob("a red square", neighbours, n=2, num_candidates=3,
                      sampling=RequestSampling(seed=seed, guidance_scale=2.0), stop=stop)

    assert engine._image_copy([job(1)], 3) is not None  # the copy processor shrinks too
    alone = engine.text_to_image([job(1)])[0]
    before = engine.tokens_generated
    rows: list[int] = []  # rows through each decoding step (the final norm sees (rows, C))
    hook = engine.decoder.ln_f.register_forward_pre_hook(
        lambda m, args: rows.append(args[0].size(0)) if args[0].dim() == 2 else None)
    try:
        together = engine.text_to_image([job(1), job(2, StopAfter(10))])
    finally:
        hook.remove()
    assert [g.codes.tolist() for g in together[0]] == [g.codes.tolist() for g in alone]
    assert together[1] == []  # nobody reads it
    # 3 rows ran 64 steps, the leaver's 3 rows 8 steps; each with its guidance row
    assert engine.tokens_generated - before == 3 * 64 + 3 * 8
    assert rows == [2 * 6] * 8 + [2 * 3] * 55


# --- the service: disconnects --------------------------------------------------------------


def metric(url: str, pattern: str) -> float:
    m = re.search("^" + pattern + r" (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def batches(url: str) -> tuple[float, float]:
    return (metric(url, r'racm3_batch_size_count\{queue="generate"\}'),
            metric(url, r'racm3_batch_size_sum\{queue="generate"\}'))


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def open_request(url: str, path: str, body: dict) -> socket.socket:
    """A POST sent on a raw socket, its answer never read: closing the socket is the
    client going away."""
    where = urlparse(url)
    sock = socket.create_connection((where.hostname, where.port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                 .encode() + data)
    return sock


def abandon_a_large_batch(url: str, worker: str) -> float:
    """A request keeps the engine busy while eight of eight candidates each queue behind
    it; once those eight run as one batch, all their clients leave. Returns how long the
    next request then took (for the log: timing is no test's pass or fail)."""
    plain = {"retrieval": {"enabled": False}, "retrieval_guidance": 0}
    count, jobs = batches(worker)
    tokens = metric(worker, "racm3_tokens_generated_total")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{url}{GEN}", timeout=60,
                            json={"prompt": "a red square", "seed": 0, **plain})
        wait_until(lambda: batches(worker) == (count + 1, jobs + 1))
        leavers = [open_request(url, GEN, {"prompt": f"a blue circle {i}", "seed": i, "n": 8,
                                           "num_candidates": 8, **plain}) for i in range(8)]
        wait_until(lambda: batches(worker) == (count + 2, jobs + 9))  # the eight run
        time.sleep(0.2)
        for sock in leavers:
            sock.close()
        start = time.monotonic()
        after = httpx.post(f"{url}{GEN}", timeout=60,
                           json={"prompt": "a green circle", "seed": 1, **plain})
        waited = time.monotonic() - start
        assert first.result().status_code == 200
    assert after.status_code == 200
    cancelled = r'racm3_jobs_cancelled_total\{queue="generate",when="%s"\}'
    wait_until(lambda: metric(worker, cancelled % "running") == 8)
    assert metric(worker, cancelled % "queued") == 0
    # The two requests served decoded their images whole; of the abandoned batch's 4,096
    # codes, only the steps before its clients left were sampled.
    spent = metric(worker, "racm3_tokens_generated_total") - tokens - 2 * 64
    assert 0 < spent < FULL_BATCH_TOKENS / 2, spent
    return waited


def test_a_batch_whose_clients_all_left_stops_and_the_next_request_is_served(real_models):  # noqa: F811
    engine = slow_step_engine(real_models.engine(), STEP_S)
    app = real_models.app(generator={"max_batch_size": 8, "queue_size": 16},
                          engine_factory=lambda settings: engine)
    with live_app(app) as server:
        waited = abandon_a_large_batch(server.url, server.url)
    print(f"embedded: next request served {waited:.2f} s after a batch's clients left")


@pytest.fixture(scope="module")
def cluster(real_models):  # noqa: F811 - fixture
    """Retriever, a slowed generator worker (batches of 8, 8 more queued) and a gateway."""
    engine = slow_step_engine(real_models.engine(), STEP_S)
    with role_cluster(real_models, engine, max_batch_size=8, queue_size=8,
                      max_wait_ms=0) as urls:
        yield urls


def test_through_the_gateway_a_batch_whose_clients_left_stops_on_the_worker(cluster):
    waited = abandon_a_large_batch(cluster["gateway"], cluster["generator"])
    print(f"multi-service: next request served {waited:.2f} s after a batch's clients left")


# --- the service: admission ------------------------------------------------------------------


def searches(url: str) -> float:
    return metric(url, r'racm3_memory_searches_total\{memory="default"\}')


def flood(url: str, n: int) -> list[httpx.Response]:
    def one(i: int) -> httpx.Response:
        return httpx.post(f"{url}{GEN}", timeout=60,
                          json={"prompt": f"a red square number {i}", "seed": i})

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_a_full_queue_answers_429_before_retrieving(real_models):  # noqa: F811
    app = real_models.app(generator={"max_batch_size": 1, "max_wait_ms": 0, "queue_size": 2},
                          engine_factory=lambda settings: SlowEngine(real_models.engine(), 0.3))
    with live_app(app) as server:
        before = searches(server.url)
        codes = [r.status_code for r in flood(server.url, 12)]
        assert set(codes) == {200, 429} and codes.count(429) >= 6, codes
        # only the admitted requests were retrieved for
        assert searches(server.url) - before == codes.count(200)


def test_through_the_gateway_full_workers_answer_429_before_retrieving(cluster):
    gateway, retriever = cluster["gateway"], cluster["retriever"]
    assert httpx.get(f"{gateway}/readyz").status_code == 200  # the worker takes 8 + 1
    before = searches(retriever)
    codes = [r.status_code for r in flood(gateway, 40)]
    assert set(codes) == {200, 429} and codes.count(429) >= 8, codes
    assert searches(retriever) - before == codes.count(200)
    # the gateway refused them all itself: the worker never had to
    assert metric(cluster["generator"], r'racm3_requests_total\{route="[^"]+",status="429"\}') == 0
