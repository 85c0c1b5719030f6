"""Benchmarks of image files with their own index files: Food-101, Oxford-IIIT Pets, DTD, EuroSAT, Stanford
Cars, iNaturalist 2018 and DomainNet's infograph domain. Each lists its images in the benchmark's own order,
labelled as its index files say; a listed image that is missing is rejected as read_error by the writer."""

from __future__ import annotations

import hashlib
import io

from .common import BenchmarkError, Format, Listing, Root, classes_by_label, image_item


# --- Food-101 ----------------------------------------------------------------------------------------------
def food101(root: Root, split: str) -> Listing:
    """``meta/{split}.txt`` lines ``class/id`` -> ``images/class/id.jpg``; ``meta/classes.txt`` the order."""
    classes = [line for _, line in root.lines("meta/classes.txt")]
    known = set(classes)
    entries = []
    for n, line in root.lines(f"meta/{split}.txt"):
        cls = line.split("/", 1)[0]
        if cls not in known or "/" not in line:
            raise BenchmarkError(f"{root.url(f'meta/{split}.txt')}:{n}: {line!r} is not class/id of a class in "
                                 f"meta/classes.txt")
        entries.append((f"images/{line}.jpg", cls))
    sizes = root.sizes(rel for rel, _ in entries)
    return Listing([image_item(root, rel, cls, sizes) for rel, cls in entries], classes)


# --- Oxford-IIIT Pets --------------------------------------------------------------------------------------
def _pets_rows(root: Root, rel: str) -> list[tuple[str, int]]:
    """(image name, label) of an annotation file: lines ``Name_123 CLASS-ID SPECIES BREED-ID``; label = CLASS-ID - 1."""
    rows = []
    for n, line in root.lines(rel):
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < 1:
            raise BenchmarkError(f"{root.url(rel)}:{n}: {line!r} is not 'Name_123 CLASS-ID SPECIES BREED-ID'")
        rows.append((parts[0], int(parts[1]) - 1))
    return rows


def pets_class(image: str) -> str:
    """The breed of a Pets image name: the name without its ``_<number>``, case as the files have it (cats are
    capitalised, dogs are not)."""
    return image.rsplit("_", 1)[0]


def pets(root: Root, split: str) -> Listing:
    # the class names come from every annotation file there, so that both splits number them alike
    named = [row for rel in ("annotations/trainval.txt", "annotations/test.txt") if root.exists(rel)
             for row in _pets_rows(root, rel)]
    classes = classes_by_label(((label, pets_class(image)) for image, label in named), root.url("annotations"))
    rows = _pets_rows(root, f"annotations/{split}.txt")
    sizes = root.sizes([f"images/{image}.jpg" for image, _ in rows])
    return Listing([image_item(root, f"images/{image}.jpg", classes[label], sizes) for image, label in rows], classes)


# --- DTD ---------------------------------------------------------------------------------------------------
def dtd(root: Root, split: str) -> Listing:
    """``labels/{split}.txt`` lines ``class/file.jpg`` -> ``images/class/file.jpg``; classes: sorted folders."""
    classes = root.folders("images")
    known = set(classes)
    entries = []
    for n, line in root.lines(f"labels/{split}.txt"):
        cls = line.split("/", 1)[0]
        if cls not in known:
            raise BenchmarkError(f"{root.url(f'labels/{split}.txt')}:{n}: {line!r} names no folder of images/")
        entries.append((f"images/{line}", cls))
    sizes = root.sizes(rel for rel, _ in entries)
    return Listing([image_item(root, rel, cls, sizes) for rel, cls in entries], classes)


DTD_SPLITS = tuple(f"{part}{i}" for part in ("train", "val", "test") for i in range(1, 11))


# --- EuroSAT -----------------------------------------------------------------------------------------------
EUROSAT_SEED = 0
EUROSAT_FRACTIONS = {"test": 0.1, "val": 0.1}  # per class, taken in this order; the rest is train
EUROSAT_RULE = ("per class, the files ranked by sha256('0:' + file name); the first 10% (rounded to the nearest "
                "file) are test, the next 10% val, the rest train")


