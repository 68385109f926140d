"""Training the retriever's CLIP from scratch, on the demo world or any image-caption pairs.

The objective is open_clip's own: `ClipLoss` (symmetric InfoNCE) on normalised
embeddings, scaled by the model's learned `logit_scale` (clamped at ln 100 as open_clip
does). AdamW with open_clip's weight-decay split (none on gains, biases and the scale),
linear warmup then cosine decay, gradient clipping at 1.0. On the world one more
ClipLoss term, text to text over invented entity names, keeps names CLIP never saw
retrievable by their captions (see `InventedNames`).

Retrieval is measured before and after on pairs the trainer never sees: text->image and
image->text recall@1 within a held-out batch (256 pairs by default). On the world the
held-out pairs are memory-split images of scene types training knows (an image never in
the train split), deduplicated by attributes so that each caption has exactly one right
image; the report adds entity and held-out-combination checks (see `evaluate_on_world`).

    encoder = ClipEncoder.create("racm3-clip-demo")
    history = train_clip(encoder, world, config=CLIP_RECIPES["demo"])
    encoder.save("bundle/clip.safetensors")
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from model.clip import ClipEncoder
from world import Attributes, World, WorldItem
from world import n_templates as n_caption_templates
from world.captions import caption as render_caption
from world.entities import entity_names
from world.rng import Rng

logger = logging.getLogger(__name__)

PairBatch = tuple[np.ndarray, Sequence[str]]  # uint8 (B, H, W, 3) images, B captions
LogCallback = Callable[[dict[str, float]], None]
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's clamp: keeps the softmax from saturating


@dataclass
class ClipTrainConfig:
    steps: int = 300
    batch_size: int = 128  # contrastive: the batch is the set of negatives
    lr: float = 1e-3  # 2e-3 and up stall small batches at loss ln(B) (a collapsed start)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.02  # cosine decays to this fraction of lr
    grad_clip: float = 1.0
    seed: int = 0
    n_heldout: int = 256  # pairs held out for recall@1
    log_every: int = 20
    # Caption pairs (two templates) of invented entity names per step, contrasted text to
    # text; 0 turns the term off. See `InventedNames` for why the retriever needs it.
    name_pairs: int = 64
    name_weight: float = 0.5


CLIP_RECIPES: dict[str, ClipTrainConfig] = {
    "demo": ClipTrainConfig(),
    # ~10 s: enough for the loss to fall and recall to leave chance, nothing more
    "smoke": ClipTrainConfig(steps=30, batch_size=32, n_heldout=128, log_every=5, name_pairs=16),
}


@dataclass
class ClipHistory:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # image-text ClipLoss, window means
    name_losses: list[float] = field(default_factory=list)  # text-text term, window means
    logit_scales: list[float] = field(default_factory=list)  # exp(logit_scale) at log steps
    before: dict[str, float] = field(default_factory=dict)  # retrieval metrics
    after: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0  # training loop only (not the before/after evaluation)
    cpu_s: float = 0.0  # process CPU time of the loop: comparable on a shared machine
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --- data ---------------------------------------------------------------------------------


class WorldPairs:
    """Endless training batches drawn from a world split.

    Within a batch each attribute combination (each entity) occurs once: two images of
    the same scene would be false negatives for each other's caption.
    """

    def __init__(self, world: World, batch_size: int, seed: int, split: str = "train") -> None:
        self.world, self.batch_size, self.split = world, batch_size, split
        self.n = world.split_size(split)
        if self.n < batch_size:
            raise ValueError(f"split {split!r} has {self.n} items, fewer than a batch")
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[PairBatch]:
        while True:
            items: list[WorldItem] = []
            seen: set[str] = set()
            while len(items) < self.batch_size:
                item = self.world.sample(self.split, int(self.rng.integers(self.n)))
                key = _scene_key(item.attributes)
                if key not in seen:
                    seen.add(key)
                    items.append(item)
            yield np.stack([it.image for it in items]), [it.caption for it in items]


class InventedNames:
    """Entity caption pairs for names that are not in the world, in two templates.

    The retriever finds a memory-only entity (or one appended to the memory later)
    through its caption alone: CLIP never saw its flag. Image-text training on a few
    dozen names teaches the text tower to map *known* names to flags and to blur every
    unknown name into them, so "the flag of <new name>" stops matching its own memory
    documents (measured: 0.94 of memory-only entities found at initialisation, 0.25 after
    plain CLIP training). Contrasting two templates of thousands of invented names
    (ClipLoss, text to text) keeps unknown names distinct and template-invariant.
    """

    def __init__(self, world: World, n_names: int, seed: int) -> None:
        taken = set(world.entities)
        names = entity_names(n_names + len(taken), Rng.from_key("racm3-clip-names", seed))
        self.names = [n for n in names if n not in taken][:n_names]
        self.n_templates = n_caption_templates("entity")
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int) -> tuple[list[str], list[str]]:
        picks = self.rng.choice(len(self.names), size=n, replace=False)
        first = self.rng.integers(self.n_templates, size=n)
        second = (first + self.rng.integers(1, self.n_templates, size=n)) % self.n_templates
        scenes = [{"kind": "entity", "entity": self.names[i]} for i in picks]
        return ([render_caption(a, int(t)) for a, t in zip(scenes, first, strict=True)],
                [render_caption(a, int(t)) for a, t in zip(scenes, second, strict=True)])


def _scene_key(attrs: Attributes) -> str:
    return "|".join(f"{k}={attrs[k]}" for k in sorted(attrs))


def _distinct_items(items: Iterable[WorldItem], n: int) -> list[WorldItem]:
    out: list[WorldItem] = []
    seen: set[str] = set()
    for item in items:
        key = _scene_key(item.attributes)
        if key not in seen:
            seen.add(key)
            out.append(item)
            if len(out) == n:
                break
    return out


def world_heldout(world: World, n: int) -> PairBatch:
    """`n` attribute-distinct pairs of familiar scene types (seen combinations, train
    entities) whose images the train split cannot hold: memory-split images, which
    `World.owner` keeps disjoint from training."""
    familiar = (it for it in world.iter_split("memory")
                if it.group in ("seen", "train_entity"))
    items = _distinct_items(familiar, n)
    if len(items) < n:
        raise ValueError(f"the memory split has fewer than {n} distinct familiar scenes")
    return np.stack([it.image for it in items]), [it.caption for it in items]


def _take_pairs(batches: Iterator[PairBatch], n: int) -> PairBatch:
    """The first `n` pairs of a stream of batches (the rest of the last batch is dropped)."""
    images: list[np.ndarray] = []
    captions: list[str] = []
    while len(captions) < n:
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"the pairs ran out before {n} held-out pairs were taken")
        images.extend(batch[0])
        captions.extend(batch[1])
    return np.stack(images[:n]), captions[:n]


# --- evaluation ---------------------------------------------------------------------------


def recall_at_1(encoder: ClipEncoder, images: np.ndarray | torch.Tensor,
                captions: Sequence[str]) -> dict[str, float]:
    """Within-batch retrieval: pair i is right when caption i's nearest image is image i
    (t2i_r1) and image i's nearest caption is caption i (i2t_r1). Chance is 1/N."""
    text = encoder.encode_text(list(captions))
    image = encoder.encode_image(images)
    sims = text @ image.T
    target = np.arange(len(captions))
    return {"t2i_r1": float((sims.argmax(1) == target).mean()),
            "i2t_r1": float((sims.argmax(0) == target).mean()),
            "chance": 1.0 / len(captions)}


