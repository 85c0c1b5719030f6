"""``python -m xtra_ds.config [--describe] [RECIPE.yaml key=value ...]``: print keys or a resolved recipe."""

import argparse
import sys

import yaml

from . import ConfigError, config_to_dict, describe, load_config

parser = argparse.ArgumentParser(prog="python -m xtra_ds.config", description=__doc__)
parser.add_argument("--describe", action="store_true", help="list every key with its default and meaning")
parser.add_argument("recipe", nargs="?", help="a YAML recipe, e.g. ds_configs/tiny_cpu.yaml")
parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
args = parser.parse_args()
if args.describe or not args.recipe:
    print(describe())
else:
    try:
        print(yaml.safe_dump(config_to_dict(load_config(args.recipe, args.overrides)), sort_keys=False))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
