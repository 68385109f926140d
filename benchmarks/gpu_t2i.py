"""Text-to-image through the engine with a decoder of a given preset's shape and random
weights: the fast path (compiled step; CUDA graphs on CUDA) against the plain path, in
one run (`python -m benchmarks.gpu_t2i`).

The demo bundle supplies the tokenizer, the VQ and CLIP; the decoder has the preset's
depth, width and context with the demo token space, and random weights, so the images
mean nothing but the work per request is that of a `small` RA-CM3. Each job carries two
synthetic retrieved documents (a caption and an 8x8 grid of codes), as K=2 retrieval
would give. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.bundle import DEFAULT_BUNDLE, Bundle
from model.decoder import CM3Decoder, DecoderConfig
from model.engine import Engine
from model.fast_decode import FastDecodeOptions
from model.jobs import NeighbourDoc, SamplingParams, T2IJob

log = logging.getLogger(__name__)


def random_decoder(bundle: Bundle, preset: str, device: str) -> CM3Decoder:
    """The preset's shape over the bundle's token space, randomly initialised."""
    shipped = bundle.decoder("ra_cm3").config
    config = DecoderConfig.preset(preset, vocab_size=shipped.vocab_size)
    config.image_offset, config.codebook_size = shipped.image_offset, shipped.codebook_size
    config.image_len = shipped.image_len
    torch.manual_seed(0)
    return CM3Decoder(config).to(device).eval()


def jobs(bundle: Bundle, count: int, candidates: int, seed0: int) -> list[T2IJob]:
    rng = np.random.default_rng(seed0)
    space, grid = bundle.space, bundle.space.image_grid
    tok = bundle.tokenizer

    def doc(i: int) -> NeighbourDoc:
        caption = f"a big red square on the left {i}"
        return NeighbourDoc(i, 0.5, caption, tok.encode(caption),
                            rng.integers(0, space.codebook_size, grid))

    return [T2IJob(f"a small blue circle at the top {seed0 + j}", [doc(2 * j), doc(2 * j + 1)],
                   1, candidates, SamplingParams(seed=seed0 + j, guidance_scale=3.0))
            for j in range(count)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(preset: str = "small", device: str = "cuda", batches: tuple[int, ...] = (1, 8),
        candidates: tuple[int, ...] = (1, 8), repeats: int = 3, compile: str = "auto",
        bundle_dir: Path = DEFAULT_BUNDLE) -> dict[str, Any]:
    bundle = Bundle(bundle_dir, device=device)
    decoder = random_decoder(bundle, preset, device)
    # the batches below, prompts of two documents and a caption (the 192-token bucket)
    shapes = tuple((b, c, 192, True, bundle.space.image_len) for b in batches for c in candidates)
    fast = Engine(decoder, bundle.space, bundle.tokenizer, bundle.vq, bundle.clip,
                  image_size=bundle.image_size, device=device,
                  fast=FastDecodeOptions(compile=compile, warmup_shapes=shapes))
    plain = Engine(decoder, bundle.space, bundle.tokenizer, bundle.vq, bundle.clip,
                   image_size=bundle.image_size, device=device,
                   fast=FastDecodeOptions(enabled=False))
    result: dict[str, Any] = {
        "preset": preset, "device": device, "decoder_params": decoder.num_params(),
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "compile": compile, "repeats": repeats,
    }
    t0 = time.perf_counter()
    fast.warmup()
    plain.warmup()
    _sync(device)
    result["warmup_s"] = time.perf_counter() - t0
    result["compiled_shapes"] = len(fast.fast.runner.compiled)
    for b in batches:
        for c in candidates:
            times: dict[str, list[float]] = {"fast": [], "plain": []}
            same = True
            for r in range(repeats + 1):  # the first round warms caches and is not timed
                batch = jobs(bundle, b, c, 1000 * r)
                out = {}
                for name, engine in (("fast", fast), ("plain", plain)):
                    _sync(device)
                    t = time.perf_counter()
                    out[name] = engine.text_to_image(batch)
                    _sync(device)
                    if r:
                        times[name].append(time.perf_counter() - t)
                same &= all(np.array_equal(x.codes, y.codes)
                            for a, p in zip(out["fast"], out["plain"], strict=True)
                            for x, y in zip(a, p, strict=True))
            f, p = statistics.median(times["fast"]), statistics.median(times["plain"])
            key = f"b{b}_c{c}"
            result[f"fast_ms_{key}"] = 1e3 * f
            result[f"plain_ms_{key}"] = 1e3 * p
            result[f"speedup_{key}"] = p / f
            result[f"same_images_{key}"] = bool(same)
            log.info("%s: fast %.1f ms, plain %.1f ms", key, 1e3 * f, 1e3 * p)
    return result


def format_table(r: dict[str, Any]) -> str:
    lines = [f"text-to-image, {r['preset']} preset shape ({r['decoder_params'] / 1e6:.0f}M "
             f"params, random weights) on {r['device_name']}, torch {r['torch']}, "
             f"compile={r['compile']} ({r['compiled_shapes']} shapes), warm-up "
             f"{r['warmup_s']:.0f} s",
             f"{'jobs x candidates':>18}{'fast ms':>10}{'plain ms':>10}{'speedup':>9}"
             f"{'same':>6}"]
    for key in sorted(k.removeprefix("fast_ms_") for k in r if k.startswith("fast_ms_")):
        b, c = key.removeprefix("b").split("_c")
        lines.append(f"{f'{b} x {c}':>18}{r[f'fast_ms_{key}']:>10.1f}"
                     f"{r[f'plain_ms_{key}']:>10.1f}{r[f'speedup_{key}']:>8.2f}x"
                     f"{str(r[f'same_images_{key}']):>6}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, action="append", help="jobs per call (repeat)")
    ap.add_argument("--candidates", type=int, action="append", help="per job (repeat)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.preset, args.device, tuple(args.batch or (1, 8)),
                 tuple(args.candidates or (1, 8)), args.repeats, args.compile)
    print(format_table(result))  # noqa: T201 - a benchmark prints its table
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
