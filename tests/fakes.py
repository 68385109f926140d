"""The one stand-in the service tests still need: the real engine, made slow on purpose.

Why it cannot simply be the real engine: the overload (429), timeout (504) and
client-disconnect tests need every engine call to take a known, long-enough time, so
that a queue fills or a client gives up before its job runs. The smoke model answers in
0.05-0.5 s depending on how loaded the shared CPU is, which would make those tests
flaky in both directions. `SlowEngine` sleeps a fixed time per batch and then runs the
real RA-CM3 engine, so every output is still the real one; it also records each batch's
(task, size), so a test can see which jobs ran and how they were batched.
"""

from __future__ import annotations

import time
from typing import Any

from model.jobs import (
    CaptionJob,
    ClassifyJob,
    ClassifyResult,
    Engine,
    GeneratedCaption,
    GeneratedImage,
    InfillJob,
    T2IJob,
)


class SlowEngine:
    """The real engine plus `delay_s` of sleep per batch (a stand-in for a bigger model)."""

    def __init__(self, engine: Engine, delay_s: float) -> None:
        self.engine = engine
        self.delay_s = delay_s
        self.batches: list[tuple[str, int]] = []

    def _batch(self, task: str, n: int) -> None:
        self.batches.append((task, n))
        time.sleep(self.delay_s)

    @property
    def tokens_generated(self) -> int:
        return self.engine.tokens_generated

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def warmup(self) -> None:
        self.engine.warmup()

    def fit(self, task: str, job: Any) -> None:
        self.engine.fit(task, job)

    def text_to_image(self, jobs: list[T2IJob]) -> list[list[GeneratedImage]]:
        self._batch("text_to_image", len(jobs))
        return self.engine.text_to_image(jobs)

    def caption(self, jobs: list[CaptionJob]) -> list[list[GeneratedCaption]]:
        self._batch("caption", len(jobs))
        return self.engine.caption(jobs)

    def infill(self, jobs: list[InfillJob]) -> list[list[GeneratedImage]]:
        self._batch("infill", len(jobs))
        return self.engine.infill(jobs)

    def classify(self, jobs: list[ClassifyJob]) -> list[ClassifyResult]:
        self._batch("classify", len(jobs))
        return self.engine.classify(jobs)


def slow_step_engine(engine: Any, delay_s: float) -> Any:
    """The real engine on a copy of its decoder that sleeps `delay_s` in each forward
    pass, i.e. per decoding step (the shared engine is left untouched). The sleep hangs on
    the final norm, which every pass runs once: the plain path's `forward` and the fast
    path's static step alike (model/compiled_decode.py), the latter never calling the
    decoder's `forward`.

    Why: streaming tests need an image that takes seconds to decode, as a real-size model's
    does, so that partial images arrive visibly before the final one and a client can
    leave halfway; the smoke decoder finishes an image in a fraction of a second. Every
    token is still the real decoder's.
    """
    import copy

    from model.engine import Engine

    decoder = copy.deepcopy(engine.decoder)
    decoder.ln_f.register_forward_pre_hook(lambda module, args: time.sleep(delay_s))
    return Engine(decoder, engine.space, engine.tokenizer, engine.vq, engine.clip,
                  manifest=engine.manifest, image_size=engine.image_size,
                  device=engine.device, name=engine.name)
