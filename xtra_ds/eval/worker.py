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
skipped ones are back-filled afterwards, oldest first. TensorBoard keeps a series only when
its steps increase (a smaller step *replaces* everything logged at or after it), so a result
whose step is below one already shown goes to a second TensorBoard run, ``eval_backfill``,
plotted on the same charts; the ledger and ``eval/results/`` have every result.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..config.schema import EvalConfig
from ..data.remote import ShardReadError
from ..rundir import EVAL_TB_SERIES, EXPORTS, META_FILE, STATE, RunDir, TrainingState, tag_of, worker_lock
from .device import pick_device
from .encoder import ExportError, load_export
from .features import LabelledSet, check_classes, extract, load_labelled
from .lease import Lease, LeaseLost, Leases, describe
from .ledger import Ledger
from .policy import choose, dataset_name, safe_name
from .quick import fit_probe

log = logging.getLogger("xtra_ds.eval")


class EvalDataError(RuntimeError):
    """The labelled eval data cannot serve (missing or unreadable shards, no labels, classes numbered
    differently): no export can be evaluated until someone fixes it, so the worker stops."""


class EvalWorker:
    """Evaluates the exports of one run on one labelled dataset (``eval.*``), each exactly once.

    ``storage_options`` reach the run directory and the eval shards (the run's
    ``data.storage_options``); TensorBoard logs go to ``tb_dir`` (the run's ``logging.tb_dir``),
    which must be a local folder.
    """

    def __init__(self, run: RunDir, cfg: EvalConfig, *, tb_dir: str, storage_options: dict | None = None,
                 retry_failed: bool = False):
        if not cfg.train or not cfg.val:
            raise ValueError("the eval worker needs labelled train and val shards: set eval.train and eval.val "
                             "(data_prep manifests), in the recipe or as overrides on its command line")
        if "://" in tb_dir and not tb_dir.startswith("file://"):
            raise ValueError(f"TensorBoard folder {tb_dir} is not local: give the eval worker a local one with "
                             f"logging.tb_dir=/path/to/folder (a remote run directory needs it)")
        self.cfg, self.storage_options = cfg, storage_options
        from ..data.shards import resolve
        for spec in (cfg.train, cfg.val):  # a wrong path fails now, not at the first export
            resolve(spec, storage_options)
        self.run = run
        self.dataset = safe_name(cfg.dataset) if cfg.dataset else dataset_name(cfg.val)
        self.device = pick_device(cfg.device)
        self.ledger = Ledger(self.run)
        # --retry-failed: the failed outcomes there at the start are tried again, once (a new outcome replaces them)
        self.retry = {s: e for s, e in self.ledger.outcomes(self.dataset).items()
                      if retry_failed and e["status"] == "failed"}
        self._lock = self._take_lock()
        self.leases = Leases(self.run, self.dataset)  # several workers of one dataset: each export evaluated once
        self._held_logged: set[int] = set()
        self.tb_dir = tb_dir.removeprefix("file://")
        self._writers: dict[str, object] = {}
        self._data: dict[int, tuple[LabelledSet, LabelledSet]] = {}
        self.drain = False  # set by SIGUSR1: evaluate what is there, then exit
        self.evaluated = 0

    # --- bookkeeping ----------------------------------------------------------------------
    def _take_lock(self):
        """One worker per run and dataset (local run directories; a second one is refused)."""
        if not self.run.local:
            return None
        path = Path(self.run.path(worker_lock(self.dataset)))
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RuntimeError(f"another eval worker (pid {f.read().strip() or '?'}) is evaluating {self.dataset!r} "
                               f"for {self.run.url}; stop it first or give this one another eval.dataset") from None
        f.seek(0), f.truncate(), f.write(str(os.getpid())), f.flush()
        return f  # held open: the lock lives as long as the process, a kill -9 included

    def pending(self) -> tuple[list[int], list[str]]:
        """(steps of complete exports still to evaluate, names of exports still being written)."""
        done = self.ledger.outcomes(self.dataset)
        steps, partial = self.run.exports(known=set(done))
        todo = [s for s in steps if s not in done or self.retry.get(s) == done[s]]
        return todo, partial

    def _tb_last(self) -> dict[str, int]:
        last = dict.fromkeys(EVAL_TB_SERIES, -1)
        for e in self.ledger.outcomes(self.dataset).values():
            if e.get("tb") in last:
                last[e["tb"]] = max(last[e["tb"]], e["step"])
        return last

    def _writer(self, run: str):
        if run not in self._writers:
            from torch.utils.tensorboard import SummaryWriter
            self._writers[run] = SummaryWriter(str(Path(self.tb_dir) / run))
        return self._writers[run]

    # --- one export -----------------------------------------------------------------------
    def data_for(self, img_size: int) -> tuple[LabelledSet, LabelledSet]:
        """The eval sets decoded at ``img_size`` (once). Raises EvalDataError when they cannot serve."""
        if img_size not in self._data:
            t0 = time.perf_counter()
            try:
                train = load_labelled(self.cfg.train, img_size, storage_options=self.storage_options,
                                      max_samples=self.cfg.max_samples)
                val = load_labelled(self.cfg.val, img_size, storage_options=self.storage_options)
                check_classes(train.spec, train.classes, val.spec, val.classes)
            except ShardReadError as e:
                if not e.permanent:
                    raise  # an outage: the export is tried again
                raise EvalDataError(f"the eval data cannot be read: {e}") from e
            except (ValueError, FileNotFoundError) as e:
                raise EvalDataError(str(e)) from e
            log.info("eval data %s: %d train / %d val images, %d classes, %dpx (decoded in %.1f s, kept in memory)",
                     self.dataset, len(train), len(val), train.num_classes, img_size, time.perf_counter() - t0)
            self._data[img_size] = (train, val)
        return self._data[img_size]

    def evaluate(self, step: int, check: Callable[[], None] = lambda: None) -> dict:
        """Probe the export of ``step``; returns its results. Raises ExportError for a bad export. ``check`` is
        called between the stages and raises to stop (:meth:`Lease.check`: the lease was taken over)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        name = tag_of(step)
        encoder, meta = load_export(self.run.url_of(EXPORTS, name), self.storage_options)
        if meta.get("step") not in (None, step):
            raise ExportError(f"meta.json says step {meta['step']} but the folder is {name}")
        train, val = self.data_for(encoder.sizes.img_size)
        kw = dict(device=self.device, batch_size=cfg.feature_batch_size, layers=cfg.attentive_layers,
                  causal=cfg.causal)
        check()
        ftrain = extract(encoder, train, **kw)
        check()
        fval = extract(encoder, val, **kw)
        del encoder
        t_feat = len(train) / ftrain.images_per_sec + len(val) / fval.images_per_sec  # the forwards alone
        probes = {}
        for kind in cfg.probes:
            check()
            probes[kind] = fit_probe(kind, ftrain, fval, num_classes=max(train.num_classes, val.num_classes),
                                     lrs=list(cfg.lrs), epochs=cfg.epochs, batch_size=cfg.batch_size,
                                     weight_decay=cfg.weight_decay, num_heads=cfg.attentive_heads, seed=step)
        return {"step": step, "dataset": self.dataset, "export": f"{EXPORTS}/{name}",
                "samples_seen": meta.get("samples_seen"), "model": meta.get("model"),
                "train_images": len(train), "val_images": len(val),
                "feature_images_per_sec": (len(train) + len(val)) / max(t_feat, 1e-9),
                "feature_seconds": t_feat, "seconds": time.perf_counter() - t0, "device": str(self.device),
                "probes": probes, "final": bool(meta.get("final"))}

    def process(self, step: int) -> dict | None:
        """Evaluate the export of ``step`` under its lease, publish (results JSON, TensorBoard), then record it in
        the ledger — in that order; returns the record. None when another worker has the export: it holds the
        lease, it has recorded an outcome (read once the lease is won), or it took the lease over meanwhile
        (this worker then writes nothing)."""
        return self._under_lease(step, self._evaluate_and_record)

    def _under_lease(self, step: int, work: Callable[[int, Lease], dict]) -> dict | None:
        """``work(step, lease)`` while this worker holds the lease of ``step`` (renewed in the background),
        unless another worker holds it or has recorded the export; None then."""
        name = tag_of(step)
        lease = self.leases.acquire(step)
        if lease is None:
            if step not in self._held_logged:
                log.info("%s is being evaluated by %s; leaving it to that worker", name,
                         describe(self.leases.holder(step)))
                self._held_logged.add(step)
            return None
        try:
            now = self.ledger.refresh(self.dataset, step)
            if now is not None and now != self.retry.get(step):
                log.info("%s already has an outcome (%s) from another worker; skipped", name, now["status"])
                return None
            with lease.kept():
                return work(step, lease)
        except LeaseLost as e:
            log.warning("%s; %s is left to that worker, nothing recorded", e, name)
            return None
        finally:
            lease.release()

    def _record(self, lease: Lease, entry: dict) -> dict:
        """Write ``entry`` to the ledger, under a lease renewed just before (a worker that stalled past its lease,
        which another then took over, writes nothing)."""
        lease.renew()
        self.ledger.append(entry)
        return entry

    def _evaluate_and_record(self, step: int, lease: Lease) -> dict:
        name = tag_of(step)
        log.info("evaluating %s (%s) on %s", name, self.dataset, self.device)
        entry = {"step": step, "export": f"{EXPORTS}/{name}", "dataset": self.dataset}
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
            entry |= {"status": "failed", "reason": str(e), **self._final_of(step), "time": time.time()}
            log.error("%s failed: %s", name, e)
            return self._record(lease, entry)
        lease.renew()  # the results, the scalars and the record are written under a lease renewed just now
        self.run.write_text(self.run.results_file(self.dataset, step), json.dumps(res, indent=1))
        last = self._tb_last()
        main_series, backfill_series = EVAL_TB_SERIES
        series = main_series if step > last[main_series] else backfill_series
        writer = self._writer(series)
        for kind, r in res["probes"].items():
            writer.add_scalar(f"eval/{self.dataset}/{kind}_top1", r["top1"], step)
        writer.add_scalar(f"eval/{self.dataset}/feature_images_per_sec", res["feature_images_per_sec"], step)
        writer.flush()
        entry |= {"status": "done", **{f"{k}_top1": r["top1"] for k, r in res["probes"].items()},
                  "seconds": round(res["seconds"], 2), "tb": series, "final": res["final"], "time": time.time()}
        self.ledger.append(entry)
        self.evaluated += 1
        log.info("%s: %s  (%.1f s, features %.0f img/s%s)", name,
                 ", ".join(f"{k} top-1 {100 * r['top1']:.1f}% (lr {r['lr']:g})" for k, r in res["probes"].items()),
                  res["seconds"], res["feature_images_per_sec"], ", back-filled" if series != main_series else "")
        return entry

    def _final_of(self, step: int) -> dict:
        """``{"final": …}`` for a failed record, when known: meta.json's ``final``, or, when meta.json cannot be
        read, whether ``step`` reaches state.json's ``total_steps``; ``{}`` when neither says."""
        try:
            meta = json.loads(self.run.read_text(EXPORTS, tag_of(step), META_FILE) or "")
            if isinstance(meta, dict) and "final" in meta:
                return {"final": bool(meta["final"])}
        except (OSError, ValueError):  # unreadable (UnicodeDecodeError is a ValueError): ask state.json
            pass
        total = self._training_state().get("total_steps")
        return {"final": step >= total} if isinstance(total, int) else {}

    def _training_state(self) -> dict:
        """state.json (empty before training starts, or while storage cannot serve it: nothing more is known)."""
        try:
            return self.run.training_state() or {}
        except OSError as e:
            log.warning("cannot read %s (%s: %s)", self.run.url_of(STATE), type(e).__name__, e)
            return {}

    # --- the loop -------------------------------------------------------------------------
    def finished(self) -> str | None:
        """Why ``--until-final`` may end, asked when nothing is left to evaluate; None: keep waiting.

        It ends when the run's final export has an outcome, done or failed (``final`` in its record; for a
        record without it, its step against state.json's ``total_steps``), or when training says it has
        ended (state.json: done or failed) — then no further export will come."""
        state = self._training_state()
        total = state.get("total_steps")
        for step, e in sorted(self.ledger.outcomes(self.dataset).items()):
            final = e.get("final")
            if final is None and isinstance(total, int):
                final = step >= total
            if final:
                return f"the final export {tag_of(step)} has an outcome ({e['status']})"
        if state.get("status") in TrainingState.ENDED:
            why = f": {state['reason']}" if state.get("reason") else ""
            return (f"training {state['status']} at step {state.get('step')} of {total}{why}, and no complete "
                    f"export is left to evaluate")
        return None

    def run_loop(self, *, once: bool = False, until_final: bool = False) -> int:
        """Evaluate until stopped (``once``: what is there now; ``until_final``: through the run's last export)."""
        waiting_logged: set[str] = set()
        idle_logged, failures, listing_failures = False, {}, 0  # step -> storage failures so far
        elsewhere: set[int] = set()  # exports another worker has (their leases): looked at again after a wait
        while True:
            try:
                todo, partial = self.pending()
                listing_failures = 0
            except OSError as e:  # the run directory cannot be listed: nothing to attribute it to but the storage
                listing_failures += 1
                if once:
                    raise
                wait = min(300.0, self.cfg.poll_seconds * 2 ** min(listing_failures, 8))
                log.error("cannot list %s (%s: %s); trying again in %.0f s", self.run.url_of(EXPORTS),
                          type(e).__name__, e, wait)
                time.sleep(wait)
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
                try:
                    if self.process(step) is None:
                        elsewhere.add(step)
                except (OSError, ShardReadError) as e:  # a storage outage: try again, a bounded number of times
                    self._storage_failure(step, e, failures)
                continue
            why = self.finished() if until_final and not todo else None  # and not while another worker is on one
            if why:
                left = f"; incomplete export folders left: {', '.join(partial)}" if partial else ""
                log.info("--until-final: %s%s; exiting (%d evaluated by this worker)", why, left, self.evaluated)
                return 0
            if once or self.drain:
                others = f"; {len(todo)} being evaluated by other workers" if todo else ""
                log.info("nothing left to evaluate (%d evaluated by this worker%s); exiting", self.evaluated, others)
                return 0
            if not idle_logged:
                log.info("waiting for new exports in %s (every %gs)", self.run.url_of(EXPORTS), self.cfg.poll_seconds)
                idle_logged = True
            wake = time.monotonic() + self.cfg.poll_seconds
            while time.monotonic() < wake and not self.drain:  # a drain request ends the wait at once
                time.sleep(min(1.0, self.cfg.poll_seconds))
            elsewhere.clear()

    def _storage_failure(self, step: int, error: Exception, failures: dict[int, int]) -> None:
        """Back off and let the loop try ``step`` again; after ``eval.storage_retries`` tries, record it as failed."""
        failures[step] = failures.get(step, 0) + 1
        what = f"{type(error).__name__}: {error}"
        if failures[step] >= self.cfg.storage_retries:
            log.error("%s: storage failed %d times (%s); recorded as failed, moving on (--retry-failed tries it "
                      "again)", tag_of(step), failures[step], what)
            entry = {"step": step, "export": f"{EXPORTS}/{tag_of(step)}", "dataset": self.dataset, "status": "failed",
                     "reason": f"storage failed {failures[step]} times: {what}", **self._final_of(step),
                     "time": time.time()}
            try:
                self._under_lease(step, lambda step, lease: self._record(lease, entry))
                return
            except (OSError, ShardReadError) as e:  # the outage reaches the ledger too: the loop tries once more
                wait = min(300.0, self.cfg.poll_seconds * 2 ** min(failures[step], 8))
                log.error("cannot record it either (%s: %s); trying again in %.0f s", type(e).__name__, e, wait)
                time.sleep(wait)
                return
        wait = min(300.0, self.cfg.poll_seconds * 2 ** failures[step])
        log.error("cannot read what %s's evaluation needs (%s); try %d of %d again in %.0f s", tag_of(step), what,
                  failures[step] + 1, self.cfg.storage_retries, wait)
        time.sleep(wait)

    def request_drain(self) -> None:
        """Evaluate what is waiting, then return (the launcher calls it on SIGUSR1)."""
        log.info("finishing the exports that are there, then exiting")
        self.drain = True

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        if self._lock is not None:
            self._lock.close()  # releases the dataset's lock
            self._lock = None
