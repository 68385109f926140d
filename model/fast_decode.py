"""The engine's decoding fast path, and the switch that turns it off.

`FastDecode` puts together:
- shared prefill: each distinct prompt of a batch is prefilled once, its KV kept once
  and read by all its rows (a job's candidates; all guidance rows read the one
  unconditional prompt);
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
    PromptGroup,
    StepRunner,
    len_bucket,
    new_state,
    pow2_bucket,
    run_step,
)
from model.decoder import CM3Decoder, Prefilled
from model.prefix_cache import PrefixCache, SegmentKV, prefill_prompt, write_segments

log = logging.getLogger(__name__)

DEFAULT_PREFIX_CACHE_BYTES = 128 * 1024 * 1024
UNCOND_LEN = 3  # `<img alt="<mask:0>" src="`: the unconditional t2i prompt


@dataclass(frozen=True)
class FastDecodeOptions:
    enabled: bool = True  # False: the plain path (the benchmark's baseline)
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES  # 0: no cross-request cache
    # "auto": compile each warmed-up shape where it measured faster than eager; "on":
    # always (CUDA graphs on CUDA); "off": the static step, eagerly
    compile: CompileMode = "auto"


class RowStep:
    """`Prefilled.step` for a `DecodeState` whose rows may include padding."""

    def __init__(self, runner: StepRunner, real_rows: Tensor | None) -> None:
        self.runner = runner
        self.real_rows = real_rows  # (rows,) where generate's rows sit; None: all, in order

    def __call__(self, model: CM3Decoder, idx: Tensor, state: DecodeState) -> Tensor:
        tok = idx[:, 0]
        if self.real_rows is not None:
            tok = tok.new_zeros(state.rows).index_copy_(0, self.real_rows, tok)
        logits = run_step(self.runner.step_fn(state), model, tok, state)
        if self.real_rows is not None:
            logits = logits.index_select(0, self.real_rows)
        return logits[:, None]


def _group(model: CM3Decoder, prompts: Sequence[Sequence[SegmentKV]], rows_per_prompt: int,
           bucket: bool) -> PromptGroup:
    """The prompts' KV, each left-padded to the longest (and padding prompts when bucketed)."""
    c = model.config
    lengths = [p[-1].end for p in prompts]
    T = len_bucket(max(lengths)) if bucket else max(lengths)
    P = pow2_bucket(len(prompts)) if bucket else len(prompts)
    ref = prompts[0][0].k[0]
    shape = (P, c.n_head, T, c.head_dim)
    k = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in range(c.n_layer)]
    v = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in range(c.n_layer)]
    mask = torch.zeros(P, T, dtype=torch.bool, device=ref.device)
    for i, (nodes, n) in enumerate(zip(prompts, lengths, strict=True)):
        write_segments(k, v, i, nodes, offset=T - n)
        mask[i, T - n :] = True
    mask[len(prompts):, T - 1] = True  # padding prompts see one zero slot: attention stays finite
    return PromptGroup(k, v, mask, rows_per_prompt)


def build_state(
    model: CM3Decoder,
    prompt_kv: Sequence[Sequence[SegmentKV]],
    streams: Sequence[Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    bucket: bool = False,
) -> tuple[DecodeState, Tensor, Tensor | None]:
    """The decode state for `streams` (parts of streams; each a list of prompt indices into
    `prompt_kv`; every stream decodes `num_samples` rows).

    A part whose streams all share one prompt keeps it once for all their rows. Returns
    the state, the (rows, 1, V) first logits in stream order, and where those rows sit
    among the state's rows (None when there is no padding).
    """
    groups, real, pos, run = [], [], [], []
    logits = []
    start = 0
    for part in streams:
        if not part:
            continue
        shared = len(set(part)) == 1
        prompts = [prompt_kv[part[0]]] if shared else [prompt_kv[p] for p in part]
        m = num_samples * (len(part) if shared else 1)
        group = _group(model, prompts, m, bucket)
        groups.append(group)
        lengths = [p[-1].end for p in prompts]
        for i in range(group.num_prompts):
            real_prompt = i < len(prompts)
            for _ in range(m):
                if real_prompt:
                    real.append(start)
                pos.append(lengths[i] if real_prompt else 0)
                run.append(prompts[i][-1].code_run if real_prompt else 0)
                start += 1
        logits += [prompt_kv[p][-1].logits for p in part for _ in range(num_samples)]
    device = logits[0].device
    max_new = len_bucket(max_new_tokens) if bucket else max_new_tokens
    state = new_state(model, groups, max_new,
                      torch.tensor(pos, dtype=torch.long, device=device),
                      torch.tensor(run, dtype=torch.long, device=device))
    real_rows = None if len(real) == state.rows else torch.tensor(real, device=device)
    return state, torch.stack(logits)[:, None], real_rows


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
        state, logits, real_rows = build_state(
            self.model, kv, parts, num_samples, max_new_tokens,
            bucket=self.runner.mode != "off")
        return Prefilled(state, logits, uncond is not None, RowStep(self.runner, real_rows))


class FastDecode:
    def __init__(self, model: CM3Decoder, options: FastDecodeOptions) -> None:
        self.model = model
        self.options = options
        self.cache = (PrefixCache(options.prefix_cache_bytes)
                      if options.prefix_cache_bytes > 0 else None)
        self.runner = StepRunner(model, options.compile)
        self.prefill = SharedPrefill(model, self.runner, self.cache)

    def warmup(self, shapes: Iterable[tuple[int, int, int, bool]], max_new: int = 64) -> None:
        """Compile the decode step before serving, for batches of (jobs, candidates per
        job, prompt length, guided) decoding up to `max_new` tokens."""
        self.runner.warmup(self.scratch_state(*s, max_new=max_new) for s in shapes)

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
        state, _, _ = build_state(self.model, prompts, parts, candidates, max_new, bucket=True)
        return state

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "compile": self.options.compile,
            "compiled_shapes": len(self.runner.compiled),
        }
        if self.cache is not None:
            s = self.cache.stats()
            out["prefix_cache"] = {
                "hits": s.hits, "misses": s.misses, "hit_tokens": s.hit_tokens,
                "miss_tokens": s.miss_tokens, "evictions": s.evictions, "bytes": s.bytes,
                "entries": s.entries, "max_bytes": s.max_bytes,
            }
        return out
