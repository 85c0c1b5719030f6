"""``python -m xtra_ds.config [--describe] [RECIPE.yaml key=value ...]``: print keys or a resolved recipe."""

import argparse
import sys

import yaml

from . import ConfigError, describe, load_config
from .loader import config_to_dict

p = argparse.ArgumentParser(prog="python -m xtra_ds.config", description=__doc__)
p.add_argument("--describe", action="store_true", help="list every key with its default and meaning")
p.add_argument("recipe", nargs="?", help="a YAML recipe, e.g. ds_configs/tiny_cpu.yaml")
p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
a = p.parse_args()
if a.describe or not a.recipe:
    print(describe())
else:
    try:
        print(yaml.safe_dump(config_to_dict(load_config(a.recipe, a.overrides)), sort_keys=False))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
