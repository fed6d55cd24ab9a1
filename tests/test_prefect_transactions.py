"""Prefect 3's transaction tests (tests/test_transactions.py), rewritten for
notebook_flow's :mod:`notebook_flow.transactions`.

Prefect has a separate ``AsyncTransaction`` class; here ``atransaction()`` opens the same
``Transaction`` for ``async with``, so the async variants run through it. Deliberate
differences (README, "Coming from Prefect"): SERIALIZABLE needs no lock manager beside a
local store (the file lock), so it never raises for a missing one; transactions compare by
identity.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from notebook_flow.storage import ResultStore
from notebook_flow.transactions import (
    CommitMode,
    IsolationLevel,
    Transaction,
    TransactionState,
    atransaction,
    get_transaction,
    transaction,
)


def test_a_new_transaction_is_pending() -> None:
    txn = Transaction()
    assert txn.store is None and txn.commit_mode is None
    assert txn.state is TransactionState.PENDING and txn.is_pending()


class TestGetTransaction:
    def test_get_transaction(self) -> None:
        assert get_transaction() is None
        with Transaction() as txn:
            assert get_transaction() is txn
        assert get_transaction() is None

    def test_nested(self) -> None:
        with Transaction(key="outer") as outer:
            assert get_transaction() is outer
            with Transaction(key="inner") as inner:
                assert get_transaction() is inner
            assert get_transaction() is outer
        assert get_transaction() is None

    def test_reset_after_an_error(self) -> None:
        with pytest.raises(ValueError, match="foo"):
            with Transaction() as txn:
                assert get_transaction() is txn
                raise ValueError("foo")
        assert get_transaction() is None

    def test_async(self) -> None:
        async def main() -> None:
            async with atransaction(key="outer") as outer:
                assert get_transaction() is outer
                async with atransaction(key="inner") as inner:
                    assert get_transaction() is inner
                    assert inner.get_parent() is outer
                assert get_transaction() is outer
            assert get_transaction() is None

        asyncio.run(main())


class TestGetParent:
    def test_parents(self) -> None:
        with Transaction(key="outer") as outer:
            assert outer.get_parent() is None
            with Transaction(key="inner") as inner:
                assert inner.get_parent() is outer
            assert outer.get_parent() is None

    def test_get_parent_in_a_rollback_hook_after_success(self) -> None:
        seen: list[Any] = []
        outer = None
        with pytest.raises(ValueError):
            with Transaction() as outer:
                with Transaction(key="inner_with_rollback") as inner:
                    inner.stage(
                        "foo", on_rollback_hooks=[lambda txn: seen.append(txn.get_parent())]
                    )
                with Transaction(key="inner_trouble_maker"):
                    raise ValueError("acting out")
        assert seen == [outer]


class TestCommitMode:
    def test_children_commit_with_the_outermost(self) -> None:
        with Transaction(key="outer") as outer:
            with Transaction(key="inner") as inner:
                pass
            assert not inner.is_committed() and not outer.is_committed()
        assert outer.is_committed() and inner.is_committed()

    def test_eager(self) -> None:
        with Transaction(commit_mode=CommitMode.EAGER) as txn:
            assert txn.is_active() and not txn.is_committed()
        assert txn.is_committed()
        with Transaction(key="outer", commit_mode=CommitMode.EAGER) as outer:
            with Transaction(key="inner") as inner:  # inherits EAGER
                pass
            assert inner.is_committed() and not outer.is_committed()
        assert outer.is_committed()

    def test_no_commit_on_exception_or_rollback(self) -> None:
        with pytest.raises(ValueError, match="foo"):
            with Transaction() as failed:
                raise ValueError("foo")
        assert failed.is_rolled_back() and not failed.is_committed()
        with Transaction() as rolled:
            rolled.rollback()
        assert rolled.is_rolled_back() and not rolled.is_committed()

    def test_an_eager_child_of_a_lazy_parent(self) -> None:
        with Transaction(key="outer", commit_mode=CommitMode.LAZY) as outer:
            with Transaction(key="inner", commit_mode=CommitMode.EAGER) as inner:
                pass
            assert inner.is_committed()
        assert outer.is_committed()

    def test_off(self) -> None:
        with Transaction(commit_mode=CommitMode.OFF) as off:
            pass
        assert off.is_rolled_back()
        with Transaction(commit_mode=CommitMode.OFF) as manual:
            manual.commit()
        assert manual.is_committed() and not manual.is_rolled_back()

    def test_an_error_in_a_commit_hook_rolls_back(self) -> None:
        def bad(txn: Transaction) -> None:
            raise ValueError("foo")

        with Transaction() as txn:
            with Transaction() as child:
                child.stage(None, on_commit_hooks=[bad])
        assert not txn.is_committed() and txn.is_rolled_back()


class TestRollbacks:
    def test_flag(self) -> None:
        with Transaction() as txn:
            assert not txn.is_rolled_back()
            txn.rollback()
            assert txn.is_rolled_back()

    def test_a_rollback_propagates_up(self) -> None:
        with Transaction(key="outer") as outer:
            with Transaction(key="inner") as inner:
                with Transaction(key="nested") as nested:
                    nested.rollback()
                    assert nested.is_rolled_back()
                assert inner.is_rolled_back()
        assert outer.is_rolled_back()


class TestState:
    def test_happy_and_unhappy_lifecycles(self) -> None:
        txn = Transaction()
        assert txn.is_pending()
        with txn:
            assert txn.is_active()
        assert txn.is_committed()

        txn = Transaction()
        with pytest.raises(ValueError, match="foo"):
            with txn:
                assert txn.is_active()
                raise ValueError("foo")
        assert txn.is_rolled_back()

    def test_a_transaction_cannot_be_entered_twice_at_once(self) -> None:
        with Transaction() as txn:
            with pytest.raises(RuntimeError, match="already entered"):
                txn.__enter__()


def test_overwrite_ignores_an_existing_record(isolated_store: Path) -> None:
    with transaction(key="test_overwrite") as first:
        first.stage("done")
    with Transaction(key="test_overwrite") as txn:
        assert txn.is_committed()
        record = txn.read()
        assert record is not None and record.result == "done"
    with Transaction(key="test_overwrite", overwrite=True) as txn:
        assert not txn.is_committed()


def test_a_given_store_is_used(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "elsewhere"))
    with transaction(key="there", store=store) as txn:
        txn.stage({"a": 1})
    assert len(list(store.iter_manifests())) == 1
    with transaction(key="there", store=store) as again:
        assert again.is_committed()


class TestValues:
    def test_get_and_set(self) -> None:
        with transaction(key="test") as txn:
            txn.set("x", 42)
            assert txn.get("x") == 42

    def test_children_see_their_parents_and_override(self) -> None:
        with transaction(key="test") as top:
            top.set("key", 42)
            with transaction(key="nested") as inner:
                assert inner.get("key") == 42
                inner.set("key", "string")
                assert inner.get("key") == "string"
                assert top.get("key") == 42
            assert top.get("key") == 42

    def test_values_are_copies(self) -> None:
        with transaction(key="test") as top:
            top.set("key", {"x": [42]})
            with transaction(key="nested") as inner:
                value = inner.get("key")
                value["x"].append(43)
                inner.set("key", value)
                assert inner.get("key") == {"x": [42, 43]}
                assert top.get("key") == {"x": [42]}

    def test_unknown_names(self) -> None:
        with transaction(key="test") as txn:
            with pytest.raises(ValueError, match="foobar"):
                txn.get("foobar")
            assert txn.get("foobar", None) is None
            assert txn.get("foobar", "string") == "string"

    def test_parent_values_set_after_the_child_opened(self) -> None:
        parent, child = Transaction(), Transaction()
        parent.__enter__()
        child.__enter__()
        try:
            parent.set("key", "value")
            assert child.get("key") == "value"
            parent.set("list", [1, 2, 3])
            child.get("list").append(4)
            assert child.get("list") == [1, 2, 3]
            child.set("list", [1, 2, 3, 4])
            assert child.get("list") == [1, 2, 3, 4]
            assert parent.get("list") == [1, 2, 3]
        finally:
            child.__exit__(None, None, None)
            parent.__exit__(None, None, None)


class TestIsolationLevel:
    def test_default_and_inherited(self) -> None:
        with transaction(key="test") as txn:
            assert txn.isolation_level is IsolationLevel.READ_COMMITTED
        with transaction(key="outer", isolation_level="SERIALIZABLE") as outer:
            with transaction(key="inner") as inner:
                assert inner.isolation_level is IsolationLevel.SERIALIZABLE
            assert outer.isolation_level is IsolationLevel.SERIALIZABLE

    def test_serializable_locks_the_key_with_the_default_manager(
        self, isolated_store: Path
    ) -> None:
        # Deliberate difference: Prefect raises without a lock manager; here the file lock
        # beside the local store is the default.
        from notebook_flow.locks import default_lock_manager_for
        from notebook_flow.transactions import _store_key

        manager = default_lock_manager_for(ResultStore(str(isolated_store)))
        with transaction(key="locked", isolation_level=IsolationLevel.SERIALIZABLE):
            assert manager.is_locked(_store_key("locked"))
        assert not manager.is_locked(_store_key("locked"))

    def test_serializable_transactions_run_one_at_a_time(self) -> None:
        order: list[str] = []

        async def worker(name: str) -> None:
            async with atransaction(key="shared", isolation_level="SERIALIZABLE", overwrite=True):
                order.append(f"{name} in")
                await asyncio.sleep(0.05)
                order.append(f"{name} out")

        import threading

        threads = [threading.Thread(target=asyncio.run, args=(worker(n),)) for n in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])

    def test_bad_isolation_levels_are_refused(self) -> None:
        with pytest.raises(ValueError, match="isolation_level"):
            Transaction(isolation_level="DIRTY")


class TestHooks:
    def test_commit_hooks_sync_and_async(self) -> None:
        seen: list[Any] = []

        async def async_hook(txn: Transaction) -> None:
            await asyncio.sleep(0)
            seen.append(("async", txn))

        with transaction(key="test_on_commit_hook") as txn:
            txn.stage("foo", on_commit_hooks=[lambda t: seen.append(("sync", t)), async_hook])
        assert seen == [("sync", txn), ("async", txn)]

    def test_rollback_hooks_sync_and_async(self) -> None:
        seen: list[Any] = []

        async def async_hook(txn: Transaction) -> None:
            seen.append(("async", txn))

        with pytest.raises(RuntimeError):
            with transaction(key="test_on_rollback_hook") as txn:
                txn.stage("foo", on_rollback_hooks=[lambda t: seen.append(("sync", t)), async_hook])
                raise RuntimeError("I left the stove on!")
        assert seen == [("async", txn), ("sync", txn)]  # last staged, first undone

    def test_hooks_in_an_async_transaction(self) -> None:
        seen: list[str] = []

        async def main() -> None:
            async with atransaction(key="async_hooks") as txn:
                txn.stage("foo", on_commit_hooks=[lambda t: seen.append("commit")])

        asyncio.run(main())
        assert seen == ["commit"]


def test_tasks_inherit_the_transaction_lock_manager() -> None:
    # Prefect: a task's store gets the lock manager of the surrounding transaction.
    from notebook_flow import task
    from notebook_flow.locks import MemoryLockManager

    manager = MemoryLockManager("txn-inherited")

    @task
    def guarded(x: int) -> int:
        return x

    key = guarded.cache_key(1)
    with transaction(isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=manager):
        assert guarded(1) == 1
        assert manager.is_locked(key)  # by the task's call, until the commit
    assert not manager.is_locked(key)
