"""xtra-shard --format: each benchmark's layout, as distributed, in miniature (real pickles, HDF5, .mat, COCO
JSON, CSV and text lists), sharded through the one data_prep path. Every image carries its label in its pixels
(red = 10 + 20 * label), so each test reads the label back from the shard's image and checks it against the
sample's cls and the manifest's classes (the benchmark's label order)."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import shard as shard_tool
from data_prep import verify as verify_tool
from data_prep.benchmarks import cifar, list_benchmark, pcam
from data_prep.benchmarks.common import BenchmarkError, classes_by_label
from data_prep.benchmarks.wilds import fmow_split, parse_time
from data_prep.imaging import Settings, process


# --- helpers -------------------------------------------------------------------------------------------------
def pixels(label: int, serial: int, size: tuple[int, int] = (40, 36)) -> np.ndarray:
    """An image [H, W, 3] whose red channel says its label and whose blue channel makes its bytes its own."""
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = 10 + 20 * label
    img[..., 1] = 10 + 20 * (serial % 12)
    img[..., 2] = serial % 256
    return img


def label_in(img: np.ndarray) -> int:
    return int(round((float(img[..., 0].mean()) - 10) / 20))


def save(path: Path, label: int, serial: int, fmt: str = "JPEG", size=(40, 36)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    Image.fromarray(pixels(label, serial, size)).save(out, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    path.write_bytes(out.getvalue())
    return out.getvalue()


def shard(*args) -> int:
    return shard_tool.main([str(a) for a in args])


def run(fmt: str, root: Path, split: str, out: Path, *extra) -> tuple[dict, list[dict]]:
    """Shard one split; (manifest, samples) where each sample has its source, cls, label name, ext, bytes, pixels."""
    assert shard("--format", fmt, root, "--split", split, "--output", out, "--workers", 1, *extra) == 0
    return read(out)


def read(out: Path) -> tuple[dict, list[dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    found: dict[str, dict] = {}
    for entry in manifest["shards"]:
        with tarfile.open(out / entry["name"]) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if key not in entry["excluded"]:  # as readers do
                    found.setdefault(key, {})[ext] = tf.extractfile(m).read()
    samples = []
    for key, entry in sorted(found.items()):
        ext = next(e for e in ("png", "jpg") if e in entry)
        meta = json.loads(entry["json"])
        samples.append({"key": key, "source": meta["source"], "label": meta["label"], "meta": meta,
                        "cls": int(entry["cls"]), "ext": ext, "raw": entry[ext],
                        "pixels": np.asarray(Image.open(io.BytesIO(entry[ext])).convert("RGB"))})
    return manifest, samples


def check(manifest: dict, samples: list[dict], expect: dict[str, int], classes: list[str]) -> None:
    """The manifest numbers ``classes`` in label order; exactly the ``expect`` sources were written, each with its
    label as cls, that label's name, and the label its pixels carry."""
    assert list(manifest["classes"].items()) == [(name, i) for i, name in enumerate(classes)]
    assert {s["source"]: s["cls"] for s in samples} == expect
    for s in samples:
        assert label_in(s["pixels"]) == s["cls"], s["source"]
        assert s["label"] == classes[s["cls"]], s["source"]
    t = manifest["totals"]
    assert t["written"] == len(samples) and t["inputs"] == t["written"] + t["rejected"]


# --- CIFAR ---------------------------------------------------------------------------------------------------
def cifar_rows(labels: list[int], first: int) -> np.ndarray:
    """CIFAR's data: [N, 3072] uint8, each row the R, G, B planes of a 32x32 image."""
    return np.stack([pixels(label, first + j, (32, 32)).transpose(2, 0, 1).reshape(-1)
                     for j, label in enumerate(labels)])


