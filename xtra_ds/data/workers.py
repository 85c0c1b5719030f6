"""Loader worker processes and the job's stop signals: workers must outlive a job-wide SIGTERM."""

from __future__ import annotations

import os
import signal
import threading

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}
WORKER_TERM_GRACE = 25.0  # s; DeepSpeed's node launcher SIGKILLs what is left 30 s after its SIGTERM


def worker_init(_: int) -> None:
    """Loader workers outlive a job-wide SIGTERM for a while.

    Schedulers signal every process of a job, and DeepSpeed's node launcher SIGTERMs each
    rank's whole process tree. A worker that died at once would make the DataLoader raise in
    the rank (from its SIGCHLD handler, at any point of the step) before the rank could reach
    its checkpoint. So a worker leaves WORKER_TERM_GRACE seconds after SIGTERM (never later,
    so nothing waits on it forever) and ignores SIGUSR1, the ranks' own preemption notice.
    The signals were blocked while the worker was forked (:func:`start_workers`), so none can
    arrive before these handlers exist.
    """
    def leave_later(signum, frame):
        threading.Timer(WORKER_TERM_GRACE, os._exit, args=(0,)).start()

    signal.signal(signal.SIGTERM, leave_later)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def start_workers(dataloader):
    """``iter(dataloader)`` with the stop signals blocked while its workers fork; one sent to the
    trainer in that window is delivered when the mask is restored."""
    if dataloader.num_workers == 0 or threading.current_thread() is not threading.main_thread():
        return iter(dataloader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(dataloader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
