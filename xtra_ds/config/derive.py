"""Numbers worked out from a config, once, and handed to every consumer.

* :func:`batch_plan` — the global batch over the ranks: micro batch and gradient accumulation;
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
    """How the global batch is split over ``world_size`` ranks and ``accum`` micro batches of at most
    ``micro_batch`` images. Rank shares differ by at most one image when ``world_size`` does not divide
    the global batch (:mod:`xtra_ds.data.order`; the loss is weighted so the gradient is the same)."""

    global_batch: int
    micro_batch: int  # most images per rank per forward/backward
    accum: int  # micro batches per optimizer step and rank
    world_size: int

    @property
    def even(self) -> bool:
        """Every micro batch of every rank holds exactly ``micro_batch`` images."""
        return self.global_batch == self.micro_batch * self.accum * self.world_size


def check_world_size(global_batch: int, world_size: int) -> None:
    """Every rank needs at least one sample of each global batch."""
    if not 1 <= world_size <= global_batch:
        raise ConfigError(f"a world of {world_size} ranks cannot split optim.global_batch_size={global_batch} "
                          f"(every rank needs at least one image per step): the run's data order and global "
                          f"batches are kept exactly by any world size from 1 to {global_batch}")


def batch_plan(optim: OptimConfig, world_size: int) -> BatchPlan:
    """The split of ``optim.global_batch_size`` over ``world_size`` ranks: the global batch is fixed, the
    micro batch (at most ``optim.micro_batch_size``) and the accumulation adapt to the world size.

    Every rank runs the same number of micro batches (ZeRO-3 gathers parameters collectively in each
    forward), and none of them may be empty: when the rank shares are uneven the smallest share must
    still fill every micro batch with one image at least. A split that cannot is refused with the micro
    batch sizes and world sizes that work (an empty micro batch crashes its rank and hangs the others)."""
    total = optim.global_batch_size
    check_world_size(total, world_size)
    largest, smallest = -(-total // world_size), total // world_size  # rank shares
    accum = -(-largest // optim.micro_batch_size)
    if accum > smallest:
        enough = -(-largest // smallest)  # the least micro batch size whose accumulation fits the smallest share
        even = [w for w in range(1, total + 1) if total % w == 0]
        raise ConfigError(
            f"optim.micro_batch_size={optim.micro_batch_size} on {world_size} ranks: rank shares of {smallest}–"
            f"{largest} images of optim.global_batch_size={total} need {accum} micro batches, and a share of "
            f"{smallest} cannot fill {accum} (an empty micro batch would crash its rank and hang the others). "
            f"Use optim.micro_batch_size={enough} or more, or a world size that divides {total} "
            f"({', '.join(map(str, even[:12]))}{', …' if len(even) > 12 else ''})")
    return BatchPlan(total, -(-largest // accum), accum, world_size)


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
