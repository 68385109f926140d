"""The RA-CM3 loss: L = L_main + α·L_retr, as per-token weights.

Alignment. `loss_weights` gives one weight per token of a sequence: the weight of
*predicting* that token. Training shifts by one (`idx = seq[:-1]`, `targets = seq[1:]`),
so `make_batch` pairs target `seq[t + 1]` with weight `w[t + 1]`; the first token is
never a target.

Weights: main-document tokens 1, retrieved-document tokens α (the `<break>` after a
retrieved document belongs to it), sentinels `<mask:i>` and `<pad>` 0. The loss is the
weighted mean sum(w·CE) / sum(w), i.e. (ΣCE_main + α·ΣCE_retr) / (N_main + α·N_retr).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from model.tokens import MASK_IDS, PAD_ID, SEG_MAIN, SEG_RETRIEVED

RETRIEVED_ALPHA = 0.1  # α in the paper
IGNORE_INDEX = -100  # target id that carries no loss (padding); F.cross_entropy's default
_MASKS = frozenset(MASK_IDS)


def loss_weights(
    segments: Sequence[int],
    ids: Sequence[int],
    alpha: float = RETRIEVED_ALPHA,
    sentinel_mask: Sequence[bool] | None = None,
) -> list[float]:
    """Per-token weight of predicting each token of `ids` (see the module docstring).

    `sentinel_mask` (e.g. `MaskedSequence.is_sentinel`) marks extra zero-weight
    positions; `<mask:i>` ids are always weight 0, with or without it.
    """
    if len(segments) != len(ids):
        raise ValueError(f"{len(segments)} segment labels for {len(ids)} tokens")
    if sentinel_mask is not None and len(sentinel_mask) != len(ids):
        raise ValueError(f"{len(sentinel_mask)} sentinel flags for {len(ids)} tokens")
    by_segment = {SEG_MAIN: 1.0, SEG_RETRIEVED: float(alpha)}
    weights: list[float] = []
    for t, (seg, tok) in enumerate(zip(segments, ids, strict=True)):
        tok = int(tok)
        if seg not in by_segment:
            raise ValueError(f"unknown segment label {seg} at position {t}")
        silent = tok in _MASKS or tok == PAD_ID or (sentinel_mask is not None and sentinel_mask[t])
        weights.append(0.0 if silent else by_segment[seg])
    return weights


def make_batch(
    sequences: Sequence[Sequence[int]],
    weights: Sequence[Sequence[float]],
    block_size: int,
    pad_id: int = PAD_ID,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `(idx, targets, weights)`, each (B, T), for `decoder(idx, targets, w)`.

    T is the longest `len(seq) - 1` in the batch. Padding has target `pad_id` and weight
    0. A sequence longer than `block_size + 1` is an error: cutting it would silently drop
    part of a document, so the caller must choose what to leave out.
    """
    if len(sequences) != len(weights) or not sequences:
        raise ValueError("need one weight list per sequence, and at least one sequence")
    for seq, w in zip(sequences, weights, strict=True):
        if len(seq) != len(w):
            raise ValueError(f"sequence of {len(seq)} tokens has {len(w)} weights")
        if len(seq) < 2:
            raise ValueError("a training sequence needs at least 2 tokens")
        if len(seq) - 1 > block_size:
            raise ValueError(f"sequence of {len(seq)} tokens exceeds block_size {block_size} + 1")
    B, T = len(sequences), max(len(s) for s in sequences) - 1
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    w_out = torch.zeros((B, T), dtype=torch.float32)
    for b, (seq, w) in enumerate(zip(sequences, weights, strict=True)):
        n = len(seq) - 1
        seq_t = torch.as_tensor([int(t) for t in seq], dtype=torch.long)
        idx[b, :n] = seq_t[:-1]
        targets[b, :n] = seq_t[1:]
        w_out[b, :n] = torch.as_tensor(w[1:], dtype=torch.float32)
    return idx, targets, w_out


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE, (B, T, V) x (B, T) -> (B, T), computed in fp32 for bf16 logits; a
    target of IGNORE_INDEX has CE 0."""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T),
                         ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(B, T)


def weighted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    total_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum(w·CE) / sum(w): L_main + α·L_retr, normalised by the total weight.

    `weights` None weighs every token 1; a target of IGNORE_INDEX weighs 0 either way.
    `total_weight` replaces sum(w) as the normaliser: under data parallelism, the sum over
    every rank's batch, so the loss is the same whatever the world size.
    An all-zero weight batch gives 0 (still connected to the graph), not NaN.
    """
    ce = token_cross_entropy(logits, targets)
    kept = (targets != IGNORE_INDEX).to(ce.dtype)
    w = kept if weights is None else weights.to(ce.dtype) * kept
    # where, not a bare product: 0·inf would be NaN if a padded target had -inf logit
    weighted = torch.where(w > 0, ce * w, torch.zeros_like(ce))
    total = w.sum() if total_weight is None else total_weight.to(ce.dtype)
    return weighted.sum() / total.clamp_min(torch.finfo(ce.dtype).tiny)