def py2_pickle(batch: dict) -> bytes:
    """A batch pickled as the official files are: Python 2, protocol 2, strings as py2 str (BINSTRING), the
    array through numpy.core.multiarray._reconstruct (what Python 3's pickle never writes itself)."""
    def text(b):
        b = b.encode("latin1") if isinstance(b, str) else b
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def num(n):
        return b"J" + struct.pack("<i", n)

    def value(v):
        if isinstance(v, (str, bytes)):
            return text(v)
        if isinstance(v, int):
            return num(v)
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        dtype = (b"cnumpy\ndtype\n" + text("u1") + num(0) + num(1) + b"\x87R"
                 + b"(" + num(3) + text("|") + b"NNN" + num(-1) + num(-1) + num(0) + b"tb")
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + num(0) + b"\x85" + text("b") + b"\x87R"
                + b"(" + num(1) + num(v.shape[0]) + num(v.shape[1]) + b"\x86" + dtype + b"\x89" + text(v.tobytes())
                + b"tb")

    return b"\x80\x02}(" + b"".join(text(k) + value(v) for k, v in batch.items()) + b"u."


CIFAR10_NAMES = ["truck", "ship", "airplane", "frog"]  # not sorted: the order is batches.meta's


def cifar10_root(root: Path) -> dict[str, dict[str, int]]:
    """A cifar-10-batches-py folder: 5 train batches of 3 (pickle.dump), a test batch of 4 written the Python 2
    way, batches.meta. Returns split -> {source: label}."""
    root.mkdir(parents=True)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_NAMES, "num_cases_per_batch": 3, "num_vis": 3072}, f)
    expect: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    serial = 0
    for name, labels in [*((f"data_batch_{k}", [k % 4, (k + 1) % 4, (k + 2) % 4]) for k in range(1, 6)),
                         ("test_batch", [3, 2, 1, 0])]:
        batch = {"batch_label": name, "labels": labels, "data": cifar_rows(labels, serial),
                 "filenames": [f"img_{serial + j}.png" for j in range(len(labels))]}
        serial += len(labels)
        if name == "test_batch":
            (root / name).write_bytes(py2_pickle(batch))
        else:
            with open(root / name, "wb") as f:
                pickle.dump(batch, f)
        split = "test" if name == "test_batch" else "train"
        expect[split].update({f"{root}/{name}::{row}": label for row, label in enumerate(labels)})
    return expect


def test_cifar10_train_and_test_are_lossless_32px_pngs_in_the_meta_files_label_order(tmp_path):
    expect = cifar10_root(tmp_path / "cifar-10-batches-py")
    for split, n in (("train", 15), ("test", 4)):
        out = tmp_path / split
        m, samples = run("cifar10", tmp_path / "cifar-10-batches-py", split, out)
        check(m, samples, expect[split], CIFAR10_NAMES)
        assert m["totals"]["inputs"] == n and m["totals"]["rejected"] == 0
        assert m["benchmark"]["format"] == "cifar10" and m["benchmark"]["split"] == split
        assert m["settings"]["lossless"] and not m["settings"]["dedupe"] and m["settings"]["min_side"] == 0
        for s in samples:  # PNG, 32x32 (not too small), lossless
            assert s["ext"] == "png" and s["pixels"].shape == (32, 32, 3)
            assert s["pixels"][..., 0].min() == s["pixels"][..., 0].max() == 10 + 20 * expect[split][s["source"]]
            assert s["meta"]["filename"].startswith("img_")
        assert verify_tool.main(["--output", str(out), "--decode", "all"]) == 0


def test_cifar_rows_decode_exactly_and_the_python2_batch_loads(tmp_path):
    expect = cifar10_root(tmp_path / "c")
    raw = (tmp_path / "c" / "test_batch").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"T" + struct.pack("<i", 4 * 3072) in raw  # as in py2
    batch = cifar.load_batch(raw, "test_batch")
    assert batch["labels"] == [3, 2, 1, 0] and batch["batch_label"] == "test_batch"
    np.testing.assert_array_equal(batch["data"], cifar_rows([3, 2, 1, 0], 15))
    _, samples = run("cifar10", tmp_path / "c", "test", tmp_path / "out")
    rows = cifar_rows([3, 2, 1, 0], 15)
    for s in samples:
        row = int(s["source"].rsplit("::", 1)[1])
        np.testing.assert_array_equal(s["pixels"], rows[row].reshape(3, 32, 32).transpose(1, 2, 0))
    assert len(samples) == len(expect["test"])


