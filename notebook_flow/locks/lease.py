"""Holding a lock while work runs: acquire, renew from a heartbeat, fence, release.

``hold(manager, key, holder)`` is what the task layer uses around "re-check the store,
run, commit"::

    with hold(manager, key, holder_id(run_id), lease=30, on_event=record) as lease:
        ...                                   # run the body
        store.commit(..., before_manifest=lease.check, fence=lease.fence)

A daemon thread renews the lease every ``lease / 3`` seconds. ``check()`` is the fencing
point: it renews once more (so a lock lost since the last heartbeat, say to a Redis
restart, is noticed there) and raises ``LeaseLostError`` when a renewal was refused
(another holder took over) or the lease ran out by our own clock (we were paused, or
renewals kept failing). What it cannot close is a pause between ``check()`` and the
write it guards; the manifest carries the fence for that reason.
The local deadline is counted from the *start* of the successful try or renewal, so it
never outlives the lease the lock manager granted.

Events passed to ``on_event(name, info)`` (``info`` always has ``key``, ``holder``,
``fence`` and ``lease_expires``): ``waited`` (``waited`` seconds), ``recovered``
(``previous_holder``, ``previous_fence``: a dead or expired holder's lock was taken over),
``acquired``, ``renewed``, ``renew_failed`` (``error``), ``lost`` (``reason``) and
``released`` (``held`` seconds). A callback that raises is logged and ignored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from notebook_flow.errors import ConfigurationError, LeaseLostError, LockError, LockTimeout

from .base import Acquisition, LockInfo, LockManager, timeout_message

__all__ = ["Lease", "default_lock_manager_for", "hold"]

logger = logging.getLogger("notebook_flow")

EventCallback = Callable[[str, dict[str, Any]], None]


class Lease:
    """A held lock whose lease a heartbeat thread renews; use through ``hold()``.

    >>> from notebook_flow.locks import MemoryLockManager
    >>> with hold(MemoryLockManager(), "key", "me", lease=5.0) as lease:
    ...     lease.check()                     # raises LeaseLostError once the lease is lost
    ...     lease.fence > 0
    True
    """

    def __init__(
        self,
        manager: LockManager,
        key: str,
        holder: str,
        *,
        lease: float = 30.0,
        on_event: EventCallback | None = None,
    ) -> None:
        if lease <= 0:
            raise ValueError(f"lease must be positive, not {lease!r}")
        self.manager = manager
        self.key = key
        self.holder = holder
        self.lease = float(lease)
        self.on_event = on_event
        self.info: LockInfo | None = None
        self.lost = False
        self.lost_reason = ""
        self.released = False
        self._deadline = 0.0  # time.monotonic() after which our lease may be over
        self._acquired_mono = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = threading.Lock()

    def __repr__(self) -> str:
        state = "lost" if self.lost else "held" if self.info and not self.released else "not held"
        return f"<Lease {self.key!r} {state} fence={self.fence}>"

    @property
    def fence(self) -> int | None:
        """The fence of this acquisition (larger than every earlier one of the key)."""
        return self.info.fence if self.info is not None else None

    def remaining(self) -> float:
        """Seconds left on the lease by our own clock (negative once over)."""
        return self._deadline - time.monotonic()

    # -- events ------------------------------------------------------------------------------

    def _emit(self, event: str, **data: Any) -> None:
        if self.on_event is None:
            return
        left = self._deadline - time.monotonic()
        info: dict[str, Any] = {
            "key": self.key,
            "holder": self.holder,
            "fence": self.fence,
            "lease_expires": time.time() + left if self.info is not None else None,
            **data,
        }
        try:
            self.on_event(event, info)
        except Exception:
            logger.warning("lock event callback failed for %r (%s)", self.key, event, exc_info=True)

    def _mark_lost(self, reason: str) -> None:
        with self._state:
            if self.lost:
                return
            self.lost = True
            self.lost_reason = reason
        self._stop.set()
        logger.warning("lost the lease on lock %r: %s", self.key, reason)
        self._emit("lost", reason=reason)

    # -- acquiring ---------------------------------------------------------------------------

    def _acquire_info(self, timeout: float | None) -> Acquisition | None:
        detailed = getattr(self.manager, "acquire_info", None)
        if detailed is not None:
            result: Acquisition | None = detailed(
                self.key, self.holder, timeout=timeout, lease=self.lease
            )
            return result
        # A duck-typed manager with only ``acquire``: no waited/recovered details.
        start = time.monotonic()
        if not self.manager.acquire(self.key, self.holder, timeout=timeout, lease=self.lease):
            return None
        info = self.manager.holder_of(self.key)
        if info is None:
            raise LockError(f"lock {self.key!r} was acquired but has no holder record")
        return Acquisition(info, 0.0, None, start)

    def acquire(self, timeout: float | None = None) -> Lease:
        """Take the lock (None waits forever) and start the heartbeat; ``LockTimeout``."""
        acquisition = self._acquire_info(timeout)
        if acquisition is None:  # timeout=0 and held
            current = self.manager.holder_of(self.key)
            raise LockTimeout(timeout_message(self.key, current, 0, type(self.manager).__name__))
        self.info = acquisition.info
        self._acquired_mono = time.monotonic()
        self._deadline = acquisition.tried_at + self.lease
        if acquisition.waited > 0:
            self._emit("waited", waited=acquisition.waited)
        if acquisition.recovered is not None:
            old = acquisition.recovered
            logger.info("lock %r: took over from %s (fence %s)", self.key, old.holder, old.fence)
            self._emit(
                "recovered",
                previous_holder=old.holder,
                previous_fence=old.fence,
                previous_lease_expires=old.lease_expires,
            )
        self._emit("acquired", waited=acquisition.waited)
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"notebook_flow-lease-{self.key[:16]}", daemon=True
        )
        self._thread.start()
        return self

    # -- holding -----------------------------------------------------------------------------

    def _renew(self) -> bool | None:
        """Renew once: True renewed, False lost (now marked), None failed (try again)."""
        started = time.monotonic()
        try:
            ok = self.manager.renew(self.key, self.holder, self.lease)
        except Exception as exc:  # a driver or network error: keep trying while we can
            logger.warning("renewing lock %r failed: %s", self.key, exc)
            self._emit("renew_failed", error=str(exc))
            if time.monotonic() >= self._deadline:
                self._mark_lost(f"the lease ran out while renewals failed ({exc})")
                return False
            return None
        if not ok:
            self._mark_lost("the lock manager refused to renew: another holder took over")
            return False
        with self._state:
            self._deadline = max(self._deadline, started + self.lease)
        self._emit("renewed")
        return True

    def _heartbeat(self) -> None:
        interval = self.lease / 3
        wait = interval
        while not self._stop.wait(wait):
            outcome = self._renew()
            if outcome is False or self._stop.is_set():
                return
            wait = interval if outcome else interval / 3

    def check(self, *, confirm: bool = True) -> None:
        """Raise ``LeaseLostError`` unless the lease is still ours (the fencing point).

        By default the lock manager confirms it with a renewal (one round trip), so a lock
        lost since the last heartbeat (a Redis restart, a broken lock) is noticed here and
        the lease is fresh for the commit that follows. ``confirm=False`` checks only what
        the heartbeat saw and our clock.
        """
        if self.info is None or self.released:
            why = "it was released" if self.released else "acquire() was not called"
            raise LockError(f"lock {self.key!r} is not held: {why}")
        if confirm and not self.lost and time.monotonic() < self._deadline:
            self._renew()  # if the manager cannot be reached, our clock decides below
        if not self.lost and time.monotonic() >= self._deadline:
            self._mark_lost(
                f"the lease ({self.lease:g} s) ran out by our clock: the process was paused "
                "or renewals did not get through"
            )
        if self.lost:
            raise LeaseLostError(
                f"lease on lock {self.key!r} (fence {self.fence}) was lost: {self.lost_reason}. "
                "Another holder may have run the same work, so nothing was committed. "
                "If pauses are expected, use a longer lease."
            )

    def release(self) -> None:
        """Stop the heartbeat and give the lock back (a lost lock is left alone)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A renewal stuck on an unresponsive server must not hang the release; if it
            # completes later it sees the stop flag and its result is ignored.
            thread.join(timeout=max(1.0, self.lease))
        if self.info is None or self.lost or self.released:
            return
        try:
            self.manager.release(self.key, self.holder)
        except LockError as exc:
            self._mark_lost(str(exc))
            return
        self.released = True
        self._emit("released", held=time.monotonic() - self._acquired_mono)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@contextlib.contextmanager
