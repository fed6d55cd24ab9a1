"""``FileLockManager``: locks as files in a directory, for processes sharing a filesystem.

Per key two files live in the directory:

* ``<name>.lock``: the holder record (JSON: holder, host, pid, process start time,
  acquired, lease expiry, fence). It exists while the key is held: created with
  ``O_EXCL`` when the key is free, replaced whole (temp file + ``os.replace``) on renewal
  and takeover. A reader that catches a new file before its first write retries briefly.
* ``<name>.fence``: a guard that every change to the lock takes with ``flock`` for a few
  microseconds, and the last fence handed out for the key. It is kept after release so
  fences keep growing.

Why a guard instead of ``O_EXCL`` alone: taking over a dead holder's file is a
read-check-replace, and two waiters that both saw the holder dead must not both win. Under
the guard that sequence is atomic; the kernel drops an ``flock`` when its process dies, so
a crash inside the guard blocks no one. The guard is only ever tried without blocking
(``LOCK_NB``): a process stopped (SIGSTOP, a suspended laptop) inside it, a window of
microseconds, keeps the others from taking the key, even one whose lease ran out, until it
resumes; their ``acquire`` then gives up at its timeout instead of hanging, and
release/renew/break raise ``LockError`` after ``GUARD_TIMEOUT``. (Known limit: breaking a
stopped process's guard would need the guard itself to be a lease.)

Recovery: a record whose lease has expired is free; on the record's own host a holder
whose process is gone (pid plus start time, so a recycled pid does not count as alive) is
free at once. "Own host" means the same host name, boot and pid namespace (``pid_scope``
in base.py), so containers sharing a name never judge each other's pids. Other hosts
rely on lease expiry and therefore on clocks agreeing to well
within a lease. ``flock`` works on local filesystems and on NFS v4 / Linux NFS clients,
which emulate it with byte-range locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from notebook_flow import _identity, _json
from notebook_flow.errors import LockError

from .base import (
    Attempt,
    BackoffAcquire,
    LockInfo,
    holder_process_dead,
    pid_scope,
    wait_until_released,
)

__all__ = ["FileLockManager"]

#: How long release/renew/break wait for a key's guard before giving up with LockError.
GUARD_TIMEOUT = 10.0
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,119}")
_FENCE_WIDTH = 20


def _file_name(key: str) -> str:
    """A safe file name for ``key``: itself when plain, else ``_`` + a hash of it."""
    if _PLAIN_NAME.fullmatch(key):
        return key
    return "_" + hashlib.sha256(key.encode()).hexdigest()[:40]


class _GuardBusy(Exception):
    """The key's guard is held by another process or thread right now."""


