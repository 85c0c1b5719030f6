"""DeepSpeed engine overhead and consolidation memory, on the CPU, one rank.

    .venv/bin/python bench/bench_engine.py                      # both parts
    .venv/bin/python bench/bench_engine.py --part step --steps 20
    .venv/bin/python bench/bench_engine.py --part consolidate --model xtra_vit_base_patch16

step:        images/s of a ZeRO-3 DeepSpeed engine step vs a plain PyTorch AdamW step of the same
             model (tiny_cpu recipe's, fp32, activation checkpointing on both) and the same batch;
             the two alternate, median of the rounds; ratio = engine / plain.
consolidate: builds a 1-rank ZeRO-3 checkpoint of --model, then runs launchers/consolidate.py in
             a fresh process and reports its peak RSS against the size of the fp32 file it wrote.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xtra_ds.engine.dist import free_port, single_rank_env


def engine_for(model, micro: int):
    import deepspeed

    from xtra_ds.engine.schedule import param_groups
    cfg = {"train_batch_size": micro, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def part_step(a):
    import deepspeed

    from xtra_ds.config import load_config
    from xtra_ds.engine.schedule import param_groups
    from xtra_ds.models.build import build_model
    from xtra_ds.objective import NextBlockLoss

    single_rank_env()
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(ROOT / "ds_configs/tiny_cpu.yaml")
    torch.manual_seed(0)
    plain = build_model(cfg)
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
        torch.manual_seed(0)
        dsm = build_model(cfg)
    engine = engine_for(dsm, cfg.optim.global_batch_size)
    opt = torch.optim.AdamW(param_groups(plain, 0.05), lr=1e-4, betas=(0.9, 0.95))
    loss_fn = NextBlockLoss()
    x = torch.randn(cfg.optim.global_batch_size, 3, 64, 64)

    def plain_step():
        out = plain(x)
        loss = loss_fn(out.preds, out.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()

    def engine_step():
        out = engine(x)
        engine.backward(loss_fn(out.preds, out.targets))
        engine.step()

    for f in (plain_step, engine_step):
        f()
    runs = {"plain": [], "engine": []}
    for _ in range(a.rounds):
        for name, f in (("plain", plain_step), ("engine", engine_step)):
            t = time.perf_counter()
            for _ in range(a.steps):
                f()
            runs[name].append(a.steps * len(x) / (time.perf_counter() - t))
    p, e = statistics.median(runs["plain"]), statistics.median(runs["engine"])
    print(f"tiny_cpu model ({sum(q.numel() for q in plain.parameters()) / 1e6:.1f}M params), batch {len(x)}, fp32, 1 rank")
    print(f"plain PyTorch step   {p:7.1f} img/s")
    print(f"ZeRO-3 engine step   {e:7.1f} img/s   ratio engine/plain {e / p:.2f}")


def part_consolidate(a):
    import deepspeed

    from xtra_ds.models import create_model

    single_rank_env()
    deepspeed.init_distributed(dist_backend="gloo")
    work = Path(tempfile.mkdtemp(prefix="bench-consolidate-", dir=a.workdir))
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
        model = create_model(a.model)
    engine = engine_for(model, 1)
    engine.save_checkpoint(str(work / "checkpoints"), tag="step_00000000")
    del engine, model
    ckpt_bytes = sum(f.stat().st_size for f in (work / "checkpoints").rglob("*") if f.is_file())
    out = work / "model.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "launchers/consolidate.py"), str(work / "checkpoints/step_00000000"),
                        "-o", str(out)], capture_output=True, text=True, check=True)
    line = r.stdout.strip().splitlines()[-1]
    peak = float(line.split("peak memory ")[1].split(" MB")[0]) * 1e6
    size = out.stat().st_size
    print(f"{a.model}: checkpoint {ckpt_bytes / 1e9:.2f} GB on disk; consolidated fp32 file {size / 1e9:.2f} GB")
    print(f"consolidation peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x the output "
          f"(the process's Python + torch + DeepSpeed baseline included)")
    import shutil
    shutil.rmtree(work)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["step", "consolidate", "both"], default="both")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="xtra_vit_base_patch16")
    p.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: $TMPDIR)")
    a = p.parse_args()
    if a.part in ("step", "both"):
        part_step(a)
    if a.part in ("consolidate", "both"):
        if a.part == "both":  # a fresh process: one process group per process
            env = {**os.environ, "MASTER_PORT": str(free_port())}
            subprocess.run([sys.executable, __file__, "--part", "consolidate", "--model", a.model]
                           + (["--workdir", a.workdir] if a.workdir else []), check=True, env=env)
        else:
            part_consolidate(a)


if __name__ == "__main__":
    main()
