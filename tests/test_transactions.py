"""transaction(): task results commit together or not at all; hooks; crash safety.

The crash tests SIGKILL a process inside a transaction (NOTEBOOK_FLOW_CRASH_AT) and check
that none of the transaction's results is visible afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from notebook_flow import task
from notebook_flow.locks import FileLockManager
from notebook_flow.storage import ResultStore
from notebook_flow.transactions import (
    CommitMode,
    IsolationLevel,
    Transaction,
    get_transaction,
    transaction,
)

REPO = Path(__file__).resolve().parents[1]


class Log(list):
    """Records calls; opts out of task keys (tasks key on the globals they read)."""

    def __notebook_flow_fingerprint__(self) -> str:
        return "txn-log"


log = Log()


@pytest.fixture(autouse=True)
def _clear_log() -> None:
    log.clear()


def visible_keys(store: Path) -> set[str]:
    """The keys a fresh reader (another process) sees in the store."""
    return {m.key for m in ResultStore(str(store)).iter_manifests()}


@task(on_commit=[lambda txn: log.append(("commit", "double"))])
def double(x: int) -> int:
    log.append(("run", "double", x))
    return 2 * x


@task(on_rollback=[lambda txn: log.append(("rollback", "inc"))])
def inc(x: int) -> int:
    log.append(("run", "inc", x))
    if x < 0:
        raise ValueError("negative")
    return x + 1


def test_results_are_invisible_until_the_transaction_commits(isolated_store: Path) -> None:
    with transaction() as txn:
        assert double(1) == 2
        assert inc(2) == 3
        assert visible_keys(isolated_store) == set()  # staged: payloads only
        assert ("commit", "double") not in log
    assert txn.is_committed()
    assert visible_keys(isolated_store) == {double.cache_key(1), inc.cache_key(2)}
    assert ("commit", "double") in log
    log.clear()
    assert double(1) == 2 and inc(2) == 3  # hits now
    assert log == []


def test_a_failure_rolls_back_the_whole_group(isolated_store: Path) -> None:
    with pytest.raises(ValueError, match="negative"):
        with transaction() as txn:
            double(1)
            inc(2)
            inc(-1)
    assert txn.is_rolled_back()
    assert visible_keys(isolated_store) == set()
    assert ("rollback", "inc") in log  # the inc(2) that had staged a result
    assert ("commit", "double") not in log
    results = isolated_store / "results"
    assert not results.exists() or not [p for p in results.rglob("*") if p.is_file()]
    log.clear()
    assert double(1) == 2
    assert log == [("run", "double", 1), ("commit", "double")]  # computed again


def test_a_failed_task_rolls_back_even_when_its_error_is_caught(isolated_store: Path) -> None:
    # As in Prefect: a task that fails inside a transaction rolls the transaction back.
    with transaction() as txn:
        double(3)
        try:
            inc(-5)
        except ValueError:
            pass
        double(4)  # staged into a rolled-back transaction: discarded at once
    assert txn.is_rolled_back()
    assert visible_keys(isolated_store) == set()


def test_a_commit_hook_error_rolls_back(
    isolated_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    @task
    def fragile(x: int) -> int:
        return x

    @fragile.on_commit
    def boom(txn: Transaction) -> None:
        raise RuntimeError("hook failed")

    with transaction() as txn:
        fragile(1)
    assert txn.is_rolled_back()
    assert visible_keys(isolated_store) == set()
    assert "hook failed" in caplog.text


def test_hooks_receive_the_task_transaction(isolated_store: Path) -> None:
    seen: list[Transaction] = []

    @task(on_commit=[seen.append])
    def plain(x: int) -> Transaction | None:
        return None

    plain(1)  # no surrounding transaction: the call's own commits at its end
    assert len(seen) == 1 and seen[0].is_committed()
    assert seen[0].key == plain.cache_key(1)
    assert visible_keys(isolated_store) == {plain.cache_key(1)}


def test_get_transaction_inside_a_task_and_inherited_isolation(isolated_store: Path) -> None:
    @task
    def which() -> str:
        txn = get_transaction()
        assert txn is not None
        return f"{txn.isolation_level.value}:{txn.get('who')}"

    assert get_transaction() is None
    with transaction(isolation_level=IsolationLevel.SERIALIZABLE) as outer:
        outer.set("who", "outer")
        assert which() == "SERIALIZABLE:outer"
    assert get_transaction() is None


def test_serializable_keeps_the_key_locked_until_commit(isolated_store: Path) -> None:
    manager = FileLockManager(isolated_store.parent / "locks")

    @task(lock_manager=manager)
    def guarded(x: int) -> int:
        return x

    key = guarded.cache_key(5)
    with transaction():
        guarded(5)
        assert manager.is_locked(key)  # held past the call, until the result is published
        assert visible_keys(isolated_store) == set()
    assert not manager.is_locked(key)
    assert visible_keys(isolated_store) == {key}

    with pytest.raises(RuntimeError):
        with transaction():
            guarded(6)
            assert manager.is_locked(guarded.cache_key(6))
            raise RuntimeError("abort")
    assert not manager.is_locked(guarded.cache_key(6))


def test_large_arrays_are_staged_not_committed_in_the_background(isolated_store: Path) -> None:
    @task
    def big(n: int) -> np.ndarray:
        return np.full(n, 7, dtype=np.int64)

    with transaction():
        out = big(2_000_000)  # 16 MB: committed in the background outside a transaction
        assert visible_keys(isolated_store) == set()
    assert visible_keys(isolated_store) == {big.cache_key(2_000_000)}
    assert np.array_equal(out, big(2_000_000))


def test_commit_modes(isolated_store: Path) -> None:
    with transaction(commit_mode=CommitMode.OFF) as off:
        double(10)
    assert off.is_rolled_back()  # nobody committed
    assert visible_keys(isolated_store) == set()

    with transaction(commit_mode=CommitMode.OFF) as manual:
        double(11)
        assert manual.commit()
    assert visible_keys(isolated_store) == {double.cache_key(11)}

    with pytest.raises(ValueError):
        with transaction(commit_mode=CommitMode.LAZY):
            with transaction(commit_mode=CommitMode.EAGER):
                double(12)  # the eager child commits as it ends
            inc(-1)
    assert double.cache_key(12) in visible_keys(isolated_store)


def test_nested_transactions_commit_with_the_outermost(isolated_store: Path) -> None:
    with transaction() as outer:
        with transaction() as inner:
            double(20)
        assert visible_keys(isolated_store) == set()
    assert outer.is_committed() and inner.is_committed()
    assert visible_keys(isolated_store) == {double.cache_key(20)}


def test_a_keyed_transaction_records_its_value(isolated_store: Path) -> None:
    with transaction(key="report-2026-12") as txn:
        assert txn.read() is None
        txn.stage({"rows": 3})
    assert txn.is_committed()
    with transaction(key="report-2026-12") as again:
        assert again.is_committed()  # the record exists: starts out committed
        record = again.read()
        assert record is not None and record.result == {"rows": 3}
    with transaction(key="report-2026-12", overwrite=True) as fresh:
        assert fresh.is_active()
        fresh.stage({"rows": 4})
    record = fresh.read()
    assert record is not None and record.result == {"rows": 4}


def test_get_and_set_values(isolated_store: Path) -> None:
    with transaction() as outer:
        outer.set("x", [1])
        with transaction() as inner:
            assert inner.get("x") == [1]
            inner.set("x", [2])
            assert inner.get("x") == [2]
        assert outer.get("x") == [1]
        with pytest.raises(ValueError, match="unknown key"):
            outer.get("missing")
        assert outer.get("missing", 5) == 5


def test_atransaction_with_async_tasks(isolated_store: Path) -> None:
    import asyncio

    from notebook_flow.transactions import atransaction

    @task
    async def fetch(x: int) -> int:
        return x * 3

    async def main() -> Transaction:
        async with atransaction() as txn:
            assert await fetch(2) == 6
            assert visible_keys(isolated_store) == set()
        return txn

    txn = asyncio.run(main())
    assert txn.is_committed()
    assert visible_keys(isolated_store) == {fetch.cache_key(2)}


# -- crash safety --------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import numpy as np
    from notebook_flow import task
    from notebook_flow.transactions import transaction

    @task(name="crash_small")
    def small(x):
        return [x, x]

    @task(name="crash_big")
    def big(n):
        return np.arange(n)

    with transaction():
        small(1)
        big(300_000)   # a payload file of its own (2.4 MB)
        small(2)
    print("committed", flush=True)
    """
)