class FileLockManager(BackoffAcquire):
    """Locks as files under ``directory``, for the processes of one machine (or NFS).

    >>> import tempfile
    >>> m = FileLockManager(tempfile.mkdtemp())
    >>> m.acquire("key", "holder-1", timeout=0, lease=10.0)
    True
    >>> m.holder_of("key").holder
    'holder-1'
    >>> m.release("key", "holder-1")
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.path.abspath(os.fspath(directory))

    def __repr__(self) -> str:
        return f"FileLockManager({self.directory!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.directory = state["directory"]

    @property
    def _label(self) -> str:
        return f"file:{self.directory}"

    # -- files -------------------------------------------------------------------------------

    def _lock_path(self, key: str) -> str:
        return os.path.join(self.directory, _file_name(key) + ".lock")

    @contextlib.contextmanager
    def _guard(self, key: str, wait: float) -> Iterator[int]:
        """Hold the key's guard (``flock`` on ``<name>.fence``); ``_GuardBusy`` after ``wait`` s."""
        path = os.path.join(self.directory, _file_name(key) + ".fence")
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            deadline = time.monotonic() + wait
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise _GuardBusy(path) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)
            yield fd
        finally:
            os.close(fd)  # closing drops the flock

    def _read(self, key: str) -> dict[str, Any] | None:
        path = self._lock_path(key)
        for _ in range(20):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            try:
                data = os.read(fd, 1 << 16)  # a record is a few hundred bytes
            finally:
                os.close(fd)
            try:
                record = _json.loads(data)
                float(record["lease_expires"])
                str(record["holder"])
                return dict(record)
            except (ValueError, KeyError, TypeError):
                # A new lock file is written right after its O_EXCL create: give the
                # writer (who holds the guard) a moment to finish.
                time.sleep(0.0005)
        # Still unreadable: a foreign or damaged file; treat its holder as dead.
        return {"holder": "", "lease_expires": 0.0, "acquired_at": 0.0, "fence": 0}

    def _write(self, key: str, record: dict[str, Any], *, create: bool = False) -> None:
        """Write the record: a new file with O_EXCL, or replace one atomically.

        The caller holds the guard, so the temp name is ours alone.
        """
        path = self._lock_path(key)
        data = json.dumps(record).encode()
        if create:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            return
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _info(self, key: str, record: dict[str, Any]) -> LockInfo:
        return LockInfo(
            key=str(record.get("key", key)),
            holder=str(record["holder"]),
            acquired_at=float(record.get("acquired_at", 0.0)),
            lease_expires=float(record["lease_expires"]),
            manager=self._label,
            fence=int(record.get("fence", 0)),
        )

    @staticmethod
    def _live(record: dict[str, Any], now: float) -> bool:
        return now < float(record["lease_expires"]) and not holder_process_dead(record)

    @staticmethod
    def _next_fence(fd: int) -> int:
        """Bump the key's fence stored in the guard file.

        The wall clock in milliseconds is a floor, so fences keep growing even if someone
        deletes the guard file.
        """
        raw = os.pread(fd, _FENCE_WIDTH, 0).strip()
        last = int(raw) if raw.isdigit() else 0
        fence = max(last + 1, int(time.time() * 1000))
        os.pwrite(fd, str(fence).rjust(_FENCE_WIDTH).encode(), 0)
        return fence

    # -- acquiring ---------------------------------------------------------------------------

    def _try(self, key: str, holder: str, lease: float) -> Attempt:
        # Cheap look first: a waiter on a live lock must not contend for the guard.
        seen = self._read(key)
        if seen is not None and seen["holder"] != holder and self._live(seen, time.time()):
            return Attempt(None, self._info(key, seen))
        try:
            with self._guard(key, 0.0) as fd:
                record = self._read(key)
                now = time.time()
                live = record is not None and self._live(record, now)
                if record is not None and live and record["holder"] != holder:
                    return Attempt(None, self._info(key, record))
                if record is not None and live:  # our own lock again: refresh it
                    record["lease_expires"] = now + lease
                    self._write(key, record)
                    return Attempt(self._info(key, record))
                me = _identity.process()
                new = {
                    "key": key,
                    "holder": holder,
                    "acquired_at": now,
                    "lease_expires": now + lease,
                    "fence": self._next_fence(fd),
                    "host": me.host,
                    "scope": pid_scope(),
                    "pid": me.pid,
                    "start_time": me.start_time,
                }
                self._write(key, new, create=record is None)
                previous = self._info(key, record) if record is not None else None
                return Attempt(self._info(key, new), previous)
        except (_GuardBusy, FileExistsError):  # FileExistsError: a writer without the guard
            record = self._read(key)
            return Attempt(None, self._info(key, record) if record is not None else None)
        except OSError as exc:
            raise LockError(f"could not lock {key!r} in {self.directory}: {exc}") from exc

    # -- holding -----------------------------------------------------------------------------

    def release(self, key: str, holder: str) -> None:
        """Give the lock back; ``LockError`` if ``holder`` does not hold it."""
        try:
            with self._guard(key, GUARD_TIMEOUT):
                record = self._read(key)
                if record is None or record["holder"] != holder:
                    current = record["holder"] if record is not None else None
                    raise LockError(
                        f"cannot release lock {key!r}: it is held by {current!r}, not {holder!r}"
                        if current
                        else f"cannot release lock {key!r}: it is not held"
                    )
                os.unlink(self._lock_path(key))
        except _GuardBusy as exc:
            raise LockError(f"cannot release lock {key!r}: its guard {exc} stays busy") from exc
        except OSError as exc:
            raise LockError(f"cannot release lock {key!r} in {self.directory}: {exc}") from exc

    def renew(self, key: str, holder: str, lease: float) -> bool:
        """Extend the lease; False when it expired or another holder took the lock."""
        try:
            with self._guard(key, GUARD_TIMEOUT):
                record = self._read(key)
                now = time.time()
                if record is None or record["holder"] != holder or not self._live(record, now):
                    return False
                record["lease_expires"] = now + lease
                self._write(key, record)
                return True
        except _GuardBusy as exc:
            raise LockError(f"cannot renew lock {key!r}: its guard {exc} stays busy") from exc
        except OSError as exc:
            raise LockError(f"cannot renew lock {key!r} in {self.directory}: {exc}") from exc

    # -- inspecting --------------------------------------------------------------------------

    def holder_of(self, key: str) -> LockInfo | None:
        """The live holder's record, or None."""
        record = self._read(key)
        if record is None or not self._live(record, time.time()):
            return None
        return self._info(key, record)

    def is_locked(self, key: str) -> bool:
        """True while a live holder holds ``key``."""
        return self.holder_of(key) is not None

    def list_locks(self) -> list[LockInfo]:
        """Every live lock in the directory, sorted by key."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        now = time.time()
        infos = []
        for name in names:
            if not name.endswith(".lock"):
                continue
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    record = _json.loads(f.read())
                if self._live(record, now):
                    infos.append(self._info(str(record["key"]), record))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # released meanwhile, or not ours
        return sorted(infos, key=lambda i: i.key)

    def break_lock(self, key: str) -> bool:
        """Remove the lock whoever holds it; True if a live holder held it."""
        try:
            with self._guard(key, GUARD_TIMEOUT):
                record = self._read(key)
                if record is None:
                    return False
                os.unlink(self._lock_path(key))
                return self._live(record, time.time())
        except _GuardBusy as exc:
            raise LockError(f"cannot break lock {key!r}: its guard {exc} stays busy") from exc

    def wait_for_release(self, key: str, timeout: float | None = None) -> bool:
        """Block until ``key`` is free; False if ``timeout`` passed first."""
        return wait_until_released(lambda: self.holder_of(key), timeout)
