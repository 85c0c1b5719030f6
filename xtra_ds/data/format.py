"""The WebDataset shard format: the one module data_prep/ and the training loader share.

A shard set at ``{root}`` (a local directory or any fsspec URL such as ``s3://bucket/prefix``)::

    {root}/{name}-000000.tar          WebDataset tar: per sample __key__, one image entry, cls, json
    {root}/{name}-000000.stats.json   written after its tar, last: the shard is complete
    {root}/manifest.json              written by finalize: shards, counts, checksums, rejections
    {root}/_plan.json                 the shard plan (inputs, settings) every job agrees on

Each sample: ``{key}.jpg`` (or ``.png``/``.webp``), ``{key}.cls`` (decimal class index, when
labelled), ``{key}.json`` (source, original size, label name, sha256 of the original bytes).
A shard's ``excluded`` keys (cross-shard exact duplicates found by finalize) are skipped by
readers; ``num_usable`` counts what remains.
"""

from __future__ import annotations

import hashlib

FORMAT_VERSION = "xtra-ds-shards/1"
MANIFEST = "manifest.json"
PLAN = "_plan.json"
IMAGE_EXTS = ("jpg", "png", "webp")
MAX_SAMPLE_BYTES = 64_000_000  # data_prep rejects larger inputs; readers refuse larger members


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def stats_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.stats.json"


def sample_key(input_index: int) -> str:
    """A sample's key: its input's position in the sorted input list (stable across job counts)."""
    return f"{input_index:010d}"


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def usable_shards(manifest: dict) -> list[dict]:
    """The manifest's shards with their usable sample counts (duplicates excluded)."""
    return [dict(s, num_usable=s["num_samples"] - len(s.get("excluded", []))) for s in manifest["shards"]]


def pil_info() -> str:
    """Which imaging library writes and reads the shards' images (``PIL``): pillow-simd or stock
    Pillow, with its version and codecs. Logged by data_prep and by training."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    import PIL
    from PIL import features

    version = PIL.__version__
    # Judge by the code that imports, not by metadata: `pip install` of anything that needs
    # "pillow" puts stock Pillow's files over pillow-simd's while both stay listed.
    try:
        simd = dist_version("pillow-simd") == version
    except PackageNotFoundError:
        simd = False
    name = f"pillow-simd {version}" if simd else f"Pillow {version}"
    codecs = [c for c in ("jpg", "zlib", "webp", "libtiff") if features.check(c)]
    turbo = features.check_feature("libjpeg_turbo") if "jpg" in codecs else False
    return f"{name} (codecs: {', '.join(codecs)}{'; libjpeg-turbo' if turbo else ''})"
