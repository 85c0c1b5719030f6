"""DeepSpeed engine overhead and consolidation memory, on the CPU, one rank.

    .venv/bin/python bench/bench_engine.py                      # both parts
    .venv/bin/python bench/bench_engine.py --part step --steps 20
    .venv/bin/python bench/bench_engine.py --part consolidate --model xtra_vit_base_patch16
    .venv/bin/python bench/bench_engine.py --part count                 # ZeRO-3's work per step, leaf off/on

step:        images/s of the training step (xtra_ds.engine.step.train_step) on a ZeRO-3 DeepSpeed engine built
             by the training builder vs on a plain PyTorch model + AdamW (PlainEngine): the tiny_cpu recipe's
             model, fp32, activation checkpointing on both, the same batch; the two alternate, median of the
             rounds; ratio = engine / plain, for ZeRO-3 with deepspeed.zero3_leaf_blocks off and on.
count:       what one ZeRO-3 optimizer step does, counted, with deepspeed.zero3_leaf_blocks off and on (and on with
             param_persistence_threshold=0), on 1 and 2 ranks (gloo; each layout in fresh processes, the ranks
             started as the launcher starts them), for the tiny_cpu recipe's model and B/16 at 64 px
             (--count-models): one micro batch of 4 images per rank, fp32; two steps after --warmup ones (ZeRO-3
             records and checks its module trace in the first two). Counted by wrapping, on rank 0: collectives
             (torch.distributed's functions, which DeepSpeed's comm backend calls; the caller named), ZeRO-3's
             module hooks (the four sub-module fetch/release functions its forward and backward hooks call) and
             host synchronisations (Tensor.item/tolist/__bool__/__float__/__int__/cpu/numpy, by calling file).
consolidate: builds a 1-rank ZeRO-3 checkpoint of --model (the B/16 recipe's engine, fp32), then runs
             launchers/consolidate.py in a fresh process and reports its peak RSS against the size of the
             fp32 file it wrote.
"""

from __future__ import annotations

from _common import ROOT, alternate, median_range, ratios

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
    from xtra_ds.config.deepspeed import deepspeed_dict
    from xtra_ds.engine.builder import build_engine, build_model
    from xtra_ds.engine.schedule import param_groups
    from xtra_ds.engine.step import PlainEngine, train_step
    from xtra_ds.objective import NextBlockLoss

    def recipe(leaf: bool):
        return load_config(ROOT / "ds_configs/tiny_cpu.yaml", ["optim.micro_batch_size=32",  # one micro batch a step
                                                               f"deepspeed.zero3_leaf_blocks={str(leaf).lower()}"])

    cfg = recipe(False)
    engine, plan = one_rank_engine(cfg)
    leaf_engine = build_engine(recipe(True), plan)[0]  # the same process group
    assert "leaf_module" in deepspeed_dict(recipe(True), plan.batch)["zero_optimization"]
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

    steppers = {"plain": plain, "leaf off": engine, "leaf on": leaf_engine}
    for which in steppers.values():
        step(which)
    runs = alternate({name: (lambda w=w: images_per_s(w)) for name, w in steppers.items()}, args.rounds)
    p = statistics.median(runs["plain"])
    params = sum(q.numel() for q in plain_model.parameters())
    print(f"tiny_cpu model ({params / 1e6:.1f}M params), batch {plan.batch.global_batch}, fp32, 1 rank, "
          f"the training step (xtra_ds.engine.step.train_step) on all; median of {args.rounds} alternating rounds "
          f"of {args.steps} steps")
    print(f"plain PyTorch step              {p:7.1f} img/s")
    for name in ("leaf off", "leaf on"):
        e = statistics.median(runs[name])
        print(f"ZeRO-3 engine step, {name:8s}    {e:7.1f} img/s   ratio engine/plain "
              f"{median_range(ratios(runs[name], runs['plain']))}")


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")  # what waits for the device
GATHERS = ("all_gather_into_tensor", "_all_gather_base", "all_gather", "all_gather_coalesced")
REDUCE_SCATTERS = ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter")
COLLECTIVES = (*GATHERS, *REDUCE_SCATTERS, "all_reduce", "broadcast", "reduce")
HOOKS = ("pre_sub_module_forward_function", "post_sub_module_forward_function",
         "pre_sub_module_backward_function", "post_sub_module_backward_function")


def _caller(depth: int = 2) -> str:
    """Who called the wrapped function: xtra_ds/engine/step.py, other xtra_ds, deepspeed or torch/other."""
    name = sys._getframe(depth).f_code.co_filename
    if name.endswith("xtra_ds/engine/step.py"):
        return "step.py"
    for part in ("xtra_ds", "deepspeed"):
        if f"/{part}/" in name:
            return part
    return "torch/other"


