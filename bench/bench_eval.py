"""The eval worker's cost: one export's quick probes against the tiny recipe's export interval.

    .venv/bin/python bench/bench_eval.py                       # CPU: both parts
    .venv/bin/python bench/bench_eval.py --part features --device cuda --models tiny,h14   # a GPU

export:   trains the tiny_cpu recipe with 2 CPU ranks under the deepspeed launcher on the digits
          corpus for a few steps (its median step time × checkpoint.export_every = the export
          interval, measured in this run), then evaluates its export with the worker's quick
          probes (linear + attentive, eval.lrs side by side, eval.epochs) on the idle machine:
          first evaluation (decodes the eval set) and the steady state (set cached), repeated.
          Ratio = steady-state evaluation time / export interval.
features: feature-extraction images/s (normalisation + one encoder forward for both probes'
          inputs, as the worker runs it) of a randomly initialised encoder on random uint8 images, per model.
"""

from __future__ import annotations

from _common import ROOT, write_json

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

RECIPES = {"tiny": "tiny_cpu", "b16": "xtra_vit_b16_in1k", "h14": "xtra_vit_h14_in21k"}  # models by their recipe


def digits_shards(root: Path) -> tuple[str, str]:
    subprocess.run([sys.executable, "-m", "data_prep.demo_corpus", "--digits", "--out", str(root / "img"),
                    "--size", "64", "--shards", str(root)], check=True, capture_output=True, cwd=ROOT)
    return str(root / "train/manifest.json"), str(root / "val/manifest.json")


def part_export(args) -> dict:
    from xtra_ds.config import load_config
    from xtra_ds.eval.worker import EvalWorker
    from xtra_ds.rundir import RunDir

    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    train, val = digits_shards(tmp)
    run = tmp / "run"
    cfg = load_config(ROOT / "ds_configs/tiny_cpu.yaml")
    every = cfg.checkpoint.export_every
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", str(ROOT / "launchers/pretrain.py"),
           "--config", str(ROOT / "ds_configs/tiny_cpu.yaml"), f"data.train={train}", f"run_dir={run}",
           f"schedule.total_steps={args.steps}", "logging.log_every=1", "checkpoint.every_steps=0"]
    print(f"training {args.steps} steps of tiny_cpu (2 CPU ranks) for its step time ...", flush=True)
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "perf/step_time" in r]
    step_time = statistics.median(r["perf/step_time"] for r in rows[2:])  # the first steps warm up
    interval = step_time * every
    worker = EvalWorker(RunDir(run), replace(cfg.eval, train=train, val=val, device="cpu"), tb_dir=str(tmp / "tb"))
    torch.set_num_threads(args.threads)
    export = worker.run.exports()[0][-1]
    t0 = time.perf_counter()
    worker.evaluator.evaluate(export)  # decodes and caches the eval set
    first_s = time.perf_counter() - t0
    steady = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = worker.evaluator.evaluate(export)
        steady.append(time.perf_counter() - t0)
    s = statistics.median(steady)
    out = {"step_time_s": step_time, "export_every": every, "export_interval_s": interval,
           "eval_first_s": first_s, "eval_steady_s": s, "ratio_eval_over_interval": s / interval,
           "feature_images_per_sec": res["feature_images_per_sec"], "threads": args.threads,
           "images": res["train_images"] + res["val_images"],
           "top1": {k: r["top1"] for k, r in res["probes"].items()}}
    print(f"tiny_cpu: step {step_time:.2f} s × export_every {every} = export interval {interval:.1f} s")
    print(f"one export, quick probes ({res['train_images']} + {res['val_images']} digits, {args.threads} thread(s)): "
          f"first {first_s:.1f} s (decodes the set), steady {s:.1f} s (median of {args.repeats}); "
          f"features {res['feature_images_per_sec']:.0f} img/s")
    print(f"ratio eval / export interval = {s / interval:.2f}")
    return out


def part_features(args) -> dict:
    from xtra_ds.config import load_config, sizes_from_config
    from xtra_ds.eval.features import probe_inputs
    from xtra_ds.models.xtra import XTRAEncoder

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    out = {}
    for key in args.models.split(","):
        cfg = load_config(ROOT / "ds_configs" / f"{RECIPES[key]}.yaml")
        name = cfg.model.name
        enc = XTRAEncoder(sizes_from_config(cfg.model, cfg.objective)).eval().to(device)
        s = enc.sizes
        bs = args.batch if device.type == "cuda" else min(args.batch, 64)
        x = torch.randint(0, 256, (bs, s.img_size, s.img_size, 3), dtype=torch.uint8, device=device)
        times = []
        for i in range(args.iters + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            probe_inputs(enc, x, 6, True)["attentive"].to(torch.float16)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        ips = bs / statistics.median(times)
        out[key] = {"model": name, "img_size": s.img_size, "batch": bs, "images_per_sec": ips, "device": str(device)}
        print(f"features {name} @{s.img_size}px, batch {bs}, {device}: {ips:.0f} images/s", flush=True)
        del enc, x
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["export", "features", "all"], default="all")
    parser.add_argument("--steps", type=int, default=12, help="training steps measured for the step time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the evaluation")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    res = {}
    if args.part in ("export", "all"):
        res["export"] = part_export(args)
    if args.part in ("features", "all"):
        res["features"] = part_features(args)
    if args.out:
        write_json(args.out, res, indent=1)


if __name__ == "__main__":
    main()
