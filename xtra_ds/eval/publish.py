"""What the eval worker writes about an export, in the order that keeps it exactly-once: the full results
(``eval/results/<dataset>/step_X.json``), the TensorBoard scalars, and last the ledger record
(:class:`~xtra_ds.rundir.LedgerEntry`) — so a worker killed before the record leaves an export that its
successor evaluates again, and one with a record is never evaluated again.

TensorBoard keeps a series only when its steps increase (a smaller step *replaces* everything logged at or
after it), so a result whose step is below one already shown goes to a second TensorBoard run,
``eval_backfill``, plotted on the same charts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..rundir import EVAL_TB_SERIES, EXPORTS, LedgerEntry, RunDir, tag_of
from .ledger import Ledger


class TensorBoard:
    """The eval worker's TensorBoard runs (``eval``, ``eval_backfill``) under the run's TensorBoard folder, one
    writer each, shared by every dataset the worker evaluates."""

    def __init__(self, tb_dir: str):
        self.tb_dir = tb_dir.removeprefix("file://")
        self._writers: dict[str, object] = {}

    def scalar(self, series: str, tag: str, value: float, step: int) -> None:
        if series not in self._writers:
            from torch.utils.tensorboard import SummaryWriter
            self._writers[series] = SummaryWriter(str(Path(self.tb_dir) / series))
        self._writers[series].add_scalar(tag, value, step)
        self._writers[series].flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


class Publisher:
    """Results, TensorBoard and ledger records of one run's evaluations on one dataset."""

    def __init__(self, run: RunDir, dataset: str, ledger: Ledger, tb: TensorBoard):
        self.run, self.dataset, self.ledger, self.tb = run, dataset, ledger, tb

    def series_for(self, step: int) -> str:
        """The TensorBoard run a result of ``step`` goes to: ``eval`` while steps increase, else ``eval_backfill``."""
        main, backfill = EVAL_TB_SERIES
        shown = [e.step for e in self.ledger.outcomes(self.dataset).values() if e.tb == main]
        return main if step > max(shown, default=-1) else backfill

    def done(self, step: int, results: dict) -> LedgerEntry:
        """Publish the results of an evaluation (:meth:`EvalWorker.evaluate`), then record it."""
        self.run.write_text(self.run.results_file(self.dataset, step), json.dumps(results, indent=1))
        series = self.series_for(step)
        for kind, r in results["probes"].items():
            self.tb.scalar(series, f"eval/{self.dataset}/{kind}_top1", r["top1"], step)
        self.tb.scalar(series, f"eval/{self.dataset}/feature_images_per_sec", results["feature_images_per_sec"], step)
        return self.record(LedgerEntry(step=step, dataset=self.dataset, status=LedgerEntry.DONE,
                                       export=f"{EXPORTS}/{tag_of(step)}",
                                       top1={k: r["top1"] for k, r in results["probes"].items()},
                                       seconds=round(results["seconds"], 2), tb=series, final=results["final"]))

    def failed(self, step: int, reason: str, final: bool | None) -> LedgerEntry:
        """Record that the export of ``step`` could not be evaluated, and why."""
        return self.record(LedgerEntry(step=step, dataset=self.dataset, status=LedgerEntry.FAILED,
                                       export=f"{EXPORTS}/{tag_of(step)}", reason=reason, final=final))

    def record(self, entry: LedgerEntry) -> LedgerEntry:
        entry.time = time.time()
        self.ledger.append(entry)
        return entry

