"""Print what a run reached: loss drop, throughput, checkpoints, probe top-1 per export, and how to look at it.

    .venv/bin/python launchers/summarize_run.py runs/demo/tiny_cpu
"""

import json
import sys
from pathlib import Path

from xtra_ds.config import load_config
from xtra_ds.eval.ledger import Ledger
from xtra_ds.rundir import CONFIG, METRICS, RESULTS, LedgerEntry, RunDir, tag_of


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(run_dir: str) -> int:
    run = RunDir(run_dir)
    rows = [r for r in read_jsonl(run.local_path(METRICS)) if "train/loss" in r]  # log steps' rows
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
        width = max(len(e.dataset) for e in evals)
        for e in evals:
            what = (", ".join(f"{probe} top-1 {100 * v:.1f}%" for probe, v in e.top1.items())
                    if e.status == LedgerEntry.DONE else f"FAILED: {e.reason or '?'}")
            print(f"    {e.dataset:<{width}} step {e.step:>7}: {what}")
        for suite, tables in suite_tables(run).items():
            print(f"  suite {suite} (mean top-1 over {tables[0]['datasets']} datasets; eval/results/suite_{suite}/):")
            for t in tables:
                means = ", ".join(f"{probe} {100 * m:.1f}%" if m is not None else
                                  f"{probe} – ({t['why_no_mean'][probe]})" for probe, m in t["mean"].items())
                print(f"    step {t['step']:>7}: {means}")
    else:
        exports = [tag_of(step) for step in run.exports()[0]]
        print(f"  exports    {', '.join(exports) or 'none'} (not evaluated: start launchers/eval_worker.py "
              f"--run-dir {run.url})")
    tb_dir = run.tb_dir(load_config(run.local_path(CONFIG)).logging.tb_dir)
    print(f"\nTensorBoard:  .venv/bin/tensorboard --logdir {tb_dir}   (then open http://localhost:6006)")
    return 0


def suite_tables(run: RunDir) -> dict[str, list[dict]]:
    """Every suite record of the run (``eval/results/suite_<name>/step_*.json``), by suite, in step order."""
    out: dict[str, list[dict]] = {}
    for path in sorted(run.local_path(RESULTS).glob("suite_*/step_*.json")):
        try:
            table = json.loads(path.read_text())
        except ValueError:
            continue
        out.setdefault(table["suite"], []).append(table)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
