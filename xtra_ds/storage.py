"""Storage, local or object store, for every part of the project: the one way to open a URL, to write a file
atomically, to create one only if it is absent, and to handle credentials.

* :func:`filesystem` — ``(fs, path)`` for a local path or any fsspec URL, with :func:`storage_options_for`
  applied (short S3 timeouts, the endpoint from the environment, masked secrets dropped);
* credentials — :func:`is_secret_name`, :func:`mask_secrets` (what a stored or printed config shows),
  :func:`drop_masked` (what a reader of such a config sends), :func:`secrets_in`, :func:`load_env_file`;
* durability — :func:`fsync_path`, :func:`publish_local` (flush, rename into place, flush the rename),
  :func:`write_atomic`, :func:`write_bytes` (any filesystem), :func:`move`, :func:`publish_dir` and
  :func:`replace_dir` (a folder swapped in whole), :func:`create_exclusive` (create-if-absent);
* JSON — :func:`read_json`, :func:`dumps`.

Standard library and fsspec only (no torch): data_prep's worker processes import it. Nothing else in the
package renames or links files into place.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

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


def write_bytes(fs, path: str, data: bytes) -> None:
    """All of ``data`` at ``path`` of ``fs`` or nothing, for readers and across a crash: :func:`write_atomic`
    locally, one PUT on object stores (an object appears whole or not at all)."""
    if is_local(fs):
        write_atomic(path, data)
    else:
        fs.pipe_file(path, data)


def is_local(fs) -> bool:
    """Whether ``fs`` is the local filesystem."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def move(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename a local file or folder to ``dest`` (its folder created), and make the rename durable."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    fsync_path(dest.parent, directory=True)
    fsync_path(Path(src).parent, directory=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the finished local folder ``tmp`` (its files already flushed) appear as ``final`` whole: a rename,
    or, when ``final`` exists, an exchange (:func:`replace_dir`) after which ``tmp`` holds the old one and is
    removed. Readers see the old folder or the new one, never a part."""
    import shutil

    if final.exists():
        replace_dir(tmp, final)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent, directory=True)


def replace_dir(new: Path, old: Path) -> None:
    """Put folder ``new`` where folder ``old`` is, so that a reader of ``old`` never finds it missing: an
    atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``; ``new`` then holds the old contents). Where the
    filesystem has no exchange, two renames leave a moment without ``old``: readers retry once."""
    if not _rename_exchange(new, old):
        aside = old.with_name(f".{old.name}.old-{os.getpid()}")
        os.replace(old, aside)
        os.replace(new, old)
        os.replace(aside, new)


def _rename_exchange(a: Path, b: Path) -> bool:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def can_create_exclusive(fs) -> bool:
    """Whether :func:`create_exclusive` works on ``fs`` (local disks and S3)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return is_local(fs) or "s3" in protocols


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create the file ``path`` of ``fs`` holding ``data`` only if nothing is there: True when this call
    created it, False when it existed (or another creation of it was in flight). Readers see it whole.

    Locally the data is written to a temporary file, flushed, and hard-linked to ``path`` (``link`` fails
    when the name exists; an ``O_CREAT | O_EXCL`` file would be visible, empty, before its data). On S3 one
    PUT with ``If-None-Match: *`` (s3fs hands extra keywords to botocore's put_object).
    """
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{os.path.basename(path)}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        fsync_path(folder, directory=True)
        return True
    if "s3" in protocols:
        try:
            fs.pipe_file(path, data, IfNoneMatch="*")
        except FileExistsError:  # s3fs's reading of 412 PreconditionFailed (If-None-Match)
            return False
        except OSError as e:
            # 409 ConditionalRequestConflict: another conditional PUT of the same key is in flight; it may win
            code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
            if code == "ConditionalRequestConflict":
                return False
            raise
        return True
    raise NotImplementedError(f"no create-if-absent on {fs.protocol} storage")


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def read_json(fs, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())
