"""The training loop: one :func:`~.step.train_step` per optimizer step, checkpoints, exports, preemption."""

from __future__ import annotations

import logging
import math
import resource
import time

import numpy as np
import torch

from ..costs import mfu
from ..data.provenance import DIGEST_METRIC, keys_digest
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models.attention import AttentionHealth
from ..rundir import STATE, CheckpointRecord, ExportMeta, TrainingState, write_export
from .dist import any_rank, gather_over_ranks
from .export import full_fp32_state
from .faults import crash_point, fault_at
from .incidents import SpikeDetector, gather_samples, worst_first, write_incident
from .metrics import StragglerWatch, line_plot, reconstruction_panel
from .schedule import lr_at
from .step import StepResult, micro_batches, train_step
from .stop import StopSignals
from .watchdog import HangWatchdog

log = logging.getLogger("xtra_ds.train")


class NonFiniteError(RuntimeError):
    pass


class Trainer:
    """Holds what the loop needs; built by :func:`xtra_ds.engine.builder.build`."""

    def __init__(self, *, cfg, plan, info, device, engine, loader, run, loss_fn, ckpt, metrics, peak_flops,
                 stop: StopSignals):
        self.cfg, self.plan, self.info, self.device, self.engine, self.loader = cfg, plan, info, device, engine, loader
        self.run, self.loss_fn, self.ckpt, self.metrics = run, loss_fn, ckpt, metrics
        self.peak_flops, self.stop = peak_flops, stop
        self.step = 0
        self.nonfinite_total = self.nonfinite_in_row = 0
        self.spikes = SpikeDetector(cfg.incidents.spike_z, cfg.incidents.spike_window)
        self.stragglers = StragglerWatch()
        self._order_rng = torch.Generator()

    # --- lifecycle ------------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {"step": self.step, "samples_seen": self.step * self.plan.batch.global_batch,
                "loader": self.loader.state_dict(), "nonfinite_total": self.nonfinite_total}

    def checkpoint_record(self) -> CheckpointRecord:
        """What a resume on another allocation needs to know, readable without loading anything
        (``COMPLETE``; ``launchers/inspect_checkpoint.py``); the checkpoint manager adds step, world size, time."""
        batch, loader, ds = self.plan.batch, self.loader.state_dict(), self.cfg.deepspeed
        return CheckpointRecord(
            layout={"world_size": batch.world_size, "micro_batch": batch.micro_batch, "accum": batch.accum,
                    "loader_workers": loader["num_workers"]},
            global_batch=batch.global_batch, zero_stage=ds.zero_stage, precision=ds.precision,
            total_steps=self.plan.total_steps,
            data={k: loader[k] for k in ("epoch", "step", "steps_per_epoch", "global_batch", "streams", "seed",
                                         "shards", "weights", "shuffle")})

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
        total = plan.total_steps
        if any_rank(self.stop.received is not None, self.device):
            log.info("stopping before the first step on %s (a signal during start-up): nothing new to save; rerun the "
                     "same command to %s", self.stop.received or "a signal to another rank",
                     "resume" if self.step else "start")
            self.record_state(TrainingState.STOPPED, f"stop signal ({self.stop.received or 'another rank'}) during "
                                                     f"start-up")
            return 0
        if self.step >= total:
            log.info("already at step %d of %d: nothing to do", self.step, total)
            self.record_state(TrainingState.DONE)
            return 0
        self.record_state(TrainingState.RUNNING)
        inc = cfg.incidents
        self.watchdog = HangWatchdog(self.run.local_path(), info.rank, info.world_size,
                                     timeout_s=inc.hang_timeout_s, floor_s=inc.hang_floor_s).start(self.step)
        try:
            status, reason = self._loop()
        finally:  # an exception on the way out must not leave the watchdog to end the process later
            self.watchdog.stop()
        self.record_state(status, reason)
        return 0

    def _loop(self) -> tuple[str, str]:
        cfg, info = self.cfg, self.info
        total, batch = self.plan.total_steps, self.plan.batch
        it = iter(self.loader)
        log.info("training from step %d to %d (%d images per step; per rank %d micro-batches of %s%d)", self.step,
                 total, batch.global_batch, batch.accum, "" if batch.even else "at most ", batch.micro_batch)
        while self.step < total:
            crash_point("step_start", self.step + 1, info.rank)
            t0 = time.perf_counter()
            wait0 = self.loader.total_wait
            share = next(it)
            micro = micro_batches(share, batch)
            if fault_at("nan_sample", self.step + 1, info.rank) is not None:
                micro[-1]["poison"] = [0]
            result = train_step(self.engine, micro, loss_fn=self.loss_fn, lr=self.lr(self.step),
                                order=self.block_order(self.step), device=self.device,
                                keys_digest=keys_digest(share["keys"]),  # summed over the ranks in the step
                                stop_requested=lambda: self.stop.received is not None)
            self.step += 1
            self.watchdog.tick(self.step)
            self.metrics.note_step(time.perf_counter() - t0, self.loader.total_wait - wait0, result.block_losses)
            self._incident(result, share["keys"])
            self._count_nonfinite(result)
            if self.metrics.should_log(self.step):
                self._log(result)
            elif info.is_main:  # every step, for launchers/inspect_batch.py to check its listing against
                self.metrics.record(self.step, {DIGEST_METRIC: result.keys_digest})
            if cfg.logging.recon_every and self.step % cfg.logging.recon_every == 0 and info.is_main:
                self._reconstruction(result)
            if cfg.logging.attn_every and self.step % cfg.logging.attn_every == 0:
                self._attention_health(result, self.block_order(self.step - 1))
            stop = result.stop  # a signal to any rank, agreed on in the step's own all-reduce
            with self.watchdog.phase():  # a checkpoint or an export may take longer than a step
                self._publish(stop, last=self.step == total)
            if stop:
                return TrainingState.STOPPED, f"stop signal ({self.stop.received or 'another rank'})"
        return TrainingState.DONE, ""

    def record_state(self, status: str, reason: str = "") -> None:
        """``state.json`` (rank 0): where training stands, for the eval worker and the tools."""
        if self.info.is_main:
            self.run.write_text(STATE, TrainingState(status=status, step=self.step, total_steps=self.plan.total_steps,
                                                     reason=reason).to_json())

    def _publish(self, stop: bool, last: bool) -> None:
        """The step's export and checkpoint, when due, and what a stop request then says."""
        cfg, rank = self.cfg, self.info.rank
        finite = self.nonfinite_in_row == 0  # nothing is published after a step that went non-finite
        # The export first, then the checkpoint: a run killed between the two resumes before this step and
        # exports it again; the other order would resume past an export that never appeared.
        if finite and cfg.checkpoint.export_every and (self.step % cfg.checkpoint.export_every == 0 or last):
            self.export(final=last)
            crash_point("after_export", self.step, rank)
        saved = finite and (stop or last or self.ckpt.should_save(self.step))
        if saved:
            self.ckpt.save(self.engine, self.step, self.client_state(), self.checkpoint_record())
            crash_point("after_checkpoint", self.step, rank)
        if stop:
            why = self.stop.received or "a signal to another rank"
            if saved:
                log.info("stopping at step %d on %s: checkpoint saved; rerun the same command to resume",
                         self.step, why)
            else:
                log.warning("stopping at step %d on %s: NOT saved, the last step was not finite; rerun the same "
                            "command to resume from the last complete checkpoint", self.step, why)

    def _reconstruction(self, result: StepResult) -> None:
        out, sizes = result.output, self.plan.sizes
        panel = reconstruction_panel(result.images, out.preds[0].detach(), out.targets, out.block_order,
                                     sizes.patch_size * sizes.block_size, IMAGENET_MEAN, IMAGENET_STD)
        self.metrics.image("recon/train", panel, self.step)

    def _attention_health(self, result: StepResult, order: int | None) -> None:
        """Each attention layer's largest logit and mean entropy on the step's last micro batch (one extra forward,
        no gradient; collective under ZeRO-3: every rank runs it at the same steps; rank 0's figures logged)."""
        module = self.engine.module
        training = module.training
        module.eval()
        try:
            with torch.no_grad(), AttentionHealth(module) as health:
                module(result.images, order)
        finally:
            module.train(training)
        if not self.info.is_main:
            return
        scalars = {}
        for name, (max_logit, entropy) in health.stats.items():
            trunk, layer = name.split(".")
            scalars[f"attn/{trunk}/max_logit/{layer}"] = max_logit
            scalars[f"attn/{trunk}/entropy/{layer}"] = entropy
        worst = max(health.stats, key=lambda n: health.stats[n][0])
        scalars["attn/max_logit"] = health.stats[worst][0]
        self.metrics.scalars(self.step, scalars)
        if health.stats[worst][0] > self.cfg.logging.attn_logit_warn:
            log.warning("step %d: attention logits are large: %.1f in layer %s (logging.attn_logit_warn=%g); growing "
                        "attention logits precede divergence — watch attn/* in TensorBoard", self.step,
                        health.stats[worst][0], worst, self.cfg.logging.attn_logit_warn)

    def _incident(self, result: StepResult, keys: list[str]) -> None:
        """Record the step for forensics when it was skipped (non-finite) or its loss is a spike
        (:mod:`.incidents`); every rank decides alike (the loss and the skip are global), and only then do the
        ranks gather their images' losses. Normal steps: one comparison."""
        spike = None if result.skipped else self.spikes.observe(result.loss)
        if not result.skipped and spike is None:
            return
        kind = "non-finite" if result.skipped else "loss spike"
        samples = gather_samples(keys, result.sample_losses.float().cpu(), self.info.rank)  # collective
        if not self.info.is_main:
            return
        path = write_incident(self.run, self.step, kind=kind, loss=result.loss, lr=self.lr(self.step - 1),
                              grad_norm=result.grad_norm, skipped=result.skipped, samples=samples, spike=spike,
                              world_size=self.info.world_size)
        worst = worst_first(samples)[0]
        what = f"loss {result.loss:.4f}, z = {spike.z:.1f} over the median {spike.median:.4f}" if spike else \
            f"skipped; worst image {worst['key']} (loss {worst['loss']:.4g}, rank {worst['rank']})"
        log.warning("step %d: %s (%s): recorded in %s; replay it with: python launchers/replay.py %s --step %d",
                    self.step, kind, what, path, self.run.url, self.step)
        self.metrics.text("incidents", f"step {self.step}: {kind} ({what}); {path}", self.step)

    def _count_nonfinite(self, result: StepResult) -> None:
        """Count skipped steps (train_step leaves weights and optimizer state as they were); three in a row
        stop the run."""
        if not result.skipped:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        what = "non-finite loss" if math.isnan(result.loss) else "non-finite gradient norm"
        log.warning("step %d: %s; update skipped (%d in a row, %d in all; weights and optimizer state unchanged)",
                    self.step, what, self.nonfinite_in_row, self.nonfinite_total)
        if self.nonfinite_in_row >= 3:
            error = NonFiniteError(f"non-finite loss or gradient norm at steps {self.step - 2}..{self.step} "
                                   f"(3 in a row); stopping. The last complete checkpoint is untouched: lower "
                                   f"optim.lr or raise schedule.warmup_steps and resume from it.")
            self.record_state(TrainingState.FAILED, str(error))
            raise error

    def export(self, final: bool = False) -> None:
        state = full_fp32_state(self.engine.module.enc, keep=self.info.is_main)  # collective; rank 0 keeps it
        if self.info.is_main:
            path = write_export(self.run.root, self.step, state, ExportMeta(
                samples_seen=self.step * self.plan.batch.global_batch, model=self.cfg.model.name,
                sizes=dict(self.plan.sizes.__dict__), final=final))
            log.info("exported encoder to %s", path)

    def _log(self, result: StepResult) -> None:
        """Collective (every rank's step time, data wait and loss by block position are gathered): every rank
        calls it at the same steps."""
        global_batch = self.plan.batch.global_batch
        window = self.metrics.take_window()  # every step since the last log line, not only this one
        nb = self.plan.sizes.num_blocks - 1
        blocks = window.block_losses / window.steps if window.block_losses is not None else \
            torch.full((nb,), float("nan"), device=self.device)
        mine = torch.cat([torch.tensor([window.seconds / window.steps, window.wait_fraction], device=self.device),
                          blocks.float().to(self.device)])
        ranks = gather_over_ranks(mine)  # [world, 2 + nb]
        if not self.info.is_main:
            return
        step_times, waits, blocks = ranks[:, 0].tolist(), ranks[:, 1].tolist(), ranks[:, 2:].nanmean(0).tolist()
        ips = window.images_per_sec(global_batch)
        scalars = {"train/loss": result.loss, "train/lr": self.lr(self.step - 1), "train/grad_norm": result.grad_norm,
                   "train/samples_seen": self.step * global_batch, "train/epoch": self.step / self.plan.steps_per_epoch,
                   "perf/images_per_sec": ips, "perf/step_time": window.seconds / window.steps,
                   "perf/data_wait_fraction": max(waits), "data/corrupt_skipped": self.loader.corrupt_skipped,
                   "train/nonfinite_skipped": self.nonfinite_total}
        if self.info.world_size > 1:  # stragglers: one slow rank holds every other at each collective
            slowest = max(range(len(step_times)), key=step_times.__getitem__)
            scalars |= {"perf/rank_step_time_min": min(step_times), "perf/rank_step_time_median":
                        float(np.median(step_times)), "perf/rank_step_time_max": step_times[slowest],
                        "perf/slowest_rank": slowest, "perf/rank_data_wait_max": max(waits)}
            straggler = self.stragglers.observe(step_times)
            if straggler is not None:
                log.warning("rank %d is a straggler: its steps took %.2f s against a median of %.2f s over the ranks "
                            "for the last %d log lines (its data wait: %.0f%%)", straggler, step_times[straggler],
                            float(np.median(step_times)), self.stragglers.patience, 100 * waits[straggler])
        scalars |= {f"train/loss_by_block/{i + 1:02d}": v for i, v in enumerate(blocks) if np.isfinite(v)}
        if self.peak_flops:
            scalars["perf/mfu"] = mfu(ips / self.info.world_size, self.plan.sizes, self.peak_flops)
        if torch.cuda.is_available():
            scalars["perf/peak_memory"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            scalars["perf/peak_memory"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
        self.metrics.log(self.step, scalars, {DIGEST_METRIC: result.keys_digest})
        if any(np.isfinite(v) for v in blocks):
            self.metrics.image("train/loss_by_block", line_plot(
                blocks, title=f"loss by target block position, steps {self.step - window.steps + 1}-{self.step}",
                xlabel="position of the predicted block in the sequence"), self.step)
