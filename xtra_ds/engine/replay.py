"""Replay a step of a run on one process, and see which samples made its loss.

:class:`Replay` takes the latest complete checkpoint of a run directory at or before step N−1 (a checkpoint of
step S holds the state after S steps) into a plain PyTorch model and a ``torch.optim.AdamW`` — the fp32 master
weights, both Adam moments and the step count, gathered from the ZeRO-3 partitions (:func:`plain_adamw`) — and
runs steps S+1 … N with the one :func:`.step.train_step` on a :class:`.step.PlainEngine`:

* on the run's global batches: the loader on one process gives them (the data order does not depend on the
  layout), restored to the checkpoint's data position by the trainer's own :meth:`Trainer.restore`;
* cut into the micro batches of the run's layout (the run's micro batch size), so each forward sees what one
  rank's did;
* at the run's learning rates and block orders (:meth:`Trainer.lr`, :meth:`Trainer.block_order`: the
  schedule of the run's plan, :func:`xtra_ds.config.derive`).

Each replayed step is put beside what ``metrics.jsonl`` logged for it, and step N is reported sample by
sample (:class:`SampleRow`: each image's own loss, which ``train_step`` returns from the same forwards through
``NextBlockLoss.terms``, and its pixel statistics), worst first. ``launchers/replay.py`` is the command.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..config import batch_plan, derive, load_config
from ..data.build import planned_order, train_loader, training_data
from ..data.quarantine import keys_by_shard
from ..data.train_loader import describe_changes, order_changes
from ..interop.zero import ZeroCheckpoint
from ..objective import NextBlockLoss
from ..rundir import COMPLETE, CONFIG, METRICS, CheckpointRecord, RunDir
from .builder import build_model
from .checkpoint import saved_step
from .dist import RankInfo
from .schedule import param_groups
from .step import PlainEngine, micro_batches, train_step
from .trainer import Trainer

ADAMW_SETTINGS = ("betas", "eps", "weight_decay", "amsgrad", "maximize")  # what a saved group sets besides lr


class ReplayError(RuntimeError):
    """A step that cannot be replayed as the run trained it; the message says why and what to do."""


def find_checkpoint(run: RunDir, step: int) -> Path:
    """The latest complete checkpoint of ``run`` that holds the state after at most ``step`` steps."""
    done = [Path(p) for p in run.complete_checkpoints()]
    before = [p for p in done if saved_step(p) <= step]
    if not before:
        have = ", ".join(p.name for p in done) or "none"
        raise ReplayError(f"{run.url}: no complete checkpoint at or before step {step} (complete checkpoints: {have}); "
                          f"a step can be replayed only from a checkpoint before it (checkpoint.keep_last prunes "
                          f"older ones)")
    return max(before, key=saved_step)


def plain_adamw(model: nn.Module, ckpt: ZeroCheckpoint, weight_decay: float) -> torch.optim.AdamW:
    """Load a ZeRO-3 checkpoint's fp32 master weights into ``model`` and return a ``torch.optim.AdamW`` over it
    holding the checkpoint's optimizer state: per parameter both Adam moments and the step count, in the groups
    of :func:`.schedule.param_groups` (checked against the saved ones, parameter by parameter), with the saved
    groups' settings (betas, eps, weight decay). One full tensor at a time is assembled from the partitions."""
    if ckpt.zero_stage != 3:
        raise ReplayError(f"{ckpt.folder}: ZeRO stage {ckpt.zero_stage}; replay reads the optimizer state of ZeRO-3 "
                          f"checkpoints (deepspeed.zero_stage=3, the default)")
    groups, saved = param_groups(model, weight_decay), ckpt.optimizer_groups()
    names = {p: n for n, p in model.named_parameters()}
    for g, (mine, theirs) in enumerate(zip(groups, saved, strict=False)):
        want, have = {names[p] for p in mine["params"]}, {p[0] for p in theirs["params"]}
        if want != have or len(groups) != len(saved):
            odd = sorted(want ^ have)[:5]
            raise ReplayError(f"{ckpt.folder}: optimizer group {g} holds other parameters than param_groups() puts "
                              f"there (e.g. {', '.join(odd) or 'another number of groups'}): not this model's "
                              f"checkpoint, or another weight-decay rule")
    optimizer = torch.optim.AdamW([{"params": mine["params"], **{k: theirs["settings"][k] for k in ADAMW_SETTINGS
                                                                 if k in theirs["settings"]}}
                                   for mine, theirs in zip(groups, saved, strict=True)],
                                  lr=saved[0]["settings"]["lr"])
    params = dict(model.named_parameters())
    for theirs in saved:
        if len(set(theirs["steps"])) > 1:
            raise ReplayError(f"{ckpt.folder}: the sub-groups of one optimizer group hold different step counts "
                              f"{sorted(set(theirs['steps']))}")
        for name, shape, sub, offset in theirs["params"]:
            p = params[name]
            with torch.no_grad():
                p.copy_(ckpt.full(sub, offset, shape, "fp32"))
            # as AdamW keeps it: the step a float32 scalar on the CPU, the moments beside the parameter
            optimizer.state[p] = {"step": torch.tensor(theirs["steps"][0], dtype=torch.float32),
                                  **{key: ckpt.full(sub, offset, shape, key).to(p.device, copy=True)
                                     for key in ("exp_avg", "exp_avg_sq")}}
    return optimizer


