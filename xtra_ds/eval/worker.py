"""The asynchronous eval worker: probe every encoder export of a run, exactly once.

It only reads the run directory's ``exports/`` and ``config.yaml``, and writes under
``eval/`` and TensorBoard's ``eval*`` runs (names in :mod:`xtra_ds.rundir`), so it cannot disturb
training; run it on its own GPU,
node or on spare CPU cores (it lowers its own priority and uses a few threads on a CPU).

Exactly once. An export is ``exports/step_XXXXXXXX/`` holding ``meta.json`` and
``encoder.safetensors``; the trainer publishes it with one rename, so a folder under that name
is complete, and its temporary ``.step_…tmp-…`` name is never looked at (on object stores,
where there is no rename, a folder missing either file is waited for). Each export gets one
record, ``eval/ledger/<dataset>/step_XXXXXXXX.json`` — ``done`` with its top-1s, or ``failed`` with
the reason — and only after its results are written. A worker killed mid-evaluation left no record,
so its successor evaluates that export again; nothing with a record is evaluated again (failed ones
only with ``--retry-failed``, once). Several workers of one dataset on one run directory (an ``s3://`` one,
where the local lock does not reach) share the exports through leases (:mod:`xtra_ds.eval.lease`): a worker
evaluates an export only while it holds its lease, reads its record again once it has won it, and
writes nothing if the lease was taken over meanwhile.

Falling behind. Exports are evaluated oldest first. When more than ``eval.max_pending`` are
waiting, the newest goes first so the dashboard shows the current state of the run; the
skipped ones are back-filled afterwards, oldest first (:mod:`.publish`: what is written, in which
order, and how back-filled results reach TensorBoard).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..config.schema import EvalConfig
from ..data.remote import ShardReadError
from ..rundir import EVAL_TB_SERIES, EXPORTS, META_FILE, STATE, ExportMeta, LedgerEntry, RunDir, TrainingState, tag_of
from .device import pick_device
from .encoder import ExportError, load_export
from .features import EvalSets, extract
from .lease import Lease, LeaseLost, Leases, describe, hold_dataset_lock
from .ledger import Ledger
from .policy import choose, dataset_name, safe_name
from .publish import Publisher, TensorBoard
from .quick import fit_probe
from .suite import check_class_count, publish_suite, suite_of

log = logging.getLogger("xtra_ds.eval")


class DatasetEvaluator:
    """One labelled dataset's side of the worker: its decoded sets, its lock and leases, its ledger records and
    what it publishes. ``cfg``: the ``eval.*`` settings for this dataset."""

    def __init__(self, run: RunDir, cfg: EvalConfig, ledger: Ledger, *, tb: TensorBoard, device,
                 storage_options: dict | None = None, retry_failed: bool = False):
        if not cfg.train or not cfg.val:
            raise ValueError("the eval worker needs labelled train and val shards: set eval.train and eval.val "
                             "(data_prep manifests), in the recipe or as overrides on its command line")
        from ..data.shards import resolve
        for spec in (cfg.train, cfg.val):  # a wrong path fails now, not at the first export
            resolve(spec, storage_options)
        self.run, self.cfg, self.ledger, self.device, self.storage_options = run, cfg, ledger, device, storage_options
        self.dataset = safe_name(cfg.dataset) if cfg.dataset else dataset_name(cfg.val)
        self.sets = EvalSets(self.dataset, cfg.train, cfg.val, storage_options=storage_options,
                             max_samples=cfg.max_samples)
        # --retry-failed: the failed outcomes there at the start are tried again, once (a new outcome replaces them)
        self.retry = {s: e for s, e in ledger.outcomes(self.dataset).items()
                      if retry_failed and e.status == LedgerEntry.FAILED}
        self._lock = hold_dataset_lock(run, self.dataset)
        self.leases = Leases(run, self.dataset)  # several workers of one dataset: each export evaluated once
        self._held_logged: set[int] = set()
        self.publisher = Publisher(run, self.dataset, ledger, tb)
        self.evaluated = 0

    def todo(self, steps: list[int]) -> list[int]:
        """Which of the complete exports ``steps`` still need this dataset's outcome."""
        done = self.ledger.outcomes(self.dataset)
        return [s for s in steps if s not in done or self.retry.get(s) == done[s]]

    def evaluate(self, step: int, check: Callable[[], None] = lambda: None) -> dict:
        """Probe the export of ``step`` (:func:`probe_export`); returns its results. Raises ExportError for a bad
        export. ``check`` is called between the stages and raises to stop (:meth:`Lease.check`)."""
        encoder, meta = load_export(self.run.url_of(EXPORTS, tag_of(step)), self.storage_options)
        if meta.step != step:
            raise ExportError(f"meta.json says step {meta.step} but the folder is {tag_of(step)}")
        return probe_export(encoder, meta, self.sets, self.cfg, self.device, check)

    def process(self, step: int) -> LedgerEntry | None:
        """Evaluate the export of ``step`` under its lease, publish (results JSON, TensorBoard), then record it in
        the ledger — in that order; returns the record. None when another worker has the export: it holds the
        lease, it has recorded an outcome (read once the lease is won), or it took the lease over meanwhile
        (this worker then writes nothing)."""
        return self._under_lease(step, self._evaluate_and_record)

    def record_failure(self, step: int, reason: str) -> LedgerEntry | None:
        """Record the export of ``step`` as failed (under its lease, as :meth:`process`)."""
        def record(step: int, lease: Lease) -> LedgerEntry:
            lease.renew()
            return self.publisher.failed(step, reason, final_of(self.run, step))

        return self._under_lease(step, record)

    def _under_lease(self, step: int, work: Callable[[int, Lease], LedgerEntry]) -> LedgerEntry | None:
        """``work(step, lease)`` while this worker holds the lease of ``step`` (renewed in the background),
        unless another worker holds it or has recorded the export; None then."""
        name = tag_of(step)
        lease = self.leases.acquire(step)
        if lease is None:
            if step not in self._held_logged:
                log.info("%s (%s) is being evaluated by %s; leaving it to that worker", name, self.dataset,
                         describe(self.leases.holder(step)))
                self._held_logged.add(step)
            return None
        try:
            now = self.ledger.refresh(self.dataset, step)
            if now is not None and now != self.retry.get(step):
                log.info("%s (%s) already has an outcome (%s) from another worker; skipped", name, self.dataset,
                         now.status)
                return None
            with lease.kept():
                return work(step, lease)
        except LeaseLost as e:
            log.warning("%s; %s is left to that worker, nothing recorded", e, name)
            return None
        finally:
            lease.release()

    def _evaluate_and_record(self, step: int, lease: Lease) -> LedgerEntry:
        name = tag_of(step)
        log.info("evaluating %s (%s) on %s", name, self.dataset, self.device)
        try:
            try:
                res = self.evaluate(step, check=lease.check)
            except ExportError as e:
                if not e.vanished:
                    raise
                log.info("%s: a file vanished while it was read (the export being replaced?); reading it once more",
                         name)
                time.sleep(1.0)
                res = self.evaluate(step, check=lease.check)
        except ExportError as e:
            log.error("%s failed: %s", name, e)
            lease.renew()  # a worker that stalled past its lease (another took it over) writes nothing
            return self.publisher.failed(step, str(e), final_of(self.run, step))
        lease.renew()  # the results, the scalars and the record are written under a lease renewed just now
        entry = self.publisher.done(step, res)
        self.evaluated += 1
        log.info("%s (%s): %s  (%.1f s, features %.0f img/s%s)", name, self.dataset,
                 ", ".join(f"{k} top-1 {100 * r['top1']:.1f}% (lr {r['lr']:g})" for k, r in res["probes"].items()),
                 res["seconds"], res["feature_images_per_sec"], ", back-filled" if entry.tb != "eval" else "")
        return entry

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the dataset's lock
            self._lock = None


