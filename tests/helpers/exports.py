"""Encoder exports of the micro model in a run directory, as training publishes them."""

from __future__ import annotations

from pathlib import Path

import torch

from xtra_ds.models.xtra import XTRAEncoder
from xtra_ds.rundir import ExportMeta, write_export

from conftest import tiny_sizes


def tiny_encoder(seed: int = 0) -> XTRAEncoder:
    """The micro recipe's encoder, initialised from ``seed``."""
    torch.manual_seed(seed)
    return XTRAEncoder(tiny_sizes())


def export_of(run: Path, step: int, enc: XTRAEncoder) -> Path:
    """``enc`` published as the export of ``step`` in the local run directory ``run``; returns its folder."""
    return write_export(run, step, enc.state_dict(), ExportMeta(model="xtra_vit_tiny_patch8", sizes=enc.sizes.__dict__))
