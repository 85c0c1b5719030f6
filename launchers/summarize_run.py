"""Print what a run reached: loss drop, throughput, checkpoints, probe top-1 per export, and how to look at it.

    .venv/bin/python launchers/summarize_run.py runs/demo/tiny_cpu
"""

import json
import sys
from pathlib import Path

from xtra_ds.config import load_config
from xtra_ds.eval.ledger import Ledger
from xtra_ds.rundir import CONFIG, METRICS, LedgerEntry, RunDir, tag_of


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(run_dir: str) -> int:
    run = RunDir(run_dir)
    rows = read_jsonl(run.local_path(METRICS))
    if not rows:
        print(f"{run}: no metrics yet")
        return 1
    k = min(3, len(rows))
    first = sum(r["train/loss"] for r in rows[:k]) / k
    last = sum(r["train/loss"] for r in rows[-k:]) / k
    ips = [r["perf/images_per_sec"] for r in rows[1:]] or [rows[0]["perf/images_per_sec"]]
    ckpts = [Path(p).name for p in run.complete_checkpoints()]
    print(f"\nrun {run.url}: step {rows[-1]['step']}, {rows[-1]['train/samples_seen']} images seen")
    print(f"  loss       {first:.4f} -> {last:.4f} ({100 * (last - first) / first:+.1f}%, "
          f"mean of first/last {k} logged steps)")
    print(f"  throughput {sum(ips) / len(ips):.1f} images/s (all ranks)")
    print(f"  checkpoints {', '.join(ckpts) or 'none'}")
    evals = sorted(Ledger(run).entries, key=lambda e: (e.dataset, e.step))
    if evals:
        print("  probes (eval worker, quick protocol; eval/ledger/):")
        for e in evals:
            what = (", ".join(f"{probe} top-1 {100 * v:.1f}%" for probe, v in e.top1.items())
                    if e.status == LedgerEntry.DONE else f"FAILED: {e.reason or '?'}")
            print(f"    {e.dataset:<10} step {e.step:>7}: {what}")
    else:
        exports = [tag_of(step) for step in run.exports()[0]]
        print(f"  exports    {', '.join(exports) or 'none'} (not evaluated: start launchers/eval_worker.py "
              f"--run-dir {run.url})")
    tb_dir = run.tb_dir(load_config(run.local_path(CONFIG)).logging.tb_dir)
    print(f"\nTensorBoard:  .venv/bin/tensorboard --logdir {tb_dir}   (then open http://localhost:6006)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
