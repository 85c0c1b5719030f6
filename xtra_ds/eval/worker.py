"""The asynchronous eval worker: probe every encoder export of a run, exactly once.

It only reads the run directory's ``exports/`` and ``config.yaml``, and writes under
``eval/`` and TensorBoard's ``tb/eval*``, so it cannot disturb training; run it on its own GPU,
node or on spare CPU cores (it lowers its own priority and uses a few threads on a CPU).

Exactly once. An export is ``exports/step_XXXXXXXX/`` holding ``meta.json`` and
``encoder.safetensors``; the trainer publishes it with one rename, so a folder under that name
is complete, and its temporary ``.step_…tmp-…`` name is never looked at (on object stores,
where there is no rename, a folder missing either file is waited for). Each export gets one
line in ``eval/ledger.jsonl`` — ``done`` with its top-1s, or ``failed`` with the reason — and
only after its results are written. A worker killed mid-evaluation left no line, so its
successor evaluates that export again; nothing with a line is evaluated again (failed ones
only with ``--retry-failed``).

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
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.schema import EvalConfig
from ..data.remote import ShardReadError
from .encoder import ENCODER_FILE, META_FILE, ExportError, load_export
from .features import LabelledSet, check_classes, extract, load_labelled
from .quick import fit_probe

log = logging.getLogger("xtra_ds.eval")

EXPORT_RE = re.compile(r"^step_(\d{8})$")
LEDGER = "eval/ledger.jsonl"


@dataclass(frozen=True)
class Export:
    step: int
    name: str  # "step_00000050"


def choose(pending: list[int], max_pending: int) -> int:
    """The step to evaluate next: the oldest, or the newest when more than ``max_pending`` wait."""
    return max(pending) if len(pending) > max_pending else min(pending)


def dataset_name(spec: str) -> str:
    """A short name for TensorBoard tags from a shard spec: ``…/digits/val/manifest.json`` -> ``digits``."""
    parts = [p for p in re.split(r"[/\\]", spec.split("://", 1)[-1]) if p and not p.endswith((".json", ".tar"))
             and "{" not in p]
    while len(parts) > 1 and parts[-1].lower() in ("train", "val", "validation", "test", "eval", "shards"):
        parts.pop()
    name = parts[-1] if parts else "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class RunDir:
    """The run directory through fsspec (a local path or any URL such as ``s3://bucket/run``)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        from ..data.remote import filesystem

        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url, storage_options)
        self.local = "://" not in url or url.startswith("file://")

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def url_of(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def exports(self, known: set[int] = frozenset()) -> tuple[list[Export], list[str]]:
        """(complete exports sorted by step, names of folders still missing a file); folders of
        ``known`` steps are taken as complete without listing them (one request fewer each on S3)."""
        try:
            entries = self.fs.ls(self.path("exports"), detail=False, refresh=True)
        except FileNotFoundError:
            return [], []
        done, partial = [], []
        for e in entries:
            name = e.rstrip("/").rsplit("/", 1)[-1]
            m = EXPORT_RE.match(name)
            if not m:
                continue  # temporary names of exports being written, stray files
            if int(m.group(1)) in known:
                done.append(Export(int(m.group(1)), name))
                continue
            files = {f.rstrip("/").rsplit("/", 1)[-1] for f in self.fs.ls(self.path("exports", name), detail=False)}
            if {META_FILE, ENCODER_FILE} <= files:
                done.append(Export(int(m.group(1)), name))
            else:
                partial.append(name)
        return sorted(done, key=lambda x: x.step), partial

    def read_text(self, *parts: str) -> str | None:
        try:
            return self.fs.cat_file(self.path(*parts)).decode()
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        """Whole-file write, atomic: a local temp file renamed into place, or one object PUT."""
        if self.local:
            p = Path(self.path(rel))
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, p)
        else:
            self.fs.pipe_file(self.path(rel), text.encode())


class Ledger:
    """``eval/ledger.jsonl``: one line per (export, dataset) outcome. Appended and fsync'ed
    locally; rewritten whole on object stores (one PUT, atomic)."""

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
            p = Path(self.run.path(LEDGER))
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "a") as f:
                f.write(("\n" if self._needs_newline else "") + line)
                f.flush()
                os.fsync(f.fileno())
            self._needs_newline = False
        else:
            self.run.write_text(LEDGER, "".join(json.dumps(e) + "\n" for e in self.entries) + line)
        self.entries.append(entry)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"eval.device={name}: no CUDA device is visible to this process")
    return torch.device(name)


