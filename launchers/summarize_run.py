"""Print what a run reached: loss drop, throughput, checkpoints, probe top-1 per export, and how to look at it.

    .venv/bin/python launchers/summarize_run.py runs/demo/tiny_cpu
"""

import json
import sys
from pathlib import Path

from xtra_ds.engine.checkpoint import complete_checkpoints
from xtra_ds.eval.worker import Ledger, RunDir


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(run_dir: str) -> int:
    run = Path(run_dir)
    rows = read_jsonl(run / "metrics.jsonl")
    if not rows:
        print(f"{run}: no metrics yet")
        return 1
    k = min(3, len(rows))
    first = sum(r["train/loss"] for r in rows[:k]) / k
    last = sum(r["train/loss"] for r in rows[-k:]) / k
    ips = [r["perf/images_per_sec"] for r in rows[1:]] or [rows[0]["perf/images_per_sec"]]
    ckpts = [p.name for p in complete_checkpoints(run / "checkpoints")]
    print(f"\nrun {run}: step {rows[-1]['step']}, {rows[-1]['train/samples_seen']} images seen")
    print(f"  loss       {first:.4f} -> {last:.4f} ({100 * (last - first) / first:+.1f}%, mean of first/last {k} logged steps)")
    print(f"  throughput {sum(ips) / len(ips):.1f} images/s (all ranks)")
    print(f"  checkpoints {', '.join(ckpts) or 'none'}")
    evals = sorted(Ledger(RunDir(str(run))).entries, key=lambda e: (e.get("dataset", ""), e["step"]))
    if evals:
        print("  probes (eval worker, quick protocol; eval/ledger.jsonl):")
        for e in evals:
            what = (", ".join(f"{k[:-len('_top1')]} top-1 {100 * v:.1f}%" for k, v in e.items() if k.endswith("_top1"))
                    if e["status"] == "done" else f"FAILED: {e.get('reason', '?')}")
            print(f"    {e['dataset']:<10} step {e['step']:>7}: {what}")
    else:
        exports = sorted(p.name for p in (run / "exports").glob("step_*")) if (run / "exports").is_dir() else []
        print(f"  exports    {', '.join(exports) or 'none'} (not evaluated: start launchers/eval_worker.py --run-dir {run})")
    print(f"\nTensorBoard:  .venv/bin/tensorboard --logdir {run / 'tb'}   (then open http://localhost:6006)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
