"""Prefect 3's lock manager tests (tests/test_locking.py and prefect-redis's
tests/test_locking.py), rewritten as one contract run against our memory, file, Redis and
PostgreSQL managers through Prefect's method names.

Deliberate differences (README, "Coming from Prefect"): a forked child starts with an
empty memory lock table (a lock copied while held would never be released); an
acquisition is a lease with a fence underneath.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_locks_contract import new_key, new_manager

from notebook_flow import task
from notebook_flow.cache_policies import INPUTS
from notebook_flow.errors import LockNotHeldError
from notebook_flow.locks import MemoryLockManager

#: Short holds that expire during a test; waits are generous multiples (loaded machines).
HOLD = 0.3


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


class PrefectProtocolContract:
    kind = ""

    @pytest.fixture
    def manager(self, tmp_path: Path) -> Iterator[Any]:
        manager, cleanup = new_manager(self.kind, tmp_path)
        yield manager
        cleanup()

    def test_acquire_and_release(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key, holder="holder1")
        assert manager.is_locked(key)
        manager.release_lock(key, holder="holder1")
        assert not manager.is_locked(key)

    def test_acquire_is_idempotent(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key, holder="holder1")
        assert manager.acquire_lock(key, holder="holder1")
        assert manager.is_locked(key)
        manager.release_lock(key, holder="holder1")
        assert not manager.is_locked(key)

    def test_hold_timeout_ends_the_hold(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key=key, holder="holder1", hold_timeout=HOLD)
        assert manager.is_locked(key)
        assert wait_until(lambda: not manager.is_locked(key))

    def test_acquire_timeout_returns_false(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key=key, holder="holder1")
        assert not manager.acquire_lock(key=key, holder="holder2", acquire_timeout=0.1)
        assert not manager.acquire_lock(key=key, holder="holder2", acquire_timeout=0)
        manager.release_lock(key=key, holder="holder1")
        assert not manager.is_locked(key=key)

    def test_waits_out_a_holder_that_timed_out(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key=key, holder="holder1", hold_timeout=HOLD)
        assert manager.acquire_lock(key=key, holder="holder2")  # blocks, then takes it
        assert manager.is_lock_holder(key, "holder2")
        manager.release_lock(key=key, holder="holder2")
        assert not manager.is_locked(key=key)

    def test_release_by_another_holder_raises_value_error(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key=key, holder="holder1")
        with pytest.raises(
            ValueError, match=f"No lock held by holder2 for transaction with key {key}"
        ):
            manager.release_lock(key=key, holder="holder2")
        with pytest.raises(LockNotHeldError):
            manager.release_lock(key=key, holder="holder2")
        assert manager.is_lock_holder(key, "holder1")
        manager.release_lock(key=key, holder="holder1")

    def test_releasing_an_expired_or_free_lock_is_a_no_op(self, manager: Any) -> None:
        key = new_key()
        manager.release_lock(key, holder="nobody")  # never taken
        assert manager.acquire_lock(key, holder="holder1", hold_timeout=HOLD)
        assert wait_until(lambda: not manager.is_locked(key))
        manager.release_lock(key, holder="holder1")  # expired: nothing to do
        assert not manager.is_locked(key)

    def test_is_lock_holder(self, manager: Any) -> None:
        key = new_key()
        assert not manager.is_lock_holder(key, holder="holder1")
        assert manager.acquire_lock(key, holder="holder1")
        assert manager.is_lock_holder(key, holder="holder1")
        assert not manager.is_lock_holder(key, holder="holder2")
        manager.release_lock(key, holder="holder1")

    def test_wait_for_lock(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key, holder="holder1", hold_timeout=HOLD)
        assert manager.wait_for_lock(key)
        assert not manager.is_locked(key)

    def test_wait_for_lock_with_timeout(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key, holder="holder1")
        assert not manager.wait_for_lock(key, timeout=0.1)
        assert manager.is_locked(key)
        manager.release_lock(key, holder="holder1")
        assert manager.wait_for_lock(key, timeout=0.1)

    def test_wait_for_a_key_never_locked(self, manager: Any) -> None:
        key = new_key()
        assert not manager.is_locked(key)
        assert manager.wait_for_lock(key)

    def test_async_variants(self, manager: Any) -> None:
        key = new_key()

        async def main() -> None:
            assert await manager.aacquire_lock(key, holder="holder1")
            assert manager.is_locked(key)
            assert not await manager.aacquire_lock(key, holder="holder2", acquire_timeout=0.1)
            assert not await manager.await_for_lock(key, timeout=0.1)
            manager.release_lock(key, holder="holder1")
            assert await manager.await_for_lock(key)
            assert await manager.await_for_lock(new_key())

        asyncio.run(main())
        assert not manager.is_locked(key)

    def test_locking_works_across_threads(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key, holder="holder1")
        got: list[bool] = []

        def take() -> None:
            got.append(manager.acquire_lock(key, holder="holder2"))

        thread = threading.Thread(target=take)
        thread.start()
        manager.release_lock(key, holder="holder1")
        thread.join(30)
        assert got == [True]
        # A Prefect-style lock outlives the thread that took it.
        assert manager.is_lock_holder(key, "holder2")
        manager.release_lock(key, holder="holder2")

    def test_a_pickled_manager_sees_the_same_locks(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key, holder="holder1")
        copy = pickle.loads(pickle.dumps(manager))
        assert copy.is_lock_holder(key, "holder1")
        copy.release_lock(key, "holder1")
        assert not manager.is_locked(key)

    def test_our_leases_and_fences_underneath(self, manager: Any) -> None:
        key = new_key()
        assert manager.acquire_lock(key, holder="holder1", hold_timeout=60)
        info = manager.holder_of(key)
        assert info is not None and info.holder == "holder1" and info.fence > 0
        assert 30 < info.expires_in() <= 61
        manager.release_lock(key, holder="holder1")


class TestMemory(PrefectProtocolContract):
    kind = "memory"

    def test_a_singleton(self) -> None:
        assert MemoryLockManager() is MemoryLockManager()
        assert pickle.loads(pickle.dumps(MemoryLockManager())) is MemoryLockManager()
        named = MemoryLockManager("mine")
        assert named is not MemoryLockManager()
        assert pickle.loads(pickle.dumps(named)).name == "mine"

    def test_unnamed_managers_share_one_table(self) -> None:
        key = new_key()
        assert MemoryLockManager().acquire_lock(key, "holder1")
        assert MemoryLockManager().is_lock_holder(key, "holder1")
        assert not MemoryLockManager("other").is_locked(key)
        MemoryLockManager().release_lock(key, "holder1")

    def test_a_forked_child_starts_empty(self) -> None:
        # Deliberate difference: Prefect's forked child still sees its parent's locks.
        import multiprocessing

        key = new_key()
        manager = MemoryLockManager()
        assert manager.acquire_lock(key, "holder1")
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_report_locked, args=(queue, key))
        child.start()
        child.join(60)
        assert queue.get(timeout=10) is False
        manager.release_lock(key, "holder1")


def _report_locked(queue: Any, key: str) -> None:
    queue.put(MemoryLockManager().is_locked(key))


class TestFile(PrefectProtocolContract):
    kind = "file"


class TestRedis(PrefectProtocolContract):
    kind = "redis"


class TestPostgres(PrefectProtocolContract):
    kind = "postgres"


class DictLockManager:
    """A lock manager written for Prefect: only Prefect's protocol, no leases."""

    def __init__(self) -> None:
        self.locks: dict[str, str] = {}
        self.cond = threading.Condition()
        self.calls: list[str] = []

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        self.calls.append("acquire_lock")
        with self.cond:
            ok = self.cond.wait_for(
                lambda: self.locks.get(key, holder) == holder, timeout=acquire_timeout
            )
            if ok:
                self.locks[key] = holder
            return ok

    def release_lock(self, key: str, holder: str) -> None:
        self.calls.append("release_lock")
        with self.cond:
            if self.locks.get(key) != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            del self.locks[key]
            self.cond.notify_all()

    def is_locked(self, key: str) -> bool:
        return key in self.locks

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self.locks.get(key) == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: key not in self.locks, timeout=timeout)


def test_a_prefect_style_lock_manager_plugs_in_unchanged() -> None:
    theirs = DictLockManager()
    seen: list[bool] = []
    done = threading.Event()
    runs: list[int] = []

    @task(cache_policy=INPUTS.configure(lock_manager=theirs))
    def charge(amount: int) -> int:
        seen.append(theirs.is_locked(charge.cache_key(amount)))
        runs.append(amount)
        done.wait(0.2)
        return amount

    threads = [threading.Thread(target=charge, args=(5,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert runs == [5]  # exactly once: the others waited, then found the result
    assert seen == [True]
    assert not theirs.locks
    assert "acquire_lock" in theirs.calls and "release_lock" in theirs.calls
