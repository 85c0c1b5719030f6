"""Bytes DeepSpeed really moves per training step, against the communication model's prediction.

    .venv/bin/python bench/bench_comm.py                                   # tiny_cpu on 2 and 4 ranks, B/16 on 4
    .venv/bin/python bench/bench_comm.py --recipe ds_configs/tiny_cpu.yaml --ranks 2 --set deepspeed.zero_stage=2

For each (recipe, ranks) it launches `deepspeed --num_gpus R` (CPU ranks, gloo) on this file, which builds
the training engine as the trainer does (the model under zero.Init, the recipe's ZeRO settings and
precision) with DeepSpeed's communication logger on, runs --warmup steps on a synthetic batch (ZeRO-3
records its parameter trace in the first ones), then --steps measured steps. What each collective moved
is summed per step on rank 0 — all-gathers as the gathered tensor (shard × ranks), reduce-scatters
as their input, all-reduces and broadcasts as the tensor — twice: as DeepSpeed's logger saw it, and
as torch.distributed itself was called (a wrapper, which also sees collectives that bypass
deepspeed.comm), next to xtra_ds.costs.comm's payloads for the same run.
"""

from __future__ import annotations

from _common import ROOT, write_json

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_RUNS = [("ds_configs/tiny_cpu.yaml", 2), ("ds_configs/tiny_cpu.yaml", 4),
                ("ds_configs/xtra_vit_b16_in1k.yaml", 4)]
# A run small enough for CPUs: one image per rank and micro step, fp32 for the tiny model (CPUs emulate
# bf16 slowly) and the recipe's own precision for B/16.
CPU = ["optim.micro_batch_size=1", "data.num_workers=0"]


def measured_config(recipe: str, world: int, accum: int, sets: list[str]):
    """The config a measuring rank builds: the recipe for a CPU run, ``--set`` overrides, and DeepSpeed's
    communication logger added to ``deepspeed.extra`` — merged into it, so that a ``--set deepspeed.extra=…``
    reaches the measured engine as it reaches the prediction (an override of ``deepspeed.extra`` replaces the
    whole mapping)."""
    from xtra_ds.config import load_config

    cfg = load_config(ROOT / recipe, [*CPU, f"optim.global_batch_size={world * accum}", *sets])
    cfg.deepspeed.extra = {**cfg.deepspeed.extra, "comms_logger": {"enabled": True, "prof_all": True}}
    return cfg


def worker(args) -> None:
    """One rank (started by the deepspeed launcher)."""
    import deepspeed.comm as dist
    import torch

    from xtra_ds.config import batch_plan, derive
    from xtra_ds.engine.builder import build_engine
    from xtra_ds.engine.dist import init_process_group
    from xtra_ds.engine.step import train_step
    from xtra_ds.objective import NextBlockLoss

    counted = count_torch_collectives()
    world = int(os.environ["WORLD_SIZE"])
    cfg = measured_config(args.recipe, world, args.accum, args.set)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    plan = derive(cfg, batch_plan(cfg.optim, world), data_samples=cfg.optim.global_batch_size)
    engine, _ = build_engine(cfg, plan)
    size = plan.sizes.img_size
    torch.manual_seed(dist.get_rank())
    batches = [{"images": torch.randint(0, 256, (plan.batch.micro_batch, size, size, 3), dtype=torch.uint8)}
               for _ in range(plan.batch.accum)]

    def step():
        train_step(engine, batches, loss_fn=NextBlockLoss(), lr=1e-4, order=None, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    dist.barrier()
    dist.comms_logger.comms_dict.clear()
    counted.clear()
    seconds = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t)
    seen = {op: v / args.steps for op, v in counted.items()}
    moved: dict[str, dict] = {}
    for op, sizes in dist.comms_logger.comms_dict.items():
        for msg, (count, *_) in sizes.items():
            factor = world if op.startswith("all_gather") else 1
            entry = moved.setdefault(op, {"bytes": 0, "calls": 0})
            entry["bytes"] += msg * factor * count / args.steps
            entry["calls"] += count / args.steps
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"moved": moved, "torch": seen, "world": world,
                                              "step_s": statistics.median(seconds),
                                              "accum": plan.batch.accum, "micro": plan.batch.micro_batch}))


