"""``python -m xtra_ds.config [--describe] [RECIPE.yaml key=value ...]``: print keys or a resolved recipe."""

import argparse
import sys

from . import ConfigError, describe, load_config
from .parse import config_to_yaml

parser = argparse.ArgumentParser(prog="python -m xtra_ds.config", description=__doc__)
parser.add_argument("--describe", action="store_true", help="list every key with its default and meaning")
parser.add_argument("recipe", nargs="?", help="a YAML recipe, e.g. ds_configs/tiny_cpu.yaml")
parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
args = parser.parse_args()
if args.describe or not args.recipe:
    print(describe())
else:
    try:
        print(config_to_yaml(load_config(args.recipe, args.overrides)))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