class EvalWorker:
    """Evaluates every export of one run on its labelled dataset (``eval.train``/``eval.val``) or on every dataset
    of a suite (``eval.suite``, :mod:`.suite`; ``eval.only`` a part of it), each (dataset, export) exactly once,
    and writes the suite's record of an export once all of the suite's datasets have an outcome.

    ``storage_options`` reach the run directory and the eval shards (the run's ``data.storage_options``);
    TensorBoard logs go to ``tb_dir`` (the run's ``logging.tb_dir``), which must be a local folder.
    """

    def __init__(self, run: RunDir, cfg: EvalConfig, *, tb_dir: str, storage_options: dict | None = None,
                 retry_failed: bool = False):
        if "://" in tb_dir and not tb_dir.startswith("file://"):
            raise ValueError(f"TensorBoard folder {tb_dir} is not local: give the eval worker a local one with "
                             f"logging.tb_dir=/path/to/folder (a remote run directory needs it)")
        self.run, self.cfg = run, cfg
        self.device = pick_device(cfg.device)
        self.ledger, self.tb = Ledger(run), TensorBoard(tb_dir)
        self.suite = suite_of(cfg)
        for d in self.suite.only(cfg.only) if self.suite else []:
            check_class_count(d, storage_options)
        mine = [d.quick for d in self.suite.only(cfg.only)] if self.suite else [cfg]
        self.evaluators = [DatasetEvaluator(run, c, self.ledger, tb=self.tb, device=self.device,
                                            storage_options=storage_options, retry_failed=retry_failed) for c in mine]
        self.drain = False  # set by SIGUSR1: evaluate what is there, then exit
        self._failures: dict[tuple, int] = {}  # (dataset, step) -> storage failures so far
        self._suite_done: set[int] = set()  # exports whose suite record this worker has seen written

    @property
    def evaluated(self) -> int:
        return sum(e.evaluated for e in self.evaluators)

    def pending(self) -> tuple[dict[int, list[DatasetEvaluator]], list[str]]:
        """({step of a complete export: the datasets it still needs}, names of exports still being written)."""
        recorded = set.intersection(*(set(self.ledger.outcomes(e.dataset)) for e in self.evaluators))
        steps, partial = self.run.exports(known=recorded)  # (those need no listing of their files)
        todo: dict[int, list[DatasetEvaluator]] = {}
        for ev in self.evaluators:
            for step in ev.todo(steps):
                todo.setdefault(step, []).append(ev)
        return dict(sorted(todo.items())), partial

    @property
    def evaluator(self) -> DatasetEvaluator:
        """The first (with no suite, the only) dataset's evaluator."""
        return self.evaluators[0]

    @property
    def dataset(self) -> str:
        return self.evaluator.dataset

    def publish_suite(self, step: int) -> None:
        """The suite's record of the export of ``step`` once every dataset of the suite has an outcome (those
        of datasets other workers evaluate read afresh); exactly once, whichever worker gets there first."""
        if self.suite is None or step in self._suite_done:
            return
        outcomes = {}
        for d in self.suite.datasets:
            e = self.ledger.outcomes(d.name).get(step) or self.ledger.refresh(d.name, step)
            if e is None:
                return
            outcomes[d.name] = e
        main, backfill = EVAL_TB_SERIES
        last = max(self._suite_done, default=-1)
        publish_suite(self.run, self.suite, outcomes, step,
                      lambda tag, v, s: self.tb.scalar(main if s > last else backfill, tag, v, s))
        self._suite_done.add(step)

    def _suite_catch_up(self) -> None:
        """Suite records of exports this worker is done with whose last dataset was recorded by another worker
        after this one looked (two jobs finishing at once), or by a worker killed before the suite record."""
        if self.suite is not None:
            mine = set.intersection(*(set(self.ledger.outcomes(e.dataset)) for e in self.evaluators))
            for step in sorted(mine - self._suite_done):
                self.publish_suite(step)

    def finished(self) -> str | None:
        """Why ``--until-final`` may end, asked when nothing is left to evaluate; None: keep waiting
        (:func:`until_final_reason`, for every dataset of this worker)."""
        state = training_state(self.run)
        why = [until_final_reason(self.ledger.outcomes(e.dataset), state) for e in self.evaluators]
        return why[0] if all(why) else None

    def run_loop(self, *, once: bool = False, until_final: bool = False) -> int:
        """Evaluate until stopped (``once``: what is there now; ``until_final``: through the run's last export)."""
        waiting_logged: set[str] = set()
        idle_logged, listing_failures = False, 0
        elsewhere: set[int] = set()  # exports other workers have (their leases): looked at again after a wait
        while True:
            try:
                todo, partial = self.pending()
                listing_failures = 0
            except OSError as e:  # the run directory cannot be listed: nothing to attribute it to but the storage
                listing_failures += 1
                if once:
                    raise
                self._back_off(listing_failures, f"cannot list {self.run.url_of(EXPORTS)} ({type(e).__name__}: {e})")
                continue
            for name in set(partial) - waiting_logged:
                log.info("%s is incomplete (a file is missing); waiting for it", name)
            waiting_logged |= set(partial)
            free = [s for s in todo if s not in elsewhere]
            if free:
                idle_logged = False
                step = choose(free, self.cfg.max_pending)
                if len(free) > self.cfg.max_pending and step == free[-1]:
                    log.info("%d exports waiting (more than eval.max_pending=%d): newest first, the rest back-filled",
                             len(free), self.cfg.max_pending)
                for ev in todo[step]:
                    try:
                        if ev.process(step) is None:
                            elsewhere.add(step)
                    except (OSError, ShardReadError) as e:  # a storage outage: try again, a bounded number of times
                        self._storage_failure(ev, step, e)
                self.publish_suite(step)
                continue
            self._suite_catch_up()
            why = self.finished() if until_final and not todo else None  # and not while another worker is on one
            if why or once or self.drain:
                left = f"; incomplete export folders left: {', '.join(partial)}" if why and partial else ""
                others = f"; {len(todo)} being evaluated by other workers" if todo else ""
                log.info("%s%s; exiting (%d evaluated by this worker%s)", f"--until-final: {why}" if why else
                         "nothing left to evaluate", left, self.evaluated, others)
                return 0
            if not idle_logged:
                log.info("waiting for new exports in %s (every %gs)", self.run.url_of(EXPORTS), self.cfg.poll_seconds)
                idle_logged = True
            wake = time.monotonic() + self.cfg.poll_seconds
            while time.monotonic() < wake and not self.drain:  # a drain request ends the wait at once
                time.sleep(min(1.0, self.cfg.poll_seconds))
            elsewhere.clear()

    def _storage_failure(self, ev: DatasetEvaluator, step: int, error: Exception) -> None:
        """Back off and let the loop try ``step`` again; after ``eval.storage_retries`` tries, record it as failed."""
        n = self._failures[ev.dataset, step] = self._failures.get((ev.dataset, step), 0) + 1
        what = f"{type(error).__name__}: {error}"
        if n < self.cfg.storage_retries:
            self._back_off(n, f"cannot read what {tag_of(step)}'s evaluation ({ev.dataset}) needs ({what}); try "
                              f"{n + 1} of {self.cfg.storage_retries}")
            return
        log.error("%s (%s): storage failed %d times (%s); recorded as failed, moving on (--retry-failed tries it "
                  "again)", tag_of(step), ev.dataset, n, what)
        try:
            ev.record_failure(step, f"storage failed {n} times: {what}")
        except (OSError, ShardReadError) as e:  # the outage reaches the ledger too: the loop tries once more
            self._back_off(n, f"cannot record it either ({type(e).__name__}: {e})")

    def _back_off(self, failures: int, what: str) -> None:
        wait = min(300.0, self.cfg.poll_seconds * 2 ** min(failures, 8))
        log.error("%s; trying again in %.0f s", what, wait)
        time.sleep(wait)

    def request_drain(self) -> None:
        """Evaluate what is waiting, then return (the launcher calls it on SIGUSR1)."""
        log.info("finishing the exports that are there, then exiting")
        self.drain = True

    def close(self) -> None:
        for ev in self.evaluators:
            ev.close()
        self.tb.close()


