"""Loader worker processes: how they start, the job's stop signals, and the end of their rank.

Workers start from a fork server (a fresh interpreter that imported our modules), not from a fork of
the training process: a fork would inherit (and show as resident) the model states built by then —
gigabytes per worker for a large model. The price: a worker's parent is the fork server, so
PyTorch's own check (is my parent alive?) no longer notices a rank killed outright (OOM, kill -9);
each worker watches its rank itself (:func:`watch_owner`) and leaves when it is gone.
"""

from __future__ import annotations

import os
import select
import signal
import threading

from torch.utils.data import get_worker_info

WORKER_START_METHOD = "forkserver"
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
    watch_owner(getattr(get_worker_info().dataset, "owner_pid", None))


def watch_owner(pid: int | None) -> None:
    """Leave this process as soon as process ``pid`` (the rank that owns the loader) has ended."""
    if not pid:
        return

    def wait_for_exit():
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd (old kernel): ask once a second
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                threading.Event().wait(1.0)
        else:
            select.select([fd], [], [])  # readable once the process has exited
        os._exit(0)

    threading.Thread(target=wait_for_exit, name="owner-watch", daemon=True).start()


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
