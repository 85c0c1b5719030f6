"""CIFAR-10 and CIFAR-100, "python version": pickled batches of 32x32 images, loaded with a restricted unpickler.

    cifar-10-batches-py/   data_batch_1 … data_batch_5 (train), test_batch (test), batches.meta (label_names)
    cifar-100-python/      train, test, meta (fine_label_names); labels under fine_labels

A batch is a dict: ``data`` (a uint8 array [N, 3072], each row the red, green then blue plane of a 32x32
image, row-major), the labels, ``filenames``, ``batch_label``. The files are Python 2 pickles, and a pickle can
call any function while it loads. Ours may build exactly what a batch holds — dicts, lists, strings, bytes,
numbers and numpy arrays (which pickle through numpy's ``_reconstruct``, ``ndarray`` and ``dtype``) — and
nothing else: a file that would call anything else is refused, naming the file, before that call is made.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
from PIL import Image

from ..sources import Item
from ..storage import url_to_fs
from .common import BenchmarkError, Format, Listing, Root

try:  # numpy >= 2 (the genuine files name numpy.core.multiarray: both spellings are the same function)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

SIDE = 32
ROW_BYTES = 3 * SIDE * SIDE

# (module, name) a genuine batch's pickle looks up -> the object it gets; every other lookup is refused
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class UnsafePickle(BenchmarkError):
    """A CIFAR file whose loading would call something a CIFAR batch never needs (it is not loaded)."""


class _Refused(pickle.UnpicklingError):
    """A lookup outside :data:`ALLOWED_GLOBALS` (its message: ``module.name``)."""


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS`: any other global (``os.system``, ``builtins.eval``, a class with a
    ``__reduce__``) stops the load before it is called. Persistent ids are refused by pickle's default."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def load_batch(raw: bytes, source: str) -> dict:
    """A CIFAR pickle's dict, loaded with :class:`_BatchUnpickler` (latin-1 for the Python 2 strings, as numpy
    documents for Python 2 pickles of arrays). Raises :class:`UnsafePickle` or :class:`BenchmarkError`."""
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as e:
        raise UnsafePickle(f"{source}: refused, not loaded: the pickle asks for {e} (to call while loading), which "
                           f"a CIFAR batch never needs (only dicts, lists, strings, numbers and numpy arrays are "
                           f"allowed). Replace it with the file from the official archive.") from None
    except Exception as e:  # truncated or not a pickle at all
        raise BenchmarkError(f"{source}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise BenchmarkError(f"{source}: holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    return obj


def batch_data(batch: dict, source: str) -> np.ndarray:
    """The images of a loaded batch: a uint8 array [N, 3072], checked."""
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise BenchmarkError(f"{source}: 'data' is {what}, not a uint8 array [N, {ROW_BYTES}]")
    return data


def batch_labels(batch: dict, labels_key: str, num_rows: int, num_classes: int, source: str) -> list[int]:
    """The labels of a loaded batch, checked: one per row, each a class index."""
    labels = batch.get(labels_key)
    if not isinstance(labels, list) or len(labels) != num_rows:
        raise BenchmarkError(f"{source}: '{labels_key}' is not a list of {num_rows} labels")
    bad = [x for x in labels if not isinstance(x, int) or not 0 <= x < num_classes]
    if bad:
        raise BenchmarkError(f"{source}: labels outside 0..{num_classes - 1}: {bad[:5]}")
    return labels


def row_png(row: np.ndarray) -> bytes:
    """One CIFAR row (the R, G and B planes, 1024 bytes each) as a 32x32 RGB PNG."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(row.reshape(3, SIDE, SIDE).transpose(1, 2, 0))).save(out, "PNG")
    return out.getvalue()


class BatchFile:
    """A batch opened for the shard writer: loaded once (restricted), each record encoded on request."""

    def __init__(self, url: str, options: dict):
        fs, path = url_to_fs(url, options)
        self.data = batch_data(load_batch(fs.cat_file(path), url), url)

    def image(self, record: int) -> bytes:
        return row_png(self.data[record])

    def close(self) -> None:
        self.data = None


def _lister(meta: str, names_key: str, labels_key: str, batches: dict[str, list[str]]):
    def list_split(root: Root, split: str) -> Listing:
        meta_doc = load_batch(root.read(meta), root.url(meta))
        classes = meta_doc.get(names_key)
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise BenchmarkError(f"{root.url(meta)}: no list of class names under '{names_key}'")
        items = []
        for name in batches[split]:
            url = root.url(name)
            batch = load_batch(root.read(name), url)
            data = batch_data(batch, url)
            labels = batch_labels(batch, labels_key, len(data), len(classes), url)
            files = batch.get("filenames")
            files = files if isinstance(files, list) and len(files) == len(data) else None
            for row, label in enumerate(labels):
                items.append(Item(source=f"{url}::{row}", size=ROW_BYTES, label_name=classes[label], url=url,
                                  container="cifar", record=row,
                                  meta={"filename": str(files[row])} if files else {}))
        return Listing(items, list(classes), {"files": batches[split]})
    return list_split


FORMATS = (
    Format("cifar10", "the extracted cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta)",
           ("train", "test"),
           _lister("batches.meta", "label_names", "labels",
                   {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}),
           arrays=True),
    Format("cifar100", "the extracted cifar-100-python folder (train, test, meta)", ("train", "test"),
           _lister("meta", "fine_label_names", "fine_labels", {"train": ["train"], "test": ["test"]}),
           arrays=True),
)
