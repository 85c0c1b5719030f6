"""Small real-image corpora for the CPU demo, the tests and the benchmarks, without a download.

    .venv/bin/xtra-demo-corpus --out runs/demo/corpus --n 800              # or: python -m data_prep.demo_corpus
    .venv/bin/xtra-demo-corpus --digits --out runs/demo/digits
    .venv/bin/xtra-demo-corpus --digits --out runs/demo/digits/img --size 64 --shards runs/demo/digits

Photos (default): each of scikit-image's sample photographs is one class folder (astronaut/,
coffee/, …) holding random crops of it (RandomResizedCrop-like, saved as JPEG).

``--digits``: scikit-learn's 1,797 handwritten digits (8×8, 16 grey levels), upsampled to
``--size`` and split into ``train/<digit>/`` and ``val/<digit>/`` (every third image of each
class to val) — a small labelled set for the probes — and ``train_10pc/<digit>/``, every tenth
training image of each class (the low-shot setting: probes fit on 10% of the labels).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "brick", "grass", "gravel", "moon", "coins", "clock"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xtra-demo-corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=800, help="images in all")
    parser.add_argument("--size", type=int, default=96, help="side of each saved image")
    parser.add_argument("--digits", action="store_true", help="write the digits train/val split instead of photos")
    parser.add_argument("--shards", default="", help="with --digits: also shard both splits into SHARDS/{train,val}")
    args = parser.parse_args(argv)
    if args.digits:
        if args.shards:
            digits_shards(Path(args.out), Path(args.shards), args.size)
        else:
            digits(Path(args.out), args.size)
        return 0
    photos(Path(args.out), args.n, args.size)
    return 0


def photos(out: Path, n: int, size: int) -> None:
    """``n`` random crops of scikit-image's sample photographs, ``size`` px, one class folder per photograph."""
    import skimage.data

    rng = np.random.default_rng(0)
    decoded = {name: np.asarray(getattr(skimage.data, name)()) for name in PHOTOS}  # decoded once, not per crop
    for k in range(n):
        name = PHOTOS[k % len(PHOTOS)]
        img = decoded[name]
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.25, 0.9))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
        (out / name).mkdir(parents=True, exist_ok=True)
        crop.save(out / name / f"{k:05d}.jpg", quality=92)
    print(f"wrote {n} images in {len(set(PHOTOS[:n]))} classes to {out}")


def digits(out: Path, size: int) -> None:
    """scikit-learn's digits at ``size`` px in ``out/{train,val}/<digit>/`` (every third image of a class: val),
    and every tenth training image of a class also in ``out/train_10pc/<digit>/``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    seen: dict[int, int] = {}
    trained: dict[int, int] = {}
    for k, (img, label) in enumerate(zip(d.images, d.target, strict=False)):
        label = int(label)
        split = "val" if seen.get(label, 0) % 3 == 2 else "train"
        seen[label] = seen.get(label, 0) + 1
        grey = Image.fromarray((img * (255 / 16)).astype(np.uint8)).resize((size, size), Image.BICUBIC).convert("RGB")
        splits = [split]
        if split == "train":
            splits += ["train_10pc"] if trained.get(label, 0) % 10 == 0 else []
            trained[label] = trained.get(label, 0) + 1
        for name in splits:
            (out / name / str(label)).mkdir(parents=True, exist_ok=True)
            grey.save(out / name / str(label) / f"{k:05d}.png")
    n_val = sum(n // 3 for n in seen.values())
    n_10pc = sum(-(-n // 10) for n in trained.values())
    print(f"wrote {len(d.images)} digits ({len(d.images) - n_val} train, of which {n_10pc} also in train_10pc; "
          f"{n_val} val) at {size}px to {out}")


def digits_shards(images: Path, shards: Path, size: int = 64) -> tuple[str, str]:
    """The digits split written to ``images`` and sharded with data_prep into ``shards/{train,val}``;
    returns the two manifests (what the tests and benchmarks probe on)."""
    from data_prep import shard as shard_tool

    digits(images, size)
    for split in ("train", "val"):
        if shard_tool.main([str(images / split), "--output", str(shards / split), "--name", split,
                            "--shard-samples", "400", "--workers", "1"]) != 0:
            raise RuntimeError(f"sharding {images / split} failed")
    return str(shards / "train/manifest.json"), str(shards / "val/manifest.json")


if __name__ == "__main__":
    sys.exit(main())
