"""The decoding fast path against the plain one: shared prefill, the prefix cache, the
static step. Every fast path must give exactly the tokens of the slow one."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_module, save_checkpoint
from model.compiled_decode import StepRunner, static_step
from model.decoder import CM3Decoder, DecoderConfig, left_pad
from model.fast_decode import FastDecode, FastDecodeOptions, SharedPrefill
from model.prefix_cache import PrefixCache, prefill_prompt, split_segments
from model.sampling import SamplingParams, make_generator
from model.tokens import BREAK_ID, IMG_OPEN_ID, SRC_ID, mask_id

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model() -> CM3Decoder:
    torch.manual_seed(0)
    # ids 100..191 are image codes with a 2x4 grid, so documents hold runs of codes and
    # the image-grid positions are exercised across segments
    cfg = DecoderConfig(vocab_size=192, n_layer=2, n_head=4, n_embd=64, block_size=160,
                        image_offset=100, codebook_size=92, image_len=8)
    return CM3Decoder(cfg).eval()


def _doc(seed: int, text: int = 5) -> list[int]:
    """A document as the engine lays it out: `<img alt="text" src="codes">`, `<break>`."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(22, 100, (text,), generator=g).tolist()
    codes = torch.randint(100, 192, (8,), generator=g).tolist()
    return [IMG_OPEN_ID, *words, SRC_ID, *codes, 5, BREAK_ID]


def _tail(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [IMG_OPEN_ID, *torch.randint(22, 100, (n,), generator=g).tolist(), SRC_ID]


UNCOND = [IMG_OPEN_ID, mask_id(0), SRC_ID]


def _generate(model: CM3Decoder, prompts: list[list[int]], n: int, seeds: list[int],
              guided: bool, fast: SharedPrefill | None = None, steps: int = 12,
              ) -> torch.Tensor:
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=steps,
                            guidance_scale=3.0 if guided else 1.0)
    gens = [make_generator(s * 1000 + j) for s in seeds for j in range(n)]
    uncond = [UNCOND] * len(prompts) if guided else None
    if fast is None:
        idx, mask = left_pad(prompts)
        u_idx, u_mask = left_pad(uncond) if guided else (None, None)
        return model.generate(idx, params, attention_mask=mask, uncond_idx=u_idx,
                              uncond_mask=u_mask, num_samples=n, generator=gens, eos_id=None)
    prefilled = fast(prompts, uncond, n, steps)
    return model.generate(None, params, num_samples=n, generator=gens, eos_id=None,
                          prefilled=prefilled)


def test_segments_split_after_each_break() -> None:
    a, b, t = _doc(1), _doc(2), _tail(3, 4)
    assert split_segments(a + b + t) == [a, b, t]
    assert split_segments(a + b) == [a, b]
    assert split_segments(t) == [t]


@pytest.mark.parametrize("guided", [False, True])
def test_shared_prefill_gives_the_tokens_of_the_padded_batch(model: CM3Decoder,
                                                              guided: bool) -> None:
    # prompts of different lengths (left padding), one with no documents, two jobs that
    # share documents, and three candidates per job
    prompts = [_doc(1) + _doc(2) + _tail(10, 6), _tail(11, 3), _doc(2) + _tail(12, 9),
               _doc(1) + _doc(2) + _tail(13, 2)]
    seeds = [7, 8, 9, 10]
    plain = _generate(model, prompts, 3, seeds, guided)
    shared = SharedPrefill(model, StepRunner(model, "off"))
    assert torch.equal(_generate(model, prompts, 3, seeds, guided, shared), plain)
    # and through the prefix cache, cold then warm
    cached = SharedPrefill(model, StepRunner(model, "off"), PrefixCache(1 << 24))
    assert torch.equal(_generate(model, prompts, 3, seeds, guided, cached), plain)
    assert torch.equal(_generate(model, prompts, 3, seeds, guided, cached), plain)
    assert cached.cache.stats().hits > 0


def test_the_decode_layout_keeps_the_values_and_the_paths_agree(model: CM3Decoder,
                                                                tmp_path: Path) -> None:
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.use_decode_layout() is m
    w = m.blocks[0].attn.c_attn.weight
    assert w.t().is_contiguous() and not w.is_contiguous()
    assert m.lm_head.weight is m.wte.weight  # still tied
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # the checkpoint stores the same tensors, and loads into the usual layout
    save_checkpoint(m, m.config, tmp_path, "d")
    loaded = load_module(CM3Decoder, DecoderConfig, tmp_path, "d")
    assert loaded.blocks[0].attn.c_attn.weight.is_contiguous()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())
    # sampled, padded, guided rows; and one greedy row, whose cache has no masked slot
    prompts = [_doc(1) + _tail(10, 6), _tail(11, 3)]
    plain = _generate(m, prompts, 2, [4, 5], True)
    assert torch.equal(_generate(m, prompts, 2, [4, 5], True,
                                 SharedPrefill(m, StepRunner(m, "off"))), plain)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    idx, _ = left_pad([_doc(3) + _tail(12, 4)])
    prefilled = SharedPrefill(m, StepRunner(m, "off"))(idx.tolist(), None, 1, 12)
    assert prefilled.cache.groups[0].dense
    assert torch.equal(m.generate(None, params, eos_id=None, prefilled=prefilled),
                       m.generate(idx, params, eos_id=None))


