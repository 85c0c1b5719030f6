"""The training loader: shards from any fsspec URL into whole steps of shuffled uint8 images, in an order
that does not depend on the number of ranks or workers.

:class:`TrainLoader` yields, for each optimizer step, this rank's share of that step's global batch
(:mod:`.order`): global step ``t`` of an epoch holds the same samples on 1, 2 or 72 ranks, with any
number of loader workers. ``state_dict()`` — epoch and step, plus what defines the order — goes
into every checkpoint; a loader built for any other layout continues from it exactly. Each rank
yields the same number of steps per epoch (a rank that ran dry first would hang ZeRO-3).

Each DataLoader worker owns a contiguous group of the rank's streams and sends one *piece* per
step (its streams' samples of that step); pieces arrive in worker order, which is the order in
which a DataLoader interleaves its workers, and are copied side by side into the step's buffer.
The workers start once per ``iter(loader)`` and go from one epoch straight into the next: an
epoch boundary costs no worker start, and the next epoch's first pieces are made while the
trainer is still on the last steps of the current one (the DataLoader's prefetch).
"""

from __future__ import annotations

import logging
import os
import random
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config.schema import ConfigError
from .format import MAX_SAMPLE_BYTES
from .handover import BatchRing, Buffers
from .order import DataOrder, Piece
from .remote import BLOCK_SIZE
from .samples import image_of, read_segment
from .shards import EpochPlan, Shard, epoch_shards, fingerprint
from .transforms import decode_train, normalize_on_device
from .workers import WORKER_START_METHOD, start_workers, worker_init

log = logging.getLogger(__name__)
READ_BUDGET = 128 << 20  # read-ahead bytes per worker, shared by its open streams


class DataOrderChanged(ConfigError):
    """A checkpoint's data position cannot be continued exactly: what defines the order changed."""


def order_changes(saved: dict, planned: dict) -> dict[str, tuple]:
    """What defines the data order (:meth:`TrainSpec.identity`) that differs between a checkpoint's loader
    state ``saved`` and a ``planned`` run: key -> (saved, planned); a key the checkpoint does not record
    counts as changed ("?"), since nothing says it is the same."""
    return {k: (saved.get(k, "?"), v) for k, v in planned.items() if saved.get(k, "?") != v}


