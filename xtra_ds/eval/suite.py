"""A suite: several labelled datasets evaluated on every export, and their mean top-1 — the paper's headline is
the mean attentive top-1 over 15 benchmarks (``ds_configs/eval/paper15.yaml``).

A suite comes from a file (``eval.suite=ds_configs/eval/paper15.yaml``)::

    name: paper15
    root: s3://bucket/benchmarks          # relative train/val paths start here (eval.suite_root overrides it)
    defaults: {protocol: {...}, quick: {...}}
    datasets:
      - {name: cifar10, title: CIFAR-10, classes: 10, train: cifar10/train/manifest.json,
         val: cifar10/test/manifest.json, protocol: {batch_size: 512}, quick: {max_samples: 10000}}

or inline (``eval.suite=demo eval.datasets=[{name: digits, train: …, val: …}, …]``). Each dataset's ``quick``
settings are ``eval.*`` settings of the eval worker's quick probes; its ``protocol`` settings are those of the
paper's offline protocol (:class:`~xtra_ds.eval.protocol.Protocol`, ``launchers/probe.py --suite``).

The suite's record of an export, ``eval/results/suite_<name>/step_X.{json,md}``, is written once every dataset of
the suite has an outcome, exactly once whichever worker records the last one (created only if absent): one row
per dataset and the mean of each probe — or, when a dataset failed, no mean and the reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config.schema import ConfigError, EvalConfig
from ..rundir import RESULTS, LedgerEntry, RunDir, tag_of
from ..storage import create_exclusive

log = logging.getLogger("xtra_ds.eval")

IDENTITY = ("name", "title", "classes", "train", "val")  # what a dataset entry is, besides its settings


@dataclass
class SuiteDataset:
    """One dataset of a suite: its identity, its quick-probe settings (an :class:`EvalConfig`) and its offline
    protocol settings (:class:`~xtra_ds.eval.protocol.Protocol` fields)."""

    name: str
    title: str
    train: str
    val: str
    classes: int | None = None
    quick: EvalConfig = field(default_factory=EvalConfig)
    protocol: dict = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    datasets: list[SuiteDataset]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    def only(self, names: list[str]) -> list[SuiteDataset]:
        """The datasets named (``eval.only``); all of them when ``names`` is empty."""
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ConfigError(f"eval.only: {unknown} not in suite {self.name!r} ({', '.join(self.names)})")
        return [d for d in self.datasets if not names or d.name in names]


def _join(root: str, path: str) -> str:
    if not root or "://" in path or os.path.isabs(path):
        return path
    return f"{root.rstrip('/')}/{path}"


def _quick(base: EvalConfig, settings: dict, where: str) -> EvalConfig:
    """``base`` with ``settings`` (eval.* keys) applied, typed and checked like the config's own."""
    from ..config.parse import config_from_dict

    known = {f.name for f in dataclasses.fields(EvalConfig)}
    for key in settings:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"{where}: {key!r} is not an eval.* setting" + (f"; did you mean {hint[0]!r}?" if hint
                                                                             else ""))
    try:
        return config_from_dict({"eval": {**dataclasses.asdict(base), **settings}}).eval  # typed and validated
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def suite_of(cfg: EvalConfig) -> Suite | None:
    """The suite ``eval.*`` names (a file, or ``eval.datasets`` inline), each dataset's quick settings over
    ``cfg``; None when no suite is set (one dataset: ``eval.train``/``eval.val``)."""
    if not cfg.suite and not cfg.datasets:
        return None
    if cfg.datasets:  # inline: eval.suite names it
        spec = {"name": cfg.suite or "suite", "root": "", "defaults": {}, "datasets": cfg.datasets}
        source = "eval.datasets"
    else:
        path = Path(cfg.suite)
        if not path.is_file():
            known = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "ds_configs/eval").glob("*.yaml"))
            raise ConfigError(f"eval.suite={cfg.suite}: no such suite file (ds_configs/eval/ has {', '.join(known)}); "
                              f"for a suite given inline set eval.datasets=[{{name, train, val}}, …] too")
        spec = yaml.safe_load(path.read_text()) or {}
        source = str(path)
    root = cfg.suite_root or spec.get("root", "")
    defaults = spec.get("defaults") or {}
    base = dataclasses.replace(cfg, suite="", datasets=[], suite_root="", only=[])
    out = []
    for i, entry in enumerate(spec.get("datasets") or []):
        where = f"{source}, dataset {i + 1}"
        if not isinstance(entry, dict) or not {"name", "train", "val"} <= set(entry):
            raise ConfigError(f"{where}: needs name, train and val (got {entry!r})")
        extra = set(entry) - {*IDENTITY, "quick", "protocol"} - {f.name for f in dataclasses.fields(EvalConfig)}
        if extra:
            raise ConfigError(f"{where} ({entry['name']}): unknown keys {sorted(extra)}; a dataset has "
                              f"{', '.join(IDENTITY)}, quick (eval.* settings) and protocol (the offline protocol)")
        inline_quick = {k: v for k, v in entry.items() if k not in (*IDENTITY, "quick", "protocol")}
        quick = _quick(base, {**defaults.get("quick", {}), **inline_quick, **entry.get("quick", {})},
                       f"{where} ({entry['name']})")
        train, val = _join(root, entry["train"]), _join(root, entry["val"])
        quick = dataclasses.replace(quick, dataset=entry["name"], train=train, val=val)
        out.append(SuiteDataset(name=str(entry["name"]), title=str(entry.get("title", entry["name"])), train=train,
                                val=val, classes=entry.get("classes"), quick=quick,
                                protocol={**defaults.get("protocol", {}), **entry.get("protocol", {})}))
    names = [d.name for d in out]
    if not out or len(set(names)) != len(names):
        raise ConfigError(f"{source}: a suite needs datasets with distinct names (got {names})")
    return Suite(str(spec.get("name") or "suite"), out)


