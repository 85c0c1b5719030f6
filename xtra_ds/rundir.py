"""The run directory: the one contract between training, the eval worker and the tools around them.

Every name inside a run lives here; the engine, the eval worker, the launchers and the tests ask
this module instead of spelling paths themselves::

    RUN/
      config.yaml                      the resolved config (secrets masked), written at start
      state.json                       where training stands: running, stopped, done or failed (rank 0)
      metrics.jsonl                    a line per step (rank 0): the scalars on log steps, data/keys_digest on all
      pids/rank{R}.pid                 the process id of each rank (for tests and operators)
      logs/rank{R}.log                 each rank's log, appended across restarts (rank 0: INFO, others: WARNING)
      checkpoints/step_XXXXXXXX/       DeepSpeed's files + rng_rank{R}.pt + COMPLETE (written last)
      checkpoints/latest               the newest complete tag (for DeepSpeed's own tools)
      */abandoned-<time>/              what a rollback set aside: checkpoints, exports and eval records of
                                       steps after the one a run went back to (never read, never pruned)
      exports/step_XXXXXXXX/           encoder.safetensors + meta.json, published by one rename
      exports/.step_XXXXXXXX.tmp-PID/  an export being written (never read)
      eval/ledger/<dataset>/step_XXXXXXXX.json   the eval worker's outcome per (dataset, export)
      eval/results/<dataset>/step_XXXXXXXX.json
      eval/.worker-<dataset>.lock      held by the one eval worker of a dataset (local runs)
      incidents/step_XXXXXXXX.json     a step recorded for forensics: non-finite, or a loss spike (rank 0)
      incidents/hang_XXXXXXXX/rank{R}.txt  each live rank's stacks when no step completed in time (hang watchdog)
      <logging.tb_dir>/                TensorBoard: training at the top, eval/ and eval_backfill/ below

A run directory is a local path or, for readers such as the eval worker, any fsspec URL
(``s3://bucket/runs/h14``).

Its JSON records are typed (:class:`Record`): :class:`CheckpointRecord` (a checkpoint's ``COMPLETE``),
:class:`RepartitionRecord` (``world_W/COMPLETE``), :class:`ExportMeta` (an export's ``meta.json``),
:class:`LedgerEntry` (an eval outcome) and :class:`TrainingState` (``state.json``). Every writer and
reader goes through them; each carries a format ``version``, and fields a reader does not know (a newer
writer's) are kept and written back.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from .storage import filesystem, fsync_path, move, publish_dir, write_atomic, write_bytes

CONFIG = "config.yaml"
STATE = "state.json"  # training's own account of where it stands (TrainingState), rewritten on each change
METRICS = "metrics.jsonl"
PIDS = "pids"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"  # a checkpoint folder counts only once this file exists
LATEST = "latest"
EXPORTS = "exports"
ENCODER_FILE = "encoder.safetensors"
META_FILE = "meta.json"
LEDGER = "eval/ledger"
RESULTS = "eval/results"
INCIDENTS = "incidents"
EVAL_TB_SERIES = ("eval", "eval_backfill")  # TensorBoard runs the eval worker writes under the tb dir

ABANDONED = "abandoned-"  # prefix of the folders a rollback moves a timeline's files into

STEP_RE = re.compile(r"^step_(\d{8})$")


@dataclass
class Record:
    """A JSON record of the run directory: typed fields, a format ``version``, and every field this code does not
    know (a newer writer's) kept in ``extra`` and written back as it was."""

    VERSION: ClassVar[int] = 1
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        known = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        # a newer writer's record written back keeps its version (and its fields: extra)
        return {**self.extra, **known, "version": max(self.VERSION, int(self.extra.get("version", 0)))}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)} - {"extra"}
        newer = isinstance(data.get("version"), int) and data["version"] > cls.VERSION
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known and (k != "version" or newer)})

    @classmethod
    def from_json(cls, text: str | bytes):
        """The record in ``text``; ValueError when it is not a JSON object of this kind."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"not a {cls.__name__}: {str(text)[:100]!r}")
        try:
            return cls.from_dict(data)
        except TypeError as e:  # a required field is missing
            raise ValueError(f"not a {cls.__name__}: {e}") from None

    @classmethod
    def read(cls, path: str | os.PathLike):
        """The record in a local file, or None when there is none (or it is not one)."""
        try:
            return cls.from_json(Path(path).read_bytes())
        except (OSError, ValueError):
            return None


@dataclass
class CheckpointRecord(Record):
    """A checkpoint's ``COMPLETE``, written last: the step, the layout that saved it and what a resume on
    another allocation needs to know (``launchers/inspect_checkpoint.py`` reads nothing else)."""

    step: int = 0
    world_size: int = 1
    time: float = 0.0
    layout: dict = field(default_factory=dict)  # world_size, micro_batch, accum, loader_workers
    global_batch: int | None = None
    zero_stage: int | None = None
    precision: str | None = None
    total_steps: int | None = None
    data: dict = field(default_factory=dict)  # the loader's position and what defines the data order


@dataclass
class RepartitionRecord(Record):
    """``step_X/world_W/COMPLETE``: a checkpoint re-partitioned for ``world_size`` ranks, and which save of it
    (``source``: the sha256 of the checkpoint's own ``COMPLETE``) it was made from."""

    from_world_size: int = 0
    world_size: int = 0
    source: str | None = None


@dataclass
class ExportMeta(Record):
    """An encoder export's ``meta.json``."""

    step: int = 0
    time: float = 0.0
    samples_seen: int | None = None
    model: str | None = None
    sizes: dict = field(default_factory=dict)  # XTRASizes fields
    config: str = "../../config.yaml"  # the run's config, relative to the export
    final: bool = False  # the run's last step


@dataclass
class LedgerEntry(Record):
    """The eval worker's outcome of one (dataset, export): ``done`` with each probe's top-1 (stored as
    ``<probe>_top1``), or ``failed`` with the reason."""

    DONE, FAILED = "done", "failed"
    step: int = 0
    dataset: str = ""
    status: str = ""
    export: str = ""
    top1: dict = field(default_factory=dict)  # probe -> top-1
    reason: str = ""
    final: bool | None = None  # the run's last export (None: not known)
    seconds: float | None = None
    tb: str | None = None  # the TensorBoard series the result went to
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update({f"{probe}_top1": v for probe, v in out.pop("top1").items()})
        return out

    @classmethod
    def from_dict(cls, data: dict):
        top1 = {k[: -len("_top1")]: v for k, v in data.items() if k.endswith("_top1")}
        entry = super().from_dict({k: v for k, v in data.items() if not k.endswith("_top1")})
        entry.top1 = top1
        return entry


@dataclass
class TrainingState(Record):
    """``state.json``: what training last said about itself. ``status``:

    ``running`` (written at start and on resume), ``stopped`` (a stop signal: checkpoint saved, the job
    expects to be restarted), ``done`` (the last step is trained and exported), ``failed`` (an error ended
    it: non-finite steps, a crash it could catch). A run killed outright (``kill -9``, a lost node) leaves
    ``running``."""

    RUNNING, STOPPED, DONE, FAILED = "running", "stopped", "done", "failed"
    ENDED: ClassVar[tuple] = ("done", "failed")  # no further exports come without someone starting the run again
    status: str = RUNNING
    step: int = 0
    total_steps: int | None = None
    reason: str = ""
    time: float = field(default_factory=time.time)

    @property
    def ended(self) -> bool:
        return self.status in self.ENDED


def tag_of(step: int) -> str:
    """The folder name of a checkpoint or export of ``step``: ``step_00001000``."""
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step in a checkpoint or export folder name (``step_00001000`` -> 1000), else None."""
    m = STEP_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def ledger_record(dataset: str, step: int) -> str:
    """Relative to the run: the eval worker's record of ``dataset`` on the export of ``step``."""
    return f"{LEDGER}/{dataset}/{tag_of(step)}.json"


def incident_record(step: int) -> str:
    """Relative to the run: the incident record of ``step``."""
    return f"{INCIDENTS}/{tag_of(step)}.json"


def hang_report(step: int, rank: int) -> str:
    """Relative to the run: the stacks rank ``rank`` wrote when ``step`` did not complete in time."""
    return f"{INCIDENTS}/hang_{step:08d}/rank{rank}.txt"


def worker_lock(dataset: str) -> str:
    """Relative to the run: the lock file of the eval worker of ``dataset``."""
    return f"eval/.worker-{dataset}.lock"


def export_tmp_name(step: int) -> str:
    """The name an export is written under before the rename that publishes it (never read)."""
    return f".{tag_of(step)}.tmp-{os.getpid()}"


class RunDir:
    """A run directory through fsspec: a local path or any URL such as ``s3://bucket/run``."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        self.url = str(url).rstrip("/")
        self.fs, self.root = filesystem(self.url, storage_options)
        self.local = "://" not in self.url or self.url.startswith("file://")

    # --- addressing -----------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path for ``self.fs`` (what fsspec calls, no scheme)."""
        return "/".join([self.root.rstrip("/"), *parts])

    def url_of(self, *parts: str) -> str:
        """A URL for users and other tools (with the scheme)."""
        return "/".join([self.url, *parts])

    def local_path(self, *parts: str) -> Path:
        """A local ``Path``; only for local run directories (training writes through the OS)."""
        if not self.local:
            raise ValueError(f"{self.url} is not a local run directory")
        return Path(self.path(*parts))

    def tb_dir(self, tb_dir: str) -> str:
        """``logging.tb_dir``: absolute paths and URLs as they are, anything else inside the run."""
        return tb_dir if os.path.isabs(tb_dir) or "://" in tb_dir else self.url_of(tb_dir)

    def checkpoint_dir(self, step: int) -> str:
        return self.path(CHECKPOINTS, tag_of(step))

    def export_dir(self, step: int) -> str:
        return self.path(EXPORTS, tag_of(step))

    def results_file(self, dataset: str, step: int) -> str:
        """Relative to the run: where the eval worker writes one export's full results."""
        return f"{RESULTS}/{dataset}/{tag_of(step)}.json"

    # --- what is there --------------------------------------------------------------------
    def complete_checkpoints(self) -> list[str]:
        """Complete checkpoint folders (paths), oldest first."""
        return [self.path(CHECKPOINTS, name) for name in self._step_folders(CHECKPOINTS)
                if self.fs.exists(self.path(CHECKPOINTS, name, COMPLETE))]

    def incomplete_checkpoints(self) -> list[str]:
        """Names of checkpoint folders without the completion marker (saves that were interrupted)."""
        return [name for name in self._step_folders(CHECKPOINTS)
                if not self.fs.exists(self.path(CHECKPOINTS, name, COMPLETE))]

    def exports(self, known: set[int] = frozenset()) -> tuple[list[int], list[str]]:
        """(steps of complete exports, ascending; names of export folders still missing a file).

        An export folder is complete when it holds both files: locally the rename that publishes
        it guarantees that; on object stores, where there is no rename, a folder missing a file
        is still being uploaded. Folders of ``known`` steps are taken as complete without being
        listed (one request fewer each on S3).
        """
        done, partial = [], []
        for name in self._step_folders(EXPORTS):
            step = step_of(name)
            if step in known:
                done.append(step)
                continue
            files = {f.rstrip("/").rsplit("/", 1)[-1] for f in self.fs.ls(self.path(EXPORTS, name), detail=False)}
            (done.append(step) if {META_FILE, ENCODER_FILE} <= files else partial.append(name))
        return sorted(done), partial

    def _step_folders(self, sub: str) -> list[str]:
        try:
            entries = self.fs.ls(self.path(sub), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if STEP_RE.match(n))  # temporary names and stray files are not ours

    def set_aside(self, after_step: int, stamp: str) -> dict[str, int]:
        """Move everything of steps after ``after_step`` — checkpoint folders (complete or not), exports, the
        eval worker's ledger records and results, rows of ``metrics.jsonl`` — into ``abandoned-<stamp>/``
        beside each (``metrics.abandoned-<stamp>.jsonl`` for the rows). A run that went back to
        ``after_step`` (a rollback, or a fresh start: 0) trains a new timeline over the same step numbers;
        nothing of the old one may be resumed, kept in place of the new one's files, or taken for an
        evaluation of the new one's exports. Local run directories only. Returns how many of each moved."""
        moved = {}
        aside = f"{ABANDONED}{stamp}"
        for area in (CHECKPOINTS, EXPORTS):
            names = [n for n in self._step_folders(area) if step_of(n) > after_step]
            for name in names:
                move(self.local_path(area, name), self.local_path(area, aside, name))
            moved[area] = len(names)
        records = 0
        for area in (LEDGER, RESULTS):
            root = self.local_path(area)
            for folder in sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith(ABANDONED)):
                for record in sorted(folder.glob("step_*.json")):
                    step = step_of(record.name.removesuffix(".json"))
                    if step is not None and step > after_step:
                        move(record, root / aside / folder.name / record.name)
                        records += 1
        moved["eval records"] = records
        metrics = self.local_path(METRICS)
        if metrics.is_file():
            import json

            keep, drop = [], []
            for line in metrics.read_text().splitlines(keepends=True):
                try:
                    (drop if json.loads(line).get("step", 0) > after_step else keep).append(line)
                except ValueError:
                    keep.append(line)
            if drop:
                self.local_path(f"metrics.{aside}.jsonl").write_text("".join(drop))
                write_atomic(metrics, "".join(keep).encode())
            moved["metrics rows"] = len(drop)
        return moved

    # --- small files ------------------------------------------------------------------------
    def read_text(self, *parts: str) -> str | None:
        """A whole file's text, or None when it does not exist."""
        try:
            return self.fs.cat_file(self.path(*parts)).decode()
        except FileNotFoundError:
            return None

    def training_state(self) -> TrainingState | None:
        """``state.json`` as training wrote it, or None before training started (or when it is unreadable: a
        reader then knows nothing more than before)."""
        text = self.read_text(STATE)
        try:
            return TrainingState.from_json(text) if text else None
        except ValueError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        """Whole-file write, atomic for readers (:func:`xtra_ds.storage.write_bytes`)."""
        write_bytes(self.fs, self.path(rel), text.encode())


