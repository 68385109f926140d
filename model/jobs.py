"""What the generator worker asks of the generation engine (`model/engine.py`).

Every task method takes a *list* of jobs and returns one result per job, in order: the
worker's dynamic batcher hands the engine whatever arrived together, so the engine can
prefill and decode them as one batch.

Conventions (numpy uint8 (H, W, 3) at I/O edges):
- every image handed to the engine is already resized to `info()["image_size"]`;
- an infill mask is (H, W) bool at that size, True = regenerate;
- neighbours are the retrieved documents exactly as the memory stores them (the retriever
  passes `text_ids` / `image_codes` through verbatim), best first;
- a job's `sampling` (`model.sampling.SamplingParams`) always has its seed set (the
  gateway draws one with `draw_seed` when the client did not), and the same seed with
  the same inputs gives the same output;
- `examples` are user-given documents, placed in context before the neighbours, in the
  same layout;
- a job with `progress` is streamed: the engine reports partial images to it and stops
  the job once it is cancelled; its result is then never read;
- a job's `stop` flag is set once nobody wants its result (the client went away, or it
  timed out): the engine drops the job's rows from the batch between two decoding
  steps, and the job's result (an empty list) is never read;
- `Engine.fit(task, job)` is asked before a job joins a batch: it raises `Unfit` for a
  job the engine cannot run (a prompt that does not fit the decoder's window, sampling
  values it cannot represent), so that job is refused alone, as a client error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from model.sampling import SamplingParams


class Unfit(ValueError):
    """A job the engine cannot run as asked (`Engine.fit`); `param` names the request
    field at fault, `code` says how."""

    def __init__(self, message: str, param: str | None = None,
                 code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class StopFlag(Protocol):
    """Set once nobody wants a job's result (a `threading.Event` is one)."""

    def is_set(self) -> bool: ...


@dataclass
class NeighbourDoc:
    """One retrieved document, as the retriever returns it."""

    id: int
    score: float
    caption: str | None = None
    text_ids: list[int] | None = None
    image_codes: np.ndarray | None = None  # (h, w) int VQ codes, raster order
    # (D,) float32: the CLIP image vector of the codes' VQ reconstruction, as the memory
    # stores it; None: the reranker computes it (`Engine.rerank_scores`)
    image_vector: np.ndarray | None = None
    thumbnail_png: bytes | None = None  # the stored image, only when asked for
    # How the caption matches the query's words (text queries; None when unknown).
    # `score` stays the CLIP score in either retrieval mode.
    lexical_score: float | None = None  # BM25 of the caption for the query
    name_match: bool | None = None  # the caption holds every rare word (name) of the query


@dataclass
class FewShotExample:
    """A user-given document (image + caption) placed in context."""

    image: np.ndarray  # (H, W, 3) uint8
    caption: str


class Progress(Protocol):
    """Where a streamed job's progress goes. The engine calls it from its own thread."""

    @property
    def partial_images(self) -> int:
        """How many partial images to report while decoding (0-3)."""
        ...

    @property
    def cancelled(self) -> bool:
        """True once nobody wants the result: the engine stops decoding the job."""
        ...

    def partial(self, index: int, image: np.ndarray) -> None:
        """Partial image `index`: (H, W, 3) uint8, cells not yet generated in gray."""
        ...

    def usage(self, text_tokens: int, image_tokens: int, output_tokens: int) -> None:
        """The job's prompt tokens (text, image) and the tokens sampled for it."""
        ...


@dataclass
class T2IJob:
    prompt: str
    neighbours: list[NeighbourDoc]
    n: int
    num_candidates: int  # sample this many, keep the best `n` by CLIP score
    sampling: SamplingParams
    # Demonstrations: documents in context before the neighbours (controlled generation).
    examples: list[FewShotExample] = field(default_factory=list)
    progress: Progress | None = None  # set for a streamed job
    # Weight of the relevant neighbours' codes mixed into sampling (retrieval-guided
    # decoding); 0: the paper's decoding; None: the engine's default.
    retrieval_guidance: float | None = None
    stop: StopFlag | None = None  # set: nobody wants the result any more


@dataclass
class CaptionJob:
    image: np.ndarray  # (H, W, 3) uint8
    neighbours: list[NeighbourDoc]
    n: int
    num_candidates: int  # sample this many, keep the best `n` by likelihood
    sampling: SamplingParams
    examples: list[FewShotExample] = field(default_factory=list)
    # Weight of the pointer to names in neighbours whose image matches; 0: the paper's
    # decoding; None: the engine's default.
    retrieval_guidance: float | None = None
    stop: StopFlag | None = None  # set: nobody wants the result any more


@dataclass
class InfillJob:
    """Infilling and editing: tokens outside the mask are kept exactly."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, True = regenerate
    prompt: str | None
    neighbours: list[NeighbourDoc]
    n: int
    num_candidates: int
    sampling: SamplingParams
    examples: list[FewShotExample] = field(default_factory=list)
    progress: Progress | None = None  # set for a streamed job
    stop: StopFlag | None = None  # set: nobody wants the result any more


@dataclass
class ClassifyJob:
    image: np.ndarray  # (H, W, 3) uint8
    labels: list[str]
    neighbours: list[NeighbourDoc]
    examples: list[FewShotExample] = field(default_factory=list)
    stop: StopFlag | None = None  # set: nobody wants the result any more


@dataclass
class GeneratedImage:
    image: np.ndarray  # (H, W, 3) uint8
    score: float  # CLIP score against the prompt (for infill without a prompt: the engine's choice)
    codes: np.ndarray  # (h, w) int VQ codes


@dataclass
class GeneratedCaption:
    text: str
    logprob: float  # total log-likelihood of the caption tokens


@dataclass
class ClassifyResult:
    label: str
    scores: dict[str, float]  # label -> probability, summing to 1


@runtime_checkable
class Engine(Protocol):
    """The generation engine. Methods are synchronous: the worker runs them on one thread."""

    def text_to_image(self, jobs: list[T2IJob]) -> list[list[GeneratedImage]]: ...

    def caption(self, jobs: list[CaptionJob]) -> list[list[GeneratedCaption]]: ...

    def infill(self, jobs: list[InfillJob]) -> list[list[GeneratedImage]]: ...

    def classify(self, jobs: list[ClassifyJob]) -> list[ClassifyResult]: ...

    def fit(self, task: str, job: Any) -> None:
        """Raise `Unfit` when a job of `task` (a method's name above) cannot run: asked
        before the job joins a batch, so that it fails alone."""
        ...

    def warmup(self) -> None:
        """Run one small generation so the first request pays no start-up cost."""
        ...

    def info(self) -> dict[str, Any]:
        """At least `image_size` [H, W] and `grid` [h, w]; plus the bundle manifest and
        `window`: the decoder's window and what fits in it (`max_k`, `max_prompt_tokens`)."""
        ...

    @property
    def tokens_generated(self) -> int:
        """Tokens sampled since start, a monotonically increasing counter (for metrics)."""
        ...
