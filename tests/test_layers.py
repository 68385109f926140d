"""The packages form layers that import in one direction only (docs/architecture.md).

An `ast` walk over every module: each import of one of the project's packages must name
a layer at or below the importing module's own. Imports inside functions count too, so
a lazy import cannot hide a dependency that runs the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A package may import its own layer and those listed before it.
LAYERS = ["model", "retrieval", "app", "world", "evaluation", "training", "benchmarks", "racm3"]
RANK = {name: i for i, name in enumerate(LAYERS)}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))


def test_every_layer_is_a_package_on_disk() -> None:
    for layer in LAYERS:
        assert (REPO / layer / "__init__.py").is_file(), layer


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    own = path.relative_to(REPO).parts[0]
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {name} ({name.split('.')[0]} is above {own})"
        for line, name in _imports(path)
        if name.split(".")[0] in RANK and RANK[name.split(".")[0]] > RANK[own]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_old_layout_is_gone() -> None:
    for old in ("index_builder", "model/world", "app/generator/protocol.py",
                "app/generator/batcher.py", "app/retriever/memory.py", "app/cli.py"):
        assert not (REPO / old).exists(), f"{old} moved; see docs/architecture.md"
