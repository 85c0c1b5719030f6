"""XTRA-H/14 training throughput and MFU on one GPU: the ZeRO-3 engine, plain PyTorch, attention variants.

    bash bench/run_gpu.sh                                         # on the GPU machine (its section 3)
    python3 bench/bench_gpu.py --out bench_gpu.json [--budget 240]
    .venv/bin/python bench/bench_gpu.py --smoke                   # the same code paths on the CPU, tiny model

engine   the run as ds_configs/xtra_vit_h14_in21k.yaml makes it: bf16, ZeRO-3, activation checkpointing,
         drop path 0.2, torch AdamW as DeepSpeed's client optimizer, built the way
         xtra_ds.engine.builder.build_engine builds it; the step timed is xtra_ds.engine.step.train_step, fed
         synthetic uint8 batches that already sit on the GPU (no loader). One optimizer step per
         micro batch (no accumulation), as in the paper's 29 images x 72 GPUs.
plain    the same model, objective and train_step in plain PyTorch (PlainEngine): fp32 weights, bf16 autocast,
         activation checkpointing, gradient clipping, fused torch AdamW; ratio engine/plain at equal attention
         and batch.
attention the model's own kernels (xtra_ds.models.attention, model.attention), set on the built model with
         model.set_attention; every variant is first checked against fp32 SDPA on random tensors:
           sdpa         the default: SDPA with the dense boolean block-causal mask
           flex         torch.compile'd flex_attention with a block-sparse block-causal BlockMask
           sdpa_cudnn   SDPA with the dense mask, cuDNN backend forced
           sdpa_efficient  SDPA with the dense mask, memory-efficient backend forced (not in the default plan)
           sdpa_nomask  registered by this benchmark: SDPA without a mask (flash), a speed reference only,
                        NOT the block-causal objective
         "best" in the plan is the fastest exact variant measured on the engine at the first batch size.
batch    micro batches --batch (default 32) then --sweep (64 128) on the same engine (DeepSpeed's micro-batch setting
         only sizes its own loader and timers; at accumulation 1 the step is the same).
no-ckpt  activation checkpointing switched off on the same model (model.set_grad_checkpointing): the price of
         recomputation, which MFU does not count; the recipe keeps it on.
torch-linear  ZeRO-3's zero.Init replaces torch.nn.functional.linear process-wide with DeepSpeed's
         memory-efficient linear (zero_optimization.memory_efficient_linear, on by default): engine variants
         run with it, as training does; plain steps and the engine's "torch-linear" variant run torch's.

Default plan, in priority order (mb = micro batch per GPU):
  engine/sdpa@32 (the headline), plain/sdpa@32, engine/{flex, sdpa_cudnn, sdpa_nomask}@32,
  engine/best/torch-linear@32, engine/{sdpa, best}@64, plain/best@32, engine/best/no-ckpt@32,
  engine/{sdpa, best}@128, engine/best/no-ckpt@64.

MFU = images/s x xtra_ds.costs.train_flops_per_image (3x forward; recomputation not counted) / the
device's dense bf16 peak (xtra_ds.costs.peak_flops). Variants run in priority order until --budget
seconds (counted from process start) are spent; the rest are listed as skipped. A failing variant (OOM,
compile error) is recorded and the next one runs; the engine is rebuilt after a failure inside it.
Results go to --out as JSON after every variant.
"""

from __future__ import annotations

from _common import ROOT, STARTED, write_json

import argparse
import contextlib
import gc
import itertools
import logging
import math
import os
import resource
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from xtra_ds.config import RunPlan, batch_plan, derive, load_config
from xtra_ds.costs import attention_flops, forward_flops, mfu, peak_flops, train_flops_per_image
from xtra_ds.engine.builder import build_engine, build_model
from xtra_ds.engine.dist import init, rank_info, single_rank_env
from xtra_ds.engine.schedule import param_groups
from xtra_ds.engine.step import PlainEngine, train_step
from xtra_ds.models.attention import attention_kernel, kernel_errors, register_attention, require_close
from xtra_ds.objective import NextBlockLoss

T0 = STARTED  # the budget counts from the first import, imports included
TORCH_LINEAR = F.linear  # before DeepSpeed's zero.Init replaces it (see Bench.run_for; importing it does not)

