"""Sample keys the training loader leaves out: ``data.quarantine``.

The file (a local path or any fsspec URL) holds one key per line, optionally followed by the URL of the
shard that holds it — what ``launchers/replay.py --write-quarantine`` writes::

    0000000053 s3://bucket/in1k/train/train-000012.tar
    0000001207

Blank lines and ``#`` comments are ignored. Which shard holds a key is read from the shards' stats files
(data_prep writes one beside every tar): only the named shard's for a key with a shard (another shard of
the same name is taken when the data moved), every shard's for a bare key — or for a key its shard does not
hold. A bare key is excluded from every shard that holds it (several sources may reuse a key).

A quarantined key is excluded the way the manifest's cross-shard duplicates are (``Shard.excluded``): its
shard counts one usable sample fewer, so the epoch plan stays balanced, and the shard-list fingerprint in
the data order names the quarantine (:func:`.shards.fingerprint`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..config.schema import ConfigError
from ..storage import filesystem, write_bytes
from .shards import Shard, shard_stats

STATS_READERS = 16  # stats files read at once


def parse_quarantine(text: str) -> dict[str, str | None]:
    """The entries of a quarantine file's ``text``: key -> the shard named beside it (or None), in file order."""
    entries: dict[str, str | None] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields and (fields[0] not in entries or entries[fields[0]] is None):
            entries[fields[0]] = fields[1] if len(fields) > 1 else None
    return entries


def read_quarantine(url: str, storage_options: dict | None = None) -> dict[str, str | None]:
    """The entries of the quarantine file at ``url`` (:func:`parse_quarantine`); FileNotFoundError when there
    is none."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        return parse_quarantine(f.read().decode())


def add_to_quarantine(url: str, entries: list[tuple[str, str | None]],
                      storage_options: dict | None = None) -> list[str]:
    """Append (key, shard URL or None) entries whose key the file at ``url`` does not hold yet, one line each,
    creating the file if needed; returns the keys added. The file is written whole (one PUT on object stores,
    write-fsync-rename locally): a reader never sees half of it."""
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode()
    except FileNotFoundError:
        text = ""
    present = parse_quarantine(text)
    added, lines = [], []
    for key, shard in entries:
        if key not in present and key not in added:
            added.append(key)
            lines.append(f"{key} {shard}" if shard else key)
    if added:
        if text and not text.endswith("\n"):
            text += "\n"
        write_bytes(fs, path, (text + "\n".join(lines) + "\n").encode())
    return added


def added_note(url: str, added: list[str], offered: int) -> str:
    """The line a tool prints after :func:`add_to_quarantine` put ``added`` (of ``offered`` keys) into ``url``."""
    return (f"quarantine {url}: added {len(added)} key(s) ({', '.join(added) or 'none'}); {offered - len(added)} "
            f"already there. It takes effect at the run's next (re)start with data.quarantine={url} "
            f"data.on_order_change=next_epoch")


def keys_by_shard(urls: list[str], storage_options: dict | None = None) -> dict[str, frozenset]:
    """Every key each shard holds, from its stats file (read in parallel); FileNotFoundError naming a shard
    without one."""

    def one(url: str) -> frozenset:
        try:
            return frozenset(sample[0] for sample in shard_stats(url, storage_options)["samples"])
        except FileNotFoundError:
            raise FileNotFoundError(f"cannot tell which keys {url} holds: no .stats.json beside it (data_prep writes "
                                    f"one beside every shard; copy them with the tars)") from None

    with ThreadPoolExecutor(STATS_READERS) as pool:
        return dict(zip(urls, pool.map(one, urls), strict=True))


def quarantine(shards: list[Shard], entries: dict[str, str | None],
               storage_options: dict | None = None) -> tuple[list[Shard], int, int]:
    """``shards`` with the quarantined keys excluded: (the shards, how many of the keys are in them, how many
    stats files were read). A key its shard already excludes (a manifest duplicate) counts as found and is not
    excluded twice."""
    urls = sorted({s.url for s in shards})
    by_name: dict[str, list[str]] = {}
    for url in urls:
        by_name.setdefault(url.rsplit("/", 1)[-1], []).append(url)

    def named(shard: str) -> list[str]:  # the shard itself, else those of its name (the data was copied)
        same = by_name.get(shard.rsplit("/", 1)[-1], [])
        return [shard] if shard in same else same

    candidates = {key: named(shard) for key, shard in entries.items() if shard}
    try:
        held = keys_by_shard(sorted({u for found in candidates.values() for u in found}), storage_options)
        where = {key: {u for u in found if key in held[u]} for key, found in candidates.items()}
        anywhere = [key for key in entries if not where.get(key)]  # bare keys, and keys their shard does not hold
        if anywhere:
            held.update(keys_by_shard([u for u in urls if u not in held], storage_options))
            where.update({key: {u for u in urls if key in held[u]} for key in anywhere})
    except FileNotFoundError as e:
        raise ConfigError(f"data.quarantine: {e}") from None
    by_shard: dict[str, set[str]] = {}
    for key, found in where.items():
        for url in found:
            by_shard.setdefault(url, set()).add(key)
    out = []
    for s in shards:
        new = frozenset(by_shard.get(s.url, ())) - s.excluded
        out.append(Shard(s.url, s.num_samples - len(new), s.excluded | new, s.source, s.quarantined | new)
                   if new else s)
    return out, sum(1 for found in where.values() if found), len(held)
