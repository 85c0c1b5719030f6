"""A small real-image corpus for the CPU demo: crops of scikit-image's sample photographs.

    .venv/bin/python launchers/make_demo_corpus.py --out runs/demo/corpus --n 800

Each photograph is one class folder (astronaut/, coffee/, …) holding random crops of it
(RandomResizedCrop-like, saved as JPEG) — real photographic statistics without a download.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "brick", "grass", "gravel", "moon", "coins", "clock"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=800, help="images in all")
    p.add_argument("--size", type=int, default=96, help="side of each saved crop")
    a = p.parse_args()
    import skimage.data

    rng = np.random.default_rng(0)
    out = Path(a.out)
    for k in range(a.n):
        name = PHOTOS[k % len(PHOTOS)]
        img = np.asarray(getattr(skimage.data, name)())
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.25, 0.9))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((a.size, a.size), Image.BICUBIC)
        (out / name).mkdir(parents=True, exist_ok=True)
        crop.save(out / name / f"{k:05d}.jpg", quality=92)
    print(f"wrote {a.n} images in {len(set(PHOTOS[:a.n]))} classes to {out}")


if __name__ == "__main__":
    main()
