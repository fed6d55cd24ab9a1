"""Prefect 3's task tests for caching, result persistence, hooks and transactions
(tests/test_tasks.py: TestResultPersistence, TestTaskCaching, TestCacheFunctionBuiltins,
TestTaskHooks*, TestCachePolicies, TestTransactions), rewritten for notebook_flow with
flows removed: a task is called directly, and the state a completion hook receives says
"Completed" or "Cached" where Prefect's tests read ``return_state=True``.

Deliberate differences are asserted as ours and cite the README's "Coming from Prefect":
results persist by default; an unhashable input is an error naming the fixes; a bad hook
option is a ``ConfigurationError``; keys are namespaced per task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import notebook_flow as nf
from notebook_flow import task
from notebook_flow.cache_policies import DEFAULT, INPUTS, NO_CACHE, NONE, TASK_SOURCE
from notebook_flow.errors import ConfigurationError, UnhashableInputError
from notebook_flow.locks import FileLockManager, MemoryLockManager
from notebook_flow.tasks import task_input_hash
from notebook_flow.transactions import (
    IsolationLevel,
    Transaction,
    get_transaction,
    transaction,
)


class Runs(list):
    """Counts executions; opts out of task keys (tasks key on the globals they read)."""

    def __notebook_flow_fingerprint__(self) -> str:
        return "prefect-runs"


runs = Runs()


@pytest.fixture(autouse=True)
def _fresh() -> None:
    runs.clear()


def states_of(t: Any) -> list[str]:
    """Attach a completion hook that collects the state names of ``t``'s runs."""
    names: list[str] = []
    t.on_completion(lambda task, task_run, state: names.append(state.name))
    return names


