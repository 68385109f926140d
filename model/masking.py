"""CM3 causal masking (Aghajanyan et al. 2022), and the infilling prompts it enables.

Training form. Inside the main document `[start, end)`:

- draw n ~ clamp(Poisson(1), 1, 16) non-overlapping spans, their boundaries uniform over
  the region (as CM3 does);
- replace span i, in order, with `<mask:i>`;
- append `<mask:i> + span i` for every i, in order, at the end of the document;
- a trailing `<eos>` stays the very last token.

    ids:    R R <brk> [a b c d e f g] <eos>        spans (3,5), (6,8)  (original coords)
    masked: R R <brk> [a <m0> d <m1> g] <m0> b c <m1> e f <eos>

The retrieved documents before `start` are never touched. Sentinel positions are flagged
so the loss can give them weight 0.

Inference form. Mask chosen runs (e.g. image code positions) and end the prompt with
`<mask:0>`; the decoder generates span 0, then `<mask:1>` is appended, and so on.
`InfillPrompt.splice` puts the generated spans back in place.

A typical training pipeline:

    a = assemble(retrieved, main)
    m = causal_mask(a.ids, rng, start=a.segments.index(SEG_MAIN))
    segments = m.carry(a.segments, fill=SEG_MAIN)
    weights = loss_weights(segments, m.ids, alpha, m.is_sentinel)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from model.tokens import EOS_ID, MASK_IDS, NUM_MASKS, mask_id

Span = tuple[int, int]  # half-open [start, end)
_MASK_INDEX = {m: i for i, m in enumerate(MASK_IDS)}


@dataclass
class MaskedSequence:
    """A causally masked sequence.

    `spans` are in the coordinates of the original sequence. `origin[t]` is the index in
    the original sequence that output token t came from, or -1 for a sentinel.
    """

    ids: list[int]
    spans: list[Span]
    is_sentinel: list[bool]
    origin: list[int]

    def carry(self, labels: Sequence[int], fill: int) -> list[int]:
        """Map per-token labels of the original sequence (e.g. segments) onto `ids`.

        Sentinels, which have no original token, get `fill`.
        """
        return [labels[o] if o >= 0 else fill for o in self.origin]


def _split_eos(ids: Sequence[int]) -> int:
    """Length of `ids` without a trailing `<eos>`."""
    return len(ids) - 1 if ids and ids[-1] == EOS_ID else len(ids)


def draw_spans(
    length: int,
    rng: np.random.Generator,
    max_spans: int = NUM_MASKS,
    max_span_len: int | None = None,
) -> list[Span]:
    """Draw CM3 spans inside `[0, length)`: sorted, non-empty, non-overlapping.

    n ~ clamp(Poisson(1), 1, max_spans), further capped by what fits: 2n distinct
    boundaries are drawn uniformly from the `length + 1` gaps and paired up, so spans
    never touch (two touching spans would just be one longer span).
    """
    if not 1 <= max_spans <= NUM_MASKS:
        raise ValueError(f"max_spans must be in [1, {NUM_MASKS}]")
    if length <= 0:
        return []
    n = int(np.clip(rng.poisson(1.0), 1, max_spans))
    n = min(n, (length + 1) // 2)
    cuts = np.sort(rng.choice(length + 1, size=2 * n, replace=False))
    spans = [(int(cuts[2 * i]), int(cuts[2 * i + 1])) for i in range(n)]
    if max_span_len is not None:
        if max_span_len < 1:
            raise ValueError("max_span_len must be >= 1")
        spans = [(s, min(e, s + max_span_len)) for s, e in spans]
    return spans


def apply_spans(ids: Sequence[int], spans: Sequence[Span]) -> MaskedSequence:
    """Mask the given spans (sorted, non-overlapping, original coords) in CM3 form."""
    ids = [int(t) for t in ids]
    limit = _split_eos(ids)
    _check_spans(spans, 0, limit, allow_empty=False)
    out: list[int] = []
    origin: list[int] = []
    cursor = 0
    for i, (s, e) in enumerate(spans):
        out += ids[cursor:s]
        origin += range(cursor, s)
        out.append(mask_id(i))
        origin.append(-1)
        cursor = e
    out += ids[cursor:limit]
    origin += range(cursor, limit)
    for i, (s, e) in enumerate(spans):
        out += [mask_id(i), *ids[s:e]]
        origin += [-1, *range(s, e)]
    if limit < len(ids):
        out.append(EOS_ID)
        origin.append(limit)
    return MaskedSequence(
        ids=out, spans=list(spans), is_sentinel=[o < 0 for o in origin], origin=origin
    )


def causal_mask(
    ids: Sequence[int],
    rng: np.random.Generator,
    start: int = 0,
    end: int | None = None,
    max_spans: int = NUM_MASKS,
    max_span_len: int | None = None,
) -> MaskedSequence:
    """CM3 causal masking of the main document `ids[start:end]`.

    `end` defaults to the end of `ids`; a trailing `<eos>` is never part of the region.
    An empty region gives the sequence back unmasked (no spans). Same rng state, same
    result.
    """
    ids = [int(t) for t in ids]
    limit = _split_eos(ids)
    end = limit if end is None else min(end, limit)
    if not 0 <= start <= end:
        raise ValueError(f"bad region [{start}, {end}) for a sequence of {len(ids)}")
    region = ids[start:end]
    # unmask finds spans by their sentinels, so the region must not already hold any,
    # nor an <eos> that could be mistaken for the trailing one
    if any(t in _MASK_INDEX or t == EOS_ID for t in region):
        raise ValueError("the masked region already contains a sentinel or <eos>")
    spans = draw_spans(end - start, rng, max_spans, max_span_len)
    return apply_spans(ids, [(s + start, e + start) for s, e in spans])


def splice(template: Sequence[int], spans: Sequence[Sequence[int]]) -> list[int]:
    """Replace the placeholder `<mask:i>` in `template` with `spans[i]`, for every i.

    `template` holds exactly one `<mask:i>` for i < len(spans), in order.
    """
    out: list[int] = []
    expected = 0
    for t in template:
        t = int(t)
        if t in _MASK_INDEX:
            if _MASK_INDEX[t] != expected or expected >= len(spans):
                raise ValueError(f"unexpected <mask:{_MASK_INDEX[t]}> in template")
            out += [int(x) for x in spans[expected]]
            expected += 1
        else:
            out.append(t)
    if expected != len(spans):
        raise ValueError(f"template has {expected} placeholders, got {len(spans)} spans")
    return out


def _split_masked(masked_ids: Sequence[int]) -> tuple[list[int], list[list[int]], bool]:
    """Split a CM3 sequence into (template with placeholders, appended spans, has_eos).

    The appended part starts at the second `<mask:0>`; a trailing `<eos>` is not part of
    the last span.
    """
    ids = [int(t) for t in masked_ids]
    zero = MASK_IDS[0]
    firsts = [i for i, t in enumerate(ids) if t == zero]
    if len(firsts) < 2:
        raise ValueError("not a masked sequence: <mask:0> must appear twice")
    tail_start = firsts[1]
    limit = _split_eos(ids)
    template = ids[:tail_start]
    spans: list[list[int]] = []
    for t in ids[tail_start:limit]:
        if t in _MASK_INDEX:
            if _MASK_INDEX[t] != len(spans):
                raise ValueError(f"appended sentinels out of order at <mask:{_MASK_INDEX[t]}>")
            spans.append([])
        else:
            spans[-1].append(t)
    return template, spans, limit < len(ids)


def unmask(masked_ids: Sequence[int]) -> list[int]:
    """Invert `causal_mask`: put every appended span back in place of its sentinel."""
    template, spans, has_eos = _split_masked(masked_ids)
    out = splice(template, spans)
    return [*out, EOS_ID] if has_eos else out


def contiguous_runs(positions: Iterable[int]) -> list[Span]:
    """Group positions into sorted maximal runs: {3, 4, 5, 9} -> [(3, 6), (9, 10)]."""
    runs: list[Span] = []
    for p in sorted({int(p) for p in positions}):
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


@dataclass
class InfillPrompt:
    """The inference form of infilling.

    `template` is the document with each run replaced by `<mask:i>` (no `<eos>`); `ids`
    is the first prompt, `template + <mask:0>`. `runs` are the masked runs in original
    coordinates; `run_lengths` tells a constrained decoder how many tokens each span needs
    when they must keep their length (image codes).
    """

    template: list[int]
    runs: list[Span]
    has_eos: bool

    @property
    def ids(self) -> list[int]:
        return self.prompt_for([])

    @property
    def run_lengths(self) -> list[int]:
        return [e - s for s, e in self.runs]

    def prompt_for(self, generated: Sequence[Sequence[int]]) -> list[int]:
        """Prompt that asks for span `len(generated)` once spans 0..k-1 are generated."""
        k = len(generated)
        if k >= len(self.runs):
            raise ValueError(f"all {len(self.runs)} spans are already generated")
        out = list(self.template)
        for i, span in enumerate(generated):
            out += [mask_id(i), *(int(t) for t in span)]
        out.append(mask_id(k))
        return out

    def splice(self, spans: Sequence[Sequence[int]]) -> list[int]:
        """The completed document: each run replaced by its generated span."""
        out = splice(self.template, spans)
        return [*out, EOS_ID] if self.has_eos else out


def infill_prompt_from_runs(ids: Sequence[int], runs: Sequence[Span]) -> InfillPrompt:
    """Infilling prompt for sorted, non-overlapping runs.

    A run may be empty (s == e): that inserts a sentinel without removing anything, as in
    captioning an image-only document, `<img alt="<mask:0>" src="..."><mask:0>`.
    """
    ids = [int(t) for t in ids]
    limit = _split_eos(ids)
    if not runs:
        raise ValueError("nothing to infill: no runs")
    if len(runs) > NUM_MASKS:
        raise ValueError(f"{len(runs)} runs; at most {NUM_MASKS} sentinels exist")
    _check_spans(runs, 0, limit, allow_empty=True)
    template: list[int] = []
    cursor = 0
    for i, (s, e) in enumerate(runs):
        template += [*ids[cursor:s], mask_id(i)]
        cursor = e
    template += ids[cursor:limit]
    return InfillPrompt(template=template, runs=list(runs), has_eos=limit < len(ids))


def infill_prompt(ids: Sequence[int], positions: Iterable[int]) -> InfillPrompt:
    """Infilling prompt masking `positions` (grouped into contiguous runs, at most 16)."""
    return infill_prompt_from_runs(ids, contiguous_runs(positions))


def _check_spans(spans: Sequence[Span], lo: int, hi: int, allow_empty: bool) -> None:
    if len(spans) > NUM_MASKS:
        raise ValueError(f"{len(spans)} spans; at most {NUM_MASKS} sentinels exist")
    prev = lo
    for s, e in spans:
        if s < prev or e > hi or e < s or (e == s and not allow_empty):
            raise ValueError(f"spans must be sorted, non-overlapping, inside [{lo}, {hi})")
        prev = e