def test_cifar100_fine_labels_in_meta_order(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    names = ["whale", "apple", "maple_tree"]
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["a", "b"]}, f)
    expect = {}
    for split, fine in (("train", [0, 1, 2, 2, 1]), ("test", [2, 0])):
        with open(root / split, "wb") as f:
            pickle.dump({"batch_label": split, "fine_labels": fine, "coarse_labels": [0] * len(fine),
                         "data": cifar_rows(fine, 10 * len(split)), "filenames": [f"f{j}" for j in range(len(fine))]},
                        f)
        expect[split] = {f"{root}/{split}::{row}": label for row, label in enumerate(fine)}
    for split in ("train", "test"):
        m, samples = run("cifar100", root, split, tmp_path / split)
        check(m, samples, expect[split], names)


class Payload:
    """What an attacker pickles: unpickling it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_cifar_batch_that_would_run_code_is_refused_unrun(tmp_path, capsys):
    root = tmp_path / "cifar-10-batches-py"
    cifar10_root(root)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"batch_label": "x", "labels": [0], "data": Payload(f"touch {marker}"), "filenames": ["a"]})
    # such a payload is live: plain pickle runs it (here in a child process, with a marker of its own)
    live = tmp_path / "live"
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=pickle.dumps({"data": Payload(f"touch {live}")}), check=True)
    assert live.exists()
    (root / "data_batch_3").write_bytes(evil)
    with pytest.raises(SystemExit) as exit_:
        shard("--format", "cifar10", root, "--split", "train", "--output", tmp_path / "out", "--workers", 1)
    assert not marker.exists()  # never run
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "data_batch_3" in err and "system" in err and "refused" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))
    # the loader the shard writer uses refuses it too, and so does it for any other callable
    with pytest.raises(cifar.UnsafePickle, match="data_batch_3"):
        cifar.BatchFile(str(root / "data_batch_3"), {})
    for payload in (pickle.dumps({"data": eval}), pickle.dumps(Payload(f"touch {marker}"), protocol=0),
                    pickle.dumps({"data": subprocess.Popen}), pickle.dumps(np.load)):
        with pytest.raises(cifar.UnsafePickle, match="x.pkl: refused"):
            cifar.load_batch(payload, "x.pkl")
    assert not marker.exists()


# --- PCam ----------------------------------------------------------------------------------------------------
def pcam_root(root: Path) -> dict[str, list[int]]:
    import h5py

    root.mkdir(parents=True)
    labels = {"train": [1, 0, 0, 1, 1, 0, 1], "valid": [0, 1, 1], "test": [1, 0, 1, 0]}
    serial = 0
    for split, ys in labels.items():
        x = np.stack([pixels(y, serial + j, (96, 96)) for j, y in enumerate(ys)])
        serial += len(ys)
        kw = {"chunks": (1, 96, 96, 3), "compression": "gzip"} if split == "train" else {}
        with h5py.File(root / pcam.file_name(split, "x"), "w") as f:
            f.create_dataset("x", data=x, **kw)
        with h5py.File(root / pcam.file_name(split, "y"), "w") as f:
            f.create_dataset("y", data=np.array(ys, np.uint8).reshape(-1, 1, 1, 1))
    return labels


def test_pcam_reads_hdf5_in_slices_into_96px_pngs(tmp_path, monkeypatch):
    labels = pcam_root(tmp_path / "pcam")
    monkeypatch.setattr(pcam, "LABEL_SLICE", 3)  # several slices of labels, as for the 262,144 of train
    for split, name in (("train", "train"), ("valid", "valid"), ("val", "valid"), ("test", "test")):
        m, samples = run("pcam", tmp_path / "pcam", split, tmp_path / split)
        x_file = tmp_path / "pcam" / pcam.file_name(name, "x")
        check(m, samples, {f"{x_file}::{i}": y for i, y in enumerate(labels[name])}, ["normal", "tumor"])
        assert m["benchmark"]["split"] == name
        assert all(s["ext"] == "png" and s["pixels"].shape == (96, 96, 3) for s in samples)


def test_array_benchmarks_give_the_same_shards_with_any_jobs_and_workers(tmp_path):
    """The array readers run in spawned workers too, and a job array writes the shards one job writes."""
    cifar10_root(tmp_path / "c")
    pcam_root(tmp_path / "p")
    for fmt, root in (("cifar10", tmp_path / "c"), ("pcam", tmp_path / "p")):
        one, two = tmp_path / f"{fmt}-one", tmp_path / f"{fmt}-two"
        common = ("--format", fmt, root, "--split", "train", "--shard-samples", 4)
        assert shard(*common, "--output", one, "--workers", 1) == 0
        for job in (0, 1):
            assert shard(*common, "--output", two, "--workers", 2, "--num-jobs", 2, "--job-index", job,
                         "--no-finalize") == 0
        tars = sorted(p.name for p in one.glob("*.tar"))
        assert len(tars) >= 2 and tars == sorted(p.name for p in two.glob("*.tar"))
        assert all((one / t).read_bytes() == (two / t).read_bytes() for t in tars)


# --- Food-101 ------------------------------------------------------------------------------------------------
def test_food101_lists_meta_order_and_accounts_for_missing_corrupt_and_duplicate_images(tmp_path):
    root = tmp_path / "food-101"
    classes = ["ramen", "apple_pie", "sushi"]  # meta/classes.txt's order, not sorted
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    lines = {"train": [], "test": []}
    expect = {"train": {}, "test": {}}
    serial = 0
    for label, cls in enumerate(classes):
        for split, count in (("train", 3), ("test", 2)):
            for _ in range(count):
                serial += 1
                save(root / "images" / cls / f"{1000 + serial}.jpg", label, serial)
                lines[split].append(f"{cls}/{1000 + serial}")
                expect[split][f"{root}/images/{cls}/{1000 + serial}.jpg"] = label
    # listed but missing; corrupt (cut in half); the same bytes as another image (benchmarks keep both)
    lines["train"] += ["sushi/999", "ramen/998", "apple_pie/997"]
    good = save(root / "images" / "ramen" / "998.jpg", 0, 500)
    (root / "images" / "ramen" / "998.jpg").write_bytes(good[: len(good) // 2])
    (root / "images" / "apple_pie" / "997.jpg").write_bytes((root / "images/apple_pie/1006.jpg").read_bytes())
    expect["train"][f"{root}/images/apple_pie/997.jpg"] = 1
    for split in ("train", "test"):
        (root / "meta" / f"{split}.txt").write_text("\n".join(lines[split]) + "\n")
    m, samples = run("food101", root, "train", tmp_path / "train")
    check(m, samples, expect["train"], classes)
    corrupt_reason = process(good[: len(good) // 2], Settings()).reason
    assert {r: v["count"] for r, v in m["rejections"].items()} == {"read_error": 1, corrupt_reason: 1}
    assert m["rejections"]["read_error"]["examples"][0]["source"] == f"{root}/images/sushi/999.jpg"
    assert m["totals"]["inputs"] == 12 and m["totals"]["written"] == 10  # the duplicate pair both written
    m, samples = run("food101", root, "test", tmp_path / "test")
    check(m, samples, expect["test"], classes)


# --- Oxford-IIIT Pets ----------------------------------------------------------------------------------------
def test_pets_class_ids_and_names_from_the_annotations(tmp_path):
    root = tmp_path / "pets"
    breeds = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "Bengal"]  # CLASS-ID order (1-based)
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
    rows = {"trainval": [], "test": []}
    expect = {"trainval": {}, "test": {}}
    for label, breed in enumerate(breeds):
        for j, split in enumerate(("trainval", "trainval", "test")):
            name = f"{breed}_{label * 10 + j + 1}"
            save(root / "images" / f"{name}.jpg", label, label * 10 + j)
            rows[split].append(f"{name} {label + 1} {1 if breed[0].isupper() else 2} {label + 1}")
            expect[split][f"{root}/images/{name}.jpg"] = label
    (root / "annotations").mkdir()
    for split in rows:
        (root / "annotations" / f"{split}.txt").write_text(header + "\n".join(rows[split]) + "\n")
    for split in ("trainval", "test"):
        m, samples = run("pets", root, split, tmp_path / split)
        check(m, samples, expect[split], breeds)  # not Python's sorted order (capitals first)


# --- DTD -----------------------------------------------------------------------------------------------------
def test_dtd_numbered_splits_and_train_plus_val(tmp_path):
    root = tmp_path / "dtd"
    classes = ["banded", "dotted", "zigzagged"]
    lists = {"train1": [], "val1": [], "test1": [], "train2": []}
    expect = {k: {} for k in lists}
    serial = 0
    for label, cls in enumerate(classes):
        for split in ("train1", "train1", "val1", "val1", "test1", "train2"):
            serial += 1
            rel = f"{cls}/{cls}_{serial:04d}.jpg"
            save(root / "images" / rel, label, serial)
            lists[split].append(rel)
            expect[split][f"{root}/images/{rel}"] = label
    (root / "labels").mkdir()
    for split, entries in lists.items():
        (root / "labels" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    m, samples = run("dtd", root, "train1+val1", tmp_path / "trainval")
    check(m, samples, {**expect["train1"], **expect["val1"]}, classes)
    assert m["benchmark"]["split"] == "train1+val1" and m["totals"]["inputs"] == 12
    m_test, samples = run("dtd", root, "test1", tmp_path / "test")
    check(m_test, samples, expect["test1"], classes)
    assert m_test["classes"] == m["classes"]
    with pytest.raises(SystemExit):
        shard("--format", "dtd", root, "--split", "train11", "--output", tmp_path / "x")


# --- EuroSAT -------------------------------------------------------------------------------------------------
def test_eurosat_seeded_split_is_a_partition_with_fixed_fractions_per_class(tmp_path):
    root = tmp_path / "eurosat"
    classes = ["AnnualCrop", "Forest", "River"]
    every = {}
    for label, cls in enumerate(classes):
        for i in range(1, 21):
            save(root / "2750" / cls / f"{cls}_{i}.jpg", label, label * 20 + i, size=(64, 64))
            every[f"{root}/2750/{cls}/{cls}_{i}.jpg"] = label
    seen: dict[str, str] = {}
    for split, per_class in (("train", 16), ("val", 2), ("test", 2)):
        m, samples = run("eurosat", root, split, tmp_path / split)
        check(m, samples, {s["source"]: every[s["source"]] for s in samples}, classes)
        assert [sum(s["cls"] == c for s in samples) for c in range(3)] == [per_class] * 3
        assert m["benchmark"]["seed"] == 0 and "sha256" in m["benchmark"]["split_rule"]
        for s in samples:
            assert seen.setdefault(s["source"], split) == split
    assert set(seen) == set(every)  # every image in exactly one split
    _, again = run("eurosat", root, "test", tmp_path / "test-again")
    assert sorted(s["source"] for s in again) == sorted(k for k, v in seen.items() if v == "test")


# --- Stanford Cars -------------------------------------------------------------------------------------------
def test_cars_devkit_mat_files(tmp_path):
    import scipy.io

    root = tmp_path / "cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "BMW M3 Coupe 2012"]
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object).reshape(1, -1)})
    dtype = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    expect = {}
    for split, folder, mat, classes_1based in (
            ("train", "cars_train", root / "devkit" / "cars_train_annos.mat", [3, 1, 2, 1]),
            ("test", "cars_test", root / "cars_test_annos_withlabels.mat", [2, 3])):
        records = []
        for i, cls in enumerate(classes_1based, 1):
            save(root / folder / f"{i:05d}.jpg", cls - 1, 100 * len(split) + i)
            records.append((1, 2, 30, 30, np.uint8(cls), f"{i:05d}.jpg"))
        scipy.io.savemat(mat, {"annotations": np.array(records, dtype=dtype).reshape(1, -1)})
        expect[split] = {f"{root}/{folder}/{i:05d}.jpg": c - 1 for i, c in enumerate(classes_1based, 1)}
    for split in ("train", "test"):
        m, samples = run("cars", root, split, tmp_path / split)
        check(m, samples, expect[split], names)


# --- iNaturalist 2018 ----------------------------------------------------------------------------------------
def test_inat2018_coco_json_labels_by_category_id(tmp_path):
    root = tmp_path / "inat"
    categories = [{"id": 2, "name": "Zea mays", "supercategory": "Plantae"},
                  {"id": 0, "name": "Turdus merula", "supercategory": "Aves"},
                  {"id": 1, "name": "Apis mellifera", "supercategory": "Insecta"}]
    names = ["Turdus merula", "Apis mellifera", "Zea mays"]  # by id
    expect = {}
    for split, cats in (("train", [2, 0, 1, 1, 0]), ("val", [0, 2])):
        images, annotations = [], []
        for i, cid in enumerate(cats):
            rel = f"train_val2018/X/{cid}/{split}{i}.jpg"
            save(root / rel, cid, i + 10 * len(split))
            images.append({"id": 100 * len(split) + i, "file_name": rel, "width": 40, "height": 36})
            annotations.append({"id": i, "image_id": 100 * len(split) + i, "category_id": cid})
        expect[split] = {f"{root}/train_val2018/X/{cid}/{split}{i}.jpg": cid for i, cid in enumerate(cats)}
        if split == "train":  # an image without an annotation: listed, so rejected as no_label
            save(root / "train_val2018/X/none.jpg", 0, 99)
            images.append({"id": 999, "file_name": "train_val2018/X/none.jpg"})
        (root / f"{split}2018.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                            "categories": categories}))
    m, samples = run("inat2018", root, "train", tmp_path / "train")
    check(m, samples, expect["train"], names)
    assert m["rejections"]["no_label"]["count"] == 1
    m, samples = run("inat2018", root, "val", tmp_path / "val")
    check(m, samples, expect["val"], names)


# --- DomainNet infograph -------------------------------------------------------------------------------------
def test_domainnet_infograph_lists_labels_in_label_order(tmp_path):
    root = tmp_path / "domainnet"
    classes = ["tiger", "apple", "zebra"]
    expect = {}
    for split, labels in (("train", [0, 1, 2, 2, 1]), ("test", [2, 0])):
        lines = []
        for i, label in enumerate(labels):
            rel = f"infograph/{classes[label]}/infograph_{split}_{i:06d}.jpg"
            save(root / rel, label, i + 10 * len(split))
            lines.append(f"{rel} {label}")
        (root / f"infograph_{split}.txt").write_text("\n".join(lines) + "\n")
        expect[split] = {f"{root}/{line.split()[0]}": int(line.split()[1]) for line in lines}
    for split in ("train", "test"):
        m, samples = run("domainnet", root, split, tmp_path / split)
        check(m, samples, expect[split], classes)


# --- WILDS ---------------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_camelyon17_hospital_splits_and_pngs_kept_byte_for_byte(tmp_path):
    root = tmp_path / "camelyon17_v1.0"
    rows, expect, files = [], {"train": {}, "id_val": {}, "val": {}, "test": {}}, {}
    # (center, split column, tumor) -> the WILDS split
    cases = [(0, 0, 1, "train"), (3, 0, 0, "train"), (4, 1, 1, "id_val"), (0, 1, 0, "id_val"),
             (1, 0, 1, "val"), (1, 1, 0, "val"), (2, 0, 1, "test"), (2, 1, 0, "test"), (4, 0, 0, "train")]
    for i, (center, split_col, tumor, split) in enumerate(cases):
        patient, node, x, y = f"{i * 4:03d}", center, 3328 + i, 21792
        rel = f"patches/patient_{patient}_node_{node}/patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png"
        files[f"{root}/{rel}"] = save(root / rel, tumor, i, "PNG", (96, 96))
        rows.append({"": i, "patient": patient, "node": node, "x_coord": x, "y_coord": y, "tumor": tumor,
                     "slide": i, "center": center, "split": split_col})
        expect[split][f"{root}/{rel}"] = tumor
    write_csv(root / "metadata.csv", rows)
    for split, asked in (("train", "id_train"), ("id_val", "id_val"), ("val", "ood_val"), ("test", "test")):
        m, samples = run("camelyon17", root, asked, tmp_path / split)
        check(m, samples, expect[split], ["normal", "tumor"])
        for s in samples:
            assert s["ext"] == "png" and s["raw"] == files[s["source"]]  # lossless: the PNG as distributed
            assert s["meta"]["wilds"]["center"] == str(cases[int(s["meta"]["wilds"]["slide"])][0])


def test_iwildcam_split_column_and_category_names(tmp_path):
    root = tmp_path / "iwildcam_v2.0"
    names = ["empty", "tayassu pecari", "dasyprocta punctata"]
    rows, expect = [], {}
    for i, (split, y) in enumerate([("train", 0), ("train", 2), ("val", 1), ("test", 2), ("id_val", 0),
                                    ("id_test", 1), ("train", 1)]):
        filename = f"{i:08x}.jpg"
        save(root / "train" / filename, y, i)
        rows.append({"split": split, "location_remapped": i % 3, "y": y, "filename": filename,
                     "datetime": "2013-06-05 05:44:19.000"})
        expect.setdefault(split, {})[f"{root}/train/{filename}"] = y
    write_csv(root / "metadata.csv", rows)
    write_csv(root / "categories.csv", [{"y": y, "category_id": 10 + y, "name": n} for y, n in enumerate(names)])
    for split in ("train", "val", "test", "id_val", "id_test"):
        m, samples = run("iwildcam", root, split, tmp_path / split)
        check(m, samples, expect[split], names)


def test_fmow_year_based_splits(tmp_path):
    root = tmp_path / "fmow_v1.1"
    cases = [  # split column, timestamp, category -> WILDS split (None: in none)
        ("train", "2010-03-05T10:20:30Z", "airport", "train"),
        ("train", "2012-12-31T23:59:59.999Z", "zoo", "train"),
        ("val", "2011-01-01T00:00:00Z", "dam", "id_val"),
        ("test", "2012-06-01T00:00:00Z", "zoo", "id_test"),
        ("val", "2013-01-01T00:00:00Z", "airport", "val"),
        ("val", "2015-12-31T23:59:59Z", "dam", "val"),
        ("test", "2014-01-01T00:00:00.5Z", "dam", None),
        ("train", "2014-05-05T00:00:00Z", "zoo", None),
        ("test", "2016-01-01T00:00:00Z", "airport", "test"),
        ("test", "2017-08-08T08:08:08.123456Z", "zoo", "test"),
        ("seq", "2016-05-05T00:00:00Z", "dam", None),
        ("val", "2017-01-01T00:00:00Z", "dam", None),
    ]
    classes = ["airport", "dam", "zoo"]
    rows, expect = [], {}
    for i, (split_col, ts, category, split) in enumerate(cases):
        save(root / "images" / f"rgb_img_{i}.png", classes.index(category), i, "PNG", (64, 64))
        rows.append({"split": split_col, "img_filename": f"x_{i}.jpg", "timestamp": ts, "category": category,
                     "country_code": "USA"})
        if split:
            expect.setdefault(split, {})[f"{root}/images/rgb_img_{i}.png"] = classes.index(category)
    write_csv(root / "rgb_metadata.csv", rows)
    for split in ("train", "id_val", "id_test", "val", "test"):
        m, samples = run("fmow", root, split, tmp_path / split)
        check(m, samples, expect[split], classes)
    assert fmow_split("test", parse_time("2015-12-31T23:00:00-02:00", "x")) == "test"  # 2016-01-01 01:00 UTC


def test_rxrx1_experiment_splits_and_site_2_id_test(tmp_path):
    root = tmp_path / "rxrx1_v1.0"
    rows, expect = [], {}
    cases = [("HEPG2-01", "train", 1, 0, "train"), ("HEPG2-01", "train", 2, 1, "id_test"),
             ("U2OS-01", "train", 1, 2, "train"), ("HUVEC-05", "val", 1, 1, "val"), ("HUVEC-05", "val", 2, 0, "val"),
             ("RPE-09", "test", 1, 2, "test"), ("RPE-09", "test", 2, 0, "test")]
    for i, (experiment, dataset, site, sirna_id, split) in enumerate(cases):
        well = f"B{i + 2:02d}"
        rel = f"images/{experiment}/Plate1/{well}_s{site}.png"
        save(root / rel, sirna_id, i, "PNG", (64, 64))
        rows.append({"site_id": f"{experiment}_1_{well}_{site}", "well_id": f"{experiment}_1_{well}",
                     "cell_type": experiment.split("-")[0], "dataset": dataset, "experiment": experiment, "plate": 1,
                     "well": well, "site": site, "well_type": "treatment", "sirna": f"s{1000 + sirna_id}",
                     "sirna_id": sirna_id})
        expect.setdefault(split, {})[f"{root}/{rel}"] = sirna_id
    write_csv(root / "metadata.csv", rows)
    for split in ("train", "val", "test", "id_test"):
        m, samples = run("rxrx1", root, split, tmp_path / split)
        check(m, samples, expect[split], ["s1000", "s1001", "s1002"])


# --- errors --------------------------------------------------------------------------------------------------
def test_clear_errors_for_a_wrong_split_or_layout(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        shard("--format", "pcam", tmp_path / "empty", "--split", "bogus", "--output", tmp_path / "o")
    assert "no split 'bogus': choose train, valid, test (also val)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shard("--format", "food101", tmp_path / "empty", "--split", "train", "--output", tmp_path / "o")
    err = capsys.readouterr().err
    assert "meta/classes.txt: no such file" in err and "food-101" in err
    with pytest.raises(SystemExit):
        shard("--format", "cifar10", tmp_path / "empty", "--output", tmp_path / "o")  # no --split
    with pytest.raises(BenchmarkError, match="labels \\[1\\] have no name"):
        classes_by_label([(0, "a"), (2, "c")], "where")
    with pytest.raises(BenchmarkError, match="named twice"):
        list_benchmark("dtd", str(tmp_path / "empty"), "train1+train1")
    (tmp_path / "cars").mkdir()
    (tmp_path / "cars" / "cars_meta.mat").write_bytes(b"MATLAB 7.3 MAT-file" + bytes(200))
    with pytest.raises(BenchmarkError, match="cars_meta.mat: not a readable MATLAB v5 file"):
        list_benchmark("cars", str(tmp_path / "cars"), "train")


def test_pcam_without_h5py_names_the_install_command(tmp_path, monkeypatch, capsys):
    for split in ("test",):
        for part in ("x", "y"):
            (tmp_path / pcam.file_name(split, part)).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # what an environment without it gives: ImportError
    with pytest.raises(SystemExit):
        shard("--format", "pcam", tmp_path, "--split", "test", "--output", tmp_path / "o")
    assert "needs h5py: pip install 'xtra-ds[benchmarks]'" in capsys.readouterr().err
