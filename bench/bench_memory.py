"""Bytes per parameter a rank holds for its model states, measured, against the pre-flight estimate.

    .venv/bin/python bench/bench_memory.py --model xtra_vit_base_patch16 --precision bf16
    .venv/bin/python bench/bench_memory.py --model xtra_vit_base_patch16 --precision fp32

One rank, on the CPU: the resident memory (VmRSS) of this process before the engine exists, after
the training builder has built it, and after one optimizer step (Adam's moments are made at the
first step), at 64 px (so that activations are small next to the model states). Printed: bytes per
parameter at each point, and the ratio to xtra_ds.costs.memory.estimate (the figure the pre-flight
check compares with the device's memory).
"""

from __future__ import annotations

from _common import ROOT

import argparse

import torch

from xtra_ds.config import batch_plan, derive, load_config
from xtra_ds.costs import RUNTIME_BYTES, estimate, process_rss
from xtra_ds.engine.builder import build_engine
from xtra_ds.engine.dist import init, rank_info, single_rank_env
from xtra_ds.engine.step import train_step
from xtra_ds.objective import NextBlockLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="xtra_vit_base_patch16")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--stage", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(ROOT / "ds_configs/xtra_vit_b16_in1k.yaml",
                      [f"model.name={args.model}", "model.img_size=64", "model.block_size=2",
                       "optim.global_batch_size=2", "optim.micro_batch_size=2", f"deepspeed.precision={args.precision}",
                       f"deepspeed.zero_stage={args.stage}"])
    single_rank_env()
    init(rank_info())
    plan = derive(cfg, batch_plan(cfg.optim, 1), data_samples=2)
    before = process_rss()
    engine, _ = build_engine(cfg, plan)
    built = process_rss()
    n = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    train_step(engine, [{"images": images}], loss_fn=NextBlockLoss(), lr=1e-4, order=None, device=torch.device("cpu"))
    stepped = process_rss()
    est = estimate(cfg, plan, n)
    buckets = est.working - RUNTIME_BYTES
    print(f"{args.model} ({n / 1e6:.1f}M parameters), {args.precision}, ZeRO-{args.stage}, 1 rank, CPU")
    print(f"runtime before the engine: {before / 2**30:.2f} GiB")
    print(f"built:      {(built - before) / n:5.1f} bytes/parameter")
    print(f"one step:   {(stepped - before) / n:5.1f} bytes/parameter  (RSS {stepped / 2**30:.2f} GiB)")
    print(f"estimate:   {est.model_states / n:5.1f} bytes/parameter of model states + {buckets / n:.1f} of buckets and "
          f"gathered parameters = {(est.model_states + buckets) / n:.1f};  measured / estimate = "
          f"{(stepped - before) / (est.model_states + buckets):.2f}")


if __name__ == "__main__":
    main()
