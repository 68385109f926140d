"""How every benchmark hands back its result: a readable table, the JSON, a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(result: dict[str, Any], table: str, json_path: Path | None, *,
            print_json: bool = True, sort_keys: bool = False) -> dict[str, Any]:
    """Print `table` (then the JSON, unless it is too long to read), write the JSON to
    `json_path` when given; returns `result`."""
    print(table)  # noqa: T201 - a benchmark's job is to print its table
    text = json.dumps(result, indent=2, sort_keys=sort_keys)
    if print_json:
        print(text)  # noqa: T201
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    return result