def evaluate_on_world(encoder: ClipEncoder, world: World, heldout: PairBatch,
                      n_eval: int = 256) -> dict[str, float]:
    """Recall@1 on the held-out pairs, plus what the retriever relies on:

    - entity_t2i_r1: "the flag of X" finds X's flag among all flags (train entities);
    - memory_entity_doc_r1 / _cross_template: see `_memory_entity_retrieval`;
    - heldout_combo_t2i_r1: recall@1 among eval-split scenes, whose (shape, colour)
      combinations never occur in training (compositional generalisation).
    """
    metrics = recall_at_1(encoder, *heldout)
    flags = np.stack([world.render({"kind": "entity", "entity": e}) for e in world.entities])
    flag_vecs = encoder.encode_image(flags)
    train_idx = [world.entities.index(e) for e in world.train_entities]
    text = encoder.encode_text([world.caption({"kind": "entity", "entity": world.entities[i]})
                                for i in train_idx])
    metrics["entity_t2i_r1"] = float(((text @ flag_vecs.T).argmax(1) == train_idx).mean())

    metrics.update(_memory_entity_retrieval(encoder, world, flags))

    scenes = _distinct_items((it for it in world.iter_split("eval")
                              if it.attributes["kind"] != "entity"), n_eval)
    if len(scenes) >= 2:
        r = recall_at_1(encoder, np.stack([it.image for it in scenes]),
                        [it.caption for it in scenes])
        metrics["heldout_combo_t2i_r1"] = r["t2i_r1"]
        metrics["heldout_combo_n"] = float(len(scenes))
    return metrics


