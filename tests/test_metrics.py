"""What the people watching a run see: stragglers named, the loss-by-position chart, the reconstruction panel."""

from __future__ import annotations

import logging

import numpy as np
import torch

from xtra_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from xtra_ds.engine.metrics import StragglerWatch, line_plot, reconstruction_panel

from conftest import tiny


def test_a_straggler_is_named_once_after_several_slow_log_lines():
    w = StragglerWatch(factor=1.5, patience=3)
    normal, rank2_slow = [1.0, 1.1, 0.9, 1.0], [1.0, 1.1, 1.8, 1.0]
    assert [w.observe(rank2_slow) for _ in range(2)] == [None, None]  # not yet: two log lines
    assert w.observe(rank2_slow) == 2
    assert w.observe(rank2_slow) is None  # named once per streak
    assert w.observe(normal) is None and [w.observe(rank2_slow) for _ in range(3)] == [None, None, 2]
    assert all(StragglerWatch().observe([1.0, 1.4]) is None for _ in range(5))  # under 1.5× the median


def test_the_loss_by_position_chart_is_an_image():
    img = line_plot([0.9, float("nan"), 0.5, 0.4], title="t", xlabel="x")
    assert img.dtype == np.uint8 and img.shape == (240, 480, 3)
    assert (img != 255).any(axis=2).sum() > 500  # something is drawn


def test_the_reconstruction_panel_has_a_titled_row_per_image_and_an_error_map():
    model = tiny()  # 32 px, 16 px blocks: 4 blocks
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    out = model(x)
    preds = out.preds[0].detach().clone()
    preds[:, 0] = out.targets[:, 1]  # the block at position 1 predicted exactly: white in the error map
    panel = reconstruction_panel(x, preds, out.targets, out.block_order, 16, IMAGENET_MEAN, IMAGENET_STD, n=4)
    assert panel.shape == (14 + 4 * 32 + 3 * 2, 4 * 32 + 3 * 2, 3)
    error = panel[14:14 + 32, 3 * 34:3 * 34 + 32]  # the first image's error map
    first_target = out.block_order.tolist()[1]  # where position 1's block lies
    r, c = divmod(first_target, 2)
    assert (error[r * 16 + 8, c * 16 + 8] > 240).all()  # exact: white
    other = out.block_order.tolist()[2]
    r, c = divmod(other, 2)
    assert error[r * 16 + 8, c * 16 + 8, 0] > 200 and error[r * 16 + 8, c * 16 + 8, 1] < 200  # wrong: red


def test_the_console_filter_keeps_the_runs_lines_and_errors():
    from xtra_ds.engine.logs import ConsoleFilter

    def rec(name, level):
        return logging.LogRecord(name, level, __file__, 1, "m", None, None)

    quiet, verbose = ConsoleFilter(logging.INFO, False), ConsoleFilter(logging.INFO, True)
    assert quiet.filter(rec("xtra_ds.train", logging.INFO)) and quiet.filter(rec("DeepSpeed", logging.ERROR))
    assert not quiet.filter(rec("DeepSpeed", logging.INFO)) and not quiet.filter(rec("py.warnings", logging.WARNING))
    assert not quiet.filter(rec("xtra_ds_other", logging.INFO))
    assert verbose.filter(rec("DeepSpeed", logging.INFO)) and not verbose.filter(rec("DeepSpeed", logging.DEBUG))
    assert not ConsoleFilter(logging.WARNING, False).filter(rec("xtra_ds.train", logging.INFO))  # rank > 0
