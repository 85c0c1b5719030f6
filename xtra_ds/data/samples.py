"""Samples out of WebDataset shards, through webdataset's own tar stages.

``webdataset.tariterators.tar_file_iterator`` reads the members and ``group_by_keys`` makes samples
of them (``{"__key__", "__url__", "jpg": bytes, "cls": bytes, "json": bytes}``), exactly as a
``wds.WebDataset`` over the same shards would. Ours around them — what webdataset does not do:

* the stream is :class:`~.remote.RetryingReader` (ranged reads that reopen at the byte offset they
  reached, with backoff), not a fresh ``open`` that restarts the shard;
* a member larger than the bound stops the read before it is in memory;
* the manifest's cross-shard duplicates (``excluded`` keys) are skipped;
* a segment (skip n samples, take m) must deliver all m: a shard shorter than its manifest says is an
  error, never a silently short epoch (webdataset stops quietly at a tar cut on a header boundary);
* every error names the shard (:class:`~.remote.ShardReadError`).
"""

from __future__ import annotations

import io
import itertools
import tarfile
from contextlib import contextmanager
from typing import Iterator

from webdataset.tariterators import group_by_keys, tar_file_iterator

from .format import IMAGE_EXTS, MAX_SAMPLE_BYTES
from .remote import BLOCK_SIZE, ShardReadError, open_shard
from .shards import Segment

HEADER_SLACK = 2 * tarfile.RECORDSIZE  # the tar reader's read-ahead past a member (it reads whole records)


class MemberTooLarge(Exception):
    pass


class _Bounded(io.RawIOBase):
    """Counts what the tar reader pulls while it reads one member (:meth:`starting` is told its name);
    more than the bound means a member too large, refused before it is all in memory."""

    def __init__(self, f, bound: int, url: str):
        self.f, self.bound, self.since, self.url, self.member = f, bound + HEADER_SLACK, 0, url, ""

    def starting(self, name: str) -> bool:
        """webdataset's ``select_files`` hook: called with each member's name just before it is read."""
        self.member, self.since = name, 0
        return True

    def __repr__(self) -> str:  # webdataset appends " @ <stream>" to the errors it sees
        return self.url

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.since += n
        if self.since > self.bound:
            raise MemberTooLarge()
        return n


def _reraise(error: Exception) -> bool:
    raise error  # webdataset's handlers decide to go on or stop; we never go on past a broken shard


def samples_of(url: str, options: dict | None, *, excluded: frozenset = frozenset(), retries: int = 8,
               max_member_bytes: int = MAX_SAMPLE_BYTES, block_size: int = BLOCK_SIZE) -> Iterator[dict]:
    """Every usable sample of the shard at ``url``, in tar order (``block_size``: bytes per read request)."""
    f = open_shard(url, options, retries=retries, block_size=block_size)
    bounded = _Bounded(f, max_member_bytes, url)

    def files():
        for member in tar_file_iterator(bounded, handler=_reraise, select_files=bounded.starting):
            member["__url__"] = url
            yield member

    try:
        with _named(url):
            for sample in group_by_keys(files(), handler=_reraise):
                if sample["__key__"] not in excluded:
                    yield sample
    except MemberTooLarge:
        raise ShardReadError.of(url, f"member {bounded.member} holds more than the loader's bound of "
                                     f"{max_member_bytes} bytes (data.max_sample_bytes)") from None
    finally:
        f.close()


def keys_of(url: str, options: dict | None, *, excluded: frozenset = frozenset(), retries: int = 8,
            block_size: int = BLOCK_SIZE) -> list[str]:
    """The usable sample keys of the shard at ``url``, in tar order, from its tar headers alone: webdataset's tar
    iterator is told to skip every member (its ``select_files`` hook answers no), so no member reaches memory and
    no image is decoded, and webdataset's ``group_by_keys`` makes the keys of the member names, as it does for
    :func:`samples_of`. The tar is still read through (a tar stream has no index to seek by): this is for shards
    whose stats file lists no samples (data_prep before the lists)."""
    names: list[str] = []

    def skip(name: str) -> bool:
        names.append(name)
        return False

    f = open_shard(url, options, retries=retries, block_size=block_size)
    try:
        with _named(url):
            for _ in tar_file_iterator(f, handler=_reraise, select_files=skip):
                pass  # pragma: no cover - every member is skipped
            members = ({"fname": name, "data": b"", "__url__": url} for name in names)
            return [s["__key__"] for s in group_by_keys(members, handler=_reraise) if s["__key__"] not in excluded]
    finally:
        f.close()


@contextmanager
def _named(url: str):
    """What the tar stages raise, as a :class:`ShardReadError` naming the shard."""
    try:
        yield
    except tarfile.TarError as e:
        raise ShardReadError.of(url, f"not a readable tar ({e})") from e
    except ValueError as e:  # group_by_keys: the same member name twice in a sample
        raise ShardReadError.of(url, f"not a WebDataset shard ({e})") from e


def read_segment(seg: Segment, options: dict | None, retries: int = 8,
                 max_member_bytes: int = MAX_SAMPLE_BYTES, block_size: int = BLOCK_SIZE) -> Iterator[dict]:
    """The ``seg.take`` usable samples of a shard after skipping ``seg.skip``. A shard that ends
    early is an error (the manifest promised more), never a silent short epoch."""
    shard = seg.shard
    got = 0
    stream = samples_of(shard.url, options, excluded=shard.excluded, retries=retries, max_member_bytes=max_member_bytes,
                        block_size=block_size)
    for sample in itertools.islice(stream, seg.skip, seg.skip + seg.take):
        yield sample
        got += 1
    stream.close()
    if got < seg.take:
        raise ShardReadError.of(shard.url, f"ended after {seg.skip + got} usable samples; the manifest says "
                                           f"{shard.num_samples} (shard replaced or truncated?)")


def image_of(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS + ("jpeg",):
        if ext in sample:
            return sample[ext]
    return None
