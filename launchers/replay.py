"""Replay step N of a run on one process, from its last checkpoint before N, and rank N's samples by loss.

    python launchers/replay.py runs/h14 --step 123457                      # CPU; --device cuda for one GPU
    python launchers/replay.py runs/h14 --step 123457 --write-quarantine s3://bucket/h14/quarantine.txt --top 3
    python launchers/replay.py runs/h14 --step 123457 data.quarantine=     # overrides over the run's config.yaml

Prints every replayed step's loss and gradient norm beside the logged ones, then step N's samples, worst first
(loss, pixel statistics of the crop the model saw, key, shard). ``--write-quarantine FILE --top K`` appends the
worst K keys (with their shards) to FILE, a local path or URL, for ``data.quarantine`` (docs/TRAINING.md).
"""

import argparse
import json
import sys

from xtra_ds.config import ConfigError
from xtra_ds.data.quarantine import add_to_quarantine, added_note
from xtra_ds.engine.replay import Replay, ReplayError
from xtra_ds.interop.zero import CheckpointFileError
from xtra_ds.storage import write_atomic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int, required=True, help="the step to replay (as metrics.jsonl numbers it)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--rows", type=int, default=20, help="samples to print (0: all)")
    parser.add_argument("--json", help="also write the whole report to this file")
    parser.add_argument("--write-quarantine", metavar="FILE", help="append the worst keys to this quarantine file")
    parser.add_argument("--top", type=int, default=1, help="with --write-quarantine: how many keys")
    parser.add_argument("overrides", nargs="*", help="key=value settings over the run's config.yaml")
    args = parser.parse_intermixed_args(argv)  # overrides may come after the options
    try:
        replay = Replay(args.run_dir, args.step, overrides=args.overrides, device=args.device)
        report = replay.run()
    except (ReplayError, ConfigError, CheckpointFileError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text(args.rows))
    if args.json:
        write_atomic(args.json, json.dumps(report.to_dict(), indent=1).encode())
    if args.write_quarantine:
        worst = [(r.key, None if r.shard == "?" else r.shard) for r in report.worst(args.top)]
        added = add_to_quarantine(args.write_quarantine, worst, replay.cfg.data.storage_options)
        print(added_note(args.write_quarantine, added, len(worst)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
