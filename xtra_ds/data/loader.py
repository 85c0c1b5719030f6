"""The training and evaluation loaders: shards from any fsspec URL into uint8 batches.

Training (:class:`TrainLoader`) is balanced (every rank yields the same number of batches per
epoch), shuffled (seeded shard order, chunked in-stream shuffle) and exactly resumable: its
``state_dict()`` — epoch and batches consumed — goes into every checkpoint, and a loader built
with the same world size and worker count continues with exactly the samples an uninterrupted
run would have seen. See :mod:`xtra_ds.data.shards` for the plan.

Batch ``j`` of an epoch (per rank) is batch ``j // W`` of logical stream ``j % W`` (W workers),
which is the order in which a DataLoader interleaves its workers. After a restart at batch
``k``, DataLoader worker ``i`` serves logical stream ``(k + i) % W``, so the interleaving lines
up again without replaying anything.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import EpochPlan, Segment, Shard, epoch_shards, fingerprint
from .tario import image_of, read_segment
from .transforms import decode_eval, decode_train, normalize_on_device

log = logging.getLogger(__name__)


@dataclass
class TrainSpec:
    """Everything a worker needs to produce its stream (picklable)."""

    shards: list[Shard]
    batch_size: int
    img_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 4
    seed: int = 0
    scale: tuple = (0.3, 1.0)
    ratio: tuple = (0.75, 1.5)
    hflip: float = 0.5
    weights: list | None = None
    shuffle: int = 2000  # in-stream shuffle chunk, samples
    draft: bool = True
    storage_options: dict | None = None
    retries: int = 8  # ≈2 min of backoff before a shard read fails for good
    normalize_in_worker: bool = False  # for benchmarks: float32 out instead of uint8

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(epoch_shards(self.shards, self.weights, self.seed, epoch),
                         num_streams=self.world_size * self.streams_per_rank, batch_size=self.batch_size)


class _RateLimited:
    def __init__(self, first: int = 5, every: float = 60.0):
        self.first, self.every, self.n, self.last = first, every, 0, 0.0

    def __call__(self, msg: str, *args) -> None:
        self.n += 1
        now = time.monotonic()
        if self.n <= self.first or now - self.last >= self.every:
            self.last = now
            log.warning(msg + (" (%d so far in this worker)" % self.n if self.n > self.first else ""), *args)


class _EpochStreams(IterableDataset):
    def __init__(self, spec: TrainSpec, epoch: int, start_batch: int):
        self.spec, self.epoch, self.start_batch = spec, epoch, start_batch

    def __iter__(self):
        spec, W = self.spec, self.spec.streams_per_rank
        info = get_worker_info()
        dl_worker = info.id if info is not None else 0
        logical = (self.start_batch + dl_worker) % W
        first_batch = (self.start_batch + dl_worker) // W
        plan = spec.plan(self.epoch)
        stream = spec.rank * W + logical
        for t, batch in enumerate(self._batches(plan, stream, first_batch)):
            batch["batch"] = (first_batch + t) * W + logical
            yield batch

    def _raw(self, plan: EpochPlan, stream: int, begin: int):
        for seg in plan.segments(stream, begin):
            yield from read_segment(seg, self.spec.storage_options, self.spec.retries)

    def _batches(self, plan: EpochPlan, stream: int, first_batch: int):
        spec = self.spec
        B, C = spec.batch_size, spec.shuffle
        pos = first_batch * B  # first output position in the stream
        if pos >= plan.stream_len:
            return
        chunk = pos // C
        raw = self._raw(plan, stream, chunk * C)
        warn = _RateLimited()
        images, keys, labels, corrupt, last_good, owed = [], [], [], 0, None, 0
        while chunk * C < plan.stream_len:
            n = min(C, plan.stream_len - chunk * C)
            block = [next(raw) for _ in range(n)]
            order = list(range(n))
            random.Random(f"{spec.seed}-{self.epoch}-{stream}-{chunk}").shuffle(order)
            skip = pos - chunk * C if chunk * C < pos else 0
            for idx in order[skip:]:
                s = block[idx]
                item = self._decode(s, warn)
                if item is None:  # corrupt: its slot is filled by a repeat, so batch counts stay equal
                    corrupt += 1
                    if last_good is None:
                        owed += 1
                        continue
                    item = last_good
                last_good = item
                for _ in range(owed + 1):
                    images.append(item[0]), keys.append(item[1]), labels.append(item[2])
                owed = 0
                while len(images) >= B:
                    yield self._collate(images[:B], keys[:B], labels[:B], corrupt)
                    images, keys, labels, corrupt = images[B:], keys[B:], labels[B:], 0
            chunk += 1
        if owed:  # a stream whose every sample was corrupt
            raise RuntimeError(f"stream {stream} of epoch {self.epoch} holds no decodable image")

    def _decode(self, s: dict, warn):
        data = image_of(s)
        if data is None:
            warn("sample %s in %s has no image entry; skipped", s["__key__"], s["__url__"])
            return None
        rng = random.Random(f"{self.spec.seed}-{self.epoch}-{s['__key__']}")
        try:
            img = decode_train(data, self.spec.img_size, self.spec.scale, self.spec.ratio, self.spec.hflip, rng,
                               self.spec.draft)
        except Exception as e:
            warn("sample %s in %s does not decode (%s); skipped", s["__key__"], s["__url__"], e)
            return None
        label = int(s["cls"]) if "cls" in s else -1
        return img, s["__key__"], label

    def _collate(self, images, keys, labels, corrupt) -> dict:
        x = torch.empty((len(images),) + images[0].shape, dtype=torch.uint8)  # [B, H, W, 3]
        if get_worker_info() is not None:
            x.share_memory_()  # stack straight into the shared memory the batch travels in (one copy, not two)
        np.stack(images, out=x.numpy())
        if self.spec.normalize_in_worker:
            x = normalize_on_device(x).contiguous()
        return {"images": x, "keys": keys, "labels": torch.tensor(labels), "corrupt": corrupt, "epoch": self.epoch}


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}
WORKER_TERM_GRACE = 25.0  # s; DeepSpeed's node launcher SIGKILLs what is left 30 s after its SIGTERM


def _worker_init(_: int) -> None:
    """Loader workers outlive a job-wide SIGTERM for a while.

    Schedulers signal every process of a job, and DeepSpeed's node launcher SIGTERMs each
    rank's whole process tree. A worker that died at once would make the DataLoader raise in
    the rank (from its SIGCHLD handler, at any point of the step) before the rank could reach
    its checkpoint. So a worker leaves WORKER_TERM_GRACE seconds after SIGTERM (never later,
    so nothing waits on it forever) and ignores SIGUSR1, the ranks' own preemption notice.
    The signals were blocked while the worker was forked (:func:`_start_workers`), so none can
    arrive before these handlers exist.
    """
    def leave_later(signum, frame):
        threading.Timer(WORKER_TERM_GRACE, os._exit, args=(0,)).start()

    signal.signal(signal.SIGTERM, leave_later)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _start_workers(dataloader):
    """``iter(dataloader)`` with the stop signals blocked while its workers fork; one sent to the
    trainer in that window is delivered when the mask is restored."""
    if dataloader.num_workers == 0 or threading.current_thread() is not threading.main_thread():
        return iter(dataloader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(dataloader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class TrainLoader:
    """Infinite iterator of training batches for one rank, over epochs, with exact resume."""

    def __init__(self, spec: TrainSpec, *, pin_memory: bool = False, prefetch_factor: int = 2):
        self.spec = spec
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.epoch, self.batch = 0, 0
        self.corrupt_skipped = 0
        self.last_wait = self.total_wait = 0.0
        plan = spec.plan(0)
        if plan.batches_per_stream == 0:
            raise ValueError(f"{plan.total} samples cannot fill one batch of {spec.batch_size} on each of "
                             f"{plan.num_streams} streams (world {spec.world_size} × workers {spec.streams_per_rank}); "
                             f"use fewer workers, a smaller batch, or more data")
        if plan.left_out:
            log.info("each epoch uses %d of %d samples; %d (< streams × (batch + 1)) are left out so that every "
                     "rank yields %d batches", plan.total - plan.left_out, plan.total, plan.left_out,
                     self.batches_per_epoch(0))

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self.spec.plan(self.epoch if epoch is None else epoch).batches_per_stream * self.spec.streams_per_rank

    def _dataloader(self):
        spec = self.spec
        kw = dict(num_workers=spec.num_workers, pin_memory=self.pin_memory, batch_size=None)
        if spec.num_workers:
            kw.update(prefetch_factor=self.prefetch_factor, worker_init_fn=_worker_init)
        return DataLoader(_EpochStreams(spec, self.epoch, self.batch), **kw)

    def __iter__(self):
        while True:
            it = _start_workers(self._dataloader())
            while True:
                t = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                self.last_wait = time.perf_counter() - t
                self.total_wait += self.last_wait
                if batch["batch"] != self.batch or batch["epoch"] != self.epoch:  # a broken invariant, never data
                    raise RuntimeError(f"loader out of order: got epoch {batch['epoch']} batch {batch['batch']}, "
                                       f"expected {self.epoch}/{self.batch}")
                self.batch += 1
                self.corrupt_skipped += batch["corrupt"]
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0

    # --- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        s = self.spec
        return {"epoch": self.epoch, "batch": self.batch, "world_size": s.world_size, "num_workers": s.streams_per_rank,
                "batch_size": s.batch_size, "seed": s.seed, "shards": fingerprint(s.shards),
                "batches_per_epoch": self.batches_per_epoch(), "corrupt_skipped": self.corrupt_skipped}

    def load_state_dict(self, state: dict) -> None:
        s = self.spec
        self.corrupt_skipped = state.get("corrupt_skipped", 0)
        same = (state["world_size"], state["num_workers"], state["batch_size"], state["seed"], state["shards"]) == \
               (s.world_size, s.streams_per_rank, s.batch_size, s.seed, fingerprint(s.shards))
        self.epoch = state["epoch"]
        if same:
            self.batch = state["batch"]
            return
        frac = state["batch"] / max(1, state["batches_per_epoch"])
        self.batch = int(frac * self.batches_per_epoch())
        log.warning("loader resumes with a different layout (world %s→%s, workers %s→%s, batch %s→%s, seed %s→%s, "
                    "shards %s): epoch %d continues at %.1f%% (batch %d of %d). Within this epoch some samples may "
                    "repeat or be missed; from the next epoch on, every sample is used once.",
                    state["world_size"], s.world_size, state["num_workers"], s.streams_per_rank, state["batch_size"],
                    s.batch_size, state["seed"], s.seed, "same" if state["shards"] == fingerprint(s.shards) else "changed",
                    self.epoch, 100 * frac, self.batch, self.batches_per_epoch())


# --- evaluation ---------------------------------------------------------------------------------

class _EvalStream(IterableDataset):
    def __init__(self, shards, batch_size, img_size, rank, world_size, options, retries, stride):
        self.shards, self.batch_size, self.img_size = shards, batch_size, img_size
        self.rank, self.world_size, self.options, self.retries = rank, world_size, options, retries
        self.stride = stride

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        starts = np.cumsum([0] + [sh.num_samples for sh in self.shards])  # global index of each shard's first sample
        mine = range(len(self.shards))[self.rank * nw + wid::self.world_size * nw]
        images, labels, keys = [], [], []
        for i in mine:
            sh = self.shards[i]
            for j, s in enumerate(read_segment(Segment(sh, 0, sh.num_samples), self.options, self.retries)):
                if (starts[i] + j) % self.stride:
                    continue  # not in the evenly spaced subset (skipped before decoding)
                data = image_of(s)
                try:
                    img = decode_eval(data, self.img_size)
                except Exception as e:
                    log.warning("eval sample %s in %s does not decode (%s); skipped", s["__key__"], sh.url, e)
                    continue
                images.append(img), labels.append(int(s.get("cls", b"-1"))), keys.append(s["__key__"])
                if len(images) == self.batch_size:
                    yield {"images": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels), "keys": keys}
                    images, labels, keys = [], [], []
        if images:
            yield {"images": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels), "keys": keys}


def eval_batches(shards: list[Shard], *, batch_size: int, img_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, storage_options: dict | None = None, retries: int = 8, stride: int = 1):
    """Every sample of ``shards`` once (this rank's share), resized + centre-cropped, in batches.
    ``stride`` > 1 keeps every stride-th sample of the whole set, evenly spaced (shards written in
    class order keep every class)."""
    ds = _EvalStream(shards, batch_size, img_size, rank, world_size, storage_options, retries, max(1, stride))
    return DataLoader(ds, batch_size=None, num_workers=num_workers)
