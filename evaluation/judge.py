"""The judge: a small CNN that reads a demo-world image's attributes; racm3's evaluator.

One classification head per label head of the world (`World.label_heads`: kind, shape,
colour, size, position, relation, shape2, colour2, entity), each over the head's values,
with IGNORE (-1) targets where a head does not apply (the size of a pair, say). The
penultimate layer, `features()`, is the embedding the FID-style distance is computed on.

The judge learns from freshly rendered images of *any* attribute combination (held-out
combinations and memory-only entities included: it is the evaluator, not the model under
test), but never from an image the eval split owns (`World.owner`), and never from a
generated image. Its accuracy is measured on the eval split's renders.

Images: uint8 numpy (N, H, W, 3) or float tensors (N, 3, H, W) in [0, 1].

    judge, history = train_judge(world)  # the demo recipe
    judge.accuracy(images, labels)        # {"shape": 0.998, ..., "mean": ..., "all": ...}
    judge.save("bundle")                  # bundle/judge.safetensors + bundle/judge.json
    judge = Judge.load("bundle")
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from evaluation.metrics import attribute_accuracy
from model.checkpoint import load_module, save_checkpoint
from world import COLOURS, IGNORE, POSITIONS, RELATIONS, SHAPES, SIZES, Attributes, World

logger = logging.getLogger(__name__)

Images = np.ndarray | torch.Tensor
LogCallback = Callable[[dict[str, float]], None]


@dataclass
class JudgeConfig:
    heads: dict[str, list[str]]  # head -> class names, exactly World.label_heads
    image_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64, 64)  # conv stages; all but the first halve H, W
    feature_dim: int = 256  # the FID embedding


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(config.widths):
            # Strided convs, no pooling: position is an attribute, so the flattened grid
            # (not a global average) feeds the classifier.
            layers += [
                nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.trunk = nn.Sequential(*layers)
        side = config.image_size // 2 ** (len(config.widths) - 1)
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, config.feature_dim), nn.ReLU()
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(config.feature_dim, len(classes)) for name, classes in
             config.heads.items()}
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _pixels(self, images: Images) -> torch.Tensor:
        """Any accepted image form to float (N, 3, S, S), centred around zero."""
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"numpy images must be uint8 (N, H, W, 3), got "
                                 f"{images.dtype} {images.shape}")
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
        elif isinstance(images, torch.Tensor):
            if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"tensor images must be float (N, 3, H, W) in [0, 1], got "
                                 f"{images.dtype} {tuple(images.shape)}")
            x = images.to(self.device, torch.float32)
        else:
            raise TypeError(f"unsupported images type {type(images).__name__}")
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return (x - 0.5) / 0.25

    def forward(self, images: Images) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(logits per head (N, classes), features (N, feature_dim))."""
        feats = self.embed(self.trunk(self._pixels(images)))
        return {name: head(feats) for name, head in self.heads.items()}, feats

    def loss(self, images: Images, labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum over heads of the mean cross-entropy of the samples the head applies to."""
        logits, _ = self(images)
        total = torch.zeros((), device=self.device)
        for name, head_logits in logits.items():
            target = labels[name].to(self.device)
            if (target != IGNORE).any():
                total = total + F.cross_entropy(head_logits, target, ignore_index=IGNORE)
        return total

    # --- inference -----------------------------------------------------------------------

    @torch.inference_mode()
    def _batched(self, images: Images, batch_size: int) -> tuple[dict[str, np.ndarray],
                                                                 np.ndarray]:
        was_training = self.training
        self.eval()
        labels: dict[str, list[np.ndarray]] = {name: [] for name in self.heads}
        feats: list[np.ndarray] = []
        try:
            for start in range(0, len(images), batch_size):
                logits, f = self(images[start : start + batch_size])
                for name, head_logits in logits.items():
                    labels[name].append(head_logits.argmax(-1).cpu().numpy())
                feats.append(f.float().cpu().numpy())
        finally:
            self.train(was_training)
        if not feats:
            empty = np.zeros((0,), dtype=np.int64)
            return {n: empty for n in self.heads}, np.zeros((0, self.config.feature_dim),
                                                             np.float32)
        return {n: np.concatenate(v) for n, v in labels.items()}, np.concatenate(feats)

    def predict(self, images: Images, batch_size: int = 512) -> dict[str, np.ndarray]:
        """Predicted label index per head: {head: (N,) int64}."""
        return self._batched(images, batch_size)[0]

    def features(self, images: Images, batch_size: int = 512) -> np.ndarray:
        """(N, feature_dim) float32 penultimate features, for `metrics.frechet_distance`."""
        return self._batched(images, batch_size)[1]

    def predict_attributes(self, images: Images, world: World,
                           batch_size: int = 512) -> list[Attributes]:
        """Predicted attribute dicts in the world's schema (compare with
        `metrics.attribute_match`)."""
        if dict(world.label_heads) != {k: tuple(v) for k, v in self.config.heads.items()}:
            raise ValueError("this judge was trained on a world with other label heads "
                             "(a different seed or entity count)")
        labels = self.predict(images, batch_size)
        return [world.attributes_from_labels({h: int(v[i]) for h, v in labels.items()})
                for i in range(len(images))]

    def accuracy(self, images: Images, labels: Mapping[str, np.ndarray | Sequence[int]],
                 batch_size: int = 512) -> dict[str, float]:
        """Per-head accuracy against integer labels (IGNORE skipped), plus "mean" and "all"
        (see `metrics.attribute_accuracy`)."""
        return attribute_accuracy(self.predict(images, batch_size), labels)

    # --- persistence ---------------------------------------------------------------------

    def save(self, directory: str | Path, name: str = "judge",
             metadata: Mapping | None = None) -> Path:
        """`{directory}/{name}.safetensors` + `{name}.json`; returns the JSON path."""
        return save_checkpoint(self, self.config, directory, name, metadata=metadata)

    @classmethod
    def load(cls, directory: str | Path, name: str = "judge",
             device: str | torch.device = "cpu") -> Judge:
        return load_module(cls, JudgeConfig, directory, name, device=device)


# --- training ----------------------------------------------------------------------------


@dataclass
class JudgeTrainConfig:
    steps: int = 600
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0
    kind_mix: tuple[float, float, float] = (0.4, 0.4, 0.2)  # object, pair, entity
    noise_std: float = 0.02  # mild pixel noise so generated images' grain is not novel
    n_eval: int = 2000  # eval-split renders the accuracy is measured on
    log_every: int = 50


JUDGE_RECIPES: dict[str, JudgeTrainConfig] = {
    "demo": JudgeTrainConfig(),
    "smoke": JudgeTrainConfig(steps=60, batch_size=64, n_eval=256, log_every=20),
}


@dataclass
class JudgeHistory:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # mean over each logging window
    eval_accuracy: dict[str, float] = field(default_factory=dict)
    n_eval: int = 0
    wall_s: float = 0.0  # training loop only
    cpu_s: float = 0.0  # process CPU time of the loop: comparable on a shared machine
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class SceneSampler:
    """Random scenes of any attribute combination, rendered at a variant the eval split
    does not own, with the judge's integer labels."""

    def __init__(self, world: World, seed: int, kind_mix: Sequence[float]) -> None:
        self.world = world
        self.rng = np.random.default_rng(seed)
        self.kind_p = np.asarray(kind_mix, dtype=np.float64) / np.sum(kind_mix)
        self.combos = [(s, c) for s in SHAPES for c in COLOURS]

    def _attributes(self) -> Attributes:
        rng = self.rng
        kind = ("object", "pair", "entity")[rng.choice(3, p=self.kind_p)]
        if kind == "object":
            return {"kind": "object", "shape": SHAPES[rng.integers(len(SHAPES))],
                    "colour": COLOURS[rng.integers(len(COLOURS))],
                    "size": SIZES[rng.integers(len(SIZES))],
                    "position": POSITIONS[rng.integers(len(POSITIONS))]}
        if kind == "pair":
            i, j = rng.choice(len(self.combos), size=2, replace=False)
            (s1, c1), (s2, c2) = self.combos[i], self.combos[j]
            return {"kind": "pair", "shape": s1, "colour": c1,
                    "relation": RELATIONS[rng.integers(len(RELATIONS))],
                    "shape2": s2, "colour2": c2}
        return {"kind": "entity", "entity": self.world.entities[rng.integers(
            len(self.world.entities))]}

    def batch(self, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        images, labels = [], []
        for _ in range(n):
            attrs = self._attributes()
            n_variants = _n_variants(self.world, attrs)
            variant = int(self.rng.integers(n_variants))
            if self.world.owner(attrs, variant) == "eval":
                # Owners cycle with the variant, so a neighbour belongs to another split.
                variant = (variant + 1) % n_variants
            images.append(self.world.render(attrs, variant))
            labels.append(self.world.attributes_of(attrs))
        return np.stack(images), {h: np.array([lab[h] for lab in labels], dtype=np.int64)
                                  for h in self.world.label_heads}


def _n_variants(world: World, attrs: Attributes) -> int:
    # World has no public variant count yet; its renderer owns the jitter radices.
    public = getattr(world, "n_variants", None)
    return int(public(attrs)) if public is not None else world._renderer.n_variants(attrs)


def eval_renders(world: World, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The first `n` eval-split images and their labels (clean renders)."""
    items = list(world.iter_split("eval", 0, n))
    labels = [world.attributes_of(item) for item in items]
    return np.stack([item.image for item in items]), {
        h: np.array([lab[h] for lab in labels], dtype=np.int64) for h in world.label_heads}


def train_judge(
    world: World,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    *,
    config: JudgeTrainConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: LogCallback | None = None,
) -> tuple[Judge, JudgeHistory]:
    """Train a judge on freshly rendered scenes; measure it on eval-split renders.

    `steps`, `batch_size` and `seed` override `config` (default: the demo recipe).
    `log` receives {"step", "loss", "lr", "elapsed_s"} every `log_every` steps.
    """
    cfg = config or JudgeTrainConfig()
    overrides = {k: v for k, v in (("steps", steps), ("batch_size", batch_size),
                                   ("seed", seed)) if v is not None}
    cfg = JudgeTrainConfig(**{**asdict(cfg), **overrides})
    torch.manual_seed(cfg.seed)
    judge = Judge(JudgeConfig(heads={h: list(v) for h, v in world.label_heads.items()},
                              image_size=world.config.image_size)).to(device)
    sampler = SceneSampler(world, cfg.seed, cfg.kind_mix)
    decay = [p for p in judge.parameters() if p.ndim > 1]
    no_decay = [p for p in judge.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _warmup_cosine(s, cfg.warmup_steps, cfg.steps))
    noise = torch.Generator().manual_seed(cfg.seed)

    history = JudgeHistory(config=asdict(cfg))
    start, cpu_start = time.perf_counter(), time.process_time()
    window: list[float] = []
    judge.train()
    bar = tqdm(range(1, cfg.steps + 1), desc="judge", disable=not progress, dynamic_ncols=True)
    for step in bar:
        images, labels = sampler.batch(cfg.batch_size)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        if cfg.noise_std > 0:
            x = (x + cfg.noise_std * torch.randn(x.shape, generator=noise)).clamp(0.0, 1.0)
        loss = judge.loss(x.to(device), {h: torch.from_numpy(v) for h, v in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, "loss": float(np.mean(window)),
                      "lr": schedule.get_last_lr()[0], "elapsed_s": time.perf_counter() - start}
            history.steps.append(step)
            history.losses.append(record["loss"])
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            logger.debug("judge step %d loss %.4f", step, record["loss"])
            if log is not None:
                log(record)
            window = []
    judge.eval()
    history.wall_s = time.perf_counter() - start
    history.cpu_s = time.process_time() - cpu_start
    images, labels = eval_renders(world, cfg.n_eval)
    history.eval_accuracy = judge.accuracy(images, labels)
    history.n_eval = len(images)
    logger.info("judge: %d steps in %.1fs, eval accuracy: mean %.4f, all-heads %.4f",
                cfg.steps, history.wall_s, history.eval_accuracy["mean"],
                history.eval_accuracy["all"])
    return judge, history


def _warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.02) -> float:
    """Multiplier of the base lr: linear warmup, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_judge(bundle: Any) -> Judge:
    """The bundle's judge (`judge.json` + `judge.safetensors` beside its other models)."""
    return Judge.load(bundle.path, "judge", device=bundle.device)
