"""Reading shards through fsspec with retries: a read that fails mid-stream resumes at its offset.

Object stores drop connections, time out and answer 5xx under load; a long epoch meets all of
these. :class:`RetryingReader` reopens the file at the byte it had reached and goes on, with
exponential backoff; only a shard that still cannot be read after the retries is an error, and
that error names the URL. A missing shard fails at once: retrying cannot make it appear.
"""

from __future__ import annotations

import io
import logging
import time

from fsspec.implementations.local import LocalFileSystem

from ..storage import filesystem

log = logging.getLogger(__name__)
BLOCK_SIZE = 16 << 20  # large reads: few requests per shard (less when a worker reads many streams at once)


class ShardReadError(RuntimeError):
    """A shard that cannot be read; the message names its URL. ``permanent``: retrying cannot help
    (missing, forbidden, not a tar, shorter than its manifest says), as opposed to a storage outage
    that outlasted the retries."""

    def __init__(self, message: str, url: str = "", permanent: bool = True):
        # one-argument form too, so DataLoader can re-raise it from a worker process
        super().__init__(message)
        self.url, self.permanent = url, permanent

    @classmethod
    def of(cls, url: str, reason: str, permanent: bool = True) -> "ShardReadError":
        return cls(f"cannot read shard {url}: {reason}", url, permanent)


class RetryingReader(io.RawIOBase):
    """A read-only stream over ``url`` that survives transient errors by reopening at its offset."""

    def __init__(self, url: str, options: dict | None = None, retries: int = 8, backoff: float = 0.5,
                 block_size: int = BLOCK_SIZE):
        self.url, self.options, self.retries, self.backoff = url, options, retries, backoff
        self.block_size = block_size
        self.pos = 0
        self._f = None

    def readable(self) -> bool:
        return True

    def _open(self):
        fs, path = filesystem(self.url, self.options)
        if isinstance(fs, LocalFileSystem):
            f = open(path, "rb")
            f.seek(self.pos)
            return f
        return _RangeReader(fs, path, self.pos, self.block_size)

    def readinto(self, b) -> int:
        for attempt in range(self.retries + 1):
            try:
                if self._f is None:
                    self._f = self._open()
                data = self._f.read(len(b))
                n = len(data)
                b[:n] = data
                self.pos += n
                return n
            except (FileNotFoundError, PermissionError) as e:
                raise ShardReadError.of(self.url, f"{type(e).__name__}: {e}") from e
            except Exception as e:  # connection reset, timeout, 5xx, …: reopen at self.pos and retry
                self._close_inner()
                if attempt == self.retries:
                    raise ShardReadError.of(self.url, f"{type(e).__name__}: {e} (after {self.retries} retries)",
                                            permanent=False) from e
                delay = self.backoff * 2**attempt
                log.warning("reading %s at byte %d failed (%s: %s); retry %d/%d in %.1fs",
                            self.url, self.pos, type(e).__name__, e, attempt + 1, self.retries, delay)
                time.sleep(delay)
                # a fresh filesystem instance for the reopen: the old one's connection pool may be dead
                type(filesystem(self.url, self.options)[0]).clear_instance_cache()
        return 0  # pragma: no cover

    def _close_inner(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:
                pass
            self._f = None

    def close(self) -> None:
        self._close_inner()
        super().close()


class _RangeReader:
    """Sequential reads of a remote object as ranged GETs of ``block_size``: no HEAD request first
    (what ``fs.open`` would send), one request per block."""

    def __init__(self, fs, path: str, pos: int, block_size: int = BLOCK_SIZE):
        self.fs, self.path, self.pos, self.block_size = fs, path, pos, block_size
        self.buf, self.off, self.eof = memoryview(b""), 0, False

    def read(self, n: int) -> bytes:
        if self.off == len(self.buf) and not self.eof:
            block = self.fs.cat_file(self.path, start=self.pos, end=self.pos + self.block_size)
            self.buf, self.off = memoryview(block), 0
            self.eof = len(block) < self.block_size
            self.pos += len(block)
        out = bytes(self.buf[self.off:self.off + n])  # the block itself is never copied again
        self.off += len(out)
        return out

    def close(self) -> None:
        self.buf, self.off = memoryview(b""), 0


def open_shard(url: str, options: dict | None = None, block_size: int = BLOCK_SIZE, **kw) -> io.BufferedReader:
    return io.BufferedReader(RetryingReader(url, options, block_size=block_size, **kw),
                             buffer_size=min(1 << 20, block_size))
