"""The corpus of the replay and quarantine tests: smooth images (scikit-learn's digits, which the micro model
learns to predict within a few steps), sharded, with one image replaced by an outlier — a checkerboard of pure
black and white — chosen so that the data order puts it into a given step."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import shard as shard_tool
from data_prep.demo_corpus import digits
from xtra_ds.config import load_config
from xtra_ds.data.build import train_loader, training_data
from xtra_ds.data.shards import shard_stats


def digit_images(root: Path, per_class: int, size: int = 48) -> Path:
    """``per_class`` digits of each class at ``size`` px in ``root/<digit>/``."""
    all_digits = root.parent / f"{root.name}-all"
    digits(all_digits, size)
    for folder in sorted((all_digits / "train").iterdir()):
        (root / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:per_class]:
            shutil.copy(f, root / folder.name / f.name)
    shutil.rmtree(all_digits)
    return root


def checkerboard(size: int, square: int) -> Image.Image:
    """Black and white squares of ``square`` px: every value 0 or 255."""
    y, x = np.indices((size, size)) // square
    return Image.fromarray(((x + y) % 2 * 255).astype(np.uint8)).convert("RGB")


def shard(images: Path, output: Path, per_shard: int = 20) -> str:
    assert shard_tool.main([str(images), "--output", str(output), "--shard-samples", str(per_shard),
                            "--workers", "1"]) == 0
    return str(output / "manifest.json")


def keys_of_step(recipe: str, manifest: str, step: int) -> list[str]:
    """The keys of global step ``step`` (from 1) of a run of ``recipe`` on ``manifest``."""
    cfg = load_config(recipe, [f"data.train={manifest}", "data.num_workers=0"])
    data = training_data(cfg.data)
    it = iter(train_loader(cfg.data, data, seed=cfg.seed, rank=0, world_size=1,
                           global_batch=cfg.optim.global_batch_size, img_size=cfg.model.img_size))
    for _ in range(step - 1):
        next(it)
    return next(it)["keys"]


def source_of(manifest: str, key: str) -> str:
    """The input file data_prep made sample ``key`` of (the shards' stats files name it)."""
    root = Path(manifest).parent
    for stats in sorted(root.glob("*.stats.json")):
        for k, _, source in shard_stats(str(stats).replace(".stats.json", ".tar"))["samples"]:
            if k == key:
                return source
    raise KeyError(key)


def corpus_with_outlier(root: Path, recipe: str, step: int, per_class: int = 16) -> tuple[str, str]:
    """(manifest, outlier key): digits sharded once to find which input lands first in ``step`` of a run of
    ``recipe``, that input replaced by a checkerboard, sharded again (keys and order depend on the inputs'
    names, never on their pixels)."""
    images = digit_images(root / "images", per_class)
    first = shard(images, root / "first")
    key = keys_of_step(recipe, first, step)[0]
    source = Path(source_of(first, key))
    checkerboard(48, 4).save(source)  # a PNG, as the digits are
    manifest = shard(images, root / "shards")
    assert keys_of_step(recipe, manifest, step)[0] == key
    return manifest, key
