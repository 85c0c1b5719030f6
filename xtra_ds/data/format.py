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
import json
import os
from typing import Any

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


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def read_json(fs, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


# Where an S3-compatible endpoint may be named, most specific first: the AWS SDKs' standard variables,
# then the one data_prep has always read. An endpoint in the storage options wins over all of them.
S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
MASK = "<masked>"  # what a secret becomes wherever a config is shown or stored
_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def s3_endpoint_from_env() -> str | None:
    return next((os.environ[v] for v in S3_ENDPOINT_VARIABLES if os.environ.get(v)), None)


def storage_options_for(url: str, options: dict | None) -> dict:
    """fsspec options for ``url``: S3 gets short connect timeouts (a dead endpoint fails fast),
    ``endpoint_url`` is accepted at the top level (s3fs wants it in ``client_kwargs``), an endpoint
    from the environment (:data:`S3_ENDPOINT_VARIABLES`) applies when the options name none, and
    masked secrets (a config read back from a run directory) are dropped, so that the environment's
    credentials are used."""
    opts = {k: v for k, v in (options or {}).items() if v != MASK}
    if url.startswith(("s3://", "s3a://")):
        opts.setdefault("config_kwargs", {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 4}})
        endpoint = opts.pop("endpoint_url", None) or opts.get("client_kwargs", {}).get("endpoint_url") \
            or s3_endpoint_from_env()
        if endpoint:
            opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "endpoint_url": endpoint}
    return opts


def mask_secrets(value):
    """``value`` (a config, options, any nesting of dicts and lists) with every credential-looking
    entry — a key containing key, secret, token, password or credential — replaced by :data:`MASK`."""
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and any(w in k.lower() for w in _SECRET_WORDS) and v not in (None, "")
                else mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def filesystem(url: str, options: dict | None = None):
    """``(fs, path)`` for a local path or any fsspec URL, with :func:`storage_options_for` applied.
    fsspec keeps one instance per arguments and process (dropping them across a fork)."""
    import fsspec

    return fsspec.core.url_to_fs(url, **storage_options_for(url, options))


def fsync_path(path, directory: bool = False) -> None:
    """Flush a file's (or, ``directory``, a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_local(tmp, dest) -> None:
    """Make the finished local file ``tmp`` appear at ``dest`` whole, also across a crash: its data is
    flushed, then it is renamed into place, then the rename itself is flushed."""
    fsync_path(tmp)
    os.replace(tmp, dest)
    fsync_path(os.path.dirname(os.path.abspath(dest)), directory=True)


def write_atomic(path, data: bytes) -> None:
    """Write-fsync-rename: a reader (or a crash) sees the old file or the new one, never a part."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    publish_local(tmp, path)


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
