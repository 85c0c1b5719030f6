"""Stop requests (preemption notices) kept from the first moment of a run. Standard library only, so a
launcher can install the handlers before it imports torch and DeepSpeed."""

from __future__ import annotations

import signal


class StopSignals:
    """SIGTERM, SIGUSR1 and SIGINT ask the run to stop at the next step boundary (with a checkpoint).

    Installed before anything else (``launchers/pretrain.py`` does it ahead of its seconds of imports),
    so a signal that arrives while the run is starting — for minutes, for a large model — is kept, not
    fatal: a rank killed by an early SIGUSR1 would fail a Slurm job that should requeue. A second SIGINT
    interrupts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None

    def install(self) -> StopSignals:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
