"""Add sample keys to a quarantine file (``data.quarantine``): from an incident record, or named.

    python launchers/quarantine.py runs/b16/quarantine.txt --incident runs/b16/incidents/step_00012345.json
    python launchers/quarantine.py runs/b16/quarantine.txt --incident …/step_00012345.json --top 3
    python launchers/quarantine.py s3://bucket/h14/quarantine.txt 0000000053 0000001207

From an incident (the trainer writes one for a skipped non-finite step or a loss spike: docs/TRAINING.md, "When a
run misbehaves"): the images whose loss was not finite, or with ``--top K`` the K worst (a spike). Keys already
in the file are not added again. The quarantine takes effect at the run's next (re)start, with
``data.quarantine=FILE data.on_order_change=next_epoch`` (it changes the data order). ``launchers/replay.py
--write-quarantine`` adds the worst samples of a replayed step instead.
"""

import argparse
import json
import sys

import yaml
from inspect_batch import saved_positions  # launchers/, beside this script

from xtra_ds.config.parse import config_from_dict
from xtra_ds.data.provenance import OrderUnknown, order_anchor, run_spec, step_provenance
from xtra_ds.data.quarantine import add_to_quarantine, added_note
from xtra_ds.rundir import CONFIG, RunDir
from xtra_ds.storage import filesystem


def incident_entries(url: str, top: int) -> list[tuple[str, str | None]]:
    """(key, shard) of each image an incident record blames: its non-finite images (loss null), or its ``top``
    worst. The shards come from the run's own data order (the record's run directory: ``…/incidents/..``), as
    launchers/inspect_batch.py lists the step; a line with its shard spares every rank reading every shard's
    stats file at start. Where the order cannot tell, the key goes in bare (and the console says why)."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        record = json.load(f)
    samples = record["samples"]  # worst first: the non-finite ones (null), then by loss
    blamed = [s["key"] for s in samples[:top]] if top else [s["key"] for s in samples if s["loss"] is None]
    if not blamed:
        raise SystemExit(f"{url}: step {record['step']} ({record['kind']}) has no image with a non-finite loss; "
                         f"pass --top K to quarantine its K worst")
    run_url = url.rsplit("/", 2)[0]
    try:
        shards = shards_of_step(run_url, record["step"])
    except (OrderUnknown, OSError, ValueError, KeyError) as e:
        print(f"the shards of step {record['step']} are unknown ({e}); the keys go in without them (every rank then "
              f"reads every shard's stats file at start to find them)", file=sys.stderr)
        shards = {}
    return [(key, shards.get(key)) for key in blamed]


def shards_of_step(run_url: str, step: int) -> dict[str, str]:
    """key -> shard URL of global step ``step`` of the run at ``run_url``, from its config and checkpoints."""
    run = RunDir(run_url)
    text = run.read_text(CONFIG)
    if text is None:
        raise FileNotFoundError(f"{run.url_of(CONFIG)} does not exist")
    cfg = config_from_dict(yaml.safe_load(text))
    spec = run_spec(cfg)
    prov = step_provenance(spec, step, order_anchor(spec, saved_positions(run), step))
    return dict(zip(prov.keys, prov.urls, strict=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the quarantine file (a local path or URL); created if absent")
    parser.add_argument("keys", nargs="*", help="sample keys to add")
    parser.add_argument("--incident", help="an incident record (run_dir/incidents/step_N.json)")
    parser.add_argument("--top", type=int, default=0, help="with --incident: its K worst images (default: its "
                                                          "non-finite ones)")
    args = parser.parse_args(argv)
    entries = [(k, None) for k in args.keys] + (incident_entries(args.incident, args.top) if args.incident else [])
    if not entries:
        parser.error("name keys, or --incident")
    added = add_to_quarantine(args.file, entries)
    print(added_note(args.file, added, len(entries)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
