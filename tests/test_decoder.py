"""CM3 decoder: the fast paths (KV cache, padded batches, expand) against the slow ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.decoder import (
    PRESET_TARGET_PARAMS,
    CM3Decoder,
    DecoderConfig,
    left_pad,
)
from model.loss import IGNORE_INDEX
from model.sampling import SamplingParams, cfg_combine
from model.tokens import EOS_ID, PAD_ID

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model() -> CM3Decoder:
    torch.manual_seed(0)
    # ids 100..191 are image codes with a 2x4 grid, so random prompts hold runs of codes of
    # every length and every cache test below also checks the image-grid positions
    cfg = DecoderConfig(vocab_size=192, n_layer=2, n_head=4, n_embd=64, block_size=96,
                        image_offset=100, codebook_size=92, image_len=8)
    return CM3Decoder(cfg).eval()


def test_grid_positions_count_codes_within_each_image_run(model: CM3Decoder) -> None:
    # text 30, codes 100+, specials 3/4/5: an image of 8 codes, a split one, a long run
    ids = [3, 30, 4, *range(100, 108), 5, 101, 102, 9, 103, *range(110, 120)]
    want = [0, 0, 0, *range(1, 9), 0, 1, 2, 0, *range(1, 9), 1, 2, 3]  # 11 wrap
    got = model.grid_positions(torch.tensor([ids]))
    assert got[0].tolist() == want
    # chunked through a cache, runs continue across chunk boundaries
    cache = model.new_cache(1, len(ids))
    parts = [model.grid_positions(torch.tensor([ids[a:b]]), cache)
             for a, b in ((0, 5), (5, 6), (6, 14), (14, len(ids)))]
    assert torch.cat(parts, dim=1)[0].tolist() == want
    assert model.wge.weight[0].abs().sum() == 0  # text and markup get no grid embedding


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(22, 192, (n,), generator=g).tolist()  # no specials, so no pad


def _decode_logits(model: CM3Decoder, idx, mask, steps: torch.Tensor, cache=None) -> torch.Tensor:
    """Prefill, then feed `steps` (B, S) one column at a time; last-position logits per step."""
    cache = cache or model.new_cache(idx.size(0), idx.size(1) + steps.size(1))
    with torch.inference_mode():
        logits, _ = model(idx, attention_mask=mask, kv_cache=cache)
        out = [logits[:, -1]]
        for s in range(steps.size(1)):
            logits, _ = model(steps[:, s : s + 1], kv_cache=cache)
            out.append(logits[:, -1])
    return torch.stack(out, dim=1)  # (B, S + 1, V)


def test_kv_cache_matches_full_recomputation(model: CM3Decoder) -> None:
    seq = torch.tensor([_prompt(40, 1)])
    with torch.inference_mode():
        full, _ = model(seq)
        cache = model.new_cache(1, 48)
        first, _ = model(seq[:, :16], kv_cache=cache)  # prefill
        chunk, _ = model(seq[:, 16:24], kv_cache=cache)  # a chunk appended to the cache
        steps = [model(seq[:, t : t + 1], kv_cache=cache)[0] for t in range(24, 40)]
    incremental = torch.cat([first, chunk, *steps], dim=1)
    assert cache.length == 40
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)


def test_left_padded_batch_decodes_like_unbatched_runs(model: CM3Decoder) -> None:
    prompts = [_prompt(5, 2), _prompt(17, 3), _prompt(11, 4)]
    idx, mask = left_pad(prompts)
    assert idx[0, 0] == PAD_ID and not mask[0, 0]
    steps = torch.tensor([_prompt(6, 10 + b) for b in range(3)])
    cache = model.new_cache(3, idx.size(1) + steps.size(1))
    batched = _decode_logits(model, idx, mask, steps, cache)
    # RoPE positions count real tokens only: each row's next position is its own length
    assert cache.next_pos.tolist() == [len(p) + steps.size(1) for p in prompts]
    for b, p in enumerate(prompts):
        alone = _decode_logits(model, torch.tensor([p]), None, steps[b : b + 1])
        torch.testing.assert_close(batched[b], alone[0], atol=ATOL, rtol=0)

    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    together = model.generate(idx, params, attention_mask=mask, eos_id=None)
    for b, p in enumerate(prompts):
        assert torch.equal(together[b], model.generate(torch.tensor([p]), params, eos_id=None)[0])


def test_right_padded_full_forward_matches_unbatched(model: CM3Decoder) -> None:
    prompts = [_prompt(9, 5), _prompt(20, 6)]
    T = 20
    idx = torch.full((2, T), PAD_ID)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, : len(p)] = torch.tensor(p)
        mask[b, : len(p)] = True
    with torch.inference_mode():
        batched, _ = model(idx, attention_mask=mask)
        for b, p in enumerate(prompts):
            alone, _ = model(torch.tensor([p]))
            torch.testing.assert_close(batched[b, : len(p)], alone[0], atol=ATOL, rtol=0)
        assert torch.isfinite(batched).all()


@pytest.mark.parametrize("name", ["demo", "small", "cm3-medium"])
def test_presets_build_on_meta_within_10_percent_of_target(name: str) -> None:
    config = DecoderConfig.preset(name)
    with torch.device("meta"):
        decoder = CM3Decoder(config)
    target = PRESET_TARGET_PARAMS[name]
    assert abs(decoder.num_params() - target) / target < 0.10, decoder.num_params()
    assert config.vocab_size % 64 == 0
    if name == "cm3-medium":
        assert (config.n_layer, config.n_embd, config.n_head, config.block_size) == (
            32, 2560, 32, 4096,
        )


def test_expand_after_prefill_equals_prefilling_copies(model: CM3Decoder) -> None:
    idx, mask = left_pad([_prompt(7, 7), _prompt(13, 8)])
    n = 3
    steps = torch.tensor([_prompt(5, 20 + r) for r in range(2 * n)])  # a different path per row

    shared = model.new_cache(2, 13 + 5)
    with torch.inference_mode():
        prefill, _ = model(idx, attention_mask=mask, kv_cache=shared)
        expanded = shared.expand(n)
        got = [prefill.repeat_interleave(n, 0)[:, -1]]
        for s in range(steps.size(1)):
            got.append(model(steps[:, s : s + 1], kv_cache=expanded)[0][:, -1])
    copies = _decode_logits(
        model, idx.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), steps
    )
    torch.testing.assert_close(torch.stack(got, 1), copies, atol=ATOL, rtol=0)

    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    once = model.generate(idx, params, attention_mask=mask, num_samples=n, eos_id=None)
    again = model.generate(
        idx.repeat_interleave(n, 0), params, attention_mask=mask.repeat_interleave(n, 0),
        eos_id=None,
    )
    assert torch.equal(once, again)


def test_select_keeps_only_the_chosen_rows(model: CM3Decoder) -> None:
    prompts = [_prompt(4, 30), _prompt(9, 31), _prompt(6, 32)]
    idx, mask = left_pad(prompts)
    steps = torch.tensor([_prompt(4, 40 + b) for b in range(3)])
    full = model.new_cache(3, 9 + 4)
    with torch.inference_mode():
        model(idx, attention_mask=mask, kv_cache=full)
        kept = full.select(torch.tensor([2, 0]))  # e.g. request 1 was cancelled
        got = torch.stack(
            [model(steps[[2, 0], s : s + 1], kv_cache=kept)[0][:, -1] for s in range(4)], 1
        )
    for i, b in enumerate([2, 0]):
        alone = _decode_logits(model, torch.tensor([prompts[b]]), None, steps[b : b + 1])
        torch.testing.assert_close(got[i], alone[0, 1:], atol=ATOL, rtol=0)


def test_zero_weight_tokens_do_not_affect_the_loss(model: CM3Decoder) -> None:
    idx = torch.tensor([_prompt(12, 9), _prompt(12, 10)])
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    weights = torch.ones(2, 12)
    weights[0, :4] = 0.0  # e.g. sentinels
    weights[1, 6:] = 0.1  # e.g. retrieved documents at α
    logits, loss = model(idx, targets=targets, loss_weights=weights)

    changed = targets.clone()
    changed[0, :4] = (changed[0, :4] + 7) % 192
    _, loss_changed = model(idx, targets=changed, loss_weights=weights)
    torch.testing.assert_close(loss_changed, loss)

    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none",
                         ignore_index=IGNORE_INDEX)
    w = weights.flatten() * (targets.flatten() != IGNORE_INDEX)
    torch.testing.assert_close(loss, (ce * w).sum() / w.sum())

    _, unweighted = model(idx, targets=targets)
    torch.testing.assert_close(unweighted, F.cross_entropy(logits.flatten(0, 1),
                                                           targets.flatten()))
    assert not torch.isclose(unweighted, loss)


def test_training_step_with_right_padding_has_finite_gradients() -> None:
    torch.manual_seed(1)
    cfg = DecoderConfig(vocab_size=128, n_layer=2, n_head=2, n_embd=32, block_size=32,
                        dropout=0.1)
    model = CM3Decoder(cfg).train()
    idx = torch.randint(22, 128, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    targets = torch.roll(idx, -1, 1).masked_fill(~mask, IGNORE_INDEX)
    _, loss = model(idx, targets=targets, attention_mask=mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.lm_head.weight is model.wte.weight  # tied


class _EosAt:
    """Allows everything except that it forces `<eos>` at one step."""

    def __init__(self, step: int, vocab: int) -> None:
        self.step, self.vocab, self.seen = step, vocab, 0

    def allowed_mask(self, device) -> torch.Tensor:
        mask = torch.ones(self.vocab, dtype=torch.bool, device=device)
        if self.seen == self.step:
            mask[:] = False
            mask[EOS_ID] = True
        else:
            mask[EOS_ID] = False
        return mask

    def advance(self, token: int) -> None:
        self.seen += 1


def test_generate_stops_each_row_at_eos(model: CM3Decoder) -> None:
    idx, mask = left_pad([_prompt(4, 11), _prompt(6, 12)])
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=20)
    out = model.generate(idx, params, attention_mask=mask,
                         constraints=[_EosAt(2, 192), _EosAt(5, 192)])
    assert out.shape == (2, 6)  # stops once every row is done
    assert out[0, 2] == EOS_ID and (out[0, 3:] == PAD_ID).all()
    assert out[1, 5] == EOS_ID and (out[1, :5] != EOS_ID).all()


def test_guided_generation_uses_cfg_combined_logits(model: CM3Decoder) -> None:
    cond, uncond = torch.tensor([_prompt(10, 13)]), torch.tensor([_prompt(3, 14)])
    scale = 3.0
    params = SamplingParams(temperature=0.0, max_new_tokens=1, guidance_scale=scale)
    with torch.inference_mode():
        expected = cfg_combine(model(cond)[0][:, -1], model(uncond)[0][:, -1], scale).argmax(-1)
    assert torch.equal(model.generate(cond, params, uncond_idx=uncond)[:, 0], expected)

    no_guidance = SamplingParams(temperature=0.0, max_new_tokens=4)
    assert torch.equal(model.generate(cond, no_guidance, uncond_idx=uncond),
                       model.generate(cond, no_guidance))


def test_config_round_trips_through_a_dict() -> None:
    config = DecoderConfig.preset("demo")
    assert DecoderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        DecoderConfig.preset("huge")


def test_meta_build_then_load_matches_the_original(model: CM3Decoder) -> None:
    with torch.device("meta"):
        empty = CM3Decoder(model.config)
    loaded = empty.to_empty(device="cpu")
    loaded.load_state_dict(model.state_dict())
    assert "rope_cos" not in model.state_dict()  # derived, not stored
    loaded.reset_rope_tables()
    idx = torch.tensor([_prompt(10, 16)])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.eval()(idx)[0], model(idx)[0])


def test_cache_refuses_to_overflow(model: CM3Decoder) -> None:
    cache = model.new_cache(1, 8)
    with torch.inference_mode(), pytest.raises(ValueError, match="cache full"):
        model(torch.tensor([_prompt(9, 15)]), kv_cache=cache)
