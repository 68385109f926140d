"""CLIP bi-encoder for the retriever: an open_clip model, its tokenizer, and document vectors.

Architecture is data: model configs are open_clip JSON files. Ours live in
`model/configs/` and are registered with open_clip on import, so `racm3-clip-demo`
is created exactly like a built-in such as `ViT-B-32`.

Nothing is ever downloaded: `pretrained` must be a local checkpoint file (.safetensors
preferred; open_clip also reads .pt/.bin with `weights_only=True`). `ClipEncoder.save`
writes safetensors plus a JSON sidecar (model name, architecture, preprocessing) so that
`ClipEncoder.create(name, pretrained=path)` or `ClipEncoder.load(path)` gives back
identical embeddings.

Image convention: uint8 numpy (N, H, W, 3) or float tensors (N, 3, H, W) in [0, 1].
Resizing (shorter side + centre crop) and CLIP mean/std normalisation happen here, in
torch, one batch at a time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model.checkpoint import build_config

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
DEMO_MODEL = "racm3-clip-demo"
DEFAULT_BATCH_SIZE = 256
_RANGE_TOLERANCE = 1e-3  # float images slightly outside [0, 1] from resampling are fine

_registered_config_dirs: set[Path] = set()


def register_model_configs(path: str | os.PathLike = CONFIG_DIR) -> None:
    """Make the open_clip JSON configs in `path` (file or directory) creatable by name."""
    path = Path(path).resolve()
    if path not in _registered_config_dirs:
        open_clip.add_model_config(path)
        _registered_config_dirs.add(path)


register_model_configs()

# One image, or a batch: see the module docstring for the accepted forms.
ImageBatch = np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """The JSON that describes a checkpoint written by `ClipEncoder.save`."""
    return Path(checkpoint).with_suffix(".json")


class ClipEncoder:
    """Batched, no-grad CLIP text/image encoders returning L2-normalised float32 numpy.

    `.model` is the open_clip module and `.tokenize` / `.preprocess_images` its input
    pipeline, so a trainer can compute `model(images, tokens)` and `open_clip.ClipLoss`.
    """

    def __init__(self, model: torch.nn.Module, model_name: str, device: str | torch.device):
        self.model = model
        self.model_name = model_name
        self.device = torch.device(device)
        self.model_cfg: dict[str, Any] = open_clip.get_model_config(model_name) or {}
        self.preprocess_cfg: dict[str, Any] = dict(open_clip.get_model_preprocess_cfg(model))
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=model.context_length)
        # Mixed precision keeps some parameters fp32: the input must match the stem.
        stem = getattr(model.visual, "conv1", None) or next(model.visual.modules())
        self._dtype = next(stem.parameters()).dtype
        # (1, 3, 1, 1) so normalisation broadcasts over a batch
        self._mean = torch.tensor(self.preprocess_cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.preprocess_cfg["std"], device=self.device).view(1, 3, 1, 1)

    # --- construction --------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        model_name: str = DEMO_MODEL,
        pretrained: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        *,
        precision: str = "fp32",
    ) -> ClipEncoder:
        """A model by config name: random init, or weights from a local checkpoint file."""
        if model_name.startswith("hf-hub:"):
            raise ValueError(f"{model_name}: hf-hub models are downloaded; use a local checkpoint")
        if open_clip.get_model_config(model_name) is None:
            raise ValueError(
                f"unknown CLIP model config {model_name!r}; known: {open_clip.list_models()}"
            )
        checkpoint: str | None = None
        force_preprocess_cfg = None
        if pretrained is not None:
            path = Path(pretrained).resolve()  # absolute, so it is never mistaken for a tag
            if not path.is_file():
                raise FileNotFoundError(
                    f"CLIP checkpoint {pretrained} not found (only local files are loaded; "
                    "nothing is downloaded)"
                )
            force_preprocess_cfg = _check_sidecar(path, model_name)
            checkpoint = str(path)
        model = open_clip.create_model(
            model_name,
            pretrained=checkpoint,
            device=device,
            precision=precision,
            pretrained_image=False,  # tower defaults would be downloaded
            pretrained_text=False,
            force_preprocess_cfg=force_preprocess_cfg,
        )
        model.eval()
        return cls(model, model_name, device)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> ClipEncoder:
        """A checkpoint written by `save`: the sidecar JSON names its config."""
        meta = _read_sidecar(Path(checkpoint))
        if meta is None:
            raise FileNotFoundError(
                f"{sidecar_path(checkpoint)} not found; use ClipEncoder.create(model_name, "
                "pretrained=...) for checkpoints without one"
            )
        return cls.create(meta.model_name, pretrained=checkpoint, device=device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights to `path` (.safetensors) and their description to the .json beside."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: CLIP weights are written as .safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        meta = asdict(ClipSidecar(self.model_name, self.model_cfg,
                                  _jsonable(self.preprocess_cfg), self.embed_dim))
        # Write-then-rename so that a crash never leaves a half-written checkpoint.
        tmp_weights = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp_weights), metadata={"model_name": self.model_name})
        tmp_meta = sidecar_path(path).with_name(sidecar_path(path).name + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp_weights, path)
        os.replace(tmp_meta, sidecar_path(path))
        return path

    # --- properties ----------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg.get("embed_dim") or self.model.text_projection.shape[-1])

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return int(size if isinstance(size, int) else size[0])

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    # --- input pipeline ------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, context_length) int64 token ids on the model's device; long texts truncate."""
        return self.tokenizer(list(texts)).to(self.device)

    def preprocess_images(self, images: ImageBatch) -> torch.Tensor:
        """Images to the model's input: (N, 3, S, S), resized, centre-cropped, normalised."""
        pixels = _to_float_batch(images, self.image_size, self.device)
        return ((pixels - self._mean) / self._std).to(self._dtype)

    # --- encoders ------------------------------------------------------------------------

    def encode_text(
        self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> np.ndarray:
        """(N, D) float32, L2-normalised."""
        texts = list(texts)
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("encode_text takes strings; use embed_documents for missing captions")
        with self._inference():
            parts = [
                self.model.encode_text(self.tokenize(batch), normalize=True)
                for batch in _batches(texts, batch_size)
            ]
        return self._to_numpy(parts)

    def encode_image(self, images: ImageBatch, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """(N, D) float32, L2-normalised."""
        with self._inference():
            parts = [
                self.model.encode_image(self.preprocess_images(batch), normalize=True)
                for batch in _batches(images, batch_size)
            ]
        return self._to_numpy(parts)

    def embed_documents(
        self,
        captions: Sequence[str | None],
        images: ImageBatch | Sequence[np.ndarray | torch.Tensor | None] | None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> np.ndarray:
        """A memory document's vector: normalised mean of its normalised text and image
        embeddings; a document with one modality uses that one. (N, D) float32."""
        n = len(captions)
        if images is None:
            images = [None] * n
        if len(images) != n:
            raise ValueError(f"{n} captions but {len(images)} images")
        text_rows = [i for i, c in enumerate(captions) if c is not None and c.strip()]
        if isinstance(images, np.ndarray | torch.Tensor):
            image_rows = list(range(n))  # a dense batch: every document has an image
            image_batch: ImageBatch = images
        else:
            image_rows = [i for i, im in enumerate(images) if im is not None]
            image_batch = [images[i] for i in image_rows]
        empty = sorted(set(range(n)) - set(text_rows) - set(image_rows))
        if empty:
            raise ValueError(f"documents {empty[:10]} have neither a caption nor an image")

        summed = np.zeros((n, self.embed_dim), dtype=np.float32)
        if text_rows:
            summed[text_rows] += self.encode_text([captions[i] for i in text_rows], batch_size)
        if image_rows:
            summed[image_rows] += self.encode_image(image_batch, batch_size)
        # Normalising the sum is normalising the mean.
        return summed / np.linalg.norm(summed, axis=1, keepdims=True).clip(min=1e-12)

    # --- internals -----------------------------------------------------------------------

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """No-grad, eval-mode encoding, restoring train mode for a trainer that shares
        the model."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def _to_numpy(self, parts: list[torch.Tensor]) -> np.ndarray:
        if not parts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        # Normalise again in float32: low-precision models come out only nearly unit-norm.
        return F.normalize(torch.cat(parts).float(), dim=-1).cpu().numpy()


def _batches(items: Any, batch_size: int) -> Iterator[Any]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _to_float_batch(images: ImageBatch, size: int, device: torch.device) -> torch.Tensor:
    """Any accepted image form to float (N, 3, size, size) in [0, 1] on `device`."""
    if isinstance(images, np.ndarray | torch.Tensor):
        return _resize_center_crop(_as_float_pixels(images, device), size)
    # A sequence of single images, possibly of different sizes.
    singles = [_as_float_pixels(_add_batch_axis(im), device) for im in images]
    if not singles:
        return torch.zeros((0, 3, size, size), device=device)
    if all(s.shape == singles[0].shape for s in singles):
        return _resize_center_crop(torch.cat(singles), size)
    return torch.cat([_resize_center_crop(s, size) for s in singles])


def _add_batch_axis(image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if not isinstance(image, np.ndarray | torch.Tensor):
        raise TypeError(f"unsupported image type {type(image).__name__}")
    if image.ndim != 3:
        raise ValueError(
            f"a single image is uint8 (H, W, 3) or float (3, H, W), got {tuple(image.shape)}"
        )
    return image[None]


def _as_float_pixels(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) numpy or float (N, 3, H, W) tensor to float (N, 3, H, W) in [0, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"numpy images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        return batch.permute(0, 3, 1, 2).float().div_(255.0)
    if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"tensor images must be float (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    batch = images.to(device=device, dtype=torch.float32)
    if batch.numel():
        low, high = batch.min().item(), batch.max().item()
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"float images must be in [0, 1], got [{low:.3f}, {high:.3f}] "
                "(pass raw pixels, not normalised ones)"
            )
    return batch


def _resize_center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` then centre crop (open_clip's 'shortest' resize mode)."""
    height, width = batch.shape[-2:]
    if height == size and width == size:
        return batch
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    batch = F.interpolate(batch, size=(new_h, new_w), mode="bicubic", antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return batch[..., top : top + size, left : left + size].clamp(0.0, 1.0)


@dataclass
class ClipSidecar:
    """The JSON `ClipEncoder.save` writes beside the weights (open_clip reads the weights
    themselves): which config to build, and the preprocessing the weights were trained
    with. Read back through `build_config`, so a key it does not know is refused."""

    model_name: str
    model_cfg: dict[str, Any] = field(default_factory=dict)
    preprocess_cfg: dict[str, Any] | None = None
    embed_dim: int | None = None


def _read_sidecar(checkpoint: Path) -> ClipSidecar | None:
    meta_path = sidecar_path(checkpoint)
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: unreadable checkpoint description ({err})") from err
    if not isinstance(meta, dict) or "model_name" not in meta:
        logger.debug("%s is not a ClipEncoder checkpoint description; ignoring it", meta_path)
        return None
    return build_config(ClipSidecar, meta, f"CLIP checkpoint description {meta_path}")


def _check_sidecar(checkpoint: Path, model_name: str) -> dict[str, Any] | None:
    """Refuse a checkpoint saved for another architecture; return its preprocessing."""
    meta = _read_sidecar(checkpoint)
    if meta is None:
        return None  # a foreign checkpoint (e.g. an official ViT-B-32 file)
    if meta.model_cfg and meta.model_cfg != open_clip.get_model_config(model_name):
        raise ValueError(
            f"{checkpoint} was saved for {meta.model_name!r} whose architecture differs "
            f"from {model_name!r}"
        )
    return meta.preprocess_cfg


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
