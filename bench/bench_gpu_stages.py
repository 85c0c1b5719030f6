"""XTRA-H/14 on one GPU: the training step under ZeRO stages 0, 2 and 3, and ZeRO-3 gathering each
transformer block as one unit, against the plain PyTorch step, all in one run.

    python3 bench/bench_gpu_stages.py --out stages.json [--budget 165]     # on the GPU (bench/run_gpu.sh runs it)
    .venv/bin/python bench/bench_gpu_stages.py --smoke                     # the same code paths on the CPU, micro model

Every variant is ds_configs/xtra_vit_h14_in21k.yaml (bf16, activation checkpointing, drop path 0.2, SDPA with
the block-causal mask) at micro batch --batch (32; the paper has 29 per GPU), one optimizer step per micro
batch, the step being xtra_ds.engine.step.train_step on synthetic uint8 batches already on the GPU:

  plain          the same model, objective and step in plain PyTorch (bench_gpu.PlainRun: fp32 weights, bf16
                 autocast, fused AdamW, torch's F.linear)
  zero3          the recipe's engine (zero.Init, and so DeepSpeed's memory-efficient F.linear, as in training) with
                 deepspeed.zero3_leaf_blocks=false: DeepSpeed's default, one fetch/release per Linear/LayerNorm
  zero3-leaf     the recipe's engine as it trains (deepspeed.zero3_leaf_blocks=true, the default:
                 zero_optimization.leaf_module.classes = [xtra_ds.models.layers.Block], applied by
                 deepspeed.initialize before the ZeRO-3 hooks are set): one fetch/release per block
  zero0, zero2   xtra_ds.engine.builder.build_engine with deepspeed.zero_stage=0 / 2 (DeepSpeed's bf16
                 optimizer wrapper); torch's F.linear, as their training would have (no zero.Init), although
                 the zero3 builds above have replaced it process-wide
  zero3-persist  zero3 with stage3_param_persistence_threshold above every parameter: nothing is ever released
                 or fetched, so the hooks' bookkeeping alone is left. A diagnostic for one GPU (on many it keeps
                 whole copies everywhere), not a setting to adopt

They run in that order of priority, each engine freed before the next is built, until --budget seconds (from
process start) are spent; the JSON (--out) is rewritten after every variant, so a stop loses nothing
measured. Per variant:
images/s, MFU (xtra_ds.costs.flops, recomputation not counted), ratios to plain and to zero0, peak and resident
GPU memory next to xtra_ds.costs.memory's estimate, host CPU seconds per step (near the step time: the
step waits on Python), build seconds.
"""

from __future__ import annotations

from _common import ROOT, STARTED, write_json

import argparse
import contextlib
import gc
import logging
import math
import os
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

# bench_gpu (the file beside this one: python puts bench/ on sys.path) holds the runs and timers shared here
import bench_gpu
import torch
import torch.nn.functional as F
from bench_gpu import (
    RECIPE,
    SMOKE_RECIPE,
    TORCH_LINEAR,
    BudgetExceeded,
    EngineRun,
    PlainRun,
    env_info,
    mem_peak,
    mem_reset,
    timed_steps,
)

from xtra_ds.config import batch_plan, derive, load_config
from xtra_ds.config.deepspeed import LEAF_BLOCK_CLASS
from xtra_ds.costs import estimate, mfu, parameter_numels, peak_flops, train_flops_per_image
from xtra_ds.engine.dist import init, rank_info, single_rank_env

T0 = STARTED  # the budget counts from the first import, imports included
LEAF_CLASS = LEAF_BLOCK_CLASS  # the encoder's and the predictor's transformer block


@dataclass(frozen=True)
class StageVariant:
    name: str
    what: str
    overrides: tuple[str, ...] = ()  # config overrides on top of the recipe's
    plain: bool = False
    torch_linear: bool = False  # step with torch's F.linear, whatever an earlier zero.Init left in its place


