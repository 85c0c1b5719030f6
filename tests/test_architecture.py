"""The shape of the code: which layer may import which, and that every config key is read by something.

Both are read off the source with ``ast`` (imports inside functions count too), so they hold for
code paths no other test runs.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from dataclasses import fields
from pathlib import Path

import pytest

import data_prep
import xtra_ds
from xtra_ds.config.schema import SECTIONS, Config

ROOT = Path(__file__).resolve().parents[1]

# component -> the components it may import (besides itself). Components are the top-level modules
# and packages of xtra_ds, with data.format (the shard format shared with data_prep) on its own.
ALLOWED = {
    "compat": set(),  # the torch floor, checked without importing torch: any layer may ask it
    "storage": set(),  # opening URLs, atomic writes, credentials: the ground floor (no torch; data_prep uses it)
    "data.format": set(),
    "models": set(),
    "objective": {"models"},
    "rundir": {"storage"},
    "config": {"models", "storage"},
    "data": {"data.format", "config", "storage"},
    "costs": {"models", "config"},  # FLOPs, memory, communication: from the config and the model's sizes
    "interop": {"models", "compat", "storage"},
    "engine": {"config", "data", "data.format", "models", "objective", "costs", "rundir", "interop", "storage"},
    "eval": {"config", "data", "data.format", "models", "rundir", "interop", "storage"},
}
DATA_PREP_MAY_IMPORT = {"data.format", "storage"}  # and nothing else of xtra_ds (no torch in its workers)


def component(module: str) -> str:
    """``xtra_ds.eval.worker`` -> ``eval``; ``xtra_ds.data.format`` -> ``data.format``."""
    parts = module.split(".")[1:]
    if parts[:2] == ["data", "format"]:
        return "data.format"
    return parts[0] if parts else ""


def source_files(*folders: str):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from . import x` may name a module
    return found


def test_every_module_imports():
    for pkg in (xtra_ds, data_prep):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)


def test_layering():
    problems = []
    for path in source_files("xtra_ds"):
        mine = component(module_name(path))
        if not mine:
            continue
        for imported in imports_of(path):
            if not imported.startswith("xtra_ds."):
                continue
            theirs = component(imported)
            if theirs not in ("", mine) and theirs not in ALLOWED[mine]:
                problems.append(f"{path.relative_to(ROOT)} ({mine}) imports {imported} ({theirs})")
    for path in source_files("data_prep"):
        for imported in imports_of(path):
            if imported.startswith("xtra_ds.") and component(imported) not in DATA_PREP_MAY_IMPORT:
                problems.append(f"{path.relative_to(ROOT)} (data_prep) imports {imported}: only "
                                f"{', '.join(sorted(DATA_PREP_MAY_IMPORT))}")
    assert not problems, "\n".join(problems)


def test_models_and_format_import_nothing_of_the_package():
    """The bottom layers, said plainly (the table above says it too)."""
    for path in [*source_files("xtra_ds/models"), ROOT / "xtra_ds/data/format.py", ROOT / "xtra_ds/storage.py"]:
        ours = {m for m in imports_of(path) if m.startswith("xtra_ds.")}
        assert all(component(m) == component(module_name(path)) for m in ours), (path, ours)


def test_files_are_put_in_place_only_by_storage():
    """One way to make a file or folder appear (write-fsync-rename, exchange, create-if-absent):
    xtra_ds/storage.py. Any other rename or link in the code is a second implementation to keep right."""
    found = []
    for path in source_files("xtra_ds", "data_prep", "launchers", "bench"):
        if path == ROOT / "xtra_ds/storage.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            f = node.func
            by_os = isinstance(f.value, ast.Name) and f.value.id == "os" and f.attr in ("replace", "rename", "link")
            if by_os or f.attr in ("rename", "renameat2", "hardlink_to"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


# --- every config key has a reader ------------------------------------------------------------------

SECTION_OF_CLASS = {cls.__name__: name for name, cls in SECTIONS.items()}
# the config package itself: definitions, parsing, documentation, checks — not readers
NOT_READERS = {"xtra_ds/config/schema.py", "xtra_ds/config/parse.py", "xtra_ds/config/describe.py",
               "xtra_ds/config/validate.py"}


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def config_reads(tree: ast.AST) -> set[tuple[str, str]]:
    """(section, field) pairs read in ``tree``: ``<anything>.data.num_workers``, or ``x.num_workers``
    where ``x`` is annotated as / assigned from a section (``data: DataConfig``, ``d = cfg.data``,
    ``self.cfg = cfg``)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            section = SECTION_OF_CLASS.get(ast.unparse(node.annotation).strip("'\""))
            if section:
                aliases[node.arg] = section

    def section_of(expr) -> str | None:
        if isinstance(expr, ast.Attribute) and expr.attr in SECTIONS:
            return expr.attr
        key = _dotted(expr)
        return aliases.get(key) if key else None

    for _ in range(3):  # assignments of assignments
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                pairs = [(t, node.value) for t in node.targets]
                if isinstance(node.value, ast.Tuple):
                    pairs = [(t, v) for tgt in node.targets if isinstance(tgt, ast.Tuple)
                             for t, v in zip(tgt.elts, node.value.elts, strict=False)]
                for target, value in pairs:
                    section, key = section_of(value), _dotted(target)
                    if section and key:
                        aliases[key] = section
    reads = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            section = section_of(node.value)
            if section:
                reads.add((section, node.attr))
            if isinstance(node.value, ast.Name):
                reads.add(("", node.attr))
    return reads


def test_every_config_key_has_a_reader():
    reads = set()
    for path in [*source_files("xtra_ds", "launchers")]:
        if str(path.relative_to(ROOT)) not in NOT_READERS:
            reads |= config_reads(ast.parse(path.read_text()))
    unread = [f.name for f in fields(Config) if f.name not in SECTIONS and ("", f.name) not in reads]
    unread += [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)
               if (section, f.name) not in reads]
    assert not unread, f"config keys that no code reads (a key nobody reads is a lie in the recipe): {unread}"


def test_the_reader_check_can_fail():
    tree = ast.parse("def f(cfg, data: DataConfig, e):\n    d = cfg.optim\n    x = (d.lr, data.hflip, e.epochs)\n")
    assert {("optim", "lr"), ("data", "hflip")} <= config_reads(tree)
    assert ("eval", "epochs") not in config_reads(tree)


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_sections_document_every_field(name):
    assert all(f.metadata.get("doc") for f in fields(SECTIONS[name]))
