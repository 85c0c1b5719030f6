"""The hang watchdog on its own: the timeout it uses when, what it writes, whom it names, the code it exits with
(the 2-rank SIGSTOP test under the launcher is in test_engine.py, the Slurm requeue in test_cluster.py)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from xtra_ds.engine import watchdog as wd
from xtra_ds.engine.watchdog import CAP_S, HANG_EXIT_CODE, HangWatchdog, process_group_timeout


def test_the_timeout_derived_from_the_step_time_within_floor_and_cap(tmp_path):
    w = HangWatchdog(tmp_path, 0, 1, floor_s=300)
    assert w.timeout == CAP_S  # no step yet: start-up
    for _ in range(4):
        w.times.append(2.0)
    assert w.timeout == CAP_S  # still warming up
    w.times.append(2.0)
    assert w.timeout == 300  # 20 × 2 s is below the floor
    w.times.extend([60.0] * 10)
    assert w.timeout == 1200  # 20 × the median
    w.times.extend([600.0] * 20)
    assert w.timeout == CAP_S
    with w.phase():
        assert w.timeout == CAP_S  # a checkpoint: 30 minutes
    with w.phase(4000):
        assert w.timeout == 4000
    assert w.timeout == CAP_S


def test_a_fixed_timeout_gives_the_first_step_the_floor(tmp_path):
    w = HangWatchdog(tmp_path, 0, 1, timeout_s=5, floor_s=30)
    assert w.timeout == 30
    w.tick(1)
    assert w.timeout == 5


def test_the_process_group_waits_longer_than_any_watchdog():
    assert process_group_timeout(0) > timedelta(seconds=CAP_S)
    assert process_group_timeout(7200) > timedelta(seconds=7200)


def test_a_hang_writes_the_stacks_names_the_silent_rank_and_exits_75(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(wd, "GRACE_S", 0.0)
    exited = threading.Event()
    codes = []

    def exit_(code):
        codes.append(code)
        exited.set()

    w = HangWatchdog(tmp_path, 0, 3, timeout_s=0.5, floor_s=0.5, exit=exit_)
    (tmp_path / "incidents/hang_00000008").mkdir(parents=True)
    (tmp_path / "incidents/hang_00000008/rank2.txt").write_text("rank 2's stacks")  # rank 2 reported too
    with caplog.at_level(logging.ERROR, logger="xtra_ds.train"):
        w.start(6)
        w.tick(7)  # step 7 done; step 8 never completes
        assert exited.wait(10), "the watchdog never fired"
    assert codes == [HANG_EXIT_CODE]
    stacks = (tmp_path / "incidents/hang_00000008/rank0.txt").read_text()
    assert "while on step 8" in stacks and "test_a_hang_writes_the_stacks" in stacks  # the main thread's frame
    assert "ranks [0, 2] wrote their stacks" in caplog.text and "ranks [1] did not" in caplog.text


def test_steps_that_keep_coming_never_fire_and_stop_ends_the_thread(tmp_path):
    fired = []
    w = HangWatchdog(tmp_path, 0, 1, timeout_s=1.5, floor_s=1.5, exit=fired.append).start(0)
    for step in range(1, 6):
        time.sleep(0.5)
        w.tick(step)
    w.stop()
    w._thread.join(3)
    assert not w._thread.is_alive() and fired == [] and not (tmp_path / "incidents").exists()


def test_only_the_lowest_reporting_rank_names_the_others(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(wd, "GRACE_S", 0.0)
    (tmp_path / "incidents/hang_00000001").mkdir(parents=True)
    (tmp_path / "incidents/hang_00000001/rank0.txt").write_text("rank 0's stacks")
    codes = []
    w = HangWatchdog(tmp_path, 1, 2, timeout_s=1, exit=codes.append)
    with caplog.at_level(logging.ERROR, logger="xtra_ds.train"):
        w._report(5.0)
    assert codes == [HANG_EXIT_CODE] and "wrote their stacks" not in caplog.text
    assert (tmp_path / "incidents/hang_00000001/rank1.txt").exists()

