"""The VQ image tokenizer: images (B, 3, H, W) in [0, 1] <-> code grids (B, h, w) int64.

`VQModel.encode` / `decode` work on tensors; `encode_images` / `decode_codes` are the same
pair for uint8 (B, H, W, 3) numpy pixels, the one place that conversion is written.

A convolutional encoder/decoder in the taming-transformers mould (ResNet blocks, GroupNorm,
strided-conv down / nearest-neighbour up, no attention) around a vector quantizer whose
codebook is an exponential moving average of the encoder outputs assigned to each code
(VQ-VAE appendix; lucidrains/vector-quantize-pytorch). The codebook is therefore a buffer,
never touched by the optimizer; the encoder is trained through the straight-through
estimator and a commitment loss.

Two things keep the codebook in use, which matters because every unused code is a wasted
token id in the CM3 vocabulary:
- codes are compared by cosine similarity (L2-normalised, as in ViT-VQGAN), so the lookup
  cannot be won by a few codes with large norms;
- a code left unused for `restart_after` training steps is re-initialised from a random
  encoder output of the current batch (the first training step initialises all of them
  this way).

Under torch.distributed the codebook statistics are all-reduced and restart samples are
broadcast from rank 0, so every rank keeps the same codebook.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from model.checkpoint import build_config, load_module, save_checkpoint


@dataclass
class VQConfig:
    image_size: int = 32
    channels: int = 32  # width of the first level
    # one entry per resolution; each step to the next entry halves H and W, so the code
    # grid is image_size / (stem_stride * 2**(len(channel_mult) - 1))
    channel_mult: tuple[int, ...] = (1, 2)
    # >1: the first conv is strided (a patchify stem), so no block runs at full resolution;
    # the decoder mirrors it with a pixel shuffle. Full-resolution blocks cost most of the
    # FLOPs, and the demo must tokenise its whole memory on a CPU.
    stem_stride: int = 2
    num_res_blocks: int = 1  # per resolution, in the encoder and the decoder
    code_dim: int = 32  # low-dimensional codes are better used (ViT-VQGAN's factorised codes)
    codebook_size: int = 512
    beta: float = 0.25  # commitment weight (VQ-VAE's value)
    decay: float = 0.99  # EMA decay of the codebook statistics
    cosine: bool = True  # L2-normalise codes and encoder outputs before the lookup
    restart_after: int = 20  # training steps a code may go unused before it is re-initialised

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)  # JSON gives a list
        factor = self.stem_stride * 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by {factor}")
        if self.stem_stride < 1 or self.stem_stride & (self.stem_stride - 1):
            raise ValueError(f"stem_stride must be a power of two, got {self.stem_stride}")

    @property
    def grid_size(self) -> int:
        return self.image_size // (self.stem_stride * 2 ** (len(self.channel_mult) - 1))

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of an image's code grid; `TokenSpace.image_grid`."""
        return (self.grid_size, self.grid_size)

    @classmethod
    def preset(cls, name: str, **overrides) -> VQConfig:
        if name not in _PRESETS:
            raise ValueError(f"unknown VQ preset {name!r}; choose from {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQConfig:
        return build_config(cls, d, "VQ config")


_PRESETS: dict[str, dict] = {
    # 32x32 demo world (plain shapes on plain backgrounds) -> 8x8 codes; 0.25M params, so
    # the whole memory tokenises on a CPU in seconds.
    "demo": dict(image_size=32, channels=32, channel_mult=(1, 2), stem_stride=2,
                 num_res_blocks=1, code_dim=32, codebook_size=512),
    # CM3Leon's tokenizer shape (Make-A-Scene): 256x256 -> 32x32 = 1024 tokens, 8192 codes.
    "large": dict(image_size=256, channels=128, channel_mult=(1, 1, 2, 4), stem_stride=1,
                  num_res_blocks=2, code_dim=32, codebook_size=8192),
}


def images_to_tensor(images: np.ndarray | Sequence[np.ndarray]) -> Tensor:
    """uint8 (B, H, W, 3) pixels -> float (B, 3, H, W) in [0, 1], on the CPU."""
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(images)))
    return batch.permute(0, 3, 1, 2).float().div(255.0)


