"""The RA-CM3 loss: per-token weights, batching, and the weighted cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.loss import loss_weights, make_batch, token_cross_entropy, weighted_cross_entropy
from model.masking import apply_spans, causal_mask
from model.tokens import (
    BREAK_ID,
    EOS_ID,
    IMG_CLOSE_ID,
    IMG_OPEN_ID,
    PAD_ID,
    SEG_MAIN,
    SEG_RETRIEVED,
    SRC_ID,
    assemble,
    mask_id,
)

torch.set_num_threads(2)

R1 = [IMG_OPEN_ID, 30, 31, SRC_ID, 60, 61, IMG_CLOSE_ID]
R2 = [IMG_OPEN_ID, 32, SRC_ID, 62, 63, IMG_CLOSE_ID]
MAIN = [IMG_OPEN_ID, 33, 34, 35, SRC_ID, 64, 65, 66, 67, IMG_CLOSE_ID]
A, R = 0.1, SEG_RETRIEVED


def _example() -> tuple[list[int], list[int], list[bool]]:
    """2 retrieved docs + a main doc with 2 masked spans + <eos> + 3 <pad>."""
    a = assemble([R1, R2], MAIN)
    start = a.segments.index(SEG_MAIN)
    # mask the caption tokens 34, 35 and the image codes 65, 66
    m = apply_spans(a.ids, [(start + 2, start + 4), (start + 6, start + 8)])
    segments = m.carry(a.segments, fill=SEG_MAIN)
    return [*m.ids, PAD_ID, PAD_ID, PAD_ID], [*segments, *[SEG_MAIN] * 3], m.is_sentinel


def test_weights_exactly_as_specified() -> None:
    ids, segments, sentinel = _example()
    m0, m1 = mask_id(0), mask_id(1)
    assert ids == [
        *R1, BREAK_ID, *R2, BREAK_ID,
        IMG_OPEN_ID, 33, m0, SRC_ID, 64, m1, 67, IMG_CLOSE_ID,
        m0, 34, 35, m1, 65, 66, EOS_ID, PAD_ID, PAD_ID, PAD_ID,
    ]  # fmt: skip
    expected = (
        [A] * (len(R1) + 1 + len(R2) + 1)  # retrieved docs, each with its <break>
        + [1, 1, 0, 1, 1, 0, 1, 1]  # main doc with its two placeholders
        + [0, 1, 1, 0, 1, 1, 1]  # appended spans, then <eos>
        + [0, 0, 0]  # padding
    )
    got = loss_weights(segments, ids, alpha=A, sentinel_mask=[*sentinel, False, False, False])
    assert got == pytest.approx(expected)
    # sentinel ids are weight 0 even without the flags
    assert loss_weights(segments, ids, alpha=A) == pytest.approx(expected)
    assert loss_weights(segments, ids, alpha=0.5)[0] == 0.5


def test_sentinel_mask_zeroes_extra_positions() -> None:
    w = loss_weights([SEG_MAIN] * 3, [40, 41, 42], sentinel_mask=[False, True, False])
    assert w == [1.0, 0.0, 1.0]


def test_weights_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        loss_weights([SEG_MAIN], [40, 41])
    with pytest.raises(ValueError):
        loss_weights([SEG_MAIN, 7], [40, 41])
    with pytest.raises(ValueError):
        loss_weights([SEG_MAIN] * 2, [40, 41], sentinel_mask=[False])


def test_pipeline_weights_from_causal_mask() -> None:
    a = assemble([R1, R2], MAIN)
    start = a.segments.index(SEG_MAIN)
    for seed in range(30):
        m = causal_mask(a.ids, np.random.default_rng(seed), start=start)
        w = loss_weights(m.carry(a.segments, SEG_MAIN), m.ids, A, m.is_sentinel)
        assert w[:start] == pytest.approx([A] * start)
        assert w[start:] == [0.0 if s else 1.0 for s in m.is_sentinel[start:]]


def test_make_batch_shifts_and_pads() -> None:
    s1, w1 = [10, 11, 12, 13], [0.5, 1.0, 0.0, 1.0]
    s2, w2 = [20, 21], [1.0, 0.1]
    idx, targets, weights = make_batch([s1, s2], [w1, w2], block_size=8)
    assert idx.shape == targets.shape == weights.shape == (2, 3)
    assert idx.dtype == targets.dtype == torch.long and weights.dtype == torch.float32
    assert idx.tolist() == [[10, 11, 12], [20, PAD_ID, PAD_ID]]
    assert targets.tolist() == [[11, 12, 13], [21, PAD_ID, PAD_ID]]
    # position t predicts seq[t + 1], with the weight of that token; w[0] is never used
    assert torch.allclose(weights, torch.tensor([[1.0, 0.0, 1.0], [0.1, 0.0, 0.0]]))


def test_make_batch_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="block_size"):
        make_batch([[1] * 10], [[1.0] * 10], block_size=8)
    assert make_batch([[1] * 9], [[1.0] * 9], block_size=8)[0].shape == (1, 8)
    with pytest.raises(ValueError):
        make_batch([[1, 2]], [[1.0]], block_size=8)
    with pytest.raises(ValueError):
        make_batch([[1]], [[1.0]], block_size=8)


def test_weighted_ce_is_main_plus_alpha_retrieved() -> None:
    ids, segments, sentinel = _example()
    w = loss_weights(segments, ids, A, [*sentinel, False, False, False])
    idx, targets, weights = make_batch([ids], [w], block_size=64)
    V = 80
    logits = torch.randn(1, idx.shape[1], V, generator=torch.Generator().manual_seed(0))
    logits.requires_grad_(True)
    loss = weighted_cross_entropy(logits, targets, weights)

    # by hand, position by position: a target's segment and kind decide its term
    sum_main = sum_retr = 0.0
    n_main = n_retr = 0
    log_probs = torch.log_softmax(logits.detach()[0].double(), dim=-1)
    for t in range(idx.shape[1]):
        j = t + 1  # the target's index in the sequence
        ce = -log_probs[t, ids[j]].item()
        if ids[j] == PAD_ID or (j < len(sentinel) and sentinel[j]):
            continue
        if segments[j] == SEG_RETRIEVED:
            sum_retr, n_retr = sum_retr + ce, n_retr + 1
        else:
            sum_main, n_main = sum_main + ce, n_main + 1
    assert n_retr == len(R1) + len(R2) + 2 - 1  # the first token is never a target
    assert n_main == 6 + 4 + 1
    expected = (sum_main + A * sum_retr) / (n_main + A * n_retr)
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # zero-weight targets (sentinels, padding) get no gradient at all
    loss.backward()
    silent = weights[0] == 0
    assert silent.sum() == 4 + 3
    assert torch.all(logits.grad[0][silent] == 0)
    assert torch.all(logits.grad[0][~silent].abs().sum(-1) > 0)


def test_token_ce_matches_torch_and_handles_bf16() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    ce = token_cross_entropy(logits, targets)
    assert ce.shape == (2, 5)
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    assert torch.allclose(ce, ref)
    ones = torch.ones(2, 5)
    assert weighted_cross_entropy(logits, targets, ones).item() == pytest.approx(ref.mean().item())
    bf16 = weighted_cross_entropy(logits.bfloat16(), targets, ones)
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(ref.mean().item(), rel=2e-2)


def test_all_zero_weights_give_zero_not_nan() -> None:
    logits = torch.randn(1, 3, 7, requires_grad=True)
    targets = torch.tensor([[1, 2, 3]])
    loss = weighted_cross_entropy(logits, targets, torch.zeros(1, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_masked_out_logits_on_padding_do_not_poison_the_loss() -> None:
    logits = torch.zeros(1, 2, 5)
    logits[0, 1, PAD_ID] = -math.inf  # a constrained head may forbid <pad> outright
    targets = torch.tensor([[3, PAD_ID]])
    loss = weighted_cross_entropy(logits, targets, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(math.log(5))