@dataclass
class SampleRow:
    """One sample of the replayed step: its loss and what its pixels looked like as the model saw them (the
    crop, uint8 0–255). ``saturated``: the fraction of channel values at 0 or 255."""

    key: str
    shard: str  # the shard holding it ("?" when its stats file does not list it)
    label: int
    loss: float
    mean: float
    std: float
    min: int
    max: int
    saturated: float

    @classmethod
    def of(cls, key: str, shard: str, label: int, loss: float, image_HWC: torch.Tensor) -> "SampleRow":
        x = image_HWC.float()
        return cls(key, shard, label, loss, float(x.mean()), float(x.std()), int(image_HWC.min()),
                   int(image_HWC.max()), float(((image_HWC == 0) | (image_HWC == 255)).float().mean()))


@dataclass
class StepReplay:
    """One replayed step beside what the run logged for it (``logged``: None when it logged nothing then)."""

    step: int
    epoch: int
    epoch_step: int  # the data position: step of the epoch (0-based)
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    logged: dict | None = None

    def logged_value(self, name: str) -> float | None:
        return None if self.logged is None else self.logged.get(name)


@dataclass
class ReplayReport:
    run_dir: str
    checkpoint: str
    device: str
    precision: str  # the run's (deepspeed.precision)
    steps: list[StepReplay]  # S+1 … N
    samples: list[SampleRow]  # step N's, worst first
    notes: list[str] = field(default_factory=list)  # what makes the replay differ from the run, when anything does

    @property
    def last(self) -> StepReplay:
        return self.steps[-1]

    def worst(self, k: int) -> list[SampleRow]:
        return self.samples[:k]

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self, rows: int = 20) -> str:
        """The report for a console: every replayed step beside the logged one, then step N's samples."""
        last = self.last
        out = [f"replayed {self.run_dir} from {self.checkpoint} on {self.device} (the run computed in "
               f"{self.precision})",
               f"{'step':>8} {'loss':>12} {'logged':>12} {'grad norm':>11} {'logged':>11} {'lr':>10}"]
        for s in self.steps:
            out.append(f"{s.step:>8} {s.loss:>12.8f} {_num(s.logged_value('train/loss'), 12, 8)} {s.grad_norm:>11.6f} "
                       f"{_num(s.logged_value('train/grad_norm'), 11, 6)} {s.lr:>10.3e}" + ("  skipped" if s.skipped
                                                                                           else ""))
        logged = last.logged_value("train/loss")
        gap = "" if logged is None else f", {abs(last.loss - logged) / max(abs(logged), 1e-30):.1e} relative"
        out.append(f"step {last.step} (epoch {last.epoch}, step {last.epoch_step + 1} of it): loss {last.loss:.8f} "
                   f"(logged {_num(logged, 0, 8).strip()}{gap}), grad norm {last.grad_norm:.6f}")
        out += [f"note: {n}" for n in self.notes]
        shown = self.samples if rows <= 0 else self.samples[:rows]
        out.append(f"samples of step {last.step}, worst first ({len(shown)} of {len(self.samples)}):")
        out.append(f"{'#':>4} {'loss':>9} {'mean':>6} {'std':>6} {'min':>4} {'max':>4} {'sat%':>6} {'label':>6}  "
                   f"key  shard")
        for i, r in enumerate(shown, 1):
            out.append(f"{i:>4} {r.loss:>9.5f} {r.mean:>6.1f} {r.std:>6.1f} {r.min:>4} {r.max:>4} "
                       f"{100 * r.saturated:>6.1f} {r.label:>6}  {r.key}  {r.shard}")
        return "\n".join(out)


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


