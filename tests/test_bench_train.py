"""`racm3 bench train`: both arms run the real training loop and the table reports them."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from racm3.cli import app


def test_bench_train_compares_the_two_k_draws(tmp_path: Path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "train", "--steps", "5", "--repeats", "1",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "per sequence" in result.output and "per batch" in result.output
    r = json.loads(out.read_text())
    for arm in ("per_sequence", "per_batch"):
        assert r[arm]["steps_per_s"] > 0 and 0 <= r[arm]["padding_frac"] < 1
    # one K per batch pads less: the point of the setting
    assert r["per_batch"]["padding_frac"] < r["per_sequence"]["padding_frac"]
    assert r["speedup"] > 0 and r["device"] == "cpu"
