"""DeepSpeed engine overhead and consolidation memory, on the CPU, one rank.

    .venv/bin/python bench/bench_engine.py                      # both parts
    .venv/bin/python bench/bench_engine.py --part step --steps 20
    .venv/bin/python bench/bench_engine.py --part consolidate --model xtra_vit_base_patch16

step:        images/s of the training step (xtra_ds.engine.step.train_step) on a ZeRO-3 DeepSpeed engine built
             by the training builder vs on a plain PyTorch model + AdamW (PlainEngine): the tiny_cpu recipe's
             model, fp32, activation checkpointing on both, the same batch; the two alternate, median of the
             rounds; ratio = engine / plain.
consolidate: builds a 1-rank ZeRO-3 checkpoint of --model (the B/16 recipe's engine, fp32), then runs
             launchers/consolidate.py in a fresh process and reports its peak RSS against the size of the
             fp32 file it wrote.
"""

from __future__ import annotations

from _common import ROOT, alternate

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from xtra_ds.engine.dist import free_port, init_process_group, single_rank_env


def one_rank_engine(cfg):
    """A 1-rank DeepSpeed engine of ``cfg``, built by the training builder, and the run's plan."""
    from xtra_ds.config import batch_plan, derive
    from xtra_ds.engine.builder import build_engine

    single_rank_env()
    init_process_group("gloo")
    plan = derive(cfg, batch_plan(cfg.optim, 1), data_samples=cfg.optim.global_batch_size)
    return build_engine(cfg, plan)[0], plan


def part_step(args):
    from xtra_ds.config import load_config
    from xtra_ds.engine.builder import build_model
    from xtra_ds.engine.schedule import param_groups
    from xtra_ds.engine.step import PlainEngine, train_step
    from xtra_ds.objective import NextBlockLoss

    cfg = load_config(ROOT / "ds_configs/tiny_cpu.yaml", ["optim.micro_batch_size=32"])  # one micro batch per step
    engine, plan = one_rank_engine(cfg)
    torch.manual_seed(cfg.seed)
    plain_model = build_model(cfg.model, plan.sizes)
    opt = torch.optim.AdamW(param_groups(plain_model, cfg.optim.weight_decay), lr=1e-4, betas=tuple(cfg.optim.betas))
    plain = PlainEngine(plain_model, opt, accum=plan.batch.accum, grad_clip=cfg.optim.grad_clip)
    size = plan.sizes.img_size
    batch = {"images": torch.randint(0, 256, (plan.batch.global_batch, size, size, 3), dtype=torch.uint8)}
    loss_fn, cpu = NextBlockLoss(), torch.device("cpu")

    def step(which):
        train_step(which, [batch], loss_fn=loss_fn, lr=1e-4, order=None, device=cpu)

    def images_per_s(which) -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            step(which)
        return args.steps * plan.batch.global_batch / (time.perf_counter() - t)

    for which in (plain, engine):
        step(which)
    runs = alternate({"plain": lambda: images_per_s(plain), "engine": lambda: images_per_s(engine)}, args.rounds)
    p, e = statistics.median(runs["plain"]), statistics.median(runs["engine"])
    params = sum(q.numel() for q in plain_model.parameters())
    print(f"tiny_cpu model ({params / 1e6:.1f}M params), batch {plan.batch.global_batch}, fp32, 1 rank, "
          f"the training step (xtra_ds.engine.step.train_step) on both")
    print(f"plain PyTorch step   {p:7.1f} img/s")
    print(f"ZeRO-3 engine step   {e:7.1f} img/s   ratio engine/plain {e / p:.2f}")


def part_consolidate(args):
    from xtra_ds.config import load_config

    work = Path(tempfile.mkdtemp(prefix="bench-consolidate-", dir=args.workdir))
    cfg = load_config(ROOT / "ds_configs/xtra_vit_b16_in1k.yaml",
                      [f"model.name={args.model}", "model.img_size=0", "optim.global_batch_size=1",
                       "optim.micro_batch_size=1", "deepspeed.precision=fp32"])
    engine, _ = one_rank_engine(cfg)
    engine.save_checkpoint(str(work / "checkpoints"), tag="step_00000000")
    del engine
    ckpt_bytes = sum(f.stat().st_size for f in (work / "checkpoints").rglob("*") if f.is_file())
    out = work / "model.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "launchers/consolidate.py"), str(work / "checkpoints/step_00000000"),
                        "-o", str(out)], capture_output=True, text=True, check=True)
    line = r.stdout.strip().splitlines()[-1]
    peak = float(line.split("peak memory ")[1].split(" MB")[0]) * 1e6
    size = out.stat().st_size
    print(f"{args.model}: checkpoint {ckpt_bytes / 1e9:.2f} GB on disk; consolidated fp32 file {size / 1e9:.2f} GB")
    print(f"consolidation peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x the output "
          f"(the process's Python + torch + DeepSpeed baseline included)")
    import shutil
    shutil.rmtree(work)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["step", "consolidate", "both"], default="both")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="xtra_vit_base_patch16")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: $TMPDIR)")
    args = parser.parse_args()
    if args.part in ("step", "both"):
        part_step(args)
    if args.part in ("consolidate", "both"):
        if args.part == "both":  # a fresh process: one process group per process
            env = {**os.environ, "MASTER_PORT": str(free_port())}
            subprocess.run([sys.executable, __file__, "--part", "consolidate", "--model", args.model]
                           + (["--workdir", args.workdir] if args.workdir else []), check=True, env=env)
        else:
            part_consolidate(args)


if __name__ == "__main__":
    main()
