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
    block_losses: torch.Tensor | None = None  # sum over the steps of this rank's loss by block position (device)

    def add(self, seconds: float, data_wait: float, block_losses: torch.Tensor | None = None) -> None:
        self.steps, self.seconds, self.data_wait = self.steps + 1, self.seconds + seconds, self.data_wait + data_wait
        if block_losses is not None and torch.isfinite(block_losses).all():  # no host sync: stays on the device
            self.block_losses = block_losses if self.block_losses is None else self.block_losses + block_losses

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

    def note_step(self, seconds: float, data_wait: float, block_losses: torch.Tensor | None = None) -> None:
        """Every step, logged or not: its wall time, how long it waited for data, its loss by block position."""
        self.step_times.append(seconds)
        self.window.add(seconds, data_wait, block_losses)

    def take_window(self) -> Window:
        """The steps since the last call (the last log line); starts a new window."""
        window, self.window = self.window, Window()
        return window

    def log(self, step: int, scalars: dict[str, float], record: dict | None = None) -> None:
        """A log step: ``scalars`` to TensorBoard, the console line and ``metrics.jsonl``; ``record`` (exact
        values such as the key digest, no use as a curve) to ``metrics.jsonl`` only."""
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.record(step, {**scalars, **(record or {})})
        eta = np.mean(self.step_times) * (self.total_steps - step) if self.step_times else 0.0
        parts = [f"step {step}/{self.total_steps}", f"loss {scalars.get('train/loss', float('nan')):.4f}",
                 f"lr {scalars.get('train/lr', 0):.2e}", f"gnorm {scalars.get('train/grad_norm', float('nan')):.3f}",
                 f"{scalars.get('perf/images_per_sec', 0):.1f} img/s"]
        if "perf/mfu" in scalars:
            parts.append(f"MFU {100 * scalars['perf/mfu']:.1f}%")
        parts += [f"data wait {100 * scalars.get('perf/data_wait_fraction', 0):.0f}%", f"ETA {fmt_duration(eta)}"]
        log.info("  ".join(parts))

    def record(self, step: int, values: dict) -> None:
        """One ``metrics.jsonl`` row for ``step`` (every step writes one: the steps between log steps carry only
        what is recorded every step, ``data/keys_digest``)."""
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        """TensorBoard only (not the console line nor metrics.jsonl): figures sampled now and then."""
        if self.enabled:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

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


class StragglerWatch:
    """Names a rank whose steps take ``factor`` × the median over ranks for ``patience`` log lines in a row."""

    def __init__(self, factor: float = 1.5, patience: int = 3):
        self.factor, self.patience = factor, patience
        self.streak: dict[int, int] = {}

    def observe(self, step_times: list[float]) -> int | None:
        """The straggling rank (index) to name now, or None. ``step_times``: each rank's mean step time."""
        median = float(np.median(step_times))
        slow = {r for r, t in enumerate(step_times) if median > 0 and t >= self.factor * median}
        self.streak = {r: self.streak.get(r, 0) + 1 for r in slow}
        due = [r for r, n in self.streak.items() if n == self.patience]  # named once per streak
        return max(due, key=lambda r: step_times[r]) if due else None


