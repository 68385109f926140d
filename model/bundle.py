"""A bundle: every trained component racm3 needs, in one directory.

    manifest.json          recipe, seeds, steps, wall time per stage, eval metrics, commit
    tokenizer.json         text BPE
    vq.json/.safetensors   image tokenizer
    clip.safetensors       CLIP (+ clip.json sidecar: the open_clip config name)
    ra_cm3.json/.safetensors   the retrieval-augmented decoder
    cm3.json/.safetensors      the same decoder trained without retrieval (baseline)
    judge.json/.safetensors    the attribute classifier (evaluation/judge.py loads it)

Components load lazily, so a retriever process never loads the decoder and vice versa.
Everything is safetensors + JSON: loading a bundle never unpickles anything.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.tokens import TokenSpace

if TYPE_CHECKING:  # torch loads with the first component, not with the bundle's manifest
    import torch

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "demo"


def default_bundle_dir() -> Path:
    """The bundle a command uses when none is named: RACM3_BUNDLE_DIR (as the services
    read it); else the demo bundle beside this code, in a checkout or an editable install;
    else bundles/demo under the working directory. An installed package (a wheel, the
    container's `pip install .`) ships no bundle: the container mounts one there."""
    named = os.environ.get("RACM3_BUNDLE_DIR")
    if named:
        return Path(named)
    return DEFAULT_BUNDLE if DEFAULT_BUNDLE.is_dir() else Path("bundles") / "demo"


class BundleError(ValueError):
    pass


class Bundle:
    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.path = Path(path)
        self.device = device
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise BundleError(
                f"{self.path} is not a racm3 bundle (no manifest.json). "
                "Train one with `racm3 train all --recipe demo --out DIR`."
            )
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())

    @property
    def space(self) -> TokenSpace:
        return TokenSpace.from_dict(self.manifest["token_space"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    def has(self, component: str) -> bool:
        return (self.path / f"{component}.safetensors").is_file() or (
            component == "tokenizer" and (self.path / "tokenizer.json").is_file()
        )

    @functools.cached_property
    def tokenizer(self):
        from model.text_tokenizer import TextTokenizer

        return TextTokenizer.load(self.path / "tokenizer.json")

    @functools.cached_property
    def vq(self):
        from model.vq import VQModel

        return VQModel.load(self.path, "vq", device=self.device)

    @functools.cached_property
    def clip(self):
        from model.clip import ClipEncoder

        return ClipEncoder.load(self.path / "clip.safetensors", device=self.device)

    def decoder(self, name: str = "ra_cm3") -> torch.nn.Module:
        from model.checkpoint import load_module
        from model.decoder import CM3Decoder, DecoderConfig

        if not self.has(name):
            raise BundleError(f"bundle {self.path} has no decoder {name!r}")
        return load_module(CM3Decoder, DecoderConfig, self.path, name, device=self.device)

    def component_ids(self) -> dict[str, str]:
        """Ids the memory manifest records, so a memory is never used with the wrong models."""
        ids = self.manifest.get("component_ids", {})
        return {"bundle": self.manifest.get("name", self.path.name), **ids}


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    p = Path(path) / "manifest.json"
    tmp = p.with_name("manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(p)


PAPER_DIVERSITY_THRESHOLD = 0.9


def bundle_diversity_threshold(manifest: dict[str, Any], override: float | None = None) -> float:
    """The retrieval diversity threshold to serve a bundle with.

    The paper uses 0.9 with its CLIP; a bundle trained with another value (calibrated to
    its own CLIP's similarity scale) records it in its recipe, and serving must match.
    """
    if override is not None:
        return override
    return float(manifest.get("recipe", {}).get("diversity_threshold",
                                                PAPER_DIVERSITY_THRESHOLD))
