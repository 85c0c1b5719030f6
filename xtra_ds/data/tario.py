"""Samples out of a WebDataset tar stream: entries grouped by key, duplicates excluded."""

from __future__ import annotations

import tarfile
from typing import Iterator

from .format import IMAGE_EXTS, MAX_SAMPLE_BYTES
from .remote import ShardReadError, open_shard
from .shards import Segment


def _samples(url: str, fileobj, excluded: frozenset, max_member_bytes: int) -> Iterator[dict]:
    current: dict | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.size > max_member_bytes:  # never read a member of any size into memory
                    raise ShardReadError.of(url, f"member {m.name} holds {m.size} bytes, more than the loader's "
                                                 f"bound of {max_member_bytes} (data.max_sample_bytes)")
                key, _, ext = m.name.partition(".")
                if current is not None and key != current["__key__"]:
                    if current["__key__"] not in excluded:
                        yield current
                    current = None
                data = tf.extractfile(m).read()
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
    except tarfile.TarError as e:
        raise ShardReadError.of(url, f"not a readable tar ({e})") from e
    if current is not None and current["__key__"] not in excluded:
        yield current


def read_segment(seg: Segment, options: dict | None, retries: int = 8,
                 max_member_bytes: int = MAX_SAMPLE_BYTES) -> Iterator[dict]:
    """The ``seg.take`` usable samples of a shard after skipping ``seg.skip``. A shard that ends
    early is an error (the manifest promised more), never a silent short epoch."""
    f = open_shard(seg.shard.url, options, retries=retries)
    n = 0
    try:
        for i, sample in enumerate(_samples(seg.shard.url, f, seg.shard.excluded, max_member_bytes)):
            if i < seg.skip:
                continue
            yield sample
            n += 1
            if n == seg.take:
                return
    finally:
        f.close()
    raise ShardReadError.of(seg.shard.url, f"ended after {seg.skip + n} usable samples; the manifest says "
                                        f"{seg.shard.num_samples} (shard replaced or truncated?)")


def image_of(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS + ("jpeg",):
        if ext in sample:
            return sample[ext]
    return None
