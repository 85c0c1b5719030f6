"""One optimizer step as one function, for the DeepSpeed engine and for plain PyTorch alike.

:func:`train_step` is what the trainer runs every step; the tests' single-process reference and
the benchmarks' baseline run the same function on a :class:`PlainEngine`, which offers the part
of DeepSpeed's engine interface the step uses. So "the engine matches plain PyTorch" compares
the engines, never two copies of the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config.derive import BatchPlan
from ..data.order import micro_splits, micro_weight
from ..data.transforms import normalize_on_device
from .dist import any_rank, mean_over_ranks


class PlainEngine:
    """A model and an optimizer on one process, driven like a DeepSpeed engine: ``engine(x)``,
    ``engine.backward(loss)`` (scaled by 1/accumulation, as DeepSpeed does), ``engine.step()``
    (clips and steps at the accumulation boundary), ``get_global_grad_norm()``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, accum: int = 1,
                 grad_clip: float = 0.0):
        self.module, self.optimizer, self.accum, self.grad_clip = model, optimizer, accum, grad_clip
        self.micro_steps = 0
        self._grad_norm: float | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else math.inf)
            self._grad_norm = float(norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm


@dataclass
class StepResult:
    loss: float  # mean over micro batches and ranks (NaN when skipped)
    grad_norm: float
    skipped: bool  # a non-finite loss on some rank: the update was skipped everywhere
    images: torch.Tensor  # the last micro batch as the model saw it (for reconstructions)
    output: object  # the model's output on it (XTRAOutput)


def _forward(engine, x: torch.Tensor, order: int | None, loss_fn, autocast: torch.dtype | None):
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = engine(x, order)
        return out, loss_fn(out.preds, out.targets)


def micro_batches(share: dict, batch: BatchPlan) -> list[dict]:
    """A rank's share of a step (the loader's item) cut into ``batch.accum`` micro batches (views). When
    the shares are uneven each carries the loss ``weight`` that keeps the step's gradient the mean over
    the global batch (:func:`xtra_ds.data.order.micro_weight`); when even, every weight is exactly 1."""
    out, row = [], 0
    for n in micro_splits(len(share["keys"]), batch.accum):
        weight = 1.0 if batch.even else micro_weight(n, batch.global_batch, batch.world_size, batch.accum)
        out.append({"images": share["images"][row:row + n], "labels": share["labels"][row:row + n],
                    "keys": share["keys"][row:row + n], "weight": weight})
        row += n
    return out


def train_step(engine, micro_batches: list[dict], *, loss_fn, lr: float, order: int | None,
               device: torch.device, autocast: torch.dtype | None = None) -> StepResult:
    """Forward/backward every micro batch, then one optimizer step at learning rate ``lr``.

    The images reach the model normalised in fp32 whatever the engine's precision: the model
    computes its pixel targets from them and casts only its encoder's input to the weights'
    dtype. ``autocast``: run the forward under ``torch.autocast`` with this dtype (mixed
    precision over fp32 weights, as a plain PyTorch baseline does), or not at all.

    A non-finite loss on any rank skips the update on all of them: every rank still runs the same
    collectives (a zero loss through a clean forward) and the optimizer steps with lr 0, so the
    parameters stay as they were. Collective: every rank calls it.
    """
    losses, skipped = [], False
    for batch in micro_batches:
        x = normalize_on_device(batch["images"].to(device, non_blocking=True))  # fp32 [B, 3, H, W]
        out, loss = _forward(engine, x, order, loss_fn, autocast)
        if batch.get("weight", 1.0) != 1.0:  # uneven shares: see micro_batches
            loss = loss * batch["weight"]
        if any_rank(not torch.isfinite(loss).item(), device):
            skipped = True
            _, clean_loss = _forward(engine, torch.zeros_like(x), order, loss_fn, autocast)
            engine.backward(clean_loss * 0.0)
        else:
            engine.backward(loss)
            losses.append(loss.detach().float())
        if engine.is_gradient_accumulation_boundary():
            for group in engine.optimizer.param_groups:
                group["lr"] = 0.0 if skipped else lr
        engine.step()
    grad_norm = engine.get_global_grad_norm()
    mean = mean_over_ranks(torch.stack(losses).mean().item() if losses else float("nan"), device)
    return StepResult(mean, float(grad_norm) if grad_norm is not None else float("nan"), skipped, x, out)
