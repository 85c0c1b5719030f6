"""Steps worth a second look, recorded as they happen: a skipped (non-finite) step or a loss spike.

A spike is a loss far above the recent ones, by a robust z-score — (loss − median) / (1.4826 × MAD) over the
last ``incidents.spike_window`` steps — so that a slowly falling loss and the occasional noisy step do not
count, and the spike itself does not raise the bar for the next one (it is not added to the history). Either
kind writes ``run_dir/incidents/step_N.json`` (:func:`xtra_ds.rundir.incident_record`): every image of the step
with its own loss from the same forward, worst first, its key and rank, and the step's loss, learning rate and
gradient norm — and the command that replays the step (``launchers/replay.py``). Normal steps write nothing and
cost one comparison.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch

from ..rundir import RunDir, incident_record


@dataclass(frozen=True)
class Spike:
    z: float
    median: float
    scale: float  # 1.4826 × the median absolute deviation


class SpikeDetector:
    """The robust z-score of each finite loss against the last ``window`` ordinary ones."""

    def __init__(self, z: float, window: int):
        self.z, self.window = z, window
        self.history: deque[float] = deque(maxlen=window)

    @property
    def warm(self) -> bool:
        return len(self.history) >= max(20, self.window // 4)

    def observe(self, loss: float) -> Spike | None:
        """The spike ``loss`` is, or None (then it joins the history)."""
        if not math.isfinite(loss):
            return None
        if self.z > 0 and self.warm:
            median = statistics.median(self.history)
            scale = 1.4826 * statistics.median(abs(v - median) for v in self.history)
            z = (loss - median) / scale if scale > 0 else (math.inf if loss > median else 0.0)
            if z > self.z:
                return Spike(z, median, scale)
        self.history.append(loss)
        return None


def gather_samples(keys: list[str], losses: torch.Tensor, rank: int) -> list[dict]:
    """Every rank's images of the step (key, own loss, rank), on every rank. Collective: only when an incident is
    being recorded (every rank decides alike: the loss and the skip are global)."""
    import torch.distributed as dist

    mine = [{"key": k, "loss": float(v), "rank": rank} for k, v in zip(keys, losses.tolist(), strict=True)]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [s for part in everyone for s in part]


def worst_first(samples: list[dict]) -> list[dict]:
    """Non-finite losses first, then the largest."""
    return sorted(samples, key=lambda s: (math.isfinite(s["loss"]), -s["loss"] if math.isfinite(s["loss"]) else 0))


def write_incident(run: RunDir, step: int, *, kind: str, loss: float, lr: float, grad_norm: float, skipped: bool,
                   samples: list[dict], spike: Spike | None, world_size: int) -> str:
    """Write the incident record of ``step`` (once: a second call for the same step replaces nothing it lacks);
    returns the record's path for the console line."""
    record = {"step": step, "kind": kind, "time": time.time(), "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "skipped": skipped, "world_size": world_size, "samples": worst_first(samples),
              "replay": f"python launchers/replay.py {run.url} --step {step}"}
    if spike is not None:
        record |= {"z": spike.z, "median": spike.median, "scale": spike.scale}
    run.write_text(incident_record(step), json.dumps(_json_safe(record), indent=1, allow_nan=False))
    return run.url_of(incident_record(step))


def _json_safe(value):
    """``value`` with every non-finite float as None (JSON has no NaN): a non-finite loss reads as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
