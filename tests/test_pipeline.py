"""The smoke recipe: every stage of `racm3 train all` end to end, each one learning."""

from __future__ import annotations

import json

from model.pipeline import STAGES


def test_smoke_recipe_trains_every_stage_and_each_loss_goes_down(smoke_bundle):
    bundle_dir, memory_dir = smoke_bundle
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    assert set(stages) == set(STAGES)
    assert all(s["done"] for s in stages.values())
    for name in ("vq", "clip", "judge", "generator", "baseline"):
        assert stages[name]["loss_last"] < stages[name]["loss_first"], name
    for name in ("tokenizer.json", "vq.safetensors", "clip.safetensors", "judge.safetensors",
                 "ra_cm3.safetensors", "cm3.safetensors"):
        assert (bundle_dir / name).is_file(), name
    assert manifest["token_space"]["image_grid"] == [8, 8]
    assert (memory_dir / "CURRENT").is_file()
    # the manifest records what a reader needs to reproduce the bundle
    assert {"recipe", "world", "source_commit"} <= set(manifest)
    assert all("wall_s" in s for s in stages.values())
