"""Quick probes for monitoring: probe banks trained on cached features of one export.

Features are computed once (no augmentation), then each probe kind trains one head per
learning rate side by side for a few epochs; the best head's top-1 on the validation split is
the reported figure (the learning rate is chosen on the split it is reported on — the usual
monitoring shortcut, fine for comparing exports of one run, not for publishing numbers; use
``launchers/probe.py`` for those).
"""

from __future__ import annotations

import time

import torch

from .features import Features
from .probes import ProbeBank, best_of


def fit_probe(kind: str, train: Features, val: Features, *, num_classes: int, lrs: list[float], epochs: int,
              batch_size: int = 256, weight_decay: float = 0.05, num_heads: int = 16, seed: int = 0) -> dict:
    """Train a bank of ``kind`` probes on ``train`` features; top-1 on ``val`` per learning rate."""
    xs = train.linear if kind == "linear" else train.attentive
    xv = val.linear if kind == "linear" else val.attentive
    n = len(train.labels)
    bs = min(batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop the ragged last batch: BatchNorm dislikes tiny batches
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    bank = ProbeBank(kind, xs.shape[-1], num_classes, lrs, total_steps=epochs * steps_per_epoch,
                     weight_decay=weight_decay, num_heads=num_heads).to(xs.device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(xs.device)
        for s in range(steps_per_epoch):
            idx = perm[s * bs:(s + 1) * bs]
            bank.train_step(xs[idx].float(), train.labels[idx])
    correct = torch.zeros(len(lrs), device=xs.device)
    for i in range(0, len(val.labels), 1024):
        correct += bank.correct(xv[i:i + 1024].float(), val.labels[i:i + 1024])
    return best_of(correct, len(val.labels), lrs) | {"epochs": epochs, "train_seconds": time.perf_counter() - t0}