VARIANTS = (
    StageVariant("plain", "plain PyTorch: fp32 weights, bf16 autocast, fused AdamW", plain=True, torch_linear=True),
    StageVariant("zero3", "DeepSpeed ZeRO-3, per-submodule gathers (deepspeed.zero3_leaf_blocks=false)",
                 ("deepspeed.zero3_leaf_blocks=false",)),
    StageVariant("zero3-leaf", f"ZeRO-3, each {LEAF_CLASS} gathered as one unit (leaf_module; the default)",
                 ("deepspeed.zero3_leaf_blocks=true",)),
    StageVariant("zero0", "DeepSpeed ZeRO-0 (bf16 optimizer wrapper)", ("deepspeed.zero_stage=0",),
                 torch_linear=True),
    StageVariant("zero2", "DeepSpeed ZeRO-2", ("deepspeed.zero_stage=2",), torch_linear=True),
    StageVariant("zero3-persist", "ZeRO-3, every parameter persistent (nothing fetched: the hooks' cost alone)",
                 ("deepspeed.param_persistence_threshold=100000000000", "deepspeed.zero3_leaf_blocks=false")),
)


def variant_config(a, base: list[str], v: StageVariant):
    """(config, run plan) of variant ``v``: the recipe, ``base`` overrides, then the variant's."""
    cfg = load_config(SMOKE_RECIPE if a.smoke else RECIPE, [*base, *v.overrides])
    return cfg, derive(cfg, batch_plan(cfg.optim, 1), data_samples=a.batch)


def leaf_count(module) -> int:
    return sum(1 for m in module.modules() if getattr(m, "_z3_leaf", False))


def measure(v: StageVariant, a, base: list[str], device, images, peak, est: dict) -> dict:
    """Build, time and free one variant; every outcome is a record. ``est``: seconds a build ("plain",
    "engine") and a step ("step_s") took last, for the budget; updated here."""
    rec = {"variant": v.name, "what": v.what, "overrides": list(v.overrides), "micro_batch": a.batch}
    kind = "plain" if v.plain else "engine"
    need = est[kind] + (a.warmup + min(3, a.steps)) * est["step_s"]
    left = a.deadline - time.monotonic()
    if left < need:
        rec.update(status="skipped", reason=f"budget: needs ~{need:.0f} s, {left:.0f} s left")
        print(f"[{time.monotonic() - T0:5.0f}s] skip {v.name}: {rec['reason']}", flush=True)
        return rec
    print(f"[{time.monotonic() - T0:5.0f}s] {v.name}: {v.what} ...", flush=True)
    run = None
    try:
        cfg, plan = variant_config(a, base, v)
        rec["resident_before_build_gib"] = mem_reset(device)  # what earlier variants left behind
        if not v.plain:  # the engine's pre-flight estimate (xtra_ds.costs.memory), to hold against the peak
            rec["estimate_gib"] = round(estimate(cfg, plan, sum(parameter_numels(plan.sizes))).total / 2**30, 2)
        t = time.monotonic()
        if v.plain:
            run = PlainRun(cfg, plan, device)
        else:
            run = EngineRun(cfg, plan, rank_info(), device)
        with bench_gpu.linear_impl(TORCH_LINEAR) if v.torch_linear else contextlib.nullcontext():
            run.build()
        if not v.plain:
            zero = run.ds_config["zero_optimization"]
            rec["zero_optimization"] = zero
            rec["optimizer"] = type(run.engine.optimizer).__name__
            rec["leaf_modules"] = leaf_count(run.model)
            # ZeRO-3 hooks every module it fetches for; a leaf's insides are fetched with it and carry none
            rec["modules_hooked"] = sum(1 for m in run.model.modules() if m._forward_pre_hooks)
            rec["modules"] = sum(1 for _ in run.model.modules())
            if "leaf" in v.name and rec["leaf_modules"] == 0:
                raise RuntimeError(f"leaf_module matched no module: is {LEAF_CLASS} still the block class?")
        rec["build_s"] = round(time.monotonic() - t, 1)
        est[kind] = rec["build_s"]
        rec["zero3_linear"] = F.linear is not TORCH_LINEAR and not v.torch_linear  # what the steps below use
        rec["resident_gib"] = mem_reset(device)
        cap = max(1.0, min(a.variant_cap, a.deadline - time.monotonic() - 3))
        with bench_gpu.linear_impl(TORCH_LINEAR) if v.torch_linear else contextlib.nullcontext():
            rec.update(timed_steps(run.step, images, device, warmup=a.warmup, steps=a.steps,
                                   min_steps=min(3, a.steps), cap_s=cap, deadline=a.deadline))
        ips = a.batch / rec["step_s_mean"]
        est["step_s"] = rec["step_s_mean"]
        rec.update(status="ok", images_per_s=round(ips, 2), peak_mem_gib=round(mem_peak(device), 2),
                   mfu=round(mfu(ips, plan.sizes, peak), 4) if peak else None)
        if not all(math.isfinite(x) for x in (rec["loss_first"], rec["loss_last"])):
            rec["warning"] = "non-finite loss"
        m = f", MFU {100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else ""
        print(f"        {ips:.1f} img/s, step {1e3 * rec['step_s_median']:.1f} ms (median of {rec['steps']}){m}, "
              f"host {1e3 * rec['cpu_s_per_step']:.0f} ms/step, peak {rec['peak_mem_gib']:.1f} GiB, "
              f"built in {rec['build_s']:.0f} s, loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f}", flush=True)
    except BudgetExceeded as e:  # the hard stop: recorded, and nothing more runs
        rec.update(status="stopped", error=str(e))
        print(f"        stopped: {e}", flush=True)
    except Exception as e:  # noqa: BLE001 - recorded; the next variant runs
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)
        rec.update(status="oom" if oom else "failed", error=f"{type(e).__name__}: {str(e)[:1500]}",
                   traceback=traceback.format_exc()[-4000:])
        print(f"        {rec['status']}: {rec['error'].splitlines()[0][:300]}", flush=True)
    finally:
        if isinstance(run, EngineRun):
            run.free()
        del run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def ratios(results: list[dict]) -> None:
    ok = {r["variant"]: r for r in results if r["status"] == "ok"}
    for r in ok.values():
        for ref in ("plain", "zero0"):
            if ref in ok and r["variant"] != ref:
                r[f"vs_{ref}"] = round(r["images_per_s"] / ok[ref]["images_per_s"], 3)


