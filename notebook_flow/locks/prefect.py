"""Prefect's lock manager protocol, both ways.

Every manager here also answers Prefect 3's ``LockManager`` protocol (:class:`PrefectNames`,
a base of ``BackoffAcquire``): ``acquire_lock(key, holder, acquire_timeout=None,
hold_timeout=None)``, ``release_lock``, ``is_locked``, ``is_lock_holder``,
``wait_for_lock`` and the async ``aacquire_lock`` / ``await_for_lock``.

>>> from notebook_flow.locks import MemoryLockManager
>>> m = MemoryLockManager()
>>> m.acquire_lock("k", holder="me", hold_timeout=60)
True
>>> m.is_lock_holder("k", "me")
True
>>> m.release_lock("k", holder="me")

Semantics, as Prefect's: ``acquire_timeout`` None waits forever, a timeout returns False
(ours raises ``LockTimeout``); ``hold_timeout`` None holds until released (a lease of
:data:`HOLD_FOREVER`; a dead holder is still recovered by pid on its host, or by the
lease elsewhere); releasing a lock nobody holds (its hold timed out) is a no-op, and one
another holder holds raises ``LockNotHeldError`` (a ``ValueError``). Underneath, the
same leases and fences as our own names.

The other way, :func:`as_lock_manager` wraps a lock manager written for Prefect (it has
only those methods) so ``INPUTS.configure(lock_manager=theirs)`` works unchanged: it
holds the lock without a hold timeout (Prefect cannot renew one) and has no fences.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from notebook_flow.errors import ConfigurationError, LockError, LockNotHeldError, LockTimeout

if TYPE_CHECKING:  # base.py imports this module (PrefectNames is a base of its classes)
    from .base import Acquisition, LockInfo

__all__ = ["HOLD_FOREVER", "PrefectLockAdapter", "PrefectNames", "as_lock_manager"]

#: The lease of a Prefect-style acquisition without ``hold_timeout`` (ten years).
HOLD_FOREVER = 10 * 365 * 86400.0


def _lease_of(hold_timeout: float | None) -> float:
    if hold_timeout is None:
        return HOLD_FOREVER
    if isinstance(hold_timeout, bool) or not isinstance(hold_timeout, (int, float)):
        raise ConfigurationError(f"hold_timeout must be seconds or None, got {hold_timeout!r}")
    if hold_timeout <= 0:
        raise ConfigurationError(f"hold_timeout must be positive, got {hold_timeout!r}")
    return float(hold_timeout)


class PrefectNames:
    """Prefect's method names over ``acquire``/``release``/``holder_of``/``wait_for_release``."""

    def acquire(
        self, key: str, holder: str, *, timeout: float | None = None, lease: float = 30.0
    ) -> bool:
        raise NotImplementedError

    def release(self, key: str, holder: str) -> None:
        raise NotImplementedError

    def holder_of(self, key: str) -> LockInfo | None:
        raise NotImplementedError

    def wait_for_release(self, key: str, timeout: float | None = None) -> bool:
        raise NotImplementedError

    def _acquire_detached(self, key: str, holder: str, timeout: float | None, lease: float) -> bool:
        """A Prefect-style acquisition: held until released or ``lease`` runs out (the
        memory manager overrides it so the lock does not end with the acquiring thread)."""
        return self.acquire(key, holder, timeout=timeout, lease=lease)

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """Take the lock for ``holder``; False when ``acquire_timeout`` passes first."""
        lease = _lease_of(hold_timeout)
        try:
            return self._acquire_detached(key, holder, acquire_timeout, lease)
        except LockTimeout:
            return False

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """:meth:`acquire_lock` without blocking the event loop."""
        return await asyncio.to_thread(
            self.acquire_lock, key, holder, acquire_timeout, hold_timeout
        )

    def release_lock(self, key: str, holder: str) -> None:
        """Release; a no-op when nobody holds the key, ``LockNotHeldError`` when another
        holder does."""
        try:
            self.release(key, holder)
        except LockError as exc:
            info = self.holder_of(key)
            if info is None:
                return  # expired or never taken: nothing to release (as Prefect)
            if info.holder == holder:
                raise  # ours, but the manager failed: say why
            raise LockNotHeldError(
                f"No lock held by {holder} for transaction with key {key} "
                f"(it is held by {info.holder!r})"
            ) from exc

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """True while ``holder`` holds ``key``."""
        info = self.holder_of(key)
        return info is not None and info.holder == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Block until ``key`` is free; False if ``timeout`` passed first."""
        return self.wait_for_release(key, timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """:meth:`wait_for_lock` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for_release, key, timeout)


class PrefectLockAdapter:
    """Our ``LockManager`` protocol over a manager that speaks only Prefect's."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def __repr__(self) -> str:
        return f"PrefectLockAdapter({self.manager!r})"

    @property
    def _label(self) -> str:
        return f"prefect:{type(self.manager).__name__}"

    def _info(self, key: str, holder: str) -> LockInfo:
        from .base import LockInfo

        now = time.time()
        return LockInfo(key, holder, now, now + HOLD_FOREVER, self._label, 0)

    def acquire_info(
        self, key: str, holder: str, *, timeout: float | None = None, lease: float = 30.0
    ) -> Acquisition | None:
        from .base import Attempt, acquire_with_backoff

        def try_once() -> Attempt:
            if self.manager.acquire_lock(key, holder, acquire_timeout=0):
                return Attempt(self._info(key, holder))
            return Attempt(None)

        return acquire_with_backoff(try_once, key=key, timeout=timeout, manager=self._label)

    def acquire(
        self, key: str, holder: str, *, timeout: float | None = None, lease: float = 30.0
    ) -> bool:
        return self.acquire_info(key, holder, timeout=timeout, lease=lease) is not None

    def release(self, key: str, holder: str) -> None:
        try:
            self.manager.release_lock(key, holder)
        except ValueError as exc:
            raise LockError(str(exc)) from exc

    def renew(self, key: str, holder: str, lease: float) -> bool:
        is_holder = getattr(self.manager, "is_lock_holder", None)
        return bool(is_holder(key, holder)) if is_holder is not None else True

    def is_locked(self, key: str) -> bool:
        return bool(self.manager.is_locked(key))

    def holder_of(self, key: str) -> LockInfo | None:
        return self._info(key, "(unknown holder)") if self.is_locked(key) else None

    def break_lock(self, key: str) -> bool:
        raise LockError(f"{self.manager!r} (a Prefect lock manager) cannot break locks")

    def list_locks(self) -> list[LockInfo]:
        return []

    def wait_for_release(self, key: str, timeout: float | None = None) -> bool:
        wait = getattr(self.manager, "wait_for_lock", None)
        if wait is not None:
            return bool(wait(key, timeout))
        from .base import wait_until_released

        return wait_until_released(lambda: self.holder_of(key), timeout)


def as_lock_manager(manager: Any) -> Any:
    """``manager`` itself when it speaks our protocol, else a :class:`PrefectLockAdapter`."""
    if all(hasattr(manager, m) for m in ("acquire_info", "release", "renew", "holder_of")):
        return manager
    if all(callable(getattr(manager, m, None)) for m in ("acquire_lock", "release_lock")):
        return PrefectLockAdapter(manager)
    raise ConfigurationError(
        f"{manager!r} is not a lock manager: it needs acquire/release/renew/holder_of "
        "(ours) or acquire_lock/release_lock/is_locked (Prefect's)"
    )
