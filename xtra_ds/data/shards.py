"""Shard lists and the per-epoch plan: which samples each canonical stream reads, in which order.

The plan is a pure function of (shard list, seed, epoch, number of streams, samples per step):

1. the epoch's shard order is a seeded shuffle (sources with weights ≠ 1 repeat or subsample
   their shards, also seeded);
2. the concatenated sample sequence is cut into ``streams`` equal *canonical streams* (a stream may
   start or end inside a shard); each step takes ``per_step`` samples of every stream, so every
   stream's length is a whole number of steps. What does not divide — fewer than
   ``streams × (per_step + 1)`` samples per epoch — is left out, and reported;
3. each stream is read in chunks of ``shuffle`` samples, each chunk permuted with its own seed.
   A position in a stream therefore maps to (chunk, offset) with no history, which is what
   makes resume exact and cheap: skip whole shards, read one chunk. :meth:`EpochPlan.chunk_order`,
   :meth:`~EpochPlan.read_index` and :meth:`~EpochPlan.locate` are that mapping, the one the loader
   reads by and the provenance tools (:mod:`.provenance`) replay.

Which rank and worker reads which stream is :mod:`.order`'s business; nothing here depends on it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from dataclasses import dataclass

from ..storage import read_json
from .format import MANIFEST, usable_shards
from .remote import filesystem


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int  # usable samples (excluded keys not counted)
    excluded: frozenset = frozenset()  # keys readers skip: the manifest's duplicates, and ``quarantined``
    source: int = 0
    quarantined: frozenset = frozenset()  # the keys of ``excluded`` that data.quarantine excludes (.quarantine)


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def read_manifest(spec: str, storage_options: dict | None = None) -> dict | None:
    """The data_prep manifest ``spec`` names (``…/manifest.json`` or its folder); ``None`` when
    ``spec`` is a brace pattern of shard URLs."""
    fs, path = filesystem(spec, storage_options)
    if not (spec.endswith(".json") or fs.isdir(path)):
        return None
    try:
        return read_json(fs, path if spec.endswith(".json") else path.rstrip("/") + "/" + MANIFEST)
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {spec} (expected {MANIFEST}; made by data_prep)") from None


def resolve(spec: str | list, storage_options: dict | None = None) -> list[Shard]:
    """Shards from a manifest URL (``…/manifest.json`` or its folder), a brace pattern
    (``…/train-{000000..000099}.tar``; sample counts are then read from the shards' stats files),
    or a list of ``{"url": …, "weight": w}`` sources (weights are applied by :func:`epoch_shards`)."""
    if isinstance(spec, list):
        out = []
        for i, src in enumerate(spec):
            out += [Shard(s.url, s.num_samples, s.excluded, i) for s in resolve(src["url"], storage_options)]
        return out
    manifest = read_manifest(spec, storage_options)
    if manifest is not None:
        base = spec[: spec.rstrip("/").rfind("/")] if spec.endswith(".json") else spec.rstrip("/")
        return [Shard(f"{base}/{s['name']}", s["num_usable"], frozenset(s.get("excluded", ())))
                for s in usable_shards(manifest)]
    urls = _expand_braces(spec)
    out = []
    for url in urls:  # counts from each shard's stats file (data_prep writes one beside every tar)
        try:
            n = shard_stats(url, storage_options)["num_samples"]
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no .stats.json beside it; pass the data_prep manifest.json instead, "
                                    f"which knows every shard's sample count") from None
        out.append(Shard(url, n))
    return out


def stats_url(shard_url: str) -> str:
    """The stats file data_prep writes beside a shard (``…-000007.tar`` -> ``…-000007.stats.json``): its sample
    count and its samples in tar order (``samples: [[key, sha256, source], …]``; absent in older outputs)."""
    return shard_url.removesuffix(".tar") + ".stats.json"


def shard_stats(url: str, storage_options: dict | None = None) -> dict:
    """The stats file of shard ``url`` (:func:`stats_url`), read."""
    fs, path = filesystem(stats_url(url), storage_options)
    return read_json(fs, path)


def shard_urls(spec: str, storage_options: dict | None = None) -> tuple[list[str], frozenset]:
    """(shard URLs, keys to skip) of a data_prep output, for webdataset or any other tar reader::

        urls, duplicates = shard_urls("s3://bucket/in1k/train/manifest.json")
        use_fsspec_in_webdataset()            # once per process, for s3:// and other fsspec URLs
        ds = wds.WebDataset(urls, shardshuffle=False).select(lambda s: s["__key__"] not in duplicates)

    The keys to skip are the cross-shard exact duplicates the manifest lists (they stay in their tars)."""
    shards = resolve(spec, storage_options)
    return [s.url for s in shards], frozenset().union(*(s.excluded for s in shards))


def use_fsspec_in_webdataset(storage_options: dict | None = None, schemes=("s3", "s3a", "gs", "gcs")) -> None:
    """Let ``webdataset`` open ``schemes`` URLs through fsspec with these options (and the endpoint from
    the environment, as every tool here does). webdataset keeps its openers per process: call this in
    each process that reads, DataLoader workers included (e.g. in a ``worker_init_fn``)."""
    import webdataset

    def opener(url, mode="rb", bufsize=8192, **_):
        fs, path = filesystem(url, storage_options)
        return fs.open(path, mode)

    for scheme in schemes:
        webdataset.gopen_schemes[scheme] = opener


def fingerprint(shards: list[Shard]) -> str:
    """What identifies the shard list in the data order: a hash of the shards and their sample counts, and,
    when ``data.quarantine`` excludes keys, which ones — named, so that a refused resume says it was the
    quarantine (``…+quarantine(2 keys 1f2e3d4c)``). Without a quarantine it is what it always was."""
    h = hashlib.sha256(json.dumps([(s.url, s.num_samples + len(s.quarantined)) for s in shards]).encode())
    quarantined = sorted((s.url, sorted(s.quarantined)) for s in shards if s.quarantined)
    if not quarantined:
        return h.hexdigest()[:16]
    n = sum(len(keys) for _, keys in quarantined)
    q = hashlib.sha256(json.dumps(quarantined).encode()).hexdigest()[:8]
    return f"{h.hexdigest()[:16]}+quarantine({n} key{'s' if n != 1 else ''} {q})"


def epoch_shards(shards: list[Shard], weights: list[float] | None, seed: int, epoch: int) -> list[Shard]:
    """This epoch's shard order: weights repeat (w > 1) or subsample (w < 1) each source's shards."""
    rng = random.Random(f"{seed}-{epoch}-shards")
    chosen = []
    for src in sorted({s.source for s in shards}):
        mine = [s for s in shards if s.source == src]
        w = 1.0 if not weights else weights[src]
        whole, frac = int(w), w - int(w)
        chosen += mine * whole
        chosen += rng.sample(mine, round(frac * len(mine)))
    rng.shuffle(chosen)
    return chosen


@dataclass(frozen=True)
class Segment:
    shard: Shard
    skip: int  # usable samples to skip at the start of the shard
    take: int


class EpochPlan:
    """The canonical streams of one epoch, and which sample each position of a stream holds."""

    def __init__(self, shards: list[Shard], *, num_streams: int, per_step: int, seed: int, epoch: int,
                 shuffle: int):
        self.shards = shards
        self.starts = [0]
        for s in shards:
            self.starts.append(self.starts[-1] + s.num_samples)
        self.total = self.starts[-1]
        self.steps = self.total // num_streams // per_step
        self.stream_len = self.steps * per_step
        self.num_streams = num_streams
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.left_out = self.total - self.stream_len * num_streams

    def _first(self, stream: int) -> int:
        """The epoch's sample number (shards concatenated) where ``stream`` begins."""
        return stream * (self.total // self.num_streams)

    def segments(self, stream: int, begin: int = 0) -> list[Segment]:
        """The shard pieces of ``stream`` from its ``begin``-th sample (in read order) to its end."""
        lo = self._first(stream) + begin
        hi = self._first(stream) + self.stream_len
        out = []
        i = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            shard_lo = self.starts[i]
            take = min(hi, self.starts[i + 1]) - lo
            if take > 0:
                out.append(Segment(self.shards[i], lo - shard_lo, take))
            lo += max(take, 0)
            i += 1
        return out

    # --- position -> sample: the one mapping the loader and the provenance tools share -------------
    def chunk_order(self, stream: int, chunk: int) -> list[int]:
        """The in-stream shuffle of chunk ``chunk`` of ``stream``: position ``j`` of the chunk holds the chunk's
        ``order[j]``-th sample in read order. Seeded by (seed, epoch, stream, chunk) alone, so any position's
        sample is known without reading what came before it."""
        order = list(range(min(self.shuffle, self.stream_len - chunk * self.shuffle)))
        random.Random(f"{self.seed}-{self.epoch}-{stream}-{chunk}").shuffle(order)
        return order

    def read_index(self, stream: int, pos: int) -> int:
        """Which of ``stream``'s samples, counted in read order (:meth:`segments`), position ``pos`` holds."""
        chunk, at = divmod(pos, self.shuffle)
        return chunk * self.shuffle + self.chunk_order(stream, chunk)[at]

    def locate(self, stream: int, index: int) -> tuple[Shard, int]:
        """(shard, its usable sample number) of ``stream``'s ``index``-th sample in read order: the sample
        :meth:`segments` delivers there (duplicates the manifest excludes are not counted)."""
        at = self._first(stream) + index
        i = bisect.bisect_right(self.starts, at) - 1  # the last shard starting at or before it (empty ones skipped)
        return self.shards[i], at - self.starts[i]
