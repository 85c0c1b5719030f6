"""``eval/ledger.jsonl``: one line per (export, dataset) outcome, the eval worker's memory."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..rundir import LEDGER, RunDir

log = logging.getLogger("xtra_ds.eval")


class Ledger:
    """Appended and fsync'ed locally; rewritten whole on object stores (one PUT, atomic)."""

    def __init__(self, run: RunDir):
        self.run = run
        self.entries: list[dict] = []
        text = run.read_text(LEDGER) or ""
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                self.entries.append(json.loads(line))
            except ValueError:  # a line cut short by a kill: its export has no outcome yet
                log.warning("%s line %d is not complete JSON (a worker was killed while writing it); ignored",
                            LEDGER, i + 1)
        self._needs_newline = bool(text) and not text.endswith("\n")

    def outcomes(self, dataset: str) -> dict[int, dict]:
        return {e["step"]: e for e in self.entries if e.get("dataset") == dataset}

    def append(self, entry: dict) -> None:
        line = json.dumps(entry) + "\n"
        if self.run.local:
            path = Path(self.run.path(LEDGER))
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(("\n" if self._needs_newline else "") + line)
                f.flush()
                os.fsync(f.fileno())
            self._needs_newline = False
        else:
            self.run.write_text(LEDGER, "".join(json.dumps(e) + "\n" for e in self.entries) + line)
        self.entries.append(entry)
