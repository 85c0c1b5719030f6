"""Gather the encoder's fp32 master weights from a running engine (collective under ZeRO-3)."""

from __future__ import annotations

import torch


def full_fp32_state(module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter of ``module`` as a full fp32 CPU tensor. Collective under ZeRO-3: every rank gathers
    every parameter, in the same order; only a rank with ``keep`` holds the results (the one that writes
    them): the others drop each tensor as soon as it is gathered, so a node of 8 ranks does not hold 8
    copies of the encoder (2.5 GB each for H/14) in host memory."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None when DeepSpeed holds no fp32 master copy of p
        if keep:
            out[name] = (full if full is not None else p.detach()).float().cpu().clone()
        del full
    return out
