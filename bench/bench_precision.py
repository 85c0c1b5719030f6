"""Does DeepSpeed's bf16 follow the fp32 loss curve as closely as the reference's bf16-mixed (autocast)?

    .venv/bin/python bench/bench_precision.py --steps 50                        # the micro model, 32 px
    .venv/bin/python bench/bench_precision.py --steps 50 --recipe tiny_cpu      # tiny_cpu's, 64 px

One rank, on the CPU, a recipe's model on scikit-learn's digits (at the recipe's resolution), the
same initial weights (the seed) and the same batches for every mode:

  fp32          plain PyTorch, fp32 (the reference curve)
  autocast      plain PyTorch, fp32 weights, torch.autocast bf16: the reference's Lightning bf16-mixed
  ds-bf16       the DeepSpeed ZeRO-3 engine with deepspeed.precision=bf16 (bf16 weights and gradients,
                fp32 master weights in the optimizer)
  ds-bf16-mixed the engine with deepspeed.precision=bf16-mixed (fp32 weights, DeepSpeed's torch_autocast)

Every mode runs the training step (xtra_ds.engine.step.train_step). Printed per mode: the loss at a
few steps, and the mean and max of |loss - fp32 loss| / fp32 loss over all steps.
"""

from __future__ import annotations

from _common import ROOT

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from xtra_ds.config import batch_plan, derive, load_config
from xtra_ds.data.build import train_loader, training_data
from xtra_ds.engine.builder import build_engine, build_model
from xtra_ds.engine.dist import init, rank_info, single_rank_env
from xtra_ds.engine.schedule import lr_at, param_groups
from xtra_ds.engine.step import PlainEngine, train_step
from xtra_ds.objective import NextBlockLoss

MODES = ("fp32", "autocast", "ds-bf16", "ds-bf16-mixed")


def batches(cfg, plan, steps: int) -> list[dict]:
    data = training_data(cfg.data)
    loader = iter(train_loader(cfg.data, data, seed=cfg.seed, rank=0, world_size=1,
                               global_batch=plan.batch.global_batch, img_size=plan.sizes.img_size))
    return [next(loader) for _ in range(steps)]


def trajectory(mode: str, cfg, plan, data: list[dict]) -> tuple[list[float], float]:
    cpu = torch.device("cpu")
    if mode.startswith("ds-"):
        precision = mode[len("ds-"):]
        engine, _ = build_engine(replace(cfg, deepspeed=replace(cfg.deepspeed, precision=precision)), plan)
        autocast = None  # the engine casts (bf16) or autocasts (bf16-mixed) by itself
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, plan.sizes)
        opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), betas=tuple(cfg.optim.betas),
                                eps=cfg.optim.eps)
        engine = PlainEngine(model, opt, accum=plan.batch.accum, grad_clip=cfg.optim.grad_clip)
        autocast = torch.bfloat16 if mode == "autocast" else None
    losses, t0 = [], time.perf_counter()
    for step, batch in enumerate(data):
        lr = lr_at(step, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps, peak_lr=cfg.optim.lr,
                   warmup_start_lr=cfg.schedule.warmup_start_lr, final_lr=cfg.schedule.final_lr)
        losses.append(train_step(engine, [batch], loss_fn=NextBlockLoss(), lr=lr, order=None, device=cpu,
                                 autocast=autocast).loss)
    return losses, (time.perf_counter() - t0) / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--recipe", default="test_micro", help="a recipe in ds_configs/ (its model and lr warm-up)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    recipe = ROOT / "ds_configs" / f"{args.recipe}.yaml"
    size = load_config(recipe).model.img_size
    subprocess.run([sys.executable, "-m", "data_prep.demo_corpus", "--digits", "--out", str(work / "img"),
                    "--size", str(size), "--shards", str(work / "digits")], check=True, capture_output=True,
                   cwd=ROOT)
    cfg = load_config(recipe,
                      [f"data.train={work / 'digits/train/manifest.json'}", "data.num_workers=0",
                       f"optim.global_batch_size={args.batch}", f"optim.micro_batch_size={args.batch}",
                       f"optim.lr={args.lr}", f"schedule.total_steps={args.steps}", "schedule.warmup_steps=5",
                       "model.grad_checkpointing=false"])
    single_rank_env()
    init(rank_info())
    plan = derive(cfg, batch_plan(cfg.optim, 1), data_samples=args.batch * args.steps)
    data = batches(cfg, plan, args.steps)
    torch.set_num_threads(2)
    curves, seconds = {}, {}
    for mode in MODES:
        curves[mode], seconds[mode] = trajectory(mode, cfg, plan, data)
        print(f"{mode:<14} done ({seconds[mode]:.2f} s/step)", flush=True)
    ref = curves["fp32"]
    marks = [s for s in (1, 10, 25, args.steps) if s <= args.steps]
    params = sum(p.numel() for p in build_model(cfg.model, plan.sizes).parameters())
    print(f"\n{args.steps} steps, batch {args.batch}, lr {args.lr:g}, {args.recipe}'s model ({params / 1e6:.2f}M "
          f"parameters, {plan.sizes.img_size}px), 1 rank, CPU")
    print(f"{'mode':<14}" + "".join(f"{'loss@' + str(s):>11}" for s in marks)
          + f"{'mean |rel dev|':>16}{'max |rel dev|':>15}{'s/step':>8}")
    for mode, losses in curves.items():
        dev = [abs(a - b) / b for a, b in zip(losses, ref, strict=True)]
        print(f"{mode:<14}" + "".join(f"{losses[s - 1]:>11.4f}" for s in marks)
              + f"{sum(dev) / len(dev):>16.2e}{max(dev):>15.2e}{seconds[mode]:>8.2f}")


if __name__ == "__main__":
    main()
