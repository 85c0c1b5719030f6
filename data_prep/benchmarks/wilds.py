"""The WILDS image datasets as their archives unpack: a metadata CSV, images beside it, and WILDS' split rules
(the ``official`` split scheme of the ``wilds`` package, read from its dataset definitions).

Each sample's json keeps its metadata row under ``wilds`` (hospital, location, region, experiment, …): the
domains that WILDS' worst-group metrics group by.
"""

from __future__ import annotations

from datetime import datetime, timezone

from .common import BenchmarkError, Format, Listing, Root, classes_by_label, image_item


def _int(row: dict, column: str, where: str) -> int:
    try:
        return int(float(row[column]))
    except (TypeError, ValueError):
        raise BenchmarkError(f"{where}: {column} = {row[column]!r} is not a number") from None


def _listing(root: Root, entries: list[tuple[str, str, dict]], classes: list[str], details: dict) -> Listing:
    """Items of (image path, class name, metadata row) entries."""
    sizes = root.sizes(rel for rel, _, _ in entries)
    items = [image_item(root, rel, cls, sizes, {"wilds": {k: v for k, v in row.items() if k}})
             for rel, cls, row in entries]
    return Listing(items, classes, details)


def _named_classes(labels: list[int], names: dict[int, str] | None, where: str) -> tuple[list[str], str]:
    """Class names for labels 0..max: ``names`` when they name each label once and distinctly, else the numbers."""
    if names and len(set(names.values())) == len(names):
        return classes_by_label(((label, names.get(label, str(label))) for label in set(labels)), where,
                                fill_gaps=True), "named"
    return [str(i) for i in range(max(labels) + 1)], "label numbers"


# --- Camelyon17-WILDS --------------------------------------------------------------------------------------
CAMELYON_VAL_CENTER, CAMELYON_TEST_CENTER = 1, 2
CAMELYON_CLASSES = ("normal", "tumor")  # WILDS names none: y = 1 when the centre 32x32 region holds tumour


def camelyon17(root: Root, split: str) -> Listing:
    """``metadata.csv``: label ``tumor``; hospital (``center``) 1 is the OOD val split, 2 the test split, and the
    other three are split by the ``split`` column (0 train, 1 id_val). Patches:
    ``patches/patient_{patient}_node_{node}/patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png``."""
    where = root.url("metadata.csv")
    rows = root.csv("metadata.csv", ("patient", "node", "x_coord", "y_coord", "tumor", "center", "split"))
    entries = []
    for n, row in enumerate(rows, 2):
        center = _int(row, "center", f"{where}:{n}")
        if center == CAMELYON_VAL_CENTER:
            this = "val"
        elif center == CAMELYON_TEST_CENTER:
            this = "test"
        else:
            this = {0: "train", 1: "id_val"}.get(_int(row, "split", f"{where}:{n}"))
        if this != split:
            continue
        label = _int(row, "tumor", f"{where}:{n}")
        if label not in (0, 1):
            raise BenchmarkError(f"{where}:{n}: tumor = {label}, not 0 or 1")
        patient, node = row["patient"], row["node"]  # as written (the patient keeps its zero padding)
        rel = (f"patches/patient_{patient}_node_{node}/"
               f"patch_patient_{patient}_node_{node}_x_{row['x_coord']}_y_{row['y_coord']}.png")
        entries.append((rel, CAMELYON_CLASSES[label], row))
    return _listing(root, entries, list(CAMELYON_CLASSES),
                    {"split_rule": "official: center 1 -> val (OOD), center 2 -> test, else split 0 -> train, "
                                   "1 -> id_val"})


# --- iWildCam2020-WILDS ------------------------------------------------------------------------------------
def iwildcam(root: Root, split: str) -> Listing:
    """``metadata.csv``: the ``split`` column names the split, ``y`` the label, images ``train/{filename}``.
    Class names from ``categories.csv`` (columns y, name) when it is there, else the label numbers."""
    where = root.url("metadata.csv")
    rows = root.csv("metadata.csv", ("split", "y", "filename"))
    labels = [_int(row, "y", f"{where}:{n}") for n, row in enumerate(rows, 2)]
    names = None
    if root.exists("categories.csv"):
        cat_rows = root.csv("categories.csv", ())
        if cat_rows and {"y", "name"} <= cat_rows[0].keys():
            names = {_int(r, "y", root.url("categories.csv")): r["name"] for r in cat_rows}
    classes, how = _named_classes(labels, names, where)
    entries = [(f"train/{row['filename']}", classes[label], row) for row, label in zip(rows, labels, strict=True)
               if row["split"] == split]
    return _listing(root, entries, classes, {"split_rule": "official: the split column",
                                             "class_names": "categories.csv" if how == "named" else how})