RECIPE = ROOT / "ds_configs/xtra_vit_h14_in21k.yaml"
SMOKE_RECIPE = ROOT / "ds_configs/test_micro.yaml"  # the smoke run: the tests' micro model, in seconds on a CPU
EXACT = ("sdpa", "flex", "sdpa_cudnn", "sdpa_efficient")  # variants that compute the block-causal objective
MFU_GOAL = 0.45


class BudgetExceeded(Exception):
    pass


# --- attention variants ------------------------------------------------------------------------
# The model's own kernels (xtra_ds.models.attention, model.attention in the config) are the exact
# variants; the benchmark adds one speed reference of its own, which is not the objective.

def sdpa_nomask(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v)  # bidirectional: the flash kernel; a speed bound only


register_attention("sdpa_nomask", lambda: sdpa_nomask)


def make_attention(name: str, sizes, batch: int, device) -> tuple[callable, dict]:
    """The model's attention kernel ``name``, checked; raises if it does not compute the objective."""
    grad = device.type == "cuda"  # flex has no CPU backward; the smoke run checks the forward only
    fn = attention_kernel(name)
    note = kernel_errors(fn, sizes, batch, device, grad)
    if name in EXACT:
        require_close(name, note)
    return fn, note


# --- the two ways of training ------------------------------------------------------------------

class EngineRun:
    """A ZeRO-3 DeepSpeed engine built by the training builder (build_engine); the step is train_step."""

    def __init__(self, cfg, plan: RunPlan, info, device):
        self.cfg, self.plan, self.info, self.device, self.engine = cfg, plan, info, device, None
        self.loss_fn = NextBlockLoss(cfg.objective.loss)
        self.setup_s = None

    def build(self) -> None:
        t = time.monotonic()
        self.engine, self.ds_config = build_engine(self.cfg, self.plan)
        self.setup_s = time.monotonic() - t

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def model(self):
        return self.engine.module

    def step(self, images) -> float:
        return train_step(self.engine, [{"images": images}], loss_fn=self.loss_fn, lr=self.cfg.optim.lr, order=None,
                          device=self.device).loss

    def free(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            try:
                self.engine.destroy()
            except Exception as e:  # noqa: BLE001 - dropped anyway
                print(f"        (engine.destroy: {type(e).__name__}: {e})")
        self.engine = None


class PlainRun:
    """The same model, objective and step function in plain PyTorch: fp32 weights, bf16 autocast, fused AdamW."""

    def __init__(self, cfg, plan: RunPlan, device):
        self.cfg, self.plan, self.device, self.engine, self.setup_s = cfg, plan, device, None, None
        self.loss_fn = NextBlockLoss(cfg.objective.loss)

    def build(self) -> None:
        t = time.monotonic()
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        with torch.device(self.device):  # initialised where it trains
            model = build_model(cfg.model, self.plan.sizes)
        opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=self.device.type == "cuda")
        self.engine = PlainEngine(model, opt, grad_clip=cfg.optim.grad_clip)
        self.setup_s = time.monotonic() - t

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def model(self):
        return self.engine.module

    def step(self, images) -> float:
        return train_step(self.engine, [{"images": images}], loss_fn=self.loss_fn, lr=self.cfg.optim.lr, order=None,
                          device=self.device, autocast=torch.bfloat16).loss


# --- measuring ---------------------------------------------------------------------------------

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, images, device, *, warmup: int, steps: int, min_steps: int, cap_s: float, deadline: float):
    """Warm up, then time up to ``steps`` steps (fewer once ``cap_s`` or the deadline passes)."""
    losses = []
    t = time.monotonic()
    for _ in range(warmup):
        losses.append(step(images))
    sync(device)
    warm_s = time.monotonic() - t
    cuda = device.type == "cuda"
    marks = []  # one event (CUDA) or host time (CPU) before each step and after the last
    mark = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else None
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        if cuda:
            marks.append(mark())
            marks[-1].record()
        else:
            marks.append(time.perf_counter())
        losses.append(step(images))
        spent = time.perf_counter() - t0
        if i + 1 >= min_steps and (spent > cap_s or time.monotonic() > deadline):
            break
    if cuda:
        marks.append(mark())
        marks[-1].record()
    sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if cuda:
        dts = [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(marks)]
    else:
        marks.append(time.perf_counter())
        dts = [b - a for a, b in itertools.pairwise(marks)]
    return {"warmup_steps": warmup, "warmup_s": round(warm_s, 2), "steps": len(dts), "wall_s": round(wall, 3),
            "step_s_median": statistics.median(dts), "step_s_min": min(dts), "step_s_mean": wall / len(dts),
            # the host's share: a step whose CPU time nears its wall time waits on Python, not on the device
            "cpu_s_per_step": round(cpu / len(dts), 4), "loss_first": losses[0], "loss_last": losses[-1]}


