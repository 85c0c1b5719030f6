"""The training data a config describes: its shards, and this rank's loader."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config.schema import ConfigError, DataConfig
from .quarantine import quarantine, read_quarantine
from .shards import Shard, resolve
from .train_loader import TrainLoader, TrainSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    """The shards of ``data.train`` / ``data.sources`` (manifests read once) and the sources' weights."""

    shards: list[Shard]
    weights: list[float] | None

    @property
    def samples_per_pass(self) -> int:
        """Usable samples in one pass over the data: Σ weight × samples of each source. Quarantined samples
        count (the epoch of ``schedule.epochs``, and so the run's length and learning rates, stay what they were
        when keys are quarantined mid-run); the loader's own epochs leave them out."""
        per_source: dict[int, int] = {}
        for s in self.shards:
            per_source[s.source] = per_source.get(s.source, 0) + s.num_samples + len(s.quarantined)
        return round(sum(n * (self.weights[src] if self.weights else 1.0) for src, n in per_source.items()))


def training_data(data: DataConfig) -> TrainingData:
    """Read the manifests (or stats files) of the training sources."""
    if data.sources:
        bad = [s for s in data.sources if not isinstance(s, dict) or "url" not in s]
        if bad:
            raise ConfigError(f"data.sources: each entry needs a url (and optionally a weight), got {bad[0]!r}")
        spec, weights = [{"url": s["url"]} for s in data.sources], [float(s.get("weight", 1.0)) for s in data.sources]
    elif data.train:
        spec, weights = data.train, None
    else:
        raise ConfigError("data.train is empty: point it at a data_prep manifest, e.g. "
                          "data.train=s3://bucket/in1k/train/manifest.json (make one with data_prep/shard.py)")
    try:
        shards = resolve(spec, data.storage_options)
    except FileNotFoundError as e:
        raise ConfigError(f"data.train: {e}") from None
    if data.quarantine:
        shards = _quarantined(shards, data.quarantine, data.storage_options)
    return TrainingData(shards, weights)


def _quarantined(shards: list[Shard], url: str, storage_options: dict) -> list[Shard]:
    """``shards`` without the keys of the quarantine file ``url`` (:mod:`.quarantine`), said in one log line."""
    try:
        entries = read_quarantine(url, storage_options)
    except FileNotFoundError:
        raise ConfigError(f"data.quarantine={url}: no such file (a file of sample keys, one per line; "
                          f"launchers/replay.py --write-quarantine writes one), or data.quarantine= for none") from None
    except Exception as e:  # storage unreachable, no credentials
        raise ConfigError(f"data.quarantine={url} cannot be read ({type(e).__name__}: {e})") from None
    shards, found, read = quarantine(shards, entries, storage_options)
    log.info("quarantine %s: %d keys excluded (%d of them in the training data; %d shard stats files read)", url,
             len(entries), found, read)
    return shards


def train_spec(data: DataConfig, source: TrainingData, *, seed: int, rank: int, world_size: int,
               global_batch: int, img_size: int) -> TrainSpec:
    """What rank ``rank``'s loader reads: its share of every global batch of ``global_batch`` images from
    ``source``, as ``data.*`` says."""
    return TrainSpec(source.shards, global_batch=global_batch, img_size=img_size, rank=rank, world_size=world_size,
                     num_workers=data.num_workers, streams=data.streams, seed=seed, scale=tuple(data.crop_scale),
                     ratio=tuple(data.crop_ratio), hflip=data.hflip, weights=source.weights,
                     shuffle=data.shuffle_buffer, draft=data.jpeg_draft, storage_options=data.storage_options,
                     max_member_bytes=data.max_sample_bytes, on_order_change=data.on_order_change)


def train_loader(data: DataConfig, source: TrainingData, *, pin_memory: bool = False, **kw) -> TrainLoader:
    """This rank's loader (:func:`train_spec`'s arguments); ``pin_memory``: its batches in page-locked memory
    (for a GPU: the copy to the device runs without the host waiting for it)."""
    return TrainLoader(train_spec(data, source, **kw), pin_memory=pin_memory)


def planned_order(data: DataConfig, *, seed: int, global_batch: int, source: TrainingData | None = None) -> dict:
    """What defines the data order of a run with these settings (:meth:`TrainSpec.identity`), as a resume will
    compare it; without ``source`` (data not read) the shard list is left out."""
    weights = [float(s.get("weight", 1.0)) for s in data.sources] if data.sources else None
    spec = train_spec(data, source or TrainingData([], weights), seed=seed, rank=0, world_size=1,
                      global_batch=global_batch, img_size=1)
    order = spec.identity()
    if source is None:
        del order["shards"]
    return order
