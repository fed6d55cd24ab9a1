"""The ``LockManager`` protocol, the ``LockInfo`` record and helpers shared by every manager.

A lock is held by a *holder* (a string, normally ``_identity.holder_id(run_id)``:
``host:pid:start:thread:run``) for a *lease* of some seconds that the holder renews while it
works (``lease.py`` does that from a heartbeat thread). A holder that dies or stops renewing
loses the lock: every manager recovers it (pid liveness on one host, lease expiry
elsewhere, session end for PostgreSQL), so a key is never locked forever.

Semantics shared by all managers (``tests/test_locks_contract.py`` checks them):

* ``acquire(key, holder, timeout=None)`` waits forever; ``timeout=0`` tries once and returns
  False when the key is held; a positive timeout raises ``LockTimeout`` naming the holder.
  Acquiring a key the same holder already holds refreshes its lease and returns True (so a
  retry after a lost reply is harmless); holder ids are unique per thread and run, so two
  callers never share one by accident.
* ``release`` by anyone but the holder raises ``LockError``; so does ``renew``-ing a lease
  that has expired: an expired lease is never revived (another holder may already have
  seen the key as free), ``renew`` returns False instead.
* Prefect's protocol (``acquire_lock``, ``release_lock``, ``is_lock_holder``,
  ``wait_for_lock`` and async variants) is answered too: see ``prefect.py``.
* Each acquisition gets a ``fence`` that is larger than every earlier fence of that key,
  even across restarts of the lock server; storage writes it into the manifest.
"""

from __future__ import annotations

import datetime
import functools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from notebook_flow import _identity
from notebook_flow._identity import parse_holder
from notebook_flow.errors import LockTimeout

from .prefect import PrefectNames

__all__ = [
    "Acquisition",
    "Attempt",
    "BackoffAcquire",
    "LockInfo",
    "LockManager",
    "acquire_with_backoff",
    "describe_holder",
    "holder_process_dead",
    "pid_scope",
    "wait_until_released",
]


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock, since when and until when (epoch seconds), with its fence.

    >>> info = LockInfo("k", "h:1:0:2:run", 10.0, 40.0, "memory:x", 3)
    >>> info.fence
    3
    """

    key: str
    holder: str
    acquired_at: float
    lease_expires: float
    manager: str
    fence: int

    def expires_in(self, now: float | None = None) -> float:
        """Seconds until the lease runs out (negative once it has)."""
        return self.lease_expires - (time.time() if now is None else now)


@dataclass(frozen=True)
class Acquisition:
    """The outcome of ``acquire_info``: our lock, how long we waited and whom we replaced.

    ``recovered`` is the record of a dead or expired holder whose lock was taken over
    (None when the key was free; Redis forgets an expired record, so it reports only the
    dead holders it detected itself). ``tried_at`` is the ``time.monotonic()`` at which
    the successful try began: the lease cannot have started before it, so a holder's
    local deadline is ``tried_at + lease``.
    """

    info: LockInfo
    waited: float
    recovered: LockInfo | None = None
    tried_at: float = 0.0


@dataclass(frozen=True)
class Attempt:
    """One try at a lock: ``acquired`` is ours on success; ``other`` is the previous
    (recovered) holder on success, or the current holder on failure (None if unknown)."""

    acquired: LockInfo | None
    other: LockInfo | None = None


@runtime_checkable
class LockManager(Protocol):
    """Mutual exclusion per key across threads, processes and machines, with leases.

    >>> from notebook_flow.locks import MemoryLockManager
    >>> m = MemoryLockManager()
    >>> m.acquire("k", "me", timeout=0, lease=5.0)
    True
    >>> m.holder_of("k").holder
    'me'
    >>> m.release("k", "me")
    """

    def acquire(
        self, key: str, holder: str, *, timeout: float | None = None, lease: float = 30.0
    ) -> bool:
        """Take the lock; see the module docstring for ``timeout`` semantics."""
        ...

    def acquire_info(
        self, key: str, holder: str, *, timeout: float | None = None, lease: float = 30.0
    ) -> Acquisition | None:
        """Like ``acquire`` but says what happened (None: ``timeout=0`` and held)."""
        ...

    def release(self, key: str, holder: str) -> None:
        """Give the lock back; ``LockError`` if ``holder`` does not hold it."""
        ...

    def renew(self, key: str, holder: str, lease: float) -> bool:
        """Extend the lease to ``lease`` seconds from now; False when it was lost."""
        ...

    def is_locked(self, key: str) -> bool:
        """True while a live holder holds ``key``."""
        ...

    def holder_of(self, key: str) -> LockInfo | None:
        """The live holder's record, or None."""
        ...

    def break_lock(self, key: str) -> bool:
        """Remove the lock whoever holds it (an operator's tool); True if there was one."""
        ...

    def list_locks(self) -> list[LockInfo]:
        """Every lock currently held by a live holder."""
        ...

    def wait_for_release(self, key: str, timeout: float | None = None) -> bool:
        """Block until ``key`` is free; False if ``timeout`` passed first."""
        ...