def mem_reset(device) -> float | None:
    """Free what can be freed; GiB still allocated (None on the CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return round(torch.cuda.memory_allocated(device) / 2**30, 2)
    return None


def mem_peak(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS, GiB


# --- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    mode: str  # "engine" (DeepSpeed) or "plain" (PyTorch), both through train_step
    attn: str  # an attention variant, or "best": the fastest exact one on the engine at the first batch
    mb: int  # micro batch per GPU
    ckpt: bool = True  # activation checkpointing (the recipe: on)
    torch_linear: bool = False  # engine: torch's F.linear instead of ZeRO-3's memory-efficient linear

    @property
    def label(self) -> str:
        return (f"{self.mode}/{self.attn}" + ("" if self.ckpt else "/no-ckpt")
                + ("/torch-linear" if self.torch_linear and self.mode == "engine" else ""))


def default_plan(b0: int, sweep: list[int], alts: list[str], plain: bool) -> list[Variant]:
    """Priority order: the headline, the plain baseline, attention alternatives, the engine's own linear,
    the batch sweep, checkpointing off."""
    E = "engine"
    plan = [Variant(E, "sdpa", b0)] + ([Variant("plain", "sdpa", b0)] if plain else [])
    plan += [Variant(E, a, b0) for a in alts] + [Variant(E, "best", b0, torch_linear=True)]
    for i, mb in enumerate(sweep):
        plan += [Variant(E, "sdpa", mb), Variant(E, "best", mb)]
        if i == 0:
            plan += ([Variant("plain", "best", b0)] if plain else []) + [Variant(E, "best", b0, ckpt=False)]
    return plan + [Variant(E, "best", mb, ckpt=False) for mb in sweep[:1]]


def best_attention(results: list[dict], b0: int) -> str:
    ok = [r for r in results if r["status"] == "ok" and r["mode"] == "engine" and r["micro_batch"] == b0
          and r["attn"] in EXACT and r["grad_checkpointing"] and not r["torch_linear"]]
    return max(ok, key=lambda r: r["images_per_s"])["attn"] if ok else "sdpa"


def attention_share(s) -> float:
    """The attention products' (QK^T, AV) share of the forward FLOPs, as xtra_ds.costs.flops counts them."""
    return attention_flops(s) / forward_flops(s)["total"]


@contextlib.contextmanager
def linear_impl(fn):
    """Use ``fn`` as torch.nn.functional.linear inside the block (nn.Linear looks it up on every call)."""
    saved = F.linear
    F.linear = fn
    try:
        yield
    finally:
        F.linear = saved


