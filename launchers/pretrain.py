"""XTRA pre-training, one process per GPU (or CPU rank), under the DeepSpeed launcher.

    deepspeed --hostfile hosts launchers/pretrain.py --config ds_configs/xtra_vit_h14_in21k.yaml \\
        data.train=s3://bucket/in21k/train/manifest.json
    deepspeed --num_gpus 8 launchers/pretrain.py --config ds_configs/xtra_vit_b16_in1k.yaml run_dir=runs/b16
"""

from xtra_ds.engine.stop import StopSignals

# Before the imports below (seconds; minutes on a busy shared filesystem): a preemption notice that arrives
# meanwhile is kept and honoured at the first step boundary instead of killing the rank (and the Slurm job).
STOP = StopSignals().install()

import argparse
import sys

from xtra_ds.config import ConfigError, load_config, parse_overrides
from xtra_ds.engine.builder import build
from xtra_ds.engine.trainer import NonFiniteError
from xtra_ds.storage import secrets_in


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a recipe in ds_configs/")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=5e-4")
    args = parser.parse_args()
    try:
        given = secrets_in(parse_overrides(args.overrides))
        if given:  # the value itself is never repeated
            raise ConfigError(
                f"{', '.join(given)} given on the command line: the deepspeed launcher prints its command line "
                f"(and `ps` shows it on every node). Give credentials through ~/.aws/credentials, AWS_PROFILE or an "
                f"instance role, or a KEY=VALUE file each rank reads itself (env_file=PATH); docs/TRAINING.md, "
                f"'Credentials'")
        cfg = load_config(args.config, args.overrides)
        trainer = build(cfg, STOP)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        return trainer.train()
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.metrics.close()


if __name__ == "__main__":
    sys.exit(main())
