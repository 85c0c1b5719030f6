"""What the benchmarks share: the repository on sys.path, timed rounds read as the median (and range) of ratios
taken within each round, and JSON results.

Every bench/*.py imports it before anything else (``from _common import ROOT``; ruff's isort keeps it in a
section of its own, ahead of the standard library): python puts bench/ on sys.path, not the repository, and the
benchmarks run from a checkout where xtra_ds need not be installed (bench/run_gpu.sh on the GPU machine).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

STARTED = time.monotonic()  # before the benchmark's own imports (torch, DeepSpeed): the GPU budgets count from here
ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))


def timed(fn: Callable, *args) -> float:
    """Wall-clock seconds of one call ``fn(*args)``."""
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def alternate(measures: dict[str, Callable[[], object]], rounds: int) -> dict[str, list]:
    """Every measure once per round, in the given order, for ``rounds`` rounds, so that the machine's drifting
    speed (it is shared) hits them alike; each measure's results, one per round."""
    results: dict[str, list] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            results[name].append(measure())
    return results


def ratios(num: list[float], den: list[float], per: float = 1.0) -> list[float]:
    """``num / per / den`` of each round: a ratio of two measurements taken on the same machine at the same time."""
    return [x / per / y for x, y in zip(num, den, strict=True)]


def median_range(values: list[float]) -> str:
    """``1.23 (rounds 1.10–1.30)``: the median over rounds and their range."""
    return f"{statistics.median(values):.2f} (rounds {min(values):.2f}–{max(values):.2f})"


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    """``obj`` as JSON at ``path``, replaced whole (a stop mid-write leaves the previous results); values json
    cannot encode are written as their ``str()``."""
    from xtra_ds.storage import write_atomic

    write_atomic(path, json.dumps(obj, indent=indent, default=str).encode())