class TestResultPersistence:
    @pytest.mark.parametrize("persist", [True, False])
    def test_persist_result_is_kept(self, persist: bool) -> None:
        @task(persist_result=persist)
        def my_task() -> None:
            pass

        @task
        def base() -> None:
            pass

        assert my_task.persist_result is persist
        assert base.with_options(persist_result=persist).persist_result is persist

    def test_results_persist_by_default(self) -> None:
        # Deliberate difference: Prefect persists only when asked (or a policy implies it).
        @task
        def base() -> None:
            pass

        assert base.persist_result is True
        assert base.cache_policy is DEFAULT

    def test_result_storage_accepts_a_path(self, tmp_path: Path) -> None:
        @task(result_storage=tmp_path / "results")
        def add(x: int) -> int:
            return x + 1

        assert add(1) == 2
        assert list((tmp_path / "results" / "manifests").rglob("*.json"))
        other = add.with_options(result_storage=tmp_path / "other")
        assert other(2) == 3
        assert list((tmp_path / "other" / "manifests").rglob("*.json"))

    def test_an_unserializable_result_warns_and_is_returned(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        @task(result_serializer="json")
        def my_task() -> Any:
            runs.append(1)
            return lambda: 1

        with caplog.at_level(logging.WARNING, logger="notebook_flow"):
            value = my_task()
        assert callable(value) and value() == 1
        record = next(r for r in caplog.records if "cannot be stored" in r.getMessage())
        assert record.levelname == "WARNING"
        my_task()
        assert runs == [1, 1]  # not cached


class TestTaskCaching:
    def test_a_repeated_call_is_cached(self) -> None:
        @task
        def foo(x: int) -> int:
            runs.append(x)
            return x

        names = states_of(foo)
        assert foo(1) == foo(1) == 1
        assert names == ["Completed", "Cached"]
        assert runs == [1]

    def test_misses_are_not_cached(self) -> None:
        @task
        def foo(x: int) -> int:
            return x

        names = states_of(foo)
        foo(1), foo(2)
        assert names == ["Completed", "Completed"]

    def test_cache_key_fn_receives_the_context(self) -> None:
        seen: list[Any] = []

        def key(context: Any, parameters: dict[str, Any]) -> str:
            seen.append((context.task, dict(parameters), context.parameters))
            return "same-for-all"

        @task(cache_key_fn=key)
        def foo(x: str) -> str:
            return x

        assert foo("something") == "something"
        assert foo("different") == "something"  # the key fn said: the same
        assert seen[0][0] is foo
        assert seen[0][1] == seen[0][2] == {"x": "something"}

    def test_future_expiration_hits_and_past_expiration_misses(self) -> None:
        @task(cache_key_fn=lambda *_: "expiring", cache_expiration=timedelta(seconds=60))
        def keeps(x: int) -> int:
            return x

        assert keeps(1) == 1 and keeps(2) == 1

        @task(cache_key_fn=lambda *_: "expired", cache_expiration=0.01)
        def drops(x: int) -> int:
            return x

        assert drops(1) == 1
        threading.Event().wait(0.05)
        assert drops(2) == 2

    def test_refresh_cache_misses(self) -> None:
        @task(cache_key_fn=lambda *_: "refresh")
        def foo(x: int) -> int:
            return x

        assert foo(1) == 1
        assert foo.with_options(refresh_cache=True)(2) == 2
        assert foo(3) == 2  # the refreshed value is the cached one now

    def test_the_refresh_cache_setting(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Prefect's PREFECT_TASKS_REFRESH_CACHE is NOTEBOOK_FLOW_REFRESH_CACHE here.
        @task(cache_key_fn=lambda *_: "setting")
        def foo(x: int) -> int:
            return x

        @task(cache_key_fn=lambda *_: "setting-pinned", refresh_cache=False)
        def pinned(x: int) -> int:
            return x

        assert foo(1) == 1 and pinned(1) == 1
        nf.configure(refresh_cache=True)
        try:
            assert foo(2) == 2
            assert pinned(2) == 1  # the task's own refresh_cache=False wins
        finally:
            nf.configure(refresh_cache=False)
        assert foo(3) == 2

        from notebook_flow import config

        monkeypatch.setenv("NOTEBOOK_FLOW_REFRESH_CACHE", "1")
        config._reset_for_tests()
        assert config.settings().refresh_cache is True

    def test_cache_key_fn_receives_self_of_a_method(self) -> None:
        class Counter:
            def __init__(self, n: int) -> None:
                self.n = n

            def __notebook_flow_fingerprint__(self) -> int:
                return self.n

            @task(cache_key_fn=lambda ctx, params: str(params["self"].n))
            def add(self, x: int) -> int:
                return self.n + x

        assert Counter(1).add(1) == 2
        assert Counter(1).add(5) == 2  # same n: same key
        assert Counter(2).add(5) == 7

    def test_cache_key_fn_takes_precedence(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING, logger="notebook_flow"):

            @task(cache_key_fn=lambda *_: "precedence", cache_policy=INPUTS)
            def foo(x: int) -> int:
                return x

        assert foo(1) == 1 and foo(2) == 1
        assert "cache_key_fn is used" in caplog.text

    def test_changing_result_storage_key_busts_the_cache(self) -> None:
        @task(cache_key_fn=lambda *_: "storage-key", result_storage_key="before")
        def foo(x: int) -> int:
            return x

        assert foo(1) == 1
        assert foo.with_options(result_storage_key="after")(2) == 2
        assert foo(3) == 1

    def test_result_storage_key_is_formatted_with_the_parameters(self) -> None:
        @task(result_storage_key="report-{parameters[day]}.json")
        def report(day: str, verbose: bool = False) -> str:
            runs.append(day)
            return day

        assert report.cache_policy is None
        report("mon"), report("mon", verbose=True), report("tue")
        assert runs == ["mon", "tue"]
        with pytest.raises(ConfigurationError, match="parameters"):
            report.with_options(result_storage_key="{parameters[nope]}")("mon")

    def test_persist_result_false_means_no_cache(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING, logger="notebook_flow"):

            @task(persist_result=False)
            def foo(x: int) -> int:
                runs.append(x)
                return x

        assert foo.cache_policy == NO_CACHE
        assert "ignoring cache_policy" not in caplog.text
        foo(1), foo(1)
        assert runs == [1, 1]

        with caplog.at_level(logging.WARNING, logger="notebook_flow"):

            @task(persist_result=False, cache_policy=INPUTS)
            def bar(x: int) -> int:
                return x

        assert bar.cache_policy == NO_CACHE
        assert "ignoring cache_policy because persist_result is False" in caplog.text

    @pytest.mark.parametrize("policy", [NO_CACHE, None])
    def test_no_warning_for_persist_false_and_no_policy(
        self, caplog: pytest.LogCaptureFixture, policy: Any
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="notebook_flow"):

            @task(persist_result=False, cache_policy=policy)
            def foo(x: int) -> int:
                return x

        assert foo.cache_policy == policy
        assert "ignoring cache_policy" not in caplog.text

    def test_cache_policy_none_stays_none_and_never_caches(self) -> None:
        @task(cache_policy=None)
        def foo(x: int) -> int:
            runs.append(x)
            return x

        assert foo.cache_policy is None
        foo(1), foo(1)
        assert runs == [1, 1]
        assert foo.cache_key(1) is None

    def test_no_cache_as_default(self) -> None:
        # Prefect's PREFECT_TASKS_DEFAULT_NO_CACHE is NOTEBOOK_FLOW_DEFAULT_NO_CACHE here.
        nf.configure(default_no_cache=True)
        try:

            @task
            def plain(x: int) -> int:
                return x

            @task(cache_policy=DEFAULT)
            def chosen(x: int) -> int:
                return x

            @task(cache_key_fn=lambda *_: "")
            def keyed(x: int) -> int:
                return x

            @task(result_storage_key="foo-bar")
            def stored(x: int) -> int:
                return x

        finally:
            nf.configure(default_no_cache=False)
        assert plain.cache_policy == NO_CACHE
        assert chosen.cache_policy == DEFAULT
        assert keyed.cache_policy != NO_CACHE
        assert stored.cache_policy == NO_CACHE

    def test_the_disable_caching_setting(self) -> None:
        # Prefect's PREFECT_TASKS_DISABLE_CACHING is NOTEBOOK_FLOW_DISABLE_CACHING here.
        @task(cache_key_fn=lambda *_: "disabled")
        def foo(x: int) -> int:
            return x

        nf.configure(disable_caching=True)
        try:
            assert foo(1) == 1 and foo(2) == 2
        finally:
            nf.configure(disable_caching=False)
        assert foo(3) == 3 and foo(4) == 3

    def test_cache_policy_storage_as_a_path(self, tmp_path: Path) -> None:
        @task(cache_policy=INPUTS.configure(key_storage=tmp_path))
        def foo(x: int) -> int:
            return x

        assert foo(1) == 1
        assert list((tmp_path / "manifests").rglob("*.json"))

    @pytest.mark.parametrize("isolation", [None, "SERIALIZABLE", IsolationLevel.SERIALIZABLE])
    def test_cache_policy_with_a_lock_manager(self, tmp_path: Path, isolation: Any) -> None:
        manager = FileLockManager(tmp_path / "locks")

        @task(cache_policy=INPUTS.configure(lock_manager=manager, isolation_level=isolation))
        def foo(x: int) -> int:
            runs.append(x)
            return x

        assert foo.cache_policy.isolation_level == "SERIALIZABLE"
        assert foo(1) == foo(1) == 1
        assert runs == [1]
        assert not manager.is_locked(foo.cache_key(1))

    def test_async_task_with_a_lock_manager(self) -> None:
        @task(cache_policy=INPUTS.configure(lock_manager=MemoryLockManager()))
        async def foo(x: int) -> int:
            runs.append(x)
            return x

        async def main() -> tuple[int, int]:
            return await foo(1), await foo(1)

        assert asyncio.run(main()) == (1, 1)
        assert runs == [1]

    def test_serializable_without_a_manager_uses_the_file_lock(self) -> None:
        # Deliberate difference: SERIALIZABLE needs no lock manager beside a local store.
        @task(cache_policy=INPUTS.configure(isolation_level="SERIALIZABLE"))
        def foo(x: int) -> int:
            return x

        assert foo(1) == 1

    def test_an_unhashable_input_names_the_fixes(self) -> None:
        # Deliberate difference: Prefect logs and runs uncached; we raise with the fixes.
        @task
        def foo(x: int, lock: Any) -> int:
            return x

        with pytest.raises(UnhashableInputError, match="INPUTS - 'lock'") as info:
            foo(1, threading.Lock())
        assert "from_cache_key_fn" in str(info.value)

    def test_unhashable_input_workarounds(self) -> None:
        @task(cache_policy=INPUTS - "lock")
        def by_policy(x: int, lock: Any) -> int:
            runs.append(x)
            return x

        @task(cache_key_fn=lambda ctx, params: str(params["x"]))
        def by_key_fn(x: int, lock: Any) -> int:
            runs.append(x)
            return x

        @task(cache_policy=NONE)
        def uncached(x: int, lock: Any) -> int:
            runs.append(x)
            return x

        for fn in (by_policy, by_key_fn, uncached):
            fn(1, threading.Lock()), fn(1, threading.Lock())
        assert runs == [1, 1, 1, 1]  # the first two hit on their second call


class Widget:
    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Widget) and other.value == self.value


class TestTaskInputHash:
    def test_hits_across_calls_and_misses_on_other_inputs(self) -> None:
        @task(cache_key_fn=task_input_hash)
        def foo(x: Any) -> Any:
            runs.append(x)
            return x

        assert foo(1) == 1 and foo(1) == 1 and foo(2) == 2
        assert runs == [1, 2]

    def test_object_inputs_and_returns(self) -> None:
        @task(cache_key_fn=task_input_hash)
        def wrap(w: Widget) -> Widget:
            runs.append(w.value)
            return Widget(w.value + 1)

        assert wrap(Widget(1)) == Widget(2)
        assert wrap(Widget(1)) == Widget(2)
        assert runs == [1]

    def test_depends_on_the_task_and_its_code(self) -> None:
        def one(x: int) -> int:
            return x

        def two(x: int) -> int:
            return x + 1

        class Ctx:
            def __init__(self, t: Any) -> None:
                self.task = t

        a, b = task(one), task(two)
        assert task_input_hash(Ctx(a), {"x": 1}) == task_input_hash(Ctx(a), {"x": 1})
        assert task_input_hash(Ctx(a), {"x": 1}) != task_input_hash(Ctx(b), {"x": 1})

    def test_unhashable_arguments_give_no_key(self) -> None:
        class Ctx:
            task = None

        assert task_input_hash(Ctx(), {"lock": threading.Lock()}) is None


def make_hook(log: list[Any]) -> Any:
    def hook(task: Any, task_run: Any, state: Any) -> None:
        log.append(())

    return hook


def make_async_hook(log: list[Any]) -> Any:
    async def hook(task: Any, task_run: Any, state: Any) -> None:
        await asyncio.sleep(0)
        log.append(())

    return hook


class TestHooks:
    def test_hooks_with_extra_or_bound_keywords(self) -> None:
        data: dict[str, Any] = {}

        def with_default(task: Any, task_run: Any, state: Any, foo: int = 42) -> None:
            data.update(state=state.name, foo=foo)

        def with_kwargs(task: Any, task_run: Any, state: Any, **kwargs: Any) -> None:
            data.update(kwargs=kwargs)

        @task(on_completion=[with_default, functools.partial(with_kwargs, foo=42)])
        def foo_task() -> None:
            pass

        foo_task()
        assert data == {"state": "Completed", "foo": 42, "kwargs": {"foo": 42}}

    @pytest.mark.parametrize("kind", ["on_completion", "on_failure", "on_commit", "on_rollback"])
    def test_bad_hook_options(self, kind: str) -> None:
        # Deliberate difference: a ConfigurationError (a ValueError), not a TypeError.
        def hook() -> None:
            pass

        with pytest.raises(ConfigurationError, match=f"Expected iterable for '{kind}'"):
            task(**{kind: hook})(lambda: None)
        with pytest.raises(ConfigurationError, match=f"Expected callables in '{kind}'"):
            task(**{kind: ["test"]})(lambda: None)
        with pytest.raises(ConfigurationError, match="got str instead"):
            task(**{kind: [hook, "test"]})(lambda: None)

    def test_completion_hooks_run_in_order_also_when_decorated(self) -> None:
        log: list[str] = []

        @task(on_completion=[lambda t, r, s: log.append("given")])
        def my_task() -> int:
            return 3

        @my_task.on_completion
        def first(task: Any, task_run: Any, state: Any) -> None:
            log.append(f"first:{state.result()}:{task_run.task is task and task_run.run_count}")

        @my_task.on_completion
        def second(task: Any, task_run: Any, state: Any) -> None:
            log.append("second")

        my_task()
        assert log == ["given", "first:3:1", "second"]

    def test_completion_hooks_do_not_run_on_failure(self) -> None:
        log: list[str] = []

        @task(on_completion=[lambda *a: log.append("completed")])
        def my_task() -> None:
            raise ValueError("oops")

        with pytest.raises(ValueError, match="oops"):
            my_task()
        assert log == []

    def test_a_failing_hook_does_not_stop_the_others(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        log: list[str] = []

        def bad(task: Any, task_run: Any, state: Any) -> None:
            raise RuntimeError("hook oops")

        @task(
            on_completion=[lambda *a: log.append("c1"), bad, lambda *a: log.append("c2")],
            on_failure=[lambda *a: log.append("f1"), bad, lambda *a: log.append("f2")],
        )
        def my_task(fail: bool) -> bool:
            if fail:
                raise ValueError("task oops")
            return fail

        assert my_task(False) is False
        with pytest.raises(ValueError):
            my_task(True)
        assert log == ["c1", "c2", "f1", "f2"]
        assert "hook oops" in caplog.text

    @pytest.mark.parametrize(
        "first, second",
        [
            (make_hook, make_hook),
            (make_hook, make_async_hook),
            (make_async_hook, make_hook),
            (make_async_hook, make_async_hook),
        ],
    )
    def test_sync_and_async_hooks(self, first: Any, second: Any) -> None:
        log: list[Any] = []

        @task(on_completion=[first(log), second(log)], on_failure=[first(log), second(log)])
        def my_task(fail: bool) -> None:
            if fail:
                raise ValueError("oops")

        @task(on_completion=[first(log), second(log)])
        async def my_async_task() -> None:
            pass

        my_task(False)
        with pytest.raises(ValueError):
            my_task(True)
        asyncio.run(my_async_task())
        assert log == [()] * 6

    def test_failure_hooks_run_once_after_the_retries(self) -> None:
        log: list[Any] = []

        def failed(task: Any, task_run: Any, state: Any) -> None:
            log.append((task_run.run_count, state.name, state.is_failed()))
            with pytest.raises(ValueError, match="oops"):
                state.result()

        @task(retries=2, on_failure=[failed])
        def my_task() -> None:
            raise ValueError("oops")

        with pytest.raises(ValueError):
            my_task()
        assert log == [(3, "Failed", True)]

    def test_hooks_run_for_submitted_runs(self) -> None:
        log: list[str] = []

        @task(on_completion=[lambda t, r, s: log.append(s.name)])
        def my_task(x: int) -> int:
            return x

        assert my_task.submit(1).result() == 1
        assert log == ["Completed"]


class TestTaskCachePolicies:
    def test_cache_policy_follows_the_options(self) -> None:
        @task(persist_result=False)
        def unpersisted() -> None:
            pass

        @task(persist_result=True)
        def persisted() -> None:
            pass

        @task(result_storage_key="foo", persist_result=True)
        def stored() -> None:
            pass

        @task(cache_policy=TASK_SOURCE, persist_result=True)
        def sourced() -> None:
            pass

        assert unpersisted.cache_policy is NO_CACHE
        assert persisted.cache_policy is DEFAULT
        assert stored.cache_policy is None and stored.result_storage_key == "foo"
        assert sourced.cache_policy is TASK_SOURCE

    def test_tags_are_a_set(self) -> None:
        @task(tags=["a", "b", "a"])
        def tagged() -> None:
            pass

        assert tagged.tags == {"a", "b"}
        assert tagged.with_options(tags={"c"}).tags == {"c"}
        tagged()


class TestTaskTransactions:
    def test_the_commit_hook_runs_on_commit(self) -> None:
        data: dict[str, Any] = {}

        @task
        def my_task() -> None:
            pass

        @my_task.on_commit
        def commit(txn: Transaction) -> None:
            data["txn"] = txn

        my_task()
        assert isinstance(data["txn"], Transaction) and data["txn"].is_committed()

    def test_no_rollback_log_without_user_rollback_hooks(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        @task
        def my_task() -> None:
            pass

        @my_task.on_commit
        def commit(txn: Transaction) -> None:
            raise RuntimeError("oops")

        with caplog.at_level(logging.INFO, logger="notebook_flow"):
            my_task()
        assert "running rollback hook" not in caplog.text

    def test_a_task_in_a_serializable_transaction(self) -> None:
        @task
        def my_task() -> Transaction | None:
            return get_transaction()

        with transaction(isolation_level=IsolationLevel.SERIALIZABLE):
            txn = my_task.with_options(cache_policy=NONE)()
        assert txn is not None
        assert txn.isolation_level is IsolationLevel.SERIALIZABLE
        assert txn.store is not None


def test_cache_result_in_memory_false_keeps_results_out_of_the_hot_cache() -> None:
    from notebook_flow.tasks import _hot

    @task(cache_result_in_memory=False)
    def big(x: int) -> int:
        return x

    @task
    def small(x: int) -> int:
        return x

    assert big(1) == big(1) == 1 and small(1) == small(1) == 1
    assert _hot.get(big._store_cache[1], big.cache_key(1)) is None  # type: ignore[index]
    assert _hot.get(small._store_cache[1], small.cache_key(1)) is not None  # type: ignore[index]
    assert big.with_options(name="big2").cache_result_in_memory is False
