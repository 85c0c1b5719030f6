"""The shard plan every job agrees on, and finalize: per-shard stats -> manifest.json."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from xtra_ds.data.format import FORMAT_VERSION, MANIFEST, PLAN, join, shard_name, stats_name
from xtra_ds.storage import dumps, read_json, write_bytes

from . import __version__
from .storage import StorageError, explain, url_to_fs

EXAMPLES_PER_REASON = 20


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a bijection on 64-bit integers that scrambles every bit."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def input_order(num_inputs: int, seed: int | None) -> np.ndarray:
    """The order in which the shards hold the inputs: input indices (positions in the sorted input list),
    shard 0's first. ``seed`` None keeps the sorted order; otherwise a seeded shuffle — the inputs sorted
    by the SplitMix64 sequence of ``seed`` (a uniform permutation, the same on every machine and numpy
    version, whatever the jobs and workers).

    Why shuffle: a sorted class-folder corpus is class-ordered, and the loader's streams read contiguous
    stretches of the shard order (xtra_ds.data.shards), so each would serve one class for hundreds of steps."""
    index = np.arange(num_inputs, dtype=np.uint64)
    if seed is None:
        return index.astype(np.int64)
    with np.errstate(over="ignore"):
        state = (index + np.uint64(1)) * _GOLDEN + np.uint64(seed % 2**64)
    return np.argsort(_splitmix64(state))  # the keys are distinct (a bijection of distinct states)


def order_fingerprint(order: np.ndarray) -> str:
    """A short hash of an input order (in the plan: jobs that would order the inputs differently disagree)."""
    return hashlib.sha256(np.ascontiguousarray(order, dtype="<u8").tobytes()).hexdigest()[:16]


def plan_shards(sizes: list[int], shard_samples: int, shard_bytes: int) -> list[int]:
    """Start of every shard in the input order: cut when a shard reaches ``shard_samples`` inputs or
    ``shard_bytes`` of input. ``sizes`` are in that order (:func:`input_order`); the plan depends on
    the input list and the order only, never on jobs or workers."""
    starts, count, size = [0] if sizes else [], 0, 0
    for i, s in enumerate(sizes):
        if count and (count >= shard_samples or size + s > shard_bytes):
            starts.append(i)
            count, size = 0, 0
        count += 1
        size += s
    return starts


def fingerprint(sources: list[str]) -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def agree_on_plan(fs, root: str, url: str, plan: dict) -> None:
    """Write the plan, or check that the one already there (earlier run, other job) is the same."""
    path = join(root, PLAN)
    if fs.exists(path):
        old = read_json(fs, path)
        for key, what in (("settings_hash", "settings"), ("inputs_fingerprint", "inputs"),
                          ("order_fingerprint", "input order"), ("shard_starts", "shard plan"), ("name", "shard name")):
            if old.get(key) != plan.get(key):
                raise StorageError(
                    f"{url} already holds shards made with different {what} ({PLAN} differs in '{key}'). "
                    f"Write to a new --output, or delete the old shards to start over.")
        return
    write_bytes(fs, path, dumps(plan))


def _read_stats(fs, root, name, indices):
    def one(i):
        try:
            return read_json(fs, join(root, stats_name(name, i)))
        except FileNotFoundError:
            return None
    with ThreadPoolExecutor(16) as ex:
        return list(ex.map(one, indices))


def read_document(url: str, options: dict | None, name: str, missing_hint: str):
    """``(fs, root, doc)`` for the JSON file ``name`` at the shard root ``url``, fresh from storage."""
    fs, root = url_to_fs(url, options)
    fs.invalidate_cache()  # listings cached before other processes wrote are stale
    try:
        return fs, root, read_json(fs, join(root, name))
    except FileNotFoundError:
        raise StorageError(f"{url}: no {name} here — {missing_hint}") from None
    except Exception as e:
        raise StorageError(explain(url, e)) from e


def finalize(url: str, options: dict | None = None) -> dict:
    """Merge every shard's stats into ``manifest.json``; refuse while any shard is missing."""
    fs, root, plan = read_document(url, options, PLAN, "run data_prep/shard.py with this --output first")
    n = len(plan["shard_starts"])
    stats = _read_stats(fs, root, plan["name"], range(n))
    missing = [i for i, s in enumerate(stats) if s is None or s.get("settings_hash") != plan["settings_hash"]]
    if missing:
        jobs = plan.get("num_jobs", 1)
        owners = sorted({i % jobs for i in missing})
        raise StorageError(
            f"{len(missing)} of {n} shards are not complete yet "
            f"(e.g. {', '.join(shard_name(plan['name'], i) for i in missing[:5])})"
            + (f"; they belong to job index(es) {owners[:20]} of {jobs}" if jobs > 1 else "")
            + ". Rerun those jobs (finished shards are skipped), then finalize again.")
    dedupe = plan["settings"].get("dedupe", True)  # benchmarks keep every image they list
    kept: dict[str, tuple[str, str]] = {}  # sha256 -> (key, source) of the earliest input with those bytes
    for s in stats:
        for key, sha, source in s["samples"]:
            if sha not in kept or key < kept[sha][0]:
                kept[sha] = (key, source)
    shards, rejections = [], []
    for s in stats:
        excluded = []
        for key, sha, source in s["samples"]:
            if dedupe and kept[sha][0] != key:  # an exact duplicate of an earlier input (another shard, or met first)
                excluded.append(key)
                rejections.append({"key": key, "source": source, "reason": "duplicate",
                                   "detail": f"same bytes as {kept[sha][1]}"})
        rejections += s["rejected"]
        shards.append({"name": s["shard"], "num_samples": s["num_samples"], "bytes": s["bytes"], "sha256": s["sha256"],
                       "num_inputs": s["num_inputs"], "excluded": excluded})
    reasons: Counter = Counter()
    examples: dict[str, list] = {}
    for r in sorted(rejections, key=lambda r: r.get("key", "")):  # the examples: the earliest inputs, any order
        reasons[r["reason"]] += 1
        ex = examples.setdefault(r["reason"], [])
        if len(ex) < EXAMPLES_PER_REASON:
            ex.append({"source": r["source"], "detail": r["detail"]})
    inputs = sum(s["num_inputs"] for s in stats)
    written = sum(s["num_samples"] - len(s["excluded"]) for s in shards)
    rejected = sum(reasons.values())
    if inputs != plan["num_inputs"] or written + rejected != inputs:
        raise StorageError(f"{url}: accounting does not add up (inputs {inputs} vs plan {plan['num_inputs']}, "
                           f"written {written} + rejected {rejected}); shards may be from another run")
    manifest = {
        "format": FORMAT_VERSION, "tool": {"name": "xtra-ds data_prep", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "name": plan["name"],
        "sources": plan["sources"], "settings": plan["settings"], "settings_hash": plan["settings_hash"],
        "order_fingerprint": plan.get("order_fingerprint"),
        "classes": plan["classes"],
        **({"benchmark": plan["benchmark"]} if "benchmark" in plan else {}),
        "totals": {"inputs": inputs, "written": written, "rejected": rejected, "shards": n,
                   "bytes": sum(s["bytes"] for s in shards)},
        "rejections": {r: {"count": c, "examples": examples[r]} for r, c in sorted(reasons.items())},
        "shards": shards,
    }
    write_bytes(fs, join(root, MANIFEST), dumps(manifest))
    return manifest