def eurosat_split_of(files: list[str]) -> dict[str, str]:
    """File name -> split, for the files of one class (the rule of :data:`EUROSAT_RULE`): it depends on the file
    names alone, so the same files always split the same way on any machine."""
    ranked = sorted(files, key=lambda f: hashlib.sha256(f"{EUROSAT_SEED}:{f}".encode()).hexdigest())
    out, start = {}, 0
    for split, fraction in EUROSAT_FRACTIONS.items():
        count = int(len(ranked) * fraction + 0.5)
        out.update({f: split for f in ranked[start:start + count]})
        start += count
    out.update({f: "train" for f in ranked[start:]})
    return out


def eurosat(root: Root, split: str) -> Listing:
    """The RGB release: one folder per class, in ``2750/`` (or ``EuroSAT_RGB/``, or ROOT itself)."""
    base = next((b for b in ("2750", "EuroSAT_RGB") if root.exists(b)), "")
    classes = root.folders(base)
    if not classes:
        raise BenchmarkError(f"{root.url(base)}: no class folders; --format eurosat reads {root.fmt.layout}")
    items = []
    for cls in classes:
        files = root.files(f"{base}/{cls}" if base else cls)
        split_of = eurosat_split_of([rel.rsplit("/", 1)[-1] for rel in files])
        items += [image_item(root, rel, cls, files) for rel in sorted(files)
                  if split_of[rel.rsplit("/", 1)[-1]] == split]
    return Listing(items, classes, {"split_rule": EUROSAT_RULE, "seed": EUROSAT_SEED,
                                    "fractions": {"train": 0.8, **EUROSAT_FRACTIONS}})


# --- Stanford Cars -----------------------------------------------------------------------------------------
def loadmat(root: Root, rel: str) -> dict:
    """A MATLAB (v5) file through scipy.io (scipy comes with scikit-learn; imported only here)."""
    try:
        import scipy.io
    except ImportError:
        raise BenchmarkError("--format cars reads .mat files and needs scipy: pip install 'xtra-ds[benchmarks]' "
                             "(or pip install scipy)") from None
    try:
        return scipy.io.loadmat(io.BytesIO(root.read(rel)), squeeze_me=True)
    except BenchmarkError:
        raise
    except Exception as e:  # e.g. NotImplementedError for an HDF5-based v7.3 file
        raise BenchmarkError(f"{root.url(rel)}: not a readable MATLAB v5 file ({type(e).__name__}: {e})") from None


def _records(mat: dict, key: str, where: str):
    import numpy as np

    if key not in mat:
        raise BenchmarkError(f"{where}: no variable {key!r} (variables: {', '.join(k for k in mat if k[0] != '_')})")
    return np.atleast_1d(mat[key])


CARS_ANNOTATIONS = {  # split -> (where the annotations may be, the image folder)
    "train": (("devkit/cars_train_annos.mat", "cars_train_annos.mat"), "cars_train"),
    "test": (("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat"), "cars_test"),
}


def cars(root: Root, split: str) -> Listing:
    """The devkit's ``cars_meta.mat`` (class_names) and annotations (fname, class 1-based) -> images in
    ``cars_train/`` or ``cars_test/``."""
    meta = root.first("devkit/cars_meta.mat", "cars_meta.mat")
    classes = classes_by_label(enumerate(str(c) for c in _records(loadmat(root, meta), "class_names", meta)),
                               root.url(meta))
    candidates, folder = CARS_ANNOTATIONS[split]
    rel = root.first(*candidates)
    annotations = _records(loadmat(root, rel), "annotations", root.url(rel))
    if "class" not in (annotations.dtype.names or ()) or "fname" not in annotations.dtype.names:
        raise BenchmarkError(f"{root.url(rel)}: annotations have no 'class' and 'fname' fields (the test labels are "
                             f"in cars_test_annos_withlabels.mat)")
    entries = []
    for record in annotations:
        label = int(record["class"]) - 1
        if not 0 <= label < len(classes):
            raise BenchmarkError(f"{root.url(rel)}: {record['fname']}: class {label + 1} outside 1..{len(classes)}")
        entries.append((f"{folder}/{record['fname']}", classes[label]))
    sizes = root.files(folder)
    return Listing([image_item(root, rel, cls, sizes) for rel, cls in entries], classes)


