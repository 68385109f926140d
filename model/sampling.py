"""Sampling, kept apart from the model: logits in, token ids out.

- `SamplingParams` carries one request's decoding settings.
- `sample` turns a (B, V) batch of next-token logits into (B,) ids: temperature, then
  top-k, then top-p (the order HF and TGI use), then a draw from a per-request
  `torch.Generator`, so the same seed gives the same tokens.
- `cfg_combine` is CM3Leon-style classifier-free guidance on logits.
- Constraints are logit masks driven by a small state machine over the token space
  (model/tokens.py): `ModalityConstraint` keeps text in `alt` and exactly
  `space.image_len` codes in `src`; `SpanConstraint` drives CM3 infilling, one
  `<mask:i>` span after another. A decoding loop asks each row's constraint for
  `allowed_mask(device)`, masks the logits, samples, and calls `advance(token)`.
- A `LogitsProcessor` rewrites the masked (B, V) logits of a whole batch before the
  draw (retrieval-guided decoding, model/retrieval_guidance.py) and is told the drawn
  tokens.
"""

from __future__ import annotations

import enum
import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from model.tokens import (
    BREAK_ID,
    EOS_ID,
    IMG_CLOSE_ID,
    IMG_OPEN_ID,
    MASK_IDS,
    NUM_MASKS,
    NUM_SPECIAL,
    PAD_ID,
    SRC_ID,
    TokenSpace,
    mask_id,
)

Generators = torch.Generator | Sequence[torch.Generator] | None


SEED_LIMIT = 2**31  # drawn seeds stay below it, so JSON clients that parse doubles keep them


