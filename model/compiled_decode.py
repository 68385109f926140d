"""Decoding after a shared prefill: prompt KV kept once per prompt, a static step.

`CM3Decoder.generate` with a `KVCache` gives every row its own copy of its prompt's keys
and values and slices the cache to its current length, so each step reads R copies of
the prompts and has new shapes. Here the cache is split in two (`DecodeState`):

- a prompt's KV is stored once (`PromptGroup`) and every row decoding from it reads that
  one copy: a job's candidates share their prompt, and the guidance rows of a batch share
  the unconditional one, which is a few tokens long instead of padded to the longest
  prompt. Attention joins the prompt scores and the row's own scores in one softmax;
- the generated tokens' KV is per row, in a static (rows, nh, max_new, hs) buffer
  written at a slot given as a tensor.

So a step's shapes depend only on the state's shapes, which makes `static_step` a single
graph for `torch.compile`: on CUDA `mode="reduce-overhead"` captures it as a CUDA graph;
on the CPU inductor fuses the norms, RoPE and SwiGLU into C++ kernels. Shapes are
bucketed so a handful of graphs serve every batch: prompt lengths and the generated
buffer round up to a multiple of `LEN_BUCKET`, prompt and row counts to a power of two.

Compilation happens in `StepRunner.warmup`, before a server says it is ready, never on a
request: a shape that was not warmed up runs the same step eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from model.decoder import CM3Decoder, apply_rope

log = logging.getLogger(__name__)

LEN_BUCKET = 64  # prompt and generated lengths are rounded up to a multiple of this
CompileMode = Literal["auto", "on", "off"]


def pow2_bucket(n: int) -> int:
    """The static count that serves n: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def len_bucket(length: int) -> int:
    return max(-(-length // LEN_BUCKET), 1) * LEN_BUCKET


@dataclass
class PromptGroup:
    """Prompts whose KV every row of the group reads: rows p·m … p·m+m-1 read prompt p.

    k, v: per layer (P, nh, T, hs), each prompt left-padded; mask (P, T) its real slots.
    """

    k: list[Tensor]
    v: list[Tensor]
    mask: Tensor
    rows_per_prompt: int

    @property
    def num_prompts(self) -> int:
        return self.mask.size(0)

    @property
    def rows(self) -> int:
        return self.num_prompts * self.rows_per_prompt


@dataclass
class DecodeState:
    """What a decoding step reads and writes, after a shared prefill.

    groups cover the rows in order (conditional prompts, then unconditional ones). k, v:
    per layer (R, nh, S, hs), the KV of the tokens generated so far, slot t for step t;
    mask (R, S) the slots written. next_pos and code_run (R,): each row's next RoPE
    position and the image codes in a row at its end.
    """

    groups: list[PromptGroup]
    k: list[Tensor]
    v: list[Tensor]
    mask: Tensor
    next_pos: Tensor
    code_run: Tensor
    length: int = 0  # tokens generated so far (slots written)

    @property
    def rows(self) -> int:
        return self.mask.size(0)

    @property
    def max_new(self) -> int:
        return self.mask.size(1)

    def shape_key(self) -> tuple:
        """What a compiled graph is specialised on."""
        return (self.rows, self.max_new,
                tuple((g.num_prompts, g.rows_per_prompt, g.mask.size(1)) for g in self.groups))


def _attend(q: Tensor, group_k: list[Tensor], group_v: list[Tensor],
            group_masks: list[Tensor], rows_per_prompt: list[int], k: Tensor, v: Tensor,
            mask: Tensor, scale: float) -> Tensor:
    """Attention of one query per row over its prompt (shared) and its own tokens.

    q (R, nh, hs); k, v (R, nh, S, hs) with this step's key/value already written.
    Returns (R, nh, hs).
    """
    own = torch.einsum("rhd,rhsd->rhs", q, k) * scale  # (R, nh, S)
    own = own.masked_fill(~mask[:, None, :], float("-inf"))
    out, start = [], 0
    for pk, pv, pmask, m in zip(group_k, group_v, group_masks, rows_per_prompt, strict=True):
        P, nh, T, hs = pk.shape
        end = start + P * m
        qg = q[start:end].view(P, m, nh, hs)
        shared = torch.einsum("pmhd,phtd->pmht", qg, pk) * scale  # (P, m, nh, T)
        shared = shared.masked_fill(~pmask[:, None, None, :], float("-inf"))
        scores = torch.cat([shared.reshape(P * m, nh, T), own[start:end]], dim=-1)
        probs = scores.softmax(dim=-1)
        y = torch.einsum("pmht,phtd->pmhd", probs[..., :T].view(P, m, nh, T), pv)
        y = y.reshape(P * m, nh, hs) + torch.einsum("rhs,rhsd->rhd", probs[..., T:],
                                                    v[start:end])
        out.append(y)
        start = end
    return torch.cat(out) if len(out) > 1 else out[0]


def static_step(
    model: CM3Decoder,
    tok: Tensor,
    pos: Tensor,
    code_run: Tensor,
    slot: Tensor,
    k: list[Tensor],
    v: list[Tensor],
    mask: Tensor,
    group_k: list[list[Tensor]],
    group_v: list[list[Tensor]],
    group_masks: list[Tensor],
    rows_per_prompt: list[int],
) -> tuple[Tensor, Tensor]:
    """One token per row through the decoder, over a `DecodeState`'s tensors.

    tok, pos, code_run (R,): the new token, its RoPE position, the image codes in a row
    before it; slot (1,): where its key/value go in k, v (per layer (R, nh, S, hs)),
    written in place; mask (R, S) must already include `slot`. group_k[g][layer] are the
    groups' prompt keys. Returns the next-token logits (R, V) and the new code runs.
    """
    c = model.config
    R = tok.size(0)
    nh, hs = c.n_head, c.head_dim
    scale = hs ** -0.5
    x = model.wte(tok)  # (R, C)
    if model.wge is not None:
        is_code = (tok >= c.image_offset) & (tok < c.image_offset + c.codebook_size)
        code_run = torch.where(is_code, code_run + 1, 0)
        x = x + model.wge(torch.where(is_code, (code_run - 1) % c.image_len + 1, 0))
    else:
        code_run = torch.zeros_like(code_run)
    cos = model.rope_cos[pos].view(R, 1, 1, hs)
    sin = model.rope_sin[pos].view(R, 1, 1, hs)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        qkv = attn.c_attn(block.ln_1(x)).view(R, 3, nh, hs)
        qk = apply_rope(qkv[:, :2], cos, sin)  # (R, 2, nh, hs)
        k[i].index_copy_(2, slot, qk[:, 1].unsqueeze(2))
        v[i].index_copy_(2, slot, qkv[:, 2].unsqueeze(2))
        y = _attend(qk[:, 0], [g[i] for g in group_k],
                    [g[i] for g in group_v], group_masks, rows_per_prompt, k[i], v[i], mask,
                    scale)
        x = x + attn.c_proj(y.reshape(R, c.n_embd))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.ln_f(x)), code_run


StepFn = Callable[..., tuple[Tensor, Tensor]]


def run_step(fn: StepFn, model: CM3Decoder, tok: Tensor, state: DecodeState) -> Tensor:
    """Append tok (R,) to `state` through `fn`; the (R, V) logits after it."""
    t = state.length
    if t >= state.max_new:
        raise ValueError(f"decode state full: {state.max_new} tokens generated")
    state.mask[:, t] = True
    slot = torch.tensor([t], device=tok.device)
    logits, code_run = fn(
        model, tok, state.next_pos, state.code_run, slot, state.k, state.v, state.mask,
        [g.k for g in state.groups], [g.v for g in state.groups],
        [g.mask for g in state.groups], [g.rows_per_prompt for g in state.groups],
    )
    state.code_run = code_run.clone()  # a CUDA graph's outputs are overwritten next replay
    state.next_pos += 1
    state.length = t + 1
    return logits


@dataclass
class StepRunner:
    """Runs `static_step` for one decoder, compiled for the shapes warmed up.

    mode "on" compiles (with CUDA graphs on CUDA), "off" runs the step eagerly, "auto"
    compiles and keeps the compiled step only for shapes where warm-up measured it faster.
    """

    model: CM3Decoder
    mode: CompileMode = "auto"
    compiled: set[tuple] = field(default_factory=set)
    timings_ms: dict[tuple, tuple[float, float]] = field(default_factory=dict)
    _compiled_fn: StepFn | None = None

    def _compile(self) -> StepFn:
        if self._compiled_fn is None:
            cuda = self.model.wte.weight.device.type == "cuda"
            self._compiled_fn = torch.compile(
                static_step, mode="reduce-overhead" if cuda else None, dynamic=False,
                fullgraph=True)
        return self._compiled_fn

    def step_fn(self, state: DecodeState) -> StepFn:
        if self._compiled_fn is not None and state.shape_key() in self.compiled:
            return self._compiled_fn
        return static_step

    def warmup(self, states: Iterable[DecodeState], measure_steps: int = 6) -> None:
        """Compile (and in "auto" time against eager) the step for each state's shape.

        The states are scratch: their slots are overwritten.
        """
        if self.mode == "off":
            return
        for state in states:
            key = state.shape_key()
            if key in self.compiled or key in self.timings_ms:
                continue
            fn = self._compile()
            t0 = time.perf_counter()
            self._time(fn, state, 1)  # the first call compiles
            log.info("decode step %s compiled in %.1f s", key, time.perf_counter() - t0)
            if self.mode == "on":
                self.compiled.add(key)
                continue
            compiled_ms = self._time(fn, state, measure_steps)
            eager_ms = self._time(static_step, state, measure_steps)
            self.timings_ms[key] = (eager_ms, compiled_ms)
            if compiled_ms < eager_ms:
                self.compiled.add(key)
            log.info("decode step %s: eager %.2f ms, compiled %.2f ms: %s", key, eager_ms,
                     compiled_ms, "compiled" if key in self.compiled else "eager")

    @torch.inference_mode()
    def _time(self, fn: StepFn, state: DecodeState, steps: int) -> float:
        """Best ms per step of `fn` on `state` (rewinding it after each step)."""
        dev = state.mask.device
        tok = torch.zeros(state.rows, dtype=torch.long, device=dev)
        best = float("inf")
        for _ in range(steps):
            state.length = 0
            t0 = time.perf_counter()
            run_step(fn, self.model, tok, state)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t0)
            state.next_pos -= 1
        state.length = 0
        return 1e3 * best


