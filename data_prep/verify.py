"""Re-read shards and check them against manifest.json; exit 1 on any mismatch.

    python data_prep/verify.py --output s3://bucket/prefix              # decode 5% of images
    python data_prep/verify.py --output /data/shards --decode all

Checks per shard: it exists, its size and sha256 match, it parses as a WebDataset tar (read with
webdataset's own tar stages), its sample count matches, every sample has an image and a json
entry, and the chosen images decode to RGB.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from tqdm import tqdm

from data_prep.cli import add_storage_args, fail, storage_options
from data_prep.manifest import read_document
from data_prep.storage import StorageError, explain
from data_prep.wds import group_by_keys, tar_file_iterator
from xtra_ds.data.format import IMAGE_EXTS, MANIFEST, join


class _Hashing(io.RawIOBase):
    """Hash and count the bytes a reader pulls through it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(len(b))
        self.h.update(data)
        self.n += len(data)
        b[: len(data)] = data
        return len(data)


def _chosen(key: str, fraction: float) -> bool:
    return fraction >= 1 or int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def _reraise(error: Exception) -> bool:
    raise error


def check_shard(fs, root: str, entry: dict, fraction: float) -> list[str]:
    """Read one shard through webdataset's tar stages (as a reader would) and compare it with the manifest."""
    url = join(root, entry["name"])
    problems, keys, images, jsons, decoded = [], set(), set(), set(), 0
    try:
        with fs.open(url, "rb", block_size=8 << 20) as raw:
            hashed = _Hashing(raw)
            members = ({**m, "__url__": url} for m in
                       tar_file_iterator(io.BufferedReader(hashed, 1 << 20), handler=_reraise))
            for sample in group_by_keys(members, handler=_reraise):
                key = sample["__key__"]
                keys.add(key)
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if "json" in sample:
                    jsons.add(key)
                if ext is None:
                    continue
                images.add(key)
                if _chosen(key, fraction):
                    try:
                        with Image.open(io.BytesIO(sample[ext])) as im:
                            im.load()
                            if im.mode != "RGB":
                                problems.append(f"{entry['name']}: {key}.{ext} is {im.mode}, not RGB")
                        decoded += 1
                    except Exception as e:
                        problems.append(f"{entry['name']}: {key}.{ext} does not decode ({e})")
            while hashed.read(1 << 20):  # the bytes after the tar's end marker count too (through the hash)
                pass
    except FileNotFoundError:
        return [f"{entry['name']}: missing"]
    except tarfile.TarError as e:
        return [f"{entry['name']}: not a readable tar ({e})"]
    except Exception as e:
        return [f"{entry['name']}: {explain(url, e)}"]
    if hashed.n != entry["bytes"]:
        problems.append(f"{entry['name']}: {hashed.n} bytes, manifest says {entry['bytes']}")
    if hashed.h.hexdigest() != entry["sha256"]:
        problems.append(f"{entry['name']}: sha256 differs from the manifest")
    if len(keys) != entry["num_samples"]:
        problems.append(f"{entry['name']}: {len(keys)} samples, manifest says {entry['num_samples']}")
    for k in sorted(set(keys) - images)[:5]:
        problems.append(f"{entry['name']}: sample {k} has no image")
    for k in sorted(set(keys) - jsons)[:5]:
        problems.append(f"{entry['name']}: sample {k} has no json")
    entry["_decoded"] = decoded
    return problems


def verify(url: str, options: dict | None = None, fraction: float = 0.05, threads: int = 8) -> tuple[list[str], int]:
    """All problems found (empty = good) and the number of images decoded."""
    fs, root, manifest = read_document(url, options, MANIFEST, "run data_prep/finalize.py first")
    problems = []
    with ThreadPoolExecutor(threads) as ex, tqdm(total=len(manifest["shards"]), unit="shard",
                                                 dynamic_ncols=True) as bar:
        for found in ex.map(lambda e: check_shard(fs, root, e, fraction), manifest["shards"]):
            problems += found
            bar.update(1)
    return problems, sum(e.get("_decoded", 0) for e in manifest["shards"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xtra-shard-verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_storage_args(parser)
    parser.add_argument("--decode", default="0.05", help="fraction of images to decode, or 'all' (default 0.05)")
    args = parser.parse_args(argv)
    fraction = 1.0 if args.decode == "all" else float(args.decode)
    try:
        problems, decoded = verify(args.output, storage_options(args), fraction)
    except StorageError as e:
        fail(str(e))
    for line in problems:
        print(f"  PROBLEM  {line}")
    print(f"{'FAILED' if problems else 'ok'}: {len(problems)} problem(s); {decoded} images decoded")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
