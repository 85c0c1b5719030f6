"""Incidents: which steps are recorded (the robust spike test, non-finite steps) and what the record holds."""

from __future__ import annotations

import json
import math
import random

from xtra_ds.engine.incidents import SpikeDetector, worst_first, write_incident
from xtra_ds.rundir import RunDir


def falling(n: int, seed: int = 0) -> list[float]:
    """A training loss as it looks: falling, noisy."""
    rng = random.Random(seed)
    return [1.0 * math.exp(-i / 300) + rng.gauss(0, 0.01) for i in range(n)]


def test_a_falling_noisy_loss_has_no_spike_and_a_jump_is_one():
    d = SpikeDetector(z=8.0, window=200)
    assert [x for x in falling(600) if d.observe(x)] == []
    last = d.history[-1]
    spike = d.observe(last + 0.5)  # ~50 robust standard deviations up
    assert spike is not None and spike.z > 8 and abs(spike.median - last) < 0.05
    assert d.history[-1] == last  # a spike does not raise the bar for the next one
    assert d.observe(float("nan")) is None and d.history[-1] == last
    assert d.observe(last - 0.5) is None  # far below is progress, not a spike


def test_no_spike_before_the_history_is_warm_and_when_off():
    d = SpikeDetector(z=8.0, window=200)
    assert all(d.observe(x) is None for x in [1.0] * 49 + [100.0])  # 50 < a quarter of 200: not warm
    off = SpikeDetector(z=0, window=200)
    assert all(off.observe(x) is None for x in falling(300) + [100.0])


def test_the_record_lists_every_image_worst_first_with_nan_as_null(tmp_path):
    samples = [{"key": "a", "loss": 0.5, "rank": 0}, {"key": "b", "loss": float("nan"), "rank": 1},
               {"key": "c", "loss": 2.0, "rank": 1}]
    assert [s["key"] for s in worst_first(samples)] == ["b", "c", "a"]
    run = RunDir(tmp_path)
    path = write_incident(run, 5, kind="non-finite", loss=float("nan"), lr=1e-3, grad_norm=float("inf"),
                          skipped=True, samples=samples, spike=None, world_size=2)
    record = json.loads((tmp_path / "incidents/step_00000005.json").read_text())
    assert path.endswith("incidents/step_00000005.json")
    assert record["samples"][0] == {"key": "b", "loss": None, "rank": 1} and record["loss"] is None
    assert record["replay"] == f"python launchers/replay.py {tmp_path} --step 5" and record["skipped"] is True