def probe_export(encoder, meta: ExportMeta, sets: EvalSets, cfg: EvalConfig, device,
                 check: Callable[[], None] = lambda: None) -> dict:
    """The quick probes (``eval.probes``, every learning rate of ``eval.lrs`` side by side) of one export's encoder
    on ``sets``: features of the train and val splits, one probe bank per kind; the results (what
    ``eval/results/`` holds). ``check`` is called between the stages and raises to stop."""
    t0 = time.perf_counter()
    train, val = sets.at(encoder.sizes.img_size)
    kw = dict(device=device, batch_size=cfg.feature_batch_size, layers=cfg.attentive_layers, causal=cfg.causal)
    check()
    ftrain = extract(encoder, train, **kw)
    check()
    fval = extract(encoder, val, **kw)
    t_feat = len(train) / ftrain.images_per_sec + len(val) / fval.images_per_sec  # the forwards alone
    probes = {}
    for kind in cfg.probes:
        check()
        probes[kind] = fit_probe(kind, ftrain, fval, num_classes=max(train.num_classes, val.num_classes),
                                 lrs=list(cfg.lrs), epochs=cfg.epochs, batch_size=cfg.batch_size,
                                 weight_decay=cfg.weight_decay, num_heads=cfg.attentive_heads, seed=meta.step)
    return {"step": meta.step, "dataset": sets.name, "export": f"{EXPORTS}/{tag_of(meta.step)}",
            "samples_seen": meta.samples_seen, "model": meta.model, "train_images": len(train),
            "val_images": len(val), "feature_images_per_sec": (len(train) + len(val)) / max(t_feat, 1e-9),
            "feature_seconds": t_feat, "seconds": time.perf_counter() - t0, "device": str(device), "probes": probes,
            "final": meta.final}