# --- FMoW-WILDS --------------------------------------------------------------------------------------------
FMOW_TEST_FROM, FMOW_VAL_FROM = datetime(2016, 1, 1, tzinfo=timezone.utc), datetime(2013, 1, 1, tzinfo=timezone.utc)


def parse_time(text: str, where: str) -> datetime:
    """An ISO 8601 timestamp (``Z`` or an offset; none means UTC), with any number of fraction digits."""
    s = text.strip().replace(" ", "T", 1)
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    if "." in s:  # Python 3.10 takes 3 or 6 fraction digits only
        head, rest = s.split(".", 1)
        digits = len(rest) - len(rest.lstrip("0123456789"))
        s = f"{head}.{(rest[:digits] + '000000')[:6]}{rest[digits:]}"
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        raise BenchmarkError(f"{where}: timestamp {text!r} is not ISO 8601") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def fmow_split(split_column: str, time: datetime) -> str | None:
    """WILDS' official scheme (time_after_2016): from 2016 on OOD test, 2013-2015 OOD val, before 2013 in
    distribution; the column then says train, val or test. None: in no split (``seq`` rows, and e.g. train
    rows after 2013)."""
    if time >= FMOW_TEST_FROM:
        return "test" if split_column == "test" else None
    if time >= FMOW_VAL_FROM:
        return "val" if split_column == "val" else None
    return {"train": "train", "val": "id_val", "test": "id_test"}.get(split_column)


def fmow(root: Root, split: str) -> Listing:
    """``rgb_metadata.csv``: ``category`` the label (classes: the 62 names sorted, WILDS' own order), ``split`` and
    ``timestamp`` the split; the image of row i (counting every row) is ``images/rgb_img_{i}.png``."""
    where = root.url("rgb_metadata.csv")
    rows = root.csv("rgb_metadata.csv", ("split", "category", "timestamp"))
    classes = sorted({row["category"] for row in rows})
    entries = []
    for i, row in enumerate(rows):
        if row["split"] == "seq":
            continue
        if fmow_split(row["split"], parse_time(row["timestamp"], f"{where}:{i + 2}")) == split:
            entries.append((f"images/rgb_img_{i}.png", row["category"], row))
    return _listing(root, entries, classes,
                    {"split_rule": "official (time_after_2016): >= 2016 test, 2013-2015 val, earlier: the split "
                                   "column's train / val -> id_val / test -> id_test; seq rows in no split"})


# --- RxRx1-WILDS -------------------------------------------------------------------------------------------
def rxrx1(root: Root, split: str) -> Listing:
    """``metadata.csv``: the ``dataset`` column (train, val, test) gives the split, except that site 2 of the
    train experiments is id_test; label ``sirna_id`` (names from ``sirna``); images
    ``images/{experiment}/Plate{plate}/{well}_s{site}.png``."""
    where = root.url("metadata.csv")
    rows = root.csv("metadata.csv", ("dataset", "experiment", "plate", "well", "site", "sirna_id"))
    labels = [_int(row, "sirna_id", f"{where}:{n}") for n, row in enumerate(rows, 2)]
    names = None
    if rows and "sirna" in rows[0]:
        pairs = {(label, row["sirna"]) for row, label in zip(rows, labels, strict=True)}
        if len({label for label, _ in pairs}) == len(pairs):  # one name per label
            names = dict(pairs)
    classes, how = _named_classes(labels, names, where)
    entries = []
    for n, (row, label) in enumerate(zip(rows, labels, strict=True), 2):
        this = row["dataset"]
        if this == "train" and _int(row, "site", f"{where}:{n}") == 2:
            this = "id_test"
        if this == split:
            rel = f"images/{row['experiment']}/Plate{row['plate']}/{row['well']}_s{row['site']}.png"
            entries.append((rel, classes[label], row))
    return _listing(root, entries, classes,
                    {"split_rule": "official: the dataset column; site 2 of train experiments -> id_test",
                     "class_names": "sirna column" if how == "named" else how})


FORMATS = (
    Format("camelyon17", "the camelyon17_v1.0 folder (metadata.csv, patches/)", ("train", "id_val", "val", "test"),
           camelyon17, aliases=(("id_train", "train"), ("ood_val", "val"), ("ood_test", "test"))),
    Format("iwildcam", "the iwildcam_v2.0 folder (metadata.csv, train/, optional categories.csv)",
           ("train", "val", "test", "id_val", "id_test"), iwildcam),
    Format("fmow", "the fmow_v1.1 folder (rgb_metadata.csv, images/rgb_img_<i>.png)",
           ("train", "id_val", "id_test", "val", "test"), fmow),
    Format("rxrx1", "the rxrx1_v1.0 folder (metadata.csv, images/<experiment>/Plate<p>/<well>_s<site>.png)",
           ("train", "val", "test", "id_test"), rxrx1),
)
