"""Choosing the retrieval-guidance weight (`racm3 bench guidance`), off the eval's prompts.

Every weight answers the same prompts with the same seeds, none of which `racm3 eval`
uses:

- `t2i`: object and pair prompts from beyond the eval's first `eval_n` (eval decoding:
  temperature 0.5, top-k 16, CFG 2, 8 reranked candidates), judged; FID against real
  renders of the same prompts;
- `entity`: the memory-only entities under the caption templates the eval does not ask
  with (2, 3, 4), seeds from 50,000, eval decoding, judge's entity head;
- `novel`: flags of kinds the world never makes, drawn with another seed than the
  eval's (other names, other colours), appended to a copy of the memory with
  `build-index --append`, asked with the API's default settings;
- `captions`: flag images of the eval split in another order than the eval's (seed 1),
  greedy captions, the share that names the entity.

Text queries retrieve in the service's default mode unless `mode` says otherwise.

    racm3 bench guidance --memory memory --weights 0,0.5,0.9 --n 100 --threads 1
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import cpu_name
from evaluation.evaluate import DRAWN_MAX_DIFFERENCE, EvalConfig, Evaluator, api_default_job
from evaluation.metrics import attribute_match, frechet_distance
from model.bundle import Bundle
from retrieval.memory import Memory
from world import ENTITY_HEAD
from world.captions import caption as render_caption

ENTITY_TEMPLATES = (2, 3, 4)
ENTITY_SEED = 50_000
NOVEL_SEED = 1
CAPTION_ORDER_SEED = 1


def run(bundle: Bundle, memory_dir: Path, weights: list[float], n: int, eval_n: int = 200,
        novel: int = 12, novel_samples: int = 2, mode: str | None = None) -> dict[str, Any]:
    memory = Memory.load(memory_dir)
    ev = Evaluator(bundle, memory, EvalConfig(n=eval_n + n, seed=CAPTION_ORDER_SEED,
                                              retrieval_mode=mode))
    t2i = ev.t2i_prompts()[eval_n:]
    names = list(ev.world.memory_only_entities)
    heads = ev.world.label_heads[ENTITY_HEAD]
    entity = [(render_caption({"kind": "entity", "entity": names[i % len(names)]},
                              ENTITY_TEMPLATES[(i // len(names)) % len(ENTITY_TEMPLATES)]),
               heads.index(names[i % len(names)])) for i in range(n)]
    flag_items = [it for it in ev.eval_items("entity")][:n]

    t2i_nbs = ev.retrieve_for_texts([c for c, _ in t2i])
    entity_nbs = ev.retrieve_for_texts([c for c, _ in entity])
    caption_nbs = ev.retrieve_for_images(np.stack([it.image for it in flag_items]))
    real = ev.judge.features(ev.real_renders([a for _, a in t2i]))
    novel_memory = _novel_memory(bundle, memory_dir, novel) if novel else None
    novel_asks = (_novel_asks(bundle, novel_memory, novel, novel_samples, ev.served_mode)
                  if novel else None)

    rows = []
    for weight in weights:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"weight": weight}
        images = _t2i(ev, [c for c, _ in t2i], t2i_nbs, 60_000, weight)
        match = attribute_match(ev.judge.predict_attributes(images, ev.world), [a for _, a in t2i])
        row["t2i_attr_acc"] = match["attribute"]
        row["t2i_fid"] = frechet_distance(ev.judge.features(images), real, use_scipy=False)
        images = _t2i(ev, [c for c, _ in entity], entity_nbs, ENTITY_SEED, weight)
        row["entity_acc"] = float((ev.judge.predict(images)[ENTITY_HEAD]
                                   == np.array([t for _, t in entity])).mean())
        caps = _captions(ev, flag_items, caption_nbs, weight)
        row["caption_named"] = float(np.mean([it.attributes["entity"].lower() in c.lower()
                                              for it, c in zip(flag_items, caps, strict=True)]))
        if novel_asks is not None:
            row["novel_drawn"] = _novel(ev, *novel_asks, weight)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if novel_memory is not None:
        shutil.rmtree(novel_memory.parent, ignore_errors=True)
    return {"rows": rows, "n": n, "retrieval_mode": ev.served_mode,
            "machine": cpu_name(), "threads": torch.get_num_threads(),
            "novel_flags": novel, "novel_samples": novel_samples}


def _t2i(ev: Evaluator, prompts: list[str], neighbours, seed: int, weight: float) -> np.ndarray:
    from model.jobs import T2IJob

    d = ev.config.t2i
    jobs = [T2IJob(p, nbs, n=1, num_candidates=d.num_candidates, sampling=d.sampling(seed + i),
                   retrieval_guidance=weight)
            for i, (p, nbs) in enumerate(zip(prompts, neighbours, strict=True))]
    return np.stack([r[0].image for r in ev._batched(ev.engine.text_to_image, jobs)])


def _captions(ev: Evaluator, items, neighbours, weight: float) -> list[str]:
    from model.jobs import CaptionJob

    d = ev.config.caption
    jobs = [CaptionJob(it.image, nbs, n=1, num_candidates=1, sampling=d.sampling(i),
                       retrieval_guidance=weight)
            for i, (it, nbs) in enumerate(zip(items, neighbours, strict=True))]
    return [r[0].text for r in ev._batched(ev.engine.caption, jobs)]


def _novel_memory(bundle: Bundle, memory_dir: Path, n_flags: int) -> Path:
    from evaluation.evaluate import append_to_memory
    from world import World, WorldConfig
    from world.novel_flags import novel_flags

    world = World(WorldConfig.from_dict(bundle.manifest["world"]))
    copy = Path(tempfile.mkdtemp()) / "memory"
    shutil.copytree(memory_dir, copy)
    flags = novel_flags(world, n_flags, NOVEL_SEED)
    append_to_memory(bundle.path, copy, [(f.image, c) for f in flags for c in f.captions])
    return copy


def _novel_asks(bundle: Bundle, memory_dir: Path, n_flags: int, samples: int, mode: str,
                ) -> tuple[list[str], list, np.ndarray]:
    """Prompts (each phrasing `samples` times), their neighbours in the appended memory,
    and the flag each asks for."""
    from world.novel_flags import novel_flags

    ev = Evaluator(bundle, Memory.load(memory_dir), EvalConfig(n=2, retrieval_mode=mode))
    flags = novel_flags(ev.world, n_flags, NOVEL_SEED)
    prompts = [p for f in flags for p in f.prompts for _ in range(samples)]
    targets = np.stack([f.image for f in flags for _ in f.prompts for _ in range(samples)])
    return prompts, ev.retrieve_for_texts(prompts), targets.astype(np.float32)


def _novel(ev: Evaluator, prompts: list[str], neighbours, targets: np.ndarray,
           weight: float) -> float:
    jobs = []
    for j, (p, nbs) in enumerate(zip(prompts, neighbours, strict=True)):
        job = api_default_job(p, nbs, 90_000 + j)
        job.retrieval_guidance = weight
        jobs.append(job)
    out = np.stack([r[0].image for r in ev._batched(ev.engine.text_to_image, jobs)])
    distance = np.abs(out.astype(np.float32) - targets).mean(axis=(1, 2, 3))
    return float((distance < DRAWN_MAX_DIFFERENCE).mean())


def main(bundle_dir: Path, memory_dir: Path, weights: list[float], n: int, threads: int,
         json_path: Path | None, novel: int, novel_samples: int,
         mode: str | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    result = run(Bundle(bundle_dir), memory_dir, weights, n, novel=novel,
                 novel_samples=novel_samples, mode=mode)
    cols = ["weight", "t2i_attr_acc", "t2i_fid", "entity_acc", "caption_named", "novel_drawn",
            "wall_s"]
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for row in result["rows"]:
        print("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)