def env_info(device) -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(device_name=p.name, device_memory_gib=round(p.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    return out


def table(results: list[dict]) -> str:
    head = f"{'variant':<34}{'mb':>5}{'steps':>6}{'step ms':>9}{'img/s':>9}{'MFU':>7}{'peak GiB':>10}  status"
    lines = [head, "-" * len(head)]
    for r in results:
        if r["status"] == "ok":
            m = f"{100 * r['mfu']:6.1f}%" if r.get("mfu") is not None else "    n/a"
            lines.append(f"{r['variant']:<34}{r['micro_batch']:>5}{r['steps']:>6}{1e3 * r['step_s_median']:>9.1f}"
                         f"{r['images_per_s']:>9.1f}{m:>7}{r['peak_mem_gib']:>10.1f}  ok")
        else:
            why = (r.get("error") or r.get("reason") or "").splitlines()[0][:100]
            lines.append(f"{r['variant']:<34}{r['micro_batch']:>5}{'':>41}  {r['status']}: {why}")
    return "\n".join(lines)


# --- the benchmark ------------------------------------------------------------------------------

class Bench:
    """Runs a plan of variants within the budget; records every outcome in ``report``."""

    def __init__(self, a, cfg, plan: RunPlan, device, peak, report: dict, out_path: Path):
        self.a, self.cfg, self.plan, self.sizes, self.device, self.peak = a, cfg, plan, plan.sizes, device, peak
        self.report, self.out_path = report, out_path
        self.cuda = device.type == "cuda"
        self.runs: dict = {}  # mode -> EngineRun | PlainRun
        self.engine_error = None  # a set-up failure is not retried
        self.attn: dict = {}  # name -> the checked attention function
        self.attn_errors: dict = {}  # name -> why it is unavailable
        self.images: dict = {}  # micro batch -> uint8 [B, H, W, 3] on the device
        self.per_image_s: dict = {}  # mode -> step seconds per image, last measured
        self.flex_seen: set = set()  # (mode, micro batch) that flex has been compiled for
        self.stopped = None
        self.rng = torch.Generator(device=device).manual_seed(0)

    def built(self, mode: str) -> bool:
        run = self.runs.get(mode)
        return run is not None and run.ready

    def run_for(self, mode: str):
        if self.built(mode):
            return self.runs[mode]
        setup = self.report["setup"]
        if mode == "plain":
            run = self.runs.setdefault("plain", PlainRun(self.cfg, self.plan, self.device))
            with linear_impl(TORCH_LINEAR):
                run.build()
            setup.setdefault("plain_build_s", []).append(round(run.setup_s, 1))
            return run
        if self.engine_error:
            raise RuntimeError(f"engine set-up failed earlier: {self.engine_error}")
        try:
            import deepspeed
            import torch.distributed as dist
            from deepspeed.utils import logger as ds_logger

            ds_logger.setLevel(logging.WARNING)
            self.report["env"]["deepspeed"] = deepspeed.__version__
            if not dist.is_initialized():
                init(rank_info())  # NCCL on a GPU, gloo on the CPU, as the builder does
            run = self.runs.setdefault("engine", EngineRun(self.cfg, self.plan, rank_info(), self.device))
            run.build()
        except Exception as e:
            self.engine_error = f"{type(e).__name__}: {e}"
            raise
        setup.setdefault("engine_build_s", []).append(round(run.setup_s, 1))
        self.report["ds_config"] = run.ds_config
        self.report["parameters"] = sum(getattr(q, "ds_numel", q.numel()) for q in run.engine.module.parameters())
        # ZeRO-3's zero.Init swaps F.linear for its memory-efficient linear, process-wide (memory_efficient_linear,
        # on by default): the engine's real path. Plain steps and "torch-linear" variants put torch's back.
        self.report["env"]["zero3_linear_installed"] = F.linear is not TORCH_LINEAR
        return run

    def attention(self, name: str, mb: int):
        if name not in self.attn and name not in self.attn_errors:
            try:
                self.attn[name], self.report["attention_checks"][name] = make_attention(name, self.sizes, mb,
                                                                                        self.device)
            except BudgetExceeded:
                raise
            except Exception as e:  # noqa: BLE001 - recorded; the variant fails below
                self.attn_errors[name] = f"{type(e).__name__}: {str(e)[:500]}"
                self.report["attention_checks"][name] = {"error": self.attn_errors[name]}
        if name in self.attn_errors:
            raise RuntimeError(f"attention variant {name} unavailable: {self.attn_errors[name][:300]}")
        return self.attn[name]

    def seconds_needed(self, v: Variant) -> float:
        a = self.a
        per_image = self.per_image_s.get(v.mode, self.per_image_s.get("engine", 0.01 if self.cuda else 0.5))
        need = (a.warmup + min(3, a.steps)) * v.mb * per_image * (1.0 if v.ckpt else 0.8)
        need += 0 if self.built(v.mode) else (40.0 if v.mode == "engine" else 10.0) * (1 if self.cuda else 0.5)
        if self.cuda and v.attn == "flex" and (v.mode, v.mb) not in self.flex_seen:
            need += 20.0 if self.flex_seen else 40.0  # compiling (first time) or recompiling for a new shape
        return need

    def measure(self, v: Variant, *, headline: bool = False) -> dict:
        """Time one variant; ``headline`` runs whatever the estimate (only the hard stop ends it)."""
        a, device = self.a, self.device
        torch_linear = v.torch_linear or v.mode == "plain"
        rec = {"variant": v.label, "mode": v.mode, "attn": v.attn, "micro_batch": v.mb, "grad_checkpointing": v.ckpt,
               "torch_linear": torch_linear}
        left, need = a.deadline - time.monotonic(), self.seconds_needed(v)
        if self.stopped or (left < need and not headline):
            rec.update(status="skipped", reason=self.stopped or f"budget: needs ~{need:.0f} s, {left:.0f} s left")
            print(f"[{time.monotonic() - T0:5.0f}s] skip {v.label} mb={v.mb}: {rec['reason']}", flush=True)
            return rec
        print(f"[{time.monotonic() - T0:5.0f}s] {v.label} mb={v.mb} ...", flush=True)
        stepping, run = False, None
        try:
            fn = self.attention(v.attn, v.mb)  # checked before any model runs it
            run = self.run_for(v.mode)
            run.model.set_attention(fn)
            run.model.set_grad_checkpointing(v.ckpt)
            if v.mb not in self.images:
                self.images[v.mb] = torch.randint(0, 256, (v.mb, self.sizes.img_size, self.sizes.img_size, 3),
                                                  dtype=torch.uint8, device=device, generator=self.rng)
            rec["resident_mem_gib"] = mem_reset(device)
            stepping = True
            if v.attn == "flex":
                self.flex_seen.add((v.mode, v.mb))
            cap = max(1.0, min(a.variant_cap, a.deadline - time.monotonic() - 5))
            with linear_impl(TORCH_LINEAR) if torch_linear else contextlib.nullcontext():
                rec.update(timed_steps(run.step, self.images[v.mb], device, warmup=a.warmup, steps=a.steps,
                                       min_steps=min(3, a.steps), cap_s=cap, deadline=a.deadline))
            ips = v.mb / rec["step_s_mean"]
            rec.update(status="ok", images_per_s=round(ips, 2), peak_mem_gib=round(mem_peak(device), 2),
                       mfu=mfu(ips, self.sizes, self.peak) if self.peak else None)
            self.per_image_s[v.mode] = rec["step_s_mean"] / v.mb
            if not all(math.isfinite(x) for x in (rec["loss_first"], rec["loss_last"])):
                rec["warning"] = "non-finite loss"
            m = f", MFU {100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else ""
            print(f"        {ips:.1f} img/s, step {1e3 * rec['step_s_median']:.1f} ms (median of {rec['steps']}){m}, "
                  f"peak {rec['peak_mem_gib']:.1f} GiB, loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f}",
                  flush=True)
        except BudgetExceeded as e:
            rec.update(status="stopped", error=str(e))
            self.stopped = f"not run: {e}"
            print(f"        stopped: {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - recorded; the next variant runs
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)
            rec.update(status="oom" if oom else "failed", error=f"{type(e).__name__}: {str(e)[:1500]}",
                       traceback=traceback.format_exc()[-4000:])
            print(f"        {rec['status']}: {rec['error'].splitlines()[0][:300]}", flush=True)
            if stepping and v.mode == "engine" and self.runs.get("engine") is not None:
                self.runs["engine"].free()  # ZeRO-3's gather state may be mid-step: rebuild before the next use
            mem_reset(device)
        finally:
            if run is not None and run.ready:
                run.model.set_attention(self.cfg.model.attention)
                run.model.set_grad_checkpointing(self.cfg.model.grad_checkpointing)
        return rec

    def run(self, plan: list[Variant]) -> None:
        results = self.report["results"]
        for i, v in enumerate(plan):
            try:
                if v.attn == "best":
                    v = replace(v, attn=best_attention(results, self.a.batch))
                    if any(r["variant"] == v.label and r["micro_batch"] == v.mb for r in results):
                        continue  # the best is a variant measured already
                results.append(self.measure(v, headline=i == 0))
                _ratios(self.report)
                self.report["table"] = table(results)
                write_json(self.out_path, self.report)
            except BudgetExceeded as e:  # the hard stop, between variants
                self.stopped = f"not run: {e}"


def _ratios(report: dict) -> None:
    ok = {(r["mode"], r["attn"], r["micro_batch"], r["grad_checkpointing"]): r for r in report["results"]
          if r["status"] == "ok" and (r["mode"] == "plain" or not r["torch_linear"])}
    for (mode, attn, mb, ckpt), r in ok.items():
        plain = ok.get(("plain", attn, mb, ckpt))
        if mode == "engine" and plain:
            key = f"{attn}/mb{mb}" + ("" if ckpt else "/no-ckpt")
            report["ratios_engine_over_plain"][key] = round(r["images_per_s"] / plain["images_per_s"], 3)


def summarize(report: dict, out_path: Path) -> None:
    _ratios(report)
    report["total_s"] = round(time.monotonic() - T0, 1)
    ok = [r for r in report["results"] if r["status"] == "ok" and r["mode"] == "engine" and r["attn"] in EXACT]
    keys = ("variant", "micro_batch", "images_per_s", "mfu")
    recipe_like = [r for r in ok if r["grad_checkpointing"] and not r["torch_linear"]]
    for name, pool in (("best_engine_as_recipe", recipe_like), ("best_engine_any", ok)):
        if pool:
            best = max(pool, key=lambda r: r["images_per_s"])
            report[name] = {k: best[k] for k in keys}
    skipped = [r for r in report["results"] if r["status"] in ("skipped", "stopped")]
    if skipped:
        report["notes"].append(f"{len(skipped)} variant(s) not run within the {report['budget_s']:.0f} s budget")
    report["table"] = table(report["results"])
    write_json(out_path, report)
    print("\n" + report["table"])
    for key, x in report["ratios_engine_over_plain"].items():
        print(f"engine/plain {key}: {x:.2f}")
    for name, what in (("best_engine_as_recipe", "best engine, recipe settings (checkpointing, ZeRO-3 linear)"),
                       ("best_engine_any", "best engine, any setting")):
        b = report.get(name)
        if b is None or (name == "best_engine_any" and b == report.get("best_engine_as_recipe")):
            continue
        mfu_s = f"{100 * b['mfu']:.1f}% MFU (goal {100 * MFU_GOAL:.0f}%)" if b["mfu"] is not None else "MFU n/a"
        print(f"{what}: {b['variant']} at micro batch {b['micro_batch']}: {b['images_per_s']:.1f} img/s, {mfu_s}")
    if skipped:
        print(f"{len(skipped)} variant(s) not run: the budget of {report['budget_s']:.0f} s was spent")
    print(f"results: {out_path} ({report['total_s']:.0f} s in all)", flush=True)


# --- main ----------------------------------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON results, rewritten after every variant "
                   "(default bench_gpu.json; runs/bench_gpu_smoke.json with --smoke)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run, imports included "
                   "(default 240; 900 with --smoke); variants that would not fit are skipped")
    p.add_argument("--grace", type=float, default=20.0, help="hard stop this many seconds after the budget")
    p.add_argument("--batch", type=int, default=None, help="first micro batch per GPU (default 32; 4 with --smoke)")
    p.add_argument("--sweep", type=int, nargs="*", default=None,
                   help="further micro batches (default 64 128; 8 with --smoke)")
    p.add_argument("--alts", nargs="*", default=["flex", "sdpa_cudnn", "sdpa_nomask"],
                   help="attention variants besides sdpa, in order (flex sdpa_cudnn sdpa_efficient sdpa_nomask)")
    p.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch baseline")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 3; 1 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 15; 2 with --smoke)")
    p.add_argument("--variant-cap", type=float, default=20.0, help="seconds of timed steps per variant (>= 3 steps)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak if xtra_ds.costs.flops does not know the device")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the code paths, not speed")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) applied to the recipe")
    a = p.parse_args()
    smoke = a.smoke
    a.budget = a.budget if a.budget is not None else (900.0 if smoke else 240.0)
    a.batch = a.batch or (4 if smoke else 32)
    a.sweep = a.sweep if a.sweep is not None else ([8] if smoke else [64, 128])
    a.warmup = a.warmup if a.warmup is not None else (1 if smoke else 3)
    a.steps = a.steps or (2 if smoke else 15)
    a.out = a.out or (str(ROOT / "runs/bench_gpu_smoke.json") if smoke else "bench_gpu.json")
    a.deadline = T0 + a.budget
    return a


