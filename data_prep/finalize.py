"""Merge the per-shard stats of all jobs into manifest.json (run once, after a job array).

    python data_prep/finalize.py --output s3://bucket/prefix
"""

from __future__ import annotations

import argparse
import sys

from data_prep.cli import add_storage_args, fail, storage_options
from data_prep.manifest import finalize
from data_prep.storage import StorageError
from xtra_ds.data.format import MANIFEST, join


def finalize_and_report(output: str, options: dict) -> None:
    """Write the manifest and print its accounting; a refusal exits with the reason."""
    try:
        m = finalize(output, options)
    except StorageError as e:
        fail(str(e))
    t = m["totals"]
    print(f"{join(output, MANIFEST)}: {t['written']} written + {t['rejected']} rejected = {t['inputs']} inputs, "
          f"{t['shards']} shards")
    for reason, r in m["rejections"].items():
        print(f"  {reason:<16} {r['count']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xtra-shard-finalize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_storage_args(parser)
    args = parser.parse_args(argv)
    finalize_and_report(args.output, storage_options(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
