"""Decoding after a shared prefill: one cache per group of rows, a static step.

`CM3Decoder.generate` with one `KVCache` left-pads every row to the longest prompt of the
batch: the unconditional (guidance) rows, three tokens long, attend over the full width
of the conditional ones. And it slices the cache to its current length, so every step
has new shapes. Here (`DecodeState`):

- rows come in groups (the conditional rows, then the unconditional ones), each group
  with its own cache, as wide as its own longest prompt plus the tokens to generate, so
  the guidance rows cost a few slots, not the longest prompt;
- each cache is static: (rows, nh, prompt + new, hs), a step writes its key/value at a
  slot given as a tensor and the slots not yet written are masked. The prompts' KV is
  copied in from their single prefill (model/fast_decode.py).

So a step's shapes depend only on the state's shapes, which makes `static_step` a single
graph for `torch.compile`: on CUDA `mode="reduce-overhead"` captures it as a CUDA graph;
on the CPU inductor fuses the norms, RoPE and SwiGLU into C++ kernels. Shapes are
bucketed so a handful of graphs serve every batch: prompt and generated lengths round up
to a multiple of `LEN_BUCKET`, row counts to a power of two.

Compilation happens in `StepRunner.warmup`, before a server says it is ready, never on a
request: a shape that was not warmed up runs the same step eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from model.decoder import CM3Decoder, DecoderConfig, apply_rope

log = logging.getLogger(__name__)

LEN_BUCKET = 64  # prompt and generated lengths are rounded up to a multiple of this
CompileMode = Literal["auto", "on", "off"]


def pow2_bucket(n: int) -> int:
    """The static count that serves n: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def len_bucket(length: int) -> int:
    return max(-(-length // LEN_BUCKET), 1) * LEN_BUCKET


@dataclass
class RowGroup:
    """Rows decoding with one cache: k, v per layer (rows, nh, prompt_len + max_new, hs).

    Each row's prompt is left-padded into slots [0, prompt_len); generated token t goes
    to slot prompt_len + t. mask (rows, width) marks the slots a row may attend to.
    """

    k: list[Tensor]
    v: list[Tensor]
    mask: Tensor
    prompt_len: int
    # every row reads a prompt exactly prompt_len long: no slot is masked out, so the
    # eager step, which attends only to the slots written so far, needs no mask
    dense: bool = False

    @property
    def rows(self) -> int:
        return self.mask.size(0)


@dataclass
class DecodeState:
    """What a decoding step reads and writes: the groups' caches (conditional rows, then
    unconditional ones), each row's next RoPE position and image-code run (R,), and the
    tokens generated so far."""

    groups: list[RowGroup]
    next_pos: Tensor
    code_run: Tensor
    max_new: int
    length: int = 0
    # Some rows left the batch (`RowStep.select`): the buffers are new ones, never those a
    # compiled (CUDA graph) step was captured with, so the step runs eagerly.
    eager_only: bool = False

    @property
    def rows(self) -> int:
        return self.next_pos.size(0)

    def shape_key(self) -> tuple:
        """What a compiled graph is specialised on."""
        return (self.max_new, tuple((g.rows, g.prompt_len) for g in self.groups))


class LayerWeights(NamedTuple):
    """One block's parameters, looked up once: a module attribute costs a Python call,
    and an eager step would make ~150 of them."""

    ln_1: Tensor
    ln_1_b: Tensor | None
    attn: Tensor
    attn_b: Tensor | None
    attn_proj: Tensor
    attn_proj_b: Tensor | None
    ln_2: Tensor
    ln_2_b: Tensor | None
    fc: Tensor
    fc_b: Tensor | None
    fc_proj: Tensor
    fc_proj_b: Tensor | None


def layer_weights(model: CM3Decoder) -> list[LayerWeights]:
    """The blocks' parameters (the Parameter objects, so loads and layout changes, which
    write into them, show through)."""
    return [LayerWeights(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
                         b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                         b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight,
                         b.mlp.c_proj.bias)
            for b in model.blocks]


def static_step(
    model: CM3Decoder,
    tok: Tensor,
    pos: Tensor,
    code_run: Tensor,
    step: Tensor | None,
    group_k: list[list[Tensor]],
    group_v: list[list[Tensor]],
    group_masks: list[Tensor | None],
    prompt_lens: list[int],
    widths: list[int] | None = None,
    weights: list[LayerWeights] | None = None,
) -> tuple[Tensor, Tensor]:
    """One token per row through the decoder, over a `DecodeState`'s tensors.

    tok, pos, code_run (R,): the new token, its RoPE position, the image codes in a row
    before it; step (1,): which generated token this is (static shapes only). Group g's
    rows are the next `group_k[g][0].size(0)` rows; its keys/values go to slot
    prompt_lens[g] + step of group_k[g][layer], written in place, and its mask must
    already include that slot.
    `widths` (eager only: they change every step) limits attention to the slots written,
    the last of which is this step's; a group whose mask is None there attends to all
    of them. `weights`: `layer_weights(model)`, looked up here when None (as a compiled
    step does: it makes no Python calls). Returns the next-token logits (R, V) and the
    new code runs.

    The same arithmetic as `CM3Decoder.forward` on one token, so the same tokens; the
    functional calls skip the modules' call overhead, a fifth of an eager step here.
    """
    c = model.config
    R, C = tok.size(0), c.n_embd
    nh, hs, eps = c.n_head, c.head_dim, c.norm_eps
    x = F.embedding(tok, model.wte.weight)  # (R, C)
    if model.wge is not None:
        is_code = (tok >= c.image_offset) & (tok < c.image_offset + c.codebook_size)
        code_run = torch.where(is_code, code_run + 1, 0)
        x = x + model.wge(torch.where(is_code, (code_run - 1) % c.image_len + 1, 0))
    else:
        code_run = torch.zeros_like(code_run)
    cos = model.rope_cos[pos].view(R, 1, 1, 1, hs)
    sin = model.rope_sin[pos].view(R, 1, 1, 1, hs)
    sizes = [gk[0].size(0) for gk in group_k]
    if widths is None:  # static shapes: a tensor slot, the whole cache under its mask
        slots: list = [step + n for n in prompt_lens]
        widths = [gk[0].size(2) for gk in group_k]
        masks = [m[:, None, None, :] for m in group_masks]
    else:
        slots = [slice(w - 1, w) for w in widths]
        masks = [None if m is None else m[:, None, None, :w]
                 for m, w in zip(group_masks, widths, strict=True)]
    for i, w8 in enumerate(weights if weights is not None else layer_weights(model)):
        h = F.layer_norm(x, (C,), w8.ln_1, w8.ln_1_b, eps)
        qkv = F.linear(h, w8.attn, w8.attn_b).view(R, 3, nh, 1, hs)
        qk = apply_rope(qkv[:, :2], cos, sin)  # (R, 2, nh, 1, hs)
        q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]  # (R, nh, 1, hs)
        ys, start = [], 0
        for gk, gv, mask, slot, w, n in zip(group_k, group_v, masks, slots, widths, sizes,
                                            strict=True):
            gq, gkey, gval = ((q, k, v) if n == R else
                              (q[start:start + n], k[start:start + n], v[start:start + n]))
            if isinstance(slot, slice):
                gk[i][:, :, slot] = gkey
                gv[i][:, :, slot] = gval
            else:
                gk[i].index_copy_(2, slot, gkey)
                gv[i].index_copy_(2, slot, gval)
            ks, vs = (gk[i], gv[i]) if w == gk[i].size(2) else (gk[i][:, :, :w], gv[i][:, :, :w])
            ys.append(F.scaled_dot_product_attention(gq, ks, vs, attn_mask=mask))
            start += n
        y = torch.cat(ys) if len(ys) > 1 else ys[0]  # (R, nh, 1, hs)
        x = x + F.linear(y.view(R, C), w8.attn_proj, w8.attn_proj_b)
        h = F.layer_norm(x, (C,), w8.ln_2, w8.ln_2_b, eps)
        gate, up = F.linear(h, w8.fc, w8.fc_b).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, w8.fc_proj, w8.fc_proj_b)
    # the final norm as a module call (one a step): its hooks see every step's rows, as
    # they do on the plain path
    x = model.ln_f(x)
    return F.linear(x, model.lm_head.weight), code_run


