"""Dense against hybrid retrieval on a bundle's memory (`racm3 bench hybrid`).

Quality, with the retrieval the service runs (K=2, the bundle's diversity threshold):
- entity: "the flag of X" for the world's memory-only entities, as `racm3 eval` asks
  (n prompts, caption templates in turn): the right entity first, and among the K;
  `dev_entity` is the same for the entities seen in training (prompts outside the eval);
- t2i: the eval's object and pair prompts: the judge's attribute accuracy on the first
  neighbour's stored image (retrieval alone as a text-to-image system) and the attribute
  accuracy of the first and second neighbours' captions; `dev_t2i` the same on captions
  of the train split;
- new_names: flags in patterns the world never draws, each appended as one "the flag of
  NAME" document through `racm3 build-index --source folder --append` (a subprocess, as
  a user runs it) to a copy of the memory, then asked for in several phrasings;
- image queries (captioning's retrieval): `i2t_entity` the eval's i2t flag images, the
  right entity first and among the K; `i2t_scenes` its object and pair images, the
  attribute accuracy of the first neighbour's caption; `new_images` each appended flag's
  own image and a re-photographed copy (`evaluation.evaluate.rephotographed`).

Cost: per-query search latency (CLIP and VQ encoding excluded, the same encoded queries
for both modes), the lexical index's build time from the store, its load time and its
size, and the time to read the stored codes for image queries.
Ratios are hybrid / dense, measured in the same run.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import cpu_name
from benchmarks.output import publish

PHRASINGS = ("the flag of {}", "{}'s national banner", "show me the flag of {} please",
             "a picture of {}'s flag")
MODES = ("dense", "hybrid")


# --- flags the world never draws ---------------------------------------------------------


def novel_flags(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n flags in layouts outside the world's flag grammar, 2-3 palette colours each."""
    from world.render import FLAG_PALETTE

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    layouts = [
        lambda: (np.floor(y * 4) + np.floor(x * 4)) % 2,  # checkerboard
        lambda: (x > y).astype(float),  # diagonal split
        lambda: np.floor(np.maximum(abs(x - 0.5), abs(y - 0.5)) * 6) % 2,  # concentric squares
        lambda: np.floor((x + 0.5 * y) * 5) % 2,  # slanted stripes
        lambda: ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.09).astype(float),  # disc
        lambda: (x < 0.3).astype(float) + (x >= 0.3) * (y > 0.5) * 2,  # band beside a field
        lambda: ((np.floor(x * 6) % 2) * (np.floor(y * 6) % 2)),  # dots on a grid
        lambda: (y > 1 - x / 2).astype(float) + (y < x / 2) * 2,  # two wedges
        lambda: (abs(((x - 0.5) ** 2 + (y - 0.5) ** 2) ** 0.5 - 0.3) < 0.08).astype(float),
        lambda: (abs(x - y) < 0.15).astype(float) + (abs(x + y - 1) < 0.15) * 2,  # saltire
    ]
    colours = np.array(list(FLAG_PALETTE.values()), dtype=np.uint8)
    flags = []
    for i in range(n):
        index = np.clip(layouts[i % len(layouts)]().astype(int), 0, 2)
        lut = colours[rng.choice(len(colours), 3, replace=False)]
        flags.append(lut[index])
    return flags


# --- measurements --------------------------------------------------------------------------


def _first_and_among(neighbours: list[list[Any]], names: list[str]) -> dict[str, float]:
    def has(doc: Any, name: str) -> bool:
        return name.lower() in (doc.caption or "").lower()

    first = [bool(row) and has(row[0], name) for row, name in zip(neighbours, names, strict=True)]
    among = [any(has(d, name) for d in row) for row, name in zip(neighbours, names, strict=True)]
    return {"first": float(np.mean(first)), "among_k": float(np.mean(among)), "n": len(names)}