class EvalWorker:
    def __init__(self, run_dir: str, cfg: EvalConfig, *, storage_options: dict | None = None,
                 tb_dir: str | None = None, retry_failed: bool = False):
        if not cfg.train or not cfg.val:
            raise ValueError("the eval worker needs labelled train and val shards: set eval.train and eval.val "
                             "(data_prep manifests), in the recipe or as overrides on its command line")
        self.cfg, self.storage_options, self.retry_failed = cfg, storage_options, retry_failed
        from ..data.shards import resolve
        for spec in (cfg.train, cfg.val):  # a wrong path fails now, not at the first export
            resolve(spec, storage_options)
        self.run = RunDir(run_dir, storage_options)
        self.dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.dataset) if cfg.dataset else dataset_name(cfg.val)
        self.device = pick_device(cfg.device)
        self.ledger = Ledger(self.run)
        self._lock = self._take_lock()
        if tb_dir is None:
            if not self.run.local:
                raise ValueError(f"{run_dir} is remote: pass --tb-dir, a local folder for the eval TensorBoard logs")
            tb_dir = self.run.path("tb")
        self.tb_dir = tb_dir
        self._writers: dict[str, object] = {}
        self._data: dict[int, tuple[LabelledSet, LabelledSet]] = {}
        self.drain = False  # set by SIGUSR1: evaluate what is there, then exit
        self.evaluated = 0

    # --- bookkeeping ----------------------------------------------------------------------
    def _take_lock(self):
        """One worker per run and dataset (local run directories; a second one is refused)."""
        if not self.run.local:
            return None
        p = Path(self.run.path("eval", f".worker-{self.dataset}.lock"))
        p.parent.mkdir(parents=True, exist_ok=True)
        f = open(p, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RuntimeError(f"another eval worker (pid {f.read().strip() or '?'}) is evaluating {self.dataset!r} "
                               f"for {self.run.url}; stop it first or give this one another eval.dataset") from None
        f.seek(0), f.truncate(), f.write(str(os.getpid())), f.flush()
        return f  # held open: the lock lives as long as the process, a kill -9 included

    def pending(self) -> tuple[list[Export], list[str]]:
        done = self.ledger.outcomes(self.dataset)
        exports, partial = self.run.exports(known=set(done))
        todo = [e for e in exports if e.step not in done
                or (self.retry_failed and done[e.step]["status"] == "failed")]
        return todo, partial

    def _tb_last(self) -> dict[str, int]:
        last = {"eval": -1, "eval_backfill": -1}
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
        if img_size not in self._data:
            c = self.cfg
            t0 = time.perf_counter()
            train = load_labelled(c.train, img_size, storage_options=self.storage_options,
                                  max_samples=c.max_samples)
            val = load_labelled(c.val, img_size, storage_options=self.storage_options)
            check_classes(train.spec, train.classes, val.spec, val.classes)
            log.info("eval data %s: %d train / %d val images, %d classes, %dpx (decoded in %.1f s, kept in memory)",
                     self.dataset, len(train), len(val), train.num_classes, img_size, time.perf_counter() - t0)
            self._data[img_size] = (train, val)
        return self._data[img_size]

    def evaluate(self, export: Export) -> dict:
        """Probe one export; returns its results. Raises ExportError for a bad export."""
        c = self.cfg
        t0 = time.perf_counter()
        encoder, meta = load_export(self.run.url_of("exports", export.name), self.storage_options)
        if meta.get("step") not in (None, export.step):
            raise ExportError(f"meta.json says step {meta['step']} but the folder is {export.name}")
        train, val = self.data_for(encoder.sizes.img_size)
        kw = dict(device=self.device, batch_size=c.feature_batch_size, layers=c.attentive_layers, causal=c.causal)
        ftrain, fval = extract(encoder, train, **kw), extract(encoder, val, **kw)
        del encoder
        t_feat = len(train) / ftrain.images_per_sec + len(val) / fval.images_per_sec  # the forwards alone
        probes = {kind: fit_probe(kind, ftrain, fval, num_classes=max(train.num_classes, val.num_classes),
                                  lrs=list(c.lrs), epochs=c.epochs, batch_size=c.batch_size,
                                  weight_decay=c.weight_decay, num_heads=c.attentive_heads, seed=export.step)
                  for kind in c.probes}
        return {"step": export.step, "dataset": self.dataset, "export": f"exports/{export.name}",
                "samples_seen": meta.get("samples_seen"), "model": meta.get("model"),
                "train_images": len(train), "val_images": len(val),
                "feature_images_per_sec": (len(train) + len(val)) / max(t_feat, 1e-9),
                "feature_seconds": t_feat, "seconds": time.perf_counter() - t0, "device": str(self.device),
                "probes": probes, "final": bool(meta.get("final"))}

    def process(self, export: Export) -> dict:
        """Evaluate, publish (results JSON, TensorBoard), then record in the ledger — in that order."""
        log.info("evaluating %s (%s) on %s", export.name, self.dataset, self.device)
        entry = {"step": export.step, "export": f"exports/{export.name}", "dataset": self.dataset}
        try:
            res = self.evaluate(export)
        except ExportError as e:
            entry |= {"status": "failed", "reason": str(e), "time": time.time()}
            log.error("%s failed: %s", export.name, e)
            self.ledger.append(entry)
            return entry
        self.run.write_text(f"eval/results/{self.dataset}/{export.name}.json", json.dumps(res, indent=1))
        last = self._tb_last()
        series = "eval" if export.step > last["eval"] else "eval_backfill"
        w = self._writer(series)
        for kind, r in res["probes"].items():
            w.add_scalar(f"eval/{self.dataset}/{kind}_top1", r["top1"], export.step)
        w.add_scalar(f"eval/{self.dataset}/feature_images_per_sec", res["feature_images_per_sec"], export.step)
        w.flush()
        entry |= {"status": "done", **{f"{k}_top1": r["top1"] for k, r in res["probes"].items()},
                  "seconds": round(res["seconds"], 2), "tb": series, "final": res["final"], "time": time.time()}
        self.ledger.append(entry)
        self.evaluated += 1
        log.info("%s: %s  (%.1f s, features %.0f img/s%s)", export.name,
                 ", ".join(f"{k} top-1 {100 * r['top1']:.1f}% (lr {r['lr']:g})" for k, r in res["probes"].items()),
                 res["seconds"], res["feature_images_per_sec"], ", back-filled" if series != "eval" else "")
        return entry

    # --- the loop -------------------------------------------------------------------------
    def finished(self) -> bool:
        """The run's final export has an outcome (``--until-final``)."""
        return any(e.get("final") for e in self.ledger.outcomes(self.dataset).values())

    def run_loop(self, *, once: bool = False, until_final: bool = False) -> int:
        """Evaluate until stopped (``once``: what is there now; ``until_final``: through the run's last export)."""
        signal.signal(signal.SIGUSR1, self._on_drain)
        waiting_logged: set[str] = set()
        idle_logged, failures = False, 0
        while True:
            todo, partial = self.pending()
            for name in set(partial) - waiting_logged:
                log.info("%s is incomplete (a file is missing); waiting for it", name)
            waiting_logged |= set(partial)
            if todo:
                idle_logged = False
                step = choose([e.step for e in todo], self.cfg.max_pending)
                if len(todo) > self.cfg.max_pending and step == todo[-1].step:
                    log.info("%d exports waiting (more than eval.max_pending=%d): newest first, the rest back-filled",
                             len(todo), self.cfg.max_pending)
                try:
                    self.process(next(e for e in todo if e.step == step))
                    failures = 0
                except (OSError, ShardReadError) as e:  # storage trouble is not the export's fault: retry
                    failures += 1
                    if once:
                        raise
                    wait = min(300.0, self.cfg.poll_seconds * 2 ** min(failures, 8))
                    log.error("cannot read what the evaluation needs (%s: %s); nothing recorded, trying again in "
                              "%.0f s", type(e).__name__, e, wait)
                    time.sleep(wait)
                continue
            if once or self.drain or (until_final and self.finished()):
                log.info("nothing left to evaluate (%d evaluated by this worker); exiting", self.evaluated)
                return 0
            if not idle_logged:
                log.info("waiting for new exports in %s (every %gs)", self.run.url_of("exports"), self.cfg.poll_seconds)
                idle_logged = True
            wake = time.monotonic() + self.cfg.poll_seconds
            while time.monotonic() < wake and not self.drain:  # a drain request ends the wait at once
                time.sleep(min(1.0, self.cfg.poll_seconds))

    def _on_drain(self, signum, frame) -> None:
        log.info("SIGUSR1: finishing the exports that are there, then exiting")
        self.drain = True

    def close(self) -> None:
        for w in self._writers.values():
            w.close()


def be_polite(device: torch.device, threads: int) -> None:
    """Yield the CPU to training: lower priority and, on a CPU, few threads."""
    try:
        os.nice(10)
    except OSError:
        pass
    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 4) // 4))

