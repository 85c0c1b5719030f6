"""Learning-rate schedule and optimizer parameter groups (pure, unit-tested)."""

from __future__ import annotations

import math

from torch import nn


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float,
          warmup_start_lr: float = 1e-4, final_lr: float = 1e-6) -> float:
    """Per-step linear warmup from ``warmup_start_lr`` to ``peak_lr``, then cosine to ``final_lr``.

    ``step`` counts optimizer steps from 0; at ``step == warmup_steps`` the rate is ``peak_lr``
    and at ``step == total_steps`` it is ``final_lr`` (it stays there beyond).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_lr + (peak_lr - warmup_start_lr) * step / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay)
    return final_lr + 0.5 * (peak_lr - final_lr) * (1 + math.cos(math.pi * t))


def decays(name: str, param) -> bool:
    """The reference's rule: every tensor is decayed except biases and 1-D tensors (norm weights);
    position embeddings ([1, N, d]) *are* decayed. Judged by the parameter's full shape: a ZeRO-3
    partitioned parameter holds a 1-D placeholder (its ``ds_shape`` is the real one)."""
    return not (name.endswith(".bias") or len(getattr(param, "ds_shape", param.shape)) <= 1)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: ``weight_decay`` where :func:`decays`, none elsewhere."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