def _memory_entity_retrieval(encoder: ClipEncoder, world: World,
                             flags: np.ndarray) -> dict[str, float]:
    """How the retriever finds an entity CLIP never trained on: by its caption.

    Documents are every entity in every caption template with its flag (text and image
    vectors averaged, as the memory stores them); each memory-only entity's template-0
    caption queries them. `memory_entity_doc_r1`: the top document is the entity's;
    `..._cross_template`: the same with documents of the query's exact caption removed,
    so only the name, not the whole string, can match.
    """
    n_templates = n_caption_templates("entity")
    scenes = [{"kind": "entity", "entity": e} for e in world.entities]
    doc_captions = [world.caption(a, t) for a in scenes for t in range(n_templates)]
    doc_entity = np.repeat(np.arange(len(scenes)), n_templates)
    docs = encoder.embed_documents(doc_captions, np.repeat(flags, n_templates, axis=0))
    query_idx = np.array([world.entities.index(e) for e in world.memory_only_entities])
    query_captions = [world.caption(scenes[i], 0) for i in query_idx]
    scores = encoder.encode_text(query_captions) @ docs.T  # (Q, docs)
    same = scores.argmax(1)
    scores[np.array(query_captions)[:, None] == np.array(doc_captions)[None, :]] = -np.inf
    cross = scores.argmax(1)
    return {"memory_entity_doc_r1": float((doc_entity[same] == query_idx).mean()),
            "memory_entity_doc_r1_cross_template": float(
                (doc_entity[cross] == query_idx).mean())}


# --- training -----------------------------------------------------------------------------


