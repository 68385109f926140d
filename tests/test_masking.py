"""CM3 causal masking: properties over many seeds, the inverse, and infilling prompts."""

from __future__ import annotations

import numpy as np
import pytest

from model.masking import (
    apply_spans,
    causal_mask,
    contiguous_runs,
    draw_spans,
    infill_prompt,
    infill_prompt_from_runs,
    splice,
    unmask,
)
from model.tokens import (
    BREAK_ID,
    EOS_ID,
    IMG_CLOSE_ID,
    IMG_OPEN_ID,
    MASK_IDS,
    NUM_SPECIAL,
    SEG_MAIN,
    SEG_RETRIEVED,
    SRC_ID,
    assemble,
    mask_id,
)

MASKS = set(MASK_IDS)


def _doc(rng: np.random.Generator, n: int) -> list[int]:
    # ordinary (non-special) ids; distinct values make misplaced tokens visible
    return [int(t) for t in rng.integers(NUM_SPECIAL, NUM_SPECIAL + 500, n)]


def _assembled(seed: int):
    rng = np.random.default_rng(10_000 + seed)
    retrieved = [_doc(rng, int(rng.integers(1, 30))) for _ in range(int(rng.integers(0, 3)))]
    return assemble(retrieved, _doc(rng, int(rng.integers(1, 80))), eos=bool(seed % 4))


@pytest.mark.parametrize("seed", range(300))
def test_causal_mask_properties(seed: int) -> None:
    a = _assembled(seed)
    start = a.segments.index(SEG_MAIN)
    has_eos = a.ids[-1] == EOS_ID
    end = len(a.ids) - has_eos
    m = causal_mask(a.ids, np.random.default_rng(seed), start=start)

    n = len(m.spans)
    assert 1 <= n <= 16
    assert all(start <= s < e <= end for s, e in m.spans)  # non-empty, in the main document
    assert all(m.spans[i][1] < m.spans[i + 1][0] for i in range(n - 1))  # sorted, apart

    assert len(m.ids) == len(a.ids) + 2 * n
    assert m.ids[:start] == a.ids[:start]  # retrieved documents untouched
    assert (m.ids[-1] == EOS_ID) == has_eos and m.ids.count(EOS_ID) == int(has_eos)
    for i in range(n):
        assert m.ids.count(mask_id(i)) == 2
    assert not any(mask_id(i) in m.ids for i in range(n, 16))
    assert m.is_sentinel == [t in MASKS for t in m.ids]
    carried = m.carry(a.ids, fill=-1)
    assert carried == [-1 if s else t for t, s in zip(m.ids, m.is_sentinel, strict=True)]
    assert unmask(m.ids) == a.ids


def test_appended_layout_matches_cm3() -> None:
    ids = [100, 101, BREAK_ID, *range(200, 207), EOS_ID]  # a b c d e f g = 200..206
    m = apply_spans(ids, [(4, 6), (7, 9)])
    assert m.ids == [
        100, 101, BREAK_ID, 200, mask_id(0), 203, mask_id(1), 206,
        mask_id(0), 201, 202, mask_id(1), 204, 205, EOS_ID,
    ]  # fmt: skip
    assert m.origin == [0, 1, 2, 3, -1, 6, -1, 9, -1, 4, 5, -1, 7, 8, 10]


def test_deterministic_under_seed() -> None:
    ids = list(range(NUM_SPECIAL, NUM_SPECIAL + 200))
    first = causal_mask(ids, np.random.default_rng(7), start=20)
    again = causal_mask(ids, np.random.default_rng(7), start=20)
    assert first == again
    others = {tuple(causal_mask(ids, np.random.default_rng(s), start=20).ids) for s in range(20)}
    assert len(others) > 15  # the seed matters


def test_span_count_follows_clamped_poisson() -> None:
    rng = np.random.default_rng(0)
    counts = np.array([len(draw_spans(1000, rng)) for _ in range(4000)])
    assert counts.min() == 1 and counts.max() <= 16
    # E[clamp(Poisson(1), 1, 16)] = 1 + e^-1; P(n = 1) = 2 e^-1
    assert abs(counts.mean() - (1 + np.exp(-1))) < 0.05
    assert abs((counts == 1).mean() - 2 * np.exp(-1)) < 0.03
    assert (counts >= 3).any()


def test_span_lengths_cover_the_region() -> None:
    rng = np.random.default_rng(1)
    lengths = [e - s for _ in range(2000) for s, e in draw_spans(300, rng, max_spans=1)]
    # one span from two uniform boundaries: mean length L/3, anywhere from 1 to L
    assert abs(np.mean(lengths) / 300 - 1 / 3) < 0.03
    assert min(lengths) <= 3 and max(lengths) >= 280


def test_max_spans_and_max_span_len() -> None:
    rng = np.random.default_rng(2)
    for _ in range(500):
        spans = draw_spans(200, rng, max_spans=2, max_span_len=5)
        assert 1 <= len(spans) <= 2
        assert all(1 <= e - s <= 5 for s, e in spans)
    with pytest.raises(ValueError):
        draw_spans(10, rng, max_spans=17)


