"""Object storage through fsspec: opening URLs, atomic publication, errors that name the fix."""

from __future__ import annotations

import os
import tempfile
import uuid

from xtra_ds.storage import filesystem, is_local, publish_local


class StorageError(RuntimeError):
    """A destination or source that cannot be used; the message says why and what to do."""




def url_to_fs(url: str, options: dict | None = None):
    """``(filesystem, path)`` for a local path or fsspec URL, with a clear error for a bad scheme."""
    try:
        return filesystem(url, options)
    except (ValueError, ImportError) as e:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        raise StorageError(f"cannot open {url!r}: {e}. Supported: local paths, file://, s3:// (s3fs), gs:// (gcsfs), "
                           f"http(s)://" + (f"; is {scheme}:// a typo?" if scheme else "")) from e


def explain(url: str, err: BaseException) -> str:
    """Turn a storage exception into a sentence that names the fix."""
    text = f"{type(err).__name__}: {err}"
    low = text.lower()
    if "credential" in low or "nocredentials" in low:
        return (f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                f"or pass --storage-option anon=true for a public bucket")
    if "accessdenied" in low or "forbidden" in low or isinstance(err, PermissionError):
        return f"permission denied writing to {url}: check the credentials' rights on that bucket/prefix ({text})"
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return f"bucket of {url} does not exist: create it first or fix the URL ({text})"
    if "connect" in low or "endpoint" in low or "timeout" in low or "name or service" in low:
        return f"cannot reach the storage endpoint for {url}: check --endpoint-url and the network ({text})"
    return f"{url}: {text}"


def check_writable(fs, root: str, url: str) -> None:
    """Create the destination and prove it takes a write, before any expensive work."""
    probe = f"{root.rstrip('/')}/_write_probe_{uuid.uuid4().hex}"
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as e:  # any backend error: say what it means
        raise StorageError(f"destination is not writable: {explain(url, e)}") from e


def staging_file(fs, dest: str):
    """A local file to build ``dest`` in: beside it for local destinations (cheap rename)."""
    if is_local(fs):
        d = os.path.dirname(dest)
        os.makedirs(d, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=d, prefix="." + os.path.basename(dest) + ".", suffix=".tmp",
                                           delete=False)
    return tempfile.NamedTemporaryFile(prefix="xtra-shard-", suffix=".tar", delete=False)


def publish_file(local_path: str, fs, dest: str) -> None:
    """Make a finished local file visible at ``dest`` in one step.

    Local: ``os.replace``. Object stores: one upload (multipart for large files), which the
    store makes visible only when it completes — a killed upload leaves nothing at ``dest``.
    """
    if is_local(fs):
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(local_path, 0o666 & ~umask)  # temp files are created 0600
        publish_local(local_path, dest)
    else:
        try:
            fs.put_file(local_path, dest)
        finally:
            os.unlink(local_path)
