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
import logging
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
# A setting is a secret when its name, lower-cased with everything but letters and digits dropped, is one of
# these or contains one of the fragments: s3fs's key/secret/token, botocore's aws_secret_access_key,
# aws_session_token and aws_access_key_id, passwords, API keys. Not: SSEKMSKeyId, key_file, endpoint_url.
_SECRET_NAMES = ("key", "secret", "token", "password", "passwd", "pass")
_SECRET_FRAGMENTS = ("secret", "password", "passwd", "token", "credential", "privatekey", "apikey", "accesskey",
                     "sessionkey", "signingkey")
_warned_masked: set[str] = set()


def s3_endpoint_from_env() -> str | None:
    return next((os.environ[v] for v in S3_ENDPOINT_VARIABLES if os.environ.get(v)), None)


def storage_options_for(url: str, options: dict | None) -> dict:
    """fsspec options for ``url``: S3 gets short connect timeouts (a dead endpoint fails fast),
    ``endpoint_url`` is accepted at the top level (s3fs wants it in ``client_kwargs``), an endpoint
    from the environment (:data:`S3_ENDPOINT_VARIABLES`) applies when the options name none, and
    masked secrets (a config read back from a run directory) are dropped, so that the environment's
    credentials are used."""
    opts = drop_masked(options or {})
    if url.startswith(("s3://", "s3a://")):
        opts.setdefault("config_kwargs", {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 4}})
        endpoint = opts.pop("endpoint_url", None) or opts.get("client_kwargs", {}).get("endpoint_url") \
            or s3_endpoint_from_env()
        if endpoint:
            opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "endpoint_url": endpoint}
    return opts


def is_secret_name(name: str) -> bool:
    """Whether a setting or variable called ``name`` holds a credential (see :data:`_SECRET_NAMES`)."""
    flat = "".join(c for c in name.lower() if c.isalnum())
    return flat in _SECRET_NAMES or any(f in flat for f in _SECRET_FRAGMENTS)


def mask_secrets(value):
    """``value`` (a config, options, any nesting of dicts and lists) with every credential — an entry whose
    name :func:`is_secret_name` — replaced by :data:`MASK`; everything else as it is."""
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and is_secret_name(k) and v not in (None, "") else mask_secrets(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def drop_masked(value, where: str = ""):
    """``value`` without the entries :func:`mask_secrets` masked, at any depth: options read back from a run
    directory's config must never send the literal mask. The first time a process drops a credential it says
    which, and where the credential then comes from."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            dotted = f"{where}.{k}" if where else str(k)
            if v == MASK:
                if dotted not in _warned_masked:
                    _warned_masked.add(dotted)
                    logging.getLogger("xtra_ds.storage").warning(
                        "storage option %s is masked in the config this process read (credentials never reach a "
                        "run directory): this process needs its own credential instead — AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE or ~/.aws/credentials, or env_file",
                        dotted)
                continue
            out[k] = drop_masked(v, dotted)
        return out
    if isinstance(value, list):
        return [drop_masked(v, where) for v in value]
    return value


def secrets_in(value, where: str = "") -> list[str]:
    """The dotted names of the credentials with a value in ``value`` (nested dicts), e.g. for overrides
    ``["data.storage_options.secret"]``."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            dotted = f"{where}.{k}" if where else str(k)
            if isinstance(k, str) and is_secret_name(k) and v not in (None, "", MASK) and not isinstance(v, dict):
                found.append(dotted)
            else:
                found += secrets_in(v, dotted)
    return found


def load_env_file(path: str | os.PathLike) -> list[str]:
    """Put the ``KEY=VALUE`` lines of ``path`` (``#`` comments, blank lines and a leading ``export`` allowed)
    into this process's environment, over what is there; returns the names set (never the values). The way to
    give every rank a credential without it appearing on a command line, in DeepSpeed's runner log or in
    ``ps``: each process reads the file itself (``env_file`` in the config)."""
    path = os.fspath(path)
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise OSError(f"env_file={path}: cannot be read ({e.strerror}); every rank and the eval worker read it "
                      f"themselves, so it must exist at that path on every node") from None
    names = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ValueError(f"env_file={path}, line {n}: expected KEY=VALUE (the line is not shown: it may hold a "
                             f"secret)")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        os.environ[key] = value
        names.append(key)
    if os.stat(path).st_mode & 0o077:
        logging.getLogger("xtra_ds.storage").warning("env_file=%s can be read by other users of this machine: "
                                                     "chmod 600 it", path)
    return names


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
