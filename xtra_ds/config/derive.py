"""Numbers worked out from a config, once, and handed to every consumer.

* :func:`batch_plan` — micro batch × gradient accumulation × world size = global batch;
* :func:`sizes_from_config` — the model's shapes (:class:`~xtra_ds.models.XTRASizes`);
* :func:`derive` — the split, the sizes and the run's length in optimizer steps (:class:`RunPlan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..models.xtra import XTRASizes, model_sizes
from .schema import Config, ConfigError, ModelConfig, ObjectiveConfig, OptimConfig


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split: ``micro_batch × accum × world_size == global_batch``."""

    global_batch: int
    micro_batch: int  # images per rank per forward/backward
    accum: int  # micro batches per optimizer step and rank
    world_size: int


def batch_plan(optim: OptimConfig, world_size: int) -> BatchPlan:
    """The split of ``optim.global_batch_size`` over ``world_size`` ranks; the error names the fix."""
    total, micro = optim.global_batch_size, optim.micro_batch_size
    if total % (micro * world_size):
        per_rank = total / world_size
        smaller = [d for d in range(micro, 0, -1) if total % (d * world_size) == 0][:1]
        raise ConfigError(
            f"optim.global_batch_size={total} cannot be split into micro batches of {micro} over {world_size} ranks "
            f"({total} / ({micro} × {world_size}) is not an integer). Set optim.global_batch_size to a multiple of "
            f"{micro * world_size} (e.g. {total // (micro * world_size) * micro * world_size or micro * world_size})"
            + (f", or optim.micro_batch_size={smaller[0]}" if smaller and per_rank.is_integer() else "") + ".")
    return BatchPlan(total, micro, total // (micro * world_size), world_size)


def sizes_from_config(model: ModelConfig, objective: ObjectiveConfig) -> XTRASizes:
    """The model's shapes: the named variant with the config's size overrides."""
    over = dict(model.overrides)
    over.update(block_size=model.block_size, heads_ahead=objective.heads_ahead,
                num_block_orders=objective.num_block_orders)
    if model.img_size:
        over["img_size"] = model.img_size
    if model.pred_depth:
        over["pred_depth"] = model.pred_depth
    if model.head_hidden:
        over["head_hidden"] = model.head_hidden
    return model_sizes(model.name, **over)


@dataclass(frozen=True)
class RunPlan:
    """Everything a run derives from its config, its world size and its data."""

    sizes: XTRASizes
    batch: BatchPlan
    samples_per_epoch: int  # the unit of schedule.epochs / warmup_epochs and of train/epoch
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def derive(cfg: Config, batch: BatchPlan, data_samples: int) -> RunPlan:
    """The run's plan for the batch split ``batch`` (:func:`batch_plan`). ``data_samples``: usable
    samples in one pass over the training data, the epoch when ``data.samples_per_epoch`` is 0."""
    samples = cfg.data.samples_per_epoch or data_samples
    steps_per_epoch = max(1, samples // batch.global_batch)
    schedule = cfg.schedule
    total = schedule.total_steps or math.ceil(schedule.epochs * steps_per_epoch)
    warmup = schedule.warmup_steps or round(schedule.warmup_epochs * steps_per_epoch)
    return RunPlan(sizes_from_config(cfg.model, cfg.objective), batch, samples, steps_per_epoch, total, warmup)
