"""What every benchmark format shares: the format record, the listing it returns, and its root folder."""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..sources import DEFAULT_SIZE_GUESS, Item
from ..storage import StorageError, explain, url_to_fs


class BenchmarkError(StorageError):
    """A benchmark's files are not as its format says (missing, malformed, or unsafe to load): the message
    names the file and what was expected."""


@dataclass
class Listing:
    """One split of a benchmark: its inputs, in the benchmark's own order (their sample keys), and its class
    names in label order (label ``i`` is ``classes[i]``; the same for every split of the benchmark)."""

    items: list[Item]
    classes: list[str]
    details: dict = field(default_factory=dict)  # how the split was made, recorded in the manifest


@dataclass(frozen=True)
class Format:
    """A benchmark as distributed: what its root folder holds, its splits, and how to list one."""

    name: str
    layout: str  # what ROOT is (shown in --help and in errors)
    splits: tuple[str, ...]
    lister: Callable[[Root, str], Listing]
    aliases: tuple[tuple[str, str], ...] = ()  # other names of a split (the names other loaders use)
    arrays: bool = False  # images come out of array files at their native size (CIFAR's 32 px): no min-side

    def settings(self) -> dict:
        """The shard settings this format imposes: images stay lossless (PNG stays PNG, arrays become PNG),
        every listed image is kept (no duplicate removal: a test set is counted as published), and array
        images are never too small."""
        return {"lossless": True, "dedupe": False, **({"min_side": 0} if self.arrays else {})}

    def split_name(self, text: str) -> str:
        """The official name of a split (an alias is translated); an unknown one is refused with the choices."""
        name = dict(self.aliases).get(text, text)
        if name not in self.splits:
            choices = ", ".join(self.splits) + (f" (also {', '.join(a for a, _ in self.aliases)})" if self.aliases
                                                else "")
            raise BenchmarkError(f"--format {self.name} has no split {text!r}: choose {choices}, or join them "
                                 f"with '+' (e.g. {self.splits[0]}+{self.splits[1]})")
        return name


class Root:
    """A benchmark's root folder, local or behind any fsspec URL: the files a format reads and the URLs of its
    images. Paths given to its methods are relative to the root, with '/'."""

    def __init__(self, spec: str, options: dict | None, fmt: Format):
        self.spec, self.fmt, self.options = spec.rstrip("/"), fmt, options or {}
        self.fs, path = url_to_fs(self.spec, self.options)
        self.path = path.rstrip("/")
        try:
            is_dir = self.fs.isdir(self.path)
        except Exception as e:
            raise StorageError(explain(spec, e)) from e
        if not is_dir:
            raise BenchmarkError(f"{spec}: not a folder; --format {fmt.name} reads {fmt.layout}")

    def full(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    def url(self, rel: str) -> str:
        """What a user sees and a reader opens for ``rel`` (with the URL's scheme when the root has one)."""
        path = self.full(rel)
        return self.fs.unstrip_protocol(path) if "://" in self.spec else path

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.full(rel))

    def first(self, *candidates: str) -> str:
        """The first of ``candidates`` that exists (where distributions differ); refuses naming them all."""
        for rel in candidates:
            if self.exists(rel):
                return rel
        raise BenchmarkError(f"{self.spec}: none of {', '.join(candidates)} is there; --format {self.fmt.name} "
                             f"reads {self.fmt.layout}")

    def read(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.full(rel))
        except FileNotFoundError:
            raise BenchmarkError(f"{self.url(rel)}: no such file; --format {self.fmt.name} reads "
                                 f"{self.fmt.layout}") from None
        except Exception as e:
            raise StorageError(explain(self.url(rel), e)) from e

    def text(self, rel: str) -> str:
        try:
            return self.read(rel).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise BenchmarkError(f"{self.url(rel)}: not UTF-8 text ({e})") from None

    def lines(self, rel: str) -> list[tuple[int, str]]:
        """(line number, stripped line) of every line that is not blank or a '#' comment."""
        return [(n, line.strip()) for n, line in enumerate(self.text(rel).splitlines(), 1)
                if line.strip() and not line.lstrip().startswith("#")]

    def csv(self, rel: str, needs: Iterable[str]) -> list[dict]:
        """The rows of a CSV file with a header; refuses one without the columns ``needs``."""
        reader = csv.DictReader(io.StringIO(self.text(rel)))
        missing = [c for c in needs if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(f"{self.url(rel)}: no column {', '.join(missing)} (columns: "
                                 f"{', '.join(reader.fieldnames or [])})")
        return list(reader)

    def json(self, rel: str):
        try:
            return json.loads(self.read(rel))
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{self.url(rel)}: not valid JSON ({e})") from None

    def folders(self, rel: str) -> list[str]:
        """Sorted names of the (non-hidden) folders in ``rel``."""
        try:
            entries = self.fs.ls(self.full(rel), detail=True)
        except FileNotFoundError:
            raise BenchmarkError(f"{self.url(rel)}: no such folder; --format {self.fmt.name} reads "
                                 f"{self.fmt.layout}") from None
        names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]
        return sorted(n for n in names if not n.startswith("."))

    def files(self, rel: str) -> dict[str, int]:
        """Every (non-hidden) file under folder ``rel``: its path relative to the root -> its size in bytes
        (empty when the folder is missing: its images are then rejected as not found, one by one)."""
        try:
            found = self.fs.find(self.full(rel), detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise StorageError(explain(self.url(rel), e)) from e
        out = {}
        for path, info in found.items():
            rel_path = posixpath.relpath(path, self.path)
            if info.get("type", "file") == "file" and not any(p.startswith(".") for p in rel_path.split("/")):
                out[rel_path] = int(info.get("size") or 0)
        return out

    def sizes(self, rels: Iterable[str]) -> dict[str, int]:
        """Sizes of the files ``rels`` name (one listing per top folder they sit in), for planning shards."""
        sizes: dict[str, int] = {}
        for top in sorted({r.split("/", 1)[0] for r in rels if "/" in r}):
            sizes.update(self.files(top))
        return sizes


def image_item(root: Root, rel: str, label_name: str, sizes: dict[str, int], meta: dict | None = None) -> Item:
    """The input for image file ``rel`` of a benchmark. A file that is listed but missing stays an input: the
    writer rejects it as read_error (not found)."""
    url = root.url(rel)
    return Item(source=url, size=sizes.get(rel, DEFAULT_SIZE_GUESS), label_name=label_name, url=url,
                meta=meta or {})


def classes_by_label(pairs: Iterable[tuple[int, str]], where: str, fill_gaps: bool = False) -> list[str]:
    """Class names in label order from (label, name) pairs. Each label must have one name; labels run 0..K-1
    (missing ones are refused, or named by their number with ``fill_gaps``); names that repeat are told apart
    by their label (``name #label``) so that every class keeps its own index."""
    named: dict[int, str] = {}
    for label, name in pairs:
        if label < 0:
            raise BenchmarkError(f"{where}: negative label {label} ({name!r})")
        if named.setdefault(label, name) != name:
            raise BenchmarkError(f"{where}: label {label} has two names, {named[label]!r} and {name!r}")
    if not named:
        raise BenchmarkError(f"{where}: no labelled entries")
    gaps = [i for i in range(max(named) + 1) if i not in named]
    if gaps and not fill_gaps:
        raise BenchmarkError(f"{where}: labels {gaps[:5]} have no name (labels must run 0..{max(named)})")
    names = [named.get(i, str(i)) for i in range(max(named) + 1)]
    repeated = {n for n in names if names.count(n) > 1}
    return [f"{n} #{i}" if n in repeated else n for i, n in enumerate(names)]
