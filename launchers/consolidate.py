"""Turn a ZeRO checkpoint into one fp32 safetensors file, without loading it all at once.

    .venv/bin/python launchers/consolidate.py runs/tiny_cpu/checkpoints/step_00000200 -o model.safetensors
    .venv/bin/python launchers/consolidate.py runs/x/checkpoints/latest --encoder-only -o encoder.safetensors

The full file loads into ``xtra_ds.create_model(...)`` (official key layout); ``--encoder-only``
writes timm's ViT layout, like the training job's encoder exports.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

from xtra_ds.interop import consolidate
from xtra_ds.interop.zero import CheckpointFileError
from xtra_ds.rundir import LATEST


def peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM, not ru_maxrss: on Linux the latter
    keeps the parent's peak across fork+exec, which would charge a launcher's memory to us."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder (…/checkpoints/step_XXXXXXXX) or …/checkpoints/latest")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--encoder-only", action="store_true")
    args = parser.parse_args(argv)
    ckpt = Path(args.checkpoint)
    if ckpt.name == LATEST and ckpt.is_file():
        ckpt = ckpt.parent / ckpt.read_text().strip()
    t = time.time()
    try:
        n = consolidate(ckpt, args.output, args.encoder_only)
    except (FileNotFoundError, ValueError, CheckpointFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    peak = peak_rss()
    print(f"wrote {args.output}: {n / 1e6:.1f} MB in {time.time() - t:.1f} s; peak memory {peak / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