class Counting:
    """While entered: calls of the collectives, of the sub-module fetch/release functions ZeRO-3's module hooks
    call (on ``optimizer.parameter_offload``) and of the tensor methods that synchronise with the device, in
    ``counts`` as ``{what: {caller: n}}``; the collectives called inside ``optimizer._post_step`` under the
    caller ``"<caller> post-step"``. A collective called from inside another one (torch forwarding a call)
    counts once."""

    def __init__(self, optimizer):
        self.optimizer, self.offload = optimizer, optimizer.parameter_offload
        self.counts, self._depth, self._phase = {}, 0, None

    def _targets(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d
        from deepspeed.comm import comm as ds_comm

        for name in COLLECTIVES:
            for owner in (dist, c10d):
                if hasattr(owner, name):
                    yield owner, name, name, True
        for attr in ("all_gather_function", "reduce_scatter_function"):  # looked up once by DeepSpeed's backend
            fn = getattr(ds_comm.cdb, attr, None)
            if fn is not None:
                yield ds_comm.cdb, attr, fn.__name__, True
        for name in HOOKS:
            yield self.offload, name, name, False
        # re-gathers the persistent parameters after the update
        yield self.optimizer, "_post_step", "phase:post-step", False
        for name in SYNCS:
            yield torch.Tensor, name, name, False

    def _add(self, what: str, caller: str) -> None:
        by = self.counts.setdefault(what, {})
        by[caller] = by.get(caller, 0) + 1

    def _wrap(self, what, fn, collective: bool):
        if what.startswith("phase:"):  # the collectives called inside it are counted as its own
            def phase(*a, **k):
                self._phase = what[len("phase:"):]
                try:
                    return fn(*a, **k)
                finally:
                    self._phase = None
            return phase

        def wrapped(*a, **k):
            if self._depth == 0:
                self._add(what, f"{_caller()} {self._phase}" if collective and self._phase else _caller())
            if not collective:
                return fn(*a, **k)
            self._depth += 1
            try:
                return fn(*a, **k)
            finally:
                self._depth -= 1
        return wrapped

    def __enter__(self):
        self.counts, self._undo = {}, []
        for owner, name, what, collective in self._targets():
            original = getattr(owner, name)
            self._undo.append((owner, name, original, name in vars(owner)))  # else inherited/bound: delete
            setattr(owner, name, self._wrap(what, original, collective))
        return self

    def __exit__(self, *exc):
        for owner, name, original, own in reversed(self._undo):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def count_rank(args):
    """One rank of a --part count layout (RANK/WORLD_SIZE/MASTER_* set by the parent): rank 0 writes its
    counts of the last of two counted steps after --warmup ones to --out as JSON, and whether both agreed."""
    import json

    from deepspeed.utils import z3_leaf_module

    from xtra_ds.config import batch_plan, derive, load_config
    from xtra_ds.engine.builder import build_engine
    from xtra_ds.engine.step import train_step
    from xtra_ds.models.layers import Block
    from xtra_ds.objective import NextBlockLoss

    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(ROOT / COUNT_MODELS[args.count_model][0],
                      [*COUNT_MODELS[args.count_model][1], "deepspeed.precision=fp32", "deepspeed.zero_stage=3",
                       "model.drop_path=0", f"optim.global_batch_size={4 * world}", "optim.micro_batch_size=4",
                       f"deepspeed.zero3_leaf_blocks={args.leaf}",
                       *([f"deepspeed.param_persistence_threshold={args.persistence}"] * (args.persistence >= 0))])
    init_process_group("gloo")
    plan = derive(cfg, batch_plan(cfg.optim, world), data_samples=cfg.optim.global_batch_size)
    engine = build_engine(cfg, plan)[0]
    size = plan.sizes.img_size
    g = torch.Generator().manual_seed(int(os.environ["RANK"]))
    batch = {"images": torch.randint(0, 256, (plan.batch.micro_batch, size, size, 3), dtype=torch.uint8, generator=g)}

    def step():
        train_step(engine, [batch] * plan.batch.accum, loss_fn=NextBlockLoss(), lr=1e-4, order=None,
                   device=torch.device("cpu"))

    for _ in range(args.warmup):  # the first records ZeRO-3's trace of the modules
        step()
    counted = []
    for _ in range(2):  # the same counts twice: a steady state
        with Counting(engine.optimizer) as counting:
            step()
        counted.append(counting.counts)
    if os.environ["RANK"] == "0":
        modules = list(engine.module.modules())
        Path(args.out).write_text(json.dumps({
            "counts": counted[-1], "steady": counted[0] == counted[-1], "accum": plan.batch.accum,
            "modules": len(modules),
            "blocks": sum(isinstance(m, Block) for m in modules), "leaves": sum(map(z3_leaf_module, modules)),
            "params": sum(int(p.ds_numel) for p in engine.module.parameters())}))


COUNT_MODELS = {  # name: recipe, overrides
    "tiny_cpu": ("ds_configs/tiny_cpu.yaml", []),
    "b16_64px": ("ds_configs/xtra_vit_b16_in1k.yaml", ["model.img_size=64", "model.block_size=2"]),
}


COUNT_VARIANTS = {  # name: deepspeed.zero3_leaf_blocks, deepspeed.param_persistence_threshold (-1: the recipe's)
    "off": ("false", -1), "on": ("true", -1), "on+p0": ("true", 0)}


def part_count(args):
    import json

    def total(counts, names, who=None):
        return sum(n for name in names for caller, n in counts.get(name, {}).items() if who in (None, caller))

    print(f"one ZeRO-3 optimizer step (one micro batch of 4 images per rank, fp32, after {args.warmup} steps), counted "
          "on rank 0; leaf: deepspeed.zero3_leaf_blocks, +p0: param_persistence_threshold=0 (the recipe's otherwise)")
    print("all-gathers: 'fetch' = ZeRO-3's module fetches and prefetches, 'post-step' = the re-gather of the "
          "persistent parameters after the update (one collective per parameter); hooks: ZeRO-3's sub-module "
          "fetch/release calls; syncs: host synchronisations by caller")
    print(f"{'model':9s} {'ranks':>5s} {'leaf':>6s} {'blocks':>6s} | {'gathers':>7s} {'fetch':>5s} {'post':>5s} "
          f"{'red-sc':>6s} {'all-red':>7s} {'bcast':>5s} | {'hooks':>5s} | {'step.py':>7s} {'xtra_ds':>7s} "
          f"{'deepspeed':>9s} {'torch':>5s} | gathers ≤ blocks+4")
    for model in args.count_models.split(","):
        for world in (1, 2):
            for variant in args.count_variants.split(","):
                leaf, persistence = COUNT_VARIANTS[variant]
                out = Path(tempfile.mkdtemp(prefix="bench-count-")) / "counts.json"
                port = str(free_port())
                procs = [subprocess.Popen([sys.executable, __file__, "--part", "count-rank", "--count-model", model,
                                           "--leaf", leaf, "--persistence", str(persistence), "--out", str(out),
                                           "--warmup", str(args.warmup)],
                                          env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r),
                                               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                         for r in range(world)]
                outs = [p.communicate()[0] for p in procs]
                if any(p.returncode for p in procs):
                    raise SystemExit("\n".join(outs))
                res = json.loads(out.read_text())
                c = res["counts"]
                gathers = total(c, GATHERS)
                post = sum(n for name in GATHERS for who, n in c.get(name, {}).items() if who.endswith(" post-step"))
                syncs = [total(c, SYNCS, who) for who in ("step.py", "xtra_ds", "deepspeed", "torch/other")]
                goal = res["blocks"] + 4
                print(f"{model:9s} {world:5d} {variant:>6s} {res['blocks']:6d} | {gathers:7d} {gathers - post:5d} "
                      f"{post:5d} {total(c, REDUCE_SCATTERS):6d} {total(c, ('all_reduce',)):7d} "
                      f"{total(c, ('broadcast',)):5d} | {total(c, HOOKS):5d} | {syncs[0]:7d} {syncs[1]:7d} "
                      f"{syncs[2]:9d} {syncs[3]:5d} | {'met' if gathers <= goal else 'not met'} (≤{goal})"
                      f"{'' if res['steady'] else '  (the two counted steps differ)'}",
                      flush=True)
                if args.verbose:
                    print("   ", json.dumps(c, sort_keys=True), flush=True)


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
    parser.add_argument("--part", choices=["step", "consolidate", "both", "count", "count-rank"], default="both")
    parser.add_argument("--count-models", default="tiny_cpu,b16_64px",
                        help="--part count: of " + ",".join(COUNT_MODELS))
    parser.add_argument("--count-variants", default="off,on,on+p0",
                        help="--part count: of " + ",".join(COUNT_VARIANTS))
    parser.add_argument("--verbose", action="store_true", help="--part count: every function by caller too")
    parser.add_argument("--count-model", choices=sorted(COUNT_MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--leaf", choices=["true", "false"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--persistence", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2,
                        help="--part count: steps before the two counted (ZeRO-3 records its trace of the modules "
                             "in the first and checks it across the ranks at the end of the second)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="xtra_vit_base_patch16")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: $TMPDIR)")
    args = parser.parse_args()
    if args.part == "count":
        return part_count(args)
    if args.part == "count-rank":
        return count_rank(args)
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
