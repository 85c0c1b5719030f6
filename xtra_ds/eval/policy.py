"""What the eval worker evaluates next, and what it calls the dataset (pure functions)."""

from __future__ import annotations

import re


def choose(pending: list[int], max_pending: int) -> int:
    """The step to evaluate next: the oldest, or the newest when more than ``max_pending`` wait."""
    return max(pending) if len(pending) > max_pending else min(pending)


def dataset_name(spec: str) -> str:
    """A short name for TensorBoard tags from a shard spec: ``…/digits/val/manifest.json`` -> ``digits``."""
    parts = [p for p in re.split(r"[/\\]", spec.split("://", 1)[-1]) if p and not p.endswith((".json", ".tar"))
             and "{" not in p]
    while len(parts) > 1 and parts[-1].lower() in ("train", "val", "validation", "test", "eval", "shards"):
        parts.pop()
    return safe_name(parts[-1] if parts else "data")


def safe_name(name: str) -> str:
    """``name`` usable in file names and TensorBoard tags."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
