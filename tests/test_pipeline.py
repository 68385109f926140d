"""The smoke recipe: every stage of `racm3 train all` end to end, each one learning."""

from __future__ import annotations

import json

from training.pipeline import STAGES


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


def test_side_by_side_trains_the_baseline_in_a_second_process(smoke_bundle, tmp_path):
    """`racm3 train all` on a CPU trains CM3 in another process beside RA-CM3."""
    import shutil

    from training.pipeline import RECIPES, Pipeline

    bundle_dir, memory_dir = smoke_bundle
    out, work = tmp_path / "bundle", tmp_path / "work"
    shutil.copytree(bundle_dir, out)
    # without its neighbour table: a baseline started before that stage would fail
    shutil.copytree(memory_dir.parent, work,
                    ignore=shutil.ignore_patterns("*.ckpt", "neighbours.npy"))
    before = json.loads((out / "manifest.json").read_text())["stages"]
    pipe = Pipeline(RECIPES["smoke"], out, work, device="cpu", progress=False)
    stages = pipe.run(("neighbours", "generator", "baseline"), force=True,
                      side_by_side=True)["stages"]
    assert (work / "baseline.stdout.log").is_file()  # it really ran in another process
    for name in ("generator", "baseline"):
        assert stages[name]["done"] and stages[name]["wall_s"] != before[name]["wall_s"]
    on_disk = json.loads((out / "manifest.json").read_text())["stages"]
    assert on_disk["baseline"]["wall_s"] == stages["baseline"]["wall_s"]
    # the same seed and data: the baseline trained in the other process is the same model
    from safetensors.torch import load_file

    for key, value in load_file(str(bundle_dir / "cm3.safetensors")).items():
        assert (load_file(str(out / "cm3.safetensors"))[key] == value).all(), key


def test_training_takes_the_core_back_once_the_process_beside_has_finished(tmp_path):
    """RA-CM3 trains on one thread while CM3 runs beside it, then on all of them."""
    import subprocess
    import sys

    import torch

    from tests.conftest import torch_threads
    from training.pipeline import RECIPES, Pipeline

    with torch_threads(2):
        pipe = Pipeline(RECIPES["smoke"], tmp_path / "bundle", tmp_path / "work",
                        progress=False)
        torch.set_num_threads(1)  # as `_start_beside` leaves it
        pipe._beside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            pipe._reclaim_threads({"step": 10})
            assert torch.get_num_threads() == 1  # still running: its core is still its own
        finally:
            pipe._beside.terminate()
            pipe._beside.wait()
        pipe._reclaim_threads({"step": 20})
        assert torch.get_num_threads() == 2