def write_export(run_dir: str | os.PathLike, step: int, state: dict, meta: ExportMeta) -> Path:
    """Publish the encoder export of ``step`` in a local run directory; returns its folder.

    ``state``: the encoder's tensors under the encoder's own names (timm's ViT layout), written as
    safetensors beside ``meta.json`` (``meta`` with this step and the time). Everything is written under
    a temporary name, then the folder is renamed into place, so readers see a whole export or none.
    """
    import shutil

    from safetensors.torch import save_file

    root = Path(run_dir) / EXPORTS
    final = root / tag_of(step)
    tmp = root / export_tmp_name(step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / ENCODER_FILE), metadata={"step": str(step), "layout": "timm-vit"})
    meta.step, meta.time = step, time.time()
    (tmp / META_FILE).write_text(meta.to_json())
    for f in (ENCODER_FILE, META_FILE):
        fsync_path(tmp / f)
    publish_dir(tmp, final)  # a re-export of the same step after a resume is swapped in whole
    return final


def remove_export_tmps(run_dir: str | os.PathLike | RunDir) -> list[str]:
    """Remove the temporary folders of exports that were being written when a run was killed
    (``exports/.step_X.tmp-PID``: never read, never published); returns their names. Only the run's rank 0
    writes exports, so at the start of a run every such folder is an orphan."""
    import shutil

    root = Path(run_dir.root if isinstance(run_dir, RunDir) else run_dir) / EXPORTS
    names = sorted(p.name for p in root.glob(".step_*.tmp-*")) if root.is_dir() else []
    for name in names:
        shutil.rmtree(root / name, ignore_errors=True)
    return names


