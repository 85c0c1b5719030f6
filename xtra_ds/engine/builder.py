"""Wire a run together from its config: checks first, then process group, model, engine, loader."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from ..config import ConfigError, RunPlan, batch_plan, derive, save_config
from ..config.deepspeed import deepspeed_dict
from ..config.schema import Config, ModelConfig
from ..config.validate import check_zero_plus_plus
from ..costs import check_fits, parameter_numels, peak_flops
from ..data.build import TrainingData, train_loader, training_data
from ..data.format import pil_info
from ..models.xtra import XTRA, XTRASizes
from ..objective import NextBlockLoss
from ..rundir import CONFIG, LOGS, PIDS, RunDir, remove_export_tmps
from ..storage import is_secret_name, load_env_file
from .checkpoint import CheckpointManager, saved_step
from .dist import init, rank_info
from .logs import log_to_file, setup_logging
from .metrics import MetricsProcessor
from .schedule import param_groups
from .step import SkipGuard
from .stop import StopSignals
from .trainer import Trainer
from .watchdog import process_group_timeout

log = logging.getLogger("xtra_ds.train")


def credentials(cfg: Config, is_main: bool) -> None:
    """Load ``env_file`` into this rank's environment, and warn (rank 0) about credentials in DeepSpeed's
    ``.deepspeed_env``: its runner turns every line into ``export K=V`` in the command it logs at INFO and
    runs over pdsh, where ``ps`` on every node shows it."""
    if cfg.env_file:
        try:
            names = load_env_file(cfg.env_file)
        except (OSError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if is_main:
            log.info("env_file %s: set %s", cfg.env_file, ", ".join(names) or "nothing")
    if not is_main:
        return
    for folder in (Path.cwd(), Path.home()):
        env = folder / ".deepspeed_env"
        try:
            names = [line.split("=", 1)[0].strip() for line in env.read_text().splitlines() if "=" in line]
        except OSError:
            continue
        secret = [n for n in names if is_secret_name(n)]
        if secret:
            log.warning("%s sets %s: DeepSpeed's runner prints every line of it (export %s=…) in the command it "
                        "logs and runs on each node, where `ps` shows it. Keep credentials in ~/.aws/credentials, "
                        "AWS_PROFILE or an instance role, or in a file each rank reads itself (env_file=PATH); "
                        "docs/TRAINING.md, 'Credentials'", env, ", ".join(secret), secret[0])


def preflight(cfg: Config, world_size: int) -> tuple[RunPlan, TrainingData]:
    """Everything that can fail cheaply, before any process group or model: the run directory, the batch
    split, the data."""
    if "://" in cfg.run_dir and not cfg.run_dir.startswith("file://"):
        raise ConfigError(f"run_dir={cfg.run_dir}: training writes its run directory through the filesystem "
                          f"(DeepSpeed saves checkpoints to paths); use a directory every node sees (e.g. a shared "
                          f"filesystem, run_dir=/shared/runs/h14). The eval worker and the tools also read s3:// "
                          f"copies of a run directory.")
    batch = batch_plan(cfg.optim, world_size)
    from deepspeed.accelerator import get_accelerator

    ranks_per_node = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    check_zero_plus_plus(cfg.deepspeed, world_size, ranks_per_node, get_accelerator().device_name())
    try:
        data = training_data(cfg.data)  # read once here; the loader reuses it
    except ConfigError:
        raise
    except Exception as e:
        where = cfg.data.storage_options.get("endpoint_url", "the default endpoint")
        raise ConfigError(f"data.train={cfg.data.train or cfg.data.sources!r} cannot be read "
                          f"({type(e).__name__}: {e}). "
                          f"Is the storage reachable ({where}; set data.storage_options.endpoint_url) and are the "
                          f"credentials set (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)?") from None
    return derive(cfg, batch, data.samples_per_pass), data


def build_model(model_cfg: ModelConfig, sizes: XTRASizes) -> XTRA:
    """The network of ``model.*`` with the derived ``sizes``."""
    model = XTRA(sizes, drop_path=model_cfg.drop_path, attention=model_cfg.attention)
    model.set_grad_checkpointing(model_cfg.grad_checkpointing)
    return model


def build_engine(cfg: Config, plan: RunPlan):
    """(DeepSpeed engine, its config dict): the model built under ``zero.Init`` (partitioned as it
    is built: H/14 never sits whole on one rank) with AdamW as the client optimizer."""
    import deepspeed

    ds_config = deepspeed_dict(cfg, plan.batch)
    torch.manual_seed(cfg.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=cfg.deepspeed.zero_stage == 3):
        model = build_model(cfg.model, plan.sizes)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.schedule.warmup_start_lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    # DeepSpeed's ZeRO and bf16/fp16 optimizers skip a non-finite gradient norm themselves; at stage 0 in
    # fp32 or autocast the engine hands the gradients straight to AdamW, so the guard checks them there.
    unwrapped = cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision in ("fp32", "bf16-mixed")
    guard = SkipGuard(optimizer, check_grads=unwrapped)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.skip_guard = guard  # train_step skips a step through it (non-finite loss or gradients)
    return engine, ds_config


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own randomness (stochastic depth, dropout): different on every rank, fixed
    by the run's seed. What must agree across ranks (init, data order, block order) is seeded elsewhere,
    from ``seed`` itself."""
    return int.from_bytes(hashlib.sha256(f"xtra-ds/{seed}/rank/{rank}".encode()).digest()[:8], "little") >> 1


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch (every device), numpy and ``random`` for this rank (:func:`rank_seed`). A resume then
    restores each rank's saved generators over it (``rng_rank{R}.pt``)."""
    import random

    import numpy as np

    s = rank_seed(seed, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def build(cfg: Config, stop: StopSignals | None = None) -> Trainer:
    """The trainer of ``cfg`` on this rank. ``stop``: the launcher's stop-signal handlers, installed before
    its imports (a preemption notice during start-up is kept, not fatal); installed here otherwise."""
    stop = stop or StopSignals().install()
    info = rank_info()
    setup_logging(info.is_main, cfg.logging.verbose)
    credentials(cfg, info.is_main)
    plan, data = preflight(cfg, info.world_size)
    run = RunDir(cfg.run_dir)
    ckpt = CheckpointManager(run, info, cfg.checkpoint)
    resume = ckpt.find()  # before anything is written: a refused start leaves the run directory as it was
    device = init(info, process_group_timeout(cfg.incidents.hang_timeout_s))  # above the hang watchdog's
    ckpt.device = device
    ckpt.abandon_after(resume)  # a rollback or a start over: the old timeline's later steps are set aside
    if info.is_main:
        save_config(cfg, run.local_path(CONFIG))
        log.info("run directory %s; imaging library: %s", run.url, pil_info())
        for tmp in remove_export_tmps(run):
            log.info("removed %s, left by a run killed while exporting", tmp)
    pid_file = run.local_path(PIDS, f"rank{info.rank}.pid")
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    log_to_file(run.local_path(LOGS, f"rank{info.rank}.log"), info.is_main)

    check_fits(cfg, plan, sum(parameter_numels(plan.sizes)), device)
    engine, _ = build_engine(cfg, plan)
    seed_rank(cfg.seed, info.rank)  # after the init, which every rank draws alike
    loader = train_loader(cfg.data, data, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                          global_batch=plan.batch.global_batch, img_size=plan.sizes.img_size,
                          pin_memory=device.type == "cuda")
    # TensorBoard forgets what the run logged after the step it starts from (a crash after the last
    # checkpoint, or an abandoned timeline): the charts show one timeline
    first = saved_step(resume) + 1 if resume is not None else 1
    metrics = MetricsProcessor(run, cfg.logging, enabled=info.is_main, total_steps=plan.total_steps,
                               purge_step=first if resume is not None or cfg.checkpoint.start_over else None)
    if info.is_main:
        metrics.text("config", "```\n" + run.read_text(CONFIG) + "\n```")
        n = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        log.info("model %s: %.1fM parameters, %d px, k=%d, %s attention; ZeRO-%d %s on %d ranks; %d steps "
                 "(%d per epoch of %d samples)", cfg.model.name, n / 1e6, plan.sizes.img_size, plan.sizes.block_size,
                 cfg.model.attention, cfg.deepspeed.zero_stage, cfg.deepspeed.precision, info.world_size,
                 plan.total_steps, plan.steps_per_epoch, plan.samples_per_epoch)
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    trainer = Trainer(cfg=cfg, plan=plan, info=info, device=device, engine=engine, loader=loader, run=run,
                      loss_fn=NextBlockLoss(cfg.objective.loss), ckpt=ckpt, metrics=metrics, peak_flops=peak,
                      stop=stop)
    if resume is not None:
        trainer.restore(ckpt.load(engine, resume))
        log.info("resumed from %s at step %d (data: epoch %d, step %d of it)", resume, trainer.step,
                 trainer.loader.epoch, trainer.loader.step)
    return trainer