def test_a_cache_hit_gives_exactly_the_logits_of_a_miss(model: CM3Decoder) -> None:
    cache = PrefixCache(1 << 24)
    first = _doc(1) + _doc(2) + _tail(5, 4)
    prefill_prompt(model, first, cache)
    s = cache.stats()
    assert (s.hits, s.misses, s.entries) == (0, 3, 3)
    # the same documents in the same order, another caption: two segments come from the
    # cache, and the caption is prefilled after them
    second = _doc(1) + _doc(2) + _tail(6, 7)
    hit = prefill_prompt(model, second, cache)
    miss = prefill_prompt(model, second, None)
    s = cache.stats()
    assert (s.hits, s.misses) == (2, 4)
    assert s.hit_tokens == len(_doc(1)) + len(_doc(2))
    assert [n.end for n in hit] == [n.end for n in miss]
    for h, m in zip(hit, miss, strict=True):
        assert torch.equal(h.logits, m.logits)
        assert all(torch.equal(a, b) for a, b in zip(h.k, m.k, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(h.v, m.v, strict=True))
        assert h.code_run == m.code_run
    # and it is what one forward over the whole prompt gives (to float tolerance)
    with torch.inference_mode():
        whole, _ = model(torch.tensor([second]))
    torch.testing.assert_close(hit[-1].logits, whole[0, -1], atol=1e-4, rtol=0)
    # the other order is another prefix: nothing is reused
    prefill_prompt(model, _doc(2) + _doc(1) + _tail(6, 7), cache)
    assert cache.stats().hits == 2


def test_the_prefix_cache_keeps_to_its_byte_bound(model: CM3Decoder) -> None:
    one_doc = prefill_prompt(model, _doc(0))[0].nbytes
    cache = PrefixCache(10 * one_doc)
    for i in range(40):  # 40 documents (+ tails) through a cache that holds about 10
        prefill_prompt(model, _doc(i) + _tail(i, 3), cache)
        assert cache.nbytes <= cache.max_bytes
    s = cache.stats()
    assert s.evictions > 0 and 0 < s.entries < 40 and s.bytes == cache.nbytes
    # least recently used goes first: the newest documents are still there
    prefill_prompt(model, _doc(39) + _tail(99, 3), cache)
    assert cache.stats().hits == 1
    prefill_prompt(model, _doc(0) + _tail(99, 3), cache)
    assert cache.stats().hits == 1  # long evicted
    # an entry bigger than the whole cache is not kept (and evicts nothing)
    tiny = PrefixCache(one_doc // 2)
    prefill_prompt(model, _doc(1), tiny)
    assert len(tiny) == 0 and tiny.nbytes == 0


def test_static_step_bucketed_shapes_give_the_same_tokens(model: CM3Decoder) -> None:
    # "on" compiles at warm-up; with no warm-up the runner compiled nothing, so it runs the
    # static step eagerly on bucketed shapes (padding rows and slots), as a graph sees them
    prompts = [_doc(1) + _tail(10, 6), _tail(11, 3), _doc(3) + _doc(4) + _tail(12, 9)]
    seeds = [1, 2, 3]
    plain = _generate(model, prompts, 2, seeds, True)
    runner = StepRunner(model, "on")
    bucketed = SharedPrefill(model, runner)
    state = bucketed(prompts, [UNCOND] * 3, 2, 12).cache
    assert state.rows == 16 and state.max_new == 64  # 8 + 8 rows for 6 + 6, 64 slots for 12
    assert [g.prompt_len for g in state.groups] == [64, 64]
    assert torch.equal(_generate(model, prompts, 2, seeds, True, bucketed), plain)


def test_fast_decode_reports_its_cache(model: CM3Decoder) -> None:
    fast = FastDecode(model, FastDecodeOptions(prefix_cache_bytes=1 << 20, compile="off"))
    fast.prefill([_doc(1) + _tail(2, 3)], None, 1, 4)
    fast.prefill([_doc(1) + _tail(3, 3)], None, 1, 4)
    stats = fast.stats()["prefix_cache"]
    assert (stats["hits"], stats["misses"]) == (1, 3)
    assert 0 < stats["bytes"] <= stats["max_bytes"] == 1 << 20
    assert FastDecode(model, FastDecodeOptions(prefix_cache_bytes=0)).cache is None


@pytest.mark.slow  # inductor compiles C++ for the CPU: minutes on a loaded 2-core machine
def test_compiled_step_gives_the_tokens_of_the_eager_step(model: CM3Decoder) -> None:
    prompts = [_doc(1) + _tail(10, 6), _tail(11, 3), _doc(3) + _doc(4) + _tail(12, 9)]
    seeds = [1, 2, 3]
    eager = SharedPrefill(model, StepRunner(model, "auto"))  # nothing compiled: eager
    want = _generate(model, prompts, 2, seeds, True, eager)
    runner = StepRunner(model, "on")
    compiled = SharedPrefill(model, runner)
    state = compiled(prompts, [UNCOND] * 3, 2, 12).cache
    runner.warmup([state])
    assert state.shape_key() in runner.timings_ms  # compiled, and timed against eager
    runner.compiled.add(state.shape_key())  # use it whichever was faster here
    assert runner.step_fn(state) is not static_step
    assert torch.equal(_generate(model, prompts, 2, seeds, True, compiled), want)
    assert torch.equal(_generate(model, prompts, 2, seeds, True, SharedPrefill(
        model, StepRunner(model, "off"))), want)
