"""The evaluation report: a Markdown table and a labelled PNG grid of examples.

`racm3 eval` hands this module finished numbers and images; nothing here runs a model.

The grid has one row per example prompt: the prompt as text, the two retrieved
neighbours, then RA-CM3 as served, RA-CM3 by the paper's method and CM3 for that
prompt, so a reader sees what retrieval put in context and what each made of it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# (key, column title, higher is better); the order of the paper-style table.
METRIC_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("t2i_attr_acc", "t2i attr acc", True),
    ("t2i_fid", "t2i FID", False),
    ("i2t_attr_acc", "i2t attr acc", True),
    ("i2t_bleu4", "i2t BLEU-4", True),
    ("i2t_entity_named", "caption names entity", True),
    ("entity_acc", "entity acc", True),
    ("infill_acc", "infill acc", True),
)
SYSTEM_TITLES = {"ra_cm3": "RA-CM3 (served default)",
                 "ra_cm3_paper": "RA-CM3, the paper's method",
                 "cm3": "CM3 (no retrieval)", "retrieval_only": "retrieval only"}

SCALE = 3  # 32 px images are unreadable at 1:1
LABEL_WIDTH = 240
PAD = 4
GREY = (128, 128, 128)


@dataclass
class GridRow:
    prompt: str
    neighbours: list[np.ndarray] = field(default_factory=list)  # uint8 (H, W, 3), best first
    neighbour_captions: list[str] = field(default_factory=list)
    ra_cm3: np.ndarray | None = None
    cm3: np.ndarray | None = None
    ra_cm3_paper: np.ndarray | None = None


def markdown_table(result: Mapping[str, Any]) -> str:
    """The systems × metrics table, then the extra keys, then how it was measured."""
    systems: Mapping[str, Mapping[str, float]] = result["systems"]
    header = "| system | " + " | ".join(
        f"{title} {'↑' if up else '↓'}" for _, title, up in METRIC_COLUMNS) + " |"
    lines = [header, "|---" * (len(METRIC_COLUMNS) + 1) + "|"]
    best = _best_per_metric(systems)
    for name, values in systems.items():
        cells = [_cell(values.get(key), best.get(key)) for key, _, _ in METRIC_COLUMNS]
        lines.append(f"| {SYSTEM_TITLES.get(name, name)} | " + " | ".join(cells) + " |")

    main_keys = {key for key, _, _ in METRIC_COLUMNS}
    extra = sorted({k for v in systems.values() for k in v} - main_keys)
    if extra:
        lines += ["", "| system | " + " | ".join(extra) + " |", "|---" * (len(extra) + 1) + "|"]
        for name, values in systems.items():
            lines.append(f"| {SYSTEM_TITLES.get(name, name)} | "
                         + " | ".join(_fmt(values.get(k)) for k in extra) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(result: Mapping[str, Any], path: str | Path,
                   grid_rows: Sequence[GridRow] = (), grid_name: str | None = None) -> Path:
    meta = result.get("meta", {})
    parts = [
        "# racm3 eval",
        "",
        f"Bundle `{meta.get('bundle', '?')}`, memory `{meta.get('memory_version', '?')}` "
        f"({meta.get('memory_documents', '?')} documents), seed {meta.get('seed', '?')}, "
        f"device {meta.get('device', '?')}, {meta.get('wall_s', 0):.0f} s.",
        "",
        markdown_table(result),
        "Bold: the best system per metric. FID is on the judge's features (lower is "
        "better); accuracies are judged by the bundle's attribute classifier (images) or "
        "by parsing the caption (text). `*_prompt_rerank`: the same samples, but the "
        "candidate kept is the one CLIP scores best against the prompt alone, without the "
        "retrieved images' vote in the ranking. RA-CM3 (served default) decodes with "
        "retrieval guidance at the served weight; the paper's method is the same decoder "
        "with dense (CLIP-only) retrieval and guidance 0. `i2t_entity_named` (caption "
        "names entity): flag images whose caption has the entity's name (`_retrieved`: "
        "the share whose neighbours hold the name, and named among those); "
        "`i2t_*_scenes`: object and pair images alone.",
        "",
        "## How it was measured",
        "",
    ]
    for task, n in meta.get("n", {}).items():
        parts.append(f"- `{task}`: {n} prompts ({meta.get('tasks', {}).get(task, '')})")
    decoding = meta.get("decoding", {})
    if decoding:
        parts += ["", "Decoding (the same seeds for RA-CM3 and CM3):", ""]
        parts += [f"- {task}: {_kv(d)}" for task, d in decoding.items()]
    retrieval = meta.get("retrieval", {})
    if retrieval:
        parts += ["", f"Retrieval: {_kv(retrieval)}"]
    probe = result.get("copy_probe")
    if probe:
        parts += ["", "## Copy probe", "",
                  "RA-CM3's teacher-forced loss (nats per image code) of memory-only flags, "
                  "with a same-flag neighbour in context, none, or another flag's. Lower "
                  "with the same flag means the decoder takes the flag from its neighbour.",
                  "", "| codes | same flag | none | other flag |", "|---|---|---|---|"]
        for part, title in (("loss", "whole image"), ("row", "first row")):
            if f"copy_{part}_same" in probe:
                parts.append(f"| {title} | " + " | ".join(
                    _fmt(probe[f"copy_{part}_{c}"]) for c in ("same", "none", "other")) + " |")
    checks = result.get("new_entity")
    if checks:
        parts += ["", "## New entities, appended to the memory (no retraining)", "",
                  "Each name's flag (unlike all of the world's) is added to a copy of the "
                  "memory with `build-index --append`; a sample counts when, of every flag "
                  "the world knows plus the new one, the new flag is the nearest in pixels.",
                  "", "| name | retrieved first | RA-CM3 samples | CM3 samples | "
                  "RA-CM3 distance | CM3 distance |", "|---|---|---|---|---|---|"]
        for c in checks:
            parts.append(
                f"| {c['name']} | {'yes' if c['retrieved'] else 'no: ' + c['top_caption']} | "
                f"{c['ra_cm3_match']:.3f} | {c['cm3_match']:.3f} | "
                f"{c['ra_cm3_distance']:.1f} | {c['cm3_distance']:.1f} |")
    novel = result.get("novel_flags")
    if novel:
        parts += _novel_flags_section(novel)
    if grid_name and grid_rows:
        parts += ["", "## Examples", "", f"![examples]({grid_name})", "",
                  "Columns: prompt, neighbour 1, neighbour 2, RA-CM3 (served default), "
                  "RA-CM3 by the paper's method, CM3 (the neighbours shown are the served "
                  "default's). Rows:", ""]
        for i, row in enumerate(grid_rows, 1):
            nbs = "; ".join(f"“{c}”" for c in row.neighbour_captions) or "none"
            parts.append(f"{i}. “{row.prompt}” (neighbours: {nbs})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path


def _novel_flags_section(novel: Mapping[str, Any]) -> list[str]:
    drawn = novel.get("drawn", {})
    parts = ["", "## Flags the world never makes, appended to the memory", "",
             f"{novel.get('flags')} flags of {novel.get('layouts')} layouts outside the "
             f"world's flag grammar, each stored under two captions and appended with "
             f"`build-index --source folder --append`, asked for under "
             f"{novel.get('prompts_per_flag')} phrasings, {novel.get('samples')} samples "
             f"each, with {novel.get('settings')}. Drawn: mean absolute pixel difference "
             f"to the flag below {novel.get('threshold')}.", "",
             "| | drawn |", "|---|---|"]
    for way, title in (("ra_cm3", "retrieval on, API defaults"),
                       ("ra_cm3_paper", "the paper's method (dense retrieval, guidance 0)"),
                       ("retrieval_off", "retrieval off")):
        if way in drawn:
            parts.append(f"| {title} | {_fmt(drawn[way])} |")
    parts += [f"| new flag retrieved first | {_fmt(novel.get('retrieved_first'))} |",
              f"| the VQ alone reproduces the flag | {_fmt(novel.get('vq_drawable'))} |"]
    named = novel.get("caption_named")
    if named:
        by_image = novel.get("caption_named_by_image", {})
        retrieved = novel.get("caption_retrieved", {})
        parts += ["", f"Captions of the same flags' images, each flag's own image and a "
                  f"re-photographed copy (a colour cast and pixel noise), with "
                  f"{novel.get('caption_settings')}: the share whose caption names the flag, "
                  "and whose neighbours (retrieved by the image) hold its document.", "",
                  "| | named | own image | re-photographed | flag retrieved |",
                  "|---|---|---|---|---|"]
        for way, title in (("ra_cm3", "retrieval as served, API defaults"),
                           ("ra_cm3_paper", "the paper's (dense retrieval, guidance 0)"),
                           ("retrieval_off", "retrieval off")):
            if way in named:
                parts.append(
                    f"| {title} | {_fmt(named[way])} | "
                    f"{_fmt(by_image.get('exact', {}).get(way))} | "
                    f"{_fmt(by_image.get('rephotographed', {}).get(way))} | "
                    f"{_fmt(retrieved.get(way))} |")
    rows = novel.get("rows") or []
    if rows:
        parts += ["", "| name | layout | prompt | retrieved first | drawn (on / paper / off) "
                  "| distance (on / paper / off) | VQ distance |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            parts.append(
                f"| {r['name']} | {r['layout']} | {r['prompt']} | "
                f"{'yes' if r['retrieved_first'] else 'no'} | "
                f"{r['ra_cm3_drawn']:.2f} / {r['ra_cm3_paper_drawn']:.2f} / "
                f"{r['retrieval_off_drawn']:.2f} | {r['ra_cm3_distance']:.1f} / "
                f"{r['ra_cm3_paper_distance']:.1f} / {r['retrieval_off_distance']:.1f} | "
                f"{r['vq_distance']:.1f} |")
    return parts


def save_example_grid(rows: Sequence[GridRow], path: str | Path, k: int = 2) -> Path:
    """One row per example: label | neighbour 1..k | RA-CM3 | RA-CM3 paper | CM3, images
    enlarged ×SCALE (the paper column only when the rows carry it)."""
    if not rows:
        raise ValueError("save_example_grid needs at least one row")
    side = _image_side(rows) * SCALE
    paper = any(row.ra_cm3_paper is not None for row in rows)
    columns = ([f"neighbour {i + 1}" for i in range(k)] + ["RA-CM3"]
               + (["RA-CM3 paper"] if paper else []) + ["CM3"])
    font = ImageFont.load_default()
    header_h = 18
    width = LABEL_WIDTH + len(columns) * (side + PAD) + PAD
    height = header_h + len(rows) * (side + PAD) + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        draw.text((LABEL_WIDTH + c * (side + PAD) + PAD, 3), title, fill=(0, 0, 0), font=font)
    chars = max(8, LABEL_WIDTH // 7)
    for r, row in enumerate(rows):
        y = header_h + r * (side + PAD) + PAD
        label = "\n".join(textwrap.wrap(f"{r + 1}. {row.prompt}", chars)[: max(1, side // 14)])
        draw.multiline_text((PAD, y), label, fill=(0, 0, 0), font=font, spacing=2)
        cells = [*row.neighbours[:k], *[None] * (k - len(row.neighbours[:k])), row.ra_cm3,
                 *([row.ra_cm3_paper] if paper else []), row.cm3]
        for c, image in enumerate(cells):
            x = LABEL_WIDTH + c * (side + PAD) + PAD
            if image is None:  # no neighbour found: a grey placeholder, not a gap
                draw.rectangle((x, y, x + side - 1, y + side - 1), fill=GREY)
                continue
            tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize(
                (side, side), Image.NEAREST)
            canvas.paste(tile, (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _image_side(rows: Sequence[GridRow]) -> int:
    for row in rows:
        for image in (*row.neighbours, row.ra_cm3, row.cm3):
            if image is not None:
                return int(np.asarray(image).shape[0])
    return 32


def _best_per_metric(systems: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    best: dict[str, float] = {}
    for key, _, higher in METRIC_COLUMNS:
        values = [v[key] for v in systems.values() if _finite(v.get(key))]
        if values:
            best[key] = max(values) if higher else min(values)
    return best


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _cell(value: Any, best: float | None) -> str:
    text = _fmt(value)
    return f"**{text}**" if best is not None and _finite(value) and value == best else text


def _fmt(value: Any) -> str:
    if not _finite(value):
        return "–"
    # accuracies and BLEU (0..1) to 3 places; distances such as FID (tens, hundreds) to 1
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _kv(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())