def count_torch_collectives() -> dict[str, float]:
    """Bytes of every torch.distributed collective this process issues, whoever calls it (DeepSpeed's
    logger sees only what goes through deepspeed.comm): all-gathers as the gathered output,
    reduce-scatters as their input, the rest as their tensor."""
    import torch.distributed as tdist

    counted: dict[str, float] = {}

    def wrap(name, size_of):
        original = getattr(tdist, name)

        def counting(*a, **kw):
            counted[name] = counted.get(name, 0.0) + size_of(*a, **kw)
            return original(*a, **kw)
        setattr(tdist, name, counting)

    def nbytes(i, *names):  # the size of argument i (or of the keyword names) of the call
        def size(*a, **kw):
            t = a[i] if len(a) > i else next(kw[n] for n in names if n in kw)
            ts = t if isinstance(t, (list, tuple)) else [t]
            return sum(x.numel() * x.element_size() for x in ts)
        return size

    wrap("all_gather_into_tensor", nbytes(0, "output_tensor"))
    wrap("reduce_scatter_tensor", nbytes(1, "input"))
    wrap("all_reduce", nbytes(0, "tensor"))
    wrap("all_gather", nbytes(0, "tensor_list"))
    wrap("reduce_scatter", nbytes(1, "input_list"))
    wrap("all_to_all_single", nbytes(1, "input"))
    wrap("broadcast", nbytes(0, "tensor"))
    return counted


def measure(recipe: str, ranks: int, args) -> dict:
    from xtra_ds.engine.dist import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "moved.json"
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
               str(free_port()), __file__, "--worker", "--recipe", recipe, "--out", str(out), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--accum", str(args.accum), "--device", args.device]
        for s in args.set:
            cmd += ["--set", s]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def report(recipe: str, ranks: int, measured: dict, args) -> dict:
    from xtra_ds.config import load_config
    from xtra_ds.costs import step_payloads, zero_setup_from_config

    cfg = load_config(ROOT / recipe, [*CPU, f"optim.global_batch_size={ranks * args.accum}", *args.set])
    setup = zero_setup_from_config(cfg, ranks)
    predicted = step_payloads(setup, accum=measured["accum"])
    moved = measured["moved"]
    print(f"\n{Path(recipe).stem}, {ranks} ranks ({args.device}), ZeRO-{setup.stage} {cfg.deepspeed.precision}"
          f"{' + qwZ' if setup.qwz else ''}, {measured['accum']} micro step(s) of {measured['micro']} per rank, "
          f"median step {measured['step_s']:.3f} s; per optimizer step:")
    print(f"  {'collective':<24}{'logged MB':>11}{'torch MB':>10}{'predicted MB':>14}{'logged/predicted':>18}")
    for op in sorted(set(moved) | set(predicted) | set(measured["torch"])):
        m = moved.get(op, {}).get("bytes", 0.0)
        t = measured["torch"].get(op, 0.0)
        p = predicted.get(op, 0.0)
        ratio = f"{m / p:.3f}" if p else ("-" if not m else "not modelled")
        print(f"  {op:<24}{m / 1e6:>11.3f}{t / 1e6:>10.3f}{p / 1e6:>14.3f}{ratio:>18}")
    return {"recipe": recipe, "ranks": ranks, "overrides": args.set, "accum": measured["accum"],
            "step_s": measured["step_s"], "measured": {op: v["bytes"] for op, v in moved.items()},
            "torch": measured["torch"],
            "predicted": predicted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="one recipe (default: the three runs above)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring (ZeRO-3 traces its first)")
    parser.add_argument("--accum", type=int, default=1, help="micro steps per optimizer step")
    parser.add_argument("--set", action="append", default=[], help="a config override, e.g. deepspeed.zero_stage=2")
    parser.add_argument("--json", help="also write measured and predicted bytes to this file")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    runs = [(args.recipe, args.ranks)] if args.recipe else DEFAULT_RUNS
    results = [report(recipe, ranks, measure(recipe, ranks, args), args) for recipe, ranks in runs]
    if args.json:
        write_json(args.json, results[0] if len(results) == 1 else results, indent=1)


if __name__ == "__main__":
    main()
