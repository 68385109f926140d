"""The engine's decoding fast path, and the switch that turns it off.

`FastDecode` puts together:
- shared prefill: each distinct prompt of a batch is prefilled once and its KV copied
  to all its rows (a job's candidates; every guidance row gets the one unconditional
  prompt, in a cache of its group's own width, not padded to the longest prompt);
- the cross-request prefix cache of documents' KV (model/prefix_cache.py);
- the static decode step (model/compiled_decode.py), compiled at warm-up where that
  measured faster.

`FastDecodeOptions(enabled=False)` is the plain path: every row, guidance rows included,
prefilled in one left-padded batch, and a cached forward per step. The service
benchmark measures one against the other in the same run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model.compiled_decode import (
    CompileMode,
    DecodeState,
    GroupBuffers,
    RowGroup,
    StepRunner,
    allocate_buffers,
    len_bucket,
    pow2_bucket,
    run_step,
)
from model.decoder import CM3Decoder, Prefilled
from model.prefix_cache import PrefixCache, SegmentKV, prefill_prompt, write_segments

log = logging.getLogger(__name__)

DEFAULT_PREFIX_CACHE_BYTES = 128 * 1024 * 1024
UNCOND_LEN = 3  # `<img alt="<mask:0>" src="`: the unconditional t2i prompt
WarmupShape = tuple[int, int, int, bool, int]


@dataclass(frozen=True)
class FastDecodeOptions:
    enabled: bool = True  # False: the plain path (the benchmark's baseline)
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES  # 0: no cross-request cache
    # the decode step under torch.compile: "auto" on CUDA only, "on" also on the CPU
    # (where each shape is kept compiled only if warm-up measured it faster), "off" never
    # (see `StepRunner`)
    compile: CompileMode = "auto"
    # Batches to compile the step for at warm-up: (jobs, candidates per job, prompt
    # length, guided, new tokens). Other shapes run the same step eagerly.
    warmup_shapes: tuple[WarmupShape, ...] = ()


class RowStep:
    """`Prefilled.step` for a `DecodeState` whose rows may include padding."""

    def __init__(self, runner: StepRunner, real_rows: Tensor | None) -> None:
        self.runner = runner
        self.real_rows = real_rows  # (rows,) where generate's rows sit; None: all, in order

    def select(self, state: DecodeState, rows: Tensor) -> tuple[DecodeState, RowStep]:
        """`Prefilled.select`: the state of `rows` (generate's rows, ascending) alone, and
        the step that decodes it. Padding rows go too; the new state has none."""
        kept = rows.to(state.next_pos.device)
        if self.real_rows is not None:
            kept = self.real_rows.index_select(0, kept)
        groups, start = [], 0
        for g in state.groups:
            mine = kept[(kept >= start) & (kept < start + g.rows)] - start
            if mine.numel():
                groups.append(RowGroup([k.index_select(0, mine) for k in g.k],
                                       [v.index_select(0, mine) for v in g.v],
                                       g.mask.index_select(0, mine), g.prompt_len))
            start += g.rows
        smaller = DecodeState(groups, state.next_pos.index_select(0, kept),
                              state.code_run.index_select(0, kept), state.max_new,
                              state.length, eager_only=True)
        return smaller, RowStep(self.runner, None)

    def __call__(self, model: CM3Decoder, idx: Tensor, state: DecodeState) -> Tensor:
        tok = idx[:, 0]
        if self.real_rows is not None:
            tok = tok.new_zeros(state.rows).index_copy_(0, self.real_rows, tok)
        logits = run_step(self.runner.step_fn(state), model, tok, state, self.runner.weights)
        if self.real_rows is not None:
            return logits.index_select(0, self.real_rows)[:, None]
        return logits[:, None]


def _fill_group(buffers: GroupBuffers, prompts: Sequence[Sequence[SegmentKV]],
                row_prompt: Sequence[int], prompt_len: int) -> RowGroup:
    """Rows reading prompts[row_prompt[r]], left-padded to `prompt_len`, in zeroed buffers
    with room for the tokens to come (and padding rows beyond `row_prompt`)."""
    k, v, mask = buffers
    for p, rows in _runs(row_prompt):
        n = prompts[p][-1].end
        write_segments(k, v, rows, prompts[p], offset=prompt_len - n)
        mask[rows, prompt_len - n : prompt_len] = True
    # padding rows see one zero slot, so their attention stays finite
    mask[len(row_prompt):, prompt_len - 1] = True
    dense = len(row_prompt) == mask.size(0) and all(
        prompts[p][-1].end == prompt_len for p in row_prompt)
    return RowGroup(k, v, mask, prompt_len, dense)


def _runs(row_prompt: Sequence[int]) -> list[tuple[int, slice]]:
    """Maximal runs of rows reading the same prompt, as (prompt, rows)."""
    runs: list[tuple[int, slice]] = []
    start = 0
    for r in range(1, len(row_prompt) + 1):
        if r == len(row_prompt) or row_prompt[r] != row_prompt[start]:
            runs.append((row_prompt[start], slice(start, r)))
            start = r
    return runs


def build_state(
    model: CM3Decoder,
    prompt_kv: Sequence[Sequence[SegmentKV]],
    streams: Sequence[Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    runner: StepRunner | None = None,
) -> tuple[DecodeState, Tensor, Tensor | None]:
    """The decode state for `streams`: parts (conditional, unconditional) of prompt
    indices into `prompt_kv`, each stream decoding `num_samples` rows, one group per part.

    With a `runner` that compiles, shapes are bucketed and the buffers come from it (the
    same tensors for every batch of a compiled shape, as a CUDA graph needs). Returns the
    state, the (rows, 1, V) first logits in stream order, and where those rows sit among
    the state's rows (None when there is no padding).
    """
    bucket = runner is not None and runner.compiles(prompt_kv[0][0].k[0].device)
    max_new = len_bucket(max_new_tokens) if bucket else max_new_tokens
    if not bucket:
        # Eager, a second group's extra attention call and cache writes cost more per
        # step than the padded slots they save (measured on the CPU); compiled, they
        # are inside one graph and the narrow group wins.
        streams = [[p for part in streams for p in part]]
    plans = []  # (row_prompt, rows, prompt_len) per group
    for part in streams:
        if part:
            row_prompt = [p for p in part for _ in range(num_samples)]
            longest = max(prompt_kv[p][-1].end for p in part)
            plans.append((row_prompt,
                          pow2_bucket(len(row_prompt)) if bucket else len(row_prompt),
                          len_bucket(longest) if bucket else longest))
    ref = prompt_kv[0][0].k[0]
    shapes = [(rows, prompt_len + max_new) for _, rows, prompt_len in plans]
    key = (max_new, tuple((rows, prompt_len) for _, rows, prompt_len in plans))
    buffers = (runner.buffers(key, shapes, ref.dtype, ref.device) if runner is not None
               else allocate_buffers(model.config, shapes, ref.dtype, ref.device))
    groups, real, pos, run, logits = [], [], [], [], []
    start = 0
    for (row_prompt, rows, prompt_len), buf in zip(plans, buffers, strict=True):
        groups.append(_fill_group(buf, prompt_kv, row_prompt, prompt_len))
        for r in range(rows):
            p = prompt_kv[row_prompt[r]] if r < len(row_prompt) else None
            if p is not None:
                real.append(start + r)
                logits.append(p[-1].logits)
            pos.append(p[-1].end if p is not None else 0)
            run.append(p[-1].code_run if p is not None else 0)
        start += rows
    device = logits[0].device
    state = DecodeState(groups, torch.tensor(pos, dtype=torch.long, device=device),
                        torch.tensor(run, dtype=torch.long, device=device), max_new)
    real_rows = None if len(real) == state.rows else torch.tensor(real, device=device)
    return state, torch.stack(logits)[:, None], real_rows


def default_warmup_shapes(max_jobs: int, prompt_lens: Sequence[int] = (64, 128, 192),
                          new_tokens: int = 64) -> tuple[WarmupShape, ...]:
    """Text-to-image batches of 1, 2, 4 … `max_jobs` one-candidate jobs with guidance
    (what the service's requests default to), at the given prompt lengths (the demo
    bundle's prompts with 0, 1 and 2 documents fall in these buckets)."""
    jobs = sorted({pow2_bucket(j) for j in range(1, max_jobs + 1)})
    return tuple((j, 1, n, True, new_tokens) for j in jobs for n in prompt_lens)


class SharedPrefill:
    """`CM3Decoder.generate`'s starting point with every distinct prompt prefilled once."""

    def __init__(self, model: CM3Decoder, runner: StepRunner,
                 cache: PrefixCache | None = None) -> None:
        self.model = model
        self.runner = runner
        self.cache = cache

    def __call__(self, prompts: Sequence[Sequence[int]],
                 uncond: Sequence[Sequence[int]] | None, num_samples: int,
                 max_new_tokens: int) -> Prefilled:
        """Rows as `generate` lays them out: prompt b's sample j in row b·n + j, then,
        with `uncond`, the unconditional prompts' rows in the same order."""
        distinct: dict[tuple[int, ...], int] = {}
        parts = [[distinct.setdefault(tuple(p), len(distinct)) for p in part]
                 for part in (prompts, uncond or [])]
        kv = [prefill_prompt(self.model, p, self.cache) for p in distinct]
        state, logits, real_rows = build_state(self.model, kv, parts, num_samples,
                                               max_new_tokens, self.runner)
        step = RowStep(self.runner, real_rows)
        return Prefilled(state, logits, uncond is not None, step, step.select)


class FastDecode:
    def __init__(self, model: CM3Decoder, options: FastDecodeOptions) -> None:
        self.model = model
        self.options = options
        self.cache = (PrefixCache(options.prefix_cache_bytes)
                      if options.prefix_cache_bytes > 0 else None)
        self.runner = StepRunner(model, options.compile)
        self.prefill = SharedPrefill(model, self.runner, self.cache)

    def warmup(self, shapes: Iterable[WarmupShape] | None = None) -> None:
        """Compile the decode step before serving, for `shapes` (default: the options')."""
        shapes = self.options.warmup_shapes if shapes is None else shapes
        self.runner.warmup(self.scratch_state(*s) for s in shapes)

    def describe(self) -> dict[str, Any]:
        return {
            "compile": self.options.compile,
            "compiled_shapes": len(self.runner.compiled),
            "prefix_cache_bytes": self.options.prefix_cache_bytes,
        }

    def scratch_state(self, jobs: int, candidates: int, prompt_len: int, guided: bool,
                      max_new: int = 64) -> DecodeState:
        """A state of the shape such a batch decodes in (its contents are zeros)."""
        c = self.model.config
        dev = self.model.wte.weight.device
        dtype = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
                 else self.model.wte.weight.dtype)

        def zeros(length: int) -> SegmentKV:
            kv = tuple(torch.zeros(c.n_head, length, c.head_dim, dtype=dtype, device=dev)
                       for _ in range(c.n_layer))
            return SegmentKV(kv, kv, torch.zeros(c.vocab_size, device=dev), length, 0)

        prompts = [[zeros(prompt_len)]] * jobs + [[zeros(UNCOND_LEN)]]
        parts = [list(range(jobs))] + ([[jobs] * jobs] if guided else [])
        state, _, _ = build_state(self.model, prompts, parts, candidates, max_new,
                                  StepRunner(self.model, "on"))
        return state

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self.describe()
        if self.cache is not None:
            s = self.cache.stats()
            out["prefix_cache"] = {
                "hits": s.hits, "misses": s.misses, "hit_tokens": s.hit_tokens,
                "miss_tokens": s.miss_tokens, "evictions": s.evictions, "bytes": s.bytes,
                "entries": s.entries, "max_bytes": s.max_bytes,
            }
        return out