class Replay:
    """Run directory ``run_dir`` restored on one process to the latest complete checkpoint before ``step``, ready
    to replay up to ``step`` (:meth:`run`). ``overrides``: ``key=value`` settings over the run's config.yaml
    (what a later restart changed, e.g. ``data.quarantine=`` for a step trained before a quarantine)."""

    def __init__(self, run_dir: str | Path, step: int, *, overrides: list[str] = (), device: str = "cpu"):
        if step < 1:
            raise ReplayError(f"--step {step}: steps count from 1")
        self.rundir, self.target, self.device = RunDir(run_dir), step, torch.device(device)
        if not self.rundir.local:
            raise ReplayError(f"{run_dir}: replay reads a local run directory (checkpoints are memory-mapped)")
        cfg = load_config(self.rundir.local_path(CONFIG), list(overrides))
        self.checkpoint = find_checkpoint(self.rundir, step - 1)
        ckpt = ZeroCheckpoint(self.checkpoint)
        record = CheckpointRecord.read(self.checkpoint / COMPLETE) or CheckpointRecord()
        client = ckpt.meta if "loader" in ckpt.meta else {"step": record.step, "loader": record.data}
        self.data = training_data(cfg.data)
        self.notes = self._check_order(cfg, client["loader"]) + self._notes(cfg)
        self.cfg = cfg = replace(cfg, data=replace(cfg.data, num_workers=0))  # one process, reading in-process
        # the run's micro batch: each micro batch holds what one of its ranks' did (same forwards, same sums)
        micro = record.layout.get("micro_batch") or cfg.optim.micro_batch_size
        self.batch = batch_plan(replace(cfg.optim, micro_batch_size=micro), 1)
        self.plan = derive(cfg, self.batch, self.data.samples_per_pass)
        self.saved_total_steps = record.total_steps  # the length the run planned when it saved the checkpoint
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, self.plan.sizes).to(self.device)
        engine = PlainEngine(model, plain_adamw(model, ckpt, cfg.optim.weight_decay), accum=self.batch.accum,
                             grad_clip=cfg.optim.grad_clip)
        loader = train_loader(cfg.data, self.data, seed=cfg.seed, rank=0, world_size=1,
                              global_batch=self.batch.global_batch, img_size=self.plan.sizes.img_size)
        self.loss_fn = NextBlockLoss(cfg.objective.loss)
        self.autocast = torch.bfloat16 if cfg.deepspeed.precision == "bf16-mixed" else None
        self.trainer = Trainer(cfg=cfg, plan=self.plan, info=RankInfo(0, 0, 1), device=self.device, engine=engine,
                               loader=loader, run=self.rundir, loss_fn=self.loss_fn, ckpt=None, metrics=None,
                               peak_flops=None, stop=None)
        self.trainer.restore(client)  # the data position, the way a resume of the run takes it

    def _check_order(self, cfg, saved: dict) -> list[str]:
        """The checkpoint's data position (``saved``) is taken the way the run went on from it: in its own order,
        or — when the order changed (a quarantine, say) and the run went on from this checkpoint in the new one
        with ``data.on_order_change=next_epoch`` — at the next epoch, as the run did. Anything else is refused."""
        changes = order_changes(saved, planned_order(cfg.data, seed=cfg.seed, source=self.data,
                                                     global_batch=cfg.optim.global_batch_size))
        if not changes:
            return []
        if cfg.data.on_order_change != "next_epoch" or not self._resumed_in_new_order(changes):
            raise ReplayError(f"{self.checkpoint.name} holds a data position in another order than config.yaml's "
                              f"({describe_changes(changes)}), and the run trained the steps after it in that order: "
                              f"give the settings the run had then as overrides (e.g. data.quarantine= for a step "
                              f"trained before the quarantine)")
        return [f"the run went on from {self.checkpoint.name} in another data order ({describe_changes(changes)}) at "
                f"the next epoch: so does the replay"]

    def _resumed_in_new_order(self, changes: dict) -> bool:
        """Whether the run went on from the checkpoint in the order the config plans now (``changes``: what differs
        from the checkpoint's): the next checkpoint holds that order, or there is none (then config.yaml is the
        start that resumed from this, the newest checkpoint)."""
        step = saved_step(self.checkpoint)
        later = [Path(p) for p in self.rundir.complete_checkpoints() if saved_step(Path(p)) > step]
        if not later:
            return True
        nxt = min(later, key=saved_step)
        meta = ZeroCheckpoint(nxt).meta
        state = meta.get("loader") or (CheckpointRecord.read(nxt / COMPLETE) or CheckpointRecord()).data
        return all(state.get(key) == planned for key, (_, planned) in changes.items())

    @property
    def engine(self) -> PlainEngine:
        return self.trainer.engine

    @property
    def model(self) -> nn.Module:
        return self.trainer.engine.module

    @staticmethod
    def _notes(cfg) -> list[str]:
        """What keeps the replay from computing exactly what the run did."""
        precision, notes = cfg.deepspeed.precision, []
        if precision in ("bf16", "fp16"):
            notes.append(f"the run computed with {precision} weights and gradients; this replay computes in fp32 from "
                         f"the fp32 master weights, so its losses are close to the logged ones, not equal "
                         f"(docs/TRAINING.md, 'Replaying a step')")
        if cfg.model.drop_path > 0:
            notes.append(f"model.drop_path={cfg.model.drop_path}: each rank drew its own stochastic depth; the "
                         f"replay draws others, so its losses are close to the logged ones, not equal")
        return notes

    def logged(self) -> dict[int, dict]:
        """What ``metrics.jsonl`` holds, by step (the last line of a step wins)."""
        text = self.rundir.read_text(METRICS) or ""
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {row["step"]: row for row in rows}

    def run(self) -> ReplayReport:
        """Replay steps S+1 … N; step N's samples ranked by their loss, worst first."""
        trainer, logged, steps = self.trainer, self.logged(), []
        it = iter(trainer.loader)
        while trainer.step < self.target:
            share = next(it)
            micro = micro_batches(share, self.batch)
            lr = trainer.lr(trainer.step)
            result = train_step(trainer.engine, micro, loss_fn=self.loss_fn, lr=lr,
                                order=trainer.block_order(trainer.step), device=self.device, autocast=self.autocast)
            trainer.step += 1
            steps.append(StepReplay(trainer.step, share["epoch"], share["step"], result.loss, result.grad_norm, lr,
                                    result.skipped, logged.get(trainer.step)))
            logged_lr = steps[-1].logged_value("train/lr")
            if logged_lr is not None and not math.isclose(lr, logged_lr, rel_tol=1e-6):
                planned = self.saved_total_steps
                hint = f"schedule.total_steps={planned}" if planned and planned != self.plan.total_steps else \
                    "schedule.total_steps=…"
                self.notes.append(f"step {trainer.step}: learning rate {lr:.6e}, the run logged {logged_lr:.6e}: "
                                  f"config.yaml holds the settings of the run's latest start; give the ones it had "
                                  f"then as overrides (e.g. {hint}, what {self.checkpoint.name} was saved with)")
        shards = self._shards_of(share)
        losses = result.sample_losses.float().cpu()  # each image's own loss from the step's forwards, in share order
        rows = [SampleRow.of(key, shards.get(key, "?"), int(label), float(loss), image) for key, label, loss, image
                in zip(share["keys"], share["labels"], losses, share["images"], strict=True)]
        rows.sort(key=lambda r: -r.loss if math.isfinite(r.loss) else -math.inf)
        return ReplayReport(self.rundir.url, f"{self.checkpoint.parent.name}/{self.checkpoint.name}", str(self.device),
                            self.cfg.deepspeed.precision, steps, rows, list(self.notes))

    def _shards_of(self, share: dict) -> dict[str, str]:
        """key -> the URL of the shard holding it, for the keys of ``share``. Only the shards the step can read
        are looked at: a stream position's sample comes from its own shuffle chunk (docs/LOADER.md), so from
        the shards within ``data.shuffle_buffer`` positions of the step's in each stream."""
        spec = self.trainer.loader.spec
        plan, q, k = spec.plan(share["epoch"]), spec.order.per_stream, spec.shuffle
        lo, hi = max(0, share["step"] * q - k), min(plan.stream_len, (share["step"] + 1) * q + k)
        urls = set()
        for stream in range(spec.order.streams):
            at = lo
            for seg in plan.segments(stream, lo):
                if at >= hi:
                    break
                urls.add(seg.shard.url)
                at += seg.take
        wanted, out = set(share["keys"]), {}
        try:
            held = keys_by_shard(sorted(urls), self.cfg.data.storage_options)
        except FileNotFoundError as e:
            self.notes.append(f"the shard column is left out: {e}")
            return out
        for url, keys in held.items():
            for key in keys & wanted:
                out.setdefault(key, url)
        return out
