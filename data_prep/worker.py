"""Write one shard: read its inputs, process each image, stream a tar, publish it, then its stats."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from dataclasses import asdict, dataclass

from xtra_ds.data.format import join, sample_key, shard_name, stats_name
from xtra_ds.storage import dumps, write_bytes

from .fetch import FetchError, TooLarge
from .imaging import Result, Settings, process
from .policy import NotAllowed, SourcePolicy
from .sources import Item, SourceReader
from .storage import explain, publish_file, staging_file, url_to_fs
from .wds import TarWriter

READ_RETRIES = 3


@dataclass
class ShardTask:
    index: int
    inputs: list[int]  # each item's index in the sorted input list: its sample key
    items: list[Item]  # in the order the shard holds them (the plan's shuffled order)
    root: str  # output URL
    name: str
    settings: Settings
    settings_hash: str
    classes: dict[str, int]
    options: dict
    policy: SourcePolicy | None = None  # what list entries may reach, checked again when they are fetched


class Progress:
    """Counts processed and rejected inputs; shared with the parent process when given Values."""

    def __init__(self, done=None, rejected=None):
        self.done, self.rejected = done, rejected

    def add(self, rejected: bool) -> None:
        if self.done is not None:
            with self.done.get_lock():
                self.done.value += 1
            if rejected:
                with self.rejected.get_lock():
                    self.rejected.value += 1


class HashingWriter:
    """A binary file that hashes and counts what is written through it (the shard's sha256 and size
    without reading the file again)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def tar_writer(f) -> TarWriter:
    """webdataset's TarWriter, set for byte-identical reruns: fixed mtime, owner and mode; bytes as they are.
    USTAR headers (webdataset 1.0.2 accepts ``format=`` but never hands it to tarfile, which then writes
    PAX): our member names are short ASCII, and USTAR headers cost half the time to make."""
    writer = TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False)
    writer.tarstream.format = tarfile.USTAR_FORMAT
    return writer


@dataclass(frozen=True)
class Rejected:
    """An input that is rejected for what reading it showed: the server refused it on every try (403, 500,
    …), it cannot be fetched at all (a list entry's host does not resolve or answer), the policy refused
    where it leads, or it is too large. A per-input fact: the shard goes on."""

    reason: str
    detail: str


class InputUnreachable(RuntimeError):
    """An input on storage (a filesystem, an object store) could not be read because the storage itself
    failed (a dead endpoint): the shard fails, and a rerun redoes it. The message names the input."""


def answered_status(error: BaseException) -> int | None:
    """The HTTP status a server answered with, when ``error`` carries one (our fetch, fsspec's http, botocore)."""
    status = getattr(error, "status", None)  # FetchError, aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(error, "response", None)  # botocore.exceptions.ClientError
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _read(reader: SourceReader, item: Item) -> bytes | Rejected | None:
    """The input's bytes; None if it does not exist; :class:`Rejected` for a fact about this input. Errors
    of the storage itself (a dead endpoint) raise :class:`InputUnreachable` after the retries."""
    for attempt in range(READ_RETRIES):
        try:
            return reader.read(item)
        except FileNotFoundError:
            return None
        except NotAllowed as e:  # nothing was sent where the policy refuses; asking again changes nothing
            return Rejected("not_allowed", str(e))
        except TooLarge as e:
            return Rejected("file_too_large", str(e))
        except Exception as e:
            last = attempt == READ_RETRIES - 1 or (isinstance(e, FetchError) and not e.transient)
            if not last:
                time.sleep(0.5 * 2**attempt)
                continue
            tries = f"after {attempt + 1} tr{'y' if attempt == 0 else 'ies'}"
            if isinstance(e, FetchError):  # a list entry's own host: its message names the URL
                return Rejected("unreadable", f"{e} ({tries})")
            status = answered_status(e)
            if status is not None or isinstance(e, PermissionError):
                what = f"HTTP {status}" if status is not None else "permission denied"
                return Rejected("unreadable", f"{what} for {item.url} {tries} ({type(e).__name__}: {e})")
            raise InputUnreachable(f"cannot read input {item.source}: {explain(item.url, e)}") from e
    return None


def shard_failure(task: ShardTask, error: BaseException) -> str:
    """What to say when writing ``task``'s shard failed: the input that could not be read, or the output."""
    if isinstance(error, InputUnreachable):
        return str(error)
    return f"{type(error).__name__}: {explain(task.root, error)}"


def write_shard(task: ShardTask, progress: Progress | None = None) -> dict:
    """Process and publish one shard; returns its stats (also written beside it, last)."""
    progress = progress or Progress()
    fs, root = url_to_fs(task.root, task.options)
    dest = join(root, shard_name(task.name, task.index))
    reader = SourceReader(task.options, task.policy, task.settings.max_bytes)
    samples, rejected, seen = [], [], {}
    tmp = staging_file(fs, dest)
    hashed = HashingWriter(tmp)
    try:
        with tmp, tar_writer(hashed) as sink:
            for index, item in zip(task.inputs, task.items, strict=True):
                key = sample_key(index)
                why = None
                if item.refused:
                    why = ("not_allowed", item.refused)
                elif item.no_label:
                    why = ("no_label", item.no_label)
                raw = None if why else _read(reader, item)
                if isinstance(raw, Rejected):
                    why, raw = (raw.reason, raw.detail), None
                elif why is None and raw is None:
                    why = ("read_error", "not found")
                if why is None:
                    sha = hashlib.sha256(raw).hexdigest()
                    # the copy kept is the earliest input (smallest key), whatever the shard order: a later
                    # one is never written; an earlier one met later is, and finalize excludes the other
                    if task.settings.dedupe and sha in seen and seen[sha][0] < index:
                        why = ("duplicate", f"same bytes as {seen[sha][1]}")
                if why is None:
                    res: Result = process(raw, task.settings)
                    if res.reason:
                        why = (res.reason, res.detail)
                if why:
                    rejected.append({"key": key, "source": item.source, "reason": why[0], "detail": why[1]})
                    progress.add(True)
                    continue
                seen[sha] = (index, item.source)
                meta = {"source": item.source, "width": res.width, "height": res.height, "format": res.fmt,
                        "mode": res.mode, "sha256": sha, "label": item.label_name, **item.meta}
                sample = {"__key__": key, res.ext: res.data, "json": json.dumps(meta, sort_keys=True).encode()}
                if item.label_name is not None:
                    sample["cls"] = str(task.classes[item.label_name]).encode()
                sink.write(sample)
                samples.append([key, sha, item.source])
                progress.add(False)
        publish_file(tmp.name, fs, dest)
    finally:
        reader.close()
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    stats = {"shard": shard_name(task.name, task.index), "index": task.index, "num_inputs": len(task.items),
             "num_samples": len(samples), "bytes": hashed.size, "sha256": hashed.sha.hexdigest(),
             "settings_hash": task.settings_hash,
             "samples": samples, "rejected": rejected}
    write_bytes(fs, join(root, stats_name(task.name, task.index)), dumps(stats))  # last: marks completion
    return stats


def settings_dict(s: Settings) -> dict:
    return asdict(s)


# --- process-pool glue (spawned workers get the shared counters once, at start) ---------------
_PROGRESS = Progress()


def init_worker(done, rejected) -> None:
    global _PROGRESS
    _PROGRESS = Progress(done, rejected)


def run_task(task: ShardTask) -> dict:
    try:
        return write_shard(task, _PROGRESS)
    except Exception as e:  # reported per shard by the parent; the other shards go on
        return {"index": task.index, "error": shard_failure(task, e)}
