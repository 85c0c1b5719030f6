"""The training loop: one :func:`~.step.train_step` per optimizer step, checkpoints, exports, preemption."""

from __future__ import annotations

import logging
import math
import resource
import signal
import time

import torch

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..flops import mfu
from ..rundir import write_export
from .dist import any_rank
from .export import full_fp32_state
from .metrics import reconstruction_panel
from .schedule import lr_at
from .step import StepResult, train_step

log = logging.getLogger("xtra_ds.train")


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    """Holds what the loop needs; built by :func:`xtra_ds.engine.builder.build`."""

    def __init__(self, *, cfg, plan, info, device, engine, loader, run, loss_fn, ckpt, metrics, dtype, peak_flops):
        self.cfg, self.plan, self.info, self.device, self.engine, self.loader = cfg, plan, info, device, engine, loader
        self.run, self.loss_fn, self.ckpt, self.metrics = run, loss_fn, ckpt, metrics
        self.dtype, self.peak_flops = dtype, peak_flops
        self.step = 0
        self.nonfinite_total = self.nonfinite_in_row = 0
        self._stop_signal = None
        self._order_rng = torch.Generator()

    # --- lifecycle ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._stop_signal = signal.Signals(signum).name  # acted on at the next step boundary
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def client_state(self) -> dict:
        return {"step": self.step, "samples_seen": self.step * self.plan.batch.global_batch,
                "loader": self.loader.state_dict(), "nonfinite_total": self.nonfinite_total}

    def restore(self, state: dict) -> None:
        self.step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.loader.load_state_dict(state["loader"])

    def lr(self, step: int) -> float:
        s = self.cfg.schedule
        return lr_at(step, total_steps=self.plan.total_steps, warmup_steps=self.plan.warmup_steps,
                     peak_lr=self.cfg.optim.lr, warmup_start_lr=s.warmup_start_lr, final_lr=s.final_lr)

    def block_order(self, step: int) -> int | None:
        """One fixed pseudo-random block order per step, the same on every rank."""
        if self.cfg.objective.block_order == "raster":
            return None
        self._order_rng.manual_seed(self.cfg.seed * 1_000_003 + step)
        n = self.engine.module.block_orders.shape[0]
        return int(torch.randint(n, (1,), generator=self._order_rng))

    # --- the loop ---------------------------------------------------------------------------
    def train(self) -> int:
        cfg, info, plan = self.cfg, self.info, self.plan
        total, batch = plan.total_steps, plan.batch
        it = iter(self.loader)
        if self.step >= total:
            log.info("already at step %d of %d: nothing to do", self.step, total)
            return 0
        log.info("training from step %d to %d (%d images per step, %d micro-batches of %d per rank)", self.step,
                 total, batch.global_batch, batch.accum, batch.micro_batch)
        while self.step < total:
            t0 = time.perf_counter()
            wait0 = self.loader.total_wait
            result = train_step(self.engine, [next(it) for _ in range(batch.accum)], loss_fn=self.loss_fn,
                                lr=self.lr(self.step), order=self.block_order(self.step), device=self.device,
                                dtype=self.dtype)
            self.step += 1
            dt = time.perf_counter() - t0
            self.metrics.note_step_time(dt)
            self._count_nonfinite(result)
            if self.metrics.should_log(self.step):
                self._log(result, dt, self.loader.total_wait - wait0)
            if cfg.logging.recon_every and self.step % cfg.logging.recon_every == 0 and info.is_main:
                out = result.output
                panel = reconstruction_panel(result.images[0], out.preds[0][0].detach(), out.targets[0],
                                             out.block_order,
                                             plan.sizes.patch_size * plan.sizes.block_size, IMAGENET_MEAN, IMAGENET_STD)
                self.metrics.image("recon/train", panel, self.step)
            stop = any_rank(self._stop_signal is not None, self.device)
            last = self.step == total
            if self.nonfinite_in_row == 0 and (stop or last or self.ckpt.should_save(self.step)):
                self.ckpt.save(self.engine, self.step, self.client_state())
            if cfg.checkpoint.export_every and (self.step % cfg.checkpoint.export_every == 0 or last) \
                    and self.nonfinite_in_row == 0:
                self.export(final=last)
            if stop:
                log.info("stopping at step %d on %s: checkpoint saved; rerun the same command to resume",
                         self.step, self._stop_signal or "a signal to another rank")
                return 0
        return 0

    def _count_nonfinite(self, result: StepResult) -> None:
        """Count skipped or non-finite steps; three in a row stop the run."""
        if not result.skipped and math.isfinite(result.grad_norm):
            self.nonfinite_in_row = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        what = "non-finite loss; update skipped" if result.skipped else \
            "non-finite gradient norm (ZeRO-3 bf16 applied the update)"
        log.warning("step %d: %s (%d in a row, %d in all)", self.step, what, self.nonfinite_in_row,
                    self.nonfinite_total)
        if self.nonfinite_in_row >= 3:
            raise NonFiniteError(f"non-finite loss or gradient norm at steps {self.step - 2}..{self.step} "
                                 f"(3 in a row); stopping. The last complete checkpoint is untouched: lower "
                                 f"optim.lr or raise schedule.warmup_steps and resume from it.")

    def export(self, final: bool = False) -> None:
        state = full_fp32_state(self.engine.module.enc)  # collective
        if self.info.is_main:
            path = write_export(self.run.root, self.step, state, {
                "samples_seen": self.step * self.plan.batch.global_batch, "model": self.cfg.model.name,
                "sizes": self.plan.sizes.__dict__, "config": "../../config.yaml", "final": final})
            log.info("exported encoder to %s", path)

    def _log(self, result: StepResult, dt: float, wait: float) -> None:
        global_batch = self.plan.batch.global_batch
        ips = global_batch / dt
        scalars = {"train/loss": result.loss, "train/lr": self.lr(self.step - 1), "train/grad_norm": result.grad_norm,
                   "train/samples_seen": self.step * global_batch, "train/epoch": self.step / self.plan.steps_per_epoch,
                   "perf/images_per_sec": ips, "perf/step_time": dt, "perf/data_wait_fraction": wait / dt,
                   "data/corrupt_skipped": self.loader.corrupt_skipped, "train/nonfinite_skipped": self.nonfinite_total}
        if self.peak_flops:
            scalars["perf/mfu"] = mfu(ips / self.info.world_size, self.plan.sizes, self.peak_flops)
        if torch.cuda.is_available():
            scalars["perf/peak_memory"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            scalars["perf/peak_memory"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
        self.metrics.log(self.step, scalars)
