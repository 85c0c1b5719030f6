"""Load a recipe: YAML + dotted ``key=value`` overrides -> a validated :class:`Config`."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from .schema import SECTIONS, Config


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


def _keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def all_keys() -> list[str]:
    """Every dotted key of the tree (``optim.lr``, ``model.name``, …)."""
    out = []
    for f in dataclasses.fields(Config):
        out += [f"{f.name}.{k}" for k in _keys(SECTIONS[f.name])] if f.name in SECTIONS else [f.name]
    return out


def _unknown(key: str) -> ConfigError:
    candidates = all_keys() if "." in key else [f.name for f in dataclasses.fields(Config)]
    hint = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    fix = f"did you mean '{hint[0]}'?" if hint else "see `python -m xtra_ds.config --describe` for valid keys"
    return ConfigError(f"unknown config key '{key}': {fix}")


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
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [float(v) if isinstance(v, str) and _is_float(v) else v for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - schema uses only the types above
        return value
    raise ConfigError(f"{key}: expected {getattr(origin, '__name__', origin)}, got {value!r} ({type(value).__name__})")


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


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
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("storage_options", "extra", "overrides"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or none: all defaults), apply overrides, validate, return the tree."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            recipes = sorted(x.stem for x in (Path(__file__).resolve().parents[2] / "ds_configs").glob("*.yaml"))
            raise ConfigError(f"config file {str(p)!r} not found" + (f"; recipes: {', '.join(recipes)}" if recipes else ""))
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe() -> str:
    """All keys with their defaults and documentation, one per line."""
    lines = []
    for sec in dataclasses.fields(Config):
        cls = SECTIONS.get(sec.name)
        if cls is None:
            lines.append(f"{sec.name} = {sec.default!r}  # {sec.metadata['doc']}")
            continue
        lines.append(f"\n[{sec.name}]  # {sec.metadata['doc']}")
        inst = cls()
        for f in dataclasses.fields(cls):
            lines.append(f"  {sec.name}.{f.name} = {getattr(inst, f.name)!r}  # {f.metadata['doc']}")
    return "\n".join(lines)


# --- validation -------------------------------------------------------------------------------

def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))


def validate(cfg: Config) -> None:
    """Checks that need no world size; :func:`batch_plan` checks the rest at launch."""
    from ..models.xtra import model_sizes, parse_model_name

    m = cfg.model
    try:
        parse_model_name(m.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    _, patch = parse_model_name(m.name)
    sizes = model_sizes(m.name)
    img = m.img_size or sizes.img_size
    bp = patch * m.block_size
    if m.block_size < 1 or img % bp:
        ok = [v for v in range(max(bp, img - 2 * bp), img + 3 * bp, bp) if v > 0 and v % bp == 0][:4]
        raise ConfigError(
            f"model.img_size={img} is not divisible by patch_size × block_size = {patch} × {m.block_size} = {bp}: "
            f"the image must split into whole blocks. Use model.img_size in {ok} or another model.block_size.")
    if (img // bp) ** 2 < 2:
        raise ConfigError(f"model: {img}px with {bp}px blocks gives one block; the objective needs at least 2 "
                          f"(lower model.block_size or raise model.img_size)")
    if not 0.0 <= m.drop_path < 1.0:
        raise ConfigError(f"model.drop_path={m.drop_path}: expected a probability in [0, 1)")
    o = cfg.objective
    _choice("objective.loss", o.loss, ("mse", "l1"))
    _choice("objective.block_order", o.block_order, ("raster", "random"))
    if not 1 <= o.heads_ahead < (img // bp) ** 2:
        raise ConfigError(f"objective.heads_ahead={o.heads_ahead}: expected 1 ≤ n < number of blocks ({(img // bp) ** 2})")
    _choice("deepspeed.precision", cfg.deepspeed.precision, ("bf16", "fp16", "fp32"))
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: expected 0, 1, 2 or 3")
    b = cfg.optim
    if b.micro_batch_size < 1 or b.global_batch_size < 1:
        raise ConfigError("optim.micro_batch_size and optim.global_batch_size must be ≥ 1")
    if b.global_batch_size % b.micro_batch_size:
        raise ConfigError(f"optim.global_batch_size={b.global_batch_size} is not a multiple of "
                          f"optim.micro_batch_size={b.micro_batch_size}")
    for key, pair in (("data.crop_scale", cfg.data.crop_scale), ("data.crop_ratio", cfg.data.crop_ratio),
                      ("optim.betas", b.betas)):
        if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair) or pair[0] > pair[1]:
            raise ConfigError(f"{key}={pair!r}: expected two numbers [low, high]")
    s = cfg.schedule
    if s.total_steps <= 0 and s.epochs <= 0:
        raise ConfigError("schedule: set schedule.epochs or schedule.total_steps to a positive value")
    _choice("checkpoint.resume", cfg.checkpoint.resume if cfg.checkpoint.resume in ("auto", "none") else "path",
            ("auto", "none", "path"))
    e = cfg.eval
    for p in e.probes:
        _choice("eval.probes", p, ("linear", "attentive"))
    if not e.lrs or not all(isinstance(v, (int, float)) and v > 0 for v in e.lrs):
        raise ConfigError(f"eval.lrs={e.lrs!r}: expected a list of positive learning rates")
    if e.epochs < 1 or e.batch_size < 2 or e.feature_batch_size < 1 or e.attentive_layers < 1:
        raise ConfigError("eval.epochs, eval.feature_batch_size and eval.attentive_layers must be ≥ 1 and "
                          "eval.batch_size ≥ 2 (BatchNorm needs two samples)")
    if e.device != "auto" and not (e.device == "cpu" or e.device.startswith("cuda")):
        raise ConfigError(f"eval.device={e.device!r}: expected auto, cpu, cuda or cuda:N")


def batch_plan(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) for ``world_size`` ranks.

    The one place where micro × accumulation × world = global batch is derived.
    """
    g, m = cfg.optim.global_batch_size, cfg.optim.micro_batch_size
    if g % (m * world_size):
        per_rank = g / world_size
        hint = [d for d in range(m, 0, -1) if g % (d * world_size) == 0][:1]
        raise ConfigError(
            f"optim.global_batch_size={g} cannot be split into micro batches of {m} over {world_size} ranks "
            f"({g} / ({m} × {world_size}) is not an integer). Set optim.global_batch_size to a multiple of "
            f"{m * world_size} (e.g. {g // (m * world_size) * m * world_size or m * world_size})"
            + (f", or optim.micro_batch_size={hint[0]}" if hint and per_rank.is_integer() else "") + ".")
    return m, g // (m * world_size)
