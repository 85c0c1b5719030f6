"""What forensics and telemetry add to a step that does not log, as a share of the step, measured in the same run.

Every step, logged or not, the trainer (xtra_ds/engine/trainer.py, step.py) now also
  * computes each image's loss and the loss by block position (``NextBlockLoss.terms``: one pass without
    gradients over the predictions the forward already made),
  * digests the keys of its share (``keys_digest``; the sum over the ranks rides in the skip decision's
    all-reduce, one more int64 in a tensor already sent: no collective of its own) and, on rank 0, writes
    that step's ``metrics.jsonl`` row (written and flushed),
  * ticks the hang watchdog, adds the step to the log window (the loss by position summed on the device)
    and feeds the loss-spike detector.
Baseline: the step itself — forward, loss, backward, AdamW — of a recipe's model on one rank's micro batch.
The smallest recipe (tiny_cpu: 6M parameters at 64 px, 16 images) has the shortest step, so its ratios are the
largest any recipe sees; ``--recipe`` takes another. The rounds alternate (this machine is shared and its speed
drifts); each ratio is taken within a round. The watchdog's thread wakes once a second to compare two numbers
and is not counted.

    .venv/bin/python bench/bench_telemetry.py
    .venv/bin/python bench/bench_telemetry.py --recipe ds_configs/xtra_vit_b16_in1k.yaml --batch 4 --rounds 3
"""

from __future__ import annotations

from _common import ROOT, alternate, median_range, ratios, timed

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from xtra_ds.config import batch_plan, derive, load_config
from xtra_ds.data import keys_digest
from xtra_ds.engine.builder import build_model
from xtra_ds.engine.incidents import SpikeDetector
from xtra_ds.engine.metrics import Window
from xtra_ds.engine.watchdog import HangWatchdog
from xtra_ds.objective import NextBlockLoss

REPEATS = 200  # the per-step bookkeeping takes microseconds: timed over this many steps' worth, then divided


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "ds_configs/tiny_cpu.yaml"))
    p.add_argument("--batch", type=int, default=0, help="images per micro batch (default: the recipe's)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    cfg = load_config(a.recipe)
    plan = derive(cfg, batch_plan(cfg.optim, 1), data_samples=10**6)
    batch = a.batch or cfg.optim.micro_batch_size
    torch.manual_seed(0)
    model = build_model(cfg.model, plan.sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = NextBlockLoss(cfg.objective.loss)
    x = torch.randn(batch, 3, plan.sizes.img_size, plan.sizes.img_size)
    keys = [f"{i:010d}" for i in range(batch)]  # data_prep's keys: ten digits
    held = {}

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss_fn(out.preds, out.targets).backward()
        opt.step()
        held["out"] = out

    def terms():
        t = loss_fn.terms(held["out"].preds, held["out"].targets)
        t.per_sample.sum().item()  # as the step's host synchronisation would wait for it

    with tempfile.TemporaryDirectory() as tmp:
        jsonl = open(Path(tmp) / "metrics.jsonl", "a")
        watchdog = HangWatchdog(Path(tmp), 0, 1, timeout_s=3600)  # not started: only its tick is timed
        window, spikes = Window(), SpikeDetector(8.0, 200)
        per_block = torch.rand(plan.sizes.num_blocks - 1)
        counter = iter(range(10**9))

        def digest_and_row():
            for _ in range(REPEATS):
                d = keys_digest(keys)
                jsonl.write(json.dumps({"step": next(counter), "data/keys_digest": d}) + "\n")
                jsonl.flush()

        def bookkeeping():
            for _ in range(REPEATS):
                n = next(counter)
                watchdog.tick(n)
                window.add(0.1, 0.0, per_block)
                spikes.observe(1.0 / (1 + n % 7))

        step(), terms(), digest_and_row(), bookkeeping()  # warm-up
        runs = alternate({"step": lambda: timed(step), "terms": lambda: timed(terms),
                          "digest": lambda: timed(digest_and_row) / REPEATS,
                          "book": lambda: timed(bookkeeping) / REPEATS}, a.rounds)
        jsonl.close()
    share = {k: ratios(runs[k], runs["step"]) for k in ("terms", "digest", "book")}
    total = [sum(v) for v in zip(*share.values(), strict=True)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cfg.model.name} at "
          f"{plan.sizes.img_size} px, {batch} images per micro batch; {a.rounds} rounds")
    print(f"  the step (forward, loss, backward, AdamW): {statistics.median(runs['step']) * 1e3:.1f} ms (median)")
    rows = [("per-image and per-position loss terms", "terms"), ("key digest + metrics.jsonl row", "digest"),
            ("watchdog tick, window, spike detector", "book")]
    for label, k in rows:
        print(f"  {label:<40} {statistics.median(runs[k]) * 1e6:>9.1f} µs  {100 * statistics.median(share[k]):.3f}% "
              f"of the step (rounds {100 * min(share[k]):.3f}–{100 * max(share[k]):.3f}%)")
    print(f"  all of it, as a share of the step: {100 * statistics.median(total):.3f}% "
          f"(rounds {100 * min(total):.3f}–{100 * max(total):.3f}%); ratio step+telemetry/step "
          f"{median_range([1 + t for t in total])}")
    if a.json:
        from _common import write_json

        write_json(a.json, {"recipe": a.recipe, "batch": batch, "rounds": runs, "share": share, "total": total,
                            "when": time.strftime("%Y-%m-%d %H:%M:%S")})


if __name__ == "__main__":
    main()
