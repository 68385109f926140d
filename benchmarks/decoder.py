"""Decoding speed of the CM3 decoder (`racm3 bench decoder`).

Four questions, answered in one run on one machine:
- tokens/s of greedy decoding at batch 1 and 8 through the serving path (model/fast_decode:
  shared prefill and the static decode step, compiled as `--compile` says: by default
  where warm-up measured it faster on the CPU, always on CUDA, where it is a CUDA graph);
- the same through the plain path (`CM3Decoder.generate`'s own prefill and cached
  forward), and whether both give the same tokens;
- how both compare with HF `GPT2LMHeadModel.generate` at the same depth, width, heads
  and vocabulary (random weights, greedy, same prompt and new-token counts);
- how much the KV cache saves over recomputing the whole sequence every step.

The arms run alternately, `repeats` times each, and the median is reported, so that load
from other processes on a shared machine hits them alike. On the CPU the same ratios are
also given by process CPU time (`*_cpu` keys), which leaves out the time other processes
held the cores; wall-clock numbers stay the headline. Compilation happens before timing.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks.machine import cpu_name
from benchmarks.output import publish
from model.decoder import CM3Decoder, DecoderConfig
from model.fast_decode import FastDecode, FastDecodeOptions
from model.sampling import SamplingParams
from model.tokens import NUM_SPECIAL

log = logging.getLogger(__name__)


class Timing(NamedTuple):
    wall: float  # seconds
    cpu: float  # process CPU seconds, all threads


def _timed(fn: Callable[[], Any], device: torch.device) -> Timing:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Timing(time.perf_counter() - w0, time.process_time() - c0)


def _median(timings: list[Timing]) -> Timing:
    return Timing(
        statistics.median(t.wall for t in timings), statistics.median(t.cpu for t in timings)
    )


def _hf_twin(config: DecoderConfig, n_positions: int) -> torch.nn.Module:
    """GPT-2 with our depth, width, heads and vocabulary; it never stops on <eos>."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(hf_config)
    model.generation_config.eos_token_id = None
    return model


