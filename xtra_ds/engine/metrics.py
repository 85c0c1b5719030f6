"""Metrics to TensorBoard, a JSON-lines file and the console — rank 0 only."""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ..config.schema import LoggingConfig
from ..rundir import METRICS, RunDir

log = logging.getLogger("xtra_ds.train")


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass
class Window:
    """What happened since the last log line: every step counts, not only the one that logs."""

    steps: int = 0
    seconds: float = 0.0  # wall time of those steps
    data_wait: float = 0.0  # of which the loop waited for the loader

    def add(self, seconds: float, data_wait: float) -> None:
        self.steps, self.seconds, self.data_wait = self.steps + 1, self.seconds + seconds, self.data_wait + data_wait

    def images_per_sec(self, global_batch: int) -> float:
        return self.steps * global_batch / max(self.seconds, 1e-9)

    @property
    def wait_fraction(self) -> float:
        return self.data_wait / max(self.seconds, 1e-9)


class MetricsProcessor:
    """TensorBoard scalars/images/text, ``metrics.jsonl`` and the console line (``logging.*``)."""

    def __init__(self, run: RunDir, cfg: LoggingConfig, *, enabled: bool, total_steps: int,
                 purge_step: int | None = None):
        """``purge_step``: the first step this process logs when it resumes; TensorBoard then drops what an
        earlier process logged at that step and after (work lost to a crash, or an abandoned timeline)."""
        self.enabled, self.log_every, self.total_steps = enabled, cfg.log_every, total_steps
        self.step_times: deque = deque(maxlen=50)
        self.window = Window()
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(run.tb_dir(cfg.tb_dir), purge_step=purge_step)
            self.jsonl = open(run.local_path(METRICS), "a")

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def note_step(self, seconds: float, data_wait: float) -> None:
        """Every step, logged or not: its wall time and how long it waited for data."""
        self.step_times.append(seconds)
        self.window.add(seconds, data_wait)

    def take_window(self) -> Window:
        """The steps since the last call (the last log line); starts a new window."""
        window, self.window = self.window, Window()
        return window

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        eta = np.mean(self.step_times) * (self.total_steps - step) if self.step_times else 0.0
        parts = [f"step {step}/{self.total_steps}", f"loss {scalars.get('train/loss', float('nan')):.4f}",
                 f"lr {scalars.get('train/lr', 0):.2e}", f"gnorm {scalars.get('train/grad_norm', float('nan')):.3f}",
                 f"{scalars.get('perf/images_per_sec', 0):.1f} img/s"]
        if "perf/mfu" in scalars:
            parts.append(f"MFU {100 * scalars['perf/mfu']:.1f}%")
        parts += [f"data wait {100 * scalars.get('perf/data_wait_fraction', 0):.0f}%", f"ETA {fmt_duration(eta)}"]
        log.info("  ".join(parts))

    def image(self, tag: str, img_HWC: np.ndarray, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, img_HWC, step, dataformats="HWC")
            self.writer.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def reconstruction_panel(image_CHW: torch.Tensor, pred_NP: torch.Tensor, target_NP: torch.Tensor,
                         block_order: torch.Tensor, patch_px: int, mean, std) -> np.ndarray:
    """Input | target blocks | predicted blocks, side by side, as uint8 HWC.

    Targets and predictions are per-block normalised pixels; both are mapped back with the
    target block's own mean and std (from the input image), so the panel shows how well the
    *shape* of each block was predicted. Block i's prediction is drawn where block i+1 goes;
    the first block in the order has no prediction (grey).
    """
    C, H, W = image_CHW.shape
    img = image_CHW.float().cpu()
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    rgb = (img * s + m).clamp(0, 1)
    bp = patch_px
    per_row = W // bp
    blocks = img.reshape(C, H // bp, bp, W // bp, bp).permute(1, 3, 0, 2, 4).reshape(-1, C * bp * bp)
    bm, bs = blocks.mean(-1, keepdim=True), (blocks.var(-1, keepdim=True) + 1e-6).sqrt()

    def paint(values_NP, offset):
        canvas = torch.full((C, H, W), 0.5)
        order = block_order.tolist()
        for pos in range(len(order) - offset):
            dst = order[pos + offset]
            v = values_NP[pos].float().cpu() * bs[dst] + bm[dst]  # normalised -> image space
            r, c = divmod(dst, per_row)
            canvas[:, r * bp:(r + 1) * bp, c * bp:(c + 1) * bp] = (v.view(C, bp, bp) * s + m)
        return canvas.clamp(0, 1)

    target = paint(target_NP, 0)
    pred = paint(pred_NP[:-1], 1)
    sep = torch.ones(C, H, 2)
    panel = torch.cat([rgb, sep, target, sep, pred], dim=2)
    return (panel.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