StepFn = Callable[..., tuple[Tensor, Tensor]]
GroupBuffers = tuple[list[Tensor], list[Tensor], Tensor]  # k, v per layer; mask


def allocate_buffers(config: DecoderConfig, shapes: Sequence[tuple[int, int]],
                     dtype: torch.dtype, device: torch.device | str) -> list[GroupBuffers]:
    """Zeroed caches for groups of (rows, width)."""
    out = []
    for rows, width in shapes:
        shape = (rows, config.n_head, width, config.head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        out.append((k, v, torch.zeros(rows, width, dtype=torch.bool, device=device)))
    return out


def run_step(fn: StepFn, model: CM3Decoder, tok: Tensor, state: DecodeState,
             weights: list[LayerWeights] | None = None) -> Tensor:
    """Append tok (R,) to `state` through `fn`; the (R, V) logits after it, which the
    caller may keep (a CUDA graph's own outputs are copied)."""
    t = state.length
    if t >= state.max_new:
        raise ValueError(f"decode state full: {state.max_new} tokens generated")
    for g in state.groups:
        g.mask[:, g.prompt_len + t] = True
    ks, vs = [g.k for g in state.groups], [g.v for g in state.groups]
    prompt_lens = [g.prompt_len for g in state.groups]
    if fn is static_step:  # eager: attend to the slots written so far only
        logits, code_run = fn(model, tok, state.next_pos, state.code_run, None, ks, vs,
                              [None if g.dense else g.mask for g in state.groups],
                              prompt_lens, [n + t + 1 for n in prompt_lens], weights)
    else:
        if tok.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # last step's outputs are consumed
        logits, code_run = fn(model, tok, state.next_pos, state.code_run,
                              torch.tensor([t], device=tok.device), ks, vs,
                              [g.mask for g in state.groups], prompt_lens)
        # a CUDA graph's outputs are overwritten by its next replay
        logits, code_run = logits.clone(), code_run.clone()
    state.code_run = code_run
    state.next_pos += 1
    state.length = t + 1
    return logits


@dataclass
class StepRunner:
    """Runs `static_step` for one decoder, compiled for the shapes warmed up.

    On CUDA, "auto" and "on" compile every warmed-up shape (with CUDA graphs: launching
    one graph is what a step then costs). On the CPU, "on" compiles each warmed-up shape
    and keeps it where warm-up measured it faster than eager, while "auto" stays eager:
    the eager step attends only to the slots written so far, the compiled one to the
    whole static cache, and for the demo decoder over 256 new tokens eager measured
    faster, while a compile costs seconds to minutes per shape (BENCHMARKS.md). "off"
    never compiles.
    """

    model: CM3Decoder
    mode: CompileMode = "auto"
    compiled: set[tuple] = field(default_factory=set)
    timings_ms: dict[tuple, tuple[float, float]] = field(default_factory=dict)
    # A compiled shape's buffers, reused by every batch of that shape: a CUDA graph reads
    # and writes the addresses it was captured with.
    pool: dict[tuple, list[GroupBuffers]] = field(default_factory=dict)
    _compiled_fn: StepFn | None = None
    weights: list[LayerWeights] = field(init=False)

    def __post_init__(self) -> None:
        self.weights = layer_weights(self.model)

    def buffers(self, key: tuple, shapes: Sequence[tuple[int, int]], dtype: torch.dtype,
                device: torch.device | str) -> list[GroupBuffers]:
        """Zeroed caches for a state of shape `key`: the pooled ones for a compiled shape."""
        pooled = self.pool.get(key)
        if pooled is None or pooled[0][0][0].dtype != dtype:
            return allocate_buffers(self.model.config, shapes, dtype, device)
        for k, v, mask in pooled:
            for t in (*k, *v, mask):
                t.zero_()
        return pooled

    def _adopt(self, key: tuple, state: DecodeState) -> None:
        self.compiled.add(key)
        self.pool[key] = [(g.k, g.v, g.mask) for g in state.groups]

    def compiles(self, device: torch.device) -> bool:
        return self.mode == "on" or (self.mode == "auto" and device.type == "cuda")

    def _compile(self) -> StepFn:
        if self._compiled_fn is None:
            cuda = self.model.wte.weight.device.type == "cuda"
            # one graph per warmed-up shape, all under the one compiled function
            limit = max(64, getattr(torch._dynamo.config, "recompile_limit", 8))
            torch._dynamo.config.recompile_limit = limit
            torch._dynamo.config.accumulated_recompile_limit = max(
                4 * limit, getattr(torch._dynamo.config, "accumulated_recompile_limit", 256))
            self._compiled_fn = torch.compile(
                static_step, mode="reduce-overhead" if cuda else None, dynamic=False,
                fullgraph=True)
        return self._compiled_fn

    def step_fn(self, state: DecodeState) -> StepFn:
        if (self._compiled_fn is not None and not state.eager_only
                and state.shape_key() in self.compiled):
            return self._serve_compiled
        return static_step

    def _serve_compiled(self, *args: object) -> tuple[Tensor, Tensor]:
        """The compiled step, never compiling: should a guard fail on a request, the step
        runs eagerly there instead."""
        with torch.compiler.set_stance("eager_on_recompile"):
            return self._compiled_fn(*args)

    def warmup(self, states: Iterable[DecodeState], measure_steps: int = 6) -> None:
        """Compile the step for each state's shape (on the CPU, keep it only where it
        measured faster than eager). The states are scratch: their slots are overwritten,
        and a compiled shape's buffers are pooled for the batches to come."""
        for state in states:
            device = state.next_pos.device
            if not self.compiles(device):
                return
            key = state.shape_key()
            if key in self.compiled or key in self.timings_ms:
                continue
            if device.type == "cuda":
                # the graph writes the caches in place: they must keep their addresses,
                # so they are marked before capture and reused (`buffers`) from then on
                for g in state.groups:
                    for t in (*g.k, *g.v, g.mask):
                        torch._dynamo.mark_static_address(t)
            fn = self._compile()
            t0 = time.perf_counter()
            self._time([fn], state, 3)  # the first call compiles, the next ones capture
            log.info("decode step %s compiled in %.1f s", key, time.perf_counter() - t0)
            if device.type == "cuda":
                self._adopt(key, state)
                continue
            eager_ms, compiled_ms = self._time([static_step, fn], state, measure_steps)
            self.timings_ms[key] = (eager_ms, compiled_ms)
            if compiled_ms < eager_ms:
                self._adopt(key, state)
            log.info("decode step %s: eager %.2f ms, compiled %.2f ms: %s", key, eager_ms,
                     compiled_ms, "compiled" if key in self.compiled else "eager")

    @torch.inference_mode()
    def _time(self, fns: Sequence[StepFn], state: DecodeState, steps: int) -> list[float]:
        """Best ms per step of each of `fns` on `state`, taking turns, each step taken
        halfway through the generation and rewound: the eager step attends only to the
        slots written so far, the compiled one to all of them under its mask, so a step
        at the start would flatter eager. On the CPU the time is the process's CPU time,
        which other processes' load leaves out."""
        dev = state.next_pos.device
        clock = time.perf_counter if dev.type == "cuda" else time.process_time
        tok = torch.zeros(state.rows, dtype=torch.long, device=dev)
        mid = state.max_new // 2
        state.next_pos += mid
        best = [float("inf")] * len(fns)
        for _ in range(steps):
            for i, fn in enumerate(fns):
                state.length = mid
                t0 = clock()
                run_step(fn, self.model, tok, state, self.weights)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                best[i] = min(best[i], clock() - t0)
                state.next_pos -= 1
        state.next_pos -= mid
        state.length = 0
        for g in state.groups:  # the scratch slots are free again
            g.mask[:, g.prompt_len:] = False
        return [1e3 * b for b in best]