def draw_seed() -> int:
    """A fresh per-request seed, for a request that did not bring one."""
    return secrets.randbelow(SEED_LIMIT)


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings: what a client asks for (a job's `sampling`) and
    what the decoding loop reads (`CM3Decoder.generate`), one type for both.

    `top_k` None and `top_p` None (no filter, as a client says it) are stored as 0 and
    1.0; `max_new_tokens` is the engine's to set for the task (`dataclasses.replace`).
    """

    temperature: float = 1.0  # 0 means greedy (argmax); no generator is consumed then
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables nucleus sampling
    seed: int | None = None  # None draws from torch's global RNG; see `with_seed`
    max_new_tokens: int = 128
    guidance_scale: float = 1.0  # classifier-free guidance; 1.0 means cond logits only

    def __post_init__(self) -> None:
        if self.top_k is None:
            object.__setattr__(self, "top_k", 0)
        if self.top_p is None:
            object.__setattr__(self, "top_p", 1.0)
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.guidance_scale < 0:
            raise ValueError("guidance_scale must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_seed(self) -> SamplingParams:
        """A copy with a concrete seed, so a response can report the seed it used."""
        return self if self.seed is not None else replace(self, seed=draw_seed())


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on the logits' device: torch.multinomial refuses a CPU generator for CUDA."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


MIN_TEMPERATURE = 1e-4


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError("temperature must be > 0 here; temperature 0 is greedy, see `sample`")
    # Below this a division turns logits into ±inf and the softmax into NaN; sampling at
    # 1e-4 is already argmax for any logits a model produces.
    return logits if temperature == 1.0 else logits / max(temperature, MIN_TEMPERATURE)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept too)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the minimal nucleus: the fewest top tokens whose probability sums to >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # the top token always has 0 before it
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # a p too small for float32 (1e-300 is 0) keeps the top token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, params: SamplingParams, generator: Generators = None) -> Tensor:
    """(B, V) logits -> (B,) token ids.

    `generator` is one generator for the whole batch or one per row (a batch that mixes
    requests with different seeds); None uses torch's global RNG.
    """
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_p(apply_top_k(logits, params.top_k), params.top_p)
    probs = logits.softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if len(generator) != probs.size(0):
        raise ValueError(f"{len(generator)} generators for {probs.size(0)} rows")
    # torch.multinomial draws one sample as argmax(p / q), q ~ Exp(1) from its generator.
    # Drawing each row's q from that row's generator and taking one argmax over the batch
    # gives exactly its tokens, without a multinomial call (and its checks) per row.
    q = torch.empty_like(probs)
    for row, g in zip(q, generator, strict=True):
        row.exponential_(generator=g)
    return (probs / q).argmax(dim=-1)


def cfg_combine(cond_logits: Tensor, uncond_logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: uncond + s·(cond − uncond); s = 1 returns cond."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


class LogitsProcessor(Protocol):
    """Rewrites a batch's next-token logits after guidance and constraints."""

    def __call__(self, logits: Tensor) -> Tensor: ...  # (B, V) -> (B, V)

    def advance(self, tokens: Tensor) -> None: ...  # (B,) the tokens just drawn

    # Optional, `select(rows)`: keep only those rows' state, in that order (the others left
    # the batch). The decoder shrinks a batch only with processors that have it.


# --- constraints ----------------------------------------------------------------------


class Constraint(Protocol):
    """One row's allowed next tokens. `advance` is told every token the row emits."""

    def allowed_mask(self, device: torch.device | str) -> Tensor: ...

    def advance(self, token: int) -> None: ...


@functools.lru_cache(maxsize=512)
def _token_mask(
    space: TokenSpace,
    vocab_size: int,
    device: str,
    text: bool = False,
    image: bool = False,
    extra: tuple[int, ...] = (),
) -> Tensor:
    # Masks are built once per (kind, device) and shared: callers must not write to them.
    if vocab_size < space.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < token space size {space.vocab_size}")
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    if text:
        mask[space.text_offset : space.image_offset] = True
    if image:
        mask[space.image_offset : space.vocab_size] = True
    mask[list(extra)] = True
    return mask.to(device)


def _all_but_pad(space: TokenSpace, vocab_size: int, device: str) -> Tensor:
    specials = tuple(i for i in range(NUM_SPECIAL) if i != PAD_ID)
    return _token_mask(space, vocab_size, device, True, True, specials)


def batch_allowed_mask(
    constraints: Sequence[Constraint | None],
    vocab_size: int,
    device: torch.device | str,
) -> Tensor:
    """(B, V) bool mask from one constraint per row; a None row allows everything."""
    everything = None
    if any(c is None for c in constraints):
        everything = torch.ones(vocab_size, dtype=torch.bool, device=device)
    return torch.stack(
        [everything if c is None else c.allowed_mask(device) for c in constraints]
    )


class DocState(enum.Enum):
    START = "start"  # a new document must open: only `<img alt="`
    ALT = "alt"  # caption text, closed by `" src="`
    SRC = "src"  # exactly image_len codes, then `">`
    AFTER_DOC = "after_doc"  # `<eos>`, `<break>` or the next `<img alt="`
    FREE = "free"  # unknown (after a sentinel outside alt): anything but `<pad>`
    DONE = "done"  # after `<eos>`


class ModalityConstraint:
    """Keeps decoding inside the `<img alt="[text]" src="[image]">` grammar.

    Inside `alt` only text or `" src="`; inside `src` only image codes until exactly
    `space.image_len` of them, then `">` is forced; after `">` a document may end
    (`<eos>`), be followed by `<break>`, or by the next `<img alt="`.

    Start it in any state, e.g. `ModalityConstraint(space, DocState.SRC, codes_emitted=m)`
    for "inside src with m codes already emitted", or replay a prompt with `from_prompt`.
    """

    def __init__(
        self,
        space: TokenSpace,
        state: DocState = DocState.START,
        codes_emitted: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        if not 0 <= codes_emitted <= space.image_len:
            raise ValueError(f"codes_emitted must be in [0, {space.image_len}]")
        self.space = space
        self.vocab_size = vocab_size or space.padded_vocab_size
        self.state = state
        self.codes_emitted = codes_emitted

    @classmethod
    def from_prompt(
        cls, space: TokenSpace, prompt_ids: Sequence[int], vocab_size: int | None = None
    ) -> ModalityConstraint:
        """The state after reading `prompt_ids` (retrieved docs, breaks, sentinels allowed)."""
        c = cls(space, DocState.FREE, vocab_size=vocab_size)
        for t in prompt_ids:
            c.advance(int(t))
        return c

    @property
    def done(self) -> bool:
        return self.state is DocState.DONE

    def allowed_mask(self, device: torch.device | str) -> Tensor:
        s, v, dev = self.space, self.vocab_size, str(device)
        if self.state is DocState.START:
            return _token_mask(s, v, dev, extra=(IMG_OPEN_ID,))
        if self.state is DocState.ALT:
            return _token_mask(s, v, dev, text=True, extra=(SRC_ID,))
        if self.state is DocState.SRC:
            if self.codes_emitted < s.image_len:
                return _token_mask(s, v, dev, image=True)
            return _token_mask(s, v, dev, extra=(IMG_CLOSE_ID,))
        if self.state is DocState.AFTER_DOC:
            return _token_mask(s, v, dev, extra=(EOS_ID, BREAK_ID, IMG_OPEN_ID))
        if self.state is DocState.DONE:
            return _token_mask(s, v, dev, extra=(EOS_ID,))
        return _all_but_pad(s, v, dev)

    def advance(self, token: int) -> None:
        if token == PAD_ID or self.state is DocState.DONE:
            return
        if token == IMG_OPEN_ID:
            self.state = DocState.ALT
        elif token == SRC_ID:
            self.state, self.codes_emitted = DocState.SRC, 0
        elif token == IMG_CLOSE_ID:
            self.state = DocState.AFTER_DOC
        elif token == BREAK_ID:
            self.state = DocState.START
        elif token == EOS_ID:
            self.state = DocState.DONE
        elif token in MASK_IDS:
            # A sentinel inside alt stands in for caption text; anywhere else it hides a
            # span of unknown length and modality, so stop constraining until the markup
            # tells us where we are again.
            if self.state is not DocState.ALT:
                self.state = DocState.FREE
        elif self.space.is_image(token) and self.state is DocState.SRC:
            self.codes_emitted = min(self.codes_emitted + 1, self.space.image_len)


@dataclass(frozen=True)
class InfillSpan:
    """One masked span to fill: its modality and, for images, its exact length in codes."""

    modality: Literal["image", "text"]
    length: int | None = None  # required for images; None lets a text span end itself

    def __post_init__(self) -> None:
        if self.modality not in ("image", "text"):
            raise ValueError(f"unknown span modality {self.modality!r}")
        if self.modality == "image" and self.length is None:
            raise ValueError("an image span needs its length in codes")
        if self.length is not None and self.length < 1:
            raise ValueError("span length must be >= 1")


class SpanConstraint:
    """CM3 infilling: after `<mask:i>` emit span i, then force `<mask:i+1>` (or `<eos>`).

    Span i is introduced by `<mask:first_mask + i>`. By default the prompt already ends
    with the first sentinel; pass `expect_sentinel=True` to have it forced first. Image
    spans get exactly `length` image codes; text spans get text tokens (exactly `length`
    of them, or at least one when `length` is None) before their terminator.
    """

    def __init__(
        self,
        space: TokenSpace,
        spans: Sequence[InfillSpan],
        *,
        first_mask: int = 0,
        span_index: int = 0,
        emitted: int = 0,
        expect_sentinel: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        if not spans:
            raise ValueError("SpanConstraint needs at least one span")
        if first_mask + len(spans) > NUM_MASKS:
            raise ValueError(f"at most {NUM_MASKS} sentinels")
        self.space = space
        self.spans = tuple(spans)
        self.first_mask = first_mask
        self.vocab_size = vocab_size or space.padded_vocab_size
        self.span_index = span_index
        self.emitted = emitted
        self.expect_sentinel = expect_sentinel

    @classmethod
    def image_runs(
        cls, space: TokenSpace, run_lengths: Sequence[int], **kwargs: Any
    ) -> SpanConstraint:
        """Infill image runs, e.g. `InfillPrompt.run_lengths` from model/masking.py."""
        return cls(space, [InfillSpan("image", n) for n in run_lengths], **kwargs)

    @property
    def done(self) -> bool:
        return self.span_index >= len(self.spans)

    def _terminator(self) -> int:
        nxt = self.span_index + 1
        return mask_id(self.first_mask + nxt) if nxt < len(self.spans) else EOS_ID

    def _may_end(self) -> bool:
        span = self.spans[self.span_index]
        return self.emitted == span.length if span.length is not None else self.emitted >= 1

    def _must_end(self) -> bool:
        span = self.spans[self.span_index]
        return span.length is not None and self.emitted >= span.length

    def allowed_mask(self, device: torch.device | str) -> Tensor:
        s, v, dev = self.space, self.vocab_size, str(device)
        if self.done:
            return _token_mask(s, v, dev, extra=(EOS_ID,))
        if self.expect_sentinel:
            return _token_mask(s, v, dev, extra=(mask_id(self.first_mask + self.span_index),))
        if self._must_end():
            return _token_mask(s, v, dev, extra=(self._terminator(),))
        ends = (self._terminator(),) if self._may_end() else ()
        is_text = self.spans[self.span_index].modality == "text"
        return _token_mask(s, v, dev, text=is_text, image=not is_text, extra=ends)

    def advance(self, token: int) -> None:
        if token == PAD_ID or self.done:
            return
        if self.expect_sentinel:
            self.expect_sentinel = False
        elif token == self._terminator():
            self.span_index, self.emitted = self.span_index + 1, 0
        else:
            self.emitted += 1
