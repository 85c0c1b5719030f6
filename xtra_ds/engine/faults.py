"""Deliberate faults at named points of a run, for the tests that prove recovery from them.

``XTRA_FAULT=after_export@8`` makes every rank that reaches the point ``after_export`` at step 8
kill itself with SIGKILL there; ``=USR1`` (or ``=TERM``, …) sends itself that signal instead, and
``RANK=1:after_export@8`` limits it to rank 1; several, comma-separated. Crash points:

* ``step_start`` — before the step's first micro batch;
* ``after_export`` — the encoder export of the step is published, its checkpoint not yet started;
* ``after_checkpoint`` — the checkpoint of the step is complete.

One point poisons data instead of crashing: ``nan_sample@N`` makes the first image of the step's last
micro batch NaN after normalisation (on the ranks named), so its loss and gradients are not finite.

Unset (the normal case) it costs one dictionary lookup per point.
"""

from __future__ import annotations

import os
import signal


def fault_at(point: str, step: int, rank: int) -> str | None:
    """What ``XTRA_FAULT`` asks at ``point`` of ``step`` on ``rank``: None (nothing), "" (the point's default
    fault) or a signal name (``USR1``)."""
    spec = os.environ.get("XTRA_FAULT")
    if not spec:
        return None
    for item in spec.split(","):
        who, _, what = item.rpartition(":")
        what, _, sig = what.partition("=")
        name, _, at = what.partition("@")
        if name == point and at.isdigit() and int(at) == step and (not who or who == f"RANK={rank}"):
            return sig
    return None


def crash_point(point: str, step: int, rank: int) -> None:
    """Signal this process if ``XTRA_FAULT`` names ``point`` at ``step`` (and this ``rank``, if given)."""
    sig = fault_at(point, step, rank)
    if sig is not None:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)
