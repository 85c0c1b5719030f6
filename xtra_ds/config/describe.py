"""``describe()``: every key of the tree with its default and documentation."""

from __future__ import annotations

import dataclasses

from .schema import SECTIONS, Config


def describe() -> str:
    """All keys with their defaults and documentation, one per line, grouped by section."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = SECTIONS.get(section.name)
        if cls is None:
            lines.append(f"{section.name} = {section.default!r}  # {section.metadata['doc']}")
            continue
        lines.append(f"\n[{section.name}]  # {section.metadata['doc']}")
        defaults = cls()
        for f in dataclasses.fields(cls):
            lines.append(f"  {section.name}.{f.name} = {getattr(defaults, f.name)!r}  # {f.metadata['doc']}")
    return "\n".join(lines)