def line_plot(values: list[float], *, title: str, xlabel: str, size=(480, 240)) -> np.ndarray:
    """A small line chart (uint8 HWC) drawn with Pillow: one point per value at x = 1, 2, …; for TensorBoard's
    image tab, where a scalar chart cannot show a profile."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 48, 12, 22, 30
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    finite = [v for v in values if np.isfinite(v)] or [0.0]
    lo, hi = min(finite), max(finite)
    hi = hi if hi > lo else lo + 1.0

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(1, len(values) - 1))
        return x, top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))

    draw.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    points = [xy(i, v) for i, v in enumerate(values) if np.isfinite(v)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for x, y in points:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    draw.text((left, 4), title, fill="black")
    draw.text((2, top - 4), f"{hi:.3g}", fill="black")
    draw.text((2, h - bottom - 8), f"{lo:.3g}", fill="black")
    draw.text((left, h - bottom + 4), "1", fill="black")
    draw.text((w - right - 16, h - bottom + 4), str(len(values)), fill="black")
    draw.text(((w - len(xlabel) * 6) // 2, h - 14), xlabel, fill="black")
    return np.asarray(img)


def _blocks_to_image(values_NP: torch.Tensor, order: list[int], offset: int, stats, bp: int, shape, mean, std):
    """Blocks in sequence order painted where each belongs (``order``), back in image space: block i of
    ``values`` goes to ``order[i + offset]`` (a prediction is drawn where its target block is); the rest grey."""
    C, H, W = shape
    bm, bs = stats
    canvas = torch.full((C, H, W), 0.5)
    per_row = W // bp
    for pos in range(len(order) - offset):
        dst = order[pos + offset]
        v = values_NP[pos].float().cpu() * bs[dst] + bm[dst]  # normalised -> image space
        r, c = divmod(dst, per_row)
        canvas[:, r * bp:(r + 1) * bp, c * bp:(c + 1) * bp] = v.view(C, bp, bp) * std + mean
    return canvas.clamp(0, 1)


def reconstruction_panel(images_BCHW: torch.Tensor, preds_BNP: torch.Tensor, targets_BNP: torch.Tensor,
                         block_order: torch.Tensor, patch_px: int, mean, std, n: int = 4) -> np.ndarray:
    """What a person reads off the model, for the first ``n`` images: one row each, and under titled columns
    ``input | target blocks | predicted blocks | error per block`` (uint8 HWC).

    Targets and predictions are per-block normalised pixels; both are mapped back with the target block's own
    mean and std (from the input image), so the panel shows how well the *shape* of each block was predicted.
    Block i's prediction is drawn where block i+1 goes; the first block in the order has no prediction (grey).
    The error column is each predicted block's mean squared error in normalised units as a heat map, white for
    0 to full red for 1 or more (1 is what predicting the block's mean would score: every block is normalised
    to unit variance), the block without a prediction grey, and the image's worst value in the corner."""
    from PIL import Image, ImageDraw

    B, C, H, W = images_BCHW.shape
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    order = block_order.tolist()
    bp, gap, title_h = patch_px, 2, 14
    rows = []
    for b in range(min(n, B)):
        img = images_BCHW[b].float().cpu()
        blocks = img.reshape(C, H // bp, bp, W // bp, bp).permute(1, 3, 0, 2, 4).reshape(-1, C * bp * bp)
        stats = (blocks.mean(-1, keepdim=True), (blocks.var(-1, keepdim=True) + 1e-6).sqrt())
        target = _blocks_to_image(targets_BNP[b], order, 0, stats, bp, (C, H, W), m, s)
        pred = _blocks_to_image(preds_BNP[b][:-1], order, 1, stats, bp, (C, H, W), m, s)
        err = (preds_BNP[b][:-1].float().cpu() - targets_BNP[b][1:].float().cpu()).square().mean(-1)  # [nb-1]
        heat = torch.full((3, H, W), 0.5)
        worst = float(err.max()) if len(err) else 0.0
        for pos, e in enumerate(err.tolist()):
            r, c = divmod(order[pos + 1], W // bp)
            level = 1 - min(max(e, 0.0), 1.0)  # white (0) to red (>= 1)
            heat[:, r * bp:(r + 1) * bp, c * bp:(c + 1) * bp] = torch.tensor([1.0, level, level]).view(3, 1, 1)
        columns = [(img * s + m).clamp(0, 1), target, pred, heat]
        sep = torch.ones(C, H, gap)
        row = torch.cat([x for col in columns for x in (col, sep)][:-1], dim=2)
        row_img = Image.fromarray((row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        ImageDraw.Draw(row_img).text((3 * (W + gap) + 2, 1), f"{worst:.2f}", fill=(0, 0, 0))
        rows.append(np.asarray(row_img))
        rows.append(np.full((gap, row_img.width, 3), 255, np.uint8))
    header = Image.new("RGB", (rows[0].shape[1], title_h), "white")
    draw = ImageDraw.Draw(header)
    for i, title in enumerate(("input", "target", "predicted", "error")):
        draw.text((i * (W + gap) + 1, 1), title, fill="black")
    return np.concatenate([np.asarray(header), *rows[:-1]], axis=0)
