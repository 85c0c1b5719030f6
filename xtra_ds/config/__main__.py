"""``xtra-config [--describe] [--get KEY] [RECIPE.yaml key=value ...]`` (the same as ``python -m xtra_ds.config …``):
print keys, a resolved recipe, or one resolved value of it (``--get run_dir``: what a shell script such as
launchers/slurm_pretrain.sbatch needs to know exactly as training will resolve it)."""

import argparse
import json
import sys

from ..storage import mask_secrets
from . import ConfigError, all_keys, config_to_dict, describe, load_config
from .parse import _unknown, config_to_yaml


def resolved_value(cfg, key: str) -> str:
    """The value of the dotted ``key`` in ``cfg`` as one line: scalars as they are, lists and mappings as
    JSON; credentials masked as in :func:`config_to_yaml`."""
    if key not in all_keys():
        inside = [k for k in all_keys() if k.startswith(key + ".")]
        if inside:
            raise ConfigError(f"--get: {key} is a section, not a key; ask for one of {', '.join(inside)}")
        raise _unknown(key)
    value = mask_secrets(config_to_dict(cfg))
    for part in key.split("."):
        value = value[part]
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def main(argv=None) -> None:
    """The command line (``xtra-config`` and ``python -m xtra_ds.config``); exits with the message on a config error."""
    parser = argparse.ArgumentParser(prog="xtra-config", description=__doc__)
    parser.add_argument("--describe", action="store_true", help="list every key with its default and meaning")
    parser.add_argument("--get", metavar="KEY", help="print only this dotted key's resolved value, e.g. run_dir")
    parser.add_argument("recipe", nargs="?", help="a YAML recipe, e.g. ds_configs/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    if args.get and not args.recipe:
        parser.error("--get KEY needs a RECIPE.yaml (and the overrides the run is given)")
    if args.describe or not args.recipe:
        print(describe())
        return
    try:
        cfg = load_config(args.recipe, args.overrides)
        print(resolved_value(cfg, args.get) if args.get else config_to_yaml(cfg))
    except ConfigError as e:
        sys.exit(f"config error: {e}")


if __name__ == "__main__":
    main()