def describe_changes(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {a}→{b}" for k, (a, b) in changes.items())


@dataclass
class TrainSpec:
    """Everything a worker needs to produce its pieces (picklable). ``streams`` 0 = ``global_batch``."""

    shards: list[Shard]
    global_batch: int
    img_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 4
    streams: int = 0
    seed: int = 0
    scale: tuple = (0.3, 1.0)
    ratio: tuple = (0.75, 1.5)
    hflip: float = 0.5
    weights: list | None = None
    shuffle: int = 64  # in-stream shuffle chunk, samples
    draft: bool = True
    storage_options: dict | None = None
    retries: int = 8  # ≈2 min of backoff before a shard read fails for good
    max_member_bytes: int = MAX_SAMPLE_BYTES  # a larger tar member is a ShardReadError, never read
    normalize_in_worker: bool = False  # for benchmarks: float32 out instead of uint8
    on_order_change: str = "refuse"  # or "next_epoch" (TrainLoader.load_state_dict)
    order: DataOrder = field(init=False)

    def __post_init__(self):
        self.order = DataOrder(self.global_batch, self.streams or self.global_batch)

    @property
    def pieces(self) -> list[list[Piece]]:
        """This rank's pieces, grouped by worker (one group when there are no worker processes)."""
        return self.order.worker_pieces(self.rank, self.world_size, max(1, self.num_workers))

    @property
    def share(self) -> int:
        """Images this rank gets of every step."""
        lo, hi = self.order.share(self.rank, self.world_size)
        return hi - lo

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(epoch_shards(self.shards, self.weights, self.seed, epoch), num_streams=self.order.streams,
                         per_step=self.order.per_stream, seed=self.seed, epoch=epoch, shuffle=self.shuffle)

    def identity(self) -> dict:
        """What defines the data order (a resume must find the same)."""
        return {"global_batch": self.global_batch, "streams": self.order.streams, "seed": self.seed,
                "shards": fingerprint(self.shards), "weights": self.weights, "shuffle": self.shuffle}


class _RateLimited:
    def __init__(self, first: int = 5, every: float = 60.0):
        self.first, self.every, self.n, self.last = first, every, 0, 0.0

    def __call__(self, msg: str, *args) -> None:
        self.n += 1
        now = time.monotonic()
        if self.n <= self.first or now - self.last >= self.every:
            self.last = now
            log.warning(msg + (" (%d so far in this worker)" % self.n if self.n > self.first else ""), *args)


class _Stream:
    """One canonical stream, read forward: the raw samples of its current shuffle chunk in memory,
    decoded on request by stream position."""

    def __init__(self, loader: "_Pieces", plan: EpochPlan, stream: int, first: int, block_size: int):
        self.loader, self.plan, self.stream = loader, plan, stream
        spec = loader.spec
        self.k = plan.shuffle
        self.chunk, self.raw, self.perm = first // self.k - 1, [], []
        begin = (first // self.k) * self.k
        self.samples = (s for seg in plan.segments(stream, begin)
                        for s in read_segment(seg, spec.storage_options, spec.retries, spec.max_member_bytes,
                                              block_size))

    def _load(self, chunk: int) -> None:
        self.perm = self.plan.chunk_order(self.stream, chunk)  # the shuffle the provenance tools replay
        self.raw = [next(self.samples) for _ in range(len(self.perm))]
        self.chunk = chunk

    def decoded(self, pos: int, warn) -> tuple[np.ndarray, str, int, int]:
        """(image, key, label, corrupt samples met) of stream position ``pos``. A sample that does not
        decode is replaced by the nearest one of its chunk that does (earlier positions first), so the
        replacement depends on the stream alone, never on the layout or the resume point."""
        chunk = pos // self.k
        while self.chunk < chunk:
            self._load(self.chunk + 1)
        at = pos - chunk * self.k
        bad = 0
        for other in [at, *range(at - 1, -1, -1), *range(at + 1, len(self.raw))]:
            item = self.loader.decode(self.raw[self.perm[other]], self.plan.epoch, warn)
            if item is not None:
                return (*item, bad)
            bad += 1
        raise RuntimeError(f"stream {self.stream} of epoch {self.plan.epoch}: no sample of a chunk of "
                           f"{len(self.raw)} decodes (the shards hold no usable image?)")


class _Pieces(IterableDataset):
    """A worker's pieces (all of the rank's, in-process), step after step from step ``first_step`` of ``epoch``
    on, epoch after epoch, for as long as it is iterated. One worker process serves every epoch: when an epoch
    ends it opens the streams of the next one's plan and goes on, so no epoch waits for a worker to start."""

    def __init__(self, spec: TrainSpec, epoch: int, first_step: int, rings: list[BatchRing] | None = None):
        self.spec, self.epoch, self.first_step, self.rings = spec, epoch, first_step, rings
        self.owner_pid = os.getpid()  # the rank: workers leave when it is gone (data.workers.watch_owner)

    def __iter__(self):
        spec = self.spec
        info = get_worker_info()
        worker = info.id if info is not None else 0
        pieces = spec.pieces[worker] if info is not None else [p for group in spec.pieces for p in group]
        _allow_open_files(len(pieces))
        q = spec.order.per_stream
        block = max(1 << 20, min(BLOCK_SIZE, READ_BUDGET // max(1, len(pieces))))
        warn = _RateLimited()
        epoch, first = self.epoch, self.first_step
        while True:
            plan = spec.plan(epoch)
            streams = [_Stream(self, plan, p.stream, first * q, block) for p in pieces]
            for step in range(first, plan.steps):
                images, keys, labels, corrupt = [], [], [], 0
                for piece, stream in zip(pieces, streams, strict=True):
                    for j in range(piece.lo, piece.hi):
                        image, key, label, bad = stream.decoded(step * q + j, warn)
                        images.append(image), keys.append(key), labels.append(label)
                        corrupt += bad > 0  # this position's own sample did not decode
                yield self._collate(images, keys, labels, corrupt, epoch, step, worker)
            epoch, first = epoch + 1, 0

    def decode(self, s: dict, epoch: int, warn):
        """(image, key, label) of raw sample ``s`` cropped as epoch ``epoch`` crops it; None if it has no image
        or does not decode (logged through ``warn``)."""
        data = image_of(s)
        if data is None:
            warn("sample %s in %s has no image entry; skipped", s["__key__"], s["__url__"])
            return None
        rng = random.Random(f"{self.spec.seed}-{epoch}-{s['__key__']}")
        try:
            img = decode_train(data, self.spec.img_size, self.spec.scale, self.spec.ratio, self.spec.hflip, rng,
                               self.spec.draft)
        except Exception as e:
            warn("sample %s in %s does not decode (%s); skipped", s["__key__"], s["__url__"], e)
            return None
        label = int(s["cls"]) if "cls" in s else -1
        return img, s["__key__"], label

    def _collate(self, images, keys, labels, corrupt, epoch, step, worker) -> dict:
        """The piece: in a worker, stacked straight into a slot of its ring (only the slot's number travels,
        with the worker's pid); in-process, a tensor."""
        piece = {"keys": keys, "labels": labels, "corrupt": corrupt, "epoch": epoch, "step": step,
                 "worker": worker}
        if get_worker_info() is None:
            x = torch.from_numpy(np.stack(images))  # [n, H, W, 3] uint8
            piece["images"] = normalize_on_device(x).contiguous() if self.spec.normalize_in_worker else x
            return piece
        ring = self.rings[worker]
        slot = ring.acquire()
        if self.spec.normalize_in_worker:
            ring.view(slot).copy_(normalize_on_device(torch.from_numpy(np.stack(images))))
        else:
            np.stack(images, out=ring.view(slot).numpy())
        return {**piece, "slot": slot, "pid": os.getpid()}


def _allow_open_files(streams: int) -> None:
    """A worker keeps one shard open per stream: raise the soft open-files limit towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = streams + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("this worker reads %d streams but may open only %d files (ulimit -Hn): raise the limit, "
                        "use more workers, or set a smaller data.streams", streams, new)


class TrainLoader:
    """Infinite iterator over this rank's share of every training step, over epochs, with a resume that
    holds across layouts. Pieces travel from the workers through reused shared memory (:mod:`.handover`)."""

    def __init__(self, spec: TrainSpec, *, pin_memory: bool = False, prefetch_factor: int = 2):
        self.spec = spec
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.workers = len(spec.pieces) if spec.num_workers else 0
        if spec.num_workers > self.workers:
            log.info("%d loader workers would read this rank's %d streams; %d start", spec.num_workers,
                     self.workers, self.workers)
        self.sizes = [sum(p.size for p in group) for group in spec.pieces]  # images per step of each worker
        self.rings: list[BatchRing] = []
        frame = (3, spec.img_size, spec.img_size) if spec.normalize_in_worker else (spec.img_size, spec.img_size, 3)
        dtype = torch.float32 if spec.normalize_in_worker else torch.uint8
        if self.workers:
            self.rings = [BatchRing(prefetch_factor + 2, (n, *frame), dtype) for n in self.sizes]
        self.buffers = Buffers((spec.share, *frame), dtype, pin_memory)
        self.epoch, self.step = 0, 0
        self.corrupt_skipped = 0
        self.last_wait = self.total_wait = 0.0
        self.worker_pids: list[int] = []  # the processes that made the last step's pieces (none in-process)
        plan = spec.plan(0)
        if plan.steps == 0:
            raise ValueError(f"{plan.total} samples cannot fill one global batch of {spec.global_batch}; "
                             f"use a smaller optim.global_batch_size or more data")
        if plan.left_out:
            log.info("each epoch uses %d of %d samples; %d (< streams × (samples per stream and step + 1)) are "
                     "left out so that every stream gives %d steps", plan.total - plan.left_out, plan.total,
                     plan.left_out, plan.steps)

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Steps per epoch (the same on every rank, whatever the layout)."""
        return self.spec.plan(self.epoch if epoch is None else epoch).steps

    def _dataloader(self):
        kw = dict(num_workers=self.workers, batch_size=None)
        if self.workers:
            kw.update(prefetch_factor=self.prefetch_factor, worker_init_fn=worker_init,
                      multiprocessing_context=WORKER_START_METHOD)
        return DataLoader(_Pieces(self.spec, self.epoch, self.step, self.rings or None), **kw)

    def __iter__(self):
        it = start_workers(self._dataloader())  # once: the workers walk on from epoch to epoch
        while True:
            steps = self.steps_per_epoch()
            while self.step < steps:
                t = time.perf_counter()
                batch = self._assemble(it)
                self.last_wait = time.perf_counter() - t
                self.total_wait += self.last_wait
                self.step += 1
                self.corrupt_skipped += batch["corrupt"]
                yield batch
            self.epoch, self.step = self.epoch + 1, 0

    def _assemble(self, it) -> dict:
        """This rank's share of the next step: one piece from each worker, side by side."""
        if not self.workers:
            piece = next(it)
            self._check(piece, 0)
            images = piece["images"].pin_memory() if self.pin_memory else piece["images"]
            return {**piece, "images": images, "labels": torch.tensor(piece["labels"])}
        images, keys, labels, corrupt, row, pids = self.buffers.get(), [], [], 0, 0, []
        for worker in range(self.workers):
            piece = next(it)
            self._check(piece, worker)
            n = self.sizes[worker]
            self.rings[worker].take(piece["slot"], images[row:row + n])
            row += n
            keys += piece["keys"]
            labels += piece["labels"]
            corrupt += piece["corrupt"]
            pids.append(piece["pid"])
        self.worker_pids = pids
        return {"images": images, "keys": keys, "labels": torch.tensor(labels), "corrupt": corrupt,
                "epoch": self.epoch, "step": self.step}

    def _check(self, piece: dict, worker: int) -> None:
        if (piece["epoch"], piece["step"], piece["worker"]) != (self.epoch, self.step, worker):  # never data
            raise RuntimeError(f"loader out of order: got epoch {piece['epoch']} step {piece['step']} from worker "
                               f"{piece['worker']}, expected {self.epoch}/{self.step} from {worker}")

    # --- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The data position in layout-free terms (epoch, step of the epoch), what defines the order, and
        (for information) the layout that saved it."""
        s = self.spec
        return {"epoch": self.epoch, "step": self.step, **s.identity(), "steps_per_epoch": self.steps_per_epoch(),
                "world_size": s.world_size, "num_workers": self.workers, "corrupt_skipped": self.corrupt_skipped}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s position: exactly, on any layout, if the order is the same; otherwise
        refused (:class:`DataOrderChanged`), or with ``on_order_change="next_epoch"`` at the next epoch."""
        self.corrupt_skipped = state.get("corrupt_skipped", 0)
        changed = order_changes(state, self.spec.identity())
        if not changed:
            self.epoch, self.step = state["epoch"], state["step"]
            return
        what = describe_changes(changed)
        if self.spec.on_order_change != "next_epoch":
            raise DataOrderChanged(
                f"the checkpoint's data position (epoch {state.get('epoch')}, step {state.get('step', '?')}) "
                f"belongs to another data order ({what}); world size, loader workers and micro batch may change "
                f"freely, these may not. Restore them, or set data.on_order_change=next_epoch to go on at the "
                f"start of the next epoch with the new order (the rest of the saved epoch is then not read)")
        self.epoch, self.step = state.get("epoch", 0) + 1, 0
        log.warning("the data order changed (%s): continuing at the start of epoch %d; the rest of epoch %d is "
                    "not read (data.on_order_change=next_epoch)", what, self.epoch, self.epoch - 1)