def _t2i_quality(neighbours: list[list[Any]], targets: list[dict], judge: Any,
                 world: Any) -> dict[str, float]:
    import io

    from PIL import Image

    from evaluation.metrics import attribute_match, caption_attribute_accuracy

    images = np.stack([np.asarray(Image.open(io.BytesIO(row[0].thumbnail_png)).convert("RGB"))
                       for row in neighbours])
    return {
        "judge_top1": attribute_match(judge.predict_attributes(images, world),
                                      targets)["attribute"],
        "caption_top1": caption_attribute_accuracy([r[0].caption or "" for r in neighbours],
                                                   targets)["attribute"],
        "caption_top2": caption_attribute_accuracy(
            [(r[1] if len(r) > 1 else r[0]).caption or "" for r in neighbours],
            targets)["attribute"],
        "n": len(targets),
    }


def _caption_quality(neighbours: list[list[Any]], targets: list[dict]) -> dict[str, float]:
    from evaluation.metrics import caption_attribute_accuracy

    return {"caption_top1": caption_attribute_accuracy(
        [r[0].caption or "" if r else "" for r in neighbours], targets)["attribute"],
        "n": len(targets)}


def _append_flags(bundle_dir: Path, memory_dir: Path, names: list[str], size: int,
                  workdir: Path) -> float:
    from PIL import Image

    folder = workdir / "new-flags"
    folder.mkdir()
    for i, (name, flag) in enumerate(zip(names, novel_flags(len(names), size), strict=True)):
        Image.fromarray(flag).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"the flag of {name}")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "racm3.cli", "build-index", "--source", "folder",
                    "--input", str(folder), "--out", str(memory_dir), "--bundle",
                    str(bundle_dir), "--append"], check=True, capture_output=True)
    return time.perf_counter() - t0


def _image_codes(bundle: Any, images: np.ndarray) -> list[np.ndarray]:
    """The images' VQ codes, as the retriever encodes an image query."""
    return list(bundle.vq.encode_images(images))


def _latency_ms(calls: list[Any], repeats: int) -> dict[str, float]:
    """p50 / p99 over every call, each timed alone, `repeats` rounds."""
    times = []
    for _ in range(repeats):
        for call in calls:
            t0 = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return {"p50_ms": statistics.median(times), "p99_ms": times[int(0.99 * (len(times) - 1))]}


