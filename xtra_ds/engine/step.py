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
from ..data.handover import to_device
from ..data.order import micro_splits, micro_weight
from ..data.transforms import normalize_on_device
from .dist import sum_over_ranks, world_size


class SkipGuard:
    """Makes an optimizer's ``step()`` do nothing while ``skip`` is set: no weight, no Adam moment and no
    step count changes. DeepSpeed's engines call the client optimizer's step from inside ``engine.step()``,
    after their own gradient reduction, norm and clipping, so setting ``skip`` before ``engine.step()``
    skips the update at any ZeRO stage while DeepSpeed still clears the gradients and keeps its counters.

    ``check_grads``: also skip when a gradient the optimizer is about to apply is not finite. Needed
    where nothing else looks (ZeRO stage 0 without a DeepSpeed precision wrapper calls the client
    optimizer directly, with every rank holding the same all-reduced gradients, and reports no gradient
    norm: ``grad_norm`` is then the norm of the gradients as they reach the optimizer, after clipping);
    DeepSpeed's ZeRO and bf16/fp16 optimizers skip a step with a non-finite gradient norm themselves,
    before calling us."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, check_grads: bool = False):
        self.optimizer, self.skip, self.check_grads, self.skipped = optimizer, False, check_grads, False
        self.grad_norm: float | None = None
        apply = optimizer.step

        def step(*args, **kwargs):  # replaces the bound method on this one instance
            if self.check_grads:
                self.grad_norm = _grad_norm(optimizer)
            if self.skip or (self.check_grads and not math.isfinite(self.grad_norm)):
                self.skipped = True
                return None
            return apply(*args, **kwargs)

        optimizer.step = step


def _grad_norm(optimizer: torch.optim.Optimizer) -> float:
    """The L2 norm of every gradient ``optimizer`` would apply (NaN or inf when one is not finite)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
        if grads else 0.0


