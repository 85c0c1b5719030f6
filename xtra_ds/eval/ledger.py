"""The eval worker's memory: one record per (dataset, export) outcome, ``eval/ledger/<dataset>/step_X.json``.

One object per outcome, written whole (locally write-fsync-rename, on object stores one PUT):
a record is there completely or not at all, and workers of different datasets — even on one
``s3://`` run directory, where no lock reaches — never write the same object.
"""

from __future__ import annotations

import logging

from ..rundir import LEDGER, LedgerEntry, RunDir, ledger_record, step_of

log = logging.getLogger("xtra_ds.eval")


class Ledger:
    """Every outcome recorded in a run directory (:class:`~xtra_ds.rundir.LedgerEntry`), read once, kept up to
    date with what this process writes (and, through :meth:`refresh`, what others wrote)."""

    def __init__(self, run: RunDir):
        self.run = run
        self.entries: list[LedgerEntry] = []
        for dataset in self._names(LEDGER):
            for name in self._names(f"{LEDGER}/{dataset}"):
                if step_of(name.removesuffix(".json")) is None:
                    continue  # a temporary file left by a kill, or a stray
                text = run.read_text(LEDGER, dataset, name)
                try:
                    self.entries.append(LedgerEntry.from_json(text))
                except (TypeError, ValueError):
                    log.warning("%s/%s/%s is not a ledger record; ignored", LEDGER, dataset, name)

    def _names(self, rel: str) -> list[str]:
        try:
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in self.run.fs.ls(self.run.path(rel), detail=False,
                                                                                    refresh=True))
        except FileNotFoundError:
            return []

    def outcomes(self, dataset: str) -> dict[int, LedgerEntry]:
        return {e.step: e for e in self.entries if e.dataset == dataset}

    def append(self, entry: LedgerEntry) -> None:
        """Record ``entry`` (its ``dataset`` and ``step`` name the record); a second outcome of the same
        export (``--retry-failed``) replaces the first."""
        self.run.write_text(ledger_record(entry.dataset, entry.step), entry.to_json())
        self._remember(entry)

    def refresh(self, dataset: str, step: int) -> LedgerEntry | None:
        """The record of ``dataset`` on the export of ``step`` as storage holds it now (another worker may have
        written it since this ledger was read), remembered; None when there is none (or it is unreadable)."""
        try:
            entry = LedgerEntry.from_json(self.run.read_text(ledger_record(dataset, step)) or "")
        except ValueError:
            return None
        if (entry.dataset, entry.step) != (dataset, step):
            return None
        self._remember(entry)
        return entry

    def _remember(self, entry: LedgerEntry) -> None:
        self.entries = [e for e in self.entries if (e.dataset, e.step) != (entry.dataset, entry.step)]
        self.entries.append(entry)
