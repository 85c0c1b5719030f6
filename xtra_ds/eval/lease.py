"""Leases: which of several eval workers evaluates an export, on a run directory no lock reaches.

Locally a ``flock`` refuses a second worker per dataset; on an object store (``s3://``) nothing does,
so each (dataset, export) has a lease, a chain of small objects::

    eval/leases/<dataset>/step_XXXXXXXX/gen_000001.json   {"owner": {"host", "pid", "id"}, "expires", ...}
                                        gen_000002.json   ...

Every change of a lease — taking it, renewing it, taking over an expired one, releasing it — is the
creation of the next generation, and each generation is created only if absent (a conditional PUT,
``If-None-Match: *``; locally a hard link, which fails when the name exists). Two workers that both
saw generation *n* both try to create *n + 1*: the store lets exactly one of them, whatever their
clocks. The holder renews every third of :data:`LEASE_SECONDS` (in the background) and once more right
before it publishes an outcome; a renewal that finds *n + 1* taken means the lease was taken over (the
holder had stalled past its expiry), and the holder stops without writing anything. Clocks matter only
for when a lease counts as expired: the holder's last renewal and its writes must take less than the
lease length, less however far another worker's clock runs ahead of the holder's.

A lease whose owner ran on this machine, in this process namespace, and is no longer running (a worker
killed and started again) is free at once; one from elsewhere is free when it expires.

Generations are never deleted (a few hundred bytes each): deleting one would let a worker that saw it
create a generation again. rundir.py has no name for this folder yet; :data:`LEASES` is it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..rundir import RunDir, tag_of, worker_lock
from ..storage import can_create_exclusive, create_exclusive

log = logging.getLogger("xtra_ds.eval")

LEASES = "eval/leases"  # eval/leases/<dataset>/step_XXXXXXXX/gen_NNNNNN.json (see the module's docstring)
LEASE_SECONDS = 300.0
"""How long a lease holds without renewal. The holder renews every third of it, so it survives a storage
outage of two thirds; a worker that died holds its export this long before another takes it over. Not an
eval config key (the schema is shared): change it here, alike for every worker of a run."""

GEN_RE = re.compile(r"^gen_(\d{6,})\.json$")


def hold_dataset_lock(run: RunDir, dataset: str):
    """One worker per local run directory and dataset: the lock file of ``dataset``, held (``flock``) for as long
    as the returned file stays open — a ``kill -9`` releases it. A second worker is refused; None on object
    stores, where leases do this job."""
    if not run.local:
        return None
    path = Path(run.path(worker_lock(dataset)))
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise RuntimeError(f"another eval worker (pid {f.read().strip() or '?'}) is evaluating {dataset!r} for "
                           f"{run.url}; stop it first or give this one another eval.dataset") from None
    f.seek(0), f.truncate(), f.write(str(os.getpid())), f.flush()
    return f


class LeaseLost(RuntimeError):
    """Another worker took over the lease (this one had stalled past its expiry): stop, write nothing."""


class Lease:
    """A lease this worker holds on one export (from :meth:`Leases.acquire`)."""

    def __init__(self, leases: Leases, step: int, generation: int, guarded: bool = True):
        self.leases, self.step, self.generation, self.guarded = leases, step, generation, guarded
        self.expires = 0.0
        self.lost: str | None = None  # why, once a renewal found the lease taken over
        self._lock = threading.Lock()  # the background renewal and the holder never create the same generation

    def _advance(self, released: bool = False) -> bool:
        """Create the next generation as this owner; False when another worker created it first."""
        with self._lock:
            now = self.leases.clock()
            expires = now if released else now + self.leases.seconds
            record = {"owner": self.leases.owner, "dataset": self.leases.dataset, "step": self.step,
                      "generation": self.generation + 1, "expires": expires, "time": now, "released": released}
            if not create_exclusive(self.leases.run.fs, self.leases.generation_path(self.step, self.generation + 1),
                                    json.dumps(record).encode()):
                return False
            self.generation, self.expires = self.generation + 1, expires
            return True

    def renew(self) -> None:
        """Extend the lease by :data:`LEASE_SECONDS` from now. Raises :class:`LeaseLost` when it was taken over."""
        if not self.guarded or self.lost:
            return self.check()
        if not self._advance():
            _, holder = self.leases.latest(self.step)
            self.lost = f"the lease of {tag_of(self.step)} was taken over by {describe(holder)}"
            raise LeaseLost(self.lost)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if a renewal found the lease taken over."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Let another worker take the export at once (best effort: otherwise the lease just expires)."""
        if not self.guarded or self.lost:
            return
        try:
            self._advance(released=True)
        except OSError as e:
            log.warning("cannot release the lease of %s (%s: %s); it expires by itself", tag_of(self.step),
                        type(e).__name__, e)

    @contextmanager
    def kept(self) -> Iterator[Lease]:
        """Renew the lease in the background, every third of its length, while the block runs. A renewal
        that finds it taken over marks it lost (:meth:`check` then raises); a storage error is retried at
        the next renewal."""
        if not self.guarded:
            yield self
            return
        stop = threading.Event()

        def keep():
            while not stop.wait(self.leases.seconds / 3):
                try:
                    self.renew()
                except LeaseLost:
                    log.warning("%s; stopping its evaluation", self.lost)
                    return
                except OSError as e:
                    log.warning("cannot renew the lease of %s (%s: %s); trying again", tag_of(self.step),
                                type(e).__name__, e)

        keeper = threading.Thread(target=keep, name=f"lease-{tag_of(self.step)}", daemon=True)
        keeper.start()
        try:
            yield self
        finally:
            stop.set()
            keeper.join()