def tensor_to_images(images: Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3) pixels, rounded, as numpy."""
    pixels = images.clamp(0, 1).permute(0, 2, 3, 1) * 255
    return pixels.round().to(torch.uint8).cpu().numpy()


def _norm(ch: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: an image's codes must not depend on the rest of its batch.
    return nn.GroupNorm(math.gcd(ch, min(32, ch // 4)), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, code_dim, h, w)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        s = cfg.stem_stride
        stem = nn.Conv2d(3, widths[0], 2 * s, stride=s, padding=s // 2) if s > 1 else \
            nn.Conv2d(3, widths[0], 3, padding=1)
        layers: list[nn.Module] = [stem]
        c = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, width))
                c = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, code_dim, h, w) -> (B, 3, H, W), unclamped, aiming at [0, 1]."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        c = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, c, 3, padding=1)]
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, widths[level]))
                c = widths[level]
            if level > 0:
                layers.append(Upsample(c))
        s = cfg.stem_stride
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, 3 * s * s, 3, padding=1)]
        if s > 1:
            layers.append(nn.PixelShuffle(s))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z) + 0.5  # an untrained decoder starts at mid-grey, not at black


@dataclass
class Quantized:
    z_q: Tensor  # (B, D, h, w), carries the encoder's gradient (straight-through)
    codes: Tensor  # (B, h, w) int64
    commit_loss: Tensor  # scalar, already weighted by beta
    perplexity: Tensor  # scalar, exp(entropy) of this batch's code histogram
    usage: Tensor  # scalar, fraction of the codebook used by this batch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EMAQuantizer(nn.Module):
    """Nearest-code lookup with an EMA codebook and dead-code restart."""

    def __init__(self, codebook_size: int, dim: int, *, decay: float = 0.99, beta: float = 0.25,
                 cosine: bool = True, restart_after: int = 20, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.beta, self.cosine = decay, beta, cosine
        self.restart_after, self.eps = restart_after, eps
        embed = torch.randn(codebook_size, dim)
        if cosine:
            embed = F.normalize(embed, dim=-1)
        self.register_buffer("embed", embed)
        # EMA statistics: embed = embed_sum / cluster_size (Laplace-smoothed)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.int64))
        # the first training batch replaces the random codebook with encoder outputs
        self.register_buffer("initialised", torch.tensor(False))
        self.num_restarts = 0  # dead codes re-initialised by this process (for logging)

    def _prepare(self, z: Tensor) -> Tensor:
        z = z.float()  # distances in fp32 even under autocast
        return F.normalize(z, dim=-1) if self.cosine else z

    def _nearest(self, z: Tensor) -> Tensor:
        embed = self.embed.float()
        codes = []
        # chunked so that (rows x codebook) scores stay small for the 8192-code preset
        for part in z.split(8192):
            if self.cosine:
                codes.append((part @ embed.t()).argmax(dim=-1))
            else:
                dist2 = embed.pow(2).sum(-1) - 2 * part @ embed.t()  # |z|^2 is constant per row
                codes.append(dist2.argmin(dim=-1))
        return torch.cat(codes) if codes else z.new_zeros(0, dtype=torch.int64)

    def forward(self, z: Tensor) -> Quantized:
        B, D, h, w = z.shape
        z = self._prepare(z.permute(0, 2, 3, 1).reshape(-1, D))  # (B*h*w, D)
        if self.training and not bool(self.initialised):
            self._restart(torch.ones_like(self.steps_unused, dtype=torch.bool), z.detach())
            self.initialised.fill_(True)
        codes = self._nearest(z.detach())
        z_q = self.embed.float()[codes]
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        if self.training:
            self._update(z.detach(), codes, counts)
        commit_loss = self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()  # preserve gradients
        probs = counts / counts.sum().clamp(min=1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
        return Quantized(
            z_q=z_q.reshape(B, h, w, D).permute(0, 3, 1, 2),
            codes=codes.reshape(B, h, w),
            commit_loss=commit_loss,
            perplexity=perplexity,
            usage=(counts > 0).float().mean(),
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """(B, D, h, w) encoder output -> (B, h, w) codes; never updates the codebook."""
        B, D, h, w = z.shape
        return self._nearest(self._prepare(z.permute(0, 2, 3, 1).reshape(-1, D))).reshape(B, h, w)

    def lookup(self, codes: Tensor) -> Tensor:
        """(B, h, w) codes -> (B, D, h, w) code vectors."""
        return self.embed[codes].permute(0, 3, 1, 2)

    @torch.no_grad()
    def _update(self, z: Tensor, codes: Tensor, counts: Tensor) -> None:
        counts = counts.clone()
        sums = torch.zeros_like(self.embed_sum, dtype=torch.float32).index_add_(0, codes, z)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        embed = self.embed_sum / smoothed.unsqueeze(1)
        self.embed.copy_(F.normalize(embed, dim=-1) if self.cosine else embed)

        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = self.steps_unused >= self.restart_after
        if dead.any():
            self._restart(dead, z)
            self.num_restarts += int(dead.sum())

    @torch.no_grad()
    def _restart(self, dead: Tensor, z: Tensor) -> None:
        """Re-initialise the `dead` codes from random rows of `z` (this batch's outputs)."""
        n_dead = int(dead.sum())
        samples = z[torch.randint(len(z), (n_dead,), device=z.device)]
        if _distributed():
            dist.broadcast(samples, src=0)
        self.embed[dead] = samples.to(self.embed.dtype)
        # one pseudo-observation: the new code moves quickly towards what it attracts
        self.cluster_size[dead] = 1.0
        self.embed_sum[dead] = samples.to(self.embed_sum.dtype)
        self.steps_unused[dead] = 0


@dataclass
class VQOutput:
    recon: Tensor  # (B, 3, H, W) in [0, 1]
    codes: Tensor  # (B, h, w) int64
    loss: Tensor  # recon_loss + commit_loss, what the optimizer minimises
    recon_loss: Tensor  # MSE in [0, 1] pixel units
    commit_loss: Tensor
    perplexity: Tensor  # exp(entropy) of this batch's code histogram
    usage: Tensor  # fraction of the codebook used by this batch


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = EMAQuantizer(
            config.codebook_size, config.code_dim, decay=config.decay, beta=config.beta,
            cosine=config.cosine, restart_after=config.restart_after,
        )
        self.decoder = Decoder(config)

    @property
    def device(self) -> torch.device:
        return self.quantizer.embed.device

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, images: Tensor) -> VQOutput:
        self._check_images(images)
        q = self.quantizer(self.encoder(images * 2 - 1))
        recon = self.decoder(q.z_q)
        # the loss sees the unclamped output so that saturated pixels still get a gradient
        recon_loss = F.mse_loss(recon.float(), images.float())
        return VQOutput(
            recon=recon.clamp(0, 1),
            codes=q.codes,
            loss=recon_loss + q.commit_loss,
            recon_loss=recon_loss,
            commit_loss=q.commit_loss,
            perplexity=q.perplexity,
            usage=q.usage,
        )

    @torch.no_grad()
    def encode(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, h, w) int64 codes, on `images.device`."""
        self._check_images(images)
        dtype = self.encoder.net[0].weight.dtype
        out = [
            self.quantizer.encode(self.encoder(chunk.to(self.device, dtype) * 2 - 1))
            for chunk in images.split(batch_size)
        ]
        if not out:
            return torch.zeros(0, *self.grid, dtype=torch.int64, device=images.device)
        return torch.cat(out).to(images.device)

    @torch.no_grad()
    def decode(self, codes: Tensor, batch_size: int = 256) -> Tensor:
        """(B, h, w) int codes -> (B, 3, H, W) float32 in [0, 1], on `codes.device`."""
        self._check_codes(codes)
        dtype = self.decoder.net[0].weight.dtype
        out = [
            self.decoder(self.quantizer.lookup(chunk.to(self.device)).to(dtype)).float().clamp(0, 1)
            for chunk in codes.long().split(batch_size)
        ]
        if not out:
            size = self.config.image_size
            return torch.zeros(0, 3, size, size, device=codes.device)
        return torch.cat(out).to(codes.device)

    def encode_images(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (B, H, W, 3) pixels -> int64 (B, h, w) codes, as numpy: `encode` at the
        edge where images are arrays (serving, the memory build, training corpora)."""
        return self.encode(images_to_tensor(images).to(self.device)).cpu().numpy()

    def decode_codes(self, codes: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """int (B, h, w) codes -> uint8 (B, H, W, 3) pixels, as numpy; the inverse edge."""
        t = torch.as_tensor(np.asarray(codes), dtype=torch.long, device=self.device)
        return tensor_to_images(self.decode(t))

    def _check_images(self, images: Tensor) -> None:
        size = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"expected images (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got {images.dtype}")

    def _check_codes(self, codes: Tensor) -> None:
        if codes.ndim != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"expected codes (B, {self.grid[0]}, {self.grid[1]}), "
                             f"got {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"codes out of range [0, {self.config.codebook_size})")

    # --- checkpoints: the common format (model/checkpoint.py) ---------------------------

    # EMA statistics stay fp32 in an fp16 checkpoint: they are sums that resumed training
    # keeps accumulating, and fp16 would round them.
    _FP32_STATE = ("quantizer.cluster_size", "quantizer.embed_sum")

    def save(self, directory: str | os.PathLike, name: str = "vq",
             dtype: torch.dtype = torch.float32) -> Path:
        """Write `<name>.json` and `<name>.safetensors`; returns the weights path."""
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported checkpoint dtype {dtype}")
        save_checkpoint(self, self.config.to_dict(), directory, name, dtype=dtype,
                        keep_fp32=self._FP32_STATE)
        return Path(directory) / f"{name}.safetensors"

    @classmethod
    def load(cls, directory: str | os.PathLike, name: str = "vq",
             device: str | torch.device = "cpu") -> VQModel:
        """Rebuild from `save`'s files, in eval mode, with fp32 weights."""
        directory = Path(directory)
        config_path, weights_path = directory / f"{name}.json", directory / f"{name}.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"VQ checkpoint file missing: {path}")
        saved = json.loads(config_path.read_text())
        if "format" in saved:
            return load_module(cls, VQConfig, directory, name, device=device)
        # A bundle trained before the VQ used the common format: its JSON is the bare config.
        model = cls(VQConfig.from_dict(saved))
        model.load_state_dict(load_file(str(weights_path)), strict=True)  # casts to fp32
        return model.to(device).eval()

