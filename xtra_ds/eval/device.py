"""Where evaluation runs, and how it stays out of training's way."""

from __future__ import annotations

import os

import torch


def pick_device(name: str) -> torch.device:
    """``auto`` (cuda if present, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"eval.device={name}: no CUDA device is visible to this process")
    return torch.device(name)


def be_polite(device: torch.device, threads: int) -> None:
    """Yield the CPU to training: lower priority and, on a CPU, few threads."""
    try:
        os.nice(10)
    except OSError:
        pass
    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 4) // 4))