def table(results: list[dict]) -> str:
    head = (f"{'variant':<15}{'img/s':>8}{'MFU':>7}{'step ms':>9}{'host ms':>9}{'vs plain':>9}{'vs zero0':>9}"
            f"{'peak GiB':>9}{'est GiB':>8}{'build s':>8}  status")
    lines = [head, "-" * len(head)]
    for r in results:
        if r["status"] == "ok":
            m = f"{100 * r['mfu']:6.1f}%" if r.get("mfu") is not None else "    n/a"
            vs = "".join(f"{r[k]:>9.2f}" if k in r else f"{'-':>9}" for k in ("vs_plain", "vs_zero0"))
            est = f"{r['estimate_gib']:>8.1f}" if "estimate_gib" in r else f"{'-':>8}"
            lines.append(f"{r['variant']:<15}{r['images_per_s']:>8.1f}{m:>7}{1e3 * r['step_s_median']:>9.1f}"
                         f"{1e3 * r['cpu_s_per_step']:>9.0f}{vs}{r['peak_mem_gib']:>9.1f}{est}"
                         f"{r['build_s']:>8.0f}  ok")
        else:
            why = (r.get("error") or r.get("reason") or "").splitlines()[0][:110]
            lines.append(f"{r['variant']:<15}{'':>76}  {r['status']}: {why}")
    return "\n".join(lines)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON results (default stages.json; runs/stages_smoke.json with "
                   "--smoke)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run from process start "
                   "(default 165; 600 with --smoke)")
    p.add_argument("--grace", type=float, default=20.0, help="hard stop this many seconds after the budget")
    p.add_argument("--batch", type=int, default=None, help="micro batch (default 32; 4 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 3; 1 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; 2 with --smoke)")
    p.add_argument("--variant-cap", type=float, default=10.0, help="seconds of timed steps per variant (>= 3 steps)")
    p.add_argument("--only", nargs="*", default=None, help=f"variants to run, in this order's priority "
                   f"({' '.join(v.name for v in VARIANTS)})")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak if xtra_ds.costs.flops does not know the device")
    p.add_argument("--smoke", action="store_true", help="the micro model on the CPU: checks the code paths, not speed")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) for every variant")
    a = p.parse_args()
    a.budget = a.budget if a.budget is not None else (600.0 if a.smoke else 165.0)
    a.batch = a.batch or (4 if a.smoke else 32)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
    a.steps = a.steps or (2 if a.smoke else 10)
    a.out = a.out or (str(ROOT / "runs/stages_smoke.json") if a.smoke else "stages.json")
    a.deadline = T0 + a.budget
    unknown = set(a.only or ()) - {v.name for v in VARIANTS}
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; known: {[v.name for v in VARIANTS]}")
    return a