def main() -> int:
    a = parse_args()

    def hard_stop(signum, frame):
        raise BudgetExceeded(f"{signal.Signals(signum).name}: hard stop {time.monotonic() - T0:.0f} s after start")
    signal.signal(signal.SIGALRM, hard_stop)
    signal.signal(signal.SIGTERM, hard_stop)
    signal.alarm(max(1, int(a.budget + a.grace - (time.monotonic() - T0))))

    single_rank_env()  # one rank, no launcher
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    cuda = torch.cuda.is_available() and not a.smoke
    if not cuda and not a.smoke:
        print("no CUDA device: this is a GPU benchmark (use --smoke to check it on the CPU)")
        return 2
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    for knob in ("recompile_limit", "cache_size_limit"):  # flex recompiles per shape (2 trunks x batch sizes)
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)

    # global = micro batch: one optimizer step per micro batch, as on each of the paper's 72 GPUs
    recipe = SMOKE_RECIPE if a.smoke else RECIPE
    # qwZ (the H/14 recipe's ZeRO++ setting) quantizes nothing on one GPU (one rank gathers nothing) and needs
    # DeepSpeed's quantizer JIT-built: off here; bench_gpu_qwz.py measures its numerics
    overrides = [f"optim.micro_batch_size={a.batch}", f"optim.global_batch_size={a.batch}", "run_dir=runs/bench_gpu",
                 "deepspeed.zero_quantized_weights=false", *a.overrides]
    cfg = load_config(recipe, overrides)
    plan = derive(cfg, batch_plan(cfg.optim, 1), data_samples=a.batch)
    sizes = plan.sizes
    peak = a.peak_tflops * 1e12 if a.peak_tflops else (peak_flops(torch.cuda.get_device_name(device)) if cuda else None)
    report = {
        "what": "XTRA training step throughput on one device: ZeRO-3 engine vs plain PyTorch (both train_step), "
                "attention variants, micro-batch sweep; synthetic uint8 batches on the device",
        "smoke": a.smoke, "recipe": str(recipe.relative_to(ROOT)), "overrides": overrides,
        "model": cfg.model.name, "sizes": sizes.__dict__, "precision": cfg.deepspeed.precision,
        "zero_stage": cfg.deepspeed.zero_stage, "grad_checkpointing": cfg.model.grad_checkpointing,
        "forward_gflops_per_image": {k: v / 1e9 for k, v in forward_flops(sizes).items()},
        "train_flops_per_image": train_flops_per_image(sizes), "peak_flops": peak, "mfu_goal": MFU_GOAL,
        "attention_share_of_flops": round(attention_share(sizes), 4),
        "budget_s": a.budget, "env": env_info(device), "setup": {}, "attention_checks": {},
        "results": [], "ratios_engine_over_plain": {},
        "notes": [("resident_mem_gib/peak_mem_gib count every run alive at the time (engine and plain states "
                   "once both are built)"), "sdpa_nomask is not the block-causal objective: a speed reference only"],
    }
    print(f"{cfg.model.name} @ {sizes.img_size}px, k={sizes.block_size}: train FLOPs/image "
          f"{train_flops_per_image(sizes) / 1e12:.3f} T ({100 * attention_share(sizes):.1f}% of it attention); "
          f"peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; "
          f"{cfg.deepspeed.precision}, ZeRO-{cfg.deepspeed.zero_stage}, checkpointing {cfg.model.grad_checkpointing}; "
          f"device {report['env'].get('device_name', device)}; budget {a.budget:.0f} s "
          f"({time.monotonic() - T0:.0f} s spent on imports)", flush=True)

    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Bench(a, cfg, plan, device, peak, report, out_path).run(default_plan(a.batch, a.sweep, a.alts, not a.no_plain))
    signal.alarm(0)
    summarize(report, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
