"""Sampling: seeds, top-k/top-p, guidance, and the modality/infilling constraints."""

from __future__ import annotations

import pytest
import torch

from model.decoder import CM3Decoder, DecoderConfig
from model.sampling import (
    DocState,
    InfillSpan,
    ModalityConstraint,
    SamplingParams,
    SpanConstraint,
    apply_top_k,
    apply_top_p,
    batch_allowed_mask,
    cfg_combine,
    make_generator,
    sample,
)
from model.tokens import (
    BREAK_ID,
    EOS_ID,
    IMG_CLOSE_ID,
    IMG_OPEN_ID,
    PAD_ID,
    SRC_ID,
    TokenSpace,
    mask_id,
)

SPACE = TokenSpace(text_vocab_size=1024, codebook_size=512)  # the demo space


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def demo() -> CM3Decoder:
    torch.manual_seed(0)
    return CM3Decoder(DecoderConfig.preset("demo", vocab_size=SPACE.padded_vocab_size)).eval()


def _logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    logits = _logits()
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95)
    draws = [sample(logits, params, make_generator(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    runs = {tuple(sample(logits, params, make_generator(s)).tolist()) for s in range(10)}
    assert len(runs) > 1


def test_seeded_generation_is_reproducible(demo: CM3Decoder) -> None:
    prompt = torch.tensor([[IMG_OPEN_ID, *SPACE.text_to_ids([5, 6, 7])]])
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_new_tokens=12)
    first = demo.generate(prompt, params, eos_id=None)
    assert torch.equal(first, demo.generate(prompt, params, eos_id=None))
    other = demo.generate(prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=124,
                                                 max_new_tokens=12), eos_id=None)
    assert not torch.equal(first, other)


def test_top_k_1_equals_greedy() -> None:
    logits = _logits(rows=8, vocab=300, seed=1)
    greedy = sample(logits, SamplingParams(temperature=0.0))
    assert torch.equal(greedy, logits.argmax(-1))
    for seed in range(5):
        top1 = sample(logits, SamplingParams(temperature=1.5, top_k=1), make_generator(seed))
        assert torch.equal(top1, greedy)


def test_top_k_keeps_exactly_k() -> None:
    kept = torch.isfinite(apply_top_k(_logits(vocab=100), 7))
    assert (kept.sum(-1) == 7).all()


def test_top_p_keeps_the_minimal_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    for p, expected in [(0.4, 1), (0.75, 2), (0.85, 3), (0.97, 4), (1.0, 4)]:
        kept = torch.isfinite(apply_top_p(logits, p))
        assert kept.sum().item() == expected, p
        assert kept[0, :expected].all()  # the most likely ones
    shuffled = logits[:, [2, 0, 3, 1]]
    kept = torch.isfinite(apply_top_p(shuffled, 0.75))
    assert kept.tolist() == [[False, True, False, True]]


def test_per_row_generators_match_rows_sampled_alone() -> None:
    logits = _logits(rows=3, vocab=80, seed=2)
    params = SamplingParams(temperature=1.0)
    seeds = [11, 12, 13]
    together = sample(logits, params, [make_generator(s) for s in seeds])
    for b, s in enumerate(seeds):
        assert together[b] == sample(logits[b : b + 1], params, make_generator(s))[0]


def test_cfg_combine_formula() -> None:
    cond, uncond = _logits(seed=3), _logits(seed=4)
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 3.0), 3 * cond - 2 * uncond)


def test_sampling_params_validate_and_resolve_a_seed() -> None:
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)
    resolved = SamplingParams().with_seed()
    assert resolved.seed is not None and resolved.with_seed() == resolved