def hold(
    manager: LockManager,
    key: str,
    holder: str,
    *,
    lease: float = 30.0,
    timeout: float | None = None,
    on_event: EventCallback | None = None,
) -> Iterator[Lease]:
    """Hold ``key`` for the ``with`` block, renewing its lease; ``LockTimeout`` if busy.

    >>> from notebook_flow.locks import MemoryLockManager
    >>> events = []
    >>> with hold(MemoryLockManager(), "k", "me", on_event=lambda e, i: events.append(e)):
    ...     pass
    >>> events
    ['acquired', 'released']
    """
    held = Lease(manager, key, holder, lease=lease, on_event=on_event).acquire(timeout)
    try:
        yield held
    finally:
        held.release()


def default_lock_manager_for(store: object) -> LockManager:
    """The lock manager a store gets when its policy names none.

    Local stores (a path, ``file://``, or a ``ResultStore`` with ``is_local``) get a
    ``FileLockManager`` in the store's ``locks`` folder; ``memory://`` stores a
    ``MemoryLockManager`` shared by every task of that URL. Remote stores need a lock
    that reaches every machine, so they raise ``ConfigurationError`` naming the choices.

    >>> default_lock_manager_for("/tmp/store")
    FileLockManager('/tmp/store/locks')
    """
    from .file import FileLockManager
    from .memory import MemoryLockManager

    local_dir = getattr(store, "local_dir", None)
    if getattr(store, "is_local", False) and callable(local_dir):
        return FileLockManager(local_dir("locks"))
    if isinstance(store, (str, os.PathLike)):
        url = os.fspath(store)
    else:
        url = str(getattr(store, "url", store))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return FileLockManager(os.path.join(url, "locks"))
    if scheme in ("file", "local"):
        return FileLockManager(os.path.join(rest, "locks"))
    if scheme == "memory":
        return MemoryLockManager(name=url)
    raise ConfigurationError(
        f"the store {url!r} is not local, so file locks beside it would not reach other "
        "machines. Pass a lock manager that does: "
        "INPUTS.configure(lock_manager=RedisLockManager(host=...)) or "
        "PostgresLockManager(dsn), or MemoryLockManager() if only this process runs tasks, "
        "or isolation_level='READ_COMMITTED' to run without locks."
    )
