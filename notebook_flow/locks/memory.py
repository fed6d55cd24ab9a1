"""``MemoryLockManager``: locks between the threads of one process.

A holder is dead when the thread that acquired the lock has ended, when the process has
forked (the child inherits none of its parent's locks), or when its lease has expired.
Waiters sleep on a condition variable, so a release wakes them at once.

Managers with the same ``name`` share one table within a process; a copy made by
``pickle`` or ``copy`` keeps the name and therefore the table. ``MemoryLockManager()``
without a name is one object per process (as Prefect's singleton), so every unnamed use
shares one table. In another process the name refers to a fresh, empty table (a forked
child starts empty too): this manager never coordinates across processes (use
``FileLockManager``, ``RedisLockManager`` or ``PostgresLockManager`` for that).

A lock taken through Prefect's ``acquire_lock`` is not tied to the acquiring thread: it
lasts until released or until its ``hold_timeout``, as in Prefect.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

from notebook_flow.errors import LockError

from .base import (
    Attempt,
    BackoffAcquire,
    LockInfo,
    acquire_with_backoff,
    wait_until_released,
)

__all__ = ["MemoryLockManager"]


@dataclass
class _Entry:
    info: LockInfo
    thread: weakref.ref[threading.Thread] | None  # None: not tied to a thread (Prefect's)
    pid: int

    def live(self, now: float) -> bool:
        if now >= self.info.lease_expires or self.pid != os.getpid():
            return False
        if self.thread is None:
            return True
        thread = self.thread()
        return thread is not None and thread.is_alive()


@dataclass
class _Table:
    cond: threading.Condition = field(default_factory=threading.Condition)
    locks: dict[str, _Entry] = field(default_factory=dict)
    # One counter per table: assigned under the table's lock, so it grows per key too.
    fence: int = 0


_DEFAULT_NAME = "default"
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

    _default: MemoryLockManager | None = None

    def __new__(cls, name: str | None = None) -> MemoryLockManager:
        if name is None:  # one unnamed manager per process, as Prefect's singleton
            with _tables_lock:
                if cls._default is None:
                    cls._default = super().__new__(cls)
                return cls._default
        return super().__new__(cls)

    def __init__(self, name: str | None = None) -> None:
        self.name = name or _DEFAULT_NAME
        self._table = _table(self.name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (MemoryLockManager, (None if self.name == _DEFAULT_NAME else self.name,))

    def __repr__(self) -> str:
        return f"MemoryLockManager(name={self.name!r})"

    _backoff_max = 0.05  # a release wakes the waiters (_sleep); this only bounds a miss

    @property
    def _label(self) -> str:
        return f"memory:{self.name}"

    # -- acquiring ---------------------------------------------------------------------------

    def _acquire_detached(self, key: str, holder: str, timeout: float | None, lease: float) -> bool:
        found = acquire_with_backoff(
            lambda: self._try(key, holder, lease, detached=True),
            key=key,
            timeout=timeout,
            manager=self._label,
            sleep=self._sleep,
            backoff_max=self._backoff_max,
        )
        return found is not None

    def _try(self, key: str, holder: str, lease: float, detached: bool = False) -> Attempt:
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
            thread = None if detached else weakref.ref(threading.current_thread())
            table.locks[key] = _Entry(info, thread, os.getpid())
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
