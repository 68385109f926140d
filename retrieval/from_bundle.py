"""Build (or append to) a memory with a bundle's CLIP, VQ and text tokenizer.

This is what `racm3 build-index` runs: it reads a source and hands the bundle's models to
`build_from_source`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from retrieval.build import build_from_source
from retrieval.sources import SkipReport, open_source

log = logging.getLogger(__name__)


def build_from_bundle(
    bundle: Any,
    source: str,
    input: str | Path,
    out_dir: str | Path,
    *,
    index_type: str = "auto",
    append: bool = False,
    chunk_size: int = 512,
    progress: bool = True,
    **source_opts: Any,
):
    report = SkipReport()
    if source == "world" and "world_config" not in source_opts:
        source_opts["world_config"] = bundle.manifest.get("world")
    items = open_source(source, input, bundle.image_size, report, **source_opts)
    result = build_from_source(
        items,
        out_dir,
        clip=bundle.clip,
        tokenizer=bundle.tokenizer,
        vq=bundle.vq,
        index_type=index_type,
        chunk_size=chunk_size,
        append=append,
        ids=bundle.component_ids(),
        progress=progress,
        skip_report=report,
    )
    log.info("memory %s: %s", out_dir, report.summary())
    return result