def test_tiny_and_empty_regions() -> None:
    rng = np.random.default_rng(3)
    ids = [100, 101, 102, EOS_ID]
    one = causal_mask(ids, rng, start=2, end=3)
    assert one.spans == [(2, 3)]
    assert one.ids == [100, 101, mask_id(0), mask_id(0), 102, EOS_ID]
    none = causal_mask(ids, rng, start=3)
    assert none.spans == [] and none.ids == ids
    # an explicit end past the <eos> still leaves it out of the region
    for seed in range(50):
        m = causal_mask(ids, np.random.default_rng(seed), start=0, end=len(ids))
        assert m.ids[-1] == EOS_ID and all(e <= 3 for _, e in m.spans)


def test_region_holding_sentinels_or_eos_is_refused() -> None:
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="sentinel"):
        causal_mask([100, mask_id(0), 101], rng)
    with pytest.raises(ValueError, match="sentinel"):
        causal_mask([100, EOS_ID, 101], rng)
    with pytest.raises(ValueError, match="region"):
        causal_mask([100, 101], rng, start=3)


def test_segments_carried_through_masking() -> None:
    a = assemble([[100, 101], [102]], [200, 201, 202, 203])
    start = a.segments.index(SEG_MAIN)
    m = causal_mask(a.ids, np.random.default_rng(5), start=start)
    seg = m.carry(a.segments, fill=SEG_MAIN)
    assert seg[:start] == [SEG_RETRIEVED] * start
    assert seg[start:] == [SEG_MAIN] * (len(m.ids) - start)


def test_unmask_refuses_unmasked_input() -> None:
    with pytest.raises(ValueError):
        unmask([100, 101, EOS_ID])
    with pytest.raises(ValueError):
        unmask([100, mask_id(0), 101, mask_id(0), 102, mask_id(2), 103])  # 1 missing


def test_contiguous_runs() -> None:
    assert contiguous_runs([9, 3, 4, 5, 4]) == [(3, 6), (9, 10)]
    assert contiguous_runs([]) == []


def test_infill_prompt_image_runs() -> None:
    # a main document whose image codes 300..315 are masked in three runs
    ids = [100, 101, BREAK_ID, 50, 51, 52, *range(300, 316), 53, EOS_ID]
    img = 6
    positions = [img + p for p in (0, 1, 2, 7, 8, 14)]
    p = infill_prompt(ids, positions)
    assert p.runs == [(6, 9), (13, 15), (20, 21)]
    assert p.run_lengths == [3, 2, 1]
    assert p.ids[-1] == mask_id(0) and EOS_ID not in p.ids
    assert p.ids[:6] == ids[:6]  # context before the first run is kept exactly
    truth = [ids[s:e] for s, e in p.runs]
    assert p.prompt_for(truth[:2]) == [*p.template, mask_id(0), *truth[0], mask_id(1),
                                       *truth[1], mask_id(2)]  # fmt: skip
    assert p.splice(truth) == ids
    # tokens outside the runs are kept exactly, whatever is generated
    filled = p.splice([[900] * 3, [901] * 2, [902]])
    outside = [i for i in range(len(ids)) if i not in positions]
    assert [filled[i] for i in outside] == [ids[i] for i in outside]
    with pytest.raises(ValueError):
        p.prompt_for(truth)


def test_inference_prompt_is_a_prefix_of_the_training_form() -> None:
    rng = np.random.default_rng(6)
    for seed in range(50):
        ids = [*_doc(rng, int(rng.integers(2, 60))), EOS_ID]
        m = causal_mask(ids, np.random.default_rng(seed))
        p = infill_prompt_from_runs(ids, m.spans)
        truth = [ids[s:e] for s, e in m.spans]
        for k in range(len(truth)):
            prompt = p.prompt_for(truth[:k])
            assert m.ids[: len(prompt)] == prompt
        assert p.splice(truth) == ids


def test_captioning_prompt_inserts_an_empty_run() -> None:
    # <img alt="<mask:0>" src="[image]"><mask:0>: an image-only document has no text to mask
    open_, src, close = IMG_OPEN_ID, SRC_ID, IMG_CLOSE_ID
    doc = [open_, src, 300, 301, close]
    p = infill_prompt_from_runs(doc, [(1, 1)])
    assert p.ids == [open_, mask_id(0), src, 300, 301, close, mask_id(0)]
    assert p.splice([[120, 121]]) == [open_, 120, 121, src, 300, 301, close]


def test_infill_limits() -> None:
    ids = list(range(100, 140))
    with pytest.raises(ValueError, match="16"):
        infill_prompt(ids, range(0, 34, 2))  # 17 runs
    assert len(infill_prompt(ids, range(0, 32, 2)).runs) == 16
    with pytest.raises(ValueError):
        infill_prompt(ids, [])
    with pytest.raises(ValueError):
        infill_prompt(ids, [40])  # out of range
    with pytest.raises(ValueError):
        infill_prompt_from_runs(ids, [(5, 8), (7, 9)])  # overlapping


def test_splice_checks_counts() -> None:
    template = [100, mask_id(0), 101, mask_id(1)]
    assert splice(template, [[1], [2, 3]]) == [100, 1, 101, 2, 3]
    with pytest.raises(ValueError):
        splice(template, [[1]])
    with pytest.raises(ValueError):
        splice(template, [[1], [2], [3]])