class Leases:
    """The leases of one worker (one owner: host, pid and a random id) on the exports of one dataset.

    ``seconds``: the lease length; ``clock``: what "now" is (wall-clock seconds) when judging expiry.
    On storage without create-if-absent (neither local nor S3) every lease is granted unguarded: one
    worker per dataset there, as before.
    """

    def __init__(self, run: RunDir, dataset: str, seconds: float = LEASE_SECONDS,
                 clock: Callable[[], float] = time.time):
        self.run, self.dataset, self.seconds, self.clock = run, dataset, seconds, clock
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex,
                      "pid_space": pid_space()}
        self.guarded = can_create_exclusive(run.fs)
        if not self.guarded:
            log.warning("%s cannot create an object only if absent: nothing keeps two eval workers of %r from "
                        "evaluating the same export there; run one per dataset", run.url, dataset)

    def generation_path(self, step: int, generation: int) -> str:
        return self.run.path(LEASES, self.dataset, tag_of(step), f"gen_{generation:06d}.json")

    def latest(self, step: int) -> tuple[int, dict | None]:
        """(the newest generation of the lease of ``step``, 0 when none; its record, None when unreadable)."""
        folder = self.run.path(LEASES, self.dataset, tag_of(step))
        try:
            names = [e.rstrip("/").rsplit("/", 1)[-1] for e in self.run.fs.ls(folder, detail=False, refresh=True)]
        except FileNotFoundError:
            return 0, None
        generations = [int(m.group(1)) for m in map(GEN_RE.match, names) if m]
        if not generations:
            return 0, None
        newest = max(generations)
        try:
            record = json.loads(self.run.fs.cat_file(self.generation_path(step, newest)))
            return newest, record if isinstance(record, dict) else None
        except (FileNotFoundError, ValueError):
            return newest, None

    def acquire(self, step: int) -> Lease | None:
        """The lease of ``step``, or None while another worker holds it (its lease neither expired nor
        released). Taking it, or taking over an expired one, is creating the next generation: of two
        workers that try at once, exactly one gets it."""
        if not self.guarded:
            return Lease(self, step, 0, guarded=False)
        generation, record = self.latest(step)
        if record is None and generation:
            log.warning("%s of %s is unreadable; taken as expired", f"gen_{generation:06d}.json", tag_of(step))
        elif record is not None and not self.free(record):
            return None
        lease = Lease(self, step, generation)
        return lease if lease._advance() else None

    def free(self, record: dict) -> bool:
        """Whether a lease record lets this worker take the export: its own, released, expired, or its owner's
        process is gone (seen from the same machine and process namespace)."""
        owner = record.get("owner") if isinstance(record.get("owner"), dict) else {}
        try:
            expires = float(record.get("expires", 0))
        except (TypeError, ValueError):
            expires = 0.0  # not a lease this code wrote: as good as expired
        return (owner.get("id") == self.owner["id"] or bool(record.get("released")) or not expires > self.clock()
                or self._gone(owner))

    def _gone(self, owner: dict) -> bool:
        """Whether ``owner`` ran here (this host and process namespace) and its process no longer exists. A pid
        used again since counts as alive: the lease then just expires."""
        mine = self.owner
        if not mine["pid_space"] or (owner.get("host"), owner.get("pid_space")) != (mine["host"], mine["pid_space"]):
            return False
        try:
            os.kill(int(owner.get("pid")), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, TypeError, ValueError, OverflowError):  # another user's process; a strange pid
            return False
        return False

    def holder(self, step: int) -> dict | None:
        """The record of whoever holds the lease of ``step`` now (None: nobody)."""
        _, record = self.latest(step)
        return None if record is None or self.free(record) else record


def pid_space() -> str | None:
    """This boot of this machine and this process namespace (Linux), where pids name processes; None elsewhere.
    Containers that share a host name see different processes under one pid."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def describe(record: dict | None) -> str:
    """``host pid 1234`` for a lease record's owner."""
    owner = (record or {}).get("owner") or {}
    return f"{owner.get('host', '?')} pid {owner.get('pid', '?')}" if owner else "another worker"