def run(bundle_dir: Path, memory_dir: Path, n: int = 200, new_names: int = 10,
        threads: int = 1, workdir: Path | None = None) -> dict[str, Any]:
    import torch

    from evaluation.evaluate import EvalConfig, Evaluator
    from evaluation.judge import load_judge
    from model.bundle import Bundle, bundle_diversity_threshold
    from retrieval.code_index import CodeIndex
    from retrieval.lexical_index import LexicalIndex
    from retrieval.memory import Memory
    from retrieval.search import SearchStrategy
    from world import World, WorldConfig

    torch.set_num_threads(threads)
    bundle = Bundle(bundle_dir)
    world = World(WorldConfig.from_dict(bundle.manifest["world"]))
    dense = SearchStrategy(k=2, diversity_threshold=bundle_diversity_threshold(bundle.manifest))
    strategies = {"dense": dense, "hybrid": replace(dense, mode="hybrid")}
    sets = _prompt_sets(world, n)
    retrieve = _retriever(bundle.clip, strategies)
    retrieve_images = _image_retriever(bundle, strategies)
    # the eval's i2t items (Evaluator's, without loading its decoders)
    items = Evaluator.eval_items(types.SimpleNamespace(world=world, config=EvalConfig(n=n)))

    memory = Memory.load(memory_dir)
    out: dict[str, Any] = {"memory_version": memory.version, "documents": len(memory)}
    t0 = time.perf_counter()
    LexicalIndex.from_store(memory.store)
    out["lexical_build_from_store_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    h, w = memory.image_grid
    CodeIndex.from_store(memory.store, h * w)
    out["codes_read_from_store_s"] = time.perf_counter() - t0
    judge = load_judge(bundle)
    quality = {mode: {**_quality(lambda texts, m=mode: retrieve(memory, texts, m), sets, judge,
                                 world),
                      **_image_quality(lambda images, m=mode: retrieve_images(memory, images, m),
                                       items)}
               for mode in MODES}
    cost = _search_latency(memory, bundle.clip, strategies, sets)
    cost.update(_image_search_latency(memory, bundle, strategies, items[:100]))
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        out.update(_new_names(bundle, world, memory_dir, Path(scratch), new_names, retrieve,
                              quality, retrieve_images))

    out.update(quality=quality, latency=cost, ratios={
        "search_p50_hybrid_over_dense": cost["hybrid"]["p50_ms"] / cost["dense"]["p50_ms"],
        "entity_among_k_hybrid_over_dense": quality["hybrid"]["entity"]["among_k"]
        / max(quality["dense"]["entity"]["among_k"], 1e-9),
        "t2i_judge_hybrid_over_dense": quality["hybrid"]["t2i"]["judge_top1"]
        / max(quality["dense"]["t2i"]["judge_top1"], 1e-9),
        "i2t_entity_among_k_hybrid_over_dense": quality["hybrid"]["i2t_entity"]["among_k"]
        / max(quality["dense"]["i2t_entity"]["among_k"], 1e-9),
        "image_search_p50_hybrid_over_dense": cost["hybrid_image"]["p50_ms"]
        / cost["dense_image"]["p50_ms"],
    })
    out["config"] = {"bundle": Path(bundle_dir).name, "memory": Path(memory_dir).name, "n": n,
                     "new_names": new_names, "k": 2, "threads": threads}
    out["machine"] = {"cpu": cpu_name(), "python": platform.python_version(),
                      "torch": torch.__version__}
    return out


def _prompt_sets(world: Any, n: int) -> dict[str, list[tuple[str, dict]]]:
    """(prompt, attributes) lists: the eval's own entity and text-to-image prompts
    (Evaluator's, without loading its decoders), and the same kinds from the train split."""
    from evaluation.evaluate import EvalConfig, Evaluator
    from world import n_templates
    from world.captions import caption as render_caption

    prompts = types.SimpleNamespace(world=world, config=EvalConfig(n=n))
    train = (world.sample("train", i) for i in range(world.split_size("train")))
    return {
        "entity": Evaluator.entity_prompts(prompts),
        "t2i": Evaluator.t2i_prompts(prompts),
        "dev_entity": [(render_caption({"kind": "entity", "entity": e}, t), {"entity": e})
                       for e in world.train_entities
                       for t in range(n_templates("entity"))][:n],
        "dev_t2i": list(islice(((it.caption, it.attributes) for it in train
                                if it.attributes["kind"] != "entity"), n)),
    }


def _retriever(clip: Any, strategies: dict[str, Any]) -> Any:
    """retrieve(memory, texts, mode): each text's K=2 neighbours, with their images."""
    from retrieval.search import neighbours, search

    def retrieve(memory: Any, texts: list[str], mode: str) -> list[list[Any]]:
        found = search(memory, clip.encode_text(texts), 2, strategies[mode], texts=texts)
        return [neighbours(memory, hits, text, thumbnails=True)
                for hits, text in zip(found, texts, strict=True)]

    return retrieve


def _quality(retrieve: Any, sets: dict[str, list[tuple[str, dict]]], judge: Any,
             world: Any) -> dict[str, Any]:
    """One mode's retrieval quality on every prompt set."""
    return {
        "entity": _first_and_among(retrieve([p for p, _ in sets["entity"]]),
                                   [a["entity"] for _, a in sets["entity"]]),
        "dev_entity": _first_and_among(retrieve([p for p, _ in sets["dev_entity"]]),
                                       [a["entity"] for _, a in sets["dev_entity"]]),
        "t2i": _t2i_quality(retrieve([p for p, _ in sets["t2i"]]),
                            [a for _, a in sets["t2i"]], judge, world),
        "dev_t2i": _t2i_quality(retrieve([p for p, _ in sets["dev_t2i"]]),
                                [a for _, a in sets["dev_t2i"]], judge, world),
    }


def _search_latency(memory: Any, clip: Any, strategies: dict[str, Any],
                    sets: dict[str, list[tuple[str, dict]]]) -> dict[str, Any]:
    """Per mode: the same encoded queries, one at a time, search and documents."""
    from retrieval.search import neighbours, search

    texts = [p for p, _ in sets["entity"][:50]] + [p for p, _ in sets["t2i"][:50]]
    vectors = clip.encode_text(texts)
    cost: dict[str, Any] = {}
    for mode in MODES:
        calls = [lambda i=i, text=text, mode=mode: neighbours(memory, search(
            memory, vectors[i : i + 1], 2, strategies[mode], texts=[text])[0], text)
            for i, text in enumerate(texts)]
        _latency_ms(calls, 1)  # warm the page cache
        cost[mode] = _latency_ms(calls, 3)
    return cost


def _image_retriever(bundle: Any, strategies: dict[str, Any]) -> Any:
    """retrieve_images(memory, images, mode): each image's K=2 neighbours, as the retriever
    searches for an image query (CLIP's embedding, and in hybrid mode the VQ codes)."""
    from retrieval.search import neighbours, search

    def retrieve_images(memory: Any, images: np.ndarray, mode: str) -> list[list[Any]]:
        codes = _image_codes(bundle, images) if mode == "hybrid" else None
        found = search(memory, bundle.clip.encode_image(images), 2, strategies[mode],
                       codes=codes)
        return [neighbours(memory, hits, None) for hits in found]

    return retrieve_images


def _image_quality(retrieve_images: Any, items: list[Any]) -> dict[str, Any]:
    """One mode's retrieval quality for image queries: the eval's flag images and scenes."""
    flags = [it for it in items if it.attributes["kind"] == "entity"]
    scenes = [it for it in items if it.attributes["kind"] != "entity"]
    return {
        "i2t_entity": _first_and_among(retrieve_images(np.stack([it.image for it in flags])),
                                       [it.attributes["entity"] for it in flags]),
        "i2t_scenes": _caption_quality(retrieve_images(np.stack([it.image for it in scenes])),
                                       [it.attributes for it in scenes]),
    }


def _image_search_latency(memory: Any, bundle: Any, strategies: dict[str, Any],
                          items: list[Any]) -> dict[str, Any]:
    """Per mode: the same encoded image queries, one at a time (search only)."""
    from retrieval.search import search

    images = np.stack([it.image for it in items])
    vectors, codes = bundle.clip.encode_image(images), _image_codes(bundle, images)
    cost: dict[str, Any] = {}
    for mode in MODES:
        calls = [lambda i=i, mode=mode: search(
            memory, vectors[i : i + 1], 2, strategies[mode],
            codes=[codes[i]] if mode == "hybrid" else None) for i in range(len(images))]
        _latency_ms(calls, 1)  # warm the page cache
        cost[f"{mode}_image"] = _latency_ms(calls, 3)
    return cost


def _new_names(bundle: Any, world: Any, memory_dir: Path, work: Path, count: int,
               retrieve: Any, quality: dict[str, dict[str, Any]], retrieve_images: Any,
               ) -> dict[str, Any]:
    """Append flags under names nobody has seen to a copy of the memory: what the append
    and the lexical index cost, and (into `quality`) whether each mode finds the names,
    and the flags by their own image and by a re-photographed copy."""
    from evaluation.evaluate import rephotographed
    from retrieval.lexical_index import LEXICAL_FILES, LexicalIndex
    from retrieval.memory import Memory
    from world.entities import entity_names
    from world.rng import Rng

    out: dict[str, Any] = {}
    copy = work / "memory"
    shutil.copytree(memory_dir, copy)
    known = set(world.entities)
    names = [x for x in entity_names(count + len(known), Rng.from_key(
        "racm3-bench-hybrid", 0)) if x not in known][:count]
    out["append_s"] = _append_flags(bundle.path, copy, names, bundle.image_size, work)
    t0 = time.perf_counter()
    appended = Memory.load(copy)
    out["load_with_lexical_s"] = time.perf_counter() - t0
    vdir = appended.path
    out["lexical_mb"] = sum((vdir / f).stat().st_size for f in LEXICAL_FILES) / 1e6
    t0 = time.perf_counter()
    LexicalIndex.load(vdir)
    out["lexical_load_ms"] = 1e3 * (time.perf_counter() - t0)
    asked = [(p.format(name), name) for name in names for p in PHRASINGS]
    for mode in MODES:
        quality[mode]["new_names"] = _first_and_among(
            retrieve(appended, [p for p, _ in asked], mode), [name for _, name in asked])
    flags = novel_flags(len(names), bundle.image_size)
    photo_rng = np.random.default_rng([0, 17])
    own = np.stack(flags + [rephotographed(f, photo_rng) for f in flags])
    for mode in MODES:
        found = retrieve_images(appended, own, mode)
        quality[mode]["new_images"] = _first_and_among(found[: len(flags)], names)
        quality[mode]["new_images_rephotographed"] = _first_and_among(found[len(flags):], names)
    appended.store.close()
    return out


def format_table(r: dict[str, Any]) -> str:
    q = r["quality"]
    rows = [
        ("entity: right first", "entity", "first"),
        ("entity: right among K=2", "entity", "among_k"),
        ("dev entity: among K=2", "dev_entity", "among_k"),
        ("new names: right first", "new_names", "first"),
        ("new names: among K=2", "new_names", "among_k"),
        ("t2i: judge on top-1 image", "t2i", "judge_top1"),
        ("t2i: top-1 caption attrs", "t2i", "caption_top1"),
        ("t2i: top-2 caption attrs", "t2i", "caption_top2"),
        ("dev t2i: judge on top-1", "dev_t2i", "judge_top1"),
        ("i2t flag images: right first", "i2t_entity", "first"),
        ("i2t flag images: among K=2", "i2t_entity", "among_k"),
        ("i2t scenes: top-1 caption attrs", "i2t_scenes", "caption_top1"),
        ("new flags' own images: first", "new_images", "first"),
        ("re-photographed: among K=2", "new_images_rephotographed", "among_k"),
    ]
    lines = [f"memory {r['memory_version']} ({r['documents']} documents)",
             f"{'metric':30s} {'dense':>8s} {'hybrid':>8s}"]
    lines += [f"{label:30s} {q['dense'][a][b]:8.3f} {q['hybrid'][a][b]:8.3f}"
              for label, a, b in rows]
    lat = r["latency"]
    lines += [f"{'search p50 ms / query':30s} {lat['dense']['p50_ms']:8.2f} "
              f"{lat['hybrid']['p50_ms']:8.2f}",
              f"{'search p99 ms / query':30s} {lat['dense']['p99_ms']:8.2f} "
              f"{lat['hybrid']['p99_ms']:8.2f}",
              f"{'image search p50 / p99 ms':30s} {lat['dense_image']['p50_ms']:8.2f} "
              f"{lat['hybrid_image']['p50_ms']:8.2f} / {lat['dense_image']['p99_ms']:.2f} "
              f"{lat['hybrid_image']['p99_ms']:.2f}",
              f"stored codes read for image queries in {r['codes_read_from_store_s']:.3f} s",
              f"lexical index: build from store {r['lexical_build_from_store_s']:.2f} s, "
              f"load {r['lexical_load_ms']:.1f} ms, {r['lexical_mb']:.2f} MB; "
              f"append of {r['config']['new_names']} docs {r['append_s']:.1f} s",
              "ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items())]
    return "\n".join(lines)


def main(json_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    result = run(**kwargs)
    return publish(result, format_table(result), json_path)