@pytest.mark.parametrize("point", ["after_stage", "transaction_commit"])
def test_sigkill_inside_a_transaction_leaves_none_of_its_entries(
    isolated_store: Path, python_env: dict[str, str], point: str
) -> None:
    env = {**python_env, "NOTEBOOK_FLOW_CRASH_AT": point}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "committed" not in done.stdout
    assert visible_keys(isolated_store) == set()
    # What it staged is unreferenced, and collected as such.
    store = ResultStore(str(isolated_store))
    leftovers = store.remove_orphans(older_than=0)
    assert all(rel.startswith("results/") for rel in leftovers)
    if (isolated_store / "results").exists():
        assert not [p for p in (isolated_store / "results").rglob("*") if p.is_file()]

    # The same program, not killed, commits all three.
    rerun_commits_all(env, isolated_store)


def rerun_commits_all(env: dict[str, str], isolated_store: Path) -> None:
    env = {k: v for k, v in env.items() if k != "NOTEBOOK_FLOW_CRASH_AT"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(visible_keys(isolated_store)) == 3
    assert os.path.isdir(isolated_store / "manifests")


def test_a_transaction_reads_its_own_staged_results(isolated_store: Path) -> None:
    manager = FileLockManager(isolated_store.parent / "locks")

    @task(lock_manager=manager, lock_timeout=5)
    def once(x: int) -> int:
        log.append(("run", "once", x))
        return x

    with transaction():
        assert once(1) == 1
        assert once(1) == 1  # staged above: served, not locked again (no self-deadlock)
        assert visible_keys(isolated_store) == set()
    assert log == [("run", "once", 1)]
    assert visible_keys(isolated_store) == {once.cache_key(1)}


def test_a_value_changed_after_the_call_is_not_what_the_cache_keeps(isolated_store: Path) -> None:
    @task
    def rows(n: int) -> list[int]:
        log.append(("run", "rows", n))
        return list(range(n))

    with transaction():
        first = rows(3)
        first.append(99)  # the caller's own copy, changed before the commit
        assert rows(3) == [0, 1, 2]  # the staged result, as computed
    first.append(100)
    assert rows(3) == [0, 1, 2]
    assert rows(3) == [0, 1, 2]
    assert log == [("run", "rows", 3)]


def test_an_async_serializable_task_keeps_its_lock_until_commit(isolated_store: Path) -> None:
    import asyncio

    manager = FileLockManager(isolated_store.parent / "locks")

    @task(lock_manager=manager)
    async def guarded(x: int) -> int:
        return x

    key = guarded.cache_key(3)

    async def main(fail: bool) -> None:
        with transaction():
            assert await guarded(3) == 3
            assert manager.is_locked(key)  # past the call, until published or discarded
            assert visible_keys(isolated_store) == set()
            if fail:
                raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        asyncio.run(main(fail=True))
    assert wait_unlocked(manager, key)
    assert visible_keys(isolated_store) == set()
    asyncio.run(main(fail=False))
    assert wait_unlocked(manager, key)
    assert visible_keys(isolated_store) == {key}


def wait_unlocked(manager: FileLockManager, key: str) -> bool:
    """The holder thread releases just after the commit: give it a moment."""
    return manager.wait_for_release(key, timeout=30)
