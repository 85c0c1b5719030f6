"""Test corpora made on the fly: real encodings and the nasty cases real crawls contain."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (gradients + blobs), so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(2, max(4, max(w, h) / 2))
            img[..., c] += rng.uniform(40, 120) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img[..., c] += rng.uniform(0, 60) * x / w + rng.normal(0, 4, (h, w))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


# name -> expected outcome: ("ok", (w, h) of the written image) or ("rejected", reason)
def nasty_corpus(root: Path, max_pixels: int = 1_000_000) -> dict[str, tuple]:
    """Two class folders of awkward files; returns what each should become (max_side 384)."""
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    base = photo(500, 375, 0)
    files: dict[str, bytes] = {}
    expect: dict[str, tuple] = {}

    def add(rel, data, outcome):
        files[rel] = data
        expect[rel] = outcome

    add("cat/baseline.jpg", encode(base, "JPEG", quality=90), ("ok", (500, 375)))  # passed through
    add("cat/progressive.jpg", encode(photo(600, 450, 1), "JPEG", progressive=True), ("ok", (512, 384)))
    add("cat/cmyk.jpg", encode(photo(300, 200, 2).convert("CMYK"), "JPEG"), ("ok", (300, 200)))
    add("cat/gray.jpg", encode(photo(320, 240, 3).convert("L"), "JPEG"), ("ok", (320, 240)))
    rot = photo(400, 300, 4)
    exif = rot.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    add("cat/exif_rotated.jpg", encode(rot, "JPEG", exif=exif), ("ok", (300, 400)))
    pal = photo(200, 160, 5).convert("P", palette=Image.ADAPTIVE, colors=64)
    add("dog/palette_transparent.png", encode(pal, "PNG", transparency=0), ("ok", (200, 160)))
    g16 = Image.fromarray((np.linspace(0, 65535, 200 * 150).reshape(150, 200)).astype(np.uint16))
    add("dog/gray16.png", encode(g16, "PNG"), ("ok", (200, 150)))
    add("dog/rgba.png", encode(photo(240, 180, 6).convert("RGBA"), "PNG"), ("ok", (240, 180)))
    add("dog/image.webp", encode(photo(256, 192, 7), "WEBP", quality=80), ("ok", (256, 192)))
    add("dog/anim.gif", encode(photo(120, 90, 8).convert("P"), "GIF"), ("ok", (120, 90)))
    add("dog/image.tiff", encode(photo(150, 100, 9), "TIFF"), ("ok", (150, 100)))
    full = encode(photo(640, 480, 10), "JPEG", quality=95)
    add("dog/truncated.jpg", full[: len(full) // 2], ("rejected", "truncated"))
    add("dog/empty.jpg", b"", ("rejected", "empty"))
    add("dog/page.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", ("rejected", "not_an_image"))
    add("dog/huge.png", encode(Image.new("RGB", (1200, 1000), (9, 9, 9)), "PNG"), ("rejected", "too_many_pixels"))
    add("dog/tiny.png", encode(photo(12, 12, 11), "PNG"), ("rejected", "too_small"))
    add("dog/zz_copy_of_baseline.jpg", files["cat/baseline.jpg"], ("rejected", "duplicate"))
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return expect


def plain_corpus(root: Path, n: int, size=(500, 375), classes: int = 2) -> None:
    """``n`` distinct JPEG photos spread over ``classes`` folders."""
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:04d}.jpg").write_bytes(encode(photo(*size, seed=100 + i), "JPEG", quality=90))


def labelled_shards(root: Path, split: str, n: int) -> str:
    """``n`` 32-px images of two classes a child could tell apart (dark and light noise) in ``root/split/<class>/``,
    sharded by data_prep into ``root/shards_<split>``; returns the manifest."""
    import torch

    from data_prep import shard as shard_tool

    g = torch.Generator().manual_seed(len(split))
    for i in range(n):
        cls = i % 2
        img = (torch.rand(32, 32, 3, generator=g) * 60 + (170 if cls else 20)).to(torch.uint8).numpy()
        (root / split / str(cls)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / split / str(cls) / f"{i:04d}.png")
    assert shard_tool.main([str(root / split), "--output", str(root / f"shards_{split}"), "--name", split,
                            "--workers", "1"]) == 0
    return str(root / f"shards_{split}" / "manifest.json")