# -- holder liveness --------------------------------------------------------------------------


@functools.cache
def pid_scope() -> str:
    """Where a pid names the same process as it does for us: this boot of this machine
    and this pid namespace.

    A host name alone is not enough: containers may share one, and a machine reboots with
    the same name, so a holder's pid is checked only when its record carries our scope.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:  # not Linux: the host name is the best we have
        boot = _identity.process().host
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{boot}/{namespace}"


def holder_process_dead(record: dict[str, Any]) -> bool:
    """True when a holder record (``host``, ``scope``, ``pid``, ``start_time``) names a
    process that we can see is gone; False when it runs or lies beyond our sight."""
    pid = record.get("pid")
    if (
        not isinstance(pid, int)
        or record.get("host") != _identity.process().host
        or record.get("scope") != pid_scope()
    ):
        return False
    start = record.get("start_time")
    return not _identity.pid_alive(pid, start if isinstance(start, int) else None)


# -- waiting -----------------------------------------------------------------------------------

#: First pause after a failed try, growth factor and ceiling. The ceiling bounds how late a
#: waiter notices a release it was not told about (every manager but memory polls).
BACKOFF_START = 0.002
BACKOFF_FACTOR = 1.7
BACKOFF_MAX = 0.1


def _pause(delay: float, holder: LockInfo | None, remaining: float | None) -> float:
    """How long to sleep: jittered ``delay``, not past the holder's lease or our deadline."""
    pause = delay * random.uniform(0.5, 1.0)  # jitter: waiters must not poll in lockstep
    if holder is not None and holder.expires_in() > 0:  # wake when its lease runs out
        pause = min(pause, holder.expires_in() + 0.005)
    if remaining is not None:
        pause = min(pause, remaining)
    return max(pause, 0.0)


def acquire_with_backoff(
    try_once: Callable[[], Attempt],
    *,
    key: str,
    timeout: float | None,
    manager: str,
    sleep: Callable[[float], object] = time.sleep,
    backoff_max: float = BACKOFF_MAX,
) -> Acquisition | None:
    """Call ``try_once`` until it succeeds, with jittered exponential backoff.

    Returns None only for ``timeout=0``; a positive timeout raises ``LockTimeout``.
    ``sleep`` lets a manager wake early on a release (memory uses a condition variable).
    """
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be None or >= 0, not {timeout!r}")
    start = time.monotonic()
    delay = BACKOFF_START
    tries = 0
    while True:
        tried_at = time.monotonic()
        attempt = try_once()
        tries += 1
        if attempt.acquired is not None:
            waited = tried_at - start if tries > 1 else 0.0
            return Acquisition(attempt.acquired, waited, attempt.other, tried_at)
        remaining = None if timeout is None else start + timeout - time.monotonic()
        if timeout is not None and remaining is not None and remaining <= 0:
            if timeout == 0:
                return None
            raise LockTimeout(timeout_message(key, attempt.other, timeout, manager))
        sleep(_pause(delay, attempt.other, remaining))
        delay = min(delay * BACKOFF_FACTOR, backoff_max)


