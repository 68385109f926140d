"""The CM3 decoder: a decoder-only transformer over the token space of model/tokens.py.

nanoGPT-shaped, with the pieces current decoders use: pre-norm, rotary position
embeddings (RoPE), `F.scaled_dot_product_attention`, a SwiGLU MLP and tied input/output
embeddings. The norm is LayerNorm without bias rather than RMSNorm: on the CPU it is one
fused kernel, where RMSNorm is still several (4x slower per call at demo size).

Inference uses a static `KVCache` (preallocated (B, nh, T_max, hs) buffers per layer,
written in place). Batches of prompts of different lengths are LEFT-padded: the padded
key slots are masked, and RoPE positions count real tokens only, so each row decodes
exactly as it would alone. `KVCache.expand(n)` turns one prefilled context into n
independent samples without prefilling it n times.

Sampling (temperature/top-k/top-p, seeds, guidance, constraints) lives in
model/sampling.py; `CM3Decoder.generate` is the loop that joins the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.checkpoint import build_config
from model.loss import weighted_cross_entropy
from model.sampling import (
    Constraint,
    Generators,
    LogitsProcessor,
    SamplingParams,
    batch_allowed_mask,
    cfg_combine,
    make_generator,
    sample,
)
from model.tokens import EOS_ID, PAD_ID, TokenSpace

# Called after each decoding step with (step, tokens so far); returns rows to stop, or None.
StepHook = Callable[[int, Tensor], "Tensor | None"]
# Called before each decoding step; returns the output rows nobody wants any more, or None.
StoppedRows = Callable[[], "Tensor | None"]

# The vocabularies the preset sizes assume (padded to a multiple of 64):
# demo: a 1024-token BPE and a 512-code VQ (the demo bundle) -> 1600 ids;
# small / cm3-medium: a GPT-2-sized 50257-token BPE and an 8192-code VQ -> 58496 ids.
PRESET_SPACES = {
    "demo": TokenSpace(text_vocab_size=1024, codebook_size=512),
    "small": TokenSpace(text_vocab_size=50257, codebook_size=8192),
    "cm3-medium": TokenSpace(text_vocab_size=50257, codebook_size=8192),
}
# What each preset is meant to be, in parameters (embeddings counted once: they are tied).
PRESET_TARGET_PARAMS = {"demo": 5e6, "small": 125e6, "cm3-medium": 2.7e9}


@dataclass
class DecoderConfig:
    vocab_size: int  # TokenSpace.padded_vocab_size: a multiple of 64 keeps the LM head aligned
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 256
    # Longest sequence (RoPE table, cache limit). The demo needs K=2 retrieved documents
    # plus the main one, ~100 tokens each at an 8x8 grid, so 512 leaves room.
    block_size: int = 512
    dropout: float = 0.0  # 0 for inference and for small-data pretraining; ~0.1 to finetune
    bias: bool = False  # no biases in linears or norms: a bit faster, no worse (nanoGPT)
    rope_theta: float = 10000.0  # RoPE base; raise it for contexts far beyond 4k
    # SwiGLU width. None: 8/3·n_embd rounded up to a multiple of 64, which has the
    # parameters and FLOPs of a 4x GELU MLP with one more, cheaper, gated matmul.
    mlp_hidden: int | None = None
    norm_eps: float = 1e-5
    # Image-grid positions (DALL-E's row/column embeddings, as one table over the grid):
    # the k-th code of an image run gets embedding k, so a code at grid cell k of the
    # output attends to cell k of a retrieved image by content, not by a RoPE offset that
    # varies with the retrieved caption's length. Copying from neighbours is what makes
    # retrieval useful, and a small model learns it far sooner this way. The image ids are
    # [image_offset, image_offset + codebook_size); image_len 0 turns the table off.
    image_offset: int = 0
    codebook_size: int = 0
    image_len: int = 0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head size must be even for RoPE")
        if self.mlp_hidden is None:
            self.mlp_hidden = (8 * self.n_embd // 3 + 63) // 64 * 64

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DecoderConfig:
        """Refuses unknown keys, as every config in the project does (model/checkpoint.py)."""
        return build_config(cls, d, "decoder config")

    @classmethod
    def preset(cls, name: str, vocab_size: int | None = None) -> DecoderConfig:
        """`demo` (~5M), `small` (~125M, GPT-2 small), `cm3-medium` (2.7B, CM3-Medium).

        `vocab_size` defaults to the vocabulary in PRESET_SPACES that the size assumes.
        """
        shapes = {
            "demo": dict(n_layer=6, n_head=8, n_embd=256, block_size=512),
            "small": dict(n_layer=12, n_head=12, n_embd=768, block_size=2048),
            "cm3-medium": dict(n_layer=32, n_head=32, n_embd=2560, block_size=4096),
        }
        if name not in shapes:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(shapes)}")
        vocab = vocab_size or PRESET_SPACES[name].padded_vocab_size
        return cls(vocab_size=vocab, **shapes[name])


class KVCache:
    """Static keys/values for incremental decoding, written in place.

    Per layer, `k[i]` and `v[i]` are (B, nh, T_max, hs). All rows share one write offset,
    `length`, so a batch of prompts is left-padded: `key_mask` (B, T_max) marks the slots
    that hold real tokens and `next_pos` (B,) the RoPE position of each row's next token.
    """

    def __init__(
        self,
        k: list[Tensor],
        v: list[Tensor],
        key_mask: Tensor,
        next_pos: Tensor,
        length: int = 0,
        padded: bool = False,
        aligned: bool = True,
        code_run: Tensor | None = None,
    ) -> None:
        self.k, self.v = k, v
        self.key_mask = key_mask
        self.next_pos = next_pos
        self.length = length
        self.padded = padded  # some slot is masked, so attention needs key_mask
        self.aligned = aligned  # every row's next position is `length`: RoPE can slice
        # (B,) image codes in a row at the end of each cached row (image-grid positions)
        self.code_run = torch.zeros_like(next_pos) if code_run is None else code_run

    @classmethod
    def allocate(
        cls,
        config: DecoderConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> KVCache:
        if max_len > config.block_size:
            raise ValueError(f"cache of {max_len} exceeds block_size {config.block_size}")
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(k, v, key_mask, next_pos)

    @property
    def batch_size(self) -> int:
        return self.key_mask.size(0)

    @property
    def max_len(self) -> int:
        return self.key_mask.size(1)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, nh, T, hs) keys/values at the current offset; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows: Tensor) -> KVCache:
        """A new cache holding `rows` (B',) of this one, in that order.

        Drops finished or cancelled requests from a batch, or repeats rows (see `expand`).
        Only the filled slots are copied; later slots are written before they are read.
        """
        rows = rows.to(self.key_mask.device)
        L = self.length

        def take(x: Tensor) -> Tensor:  # (B, nh, T_max, hs) -> (B', nh, T_max, hs)
            out = x.new_empty((rows.numel(), *x.shape[1:]))
            out[:, :, :L] = x[:, :, :L].index_select(0, rows)
            return out

        return KVCache(
            [take(k) for k in self.k],
            [take(v) for v in self.v],
            self.key_mask.index_select(0, rows),
            self.next_pos.index_select(0, rows),
            self.length,
            self.padded,
            self.aligned,
            self.code_run.index_select(0, rows),
        )

    def expand(self, n: int) -> KVCache:
        """Every row repeated n times (row b -> rows b·n … b·n+n-1): one prefill, n samples."""
        return self.select(torch.arange(self.batch_size).repeat_interleave(n))


def cached_forward(model: CM3Decoder, idx: Tensor, cache: KVCache) -> Tensor:
    """One decoding step: idx (B, 1) appended to the cache -> logits (B, 1, V)."""
    return model(idx, kv_cache=cache)[0]


def select_cached(cache: KVCache, rows: Tensor) -> tuple[KVCache, Callable[..., Tensor]]:
    """`Prefilled.select` for a `KVCache` decoded by `cached_forward`."""
    return cache.select(rows), cached_forward


class Prefilled(NamedTuple):
    """A prefilled cache to decode from: one row per output row (twice that, guided)."""

    cache: Any  # a KVCache for `cached_forward`; whatever state `step` reads otherwise
    logits: Tensor  # (rows, 1, V) next-token logits after each row's prompt
    guided: bool  # the second half of the rows is the unconditional stream
    # One decoding step (model, idx (rows, 1), cache) -> logits (rows, 1, V); the static,
    # compilable step of model/compiled_decode.py computes the same thing.
    step: Callable[[CM3Decoder, Tensor, Any], Tensor] = cached_forward
    # (cache, rows) -> the cache holding only those rows, in that order, and the step that
    # decodes it: how rows leave a batch. None: rows cannot leave this cache.
    select: Callable[[Any, Tensor], tuple[Any, Callable[..., Tensor]]] | None = select_cached


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """(max_len, hs) cos and signed sin, so rotation is `x·cos + roll(x, hs/2)·sin`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (T, hs/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)  # sign of rotate_half baked in
    return cos.float(), sin.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # GPT-NeoX/LLaMA half-split rotation: roll(x) = [x2, x1], sin = [-s, s]
    return torch.addcmul(x * cos, torch.roll(x, x.size(-1) // 2, dims=-1), sin)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    # a plain function, not nn.Dropout: at inference it costs no module or dispatcher call
    return F.dropout(x, p, training=True) if training and p > 0 else x


class CausalSelfAttention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)
        qk = apply_rope(qkv[:, :, :2], cos, sin)  # q and k rotated together: (B, T, 2, nh, hs)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs)
        v = qkv[:, :, 2].transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, L + T, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU: w_out(silu(x·W_gate) * x·W_up), gate and up fused into one matmul."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return _dropout(self.c_proj(F.silu(gate) * up), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        y = self.attn(self.ln_1(x), cos, sin, mask, is_causal, cache, layer)
        x = x + _dropout(y, self.dropout, self.training)
        return x + self.mlp(self.ln_2(x))


class CM3Decoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # row 0 (not an image code) stays zero: text and markup get no grid embedding
        self.wge = (nn.Embedding(config.image_len + 1, config.n_embd, padding_idx=0)
                    if config.image_len else None)
        self.dropout = config.dropout
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # tied, as in GPT-2 and CM3: saves vocab x n_embd, a third of the `small` preset
        self.lm_head.weight = self.wte.weight
        # derived from the config, so kept out of checkpoints
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rope_tables()
        self.apply(self._init_weights)
        if self.wge is not None:
            with torch.no_grad():
                self.wge.weight[0].zero_()  # the init above filled the padding row too
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def reset_rope_tables(self) -> None:
        """(Re)compute the RoPE tables, e.g. after building on "meta" and `to_empty()`."""
        cos, sin = rope_tables(self.config.head_dim, self.config.block_size,
                               self.config.rope_theta)
        device = self.wte.weight.device
        self.rope_cos = cos.to(device, self.rope_cos.dtype)
        self.rope_sin = sin.to(device, self.rope_sin.dtype)

    def use_decode_layout(self) -> CM3Decoder:
        """Keep every linear weight (out, in) column-major, (in, out) in memory as GPT-2's
        Conv1D does; values and shapes unchanged. Returns self.

        A decoding step multiplies a few rows by each weight, and on the CPU (MKL, fp32)
        that product reads a column-major weight faster: 1.3 vs 2.0 ms for the demo
        decoder's 25 products per step at batch 1, 3.1 vs 4.6 ms at batch 8, with prefill
        unchanged. The tied embedding is then read with a stride, which costs nothing
        at these sizes. Every path through the model (plain and fast decoding, prefill)
        multiplies the same layout, so they still give the same tokens.
        """
        with torch.no_grad():
            for m in self.modules():
                p = m.weight if isinstance(m, nn.Linear) else None
                if p is not None and not p.t().is_contiguous():
                    p.data = p.data.t().contiguous().t()
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def new_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None
    ) -> KVCache:
        device = self.wte.weight.device
        if dtype is None and torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        return KVCache.allocate(
            self.config, batch_size, max_len, device, dtype or self.wte.weight.dtype
        )

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        loss_weights: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) -> logits (B, T, V) (or (B, 1, V) with `last_only`), loss.

        targets (B, T) are the next tokens, already shifted, IGNORE_INDEX (model/loss.py)
        where no loss;
        loss_weights (B, T) weigh each token's cross-entropy (L_main + α·L_retr).
        attention_mask (B, T) is 1/True for real tokens and 0 for padding (left padding
        with a cache, either side without). positions (B, T) override the RoPE positions,
        which otherwise count real tokens from 0. With `kv_cache`, idx continues the
        cached sequence and is appended to it.
        """
        B, T = idx.shape
        cos, sin, mask, is_causal = self._attention_inputs(
            B, T, idx.device, attention_mask, positions, kv_cache
        )
        x = self.wte(idx)
        if self.wge is not None:
            x = x + self.wge(self.grid_positions(idx, kv_cache))
        x = _dropout(x, self.dropout, self.training)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, is_causal, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.lm_head(self.ln_f(x[:, -1:] if last_only else x))
        loss = None if targets is None else weighted_cross_entropy(logits, targets, loss_weights)
        return logits, loss

    def grid_positions(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """(B, T) 1 + the index of each image code within its run of codes; 0 elsewhere.

        With a cache, runs continue from the cached tokens (and the cache remembers where
        this chunk's runs end). A run longer than an image wraps to the next image.
        """
        c = self.config
        is_code = (idx >= c.image_offset) & (idx < c.image_offset + c.codebook_size)
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device).expand_as(idx)
        last_break = torch.where(is_code, -1, pos).cummax(dim=1).values  # -1: none yet
        run = pos - last_break  # codes so far in this run, this one included
        if cache is not None:
            run = run + torch.where(last_break < 0, cache.code_run[:, None], 0)
            cache.code_run = torch.where(is_code[:, -1], run[:, -1], 0)
        return torch.where(is_code, (run - 1) % c.image_len + 1, 0)

    def _attention_inputs(
        self,
        B: int,
        T: int,
        device: torch.device,
        attention_mask: Tensor | None,
        positions: Tensor | None,
        cache: KVCache | None,
    ) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        """RoPE cos/sin for this chunk, the attention mask, and whether to use is_causal.

        Built once per forward and shared by every layer. The common cases (no padding)
        need no mask at all and slice the RoPE tables instead of gathering them.
        """
        L = 0 if cache is None else cache.length
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        if cache is not None:
            if L + T > cache.max_len:
                raise ValueError(f"cache full: {L} + {T} tokens > {cache.max_len}")
            cache.key_mask[:, L : L + T] = True if valid is None else valid
            cache.padded = cache.padded or (valid is not None and not bool(valid.all()))
            cache.aligned = cache.aligned and not cache.padded and positions is None
            padded, aligned = cache.padded, cache.aligned
        else:
            padded = valid is not None and not bool(valid.all())
            aligned = not padded and positions is None
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} exceeds block_size {self.config.block_size}")

        if aligned:  # every row sits at position L: slice the table, gather nothing
            cos = self.rope_cos[L : L + T].view(1, T, 1, 1, -1)
            sin = self.rope_sin[L : L + T].view(1, T, 1, 1, -1)
        else:
            if positions is None:
                counts = valid.long().cumsum(1) - 1 if valid is not None else None
                if counts is None:
                    counts = torch.arange(T, device=device).expand(B, T)
                start = cache.next_pos[:, None] if cache is not None else 0
                positions = (start + counts).clamp_min(0)  # leading pads sit at 0; masked anyway
            cos = self.rope_cos[positions].view(B, T, 1, 1, -1)
            sin = self.rope_sin[positions].view(B, T, 1, 1, -1)
        if cache is not None:
            if positions is not None:
                cache.next_pos.copy_(positions[:, -1] + 1)
            else:
                cache.next_pos += T

        if not padded:
            if L == 0 or T == 1:  # a single new query may see every cached key
                return cos, sin, None, T > 1
            causal = torch.ones(T, L + T, dtype=torch.bool, device=device).tril(L)
            return cos, sin, causal, False
        keys = cache.key_mask[:, : L + T] if cache is not None else valid
        if T == 1:
            return cos, sin, keys[:, None, None, :], False  # a view: nothing built per step
        causal = torch.ones(T, L + T, dtype=torch.bool, device=device).tril(L)
        mask = keys[:, None, None, :] & causal  # (B, 1, T, L + T)
        # A padding query would see no key at all. Some SDPA backends (older or fused
        # GPU kernels) return NaN for such a row, and NaN values in the cache poison later
        # steps even where masked; letting every query see itself is cheap insurance.
        rows = torch.arange(T, device=device)
        mask[:, :, rows, L + rows] = True
        return cos, sin, mask, False

    @torch.inference_mode()
    def prefill(
        self,
        idx: Tensor,
        params: SamplingParams,
        *,
        attention_mask: Tensor | None = None,
        uncond_idx: Tensor | None = None,
        uncond_mask: Tensor | None = None,
        num_samples: int = 1,
    ) -> Prefilled:
        """The left-padded prompts (and unconditional prompts) in one cache, expanded."""
        guided = uncond_idx is not None and params.guidance_scale != 1.0
        if guided:
            idx, attention_mask = concat_left_padded(idx, attention_mask, uncond_idx, uncond_mask)
        cache = self.new_cache(idx.size(0), idx.size(1) + params.max_new_tokens)
        logits, _ = self(idx, attention_mask=attention_mask, kv_cache=cache, last_only=True)
        if num_samples > 1:
            cache = cache.expand(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)
        return Prefilled(cache, logits, guided)

    @torch.inference_mode()
    def generate(
        self,
        idx: Tensor | None,
        params: SamplingParams,
        *,
        attention_mask: Tensor | None = None,
        uncond_idx: Tensor | None = None,
        uncond_mask: Tensor | None = None,
        num_samples: int = 1,
        constraints: Sequence[Constraint | None] | None = None,
        generator: Generators = None,
        eos_id: int | None = EOS_ID,
        step_hook: StepHook | None = None,
        logits_processor: LogitsProcessor | None = None,
        prefilled: Prefilled | None = None,
        stopped: StoppedRows | None = None,
    ) -> Tensor:
        """Sample up to `params.max_new_tokens` after left-padded prompts idx (B, T).

        Returns (B·num_samples, n) new tokens, sample j of prompt b in row b·num_samples+j;
        a row that emitted `eos_id` is `<pad>` afterwards, and decoding stops when all
        have. With `uncond_idx` and a guidance scale != 1, an unconditional stream runs
        beside the prompts and logits = uncond + s·(cond − uncond). `constraints` hold
        one entry per output row; `logits_processor` sees every step's masked logits of
        all output rows. The prompt is prefilled once, then expanded; or, with
        `prefilled` (e.g. from model/prefix_cache.py), decoding starts from that cache and
        idx and the prompt arguments are unused.
        `step_hook(t, tokens)` sees the (rows, t + 1) tokens so far after each step; it may
        return a (rows,) bool tensor of rows to stop (they emit `<pad>` from then on).
        `stopped()`, asked before each step, may return a (rows,) bool tensor of rows whose
        result nobody wants (their client went away): they leave the batch, cache,
        constraints, generators and logits-processor state included, so later steps
        compute only the rows still wanted; they are `<pad>` from then on, and decoding
        ends when no row is left. (A `prefilled` without `select`, or a logits processor
        without one, cannot shrink: there the rows only stop, as with `step_hook`.)
        """
        if prefilled is None:
            prefilled = self.prefill(idx, params, attention_mask=attention_mask,
                                     uncond_idx=uncond_idx, uncond_mask=uncond_mask,
                                     num_samples=num_samples)
        cache, logits, guided, forward_step, select = prefilled
        device = logits.device
        rows = logits.size(0) // 2 if guided else logits.size(0)
        if constraints is not None and len(constraints) != rows:
            raise ValueError(f"{len(constraints)} constraints for {rows} output rows")
        if generator is None and params.seed is not None:
            generator = make_generator(params.seed, device)
        out = torch.full((rows, params.max_new_tokens), PAD_ID, dtype=torch.long, device=device)
        s = _LiveRows(cache, logits, forward_step, select, guided, rows,
                      torch.zeros(rows, dtype=torch.bool, device=device),
                      None if constraints is None else list(constraints), generator,
                      logits_processor)
        for t in range(params.max_new_tokens):
            gone = None if stopped is None else stopped()
            if gone is not None and s.leave(gone.to(device)):
                return out[:, :t]
            tok = sample(s.scores(params), params, s.generator).masked_fill_(s.done, PAD_ID)
            if s.live is None:
                out[:, t] = tok
            else:
                out[s.live, t] = tok
            s.advance(tok)
            if step_hook is not None:
                stop = step_hook(t, out[:, : t + 1])
                if stop is not None:
                    stop = stop.to(s.done.device)
                    s.done |= stop if s.live is None else stop[s.live]
                    if bool(s.done.all()):
                        return out[:, : t + 1]
            if eos_id is not None:
                s.done |= tok == eos_id
                if bool(s.done.all()):
                    return out[:, : t + 1]
            if t + 1 < params.max_new_tokens:
                step_idx = torch.cat([tok, tok]) if s.guided else tok
                s.logits = s.forward_step(self, step_idx[:, None], s.cache)
        return out


@dataclass
class _LiveRows:
    """`CM3Decoder.generate`'s rows still decoding and everything indexed by them, so that
    rows nobody wants can leave the batch between steps."""

    cache: Any
    logits: Tensor  # (rows, 1, V), twice the rows when guided
    forward_step: Callable[..., Tensor]
    select: Callable[..., Any] | None  # (cache, rows) -> (cache, step); None: cannot shrink
    guided: bool
    rows: int
    done: Tensor  # (rows,) bool
    constraints: list[Constraint | None] | None
    generator: Generators
    logits_processor: LogitsProcessor | None
    live: Tensor | None = None  # each row's output row; None while every row, in order

    @property
    def can_shrink(self) -> bool:
        return self.select is not None and (
            self.logits_processor is None or hasattr(self.logits_processor, "select"))

    def leave(self, gone: Tensor) -> bool:
        """Rows of `gone` (one per output row) stop; True when no row is left."""
        drop = gone if self.live is None else gone[self.live]
        if not bool(drop.any()):
            return False
        if not self.can_shrink:  # they stop but still take their place in each step
            self.done |= drop
            return bool(self.done.all())
        keep = (~drop).nonzero().squeeze(1)
        if keep.numel() == 0:
            return True
        self.live = keep if self.live is None else self.live[keep]
        both = torch.cat([keep, keep + self.rows]) if self.guided else keep
        self.cache, self.forward_step = self.select(self.cache, both)
        self.logits = self.logits.index_select(0, both)
        self.rows = keep.numel()
        self.done = self.done[keep]
        kept = keep.tolist()
        if self.constraints is not None:
            self.constraints = [self.constraints[i] for i in kept]
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            self.generator = [self.generator[i] for i in kept]
        if self.logits_processor is not None:
            self.logits_processor.select(keep)
        return False

    def scores(self, params: SamplingParams) -> Tensor:
        """The next token's logits: guided, constrained and processed."""
        step = self.logits[:, -1].float()
        if self.guided:
            step = cfg_combine(step[: self.rows], step[self.rows :], params.guidance_scale)
        if self.constraints is not None:
            allowed = batch_allowed_mask(self.constraints, step.size(-1), step.device)
            step = step.masked_fill(~allowed, float("-inf"))
        if self.logits_processor is not None:
            step = self.logits_processor(step)
        return step

    def advance(self, tok: Tensor) -> None:
        if self.logits_processor is not None:
            self.logits_processor.advance(tok)
        if self.constraints is not None:
            for c, token in zip(self.constraints, tok.tolist(), strict=True):
                if c is not None:
                    c.advance(token)


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Token lists -> (B, T) ids left-padded with `pad_id`, and the (B, T) mask of real tokens."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("left_pad needs non-empty sequences")
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        idx[b, T - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, T - len(s) :] = True
    return idx.to(device), mask.to(device)


def concat_left_padded(
    idx_a: Tensor, mask_a: Tensor | None, idx_b: Tensor, mask_b: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Stack two left-padded batches into one, padding the shorter on the left."""
    T = max(idx_a.size(1), idx_b.size(1))

    def widen(idx: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        mask = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        extra = T - idx.size(1)
        return F.pad(idx, (extra, 0), value=PAD_ID), F.pad(mask, (extra, 0), value=False)

    (ia, ma), (ib, mb) = widen(idx_a, mask_a), widen(idx_b, mask_b)
    return torch.cat([ia, ib]), torch.cat([ma, mb])
