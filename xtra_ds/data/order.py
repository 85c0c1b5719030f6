"""The data order of a run, independent of how many ranks and loader workers read it.

An epoch's samples (the seeded shard order, concatenated; :class:`~.shards.EpochPlan`) are cut into
``C`` *canonical streams* of equal length (``data.streams``; by default one per sample of the global
batch). Global step ``t`` of the epoch is made of ``q = G / C`` consecutive samples of every stream
(positions ``[t·q, (t+1)·q)``), stream after stream: that sequence of ``G`` samples is the step's
*canonical order*, and it depends on the shard list, the seed, the epoch, ``G`` and ``C`` only.

A layout — ``W`` ranks × ``K`` workers — only decides who decodes which part of it:

* rank ``r`` takes positions ``[⌊r·G/W⌋, ⌊(r+1)·G/W⌋)`` of every step's canonical order. Shares differ
  by at most one sample when ``W`` does not divide ``G``; the trainer weights each micro batch's loss
  by its size, so the gradient is still the mean over the same ``G`` samples (:func:`micro_splits`);
* a rank's share is a run of *pieces* (a stream and the part of its ``q`` samples the share holds);
  its workers take contiguous groups of pieces, so every stream a rank reads is read by one worker.

Every world size from 1 to ``G`` therefore sees the same global batches, step for step; a position
in the data is (epoch, step) whatever the layout (:class:`~.train_loader.TrainLoader` ``state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.derive import check_world_size
from ..config.schema import ConfigError


@dataclass(frozen=True)
class Piece:
    """Positions ``[lo, hi)`` of stream ``stream``'s ``q`` samples in each step."""

    stream: int
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class DataOrder:
    """``global_batch`` samples per step, ``streams`` canonical streams (``streams`` divides ``global_batch``)."""

    global_batch: int
    streams: int

    def __post_init__(self):
        if self.streams < 1 or self.global_batch % self.streams:
            raise ConfigError(f"data.streams={self.streams} must divide the global batch {self.global_batch} "
                              f"(0 = one stream per sample of the global batch, the default)")

    @property
    def per_stream(self) -> int:
        """``q``: samples each stream gives to each step."""
        return self.global_batch // self.streams

    def share(self, rank: int, world_size: int) -> tuple[int, int]:
        """Rank ``rank``'s positions ``[lo, hi)`` in every step's canonical order."""
        check_world_size(self.global_batch, world_size)
        return rank * self.global_batch // world_size, (rank + 1) * self.global_batch // world_size

    def pieces(self, rank: int, world_size: int) -> list[Piece]:
        """The stream pieces of rank ``rank``'s share, in canonical order."""
        lo, hi = self.share(rank, world_size)
        q, out = self.per_stream, []
        for stream in range(lo // q, (hi - 1) // q + 1):
            a, b = max(lo, stream * q) - stream * q, min(hi, (stream + 1) * q) - stream * q
            out.append(Piece(stream, a, b))
        return out

    def worker_pieces(self, rank: int, world_size: int, workers: int) -> list[list[Piece]]:
        """The rank's pieces split into contiguous groups, one per worker (fewer groups than ``workers``
        when the rank has fewer pieces: a worker with nothing to read is not started)."""
        pieces = self.pieces(rank, world_size)
        k = max(1, min(workers, len(pieces)))
        return [pieces[i * len(pieces) // k:(i + 1) * len(pieces) // k] for i in range(k)]


def micro_splits(share: int, accum: int) -> list[int]:
    """Sizes of the ``accum`` micro batches of a rank's ``share`` samples, as equal as can be."""
    return [share // accum + (1 if i < share % accum else 0) for i in range(accum)]


def micro_weight(size: int, global_batch: int, world_size: int, accum: int) -> float:
    """The factor on a micro batch's mean loss that makes DeepSpeed's gradient (mean over ranks of
    1/accum × the micro batches' gradients) the mean over the global batch's samples:
    ``size × world_size × accum / global_batch`` — exactly 1.0 when every micro batch has ``G/(W·accum)``."""
    return size * world_size * accum / global_batch
