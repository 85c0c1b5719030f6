"""Where a rank's log lines go: a quiet console, everything in ``run_dir/logs/rank{R}.log``.

The console (stdout, which the launcher relays) gets the run's own lines — rank 0's at INFO (one line per log
step, start-up, checkpoints, exports), the other ranks' warnings — and errors from anywhere. What libraries say
(DeepSpeed's INFO lines, torch's deprecation warnings, the compiler lines of a JIT-built op) goes to the rank's
log file only, kept there in full; ``logging.verbose=true`` puts it on the console too. Lines a library logs
before the file exists (process-group start-up) are held and written to it once it does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import sys
from pathlib import Path

OWN = "xtra_ds"  # the package's loggers: xtra_ds.train, xtra_ds.data, …
_held: logging.handlers.MemoryHandler | None = None


def _format(is_main: bool) -> str:
    return "%(asctime)s %(message)s" if is_main else "%(asctime)s %(name)s %(levelname)s %(message)s"


class ConsoleFilter(logging.Filter):
    """The console's share: the run's own lines at ``level``, and errors from anywhere (``verbose``: every line
    at ``level``)."""

    def __init__(self, level: int, verbose: bool):
        super().__init__()
        self.level, self.verbose = level, verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        own = record.name == OWN or record.name.startswith(OWN + ".")
        return record.levelno >= self.level and (own or self.verbose)


def setup_logging(is_main: bool, verbose: bool = False) -> None:
    """Console and held lines for this rank (the file comes with :func:`log_to_file`). DeepSpeed's logger, which
    prints to stdout itself, and Python warnings are routed through here."""
    global _held
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(_format(is_main), "%H:%M:%S"))
    console.addFilter(ConsoleFilter(logging.INFO if is_main else logging.WARNING, verbose))
    root.addHandler(console)
    _held = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    root.addHandler(_held)
    logging.captureWarnings(True)  # warnings.warn(...) → the "py.warnings" logger: the file, not the console
    try:
        from deepspeed.utils import logger as ds_logger
    except ImportError:  # a tool without DeepSpeed
        return
    for h in list(ds_logger.handlers):
        ds_logger.removeHandler(h)
    ds_logger.propagate = True
    ds_logger.setLevel(logging.INFO)


def log_to_file(path: Path, is_main: bool) -> None:
    """Also append this rank's log to ``path`` (``run_dir/logs/rank{R}.log``), every line of every logger, the
    lines held since :func:`setup_logging` first. A rank started over ssh (a ``--hostfile`` launch) prints
    through pdsh; once the runner is stopped, what the rank says while it saves its checkpoint and exits has no
    console left, and only this file keeps it."""
    global _held
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_format(is_main), "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    if _held is not None:
        _held.setTarget(handler)
        _held.flush()
        root.removeHandler(_held)
        _held = None
    root.addHandler(handler)


@contextlib.contextmanager
def printed_to_log(name: str):
    """What a library ``print``s meanwhile, logged at INFO by logger ``name`` instead (the file, not the
    console)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        for line in out.getvalue().splitlines():
            if line.strip():
                logging.getLogger(name).info("%s", line)
