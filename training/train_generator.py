"""Training the RA-CM3 generator (and its no-retrieval "CM3" baseline).

Per training document, as the paper does:
- its neighbours come from the memory, precomputed as a table (`neighbours[i, v]` for
  query variant v: the text part or the image part of the document, with ~20% of the
  query's tokens dropped, the document itself excluded, diversity rule applied);
- K is drawn from {0, 1, 2}, so the model also works without retrieval (the baseline
  always uses K = 0); one draw per step, shared by the batch (`k_per_batch`), so that a
  batch's sequences have about the same length and padding costs little;
- the sequence is `[retrieved doc, <break>]* + main doc + <eos>`, then CM3 causal masking
  of the main document, and the loss is L_main + α·L_retr through per-token weights.

Two choices that the paper leaves open are made explicit here (see `GeneratorTrainConfig`):
`mask_prob`, the fraction of documents that get causal masking (the rest train plain
left-to-right, the form text-to-image decoding uses), and `aligned_frac`, the fraction of
masked documents whose spans are task-shaped (the whole caption, or the row runs of an
image box) rather than uniform CM3 spans; both still use the CM3 sentinel form.

Runs on CPU by default, CUDA with bf16 autocast when present, and under torchrun (DDP):
each rank builds its shard of a global batch that depends only on (seed, step), and the
logged loss is the global weighted mean, so it does not depend on the number of ranks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from model.checkpoint import load_state, save_checkpoint
from model.decoder import CM3Decoder, DecoderConfig
from model.loss import loss_weights, make_batch, weighted_cross_entropy
from model.masking import MaskedSequence, apply_spans, causal_mask, contiguous_runs
from model.tokens import IMG_CLOSE_ID, NUM_MASKS, SEG_MAIN, SRC_ID, assemble

log = logging.getLogger(__name__)


@dataclass
class GeneratorTrainConfig:
    steps: int = 1000
    batch_size: int = 16  # global batch, split across DDP ranks
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1  # cosine decays to this fraction of lr
    grad_clip: float = 1.0
    alpha: float = 0.1  # weight of the retrieved documents' loss (paper: 0.1)
    max_k: int = 2  # K ~ U{0..max_k}; 0 trains the CM3 baseline
    mask_prob: float = 0.5
    aligned_frac: float = 0.5
    # One K per step for the whole batch rather than one per sequence: the same K
    # distribution, but a batch of per-sequence draws almost always holds a K=2 sequence
    # (1 - (2/3)^8 = 96% at batch 8) and pads every other one to its length, a third of
    # the compute spent on padding (`racm3 bench train` measures it).
    k_per_batch: bool = True
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200


@dataclass
class TrainingCorpus:
    """Token ids the trainer needs; built once from the world, the bundle and the memory.

    `main_docs[i]` is training document i as `Document.to_ids`; `memory_docs[j]` memory
    document j; `neighbours[i, v, :]` memory ids for query variant v (-1 = none).
    `image_len` is the bundle's grid size, used for task-shaped image masks.
    """

    main_docs: list[list[int]]
    memory_docs: list[list[int]]
    neighbours: np.ndarray  # (N, V, K_max) int64
    image_grid: tuple[int, int]
    # (N,) how often each document is drawn, relative to the others; None: uniformly
    sample_weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.neighbours.ndim != 3 or self.neighbours.shape[0] != len(self.main_docs):
            raise ValueError("neighbours must be (N_train, variants, K_max)")
        if self.sample_weights is not None:
            w = np.asarray(self.sample_weights, dtype=np.float64)
            if w.shape != (len(self.main_docs),) or (w < 0).any() or w.sum() <= 0:
                raise ValueError("sample_weights must be (N_train,), >= 0, not all zero")
            self.sample_weights = w / w.sum()


@dataclass
class Example:
    ids: list[int]
    weights: list[float]
    k: int
    neighbour_ids: list[int] = field(default_factory=list)
    main_start: int = 0


def _image_box_spans(doc: Sequence[int], grid: tuple[int, int], rng: np.random.Generator):
    """Row runs of a random box of image codes inside `doc` (absolute positions)."""
    src = list(doc).index(SRC_ID) + 1
    h, w = grid
    bh, bw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
    top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    positions = [src + r * w + c for r in range(top, top + bh) for c in range(left, left + bw)]
    return contiguous_runs(positions)[:NUM_MASKS]


def _aligned_spans(doc: Sequence[int], grid: tuple[int, int], rng: np.random.Generator):
    """Task-shaped spans inside a document: its whole caption, or an image box."""
    doc = list(doc)
    src = doc.index(SRC_ID)
    has_text = src > 1
    has_image = doc.index(IMG_CLOSE_ID) - src - 1 == grid[0] * grid[1]
    if has_text and (not has_image or rng.random() < 0.5):
        return [(1, src)]  # caption span: image→caption is infilling of exactly this
    if has_image:
        return _image_box_spans(doc, grid, rng)
    return []


def make_example(
    corpus: TrainingCorpus, i: int, rng: np.random.Generator, cfg: GeneratorTrainConfig,
    k: int | None = None,
) -> Example:
    """One training sequence for document i (see the module docstring); `k` neighbours
    requested (None: drawn here from {0..max_k})."""
    if k is None:
        k = int(rng.integers(0, cfg.max_k + 1))
    elif not 0 <= k <= cfg.max_k:
        raise ValueError(f"k={k} outside 0..max_k={cfg.max_k}")
    variant = int(rng.integers(0, corpus.neighbours.shape[1]))
    neighbour_ids = [int(n) for n in corpus.neighbours[i, variant] if n >= 0][:k]
    retrieved = [corpus.memory_docs[n] for n in neighbour_ids]
    main = corpus.main_docs[i]
    seq = assemble(retrieved, main)
    start = seq.segments.index(SEG_MAIN)
    ids, segments, sentinel = seq.ids, seq.segments, None
    if rng.random() < cfg.mask_prob:
        spans = []
        if rng.random() < cfg.aligned_frac:
            local = _aligned_spans(main, corpus.image_grid, rng)
            spans = [(s + start, e + start) for s, e in local]
        masked: MaskedSequence = (
            apply_spans(ids, spans) if spans else causal_mask(ids, rng, start=start)
        )
        ids, segments, sentinel = masked.ids, masked.carry(segments, SEG_MAIN), masked.is_sentinel
    weights = loss_weights(segments, ids, cfg.alpha, sentinel)
    return Example(ids, weights, len(neighbour_ids), neighbour_ids, start)


def global_batch_indices(n_docs: int, step: int, cfg: GeneratorTrainConfig,
                         weights: np.ndarray | None = None) -> np.ndarray:
    """The documents of step `step`'s global batch: a function of (seed, step) alone."""
    rng = np.random.default_rng([cfg.seed, step, 0])
    if weights is not None:
        return rng.choice(n_docs, size=cfg.batch_size, p=weights)
    return rng.integers(0, n_docs, size=cfg.batch_size)


