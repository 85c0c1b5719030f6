"""PatchCamelyon (PCam): 96x96 histopathology patches in HDF5 files, read a slice at a time.

    ROOT/camelyonpatch_level_2_split_{train,valid,test}_x.h5   dataset x [N, 96, 96, 3] uint8
    ROOT/camelyonpatch_level_2_split_{train,valid,test}_y.h5   dataset y [N, 1, 1, 1]: 1 = tumour in the centre

The train x file is 6.6 GB: nothing reads a whole dataset. Listing reads the labels in slices; the shard writer
reads one patch (a 27 KB hyperslab) per sample from a file it keeps open. h5py is optional
(``pip install 'xtra-ds[benchmarks]'``) and imported only here.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from xtra_ds.storage import is_local

from ..sources import Item
from ..storage import url_to_fs
from .common import BenchmarkError, Format, Listing, Root

SIDE = 96
CLASSES = ["normal", "tumor"]  # y = 1: the centre 32x32 region holds tumour tissue
LABEL_SLICE = 65_536  # labels read per slice while listing


def h5py_module():
    """h5py, or an error that names the install command."""
    try:
        import h5py
    except ImportError:
        raise BenchmarkError("--format pcam reads HDF5 files and needs h5py: pip install 'xtra-ds[benchmarks]' "
                             "(or pip install h5py)") from None
    return h5py


def open_h5(url: str, options: dict):
    """An HDF5 file opened read-only: local files by path, others through fsspec (h5py reads file objects).
    Returns (h5py.File, the underlying file object or None)."""
    h5py = h5py_module()
    fs, path = url_to_fs(url, options)
    if is_local(fs):
        return h5py.File(path, "r"), None
    f = fs.open(path, "rb", block_size=4 << 20)
    return h5py.File(f, "r"), f


def file_name(split: str, part: str) -> str:
    return f"camelyonpatch_level_2_split_{split}_{part}.h5"


def _dataset(h5, name: str, source: str):
    if name not in h5:
        raise BenchmarkError(f"{source}: no dataset {name!r} (datasets: {', '.join(h5.keys())})")
    return h5[name]


def list_split(root: Root, split: str) -> Listing:
    x_rel, y_rel = file_name(split, "x"), file_name(split, "y")
    for rel in (x_rel, y_rel):
        if not root.exists(rel):
            raise BenchmarkError(f"{root.url(rel)}: no such file (decompress the .h5.gz downloads into ROOT)")
    x_url, y_url = root.url(x_rel), root.url(y_rel)
    opts = root.options
    h5y, fy = open_h5(y_url, opts)
    try:
        y = _dataset(h5y, "y", y_url)
        n = y.shape[0]
        labels = np.concatenate([np.asarray(y[i:i + LABEL_SLICE]).reshape(-1) for i in range(0, n, LABEL_SLICE)]
                                or [np.zeros(0, np.int64)])
    finally:
        h5y.close()
        if fy is not None:
            fy.close()
    if labels.shape != (n,):
        raise BenchmarkError(f"{y_url}: y has shape {y.shape}, not [N, 1, 1, 1]")
    if not np.isin(labels, (0, 1)).all():
        raise BenchmarkError(f"{y_url}: labels other than 0 and 1: {sorted(set(labels.tolist()) - {0, 1})[:5]}")
    h5x, fx = open_h5(x_url, opts)
    try:
        x = _dataset(h5x, "x", x_url)
        if x.shape != (n, SIDE, SIDE, 3) or x.dtype != np.uint8:
            raise BenchmarkError(f"{x_url}: x is {x.dtype} {x.shape}, not uint8 [{n}, {SIDE}, {SIDE}, 3] "
                                 f"(one patch per label of {y_rel})")
    finally:
        h5x.close()
        if fx is not None:
            fx.close()
    items = [Item(source=f"{x_url}::{i}", size=SIDE * SIDE * 3, label_name=CLASSES[int(label)], url=x_url,
                  container="pcam", record=i) for i, label in enumerate(labels)]
    return Listing(items, list(CLASSES), {"files": [x_rel, y_rel]})


class PatchFile:
    """An x file opened for the shard writer: each record read alone (never the whole dataset), as PNG."""

    def __init__(self, url: str, options: dict):
        self.h5, self.f = open_h5(url, options)
        self.x = _dataset(self.h5, "x", url)

    def image(self, record: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.asarray(self.x[record])).save(out, "PNG")
        return out.getvalue()

    def close(self) -> None:
        self.h5.close()
        if self.f is not None:
            self.f.close()


FORMATS = (
    Format("pcam", "a folder of camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5", ("train", "valid", "test"),
           list_split, aliases=(("val", "valid"),), arrays=True),
)
