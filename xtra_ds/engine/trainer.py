"""The training loop: one ``train_step`` per optimizer step, checkpoints, exports, preemption."""

from __future__ import annotations

import logging
import math
import resource
import signal
import time

import torch

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device
from ..flops import mfu
from .dist import any_rank, mean_over_ranks
from .export import full_fp32_state, write_export
from .metrics import reconstruction_panel
from .schedule import lr_at

log = logging.getLogger("xtra_ds.train")


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    """Holds what the loop needs; built by :func:`xtra_ds.engine.builder.build`."""

    def __init__(self, *, cfg, info, device, engine, loader, sizes, loss_fn, ckpt, metrics, accum, total_steps,
                 warmup_steps, dtype, peak_flops):
        self.cfg, self.info, self.device, self.engine, self.loader = cfg, info, device, engine, loader
        self.sizes, self.loss_fn, self.ckpt, self.metrics = sizes, loss_fn, ckpt, metrics
        self.accum, self.total_steps, self.warmup_steps, self.dtype = accum, total_steps, warmup_steps, dtype
        self.peak_flops = peak_flops
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
        return {"step": self.step, "samples_seen": self.step * self.cfg.optim.global_batch_size,
                "loader": self.loader.state_dict(), "nonfinite_total": self.nonfinite_total}

    def restore(self, state: dict) -> None:
        self.step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.loader.load_state_dict(state["loader"])

    def lr(self, step: int) -> float:
        s = self.cfg.schedule
        return lr_at(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, peak_lr=self.cfg.optim.lr,
                     warmup_start_lr=s.warmup_start_lr, final_lr=s.final_lr)

    def block_order(self, step: int) -> int | None:
        """One fixed pseudo-random block order per step, the same on every rank."""
        if self.cfg.objective.block_order == "raster":
            return None
        self._order_rng.manual_seed(self.cfg.seed * 1_000_003 + step)
        n = self.engine.module.block_orders.shape[0]
        return int(torch.randint(n, (1,), generator=self._order_rng))

    # --- one optimizer step -----------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict:
        engine, order = self.engine, self.block_order(self.step)
        losses, bad = [], False
        for batch in micro_batches:
            x = normalize_on_device(batch["images"].to(self.device, non_blocking=True), self.dtype)
            out = engine(x, order)
            loss = self.loss_fn(out.preds, out.targets)
            if any_rank(not torch.isfinite(loss).item(), self.device):
                # Skip this update: back-propagate an exact zero through a clean forward (every rank
                # must run the same collectives), and step with lr 0 below — parameters stay as they were.
                bad = True
                out_z = engine(torch.zeros_like(x), order)
                engine.backward(self.loss_fn(out_z.preds, out_z.targets) * 0.0)
            else:
                engine.backward(loss)
                losses.append(loss.detach().float())
            if engine.is_gradient_accumulation_boundary():
                lr = 0.0 if bad else self.lr(self.step)
                for g in engine.optimizer.param_groups:
                    g["lr"] = lr
            engine.step()
        gnorm = engine.get_global_grad_norm()
        gnorm = float(gnorm) if gnorm is not None else float("nan")
        if bad or not math.isfinite(gnorm):
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
        else:
            self.nonfinite_in_row = 0
        loss = mean_over_ranks(torch.stack(losses).mean().item() if losses else float("nan"), self.device)
        return {"loss": loss, "grad_norm": gnorm, "lr": self.lr(self.step), "bad": bad, "last": (x, out, order)}

    # --- the loop ---------------------------------------------------------------------------
    def train(self) -> int:
        cfg, info = self.cfg, self.info
        gb = cfg.optim.global_batch_size
        it = iter(self.loader)
        if self.step >= self.total_steps:
            log.info("already at step %d of %d: nothing to do", self.step, self.total_steps)
            return 0
        log.info("training from step %d to %d (%d images per step, %d micro-batches of %d per rank)", self.step,
                 self.total_steps, gb, self.accum, cfg.optim.micro_batch_size)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            wait0 = self.loader.total_wait
            stats = self.train_step([next(it) for _ in range(self.accum)])
            self.step += 1
            dt = time.perf_counter() - t0
            self.metrics.note_step_time(dt)
            if self.nonfinite_in_row >= 1:
                what = "non-finite loss; update skipped" if stats["bad"] else \
                    "non-finite gradient norm (ZeRO-3 bf16 applied the update)"
                log.warning("step %d: %s (%d in a row, %d in all)", self.step, what, self.nonfinite_in_row,
                            self.nonfinite_total)
                if self.nonfinite_in_row >= 3:
                    raise NonFiniteError(f"non-finite loss or gradient norm at steps {self.step - 2}..{self.step} "
                                         f"(3 in a row); stopping. The last complete checkpoint is untouched: lower "
                                         f"optim.lr or raise schedule.warmup_steps and resume from it.")
            if self.metrics.should_log(self.step):
                self._log(stats, dt, self.loader.total_wait - wait0, gb)
            if cfg.logging.recon_every and self.step % cfg.logging.recon_every == 0 and info.is_main:
                x, out, _ = stats["last"]
                panel = reconstruction_panel(x[0], out.preds[0][0].detach(), out.targets[0], out.block_order,
                                             self.sizes.patch_size * self.sizes.block_size, IMAGENET_MEAN, IMAGENET_STD)
                self.metrics.image("recon/train", panel, self.step)
            stop = any_rank(self._stop_signal is not None, self.device)
            last = self.step == self.total_steps
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

    def export(self, final: bool = False) -> None:
        state = full_fp32_state(self.engine.module, prefix="enc.")  # collective
        if self.info.is_main:
            path = write_export(self.cfg.run_dir, self.step, state, {
                "samples_seen": self.step * self.cfg.optim.global_batch_size, "model": self.cfg.model.name,
                "sizes": self.sizes.__dict__, "config": "../../config.yaml",
                "final": final})
            log.info("exported encoder to %s", path)

    def _log(self, stats, dt, wait, gb) -> None:
        ips = gb / dt
        scalars = {"train/loss": stats["loss"], "train/lr": stats["lr"], "train/grad_norm": stats["grad_norm"],
                   "train/samples_seen": self.step * gb,
                   "train/epoch": self.step / self.steps_per_epoch,
                   "perf/images_per_sec": ips, "perf/step_time": dt, "perf/data_wait_fraction": wait / dt,
                   "data/corrupt_skipped": self.loader.corrupt_skipped, "train/nonfinite_skipped": self.nonfinite_total}
        if self.peak_flops:
            scalars["perf/mfu"] = mfu(ips / self.info.world_size, self.sizes, self.peak_flops)
        if torch.cuda.is_available():
            scalars["perf/peak_memory"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            scalars["perf/peak_memory"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
        self.metrics.log(self.step, scalars)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.loader.batches_per_epoch() // self.accum)
