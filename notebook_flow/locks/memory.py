"""``MemoryLockManager``: locks between the threads of one process.

A holder is dead when the thread that acquired the lock has ended, when the process has
forked (the child inherits none of its parent's locks), or when its lease has expired.
Waiters sleep on a condition variable, so a release wakes them at once.

Managers with the same ``name`` share one table within a process; a copy made by
``pickle`` or ``copy`` keeps the name and therefore the table. In another process the
name refers to a fresh, empty table: this manager never coordinates across processes (use
``FileLockManager``, ``RedisLockManager`` or ``PostgresLockManager`` for that).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

from notebook_flow.errors import LockError

from .base import (
    Attempt,
    BackoffAcquire,
    LockInfo,
    wait_until_released,
)

__all__ = ["MemoryLockManager"]


@dataclass
class _Entry:
    info: LockInfo
    thread: weakref.ref[threading.Thread]
    pid: int

    def live(self, now: float) -> bool:
        thread = self.thread()
        return (
            now < self.info.lease_expires
            and self.pid == os.getpid()
            and thread is not None
            and thread.is_alive()
        )


@dataclass
class _Table:
    cond: threading.Condition = field(default_factory=threading.Condition)
    locks: dict[str, _Entry] = field(default_factory=dict)
    # One counter per table: assigned under the table's lock, so it grows per key too.
    fence: int = 0


_tables: dict[str, _Table] = {}
_tables_lock = threading.Lock()


def _table(name: str) -> _Table:
    with _tables_lock:
        table = _tables.get(name)
        if table is None:
            table = _tables[name] = _Table()
        return table


def _after_fork_in_child() -> None:
    # The parent's threads do not exist here, and a lock copied while held would never be
    # released: start with fresh primitives and no holders (fences keep counting).
    global _tables_lock
    _tables_lock = threading.Lock()
    for table in _tables.values():
        table.cond = threading.Condition()
        table.locks.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class MemoryLockManager(BackoffAcquire):
    """Locks for the threads of one process (a kernel and its worker threads).

    >>> m = MemoryLockManager()
    >>> m.acquire("key", "holder-1", timeout=0)
    True
    >>> m.acquire("key", "holder-2", timeout=0)
    False
    >>> m.release("key", "holder-1")
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"memory-{uuid.uuid4().hex[:12]}"
        self._table = _table(self.name)

    def __repr__(self) -> str:
        return f"MemoryLockManager(name={self.name!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name = state["name"]
        self._table = _table(self.name)

    _backoff_max = 0.05  # a release wakes the waiters (_sleep); this only bounds a miss

    @property
    def _label(self) -> str:
        return f"memory:{self.name}"

    # -- acquiring ---------------------------------------------------------------------------

    def _try(self, key: str, holder: str, lease: float) -> Attempt:
        table = self._table
        with table.cond:
            now = time.time()
            entry = table.locks.get(key)
            if entry is not None and entry.live(now):
                if entry.info.holder != holder:
                    return Attempt(None, entry.info)
                entry.info = replace(entry.info, lease_expires=now + lease)
                return Attempt(entry.info)
            table.fence += 1
            info = LockInfo(key, holder, now, now + lease, self._label, table.fence)
            table.locks[key] = _Entry(info, weakref.ref(threading.current_thread()), os.getpid())
            return Attempt(info, entry.info if entry is not None else None)

    def _sleep(self, seconds: float) -> None:
        with self._table.cond:
            self._table.cond.wait(seconds)

    # -- holding -----------------------------------------------------------------------------

    def release(self, key: str, holder: str) -> None:
        """Give the lock back; ``LockError`` if ``holder`` does not hold it."""
        table = self._table
        with table.cond:
            entry = table.locks.get(key)
            if entry is None or entry.info.holder != holder:
                current = entry.info.holder if entry is not None else None
                raise LockError(
                    f"cannot release lock {key!r}: it is held by {current!r}, not {holder!r}"
                    if current
                    else f"cannot release lock {key!r}: it is not held (lease expired?)"
                )
            del table.locks[key]
            table.cond.notify_all()

    def renew(self, key: str, holder: str, lease: float) -> bool:
        """Extend the lease; False when it expired or another holder took the lock."""
        table = self._table
        with table.cond:
            now = time.time()
            entry = table.locks.get(key)
            if entry is None or entry.info.holder != holder or not entry.live(now):
                return False
            entry.info = replace(entry.info, lease_expires=now + lease)
            return True

    # -- inspecting --------------------------------------------------------------------------

    def holder_of(self, key: str) -> LockInfo | None:
        """The live holder's record, or None."""
        with self._table.cond:
            entry = self._table.locks.get(key)
            return entry.info if entry is not None and entry.live(time.time()) else None

    def is_locked(self, key: str) -> bool:
        """True while a live holder holds ``key``."""
        return self.holder_of(key) is not None

    def list_locks(self) -> list[LockInfo]:
        """Every live lock, sorted by key."""
        with self._table.cond:
            now = time.time()
            infos = [e.info for e in self._table.locks.values() if e.live(now)]
        return sorted(infos, key=lambda i: i.key)

    def break_lock(self, key: str) -> bool:
        """Remove the lock whoever holds it; True if there was a live one."""
        table = self._table
        with table.cond:
            entry = table.locks.pop(key, None)
            table.cond.notify_all()
            return entry is not None and entry.live(time.time())

    def wait_for_release(self, key: str, timeout: float | None = None) -> bool:
        """Block until ``key`` is free; False if ``timeout`` passed first."""
        return wait_until_released(lambda: self.holder_of(key), timeout)
