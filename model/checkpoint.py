"""Checkpoints as `{name}.safetensors` (weights) + `{name}.json` (config and metadata).

Loading never unpickles anything: weights come only through safetensors, everything else
through JSON, so a checkpoint from an untrusted place cannot run code.

Tied weights (e.g. token embedding = LM head) share storage, which safetensors refuses.
They are stored once; the JSON records each alias, and `load_state` gives back a full
state dict in which aliases are the same tensor.

    save_checkpoint(model, model.config, "bundle", "decoder", dtype=torch.float16)
    model = load_module(Decoder, DecoderConfig, "bundle", "decoder")  # fp32 params

This is the one format of the bundle's own models: the decoders, the VQ and the judge.
Every config is read back through `build_config`, which refuses keys its class does not
know. (CLIP keeps open_clip's weight layout; its sidecar is read by `build_config` too.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

FORMAT = "racm3-checkpoint"
FORMAT_VERSION = 1


def _config_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a dataclass instance or a mapping, not {type(config)}")


def _storage_key(t: torch.Tensor) -> tuple:
    # same storage, offset, shape and stride means the very same view: a tied weight
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())


def _dedupe(
    state: Mapping[str, torch.Tensor], dtype: torch.dtype | None, keep_fp32: Collection[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (contiguous, CPU, no shared storage) and alias -> stored name."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storages: set[tuple] = set()
    for name, t in state.items():
        key = _storage_key(t)
        # empty tensors all have data_ptr 0 yet are never tied
        if t.numel() and key in seen_views:
            tied[name] = seen_views[key]
            continue
        seen_views[key] = name
        out = t.detach()
        if dtype is not None and out.is_floating_point():
            out = out.float() if name in keep_fp32 else out.to(dtype)
        out = out.to("cpu").contiguous()
        storage = (out.device, out.untyped_storage().data_ptr())
        if storage in seen_storages:  # a different view of shared memory: store a copy
            out = out.clone()
            storage = (out.device, out.untyped_storage().data_ptr())
        seen_storages.add(storage)
        tensors[name] = out
    return tensors, tied


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _paths(directory: str | Path, name: str) -> tuple[Path, Path]:
    d = Path(directory)
    return d / f"{name}.safetensors", d / f"{name}.json"


def save_checkpoint(
    module: nn.Module,
    config: Any,
    directory: str | Path,
    name: str,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, Any] | None = None,
    keep_fp32: Collection[str] = (),
) -> Path:
    """Write `{name}.safetensors` and `{name}.json` into `directory`; returns the JSON path.

    `config` is a dataclass instance or a dict; it is stored so that loading is
    `Config(**saved)`. `dtype` (e.g. torch.float16) sets the storage type of floating
    tensors; other tensors keep theirs, and so do the floating tensors named in
    `keep_fp32`, stored as float32 whatever `dtype` says (running sums that resumed
    training keeps adding to). `metadata` (JSON-serialisable) is stored as is.
    Each file is written to a temporary name and renamed, the JSON last, so a crash never
    leaves a checkpoint that looks complete.
    """
    weights_path, meta_path = _paths(directory, name)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors, tied = _dedupe(module.state_dict(), dtype, keep_fp32)
    cls = type(module)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "config": _config_dict(config),
        "storage_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "tied": tied,
        "metadata": dict(metadata or {}),
    }
    tmp_weights = weights_path.with_name(weights_path.name + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": FORMAT})
    meta["sha256"] = _sha256(tmp_weights)
    os.replace(tmp_weights, weights_path)
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp_meta, meta_path)
    log.info("saved %s (%d tensors, %d tied) to %s", name, len(tensors), len(tied), directory)
    return meta_path


def load_metadata(directory: str | Path, name: str) -> dict:
    """The checkpoint's JSON: `config`, `class`, `storage_dtype`, `tied`, `metadata`…"""
    _, meta_path = _paths(directory, name)
    if not meta_path.is_file():
        raise FileNotFoundError(f"no checkpoint metadata at {meta_path}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a {FORMAT} file")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format version {meta['format_version']}, too new")
    return meta


def load_state(
    directory: str | Path,
    name: str,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, config dict) from safetensors + JSON; nothing is ever unpickled.

    Tensors come back in their storage dtype; tied names map to the same tensor.
    `verify` checks the weights file against the sha256 recorded at save time.
    """
    weights_path, _ = _paths(directory, name)
    meta = load_metadata(directory, name)
    if not weights_path.is_file():
        raise FileNotFoundError(f"no weights at {weights_path} (only .safetensors is accepted)")
    if verify and meta.get("sha256") and _sha256(weights_path) != meta["sha256"]:
        raise ValueError(f"{weights_path} does not match the checksum in its JSON")
    try:
        state = load_file(str(weights_path), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{weights_path} is not a valid safetensors file: {e}") from e
    for alias, target in meta["tied"].items():
        state[alias] = state[target]
    return state, meta["config"]


def build_config(config_cls: type, cfg: dict, source: str = "config") -> Any:
    """`config_cls(**cfg)`, refusing keys the class does not know with a clear error: a
    checkpoint saved by a newer or different model must not load as something else."""
    if dataclasses.is_dataclass(config_cls):
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"{source}: unknown {config_cls.__name__} fields {unknown}; "
                             f"known fields are {sorted(known)}")
    return config_cls(**_restore_tuples(config_cls, cfg))


def _restore_tuples(config_cls: type, cfg: dict) -> dict:
    # JSON has no tuples: give tuple-typed dataclass fields their tuples back
    if not dataclasses.is_dataclass(config_cls):
        return cfg
    out = dict(cfg)
    for f in dataclasses.fields(config_cls):
        typ = f.type
        is_tuple = (
            typ is tuple
            or typing.get_origin(typ) is tuple
            or (isinstance(typ, str) and typ.startswith(("tuple", "Tuple")))
        )
        if is_tuple and isinstance(out.get(f.name), list):
            out[f.name] = tuple(out[f.name])
    return out


def load_module(
    cls: type[nn.Module],
    config_cls: type,
    directory: str | Path,
    name: str,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build `cls(config_cls(**saved_config))`, load its weights strictly, return it in eval
    mode on `device`. Weights stored in fp16 load into the module's own (fp32) parameters.
    """
    state, cfg = load_state(directory, name)
    meta_class = load_metadata(directory, name)["class"]
    if meta_class != f"{cls.__module__}.{cls.__qualname__}":
        log.warning("checkpoint %s was saved from %s, loading into %s", name, meta_class, cls)
    module = cls(build_config(config_cls, cfg, f"checkpoint {name} in {directory}"))
    module.load_state_dict(state, strict=True)
    return module.to(device).eval()