def main() -> int:
    a = parse_args()

    def hard_stop(signum, frame):
        raise BudgetExceeded(f"{signal.Signals(signum).name}: hard stop {time.monotonic() - T0:.0f} s after start")
    signal.signal(signal.SIGALRM, hard_stop)
    signal.signal(signal.SIGTERM, hard_stop)
    signal.alarm(max(1, int(a.budget + a.grace - (time.monotonic() - T0))))
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations, once per call
    single_rank_env()
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    cuda = torch.cuda.is_available() and not a.smoke
    if not cuda and not a.smoke:
        print("no CUDA device: this is a GPU benchmark (use --smoke to check it on the CPU)")
        return 2
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    init(rank_info())  # NCCL on a GPU, gloo on the CPU, as the builder does

    # qwZ is off for all: it needs DeepSpeed's quantizer built, and one rank gathers nothing to quantize
    # (bench_gpu_qwz.py measures its numerics); zero_stage < 3 refuses it anyway.
    base = [f"optim.micro_batch_size={a.batch}", f"optim.global_batch_size={a.batch}", "run_dir=runs/bench_gpu",
            "deepspeed.zero_quantized_weights=false", *a.overrides]
    cfg, plan = variant_config(a, base, VARIANTS[1])
    sizes = plan.sizes
    peak = a.peak_tflops * 1e12 if a.peak_tflops else (peak_flops(torch.cuda.get_device_name(device)) if cuda else None)
    report = {
        "what": "training step throughput on one device per ZeRO stage, and ZeRO-3 with one gather per block, "
                "against plain PyTorch; train_step on synthetic uint8 batches on the device",
        "smoke": a.smoke, "recipe": str((SMOKE_RECIPE if a.smoke else RECIPE).relative_to(ROOT)), "overrides": base,
        "model": cfg.model.name, "sizes": sizes.__dict__, "micro_batch": a.batch, "precision": cfg.deepspeed.precision,
        "grad_checkpointing": cfg.model.grad_checkpointing, "drop_path": cfg.model.drop_path,
        "attention": cfg.model.attention, "train_flops_per_image": train_flops_per_image(sizes), "peak_flops": peak,
        "budget_s": a.budget, "env": {**env_info(device), "deepspeed": deepspeed.__version__}, "results": [],
        "notes": ["MFU counts 3x the forward FLOPs; activation checkpointing's recomputation is not counted",
                  "host ms: process CPU seconds per timed step (all threads); near the step time, the step is "
                  "bound by Python, not by the device"],
    }
    print(f"{cfg.model.name} @ {sizes.img_size}px, micro batch {a.batch}, {cfg.deepspeed.precision}, checkpointing "
          f"{cfg.model.grad_checkpointing}; {train_flops_per_image(sizes) / 1e12:.3f} TFLOP per image; peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; budget {a.budget:.0f} s "
          f"({time.monotonic() - T0:.0f} s spent on imports)", flush=True)
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (a.batch, sizes.img_size, sizes.img_size, 3), dtype=torch.uint8, device=device,
                           generator=gen)
    est = {"plain": 15.0 if cuda else 2.0, "engine": 45.0 if cuda else 5.0, "step_s": 0.5}  # seconds, then measured
    plan_v = [v for v in VARIANTS if a.only is None or v.name in a.only]
    stopped = None
    for v in plan_v:
        if stopped:
            report["results"].append({"variant": v.name, "what": v.what, "status": "skipped", "reason": stopped})
            continue
        try:
            rec = measure(v, a, base, device, images, peak, est)
            report["results"].append(rec)
            if rec["status"] == "stopped":
                stopped = f"not run: {rec['error']}"
            ratios(report["results"])
            report["table"] = table(report["results"])
            write_json(out_path, report)
        except BudgetExceeded as e:  # the hard stop, between variants
            stopped = f"not run: {e}"
    signal.alarm(0)
    report["total_s"] = round(time.monotonic() - T0, 1)
    ratios(report["results"])
    report["table"] = table(report["results"])
    write_json(out_path, report)
    print("\n" + report["table"])
    print(f"results: {out_path} ({report['total_s']:.0f} s in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
