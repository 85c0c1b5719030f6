"""The training loader a config describes."""

from __future__ import annotations

from ..config.loader import ConfigError, batch_plan
from ..config.schema import Config
from .loader import TrainLoader, TrainSpec
from .shards import Shard, resolve


def train_shards(cfg: Config) -> tuple[list[Shard], list[float] | None]:
    """The shards of ``data.train`` / ``data.sources`` and the sources' weights (reads the manifests)."""
    d = cfg.data
    if d.sources:
        bad = [s for s in d.sources if not isinstance(s, dict) or "url" not in s]
        if bad:
            raise ConfigError(f"data.sources: each entry needs a url (and optionally a weight), got {bad[0]!r}")
        spec, weights = [{"url": s["url"]} for s in d.sources], [float(s.get("weight", 1.0)) for s in d.sources]
    elif d.train:
        spec, weights = d.train, None
    else:
        raise ConfigError("data.train is empty: point it at a data_prep manifest, e.g. "
                          "data.train=s3://bucket/in1k/train/manifest.json (make one with data_prep/shard.py)")
    try:
        return resolve(spec, d.storage_options), weights
    except FileNotFoundError as e:
        raise ConfigError(f"data.train: {e}") from None


def train_loader_from_config(cfg: Config, rank: int, world_size: int, img_size: int,
                             shards: tuple[list[Shard], list[float] | None] | None = None) -> TrainLoader:
    """This rank's loader: micro-batches of ``optim.micro_batch_size`` from ``data.train``/``data.sources``.
    ``shards``: what :func:`train_shards` returned, if the caller has already read it."""
    d = cfg.data
    shards, weights = shards or train_shards(cfg)
    micro, _ = batch_plan(cfg, world_size)
    return TrainLoader(TrainSpec(shards, batch_size=micro, img_size=img_size, rank=rank, world_size=world_size,
                                 num_workers=d.num_workers, seed=cfg.seed, scale=tuple(d.crop_scale),
                                 ratio=tuple(d.crop_ratio), hflip=d.hflip, weights=weights, shuffle=d.shuffle_buffer,
                                 draft=d.jpeg_draft, storage_options=d.storage_options))
