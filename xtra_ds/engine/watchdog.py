"""A hang watchdog per rank: when no step completes for too long, say where every rank is and end the job.

At 72 GPUs the commonest loss of time is one rank that stops (a hung GPU, a dead NFS mount, a stopped
process): every other rank waits in its next collective until the process group's timeout — 30 minutes by
default — and then fails without saying where anyone was; Slurm sees a job that neither fails nor progresses.
Here a thread on every rank watches the step counter. When no step has completed for the timeout
(``incidents.hang_timeout_s``; 0 derives it: 20 × the median step time, at least ``incidents.hang_floor_s``,
at most 30 minutes, and 30 minutes for the first five steps after a start; a fixed one gives the first step
``hang_floor_s`` at least; checkpoints and exports get 30 minutes), each rank that is still alive writes
the Python stacks of all its threads to ``run_dir/incidents/hang_<step>/rank<R>.txt``; the lowest rank that
wrote one then names the ranks that did not (stopped, or stuck outside Python), and every rank exits with
:data:`HANG_EXIT_CODE` — which ``launchers/slurm_pretrain.sbatch`` requeues, so the job resumes from its last
checkpoint on a fresh allocation. The process group's own timeout is set above the watchdog's
(:func:`process_group_timeout`), so the stacks are written before any collective gives up.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import statistics
import threading
import time
from collections import deque
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from ..rundir import hang_report

log = logging.getLogger("xtra_ds.train")

HANG_EXIT_CODE = 75  # EX_TEMPFAIL: try again (the Slurm script requeues it)
CAP_S = 1800.0  # a derived timeout never exceeds this; checkpoints and exports are allowed this long too
GRACE_S = 10.0  # how long the reporting rank waits for the others' stacks before naming the missing ones


def process_group_timeout(hang_timeout_s: float) -> timedelta:
    """The process group's timeout: above any timeout the watchdog can use, so it speaks first."""
    return timedelta(seconds=max(hang_timeout_s, CAP_S) + 300)


class HangWatchdog:
    """Watches one rank's step counter (:meth:`tick` after each step) from a daemon thread."""

    def __init__(self, run_root: Path, rank: int, world_size: int, *, timeout_s: float = 0.0, floor_s: float = 300.0,
                 exit=os._exit):
        """``run_root``: the run directory (local: the ranks write there through the OS)."""
        self.root, self.rank, self.world_size = Path(run_root), rank, world_size
        self.fixed, self.floor, self.exit = timeout_s, floor_s, exit
        self.step, self.last = 0, time.monotonic()
        self.times: deque[float] = deque(maxlen=200)
        self.allowance: float | None = None  # a phase's own limit (checkpoint, export)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="xtra-hang-watchdog", daemon=True)

    @property
    def timeout(self) -> float:
        if self.allowance is not None:
            return self.allowance
        if self.fixed > 0:  # the first step after a start (first shards, first gathers) gets the floor at least
            return self.fixed if self.times else max(self.fixed, self.floor)
        if len(self.times) < 5:  # start-up: the first steps fetch the first shards, gather, warm up
            return CAP_S
        return min(CAP_S, max(self.floor, 20 * statistics.median(self.times)))

    def start(self, step: int) -> HangWatchdog:
        self.step, self.last = step, time.monotonic()
        self._thread.start()
        return self

    def tick(self, step: int) -> None:
        now = time.monotonic()
        self.times.append(now - self.last)
        self.step, self.last = step, now

    @contextmanager
    def phase(self, seconds: float = CAP_S):
        """A stretch that may take longer than a step (a checkpoint, an export): allowed ``seconds``."""
        self.allowance, self.last = max(seconds, self.timeout), time.monotonic()
        try:
            yield
        finally:
            self.allowance, self.last = None, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            waited = time.monotonic() - self.last
            if waited > self.timeout:
                self._report(waited)
                return

    def _report(self, waited: float) -> None:
        step = self.step + 1
        mine = self.root / hang_report(step, self.rank)
        folder = mine.parent
        folder.mkdir(parents=True, exist_ok=True)
        with open(mine, "w") as f:
            f.write(f"rank {self.rank}: no step completed for {waited:.0f} s (timeout {self.timeout:.0f} s) while "
                    f"on step {step}; the Python stacks of every thread:\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        log.error("rank %d: no step completed for %.0f s (step %d): the stacks of every thread are in %s",
                  self.rank, waited, step, mine)
        time.sleep(GRACE_S)  # the other live ranks write theirs
        reported = sorted(int(p.stem[4:]) for p in folder.glob("rank*.txt"))
        missing = [r for r in range(self.world_size) if r not in reported]
        if reported and reported[0] == self.rank:
            log.error("hang at step %d: ranks %s wrote their stacks to %s; %s — ending the job (exit %d) so that it "
                      "can be requeued and resume from the last checkpoint", step, reported, folder,
                      f"ranks {missing} did not (stopped, dead, or stuck outside Python): look there first"
                      if missing else "every rank did (all wait on one another: look at what each is doing)",
                      HANG_EXIT_CODE)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self.exit(HANG_EXIT_CODE)
