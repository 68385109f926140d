"""Generator training speed: one K per batch against one K per sequence (`racm3 bench train`).

RA-CM3 draws K (neighbours in context) from {0, 1, 2}. Drawn per sequence, a batch of 8
almost always holds a K=2 sequence, and `make_batch` pads every sequence to the longest,
so the batch costs as much as an all-K=2 batch. Drawn once per step, the batch's
sequences have about the same length. The K distribution is the same either way.

Both arms run the real `train_generator` loop (forward, backward, clipping, AdamW) with
the shipped demo bundle's decoder shape on a corpus of demo-shaped documents (captions of
6-14 text tokens, an 8x8 grid of image codes), alternately, `repeats` times each; the
median is reported. Wall time is the headline, process CPU time (which leaves out time
other processes held the cores) is given beside it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import cpu_name
from benchmarks.output import publish
from model.bundle import DEFAULT_BUNDLE, Bundle
from model.decoder import CM3Decoder, DecoderConfig
from model.tokens import PAD_ID, TokenSpace
from training.train_generator import (
    GeneratorTrainConfig,
    TrainingCorpus,
    build_batch,
    train_generator,
)


def demo_shapes(path: Path = DEFAULT_BUNDLE) -> tuple[DecoderConfig, TokenSpace, int]:
    """The bundle's RA-CM3 decoder shape, token space and training batch size."""
    bundle = Bundle(path)
    return (bundle.decoder("ra_cm3").config, bundle.space,
            int(bundle.manifest["recipe"]["gen_batch"]))


def synthetic_corpus(space: TokenSpace, n_main: int = 512, n_memory: int = 2048,
                     seed: int = 0) -> TrainingCorpus:
    """Documents with the demo world's lengths; random ids (speed does not depend on them)."""
    rng = np.random.default_rng(seed)
    n_codes = space.image_grid[0] * space.image_grid[1]

    def doc() -> list[int]:
        text = rng.integers(0, space.text_vocab_size, size=int(rng.integers(6, 15))).tolist()
        return space.document_ids(text, rng.integers(0, space.codebook_size, size=n_codes))

    main = [doc() for _ in range(n_main)]
    memory = [doc() for _ in range(n_memory)]
    table = rng.integers(0, n_memory, size=(n_main, 2, 2))
    return TrainingCorpus(main, memory, table, tuple(space.image_grid))


def _token_counts(corpus: TrainingCorpus, cfg: GeneratorTrainConfig, block_size: int,
                  steps: int) -> tuple[int, int]:
    """(real tokens, padded batch slots) over the first `steps` batches."""
    real = slots = 0
    for step in range(steps):
        idx = build_batch(corpus, step, cfg, block_size)[0]
        real += int((idx != PAD_ID).sum())
        slots += idx.numel()
    return real, slots


def _timed_run(corpus: TrainingCorpus, model: DecoderConfig, cfg: GeneratorTrainConfig,
               device: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        w0, c0 = time.perf_counter(), time.process_time()
        # each step reads its loss back to the host, so the loop is synchronous on CUDA too
        train_generator(corpus, model, cfg, tmp, device=device, resume=False, progress=False)
        return time.perf_counter() - w0, time.process_time() - c0


def run(steps: int = 60, repeats: int = 3, threads: int = 1, device: str = "cpu",
        bundle: Path = DEFAULT_BUNDLE) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model, space, batch = demo_shapes(bundle)
    corpus = synthetic_corpus(space)
    base = GeneratorTrainConfig(steps=steps, batch_size=batch, ckpt_every=10**9,
                                log_every=10**9)
    arms = {"per_batch": replace(base, k_per_batch=True),
            "per_sequence": replace(base, k_per_batch=False)}
    _timed_run(corpus, model, replace(base, steps=5), device)  # warm-up: allocator, kernels
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, cfg in arms.items():
            timings[name].append(_timed_run(corpus, model, cfg, device))
    out: dict[str, Any] = {
        "bench": "train", "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name(),
        "torch": torch.__version__, "threads": threads, "steps": steps, "repeats": repeats,
        "batch_size": batch, "params": sum(p.numel() for p in CM3Decoder(model).parameters()),
        "decoder": {"n_layer": model.n_layer, "n_embd": model.n_embd, "n_head": model.n_head},
    }
    for name, cfg in arms.items():
        wall = statistics.median(t[0] for t in timings[name])
        cpu = statistics.median(t[1] for t in timings[name])
        real, slots = _token_counts(corpus, cfg, model.block_size, steps)
        out[name] = {"s_per_step": wall / steps, "steps_per_s": steps / wall,
                     "cpu_s_per_step": cpu / steps, "real_tokens_per_s": real / wall,
                     "padding_frac": 1 - real / slots}
    per_seq, per_batch = out["per_sequence"], out["per_batch"]
    out["speedup"] = per_seq["s_per_step"] / per_batch["s_per_step"]
    out["speedup_cpu"] = per_seq["cpu_s_per_step"] / per_batch["cpu_s_per_step"]
    return out


def format_table(r: dict[str, Any]) -> str:
    head = (f"train bench: RA-CM3 demo decoder ({r['params'] / 1e6:.2f}M params), batch "
            f"{r['batch_size']}, {r['steps']} steps x {r['repeats']} (median), "
            f"{r['device']} ({r['device_name']}), torch {r['torch']}, {r['threads']} thread(s)")
    rows = [f"{'K drawn':<13} {'steps/s':>8} {'ms/step':>8} {'real tok/s':>11} {'padding':>8}"]
    for name in ("per_sequence", "per_batch"):
        a = r[name]
        rows.append(f"{name.replace('_', ' '):<13} {a['steps_per_s']:>8.2f} "
                    f"{a['s_per_step'] * 1000:>8.1f} {a['real_tokens_per_s']:>11.0f} "
                    f"{a['padding_frac']:>7.1%}")
    rows.append(f"one K per batch: {r['speedup']:.2f}x steps/s by wall time, "
                f"{r['speedup_cpu']:.2f}x by process CPU time")
    return head + "\n" + "\n".join(rows)


def main(json_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    result = run(**kwargs)
    return publish(result, format_table(result), json_path)
