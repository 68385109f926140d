"""Training loop for the VQ image tokenizer (model/vq.py).

Reconstruction MSE plus the commitment loss; the codebook itself follows the encoder by EMA
inside the model, so the optimizer only sees encoder and decoder weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from model.vq import VQModel, VQOutput

logger = logging.getLogger(__name__)

# An iterable of image batches (re-iterated when exhausted, e.g. a DataLoader) or a
# zero-argument callable that returns a fresh batch each call.
Batches = Iterable[Tensor] | Callable[[], Tensor]
Callback = Callable[[int, dict[str, float]], None]

HISTORY_KEYS = ("step", "loss", "recon_loss", "commit_loss", "perplexity", "usage", "restarts",
                "elapsed_s")


def _batch_source(batches: Batches) -> Iterator[Tensor]:
    if isinstance(batches, Tensor):  # checked here, not lazily at the first step
        raise TypeError("batches must be an iterable of image batches or a callable, "
                        "not a single tensor")
    return _from_callable(batches) if callable(batches) else _from_iterable(batches)


def _from_callable(make_batch: Callable[[], Tensor]) -> Iterator[Tensor]:
    while True:
        yield make_batch()


def _from_iterable(batches: Iterable[Tensor]) -> Iterator[Tensor]:
    while True:
        it = iter(batches)
        empty = True
        for batch in it:
            empty = False
            yield batch
        if empty or it is batches:  # a one-shot iterator cannot be restarted
            return


class _Window:
    """Running means over the steps since the last log line."""

    def __init__(self, codebook_size: int, device: torch.device):
        # summed as tensors so that a GPU run only synchronises at log steps
        self.sums: dict[str, Tensor | float] = dict.fromkeys(
            ("loss", "recon_loss", "commit_loss", "perplexity"), 0.0)
        self.seen = torch.zeros(codebook_size, dtype=torch.bool, device=device)
        self.steps = 0

    def add(self, out: VQOutput) -> None:
        for key in self.sums:
            self.sums[key] += getattr(out, key).detach()
        self.seen[out.codes.reshape(-1)] = True
        self.steps += 1

    def close(self) -> dict[str, float]:
        metrics = {key: float(total) / self.steps for key, total in self.sums.items()}
        metrics["usage"] = float(self.seen.float().mean())
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.seen.zero_()
        self.steps = 0
        return metrics


def train_vq(
    model: VQModel,
    batches: Batches,
    steps: int,
    *,
    lr: float = 3e-3,
    log_every: int = 100,
    progress: bool = True,
    callback: Callback | None = None,
) -> dict[str, list[float]]:
    """Train `model` in place for `steps` optimizer steps; returns the logged history.

    Every `log_every` steps (and at the last step) the history gets the means over the
    window of loss, recon_loss (pixel MSE), commit_loss and perplexity, plus `usage`: the
    fraction of the codebook used at least once in the window, `restarts`: dead codes
    re-initialised so far, and `elapsed_s`. `callback(step, metrics)` is called with the
    same numbers. Constant lr after a short warm-up; on CUDA the forward pass runs under
    bf16 autocast. Trains a bare (single-process) VQModel.
    """
    device = model.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, min(100, steps // 20))  # Adam's early steps are noisy; ramp lr up
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
    window = _Window(model.config.codebook_size, device)
    restarts_at_start = model.quantizer.num_restarts
    start = time.perf_counter()

    def record(step: int) -> None:
        metrics = window.close()
        metrics["restarts"] = float(model.quantizer.num_restarts - restarts_at_start)
        metrics["elapsed_s"] = time.perf_counter() - start
        history["step"].append(float(step))
        for key, value in metrics.items():
            history[key].append(value)
        logger.info("vq step %d loss %.5f mse %.5f usage %.3f ppl %.1f", step, metrics["loss"],
                    metrics["recon_loss"], metrics["usage"], metrics["perplexity"])
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", usage=f"{metrics['usage']:.2f}")
        if callback is not None:
            callback(step, metrics)

    was_training = model.training
    model.train()
    source = _batch_source(batches)
    bar = tqdm(range(1, steps + 1), desc="vq", disable=not progress, dynamic_ncols=True)
    step = 0
    for step in bar:
        images = next(source, None)
        if images is None:
            logger.warning("batches ran out after %d of %d steps", step - 1, steps)
            step -= 1
            break
        with autocast:
            out = model(images.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.add(out)
        if step % log_every == 0 or step == steps:
            record(step)
    if window.steps:  # the batches ran out part-way through a window
        record(step)
    bar.close()
    model.train(was_training)
    return history
