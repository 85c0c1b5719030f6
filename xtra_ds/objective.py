"""The XTRA next-block objective, kept apart from the model.

The model returns per-head block predictions and the normalised block targets, both in the
sequence's block order; here block i's prediction from head j is compared with block i+1+j.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class LossTerms(NamedTuple):
    """The loss and its parts from one pass over the errors."""

    loss: torch.Tensor  # the objective, a scalar (what forward returns)
    per_sample: torch.Tensor  # [B]: each image's loss (mean over heads and over its predicted blocks)
    per_block: torch.Tensor  # [nb-1]: the loss of each target block position 1..nb-1 (head 1), mean over images


class NextBlockLoss(nn.Module):
    """Mean over heads of ``loss(pred_j[:, :nb-1-j], target[:, 1+j:])``; ``kind`` is "mse" or "l1"."""

    def __init__(self, kind: str = "mse"):
        super().__init__()
        if kind not in ("mse", "l1"):
            raise ValueError(f"loss kind {kind!r}: expected 'mse' or 'l1'")
        self.kind = kind

    def forward(self, preds: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        nb = targets.shape[1]
        if len(preds) >= nb:
            raise ValueError(f"{len(preds)} heads ahead need more than {nb} blocks per image")
        fn = F.mse_loss if self.kind == "mse" else F.l1_loss
        losses = [fn(p[:, : nb - 1 - j].float(), targets[:, 1 + j:].float()) for j, p in enumerate(preds)]
        return torch.stack(losses).mean()

    @torch.no_grad()
    def terms(self, preds: list[torch.Tensor], targets: torch.Tensor) -> LossTerms:
        """The loss with each image's share and each block position's (no gradient; for incidents, replays and
        the loss-by-position charts). ``per_sample.mean()`` is the loss; ``per_block`` is head 1's, by the
        position of the block it predicts (the sequence's order: with pseudo-random orders a position is not a
        fixed place in the image)."""
        nb = targets.shape[1]
        err = [(p[:, : nb - 1 - j].float() - targets[:, 1 + j:].float()) for j, p in enumerate(preds)]
        err = [e.square() if self.kind == "mse" else e.abs() for e in err]  # [B, nb-1-j, D] each
        per_sample = torch.stack([e.mean(dim=(1, 2)) for e in err]).mean(0)  # [B]
        return LossTerms(per_sample.mean(), per_sample, err[0].mean(dim=(0, 2)))
