"""The XTRA next-block objective, kept apart from the model.

The model returns per-head block predictions and the normalised block targets, both in the
sequence's block order; here block i's prediction from head j is compared with block i+1+j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
