"""Enumerate a corpus into a sorted, deterministic list of inputs.

Three kinds of source, local or behind any fsspec URL:

* a directory tree — one sub-folder per class gives labels (``train/n01440764/x.JPEG``), or flat;
* a list file (``.jsonl`` or ``.csv``): a ``url``/``path`` per row, optional ``label``, any other
  fields kept as metadata;
* tar archives of images (ImageNet-21k ships one per class): the archive's stem is the label and
  members are read in place, by offset, never extracted to disk.

Every input gets an index in the sorted list; that index fixes its shard and its sample key,
so the same corpus and settings give the same shards whatever the number of jobs and workers.

A list names what it likes, so what it may reach is bounded (:class:`~data_prep.policy.SourcePolicy`):
by default only its own scheme (a list on s3:// reaches s3:// objects, a local list local files), and
never an address that is not globally routable (cloud metadata services, loopback, private networks)
unless that host is allowed by name. http(s) entries are fetched by :mod:`data_prep.fetch`, from the
addresses the policy checked. An entry outside the policy is not read; it is rejected with reason
``not_allowed``.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import ssl
import tarfile
from dataclasses import dataclass, field

from xtra_ds.data.format import MAX_SAMPLE_BYTES

from .fetch import fetch
from .policy import SourcePolicy, scheme_of
from .storage import StorageError, explain, url_to_fs

LIST_SUFFIXES = (".jsonl", ".csv")
DEFAULT_SIZE_GUESS = 110_000  # bytes, for planning when a list file gives no sizes


@dataclass
class Item:
    """One input image: where its bytes are and what is known about it."""

    source: str  # URL / path shown to users; for tar members "archive.tar::member"
    size: int  # bytes (a guess for list files)
    label_name: str | None = None
    url: str = ""  # what to open (the archive for tar members)
    offset: int = -1  # tar members: data offset inside the archive
    meta: dict = field(default_factory=dict)
    refused: str = ""  # why this input may not be read (a list entry outside the SourcePolicy)
    listed_in: str = ""  # the list file that names this input (its entries are fetched under the policy)
    no_label: str = ""  # why an input that needs a label has none: it is rejected as no_label with this detail
    # images inside a benchmark's array files (data_prep.benchmarks: CIFAR pickles, PCAM HDF5): the reader that
    # turns record `record` of the file at `url` into image bytes
    container: str = ""
    record: int = -1


def _is_list(spec: str) -> bool:
    return spec.lower().endswith(LIST_SUFFIXES)


def _full(fs, path: str, like: str) -> str:
    return fs.unstrip_protocol(path) if "://" in like else path


def _from_dir(spec: str, options: dict, labels: str) -> list[Item]:
    fs, root = url_to_fs(spec, options)
    try:
        if not fs.isdir(root):
            raise StorageError(f"input {spec!r} is neither a directory, a .tar, nor a .jsonl/.csv list")
        files = fs.find(root, detail=True)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(explain(spec, e)) from e
    root = root.rstrip("/")
    rels = {}
    for path, info in files.items():
        rel = posixpath.relpath(path, root)
        if info.get("type", "file") == "file" and not any(part.startswith(".") for part in rel.split("/")):
            rels[rel] = info
    nested = any("/" in r for r in rels)
    use_labels = labels == "dirs" or (labels == "auto" and nested)
    items = []
    for rel in sorted(rels):
        label = rel.split("/", 1)[0] if use_labels and "/" in rel else None
        items.append(Item(source=_full(fs, f"{root}/{rel}", spec), size=int(rels[rel].get("size") or 0),
                          label_name=label, url=_full(fs, f"{root}/{rel}", spec),
                          no_label="a file outside the class folders of a labelled tree"
                          if use_labels and label is None else ""))
    return items


def _from_list(spec: str, options: dict, policy: SourcePolicy) -> list[Item]:
    fs, path = url_to_fs(spec, options)
    try:
        text = fs.cat_file(path).decode("utf-8")
    except Exception as e:
        raise StorageError(explain(spec, e)) from e
    if spec.lower().endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise StorageError(f"{spec}:{n}: not valid JSON ({e.msg}); each line must be an object "
                                       f'like {{"url": "s3://b/x.jpg", "label": "cat"}}') from None
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    items = []
    for n, row in enumerate(rows, 1):
        url = row.get("url") or row.get("path")
        if not isinstance(row, dict) or not url:
            raise StorageError(f"{spec}: row {n} has no 'url' or 'path' field")
        label = row.get("label")
        meta = {k: v for k, v in row.items() if k not in ("url", "path", "label")}
        items.append(Item(source=url, size=int(row.get("size") or DEFAULT_SIZE_GUESS),
                          label_name=None if label in (None, "") else str(label), url=url, meta=meta,
                          refused=policy.refusal(url, spec), listed_in=spec))
    return items


def _from_tar(spec: str, options: dict, labels: str) -> list[Item]:
    fs, path = url_to_fs(spec, options)
    items = []
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
    except tarfile.TarError as e:
        raise StorageError(f"{spec}: not a readable (uncompressed) tar archive: {e}") from e
    except Exception as e:
        raise StorageError(explain(spec, e)) from e
    label = posixpath.basename(path)[: -len(".tar")] if labels != "none" else None
    for m in sorted(members, key=lambda m: m.name):
        items.append(Item(source=f"{spec}::{m.name}", size=m.size, label_name=label, url=spec, offset=m.offset_data))
    return items


def expand(spec: str, options: dict) -> list[str]:
    """A glob (``/data/in21k/*.tar``) becomes its sorted matches; anything else is itself."""
    if any(c in spec for c in "*?["):
        fs, path = url_to_fs(spec, options)
        found = sorted(fs.glob(path))
        if not found:
            raise StorageError(f"no files match {spec!r}")
        return [_full(fs, p, spec) for p in found]
    return [spec]


def list_inputs(specs: list[str], options: dict | None = None, labels: str = "auto",
                policy: SourcePolicy | None = None) -> list[Item]:
    """All inputs of all sources, in a deterministic order (sources as given, each sorted). List
    entries outside ``policy`` (default: each list's own scheme) are kept, marked ``refused`` (they
    are rejected, never read)."""
    options, policy = options or {}, policy or SourcePolicy()
    items: list[Item] = []
    for spec in specs:
        for one in expand(spec, options):
            if _is_list(one):
                items += _from_list(one, options, policy)
            elif one.lower().endswith(".tar"):
                items += _from_tar(one, options, labels)
            else:
                items += _from_dir(one, options, labels)
    if labels == "none":
        for it in items:
            it.label_name = None
    return items


def class_map(items: list[Item], order: list[str] | None = None) -> dict[str, int]:
    """Label name -> class index: integers stay themselves, names are numbered in sorted order; or, given
    ``order`` (a benchmark's class names in label order), each name is numbered by its position there."""
    if order is not None:
        classes = {name: i for i, name in enumerate(order)}
        if len(classes) != len(order):
            repeated = sorted(n for n in classes if order.count(n) > 1)
            raise StorageError(f"class names repeat in the class order: {repeated[:5]}")
        unknown = {it.label_name for it in items if it.label_name is not None} - classes.keys()
        if unknown:
            raise StorageError(f"labels outside the class order: {sorted(unknown)[:5]}")
        return classes
    names = sorted({it.label_name for it in items if it.label_name is not None})
    if names and all(n.lstrip("-").isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(names)}


class SourceReader:
    """Reads input bytes, keeping archives and filesystems open across a worker's items. http(s) entries
    of a list are fetched under ``policy`` (:func:`data_prep.fetch.fetch`), at most ``max_bytes`` of each."""

    def __init__(self, options: dict | None, policy: SourcePolicy | None = None, max_bytes: int = MAX_SAMPLE_BYTES):
        self.options = options or {}
        self.policy, self.max_bytes = policy or SourcePolicy(), max_bytes
        self._fs: dict[str, tuple] = {}
        self._open: dict[str, object] = {}
        self._tls: ssl.SSLContext | None = None

    def _fs_for(self, url: str):
        proto = url.split("://", 1)[0] if "://" in url else "file"
        if proto not in self._fs:
            self._fs[proto] = url_to_fs(url, self.options)[0]
        fs = self._fs[proto]
        return fs, fs._strip_protocol(url)

    def read(self, item: Item) -> bytes:
        """The input's bytes (raises what the storage or :func:`~data_prep.fetch.fetch` raises)."""
        if item.container:
            return self._container(item).image(item.record)
        if item.listed_in and scheme_of(item.url) in ("http", "https"):
            self._tls = self._tls or ssl.create_default_context()
            return fetch(item.url, self.policy, item.listed_in, max_bytes=self.max_bytes, tls=self._tls)
        if item.offset < 0:
            fs, path = self._fs_for(item.url)
            return fs.cat_file(path)
        f = self._open.get(item.url)
        if f is None:
            fs, path = self._fs_for(item.url)
            f = self._open[item.url] = fs.open(path, "rb", block_size=8 << 20)
        f.seek(item.offset)
        return f.read(item.size)

    def _container(self, item: Item):
        """The open array file of a benchmark (kept across the shard's items: one load per file)."""
        key = f"{item.container}:{item.url}"
        found = self._open.get(key)
        if found is None:
            from .benchmarks import open_container  # the benchmark formats list Items: imported when used

            found = self._open[key] = open_container(item.container, item.url, self.options)
        return found

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
