"""Print what a run reached: loss drop, throughput, checkpoints, exports, and how to look at it.

    .venv/bin/python launchers/summarize_run.py runs/demo/tiny_cpu
"""

import json
import sys
from pathlib import Path


def main(run_dir: str) -> int:
    run = Path(run_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    if not rows:
        print(f"{run}: no metrics yet")
        return 1
    k = min(3, len(rows))
    first = sum(r["train/loss"] for r in rows[:k]) / k
    last = sum(r["train/loss"] for r in rows[-k:]) / k
    ips = [r["perf/images_per_sec"] for r in rows[1:]] or [rows[0]["perf/images_per_sec"]]
    ckpts = sorted(p.parent.name for p in (run / "checkpoints").glob("step_*/COMPLETE"))
    exports = sorted(p.name for p in (run / "exports").glob("step_*")) if (run / "exports").is_dir() else []
    print(f"\nrun {run}: step {rows[-1]['step']}, {rows[-1]['train/samples_seen']} images seen")
    print(f"  loss       {first:.4f} -> {last:.4f} ({100 * (last - first) / first:+.1f}%, mean of first/last {k} logged steps)")
    print(f"  throughput {sum(ips) / len(ips):.1f} images/s (all ranks)")
    print(f"  checkpoints {', '.join(ckpts) or 'none'}")
    print(f"  exports    {', '.join(exports) or 'none'}")
    print(f"\nTensorBoard:  .venv/bin/tensorboard --logdir {run / 'tb'}   (then open http://localhost:6006)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
