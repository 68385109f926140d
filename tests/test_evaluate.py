"""`racm3 eval` on the smoke bundle: every key for every system, and the pieces behind it.

The smoke bundle is trained for seconds, so its numbers mean nothing; these tests check
the evaluation's contract (keys, ranges, reports, seeds, masks), not the model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from evaluation.evaluate import (
    METRICS,
    SYSTEMS,
    T2I_DECODING,
    EvalConfig,
    Evaluator,
    new_entity_check,
    novel_flag,
    object_box_mask,
)
from racm3.cli import app
from tests.conftest import torch_threads
from world import World, WorldConfig, n_templates

N = 3


@pytest.fixture(scope="module")
def evaluator(smoke_bundle) -> Evaluator:
    from model.bundle import Bundle
    from retrieval.memory import Memory

    bundle_dir, memory_dir = smoke_bundle
    return Evaluator(Bundle(bundle_dir), Memory.load(memory_dir), EvalConfig(n=2))


def test_eval_cli_writes_every_metric_for_every_system(smoke_bundle, tmp_path: Path) -> None:
    bundle_dir, memory_dir = smoke_bundle
    json_path, reports = tmp_path / "eval.json", tmp_path / "reports"
    with torch_threads(1):
        result = CliRunner().invoke(app, [
            "eval", "--bundle", str(bundle_dir), "--memory", str(memory_dir),
            "--json", str(json_path), "--report-dir", str(reports), "--n", str(N),
            "--seed", "1", "--threads", "1",
        ])
    assert result.exit_code == 0, result.output

    data = json.loads(json_path.read_text())
    assert set(data["systems"]) == set(SYSTEMS)
    for system in SYSTEMS:
        values = data["systems"][system]
        for metric in METRICS:
            value = values[metric]
            assert isinstance(value, float) and math.isfinite(value), (system, metric, value)
            if metric == "t2i_fid":
                assert value >= 0.0
            else:
                assert 0.0 <= value <= 1.0, (system, metric, value)
        assert 0.0 <= values["t2i_exact"] <= values["t2i_attr_acc"]
    meta = data["meta"]
    assert meta["n"] == {"t2i": N, "i2t": N, "entity": N, "infill": N}
    assert meta["seed"] == 1
    assert meta["decoding"]["t2i"]["temperature"] == pytest.approx(T2I_DECODING.temperature)
    assert meta["wall_s"] > 0 and meta["bundle"] == "racm3-smoke"

    table = (reports / "eval.md").read_text()
    for title in ("RA-CM3", "CM3 (no retrieval)", "retrieval only", "t2i FID", "eval_grid.png"):
        assert title in table
    # 8 grid rows asked for, half t2i and half entity prompts, N of each available
    grid = Image.open(reports / "eval_grid.png")
    assert grid.height > 2 * N * 32 and grid.width > 4 * 32


def test_same_seed_same_images_other_seed_other_images(evaluator: Evaluator) -> None:
    prompts = ["a big red square on the left", "a small blue circle in the center"]
    neighbours = evaluator.retrieve_for_texts(prompts)
    with torch_threads(1):
        first = evaluator.text_to_image("ra_cm3", prompts, neighbours, seed=5)
        again = evaluator.text_to_image("ra_cm3", prompts, neighbours, seed=5)
        other = evaluator.text_to_image("ra_cm3", prompts, neighbours, seed=6)
    assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_neighbours_are_at_most_k_decodable_documents(evaluator: Evaluator) -> None:
    # The smoke CLIP is barely trained, so the diversity rule may leave a query with no
    # neighbour at all; across several prompts some must come back.
    prompts = [c for c, _ in evaluator.t2i_prompts() + evaluator.entity_prompts()]
    results = evaluator.retrieve_for_texts(prompts)
    assert all(len(nbs) <= evaluator.config.k for nbs in results)
    found = [doc for nbs in results for doc in nbs]
    assert found
    for nbs in results:
        assert [n.score for n in nbs] == sorted((n.score for n in nbs), reverse=True)
    for doc in found:
        assert doc.image_codes.shape == tuple(evaluator.bundle.space.image_grid)
        assert evaluator.neighbour_image(doc).shape == (32, 32, 3)
        assert evaluator.neighbour_caption(doc)


def test_retrieval_only_infill_pastes_the_top_neighbour_inside_the_mask_only(
        evaluator: Evaluator) -> None:
    items = evaluator.eval_items("object")
    images = np.stack([it.image for it in items])
    masks = np.stack([object_box_mask(it.image, 4) for it in items])
    neighbours = evaluator.retrieve_for_texts([it.caption for it in items])
    out = evaluator.infill("retrieval_only", images, masks, [it.caption for it in items],
                           neighbours, seed=0)
    for i in range(len(items)):
        np.testing.assert_array_equal(out[i][~masks[i]], images[i][~masks[i]])
        top = evaluator.top_image(neighbours[i])
        np.testing.assert_array_equal(out[i][masks[i]], top[masks[i]])


def test_object_box_mask_covers_the_object_on_whole_patches() -> None:
    world = World(WorldConfig(n_eval=60))
    objects = [it for it in world.iter_split("eval") if it.attributes["kind"] == "object"]
    assert objects
    for item in objects:
        mask = object_box_mask(item.image, 4)
        background = item.image[0, 0] if not mask[0, 0] else item.image[-1, -1]
        foreground = (item.image != background).any(-1)
        assert mask[foreground].all(), item.caption  # the whole object is regenerated
        assert 0 < mask.mean() < 0.75  # ...and the rest of the scene is kept
        cells = mask.reshape(8, 4, 8, 4)
        assert (cells.all(axis=(1, 3)) == cells.any(axis=(1, 3))).all()  # whole patches


def test_eval_config_refuses_fewer_than_two_prompts() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        EvalConfig(n=1)


def test_new_entity_check_appends_the_flag_and_scores_both_decoders(
        smoke_bundle, tmp_path: Path) -> None:
    from model.bundle import Bundle
    from retrieval.memory import Memory

    bundle_dir, memory_dir = smoke_bundle
    memory_copy = tmp_path / "memory"  # the check publishes a new version: not the shared one
    shutil.copytree(memory_dir, memory_copy)
    before = Memory.load(memory_copy)
    bundle = Bundle(bundle_dir)
    world = World(WorldConfig.from_dict(bundle.manifest["world"]))
    flag = novel_flag(world)
    with torch_threads(1):
        check = new_entity_check(bundle, memory_copy, "Zentaria", flag, samples=2)

    after = Memory.load(memory_copy)
    assert after.version != before.version
    added = after.documents(list(range(len(before), len(after))))
    assert len(added) == n_templates("entity")  # one document per entity caption template
    assert all("Zentaria" in d.caption for d in added)
    assert check.samples == 2 and check.name == "Zentaria"
    assert check.retrieved == ("zentaria" in check.top_caption.lower())
    for value in (check.ra_cm3_match, check.cm3_match):
        assert 0.0 <= value <= 1.0
    for value in (check.ra_cm3_distance, check.cm3_distance):
        assert 0.0 <= value <= 255.0


def test_novel_flag_differs_from_every_world_flag() -> None:
    world = World(WorldConfig(n_entities=8))
    flag = novel_flag(world, seed=3)
    assert flag.shape == (32, 32, 3) and flag.dtype == np.uint8
    for name in world.entities:
        known = world.render({"kind": "entity", "entity": name})
        assert (known != flag).any(-1).mean() >= 0.25


def test_novel_flags_are_new_kinds_under_new_names() -> None:
    from world.novel_flags import NOVEL_LAYOUTS, novel_flags

    world = World(WorldConfig(n_entities=400))
    flags = novel_flags(world, 24)
    assert len({f.layout for f in flags}) == len(NOVEL_LAYOUTS) >= 10
    known = np.stack([world.render({"kind": "entity", "entity": e}) for e in world.entities])
    for flag in flags:
        assert flag.name not in world.entities
        assert (known != flag.image[None]).any(-1).mean(axis=(1, 2)).min() >= 0.25
        assert len(set(flag.prompts)) >= 2 and all(flag.name in p for p in flag.prompts)
        assert set(flag.prompts) - set(flag.captions)  # a paraphrase of what is stored
    assert len({f.image.tobytes() for f in flags}) == len(flags)


def test_eval_runs_only_the_tasks_asked_for(smoke_bundle, tmp_path: Path) -> None:
    bundle_dir, memory_dir = smoke_bundle
    json_path = tmp_path / "eval.json"
    current = (memory_dir / "CURRENT").read_text()
    with torch_threads(1):
        result = CliRunner().invoke(app, [
            "eval", "--bundle", str(bundle_dir), "--memory", str(memory_dir), "--n", "2",
            "--tasks", "entity", "--json", str(json_path), "--report-dir", str(tmp_path),
            "--threads", "1", "--new-entity", "Zentaria", "--new-entity-samples", "2",
            "--novel-flags", "2", "--novel-flag-samples", "1",
        ])
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert data["meta"]["n"] == {"entity": 2}
    assert all(set(values) == {"entity_acc", "entity_acc_prompt_rerank", "entity_retrieved"}
               for system, values in data["systems"].items() if system != "cm3")
    assert set(data["systems"]["cm3"]) == {"entity_acc", "entity_acc_prompt_rerank"}
    # without neighbours the retrieved images have no vote: both rankings keep one image
    for system in ("cm3", "retrieval_only"):
        values = data["systems"][system]
        assert values["entity_acc"] == values["entity_acc_prompt_rerank"]
    probe = data["copy_probe"]  # teacher-forced loss with/without a same-flag neighbour
    assert set(probe) == {f"copy_{part}_{ctx}" for part in ("loss", "row")
                          for ctx in ("same", "none", "other")}
    assert all(math.isfinite(v) and v > 0 for v in probe.values())
    # the new-entity check appends to a copy: the memory itself keeps its version
    [check] = data["new_entity"]
    assert check["name"] == "Zentaria" and check["samples"] == 2
    assert {"retrieved", "ra_cm3_match", "cm3_match", "passed"} <= set(check)
    assert (memory_dir / "CURRENT").read_text() == current
    assert "| Zentaria |" in (tmp_path / "eval.md").read_text()
    # flags outside the world's grammar, appended by `build-index --append` in its own
    # process, asked for under two phrasings with the API's defaults, retrieval on and off
    novel = data["novel_flags"]
    assert novel["flags"] == 2 and novel["prompts_per_flag"] == 2 and novel["samples"] == 1
    assert set(novel["drawn"]) == {"ra_cm3", "ra_cm3_paper", "retrieval_off"}
    assert all(0.0 <= v <= 1.0 for v in novel["drawn"].values())
    assert len(novel["rows"]) == 4 and novel["threshold"] == 40.0
    assert "Flags the world never makes" in (tmp_path / "eval.md").read_text()
    # and each flag's image (and a re-photographed copy) captioned with the API's defaults
    assert set(novel["caption_named"]) == {"ra_cm3", "ra_cm3_paper", "retrieval_off"}
    assert set(novel["caption_named_by_image"]) == {"exact", "rephotographed"}
    assert novel["caption_named"]["retrieval_off"] == 0.0  # no decoder knows these names
    assert "re-photographed" in (tmp_path / "eval.md").read_text()

    # --record writes the numbers into the bundle's own manifest
    bundle_copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle_copy)
    with torch_threads(1):
        recorded = CliRunner().invoke(app, [
            "eval", "--bundle", str(bundle_copy), "--memory", str(memory_dir), "--n", "2",
            "--tasks", "entity", "--report-dir", str(tmp_path / "r"), "--threads", "1",
            "--record"])
    assert recorded.exit_code == 0, recorded.output
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    assert manifest["eval"]["systems"] == data["systems"]
    assert manifest["eval"]["n"] == {"entity": 2} and manifest["stages"]

    bad = CliRunner().invoke(app, ["eval", "--bundle", str(bundle_dir), "--memory",
                                   str(memory_dir), "--tasks", "t2i,captions"])
    assert bad.exit_code != 0 and "captions" in bad.output