def step_k(step: int, cfg: GeneratorTrainConfig) -> int | None:
    """The K shared by step `step`'s batch (a function of seed and step, so every DDP
    rank agrees), or None when each sequence draws its own."""
    if not cfg.k_per_batch:
        return None
    return int(np.random.default_rng([cfg.seed, step, 2]).integers(0, cfg.max_k + 1))


def build_batch(corpus: TrainingCorpus, step: int, cfg: GeneratorTrainConfig, block_size: int,
                rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, ...]:
    """This rank's shard of step `step`'s global batch, as `(idx, targets, weights)`."""
    docs = global_batch_indices(len(corpus.main_docs), step, cfg, corpus.sample_weights)
    k = step_k(step, cfg)
    examples = []
    for pos in range(rank, cfg.batch_size, world_size):
        # per-example rng keyed by its global position: identical whatever the world size
        rng = np.random.default_rng([cfg.seed, step, 1, pos])
        examples.append(make_example(corpus, int(docs[pos]), rng, cfg, k=k))
    return make_batch([e.ids for e in examples], [e.weights for e in examples], block_size)


def lr_at(step: int, cfg: GeneratorTrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_frac · lr`."""
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    floor = cfg.min_lr_frac * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: GeneratorTrainConfig) -> torch.optim.AdamW:
    # no weight decay on norms and biases (1-D tensors), as nanoGPT does
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group when launched under it (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _dist_info()


def _save_optimizer(opt: torch.optim.Optimizer, path: Path, step: int) -> None:
    # flattened into safetensors: resuming never unpickles anything
    tensors: dict[str, torch.Tensor] = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            for key, value in opt.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"{gi}.{pi}.{key}"] = t.detach().cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path))
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            state = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items()
                     if k.startswith(f"{gi}.{pi}.")}
            if state:
                opt.state[p] = state


@dataclass
class TrainResult:
    model: CM3Decoder
    history: list[dict]
    wall_s: float
    steps: int


def train_generator(
    corpus: TrainingCorpus,
    model_config: DecoderConfig,
    cfg: GeneratorTrainConfig,
    out_dir: str | Path,
    name: str = "generator",
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Train (or resume) a decoder; checkpoints and a JSONL log go to `out_dir`.

    `stop_at` ends this run early at that step (as a kill would, after a checkpoint there),
    without changing the schedule: a later call resumes it.
    """
    rank, world_size = init_distributed()
    out = Path(out_dir)
    ckpt_dir = out / f"{name}.ckpt"
    torch.manual_seed(cfg.seed)
    model = CM3Decoder(model_config).to(device)
    opt = make_optimizer(model, cfg)
    start = 0
    if resume and (ckpt_dir / "state.json").is_file():
        state, _ = load_state(ckpt_dir, "model", device=device)
        model.load_state_dict(state)
        _load_optimizer(opt, ckpt_dir / "optimizer.safetensors")
        start = json.loads((ckpt_dir / "state.json").read_text())["step"]
        log.info("resumed %s at step %d", name, start)
    ddp = (
        torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    )
    use_bf16 = device.startswith("cuda")
    log_path = out / f"{name}.log.jsonl"
    history: list[dict] = []
    t0 = time.perf_counter()
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    bar = tqdm(range(start, end), desc=f"train {name}", disable=not progress or rank != 0,
               initial=start, total=cfg.steps)
    model.train()
    for step in bar:
        idx, targets, weights = (
            t.to(device) for t in build_batch(
                corpus, step, cfg, model_config.block_size, rank, world_size)
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits, _ = ddp(idx)
        # global normaliser: the same loss whatever the world size
        total_w = weights.sum().detach().clone()
        if world_size > 1:
            dist.all_reduce(total_w)
        loss = weighted_cross_entropy(logits, targets, weights, total_w) * world_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        global_loss = loss.detach() / world_size
        if world_size > 1:
            dist.all_reduce(global_loss)
        record = {"step": step + 1, "loss": float(global_loss), "lr": lr_at(step, cfg),
                  "grad_norm": float(grad_norm), "elapsed_s": round(time.perf_counter() - t0, 3)}
        history.append(record)
        if rank == 0:
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if (step + 1) % cfg.log_every == 0 or step == start or step + 1 == cfg.steps:
                out.mkdir(parents=True, exist_ok=True)
                with log_path.open("a") as f:
                    f.write(json.dumps({"name": name, **record}) + "\n")
                if on_log:
                    on_log(record)
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 in (cfg.steps, end):
                _checkpoint(model, model_config, opt, ckpt_dir, step + 1, cfg)
    model.eval()
    return TrainResult(model, history, time.perf_counter() - t0, cfg.steps)


def _checkpoint(model, model_config, opt, ckpt_dir: Path, step: int, cfg) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, model_config, ckpt_dir, "model")
    _save_optimizer(opt, ckpt_dir / "optimizer.safetensors", step)
    tmp = ckpt_dir / "state.json.tmp"
    tmp.write_text(json.dumps({"step": step, "train_config": asdict(cfg)}))
    os.replace(tmp, ckpt_dir / "state.json")
