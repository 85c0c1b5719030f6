"""Images/s of the shard tool vs a bare single-process decode+resize+encode loop, same files.

    .venv/bin/python bench/bench_shard.py                 # makes bench/.corpus (1000 JPEGs) once
    .venv/bin/python bench/bench_shard.py --n 600 --rounds 3

The corpus: ImageNet-like JPEGs (500×375, quality 90) cut from scikit-image's photographs.
Both sides resize the shorter side to 256 (so every image is decoded, resized and re-encoded;
nothing is passed through) at JPEG quality 90. The tool additionally lists and plans the inputs,
hashes, deduplicates, writes tars (webdataset's TarWriter), stats and the manifest. Rounds alternate
between the two; each ratio is taken within a round and the median over rounds is reported.
"""

from __future__ import annotations

from _common import alternate, median_range, ratios

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from data_prep import shard as shard_tool
from xtra_ds.data.format import pil_info

SIDE, QUALITY = 256, 90


def make_corpus(root: Path, n: int) -> None:
    import numpy as np
    import skimage.data

    names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"]
    photos = [np.asarray(getattr(skimage.data, k)())[..., :3] for k in names]
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = photos[i % len(photos)]
        h, w = a.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(a[y:y + ch, x:x + cw]).resize((500, 375), Image.BICUBIC)
        im.save(root / f"img{i:05d}.jpg", quality=90)


def bare_loop(files: list[Path]) -> float:
    t = time.perf_counter()
    for f in files:
        im = Image.open(io.BytesIO(f.read_bytes()))
        im.load()
        im = im.convert("RGB")
        w, h = im.size
        s = SIDE / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.BICUBIC, reducing_gap=None)
        im.save(io.BytesIO(), "JPEG", quality=QUALITY)
    return len(files) / (time.perf_counter() - t)


def tool(corpus: Path, n: int, workers: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    devnull = open(os.devnull, "w")
    stdout, stderr = sys.stdout, sys.stderr
    try:
        sys.stdout = sys.stderr = devnull
        t = time.perf_counter()
        rc = shard_tool.main([str(corpus), "--output", str(out), "--workers", str(workers), "--max-side", str(SIDE),
                              "--quality", str(QUALITY), "--shard-samples", str(max(1, n // (4 * workers)))])
        dt = time.perf_counter() - t
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        shutil.rmtree(out)
    assert rc == 0
    return n / dt


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(Path(__file__).parent / ".corpus"))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    corpus = Path(args.corpus)
    if len(list(corpus.glob("*.jpg"))) != args.n:
        shutil.rmtree(corpus, ignore_errors=True)
        make_corpus(corpus, args.n)
    files = sorted(corpus.glob("*.jpg"))
    print(f"{pil_info()}; {len(files)} JPEGs 500x375 -> shorter side {SIDE}, q{QUALITY}; {os.cpu_count()} cores")
    runs = alternate({"bare": lambda: bare_loop(files), "one": lambda: tool(corpus, len(files), 1),
                      "two": lambda: tool(corpus, len(files), 2)}, args.rounds)
    bare, one, two = runs["bare"], runs["one"], runs["two"]

    def ratio(xs, per=1.0):  # within each round (the machine's speed drifts between rounds), median over rounds
        return median_range(ratios(xs, bare, per))

    b, o, t = (statistics.median(x) for x in (bare, one, two))
    print(f"bare loop, 1 process      {b:8.1f} img/s")
    print(f"shard tool, 1 worker      {o:8.1f} img/s   vs bare {ratio(one)}")
    print(f"shard tool, 2 workers     {t:8.1f} img/s   per worker vs bare {ratio(two, 2)}; scaling 1->2: {t / o:.2f}x")


if __name__ == "__main__":
    main()
