"""Build (or append to) a memory with a bundle's CLIP, VQ and text tokenizer.

This is what `racm3 build-index` runs: it reads a source, and hands `build_memory` the
three functions that turn documents into what the memory stores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

import index_builder.world_source  # noqa: F401  (registers the "world" source)
from index_builder.build import build_memory
from index_builder.sources import SkipReport, open_source

log = logging.getLogger(__name__)


def bundle_functions(bundle: Any) -> dict[str, Any]:
    """embed / tokenize_text / encode_images backed by the bundle's models."""
    clip, vq, tok = bundle.clip, bundle.vq, bundle.tokenizer

    def encode_images(images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        return vq.encode(batch.float().div(255.0).to(vq.device)).cpu().numpy()

    return {
        "embed": clip.embed_documents,
        "tokenize_text": tok.encode,
        "encode_images": encode_images,
    }


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
    result = build_memory(
        items,
        out_dir,
        **bundle_functions(bundle),
        index_type=index_type,
        chunk_size=chunk_size,
        append=append,
        ids=bundle.component_ids(),
        progress=progress,
        skip_report=report,
    )
    log.info("memory %s: %s", out_dir, report.summary())
    return result
