"""Benchmarks as distributed -> the inputs of data_prep/shard.py:

    xtra-shard --format cifar10 /data/cifar-10-batches-py --split train --output /shards/cifar10/train

Each format reads its benchmark's own index files (pickled batches, HDF5, MATLAB, COCO JSON, CSV, text lists)
and yields the :class:`~data_prep.sources.Item` s a directory listing yields, plus the class names in label
order (the manifest's ``classes``; each sample's ``cls`` is its label). Everything after listing — the shuffle,
the shard plan, job arrays, resume, rejections with reasons, the manifest — is shard.py's one path. A split
``a+b`` is both, in that order (DTD's official evaluation trains on ``train1+val1``).
"""

from __future__ import annotations

from . import cifar, image_files, pcam, wilds
from .common import BenchmarkError, Format, Listing, Root

FORMATS: dict[str, Format] = {f.name: f for f in (*cifar.FORMATS, *pcam.FORMATS, *image_files.FORMATS,
                                                   *wilds.FORMATS)}

# array files whose records the shard writer turns into images (Item.container)
CONTAINERS = {"cifar": cifar.BatchFile, "pcam": pcam.PatchFile}


def list_benchmark(name: str, root: str, split: str, options: dict | None = None) -> Listing:
    """The inputs of split ``split`` (``a+b``: both) of benchmark ``name`` whose files are at ``root``."""
    fmt = FORMATS[name]
    parts = [fmt.split_name(part) for part in split.split("+")]
    if len(set(parts)) != len(parts):
        raise BenchmarkError(f"--split {split}: a split is named twice")
    folder = Root(root, options, fmt)
    listings = [fmt.lister(folder, part) for part in parts]
    classes = listings[0].classes
    for part, listing in zip(parts[1:], listings[1:], strict=True):
        if listing.classes != classes:
            raise BenchmarkError(f"{root}: splits {parts[0]} and {part} name their classes differently")
    extra = listings[0].details if len(parts) == 1 else {p: x.details for p, x in zip(parts, listings, strict=True)
                                                          if x.details}
    details = {"format": name, "split": "+".join(parts), **extra}
    return Listing([it for listing in listings for it in listing.items], classes, details)


def open_container(kind: str, url: str, options: dict | None):
    """The array file at ``url`` opened for reading records as images (``.image(record)``, ``.close()``)."""
    return CONTAINERS[kind](url, options or {})


__all__ = ["FORMATS", "BenchmarkError", "Format", "Listing", "list_benchmark", "open_container"]
