"""Re-partitioning a ZeRO-3 checkpoint for another world size, against consolidating the same checkpoint.

    .venv/bin/python bench/bench_reshard.py                  # XTRA-B/16, saved by 1 rank, re-partitioned for 2

Makes (once, in bench/.ckpt_b16/) a 1-rank bf16 ZeRO-3 checkpoint of XTRA-B/16 after one optimizer step
(64 px inputs: the model states are the full model's), then runs, each in a fresh process, alternating
over --rounds: the consolidation to one fp32 safetensors file (launchers/consolidate.py), and the
re-partitioning for 2 ranks — each new rank's files written by its own process, as at a resume
(xtra_ds.interop.reshard_rank). Printed: wall time and peak resident memory (VmHWM) of each, and the
ratios (re-partition, per rank / consolidation) within each round, median over rounds.
"""

from __future__ import annotations

from _common import ROOT, alternate, ratios

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CKPT = ROOT / "bench/.ckpt_b16"

# Each program below runs in a fresh process (python -c, in the repository: it is first on that process's sys.path).
MAKE = """
import torch
from xtra_ds.config import batch_plan, derive, load_config
from xtra_ds.engine.builder import build_engine
from xtra_ds.engine.dist import init, rank_info, single_rank_env
from xtra_ds.engine.step import train_step
from xtra_ds.objective import NextBlockLoss
cfg = load_config({recipe!r}, ["model.img_size=64", "model.block_size=2", "optim.global_batch_size=2",
                               "optim.micro_batch_size=2"])
single_rank_env(); init(rank_info())
engine, _ = build_engine(cfg, derive(cfg, batch_plan(cfg.optim, 1), data_samples=2))
images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
train_step(engine, [{{"images": images}}], loss_fn=NextBlockLoss(), lr=1e-4, order=None, device=torch.device("cpu"))
engine.save_checkpoint({out!r}, tag="step_00000001")
print(sum(p.ds_numel for p in engine.module.parameters()))
"""

RESHARD = """
import json, time
from xtra_ds.interop import ZeroCheckpoint, reshard_rank
t = time.perf_counter()
reshard_rank(ZeroCheckpoint({ckpt!r}), {world}, {rank}, {out!r})
dt = time.perf_counter() - t
hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({{"seconds": dt, "peak": hwm}}))
"""

CONSOLIDATE = """
import json, time
from xtra_ds.interop import consolidate
t = time.perf_counter()
consolidate({ckpt!r}, {out!r})
dt = time.perf_counter() - t
hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({{"seconds": dt, "peak": hwm}}))
"""

BASELINE = """
import json
import torch, deepspeed, xtra_ds.interop  # what both sides import, before any work
hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({"peak": hwm}))
"""  # run as it is (the others are templates for str.format)


def python(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world", type=int, default=2, help="the new world size")
    args = parser.parse_args()
    folder = CKPT / "step_00000001"
    if not (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists():
        shutil.rmtree(CKPT, ignore_errors=True)
        r = subprocess.run([sys.executable, "-c", MAKE.format(out=str(CKPT),
                                                              recipe=str(ROOT / "ds_configs/xtra_vit_b16_in1k.yaml"))],
                           capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
    size = sum(f.stat().st_size for f in folder.iterdir())
    base = python(BASELINE)["peak"]

    def consolidation() -> dict:
        with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
            return python(CONSOLIDATE.format(ckpt=str(folder), out=f"{tmp}/model.safetensors"))

    def repartition() -> dict:
        with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
            t = time.perf_counter()
            ranks = [python(RESHARD.format(ckpt=str(folder), world=args.world, rank=r, out=tmp))
                     for r in range(args.world)]
            return {"seconds": max(x["seconds"] for x in ranks), "peak": max(x["peak"] for x in ranks),
                    "all_ranks": time.perf_counter() - t}

    rows = alternate({"consolidate": consolidation, "reshard": repartition}, args.rounds)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    time_ratio = statistics.median(ratios([r["seconds"] for r in rows["reshard"]],
                                          [c["seconds"] for c in rows["consolidate"]]))
    mem_ratio = statistics.median(ratios([r["peak"] - base for r in rows["reshard"]],
                                         [c["peak"] - base for c in rows["consolidate"]]))
    gib = 2**30
    print(f"XTRA-B/16 ZeRO-3 bf16 checkpoint saved by 1 rank: {size / gib:.2f} GiB on disk; "
          f"{args.rounds} rounds; imports alone peak at {base / gib:.2f} GiB")
    print(f"consolidate (one fp32 safetensors)   {med['consolidate']['seconds']:6.1f} s   "
          f"peak {med['consolidate']['peak'] / gib:.2f} GiB")
    print(f"re-partition for {args.world} ranks, per rank    {med['reshard']['seconds']:6.1f} s   "
          f"peak {med['reshard']['peak'] / gib:.2f} GiB   (all ranks one after another: "
          f"{med['reshard']['all_ranks']:.1f} s)")
    print(f"re-partition / consolidate: time {time_ratio:.2f}, peak memory above the imports {mem_ratio:.2f}")


if __name__ == "__main__":
    main()