def test_text_to_image_decoding_yields_exactly_image_len_codes(demo: CM3Decoder) -> None:
    caption = SPACE.text_to_ids([17, 301, 42])  # stands in for "a red square"
    prompt = [IMG_OPEN_ID, *caption, SRC_ID]
    rows = 24
    constraints = [ModalityConstraint.from_prompt(SPACE, prompt) for _ in range(rows)]
    assert constraints[0].state is DocState.SRC and constraints[0].codes_emitted == 0
    params = SamplingParams(temperature=1.3, max_new_tokens=SPACE.image_len + 2)
    out = demo.generate(
        torch.tensor([prompt]),
        params,
        num_samples=rows,
        constraints=constraints,
        generator=[make_generator(seed) for seed in range(rows)],
    )
    n = SPACE.image_len
    for row in out.tolist():
        assert all(SPACE.is_image(t) for t in row[:n])
        assert row[n] == IMG_CLOSE_ID
        assert row[n + 1] in (EOS_ID, BREAK_ID, IMG_OPEN_ID)
    assert len({tuple(r[:n]) for r in out.tolist()}) == rows  # the seeds really differ


def test_alt_allows_text_and_src_only() -> None:
    c = ModalityConstraint.from_prompt(SPACE, [IMG_OPEN_ID, *SPACE.text_to_ids([1])])
    assert c.state is DocState.ALT
    allowed = c.allowed_mask("cpu")
    assert allowed[SPACE.text_offset : SPACE.image_offset].all()
    assert not allowed[SPACE.image_offset :].any()
    assert allowed.nonzero().flatten().tolist()[0] == SRC_ID
    assert allowed.sum() == SPACE.text_vocab_size + 1


def test_modality_state_machine_follows_documents() -> None:
    retrieved = [IMG_OPEN_ID, *SPACE.text_to_ids([3]), SRC_ID,
                 *SPACE.codes_to_ids(list(range(SPACE.image_len))), IMG_CLOSE_ID, BREAK_ID]
    c = ModalityConstraint.from_prompt(SPACE, retrieved)
    assert c.state is DocState.START
    assert c.allowed_mask("cpu").nonzero().flatten().tolist() == [IMG_OPEN_ID]
    c = ModalityConstraint(SPACE, DocState.SRC, codes_emitted=SPACE.image_len - 1)
    c.advance(SPACE.image_offset)
    assert c.allowed_mask("cpu").nonzero().flatten().tolist() == [IMG_CLOSE_ID]
    c.advance(IMG_CLOSE_ID)
    c.advance(EOS_ID)
    assert c.done
    batch = batch_allowed_mask([c, None], SPACE.padded_vocab_size, "cpu")
    assert batch.shape == (2, SPACE.padded_vocab_size)
    assert batch[1].all() and batch[0].sum() == 1
    # captioning form: a sentinel inside alt leaves us in alt
    c = ModalityConstraint.from_prompt(SPACE, [IMG_OPEN_ID, mask_id(0)])
    assert c.state is DocState.ALT


def test_span_constraint_infills_image_runs_then_eos(demo: CM3Decoder) -> None:
    template = [IMG_OPEN_ID, *SPACE.text_to_ids([9, 10]), SRC_ID,
                *SPACE.codes_to_ids([1] * 40), mask_id(0), *SPACE.codes_to_ids([2] * 10),
                mask_id(1), *SPACE.codes_to_ids([3] * 4), IMG_CLOSE_ID]
    prompt = torch.tensor([[*template, mask_id(0)]])
    for seed in range(4):
        span = SpanConstraint.image_runs(SPACE, [6, 4])
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=20)
        out = demo.generate(prompt, params, constraints=[span])[0].tolist()
        assert all(SPACE.is_image(t) for t in out[:6])
        assert out[6] == mask_id(1)
        assert all(SPACE.is_image(t) for t in out[7:11])
        assert out[11:] == [EOS_ID] and span.done


def test_span_constraint_text_span_and_forced_sentinel() -> None:
    c = SpanConstraint(SPACE, [InfillSpan("text")], expect_sentinel=True)
    assert c.allowed_mask("cpu").nonzero().flatten().tolist() == [mask_id(0)]
    c.advance(mask_id(0))
    first = c.allowed_mask("cpu")
    assert not first[EOS_ID] and first[SPACE.text_offset :SPACE.image_offset].all()
    c.advance(SPACE.text_offset + 5)
    later = c.allowed_mask("cpu")
    assert later[EOS_ID] and not later[SPACE.image_offset :].any() and not later[PAD_ID]
    c.advance(EOS_ID)
    assert c.done
    with pytest.raises(ValueError):
        InfillSpan("image")
