"""Read a recipe: YAML (and the recipes its ``base:`` names) + dotted ``key=value`` overrides -> a typed,
validated :class:`Config`."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from ..storage import mask_secrets, write_atomic
from .schema import SECTIONS, Config, ConfigError, all_keys
from .validate import validate

# mappings whose keys belong to another tool: overrides replace them whole, never merge into them
OPAQUE_MAPPINGS = ("storage_options", "extra", "overrides")


def _unknown(key: str) -> ConfigError:
    candidates = all_keys() if "." in key else [f.name for f in dataclasses.fields(Config)]
    hint = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    fix = f"did you mean '{hint[0]}'?" if hint else "see `python -m xtra_ds.config --describe` for valid keys"
    return ConfigError(f"unknown config key '{key}': {fix}")


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert one value to the field's declared type, naming the key on failure."""
    origin = typing.get_origin(typ) or typ
    if value is None:
        raise ConfigError(f"{key}: a value is required (got null)")
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _as_float(value) is not None:  # YAML reads "1e-3" (no dot) as a string
            return _as_float(value)
    elif origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_as_float(v) if isinstance(v, str) and _as_float(v) is not None else v for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - the schema uses only the types above
        return value
    raise ConfigError(f"{key}: expected {getattr(origin, '__name__', origin)}, got {value!r} ({type(value).__name__})")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(dotted)
        if key in SECTIONS and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of {SECTIONS[key].__name__} keys, got {value!r}")
            kwargs[key] = _build(SECTIONS[key], value, dotted + ".")
        else:
            kwargs[key] = _coerce(dotted, value, hints[key])
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=3e-4", "model.name=xtra_vit_base_patch16"]`` -> nested dict (YAML-typed values)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in OPAQUE_MAPPINGS:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "ds_configs").glob("*.yaml"))


# A recipe may name the recipe it changes: ``base: ../xtra_vit_b16_in1k.yaml`` (relative to the file that
# names it). A file is then a complete recipe that every tool taking a recipe path reads the same way.
BASE_KEY = "base"


def _read_recipe(recipe: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The recipe at ``recipe`` as nested plain data, its ``base:`` chain resolved: the base's data first,
    this file's merged over it as overrides are (``_merge``: mappings merge key by key, OPAQUE_MAPPINGS and
    lists are replaced whole)."""
    data = yaml.safe_load(recipe.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{recipe}: expected a mapping at the top level, got {type(data).__name__}")
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{recipe}: {BASE_KEY}: expected the path of one recipe, relative to this file "
                          f"(e.g. {BASE_KEY}: ../xtra_vit_b16_in1k.yaml), got {base!r}")
    path = recipe.parent / base
    if not path.is_file():
        raise ConfigError(f"{recipe}: {BASE_KEY}: {base!r} not found (looked for {path}; a base is relative to "
                          f"the file that names it)")
    here = (*chain, recipe.resolve())
    if path.resolve() in here:
        loop = " -> ".join(str(p) for p in (*here, path.resolve()))
        raise ConfigError(f"{recipe}: {BASE_KEY}: {base!r} makes a loop ({loop}); remove one of these {BASE_KEY}: "
                          f"keys")
    return _merge(_read_recipe(path, here), data)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or none: all defaults) and the chain of recipes its ``base:`` names, apply
    overrides, validate, return the tree. A later file overrides its base; overrides come last."""
    data: dict = {}
    if path is not None:
        recipe = Path(path)
        if not recipe.is_file():
            known = recipe_names()
            raise ConfigError(f"config file {str(recipe)!r} not found"
                              + (f"; recipes: {', '.join(known)}" if known else ""))
        data = _read_recipe(recipe)
    return config_from_dict(_merge(data, parse_overrides(overrides or [])))


def config_from_dict(data: dict) -> Config:
    """A validated tree from nested plain data (a parsed recipe)."""
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config (every key, defaults included) as YAML, secrets masked: what is shown or stored."""
    return yaml.safe_dump(mask_secrets(config_to_dict(cfg)), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write :func:`config_to_yaml` atomically. Credentials never reach a run directory: every process
    that needs them (each rank, the eval worker) takes them from its environment."""
    write_atomic(path, config_to_yaml(cfg).encode())