def training_state(run: RunDir) -> TrainingState | None:
    """state.json (None before training starts, or while storage cannot serve it: nothing more is known)."""
    try:
        return run.training_state()
    except OSError as e:
        log.warning("cannot read %s (%s: %s)", run.url_of(STATE), type(e).__name__, e)
        return None


def final_of(run: RunDir, step: int) -> bool | None:
    """Whether the export of ``step`` is the run's last: its meta.json's ``final``, or, when meta.json cannot be
    read, whether ``step`` reaches state.json's ``total_steps``; None when neither says."""
    try:
        return ExportMeta.from_json(run.read_text(EXPORTS, tag_of(step), META_FILE) or "").final
    except (OSError, ValueError):  # unreadable (UnicodeDecodeError is a ValueError): ask state.json
        pass
    state = training_state(run)
    return step >= state.total_steps if state is not None and isinstance(state.total_steps, int) else None


def until_final_reason(outcomes: dict[int, LedgerEntry], state: TrainingState | None) -> str | None:
    """Why ``--until-final`` may end, or None to keep waiting: the run's final export has an outcome, done or
    failed (``final`` in its record; for a record without it, its step against state.json's ``total_steps``),
    or training says it has ended (state.json: done or failed) — then no further export will come."""
    total = state.total_steps if state is not None else None
    for step, e in sorted(outcomes.items()):
        final = e.final
        if final is None and isinstance(total, int):
            final = step >= total
        if final:
            return f"the final export {tag_of(step)} has an outcome ({e.status})"
    if state is not None and state.ended:
        why = f": {state.reason}" if state.reason else ""
        return (f"training {state.status} at step {state.step} of {total}{why}, and no complete export is left to "
                f"evaluate")
    return None