def check_class_count(d: SuiteDataset, storage_options: dict | None = None) -> None:
    """A suite dataset's shards hold the classes the suite says (``classes``): a wrong split or a wrong path is
    found before any probe is trained. Nothing to check when the suite gives no count or the shards no map."""
    from .features import read_classes

    found = read_classes(d.train, storage_options)
    if d.classes and found and len(found) != d.classes:
        raise ConfigError(f"suite dataset {d.name}: {d.train} has {len(found)} classes, the suite says {d.classes} "
                          f"(a wrong split or path?)")


# --- the suite's record of an export ---------------------------------------------------------------------

def suite_results(name: str, step: int) -> str:
    """Relative to the run: the suite table of the export of ``step`` (``.json``; ``.md`` beside it)."""
    return f"{RESULTS}/suite_{name}/{tag_of(step)}.json"


def suite_table(suite: Suite, outcomes: dict[str, LedgerEntry | None], step: int | None = None) -> dict:
    """The suite's table from each dataset's outcome: a row per dataset (top-1 per probe, or why there is none),
    the mean per probe over the suite — None, with the reason, unless every dataset has a top-1 for it."""
    rows, probes = [], []
    for d in suite.datasets:
        e = outcomes.get(d.name)
        row = {"dataset": d.name, "title": d.title}
        if e is None:
            row["missing"] = "no outcome yet"
        elif e.status != LedgerEntry.DONE:
            row["missing"] = f"{e.status}: {e.reason}"
        else:
            row.update({f"{probe}_top1": v for probe, v in e.top1.items()})
            probes += [p for p in e.top1 if p not in probes]
        rows.append(row)
    missing = "; ".join(f"{r['dataset']} ({r['missing']})" for r in rows if "missing" in r)
    mean, why = {}, {}
    for probe in probes or list(dict.fromkeys(p for d in suite.datasets for p in d.quick.probes)):
        values = [r.get(f"{probe}_top1") for r in rows]
        absent = [r["dataset"] for r, v in zip(rows, values, strict=True) if v is None and "missing" not in r]
        if missing or absent:
            mean[probe] = None
            why[probe] = missing or f"no {probe} probe for {', '.join(absent)}"
        else:
            mean[probe] = sum(values) / len(values)
    return {"suite": suite.name, "step": step, "datasets": len(rows), "rows": rows, "mean": mean,
            "why_no_mean": why}


def markdown(table: dict, title: str = "") -> str:
    """The suite table in the paper's layout: one column per benchmark and the average, a row per probe."""
    probes = list(table["mean"]) or ["attentive"]
    head = ["probe", *[r["title"] for r in table["rows"]], "**Avg.**"]
    lines = [f"### {title or 'suite ' + table['suite']}" + (f", step {table['step']}" if table["step"] is not None
                                                           else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for probe in probes:
        cells = [f"{100 * r[f'{probe}_top1']:.1f}" if f"{probe}_top1" in r else "–" for r in table["rows"]]
        mean = table["mean"].get(probe)
        cells.append(f"**{100 * mean:.1f}**" if mean is not None else "–")
        lines.append(f"| {probe} | " + " | ".join(cells) + " |")
    for probe, why in table["why_no_mean"].items():
        lines.append(f"\nNo mean ({probe}): {why}.")
    return "\n".join(lines) + "\n"


def publish_suite(run: RunDir, suite: Suite, outcomes: dict[str, LedgerEntry], step: int, writer=None) -> dict | None:
    """Write the suite's record of the export of ``step`` once every dataset has an outcome — created only if
    absent, so that of several workers sharing the suite exactly one writes it (and its TensorBoard scalars,
    through ``writer(tag, value, step)``). Returns the table when this call wrote it, else None."""
    if any(outcomes.get(d.name) is None for d in suite.datasets):
        return None
    table = suite_table(suite, outcomes, step)
    if not create_exclusive(run.fs, run.path(suite_results(suite.name, step)), json.dumps(table, indent=1).encode()):
        return None  # another worker wrote it
    run.write_text(suite_results(suite.name, step).removesuffix(".json") + ".md", markdown(table))
    for probe, mean in table["mean"].items():
        if mean is not None and writer is not None:
            writer(f"eval/suite/{suite.name}/{probe}_top1_mean", mean, step)
    if table["why_no_mean"]:
        log.warning("%s: suite %s has no mean: %s", tag_of(step), suite.name,
                    "; ".join(f"{p}: {w}" for p, w in table["why_no_mean"].items()))
    else:
        log.info("%s: suite %s mean %s", tag_of(step), suite.name,
                 ", ".join(f"{p} top-1 {100 * m:.1f}%" for p, m in table["mean"].items()))
    return table
