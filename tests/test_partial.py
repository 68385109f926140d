"""The decoder's step hook and the engine's partial images, on the smoke bundle's real
decoder and VQ (no server): a stopped row emits `<pad>` and ends the decode; partial
images follow the codes sampled so far; a stopped job leaves its batch-mates' output
exactly as it would be alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from model.decoder import left_pad
from model.jobs import SamplingParams as RequestSampling
from model.jobs import T2IJob
from model.partial import NEUTRAL_GRAY, partial_steps
from model.sampling import SamplingParams
from model.tokens import PAD_ID
from tests.live import real_models  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def engine(real_models, one_thread):  # noqa: F811 - fixture
    return real_models.engine()


class Sink:
    """A `Progress` that records what the engine reports (the service's is app/streaming)."""

    def __init__(self, partial_images: int, cancel_after: int | None = None) -> None:
        self.partial_images = partial_images
        self.images: list[tuple[int, np.ndarray]] = []
        self.counts: tuple[int, int, int] | None = None
        self.cancel_after = cancel_after
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def partial(self, index: int, image: np.ndarray) -> None:
        self.images.append((index, image))
        if self.cancel_after is not None and len(self.images) >= self.cancel_after:
            self._cancelled.set()

    def usage(self, text_tokens: int, image_tokens: int, output_tokens: int) -> None:
        self.counts = (text_tokens, image_tokens, output_tokens)


def test_partial_steps_are_evenly_spaced_and_before_the_end():
    assert partial_steps(64, 3) == [16, 32, 48]
    assert partial_steps(64, 2) == [21, 42]
    assert partial_steps(64, 0) == []
    assert partial_steps(2, 3) == [1]  # too few codes to space three


def test_a_stopped_row_pads_and_a_fully_stopped_batch_ends(engine):
    idx, mask = left_pad([[5, 6, 7], [8, 9]])
    seen: list[int] = []

    def hook(t: int, tokens: torch.Tensor) -> torch.Tensor | None:
        seen.append(tokens.size(1))
        if t == 2:
            return torch.tensor([True, False])
        if t == 5:
            return torch.tensor([False, True])
        return None

    params = SamplingParams(temperature=0.0, max_new_tokens=20)
    out = engine.decoder.generate(idx, params, attention_mask=mask, eos_id=None,
                                  step_hook=hook)
    assert out.shape == (2, 6)  # both stopped at step 5: no 20 steps
    assert (out[0, 3:] == PAD_ID).all() and (out[1, :6] != PAD_ID).all()
    assert seen == [1, 2, 3, 4, 5, 6]


def job(seed: int, progress=None) -> T2IJob:
    return T2IJob("a red square", [], n=1, num_candidates=2,
                  sampling=RequestSampling(seed=seed), progress=progress)


def test_partial_images_follow_the_codes_and_the_final_image_is_unchanged(engine):
    sink = Sink(partial_images=3)
    streamed = engine.text_to_image([job(3, sink)])[0][0]
    plain = engine.text_to_image([job(3)])[0][0]
    assert np.array_equal(streamed.codes, plain.codes)
    assert [i for i, _ in sink.images] == [0, 1, 2]
    h, w = engine.space.image_grid
    cell = engine.image_size // h
    for (i, image), done in zip(sink.images, (16, 32, 48), strict=True):
        gray = [(image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] == NEUTRAL_GRAY).all()
                for r in range(h) for c in range(w)]
        assert not any(gray[:done]) and all(gray[done:]), i
    text, image_tokens, output = sink.counts
    assert text > 0 and image_tokens == 0 and output == 64 * 2  # both candidates


def test_a_cancelled_job_stops_without_changing_its_batch_mates(engine):
    quitter = Sink(partial_images=3, cancel_after=1)
    alone = engine.text_to_image([job(7)])[0]
    before = engine.tokens_generated
    together = engine.text_to_image([job(7), job(8, quitter)])
    assert [g.codes.tolist() for g in together[0]] == [g.codes.tolist() for g in alone]
    assert len(quitter.images) == 1 and quitter.counts is None  # stopped: no usage
    # 2 rows ran 64 steps, the quitter's 2 rows ~17 before stopping: not 4 x 64
    assert engine.tokens_generated - before < 3 * 64
