"""Gather the encoder's fp32 master weights from a running engine (collective under ZeRO-3)."""

from __future__ import annotations

import torch


def full_fp32_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``module`` as a full fp32 CPU tensor. Collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None when DeepSpeed holds no fp32 master copy of p
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out
