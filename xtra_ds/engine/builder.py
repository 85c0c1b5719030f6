"""Wire a run together from its config: checks first, then process group, model, engine, loader."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import torch

from ..config import ConfigError, batch_plan, deepspeed_dict, save_config
from ..config.schema import Config
from ..data.build import train_loader_from_config, train_shards
from ..flops import peak_flops
from ..models.build import build_model, sizes_from_config
from ..objective import NextBlockLoss
from ..utils import pil_info
from .checkpoint import CheckpointManager
from .dist import init, rank_info
from .metrics import MetricsProcessor
from .schedule import param_groups
from .trainer import Trainer

log = logging.getLogger("xtra_ds.train")


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s" if not is_main else "%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", force=True)


def preflight(cfg: Config, world_size: int):
    """Everything that can fail cheaply, before any process group or model: batch split, data."""
    micro, accum = batch_plan(cfg, world_size)
    sizes = sizes_from_config(cfg)
    try:
        shards = train_shards(cfg)  # read once here; the loader reuses it
    except ConfigError:
        raise
    except Exception as e:
        where = cfg.data.storage_options.get("endpoint_url", "the default endpoint")
        raise ConfigError(f"data.train={cfg.data.train or cfg.data.sources!r} cannot be read ({type(e).__name__}: {e}). "
                          f"Is the storage reachable ({where}; set data.storage_options.endpoint_url) and are the "
                          f"credentials set (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)?") from None
    return micro, accum, sizes, shards


def precision_dtype(cfg: Config) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.deepspeed.precision]


def build_engine(cfg: Config, world_size: int):
    """(DeepSpeed engine, its config dict): the model built under ``zero.Init`` (partitioned as it
    is built: H/14 never sits whole on one rank) with AdamW as the client optimizer."""
    import deepspeed

    ds_config = deepspeed_dict(cfg, world_size)
    torch.manual_seed(cfg.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=cfg.deepspeed.zero_stage == 3):
        model = build_model(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.schedule.warmup_start_lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_config


def build(cfg: Config) -> Trainer:
    info = rank_info()
    setup_logging(info.is_main)
    micro, accum, sizes, shards = preflight(cfg, info.world_size)
    device = init(info)
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        log.info("run directory %s; imaging library: %s", run_dir, pil_info())
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank{info.rank}.pid").write_text(str(os.getpid()))

    engine, _ = build_engine(cfg, info.world_size)
    model = engine.module

    loader = train_loader_from_config(cfg, info.rank, info.world_size, sizes.img_size, shards)
    steps_per_epoch = max(1, loader.batches_per_epoch() // accum)
    total = cfg.schedule.total_steps or math.ceil(cfg.schedule.epochs * steps_per_epoch)
    warmup = cfg.schedule.warmup_steps or round(cfg.schedule.warmup_epochs * steps_per_epoch)
    dtype = precision_dtype(cfg)
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    metrics = MetricsProcessor(run_dir, enabled=info.is_main, log_every=cfg.logging.log_every, total_steps=total,
                               tb_dir=cfg.logging.tb_dir)
    if info.is_main:
        metrics.text("config", "```\n" + (run_dir / "config.yaml").read_text() + "\n```")
        n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        log.info("model %s: %.1fM parameters, %d px, k=%d; ZeRO-%d %s on %d ranks; %d steps (%d per epoch)",
                 cfg.model.name, n / 1e6, sizes.img_size, sizes.block_size, cfg.deepspeed.zero_stage,
                 cfg.deepspeed.precision, info.world_size, total, steps_per_epoch)
    ckpt = CheckpointManager(run_dir, info, device, every_steps=cfg.checkpoint.every_steps,
                             every_minutes=cfg.checkpoint.every_minutes, keep_last=cfg.checkpoint.keep_last)
    trainer = Trainer(cfg=cfg, info=info, device=device, engine=engine, loader=loader, sizes=sizes,
                      loss_fn=NextBlockLoss(cfg.objective.loss), ckpt=ckpt, metrics=metrics, accum=accum,
                      total_steps=total, warmup_steps=warmup, dtype=dtype, peak_flops=peak)
    resume = ckpt.find(cfg.checkpoint.resume)
    if resume is not None:
        trainer.restore(ckpt.load(engine, resume))
        log.info("resumed from %s at step %d (loader: epoch %d, batch %d)", resume, trainer.step,
                 trainer.loader.epoch, trainer.loader.batch)
    trainer.install_signal_handlers()
    return trainer