class PlainEngine:
    """A model and an optimizer on one process, driven like a DeepSpeed engine: ``engine(x)``,
    ``engine.backward(loss)`` (scaled by 1/accumulation, as DeepSpeed does), ``engine.step()``
    (clips and steps at the accumulation boundary; a non-finite gradient norm skips the update, as
    DeepSpeed's optimizers do), ``get_global_grad_norm()``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, accum: int = 1,
                 grad_clip: float = 0.0):
        self.module, self.optimizer, self.accum, self.grad_clip = model, optimizer, accum, grad_clip
        self.skip_guard = SkipGuard(optimizer)
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
            if math.isfinite(self._grad_norm):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm


@dataclass
class StepResult:
    loss: float  # mean over micro batches and ranks (NaN when skipped)
    norm: object  # the global gradient norm as the engine left it: a device tensor, a float or None
    skipped: bool  # a non-finite loss on some rank or a non-finite gradient norm: no update anywhere
    images: torch.Tensor  # the last micro batch as the model saw it (for reconstructions)
    output: object  # the model's output on it (XTRAOutput)
    sample_losses: torch.Tensor | None = None  # [n] this rank's images' own losses, in its share's order (device)
    block_losses: torch.Tensor | None = None  # [nb-1] this rank's loss by target block position (device)
    keys_digest: int | None = None  # the global batch's key digest, summed over ranks (when one was given)
    stop: bool = False  # some rank asked to stop (``stop_requested``), decided alike everywhere

    @property
    def grad_norm(self) -> float:
        """The global gradient norm (NaN when unknown). Read on demand — log steps, incidents — so that a step
        that does not log does not wait for the device to hand it over."""
        if self.norm is None:
            return float("nan")
        return float(self.norm)


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
               device: torch.device, autocast: torch.dtype | None = None, keys_digest: int | None = None,
               stop_requested=None) -> StepResult:
    """Forward/backward every micro batch, then one optimizer step at learning rate ``lr``.

    The images reach the model normalised in fp32 whatever the engine's precision: the model
    computes its pixel targets from them and casts only its encoder's input to the weights'
    dtype. ``autocast``: run the forward under ``torch.autocast`` with this dtype (mixed
    precision over fp32 weights, as a plain PyTorch baseline does), or not at all.

    A skipped step leaves no trace: when the loss of any micro batch on any rank is not finite, or the
    global gradient norm is not finite, the weights, both Adam moments and the optimizer's step count
    stay exactly as they were, on every rank (``engine.skip_guard``, :class:`SkipGuard`). Every rank still
    runs the same forwards, backwards and collectives. A micro batch may carry ``poison``: rows whose
    normalised pixels are set to NaN (``XTRA_FAULT``'s ``nan_sample`` point; tests only).

    One host synchronisation per step, at the last micro batch (before its backward): the all-reduce that
    decides the skip also carries the step's loss, this rank's share's key digest (``keys_digest``; it comes
    back as the global batch's) and whether this rank was asked to stop (``stop_requested()``, read then; the
    result's ``stop`` is true on every rank if on any), read to the host in one copy. Nothing else waits for
    the device: the losses accumulate there, whether the update was skipped comes from the engine's own
    record (DeepSpeed's optimizers read their gradient norm for their overflow check), and the gradient norm
    is read only when asked for (:attr:`StepResult.grad_norm`). Each image's own loss and the loss by block
    position come from the same forward (``loss_fn.terms``), on the device. Collective: every rank calls it.
    """
    guard: SkipGuard = engine.skip_guard
    losses, nonfinite = [], torch.zeros((), device=device)  # any non-finite loss on this rank (on the device)
    per_sample, per_block = [], 0
    stop, step_loss = False, float("nan")
    for batch in micro_batches:
        x = normalize_on_device(to_device(batch["images"], device))  # fp32 [B, 3, H, W]
        if batch.get("poison"):
            x[batch["poison"]] = float("nan")
        out, loss = _forward(engine, x, order, loss_fn, autocast)
        if batch.get("weight", 1.0) != 1.0:  # uneven shares: see micro_batches
            loss = loss * batch["weight"]
        nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss.detach())).float())
        losses.append(loss.detach().float())
        terms = loss_fn.terms(out.preds, out.targets)
        per_sample.append(terms.per_sample)
        per_block = per_block + terms.per_block * len(terms.per_sample)
        if engine.is_gradient_accumulation_boundary():
            stop = bool(stop_requested()) if stop_requested is not None else False
            floats = torch.stack([(nonfinite > 0).double(), torch.stack(losses).mean().double()])  # on the device
            ints = torch.tensor([keys_digest or 0, stop], dtype=torch.int64, device=device)  # from the host
            floats, ints = sum_over_ranks(floats, ints)  # the step's one host synchronisation
            guard.skip, step_loss = floats[0] > 0, floats[1] / world_size()  # Python numbers by now
            keys_digest, stop = (ints[0] if keys_digest is not None else None), ints[1] > 0
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
        engine.backward(loss)  # a non-finite loss too: the collectives stay in step, the update is skipped
        engine.step()
    skipped_by_loss, guard.skip = guard.skip, False
    norm = engine.get_global_grad_norm()
    norm = norm if norm is not None else guard.grad_norm
    overflow = getattr(engine.optimizer, "overflow", None)  # DeepSpeed's ZeRO and bf16 optimizers keep one
    if isinstance(overflow, bool):  # their own check of the gradient norm, already read to the host
        skipped = skipped_by_loss or guard.skipped or overflow
    else:  # the client optimizer itself (ZeRO stage 0, PlainEngine): look at the norm
        skipped = skipped_by_loss or guard.skipped or norm is None or not math.isfinite(float(norm))
    guard.skipped, guard.grad_norm = False, None
    mean = float("nan") if skipped_by_loss else step_loss
    sample_losses = torch.cat(per_sample)
    return StepResult(mean, norm, skipped, x, out, sample_losses, per_block / max(1, len(sample_losses)),
                      keys_digest, stop)
