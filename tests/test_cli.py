"""What a newcomer meets first in the CLI: help that shows every default it names, one
default memory for `make serve` and `racm3 eval`, reports written only when asked for,
and `build-index --append` refusing a damaged memory in one clear line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from racm3.cli import app
from retrieval import publish as pub
from tests.conftest import torch_threads
from tests.damage import overwrite_image_code
from tests.live import png_bytes, solid_image

ROOT = Path(__file__).resolve().parent.parent


def commands(group=None, prefix=()):
    """(argv prefix, command) for every leaf command of the CLI."""
    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_help_shows_every_bracketed_default_it_names() -> None:
    runner, checked = CliRunner(), 0
    for argv, command in commands():
        result = runner.invoke(app, [*argv, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        shown = " ".join(result.output.split())
        for param in command.params:
            for bracketed in re.findall(r"\[[^\]]+\]", getattr(param, "help", None) or ""):
                checked += 1
                assert bracketed in shown, f"racm3 {' '.join(argv)} --help drops {bracketed}"
    assert checked >= 4  # build-index --bundle, train --work, bench service --bundle/--memory


def test_eval_and_make_serve_default_to_the_same_memory(monkeypatch, tmp_path: Path) -> None:
    make_default = re.search(r"^MEMORY \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    monkeypatch.delenv("RACM3_MEMORY_DIR", raising=False)
    monkeypatch.delenv("RACM3_BUNDLE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["eval", "--tasks", "i2t"])
    shown = " ".join(result.output.split())
    assert result.exit_code == 2 and f"no memory at {make_default.group(1)};" in shown, shown

    monkeypatch.setenv("RACM3_MEMORY_DIR", str(tmp_path / "elsewhere"))  # as `serve` reads it
    result = CliRunner().invoke(app, ["eval", "--tasks", "i2t"], terminal_width=400)
    assert f"no memory at {tmp_path / 'elsewhere'};" in result.output.replace("\n", "")


def test_eval_writes_only_the_reports_asked_for(smoke_bundle, monkeypatch,
                                                tmp_path: Path) -> None:
    bundle_dir, memory_dir = smoke_bundle
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--bundle", str(bundle_dir), "--memory", str(memory_dir), "--n", "2",
            "--tasks", "i2t", "--threads", "1"]
    with torch_threads(1):
        result = CliRunner().invoke(app, [*args, "--json", "out/eval.json"])
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out", "out/eval.json"]  # no reports/eval.md beside it


def test_append_to_a_damaged_memory_is_one_clear_refusal(smoke_bundle, tmp_path: Path) -> None:
    bundle_dir, memory_dir = smoke_bundle
    memory = tmp_path / "memory"
    shutil.copytree(memory_dir, memory)
    version = pub.current_version(memory)
    overwrite_image_code(pub.version_dir(memory, version) / "store.arrow", 3, 0x7F7F)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.png").write_bytes(png_bytes(solid_image("yellow")))
    (docs / "a.txt").write_text("the flag of Quorvia")

    result = CliRunner().invoke(app, [
        "build-index", "--source", "folder", "--input", str(docs), "--out", str(memory),
        "--bundle", str(bundle_dir), "--append"])
    assert result.exit_code == 1, result.output
    assert "build-index: refusing to append" in result.output
    assert "store.arrow is corrupt" in result.output and "Traceback" not in result.output
    assert pub.current_version(memory) == version and pub.list_versions(memory) == [version]


@pytest.mark.parametrize("argv", [["build-index", "--help"], ["eval", "--help"]])
def test_help_names_the_environment_defaults(argv: list[str]) -> None:
    shown = " ".join(CliRunner().invoke(app, argv, terminal_width=200).output.split())
    assert "RACM3_BUNDLE_DIR" in shown