def _recompute_generate(model: CM3Decoder, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence goes through every step."""
    seq = idx
    for _ in range(new_tokens):
        logits, _ = model(seq, last_only=True)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, idx.size(1) :]


def run(
    preset: str = "demo",
    device: str = "cpu",
    prompt_len: int = 64,
    new_tokens: int = 256,
    batch_sizes: tuple[int, ...] = (1, 8),
    repeats: int = 3,
    threads: int | None = None,
    dtype: str | None = None,
    compare_hf: bool = True,
    recompute: bool = True,
    compile: str = "auto",
) -> dict[str, Any]:
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[dtype]
    torch_dtype = torch_dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    torch.manual_seed(0)

    config = DecoderConfig.preset(preset)
    total = prompt_len + new_tokens
    if total > config.block_size:
        config.block_size = total  # the benchmark may ask for more than the preset's context
    ours = CM3Decoder(config).to(dev, torch_dtype).eval()
    if dev.type == "cpu":
        ours.use_decode_layout()  # GPT-2's (in, out) weights, as the HF twin has them
    hf = _hf_twin(config, total).to(dev, torch_dtype).eval() if compare_hf else None
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    # no prefix cache: every timed run prefills its prompts, as the other arms do
    fast = FastDecode(ours, FastDecodeOptions(prefix_cache_bytes=0, compile=compile))

    result: dict[str, Any] = {
        "preset": preset,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": ours.num_params(),
        "hf_params": sum(p.numel() for p in hf.parameters()) if hf is not None else None,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "compile": compile,
    }
    if hf is not None:
        import transformers

        result["transformers"] = transformers.__version__

    with torch.inference_mode():
        for B in batch_sizes:
            result.update(_measure_batch(B, ours, hf, fast, params, config.vocab_size,
                                         prompt_len, new_tokens, repeats, dev))
            log.info("batch %d done", B)
        result["compiled_shapes"] = len(fast.runner.compiled)
        result["step_timings_ms"] = {str(k): v for k, v in fast.runner.timings_ms.items()}

        if recompute:
            result.update(_kv_vs_recompute(ours, params, prompt_len, new_tokens, dev, repeats))
    return result


def _measure_batch(B: int, ours: CM3Decoder, hf: Any, fast: FastDecode,
                   params: SamplingParams, vocab_size: int, prompt_len: int, new_tokens: int,
                   repeats: int, dev: torch.device) -> dict[str, Any]:
    """The fast path, the plain one and Hugging Face (when given) on one batch of B random
    prompts, alternately, `repeats` times each; tokens/s and the ratios."""
    # no special tokens: a random <break> would split the prompt into segments
    idx = torch.randint(NUM_SPECIAL, vocab_size, (B, prompt_len), device=dev)
    ones = torch.ones_like(idx)
    rows = idx.tolist()

    def fast_fn() -> torch.Tensor:
        prefilled = fast.prefill(rows, None, 1, new_tokens)
        return ours.generate(None, params, eos_id=None, prefilled=prefilled)

    def plain_fn() -> torch.Tensor:
        return ours.generate(idx, params, eos_id=None)

    def hf_fn() -> torch.Tensor:
        return hf.generate(idx, attention_mask=ones, max_new_tokens=new_tokens, do_sample=False)

    result: dict[str, Any] = {}
    # warm-up: compile this batch's step shape, allocator, lazy initialisation
    t0 = time.perf_counter()
    fast.runner.warmup([fast.prefill(rows, None, 1, new_tokens).cache])
    result[f"warmup_s_b{B}"] = time.perf_counter() - t0
    result[f"compiled_b{B}"] = bool(fast.runner.compiled)
    result[f"same_tokens_as_plain_b{B}"] = bool(torch.equal(fast_fn(), plain_fn()))
    if hf is not None:
        hf_fn()
    arms: dict[str, list[Timing]] = {"fast": [], "plain": [], "hf": []}
    for _ in range(repeats):
        arms["fast"].append(_timed(fast_fn, dev))
        arms["plain"].append(_timed(plain_fn, dev))
        if hf is not None:
            arms["hf"].append(_timed(hf_fn, dev))
    t, t_plain = _median(arms["fast"]), _median(arms["plain"])
    result[f"tokens_per_s_b{B}"] = B * new_tokens / t.wall
    result[f"ms_per_step_b{B}"] = 1e3 * t.wall / new_tokens
    result[f"plain_tokens_per_s_b{B}"] = B * new_tokens / t_plain.wall
    result[f"plain_ms_per_step_b{B}"] = 1e3 * t_plain.wall / new_tokens
    result[f"vs_plain_b{B}"] = t_plain.wall / t.wall
    if hf is not None:
        t_hf = _median(arms["hf"])
        result[f"hf_tokens_per_s_b{B}"] = B * new_tokens / t_hf.wall
        result[f"hf_ms_per_step_b{B}"] = 1e3 * t_hf.wall / new_tokens
        result[f"vs_hf_b{B}"] = t_hf.wall / t.wall
        result[f"plain_vs_hf_b{B}"] = t_hf.wall / t_plain.wall
        if dev.type == "cpu":
            result[f"vs_hf_b{B}_cpu"] = t_hf.cpu / t.cpu
            result[f"plain_vs_hf_b{B}_cpu"] = t_hf.cpu / t_plain.cpu
    return result


def _kv_vs_recompute(
    model: CM3Decoder,
    params: SamplingParams,
    prompt_len: int,
    new_tokens: int,
    dev: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """KV cache against full recomputation at batch 1, end to end and for one step."""
    total = prompt_len + new_tokens
    idx = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=dev)
    cached = model.generate(idx, params, eos_id=None)
    t_cached = _median(
        [_timed(lambda: model.generate(idx, params, eos_id=None), dev) for _ in range(repeats)]
    )
    recomputed: list[torch.Tensor] = []
    t_full = _timed(lambda: recomputed.append(_recompute_generate(model, idx, new_tokens)), dev)

    # one step at the full length: a forward over all `total` tokens vs one cached token
    seq = torch.randint(0, model.config.vocab_size, (1, total), device=dev)
    cache = model.new_cache(1, total)
    model(seq[:, :-1], kv_cache=cache)
    length = cache.length

    def cached_step() -> None:
        cache.length = length  # rewrite the same last slot every time
        cache.next_pos.fill_(length)
        model(seq[:, -1:], kv_cache=cache)

    step_cached = _median([_timed(cached_step, dev) for _ in range(20)])
    step_full = _median([_timed(lambda: model(seq, last_only=True), dev) for _ in range(5)])
    out = {
        "kv_len": total,
        "kv_speedup": t_full.wall / t_cached.wall,
        "recompute_tokens_per_s_b1": new_tokens / t_full.wall,
        "kv_matches_recompute": bool(torch.equal(cached, recomputed[0])),
        f"ms_step_cached_at_{total}": 1e3 * step_cached.wall,
        f"ms_step_full_at_{total}": 1e3 * step_full.wall,
        f"kv_step_speedup_at_{total}": step_full.wall / step_cached.wall,
    }
    if dev.type == "cpu":
        out["kv_speedup_cpu"] = t_full.cpu / t_cached.cpu
        out[f"kv_step_speedup_at_{total}_cpu"] = step_full.cpu / step_cached.cpu
    return out



def format_table(r: dict[str, Any]) -> str:
    head = (
        f"decoder bench: preset={r['preset']} ({r['params'] / 1e6:.2f}M params) "
        f"device={r['device']} ({r['device_name']}) dtype={r['dtype']} "
        f"torch={r['torch']} threads={r['threads']}\n"
        f"prompt={r['prompt_len']} new={r['new_tokens']} median of {r['repeats']}; "
        f"decode step compile={r['compile']} ({r['compiled_shapes']} shapes compiled)"
    )
    rows = [f"{'batch':>5} {'fast tok/s':>11} {'ms/step':>8} {'plain ms/step':>13} "
            f"{'HF ms/step':>10} {'fast/HF':>8} {'plain/HF':>9} {'compiled':>9} {'same':>5}"]
    for key in sorted(k for k in r if k.startswith("tokens_per_s_b")):
        B = key.removeprefix("tokens_per_s_b")
        hf_ms = r.get(f"hf_ms_per_step_b{B}")
        rows.append(
            f"{B:>5} {r[key]:>11.1f} {r[f'ms_per_step_b{B}']:>8.2f} "
            f"{r[f'plain_ms_per_step_b{B}']:>13.2f} "
            + (
                f"{hf_ms:>10.2f} {r[f'vs_hf_b{B}']:>7.2f}x {r[f'plain_vs_hf_b{B}']:>8.2f}x"
                if hf_ms is not None
                else f"{'-':>10} {'-':>8} {'-':>9}"
            )
            + f" {str(r[f'compiled_b{B}']):>9} {str(r[f'same_tokens_as_plain_b{B}']):>5}"
        )
    if "kv_speedup" in r:
        n = r["kv_len"]
        rows.append(
            f"KV cache vs recomputation at {n} tokens, batch 1: {r['kv_speedup']:.1f}x end to "
            f"end ({r['recompute_tokens_per_s_b1']:.1f} tok/s without cache); one step "
            f"{r[f'ms_step_cached_at_{n}']:.2f} ms vs {r[f'ms_step_full_at_{n}']:.2f} ms "
            f"({r[f'kv_step_speedup_at_{n}']:.1f}x); same tokens: {r['kv_matches_recompute']}"
        )
    cpu = [f"fast/HF b{k.removeprefix('vs_hf_b').removesuffix('_cpu')} {r[k]:.2f}x"
           for k in sorted(r) if k.startswith("vs_hf_b") and k.endswith("_cpu")]
    if "kv_speedup_cpu" in r:
        n = r["kv_len"]
        cpu += [f"KV end to end {r['kv_speedup_cpu']:.1f}x",
                f"KV one step {r[f'kv_step_speedup_at_{n}_cpu']:.1f}x"]
    if cpu:
        rows.append("by process CPU time (ignores other load): " + ", ".join(cpu))
    return head + "\n" + "\n".join(rows)


def main(json_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    result = run(**kwargs)
    return publish(result, format_table(result), json_path, print_json=False)