# --- iNaturalist 2018 --------------------------------------------------------------------------------------
def inat2018(root: Root, split: str) -> Listing:
    """``{split}2018.json`` (COCO style): images[id, file_name], annotations[image_id, category_id],
    categories[id, name]; labels are the categories' positions in id order. Names come from ``categories.json``
    (the taxonomy file) when it is there, else from the split's own categories."""
    rel = f"{split}2018.json"
    doc = root.json(rel)
    where = root.url(rel)
    try:
        categories = sorted(doc["categories"], key=lambda c: int(c["id"]))
        ids = [int(c["id"]) for c in categories]
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
        images = [(int(im["id"]), str(im["file_name"])) for im in doc["images"]]
        annotations = [(int(a["image_id"]), int(a["category_id"])) for a in doc["annotations"]]
    except (KeyError, TypeError, ValueError) as e:
        raise BenchmarkError(f"{where}: not a COCO-style index (images, annotations, categories): {e!r}") from None
    if root.exists("categories.json"):
        taxonomy = root.json("categories.json")
        names.update({int(c["id"]): str(c["name"]) for c in taxonomy if int(c["id"]) in names})
    label_of = {cid: i for i, cid in enumerate(ids)}
    classes = classes_by_label(((label_of[cid], names[cid]) for cid in ids), where)
    found: dict[int, set[int]] = {}
    for image_id, cid in annotations:
        if cid not in label_of:
            raise BenchmarkError(f"{where}: an annotation of image {image_id} names category {cid}, not in categories")
        found.setdefault(image_id, set()).add(cid)
    sizes = root.sizes(f for _, f in images)
    items = []
    for image_id, file in images:
        cids = found.get(image_id, set())
        item = image_item(root, file, classes[label_of[min(cids)]] if len(cids) == 1 else None, sizes)
        if len(cids) != 1:  # listed, so accounted for: rejected by the writer with this reason
            item.no_label = (f"image {image_id} has no annotation" if not cids else
                             f"image {image_id} has annotations of {len(cids)} categories")
        items.append(item)
    return Listing(items, classes)


# --- DomainNet infograph -----------------------------------------------------------------------------------
def _infograph_rows(root: Root, rel: str) -> list[tuple[str, int]]:
    rows = []
    for n, line in root.lines(rel):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0].count("/") < 2:
            raise BenchmarkError(f"{root.url(rel)}:{n}: {line!r} is not 'infograph/<class>/<file> <label>'")
        rows.append((parts[0], int(parts[1])))
    return rows


def infograph(root: Root, split: str) -> Listing:
    """``infograph_{split}.txt`` lines ``infograph/<class>/<file> <label>``; classes ordered by label (names from
    the class folders of both lists, so that both splits number them alike)."""
    named = [row for rel in ("infograph_train.txt", "infograph_test.txt") if root.exists(rel)
             for row in _infograph_rows(root, rel)]
    classes = classes_by_label(((label, path.split("/")[1]) for path, label in named), root.url(""))
    rows = _infograph_rows(root, f"infograph_{split}.txt")
    sizes = root.sizes(path for path, _ in rows)
    return Listing([image_item(root, path, classes[label], sizes) for path, label in rows], classes)


FORMATS = (
    Format("food101", "the extracted food-101 folder (images/<class>/<id>.jpg, meta/{train,test}.txt, "
           "meta/classes.txt)", ("train", "test"), food101),
    Format("pets", "the Oxford-IIIT Pet folder holding images/ and annotations/{trainval,test}.txt",
           ("trainval", "test"), pets),
    Format("dtd", "the extracted dtd folder (images/<class>/…, labels/{train,val,test}{1..10}.txt)", DTD_SPLITS, dtd),
    Format("eurosat", "the EuroSAT RGB folder holding 2750/<Class>/*.jpg", ("train", "val", "test"), eurosat),
    Format("cars", "the Stanford Cars folder holding cars_train/, cars_test/ and the devkit's cars_meta.mat, "
           "cars_train_annos.mat and cars_test_annos_withlabels.mat (in devkit/ or beside)", ("train", "test"), cars),
    Format("inat2018", "the iNaturalist 2018 folder holding train2018.json, val2018.json and train_val2018/",
           ("train", "val"), inat2018),
    Format("domainnet", "the DomainNet folder holding infograph_{train,test}.txt and infograph/<class>/…",
           ("train", "test"), infograph),
)
