"""`racm3 eval --tasks examples` (controlled generation by demonstrations): the cases it
builds and the task run through the CLI on the smoke bundle. The smoke decoder is trained
for seconds, so the rates are checked for shape and range, not value; the demo bundle's
numbers are in BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.examples import OPEN_SETS, demo_cases
from racm3.cli import app
from tests.conftest import torch_threads
from world import World, WorldConfig
from world.captions import parse_caption


def test_cases_leave_the_shared_attributes_open_in_the_prompt(smoke_bundle) -> None:
    from model.bundle import Bundle

    bundle = Bundle(smoke_bundle[0])
    world = World(WorldConfig.from_dict(bundle.manifest["world"]))
    cases = demo_cases(world, 12, seed=0)
    assert [tuple(c.shared) for c in cases[:3]] == list(OPEN_SETS)
    for case in cases:
        assert len(case.examples) == 2
        for example in case.examples:  # both demonstrations show the shared values
            parsed = parse_caption(example.caption)
            assert all(parsed[a] == v for a, v in case.shared.items())
            assert example.image.shape == (world.config.image_size,) * 2 + (3,)
        for value in case.shared.values():  # and the prompt does not name them
            assert value not in case.prompt.split()
        for value in case.stated.values():
            assert value in case.prompt
    assert demo_cases(world, 12, seed=0)[5].prompt == cases[5].prompt


def test_eval_cli_runs_the_examples_task(smoke_bundle, tmp_path: Path) -> None:
    bundle_dir, memory_dir = smoke_bundle
    json_path = tmp_path / "eval.json"
    with torch_threads(1):
        result = CliRunner().invoke(app, [
            "eval", "--bundle", str(bundle_dir), "--memory", str(memory_dir), "--n", "3",
            "--tasks", "examples", "--json", str(json_path), "--report-dir", str(tmp_path),
            "--threads", "1",
        ])
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert data["meta"]["n"] == {"examples": 3}
    ra, cm3 = data["systems"]["ra_cm3"], data["systems"]["cm3"]
    assert {"demo_adopt", "demo_adopt_none", "demo_adopt_k2", "demo_prompt_acc",
            "demo_adopt_colour", "demo_adopt_shape", "demo_adopt_colour_shape"} <= set(ra)
    assert "demo_adopt_k2" not in cm3 and "demo_adopt" in cm3
    assert all(0.0 <= v <= 1.0 for system in (ra, cm3) for v in system.values())
    assert "demo_adopt" in (tmp_path / "eval.md").read_text()


@pytest.mark.slow
def test_demo_bundle_takes_on_what_two_demonstrations_share() -> None:
    """On the committed demo bundle: colour-open prompts take the demonstrations' shared
    colour far more often with them than without (no retrieval, same seeds)."""
    from evaluation.examples import adoption
    from model.bundle import DEFAULT_BUNDLE, Bundle
    from model.engine import Engine
    from model.jobs import SamplingParams, T2IJob

    bundle = Bundle(DEFAULT_BUNDLE)
    world = World(WorldConfig.from_dict(bundle.manifest["world"]))
    engine = Engine.from_bundle(bundle)
    cases = [c for c in demo_cases(world, 36, seed=1) if tuple(c.shared) == ("colour",)]

    def rate(with_examples: bool) -> float:
        jobs = [T2IJob(c.prompt, [], n=1, num_candidates=8,
                       sampling=SamplingParams(seed=i, temperature=0.5, top_k=16,
                                               guidance_scale=2.0),
                       examples=c.examples if with_examples else [])
                for i, c in enumerate(cases)]
        with torch_threads(1):
            images = np.stack([r[0].image for r in engine.text_to_image(jobs)])
        return adoption(bundle.judge.predict_attributes(images, world), cases)

    with_demos, without = rate(True), rate(False)
    assert with_demos >= 0.5 and with_demos >= without + 0.3, (with_demos, without)
