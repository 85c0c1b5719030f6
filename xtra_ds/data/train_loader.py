"""The training loader: shards from any fsspec URL into balanced, shuffled, exactly resumable uint8 batches.

:class:`TrainLoader` is balanced (every rank yields the same number of batches per epoch),
shuffled (seeded shard order, chunked in-stream shuffle) and exactly resumable: its
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
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .format import MAX_SAMPLE_BYTES
from .handover import BatchRing, Buffers
from .samples import image_of, read_segment
from .shards import EpochPlan, Shard, epoch_shards, fingerprint
from .transforms import decode_train, normalize_on_device
from .workers import WORKER_START_METHOD, start_workers, worker_init

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
    max_member_bytes: int = MAX_SAMPLE_BYTES  # a larger tar member is a ShardReadError, never read
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
    def __init__(self, spec: TrainSpec, epoch: int, start_batch: int, rings: list[BatchRing] | None = None):
        self.spec, self.epoch, self.start_batch, self.rings = spec, epoch, start_batch, rings
        self.owner_pid = os.getpid()  # the rank: workers leave when it is gone (data.workers.watch_owner)

    def __iter__(self):
        spec, streams = self.spec, self.spec.streams_per_rank
        info = get_worker_info()
        dl_worker = info.id if info is not None else 0
        logical = (self.start_batch + dl_worker) % streams
        first_batch = (self.start_batch + dl_worker) // streams
        plan = spec.plan(self.epoch)
        stream = spec.rank * streams + logical
        for t, batch in enumerate(self._batches(plan, stream, first_batch)):
            batch["batch"] = (first_batch + t) * streams + logical
            yield batch

    def _raw(self, plan: EpochPlan, stream: int, begin: int):
        for seg in plan.segments(stream, begin):
            yield from read_segment(seg, self.spec.storage_options, self.spec.retries, self.spec.max_member_bytes)

    def _batches(self, plan: EpochPlan, stream: int, first_batch: int):
        spec = self.spec
        batch_size, shuffle_chunk = spec.batch_size, spec.shuffle
        pos = first_batch * batch_size  # first output position in the stream
        if pos >= plan.stream_len:
            return
        chunk = pos // shuffle_chunk
        raw = self._raw(plan, stream, chunk * shuffle_chunk)
        warn = _RateLimited()
        images, keys, labels, corrupt, last_good, owed = [], [], [], 0, None, 0
        while chunk * shuffle_chunk < plan.stream_len:
            n = min(shuffle_chunk, plan.stream_len - chunk * shuffle_chunk)
            block = [next(raw) for _ in range(n)]
            order = list(range(n))
            random.Random(f"{spec.seed}-{self.epoch}-{stream}-{chunk}").shuffle(order)
            skip = pos - chunk * shuffle_chunk if chunk * shuffle_chunk < pos else 0
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
                while len(images) >= batch_size:
                    yield self._collate(images[:batch_size], keys[:batch_size], labels[:batch_size], corrupt)
                    images, keys, labels, corrupt = images[batch_size:], keys[batch_size:], labels[batch_size:], 0
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
        """The batch: in a worker, stacked straight into a slot of its ring (only the slot's number travels);
        in-process, a tensor."""
        batch = {"keys": keys, "labels": labels, "corrupt": corrupt, "epoch": self.epoch}
        info = get_worker_info()
        if info is None:
            x = torch.from_numpy(np.stack(images))  # [B, H, W, 3] uint8
            batch["images"] = normalize_on_device(x).contiguous() if self.spec.normalize_in_worker else x
            return batch
        ring = self.rings[info.id]
        slot = ring.acquire()
        if self.spec.normalize_in_worker:
            ring.view(slot).copy_(normalize_on_device(torch.from_numpy(np.stack(images))))
        else:
            np.stack(images, out=ring.view(slot).numpy())
        return {**batch, "worker": info.id, "slot": slot}


class TrainLoader:
    """Infinite iterator of training batches for one rank, over epochs, with exact resume. Batches
    travel from the workers through reused shared-memory buffers (:mod:`.handover`)."""

    def __init__(self, spec: TrainSpec, *, pin_memory: bool = False, prefetch_factor: int = 2):
        self.spec = spec
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.rings: list[BatchRing] = []
        if spec.num_workers:
            shape = (spec.batch_size, 3, spec.img_size, spec.img_size) if spec.normalize_in_worker else \
                (spec.batch_size, spec.img_size, spec.img_size, 3)
            dtype = torch.float32 if spec.normalize_in_worker else torch.uint8
            self.rings = [BatchRing(prefetch_factor + 2, shape, dtype) for _ in range(spec.num_workers)]
            self.buffers = Buffers(shape, dtype, pin_memory)
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
        kw = dict(num_workers=spec.num_workers, batch_size=None)
        if spec.num_workers:
            kw.update(prefetch_factor=self.prefetch_factor, worker_init_fn=worker_init,
                      multiprocessing_context=WORKER_START_METHOD)
        return DataLoader(_EpochStreams(spec, self.epoch, self.batch, self.rings or None), **kw)

    def __iter__(self):
        while True:
            it = start_workers(self._dataloader())
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
                if "slot" in batch:  # copied out of the worker's buffer, which is free again at once
                    batch["images"] = self.rings[batch.pop("worker")].take(batch.pop("slot"), self.buffers.get())
                elif self.pin_memory:
                    batch["images"] = batch["images"].pin_memory()
                batch["labels"] = torch.tensor(batch["labels"])
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
                    s.batch_size, state["seed"], s.seed,
                    "same" if state["shards"] == fingerprint(s.shards) else "changed",
                    self.epoch, 100 * frac, self.batch, self.batches_per_epoch())


