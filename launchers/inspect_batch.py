"""Which samples made an optimizer step: keys and shard URLs of global batch N, in canonical order.

    .venv/bin/python launchers/inspect_batch.py runs/b16 --step 12345
    .venv/bin/python launchers/inspect_batch.py s3://bucket/runs/h14 --step 800   # endpoint: AWS_ENDPOINT_URL

Computed from the run's ``config.yaml`` and the data_prep manifest(s) and shard stats files; no image is
read. Step N counts from 1, as the trainer logs steps. Prints ``#`` lines (epoch and step of the epoch,
the run's own ``data/keys_digest`` of that step checked against the listing), then one
``key<TAB>shard<TAB>source`` line per sample. When the run's checkpoints say the data order changed
around step N, says so and exits 1 instead of answering. See docs/TRAINING.md, "When a run misbehaves".
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from xtra_ds.config import Config
from xtra_ds.config.parse import config_from_dict
from xtra_ds.data.provenance import (
    DIGEST_METRIC,
    START,
    OrderUnknown,
    digest_verdict,
    order_anchor,
    run_spec,
    step_provenance,
)
from xtra_ds.rundir import COMPLETE, CONFIG, METRICS, CheckpointRecord, RunDir


def saved_positions(run: RunDir) -> list[tuple[int, dict]]:
    """(step, loader position and order) of the run's complete checkpoints, oldest first (a timeline set aside
    by a rollback is not among them)."""
    out = []
    for folder in run.complete_checkpoints():
        try:
            record = CheckpointRecord.from_json(run.fs.cat_file(f"{folder}/{COMPLETE}"))
        except (OSError, ValueError):
            continue  # an unreadable marker says nothing about the order
        out.append((record.step, record.data))
    return out


def logged_digest(run: RunDir, step: int) -> int | None:
    """The step's digest in metrics.jsonl, from its last row that has one (a resumed run logs the steps after
    its checkpoint again; the last row is of the timeline that went on)."""
    found = None
    for line in (run.read_text(METRICS) or "").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(row, dict) and row.get("step") == step and DIGEST_METRIC in row:
            found = row[DIGEST_METRIC]
    return found


def describe_step(run: RunDir, cfg: Config, step: int) -> list[str]:
    """``#`` lines (where the step is in the data, how that was found, the digest check), then one
    ``key<TAB>shard<TAB>source`` line per sample in canonical order. OrderUnknown when the run's checkpoints say
    its data order changed around ``step``."""
    if step < 1:
        raise ValueError(f"--step {step}: steps count from 1, as the trainer logs them")
    spec = run_spec(cfg)
    anchor = order_anchor(spec, saved_positions(run), step)
    prov = step_provenance(spec, step, anchor)
    lines = [f"# run {run.url}, step {step}: epoch {prov.epoch}, step {prov.step} of its {prov.steps_in_epoch} "
             f"(from 0); its {len(prov.keys)} samples in canonical order (on W ranks, rank r had positions "
             f"floor(r·{len(prov.keys)}/W) to floor((r+1)·{len(prov.keys)}/W) - 1)"]
    if anchor != START:
        lines.append(f"# counted from the checkpoint of step {anchor.global_step} (epoch {anchor.epoch}, step "
                     f"{anchor.step}): the data order changed before it")
    if prov.from_headers:
        lines.append(f"# keys of {len(prov.from_headers)} shard(s) read from their tar headers (their stats files "
                     f"list no samples: data_prep before sample lists; sources unknown): "
                     + ", ".join(prov.from_headers))
    lines.append(f"# {DIGEST_METRIC} of these keys: {prov.digest}")
    lines += ["# " + line for line in digest_verdict(prov, logged_digest(run, step))]
    lines.append("# key\tshard\tsource")
    return lines + [f"{key}\t{url}\t{source}" for key, url, source in zip(prov.keys, prov.urls, prov.sources,
                                                                          strict=True)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the training run directory (local path or s3://…)")
    parser.add_argument("--step", type=int, required=True, help="the optimizer step, from 1 (as metrics.jsonl)")
    args = parser.parse_args(argv)
    run = RunDir(args.run_dir)
    text = run.read_text(CONFIG)
    if text is None:
        raise SystemExit(f"{run.url_of(CONFIG)} does not exist: is {run.url} a training run directory?")
    cfg = config_from_dict(yaml.safe_load(text))  # the resolved config training wrote
    try:
        print("\n".join(describe_step(RunDir(args.run_dir, cfg.data.storage_options), cfg, args.step)))
    except (OrderUnknown, ValueError) as e:
        print(f"inspect_batch: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
