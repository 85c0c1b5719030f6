"""Checkpoints that count only when complete, resume from the latest complete one, keep the last K.

Layout (names in :mod:`xtra_ds.rundir`): ``RUN/checkpoints/step_00001000/`` holds DeepSpeed's
files (model, per-rank ZeRO partitions, optimizer), ``rng_rank{r}.pt`` for every rank, and
``COMPLETE`` — written by rank 0 only after every rank has finished writing (a barrier), and last.
A save killed midway leaves a folder without ``COMPLETE``: resume ignores it and the next
successful save deletes it. A tag saved again first loses its ``COMPLETE`` (and everything else), so
a marker never vouches for a mix of two saves.

Timelines: resuming from a checkpoint older than the newest one (``checkpoint.resume=<path>``), or
starting over (``resume=none`` with ``checkpoint.start_over=true``), makes everything after that
point an abandoned timeline; it is set aside (``*/abandoned-<time>/``, :meth:`RunDir.set_aside`)
before the first step, so ``resume=auto`` never picks it and keep-last-k never prefers it.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config.schema import CheckpointConfig, ConfigError
from ..interop.zero import safe_load
from ..rundir import CHECKPOINTS, COMPLETE, LATEST, CheckpointRecord, RepartitionRecord, RunDir, step_of, tag_of
from ..storage import fsync_path, write_atomic
from .dist import RankInfo, any_rank, barrier

log = logging.getLogger(__name__)


def _rng_state() -> dict:
    """Every generator's state as tensors and plain data (readable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of a local run directory (``checkpoint.*``)."""

    def __init__(self, run: RunDir, info: RankInfo, cfg: CheckpointConfig, device=None):
        """``device``: where the collectives' flags live (set once the process group exists)."""
        self.run = run
        self.root = run.local_path(CHECKPOINTS)
        self.info, self.device = info, device
        self.every_steps, self.every_minutes, self.keep_last = cfg.every_steps, cfg.every_minutes, cfg.keep_last
        self.resume, self.start_over = cfg.resume, cfg.start_over
        self.last_save = time.monotonic()

    def should_save(self, step: int) -> bool:
        """Every N steps, or when T minutes have passed (rank 0's clock decides for all)."""
        due = bool(self.every_steps) and step % self.every_steps == 0
        if due or not self.every_minutes:  # the same on every rank: no collective needed
            return due
        timed = time.monotonic() - self.last_save >= 60 * self.every_minutes
        return any_rank(timed and self.info.is_main, self.device)

    def save(self, engine, step: int, client_state: dict, record: CheckpointRecord | None = None) -> Path:
        """Collective: every rank calls it. Returns the checkpoint folder. ``record`` (what
        ``launchers/inspect_checkpoint.py`` shows) gets the step, world size and time and becomes the
        ``COMPLETE`` marker."""
        tag = tag_of(step)
        path = self.root / tag
        t = time.perf_counter()
        if self.info.is_main:
            clear_tag(path)
        barrier()  # nobody writes into the tag before its old contents are gone
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), path / f"rng_rank{self.info.rank}.pt")
        barrier()  # every rank's files are on disk
        if self.info.is_main:
            record = record or CheckpointRecord()
            record.step, record.world_size, record.time = step, self.info.world_size, time.time()
            write_atomic(path / COMPLETE, record.to_json().encode())
            write_atomic(self.root / LATEST, tag.encode())  # for DeepSpeed's zero_to_fp32 and friends
            self._prune()
            log.info("checkpoint %s saved in %.1f s", path, time.perf_counter() - t)
        barrier()
        self.last_save = time.monotonic()
        return path

    def _prune(self) -> None:
        done = [Path(p) for p in self.run.complete_checkpoints()]
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        if done:  # interrupted saves older than the newest complete one
            for name in self.run.incomplete_checkpoints():
                if name < done[-1].name:
                    shutil.rmtree(self.root / name, ignore_errors=True)

    def find(self, resume: str | None = None) -> Path | None:
        """The checkpoint to resume from (``checkpoint.resume`` unless given): 'auto' = latest complete,
        'none', or a path. 'none' in a run directory that holds complete checkpoints is refused unless
        ``checkpoint.start_over`` (a second timeline over the same step numbers is never started silently)."""
        resume = self.resume if resume is None else resume
        if resume == "none":
            done = self.run.complete_checkpoints()
            if done and not self.start_over:
                raise ConfigError(
                    f"checkpoint.resume=none, but {self.root} holds complete checkpoints (newest "
                    f"{Path(done[-1]).name}): starting from step 0 here would mix two runs. Resume with "
                    f"checkpoint.resume=auto; or start over with checkpoint.resume=none checkpoint.start_over=true "
                    f"(the old checkpoints, exports and eval records are moved to */abandoned-<time>/); or use "
                    f"another run_dir")
            return None
        if resume == "auto":
            done = self.run.complete_checkpoints()
            skipped = self.run.incomplete_checkpoints()
            if skipped and self.info.is_main:
                log.warning("ignoring incomplete checkpoint(s) %s (no %s marker: the save was interrupted)",
                            ", ".join(skipped), COMPLETE)
            return Path(done[-1]) if done else None
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint (no {COMPLETE} file)")
        return path

    def abandon_after(self, resumed: Path | None) -> None:
        """Collective. Set aside (rank 0) what this run directory holds of steps after the point the run starts
        from — ``resumed`` (a checkpoint), or step 0 — in one log line: an older checkpoint named by
        ``checkpoint.resume`` or a start over makes them an abandoned timeline. Nothing to do on a plain
        resume from the newest checkpoint."""
        step = saved_step(resumed) if resumed is not None else 0
        if self.info.is_main:
            newer = [n for n in self.run.complete_checkpoints() if step_of(n) > step]
            if newer or (resumed is None and self.start_over):
                stamp = time.strftime("%Y%m%d-%H%M%S")
                moved = self.run.set_aside(step, stamp)
                latest = self.root / LATEST
                if resumed is not None and resumed.parent.resolve() == self.root.resolve():
                    write_atomic(latest, resumed.name.encode())
                elif latest.exists():
                    latest.unlink()
                log.warning("%s: a new timeline starts after step %d; set aside what the old one had after it into "
                            "*/abandoned-%s/ (%s)", self.run.url, step, stamp,
                            ", ".join(f"{n} {what}" for what, n in moved.items() if n))
        barrier()

    def load(self, engine, path: Path) -> dict:
        """Collective. Restores model, optimizer, this rank's RNG; returns the client state.

        A checkpoint saved by another number of ranks is first re-partitioned for this one
        (:func:`xtra_ds.interop.reshard_rank`, into ``path/world_<W>/``, each rank writing its own files),
        then loaded by DeepSpeed as usual. DeepSpeed reads its files with a full unpickler; every file
        this rank will read is first read with ``weights_only=True`` (tensors, plain data and DeepSpeed's
        optimizer-state classes only), so a tampered checkpoint is refused before anything in it runs."""
        rng = path / f"rng_rank{self.info.rank}.pt"
        rng_state = safe_load(rng, mmap=False) if rng.is_file() else None  # read once: checked, then applied
        folder = path
        saved = saved_world_size(path)
        if saved != self.info.world_size:  # the re-partitioning reads the saved partitions safely itself
            folder = self._resharded(engine, path, saved)
        for f in [*folder.glob(f"*zero_pp_rank_{self.info.rank}_mp_rank_*.pt"),
                  *folder.glob("mp_rank_*_model_states.pt")]:
            safe_load(f)
        _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load {folder}")
        if rng_state is not None:  # a rank the saving run did not have starts from its own seed
            _set_rng_state(rng_state)
        return client_state

    def _resharded(self, engine, path: Path, saved: int) -> Path:
        """``path`` re-partitioned for this world size (made once; reused by a later restart on it)."""
        from ..interop import ZeroCheckpoint, reshard_rank

        world, rank = self.info.world_size, self.info.rank
        out = path / f"world_{world}"
        source = marker_digest(path)  # the copy belongs to this save of the checkpoint, or is made again
        copy = RepartitionRecord.read(out / COMPLETE)
        made_from = copy.source if copy is not None else None
        barrier()  # every rank has looked before rank 0 may remove a stale copy
        if made_from == source:
            return out
        if self.info.is_main and out.exists():
            log.warning("%s was made from another save of %s: made again", out.name, path.name)
            clear_tag(out)
        barrier()
        if engine.zero_optimization_stage() != 3:
            raise RuntimeError(f"{path} was saved by {saved} ranks and this run has {world}: only ZeRO-3 checkpoints "
                               f"are re-partitioned (deepspeed.zero_stage=3), or resume on {saved} ranks")
        t = time.perf_counter()
        reshard_rank(ZeroCheckpoint(path), world, rank, out, engine.zero_sub_group_size())
        barrier()
        if self.info.is_main:
            write_atomic(out / COMPLETE, RepartitionRecord(from_world_size=saved, world_size=world,
                                                           source=source).to_json().encode())
            log.info("checkpoint %s was saved by %d ranks: re-partitioned for %d in %.1f s (fp32 master weights, "
                     "Adam moments and step, per rank) into %s", path.name, saved, world, time.perf_counter() - t, out)
        barrier()
        return out


def clear_tag(path: Path) -> None:
    """Remove a checkpoint folder so that no moment leaves its ``COMPLETE`` beside a part of its files: the
    marker goes first (and that is made durable), then the rest."""
    marker = path / COMPLETE
    if marker.exists():
        marker.unlink()
        fsync_path(path, directory=True)
    shutil.rmtree(path, ignore_errors=True)


def marker_digest(path: Path) -> str | None:
    """A fingerprint of the save behind checkpoint folder ``path``: the sha256 of its ``COMPLETE`` (which holds
    the save's time), or None when it has none."""
    try:
        return hashlib.sha256((path / COMPLETE).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def saved_step(path: Path) -> int:
    """The step a complete checkpoint folder holds (its ``COMPLETE``; else its name)."""
    record = CheckpointRecord.read(path / COMPLETE)
    return record.step if record is not None else step_of(path.name) or 0


def saved_world_size(path: Path) -> int:
    """The data-parallel world size that saved the checkpoint folder ``path``."""
    record = CheckpointRecord.read(path / COMPLETE)
    if record is not None:
        return record.world_size
    return len(list(path.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or 1