class DecodeStepper:
    """`CM3Decoder.generate`'s per-step forward on a `DecodeState` (`Prefilled.step`)."""

    def __init__(self, runner: StepRunner, rows: int) -> None:
        self.runner = runner
        self.rows = rows  # the state may hold padding rows beyond these

    def __call__(self, model: CM3Decoder, idx: Tensor, state: DecodeState) -> Tensor:
        """idx (rows, 1) -> logits (rows, 1, V), appended to `state`."""
        tok = idx[:, 0]
        if state.rows > tok.size(0):  # padding rows decode a pad token; their logits drop
            tok = torch.cat([tok, tok.new_zeros(state.rows - tok.size(0))])
        logits = run_step(self.runner.step_fn(state), model, tok, state)
        return logits[: self.rows, None]


def new_state(model: CM3Decoder, groups: Sequence[PromptGroup], max_new: int,
              next_pos: Tensor, code_run: Tensor) -> DecodeState:
    """A state over `groups` with an empty, zeroed buffer for `max_new` tokens per row."""
    c = model.config
    R = sum(g.rows for g in groups)
    ref = groups[0].k[0]
    shape = (R, c.n_head, max_new, c.head_dim)
    k = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in range(c.n_layer)]
    v = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in range(c.n_layer)]
    mask = torch.zeros(R, max_new, dtype=torch.bool, device=ref.device)
    return DecodeState(list(groups), k, v, mask, next_pos, code_run)