def train_clip(
    encoder: ClipEncoder,
    pairs: World | Iterable[PairBatch],
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    *,
    config: ClipTrainConfig | None = None,
    heldout: PairBatch | None = None,
    progress: bool = True,
    log: LogCallback | None = None,
) -> ClipHistory:
    """Train `encoder.model` in place; returns the history with retrieval before/after.

    `pairs` is a `World` (batches from its train split) or an iterable of (uint8 images,
    captions) batches, whose own size then wins over `batch_size`. `steps`, `batch_size`
    and `lr` override `config` (default: the demo recipe). `heldout` pairs are measured
    before and after; without them the first `config.n_heldout` pairs are held out.
    `log` receives {"step", "loss", "logit_scale", "lr", "elapsed_s"} (and "name_loss"
    when the invented-name term is on, only with a World) every `log_every` steps.
    """
    cfg = config or ClipTrainConfig()
    overrides = {k: v for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr))
                 if v is not None}
    cfg = ClipTrainConfig(**{**asdict(cfg), **overrides})
    torch.manual_seed(cfg.seed)
    world, batches, names, heldout = _pair_sources(pairs, cfg, heldout)

    def evaluate() -> dict[str, float]:
        if world is not None:
            return evaluate_on_world(encoder, world, heldout)
        return recall_at_1(encoder, *heldout)

    history = ClipHistory(config=asdict(cfg), before=evaluate())
    logger.info("clip before training: %s", _fmt(history.before))
    step_fn = _ClipStep(encoder, cfg, names)
    encoder.model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    window: list[torch.Tensor] = []
    name_window: list[torch.Tensor] = []
    bar = tqdm(range(1, cfg.steps + 1), desc="clip", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = next(batches, None)
        if batch is None:
            logger.warning("pairs ran out after %d of %d steps", step - 1, cfg.steps)
            break
        loss, name_loss = step_fn(batch)
        window.append(loss)
        if name_loss is not None:
            name_window.append(name_loss)
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = step_fn.record(step, window, name_window, time.perf_counter() - start)
            _note(history, record, bar, log)
            window, name_window = [], []
    history.wall_s = time.perf_counter() - start
    history.cpu_s = time.process_time() - cpu_start
    encoder.model.eval()
    history.after = evaluate()
    logger.info("clip after %d steps (%.1fs): %s", cfg.steps, history.wall_s,
                _fmt(history.after))
    return history


def _pair_sources(pairs: World | Iterable[PairBatch], cfg: ClipTrainConfig,
                  heldout: PairBatch | None,
                  ) -> tuple[World | None, Iterator[PairBatch], InventedNames | None, PairBatch]:
    """(the world or None, the training batches, the invented-name pairs or None, the
    held-out pairs) for `train_clip`'s `pairs`."""
    if isinstance(pairs, World):
        if heldout is None:
            heldout = world_heldout(pairs, cfg.n_heldout)
        batches: Iterator[PairBatch] = iter(WorldPairs(pairs, cfg.batch_size, cfg.seed))
        names = InventedNames(pairs, 4096, cfg.seed) if cfg.name_pairs > 0 else None
        return pairs, batches, names, heldout
    batches = iter(pairs)
    if heldout is None:
        heldout = _take_pairs(batches, cfg.n_heldout)
    return None, batches, None, heldout


class _ClipStep:
    """One optimizer step of the contrastive loss (plus the invented-name term)."""

    def __init__(self, encoder: ClipEncoder, cfg: ClipTrainConfig,
                 names: InventedNames | None) -> None:
        self.encoder, self.cfg, self.names = encoder, cfg, names
        model = encoder.model
        self.optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                           betas=cfg.betas, eps=cfg.eps)
        warmup = max(1, round(cfg.warmup_frac * cfg.steps))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _warmup_cosine(s, warmup, cfg.steps, cfg.min_lr_frac))
        self.loss_fn = ClipLoss()
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                       enabled=encoder.device.type == "cuda")

    def __call__(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the contrastive loss, the name loss or None), both detached."""
        model, encoder, cfg = self.encoder.model, self.encoder, self.cfg
        images, captions = batch
        name_loss = None
        with self.autocast:
            image_features = model.encode_image(encoder.preprocess_images(images), normalize=True)
            text_features = model.encode_text(encoder.tokenize(captions), normalize=True)
            loss = self.loss_fn(image_features, text_features, model.logit_scale.exp())
            total = loss
            if self.names is not None:
                first, second = self.names.batch(cfg.name_pairs)
                both = model.encode_text(encoder.tokenize(first + second), normalize=True)
                name_loss = self.loss_fn(both[: len(first)], both[len(first) :],
                                         model.logit_scale.exp())
                total = loss + cfg.name_weight * name_loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        return loss.detach(), None if name_loss is None else name_loss.detach()

    def record(self, step: int, window: list[torch.Tensor], name_window: list[torch.Tensor],
               elapsed_s: float) -> dict[str, float]:
        """What `log` receives: the losses averaged since the last record."""
        record = {"step": step, "loss": float(torch.stack(window).mean()),
                  "logit_scale": float(self.encoder.model.logit_scale.detach().exp()),
                  "lr": self.schedule.get_last_lr()[0], "elapsed_s": elapsed_s}
        if name_window:
            record["name_loss"] = float(torch.stack(name_window).mean())
        return record


def _note(history: ClipHistory, record: dict[str, float], bar: tqdm,
          log: LogCallback | None) -> None:
    history.steps.append(int(record["step"]))
    history.losses.append(record["loss"])
    if "name_loss" in record:
        history.name_losses.append(record["name_loss"])
    history.logit_scales.append(record["logit_scale"])
    bar.set_postfix(loss=f"{record['loss']:.3f}", scale=f"{record['logit_scale']:.1f}")
    logger.debug("clip step %d loss %.4f scale %.1f", record["step"], record["loss"],
                 record["logit_scale"])
    if log is not None:
        log(record)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # open_clip's split: no decay on gains, biases, embeddings' 1-D parts or the scale
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name \
            or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the base lr: linear warmup, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())