class BackoffAcquire(PrefectNames):
    """``acquire``/``acquire_info`` for a manager that can try once without waiting (and
    Prefect's names for all of it, from :class:`~.prefect.PrefectNames`).

    A subclass provides ``_try(key, holder, lease) -> Attempt`` and the ``_label`` it
    names itself by in messages; ``_sleep`` and ``_backoff_max`` tune the waiting (the
    memory manager wakes on a release instead of sleeping out its pause).
    """

    _backoff_max = BACKOFF_MAX

    @property
    def _label(self) -> str:
        raise NotImplementedError

    def _try(self, key: str, holder: str, lease: float) -> Attempt:
        raise NotImplementedError

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def acquire_info(
        self, key: str, holder: str, *, timeout: float | None = None, lease: float = 30.0
    ) -> Acquisition | None:
        """Take the lock and say how: waited seconds, recovered holder, fence."""
        return acquire_with_backoff(
            lambda: self._try(key, holder, lease),
            key=key,
            timeout=timeout,
            manager=self._label,
            sleep=self._sleep,
            backoff_max=self._backoff_max,
        )

    def acquire(
        self, key: str, holder: str, *, timeout: float | None = None, lease: float = 30.0
    ) -> bool:
        """Take the lock (``timeout`` None: wait forever; 0: try once)."""
        return self.acquire_info(key, holder, timeout=timeout, lease=lease) is not None


def wait_until_released(holder_of: Callable[[], LockInfo | None], timeout: float | None) -> bool:
    """Poll ``holder_of`` with backoff until it returns None; False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = BACKOFF_START
    while True:
        info = holder_of()
        if info is None:
            return True
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        time.sleep(_pause(delay, info, remaining))
        delay = min(delay * BACKOFF_FACTOR, BACKOFF_MAX)


# -- messages ----------------------------------------------------------------------------------


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def describe_holder(info: LockInfo, now: float | None = None) -> str:
    """A sentence naming the holder (host, pid, thread, run) and since when.

    >>> info = LockInfo("k", "box:42:0:7:r1", 0.0, 90.0, "memory:x", 1)
    >>> describe_holder(info, now=60.0).split(", since")[0]
    'run r1 on host box, pid 42, thread 7'
    """
    now = time.time() if now is None else now
    parts = parse_holder(info.holder)
    if "raw" in parts:
        who = f"holder {info.holder!r}"
    else:
        run = f"run {parts['run_id']} on " if parts.get("run_id") else ""
        who = f"{run}host {parts['host']}, pid {parts['pid']}, thread {parts['thread']}"
    left = info.lease_expires - now
    lease = f"lease expires in {left:.1f} s" if left >= 0 else f"lease expired {-left:.1f} s ago"
    age = now - info.acquired_at
    return f"{who}, since {_when(info.acquired_at)} ({age:.0f} s ago), {lease} (fence {info.fence})"


def timeout_message(key: str, info: LockInfo | None, timeout: float, manager: str) -> str:
    """What ``LockTimeout`` says: who holds the key, since when, and how to unblock it."""
    held = (
        f"It is held by {describe_holder(info)}."
        if info is not None
        else "Its holder could not be read (it may have just been released)."
    )
    return (
        f"Timed out after {timeout:g} s waiting for lock {key!r} ({manager}). {held} "
        "A dead holder's lock is recovered automatically (dead process on this host at once, "
        "otherwise when its lease expires). If the holder is stuck, break the lock with "
        f"manager.break_lock({key!r}) or `notebook-flow locks --break {key}`, "
        "or wait longer (timeout=None waits forever)."
    )
