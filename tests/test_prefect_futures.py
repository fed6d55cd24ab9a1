"""Prefect 3's own tests of direct calls, submit, map, futures, retries, timeouts,
``wait_for`` and ``with_options`` (tests/test_tasks.py and tests/test_futures.py of
PrefectHQ/prefect), rewritten for notebook_flow: the imports changed and the ``@flow``
wrappers removed (no flow is needed here). Where notebook_flow deliberately differs, the
test asserts our behaviour and says so; the README's "Coming from Prefect" lists each.

Orderings and gates, never wall-clock times.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest

from notebook_flow import current_run, task
from notebook_flow.cache_policies import INPUTS, NONE
from notebook_flow.errors import ConfigurationError, TaskTimeoutError, UpstreamFailedError
from notebook_flow.futures import FutureList, TaskFuture, allow_failure, as_completed, unmapped
from notebook_flow.futures import wait as wait_all
from notebook_flow.runners import shutdown
from notebook_flow.states import RunState, State

gates: dict[str, threading.Event] = {}


def gate(name: str) -> threading.Event:
    return gates.setdefault(name, threading.Event())


@pytest.fixture(autouse=True)
def _clean():
    gates.clear()
    yield
    for g in list(gates.values()):
        g.set()
    shutdown(wait=True)


@task(cache_policy=NONE)
def identity(x):
    return x


@task(cache_policy=NONE)
def plus_one(x):
    return x + 1


@task(cache_policy=NONE)
def add_together(x, y):
    return x + y


@task(cache_policy=NONE)
def fails():
    raise ValueError("Fail task!")


@task(cache_policy=NONE)
def blocked(name: str) -> str:
    assert gate(name).wait(30)
    return name


# -- direct calls ---------------------------------------------------------------------------------


class TestTaskCall:
    def test_task_called_with_task_dependency(self):
        assert plus_one(identity(1)) == 2

    def test_task_with_variadic_args(self):
        @task(cache_policy=NONE)
        def star(*xs, bar):
            return xs, bar

        assert star(1, 2, 3, bar=4) == ((1, 2, 3), 4)

    def test_task_with_variadic_keyword_args(self):
        @task(cache_policy=NONE)
        def starstar(a, b, **rest):
            return a, b, rest

        assert starstar(1, 2, x=3, y=4, z=5) == (1, 2, {"x": 3, "y": 4, "z": 5})

    def test_task_doesnt_modify_args(self):
        @task
        def appender(x):
            x.append(3)
            return x

        val = [1, 2]
        assert identity(val) is val and val == [1, 2]
        assert appender(val) is val and val == [1, 2, 3]

    def test_task_failure_raises_the_task_error(self):
        with pytest.raises(ValueError, match="Fail task!"):
            fails()

    def test_direct_call_waits_for_a_future_and_passes_its_value(self):
        # The case: a direct call got the TaskFuture (or UnhashableInputError).
        @task
        def shout(word: str) -> str:
            return word.upper()

        assert shout(identity.submit("x")) == "X"
        assert shout(identity.submit("x")) == "X"  # and the cache key is the value's

    def test_direct_call_resolves_futures_nested_in_collections(self):
        a, b = identity.submit(1), identity.submit(2)
        assert identity([a, (b, {"k": a})]) == [1, (2, {"k": 1})]
        assert identity({a}) == {1}

    def test_direct_call_with_allow_failure_passes_the_exception(self):
        got = identity(allow_failure(fails.submit()))
        assert isinstance(got, ValueError) and "Fail task!" in str(got)

    def test_direct_call_with_a_failed_future_raises_naming_it(self):
        ran = []

        @task(cache_policy=NONE)
        def downstream(x):
            ran.append(x)

        with pytest.raises(UpstreamFailedError, match="fails"):
            downstream(fails.submit())
        assert not ran

    def test_async_direct_call_resolves_futures_without_blocking_the_loop(self):
        @task(cache_policy=NONE)
        async def shout(x):
            return x.upper()

        ticks = []

        async def main():
            fut = blocked.submit("async-gate")
            call = asyncio.ensure_future(shout(fut))
            for _ in range(3):
                await asyncio.sleep(0)
                ticks.append(1)  # the loop runs while the call waits for the future
            assert not call.done()
            gate("async-gate").set()
            return await call

        assert asyncio.run(main()) == "ASYNC-GATE" and len(ticks) == 3


# -- submit and futures ---------------------------------------------------------------------------


class TestTaskSubmit:
    def test_downstream_runs_if_upstream_succeeds(self):
        assert plus_one.submit(identity.submit(1)).result() == 2

    def test_downstream_receives_exception_if_upstream_fails_and_allow_failure(self):
        result = identity.submit(allow_failure(fails.submit())).result()
        assert isinstance(result, ValueError) and "Fail task!" in str(result)

    def test_downstream_receives_exception_in_collection_if_upstream_fails_and_allow_failure(
        self,
    ):
        result = identity.submit(allow_failure([fails.submit(), 1, 2])).result()
        assert isinstance(result, list)
        assert isinstance(result[0], ValueError) and result[1:] == [1, 2]

    def test_downstream_does_not_run_if_upstream_fails(self):
        # Prefect leaves the downstream Pending("NotReady"); here it fails with
        # UpstreamFailedError naming the upstream, and its body never runs.
        ran = []

        @task(cache_policy=NONE)
        def downstream(y):
            ran.append(y)

        fut = downstream.submit(fails.submit())
        with pytest.raises(UpstreamFailedError):
            fut.result()
        assert fut.state.is_failed() and not ran

    def test_allow_failure_chained_mapped_tasks(self):
        @task(cache_policy=NONE)
        def fails_on_two(x):
            if x == 2:
                raise ValueError("Fail task")
            return x

        futures = identity.map(allow_failure(fails_on_two.map([1, 2, 3])))
        assert isinstance(futures, FutureList) and len(futures) == 3
        futures.wait()
        assert futures[0].result() == 1 and futures[2].result() == 3
        assert futures[1].state.is_completed()
        assert isinstance(futures[1].result(), ValueError)

    def test_allow_failure_mapped_with_noniterable_upstream(self):
        @task(cache_policy=NONE)
        def pair(y, z):
            return y, z

        futures = pair.map([1, 2, 3], allow_failure(fails.submit()))
        assert len(futures) == 3
        for i, fut in enumerate(futures):
            y, z = fut.result()
            assert y == i + 1 and isinstance(z, ValueError)

    def test_wait_for_list_changed_after_submit_is_not_a_self_dependency(self):
        # Prefect raises "deadlock" when the list passed as wait_for later holds the run
        # itself; here wait_for is read at submit, so each run waits for the earlier ones.
        queue: list[TaskFuture] = []
        for i in range(3):
            queue.append(identity.submit(f"Person {i}", wait_for=queue))
        assert [f.result(timeout=30) for f in queue] == ["Person 0", "Person 1", "Person 2"]


class TestTaskFutures:
    def test_wait_gets_final_state(self):
        fut = identity.submit(1)
        fut.wait()
        assert fut.state.is_completed() and fut.state.name == "Completed"

    def test_wait_returns_with_timeout_exceeded(self):
        fut = blocked.submit("slow")
        assert fut.wait(0.01) is False  # Prefect returns None; ours says whether it is done
        assert not fut.state.is_completed()
        gate("slow").set()

    def test_wait_returns_final_state_with_timeout_not_exceeded(self):
        fut = identity.submit(1)
        fut.wait(30)
        assert fut.state is not None and fut.state.is_completed()

    def test_result_raises_with_timeout_exceeded(self):
        fut = blocked.submit("slow")
        with pytest.raises(TimeoutError):
            fut.result(timeout=0.01)
        gate("slow").set()

    def test_result_returns_data_with_and_without_timeout(self):
        assert identity.submit(1).result(timeout=30) == 1
        assert identity.submit(1).result() == 1

    def test_result_raises_exception_from_task(self):
        with pytest.raises(ValueError, match="Fail task!"):
            fails.submit().result()

    def test_result_returns_exception_from_task_if_asked(self):
        result = fails.submit().result(raise_on_failure=False)
        assert isinstance(result, ValueError) and str(result) == "Fail task!"

    def test_state_of_a_failed_run_reads_like_prefects(self):
        fut = fails.submit()
        fut.wait()
        state = fut.state
        assert isinstance(state, State) and state.is_failed() and state.is_final()
        assert not state.is_completed() and not state.is_crashed()
        assert state.name == "Failed" and state.type is RunState.FAILED
        with pytest.raises(ValueError):
            state.result()
        assert isinstance(state.result(raise_on_failure=False), ValueError)

    def test_cached_state_is_a_completed_state(self):
        @task(cache_policy=INPUTS)
        def cached(x):
            return x

        cached.submit(5).result()
        fut = cached.submit(5)
        assert fut.result() == 5
        assert fut.state.is_completed() and fut.state.name == "Cached"

    def test_async_tasks_submitted_from_sync_code_return_sync_futures(self):
        data = {"value": 1}

        @task(cache_policy=NONE)
        async def get_data():
            return data

        assert get_data.submit().result() == data


# -- retries --------------------------------------------------------------------------------------


class TestTaskRetries:
    @pytest.mark.parametrize("always_fail", [True, False])
    def test_task_respects_retry_count(self, always_fail):
        calls = []
        exc = ValueError()

        @task(retries=3, cache_policy=NONE)
        def flaky_function():
            calls.append(1)
            if not always_fail and len(calls) == 4:  # 3 retries: 4 attempts
                return True
            raise exc

        fut = flaky_function.submit()
        fut.wait()
        state = fut.state
        if always_fail:
            assert state.is_failed() and state.result(raise_on_failure=False) is exc
        else:
            assert state.is_completed() and state.result() is True
        assert len(calls) == 4

    def test_task_only_uses_necessary_retries(self):
        calls = []

        @task(retries=3, cache_policy=NONE)
        def flaky_function():
            calls.append(1)
            if len(calls) == 2:
                return True
            raise ValueError()

        fut = flaky_function.submit()
        assert fut.result() is True and fut.state.is_completed()
        assert len(calls) == 2

    def test_task_retries_receive_latest_task_run_in_context(self):
        seen = []

        @task(retries=3, cache_policy=NONE)
        def flaky_function():
            run = current_run()
            assert run is not None
            seen.append(run.run_count)
            raise ValueError()

        with pytest.raises(ValueError):
            flaky_function()
        assert seen == [1, 2, 3, 4]

    def test_retry_condition_fn_gets_task_task_run_and_state(self):
        # Prefect's documented shape: state.result() raises the task's exception.
        calls, seen = [], []

        def retry_handler(task, task_run, state) -> bool:
            seen.append((task.fn.__name__, task_run.run_count, type(state).__name__))
            try:
                state.result()
            except ValueError:
                return True  # retry on ValueError only
            except Exception:
                return False
            return False

        @task(retries=3, retry_condition_fn=retry_handler, cache_policy=NONE)
        def flaky(kind: str):
            calls.append(kind)
            if len(calls) < 3:
                raise ValueError("transient")
            raise KeyError("permanent")

        with pytest.raises(KeyError):
            flaky("x")
        assert len(calls) == 3
        assert seen == [("flaky", 1, "State"), ("flaky", 2, "State"), ("flaky", 3, "State")]

    def test_retry_condition_fn_that_raises_stops_retrying(self):
        calls = []

        @task(retries=3, retry_condition_fn=lambda *_: 1 / 0, cache_policy=NONE)
        def flaky():
            calls.append(1)
            raise ValueError()

        with pytest.raises(ValueError):
            flaky()
        assert calls == [1]

    def test_retry_condition_fn_must_be_callable(self):
        with pytest.raises(ConfigurationError, match="retry_condition_fn"):
            task(retry_condition_fn="nope")(lambda: None)  # type: ignore[arg-type]


class TestTaskConstructorValidation:
    def test_task_cannot_configure_poorly_typed_retry_delay(self):
        # Prefect raises TypeError("Invalid ..."); ours is a ConfigurationTypeError (a
        # ConfigurationError and a TypeError) that names what was given and what is accepted.
        with pytest.raises(TypeError, match=r"retry_delay_seconds=\{'x': 4\} is not accepted"):

            @task(retries=42, retry_delay_seconds={"x": 4})  # type: ignore[arg-type]
            async def insanity():
                raise RuntimeError("try again!")

        @task(retries=42, retry_delay_seconds=2)
        async def sanity():
            raise RuntimeError("try again!")

        with pytest.raises(ConfigurationError, match="retry_delay_seconds="):
            sanity.with_options(retry_delay_seconds={"x": 4})
        for bad in ("5", [1, "2"], True, lambda n: "soon"):
            with pytest.raises(ConfigurationError, match="retry_delay_seconds"):
                task(retries=1, retry_delay_seconds=bad)(lambda: None)  # type: ignore[arg-type]

    def test_task_cannot_configure_negative_relative_jitter(self):
        with pytest.raises(ValueError, match="retry_jitter_factor=-10 is not accepted"):

            @task(retries=42, retry_delay_seconds=100, retry_jitter_factor=-10)
            async def insanity():
                raise RuntimeError("try again!")

    def test_task_accepts_fractional_retry_delay_seconds(self):
        @task(retries=2, retry_delay_seconds=1.5)
        def with_float_delay():
            return "success"

        @task(retries=3, retry_delay_seconds=[0.5, 1.1, 2.7])
        def with_float_list_delay():
            return "success"

        assert with_float_delay.retries == 2 and with_float_delay.retry_delay_seconds == 1.5
        assert with_float_list_delay.retries == 3
        assert with_float_list_delay.retry_delay_seconds == [0.5, 1.1, 2.7]

    def test_retry_delay_seconds_none_means_no_delay(self):
        @task(retries=1, retry_delay_seconds=None, cache_policy=NONE)
        def once():
            return 1

        assert once() == 1


# -- timeouts -------------------------------------------------------------------------------------


class TestTaskTimeouts:
    def test_task_timeouts_actually_timeout_and_are_not_crashes(self):
        @task(timeout_seconds=0.1, cache_policy=NONE)
        def stuck():
            gate("stuck").wait(30)

        fut = stuck.submit()
        fut.wait()
        # Prefect names the state "TimedOut"; ours is "Failed" with a TaskTimeoutError.
        assert fut.state.is_failed() and not fut.state.is_crashed()
        assert isinstance(fut.exception(), TaskTimeoutError)
        assert isinstance(fut.exception(), TimeoutError)
        gate("stuck").set()

    def test_task_timeouts_do_not_timeout_prematurely(self):
        @task(timeout_seconds=100, cache_policy=NONE)
        def quick():
            return 42

        fut = quick.submit()
        assert fut.result() == 42 and fut.state.is_completed()


# -- wait_for -------------------------------------------------------------------------------------


class TestTaskWaitFor:
    def test_downstream_runs_if_upstream_succeeds(self):
        f = identity(1)
        assert identity(2, wait_for=[f]) == 2
        assert identity(2, wait_for=[identity.submit(1)]) == 2

    def test_downstream_does_not_run_if_upstream_fails(self):
        # Prefect returns a Pending("NotReady") state; here the call raises.
        ran = []

        @task(cache_policy=NONE)
        def bar(y):
            ran.append(y)
            return y

        with pytest.raises(UpstreamFailedError):
            bar(2, wait_for=[fails.submit()])
        assert not ran

    def test_downstream_runs_if_upstream_fails_with_allow_failure_annotation(self):
        assert identity(2, wait_for=[allow_failure(fails.submit())]) == 2

    def test_submitted_run_waits_for_its_wait_for_runs(self):
        a, b = blocked.submit("a"), blocked.submit("b")
        c = identity.submit(3)
        d = identity.submit(c, wait_for=[a, b])
        assert not d.wait(0.05)  # a and b still wait on their gates
        gate("a").set()
        gate("b").set()
        assert d.result(timeout=30) == 3 and a.done() and b.done()

    def test_allow_failure_with_mapped_tasks_in_wait_for(self):
        @task(cache_policy=NONE)
        def add_one(x):
            if x == 2:
                raise ValueError("Something is not right")
            return x + 1

        @task(cache_policy=NONE)
        def cleanup_task():
            return "cleanup done"

        b = add_one.map([1, 2, 3])
        c = plus_one.map(b)
        assert cleanup_task.submit(wait_for=[allow_failure(c)]).result() == "cleanup done"

    def test_return_state_of_direct_calls(self):
        # Prefect: bar(2, wait_for=[failed], return_state=True) is Pending("NotReady");
        # here it is Failed with the UpstreamFailedError.
        state = identity(2, wait_for=[fails.submit()], return_state=True)
        assert state.is_failed()
        assert isinstance(state.result(raise_on_failure=False), UpstreamFailedError)
        state = identity(2, wait_for=[allow_failure(fails.submit())], return_state=True)
        assert state.is_completed() and state.result() == 2
        failed = fails(return_state=True)
        assert failed.is_failed() and isinstance(failed.result(raise_on_failure=False), ValueError)

        @task(cache_policy=INPUTS)
        def cached(x):
            return x

        assert cached(1, return_state=True).name == "Completed"
        assert cached(1, return_state=True).name == "Cached"

        @task(cache_policy=NONE)
        async def aplus(x):
            return x + 1

        assert asyncio.run(aplus(1, return_state=True)).result() == 2

    def test_a_parameter_named_wait_for_is_passed_to_the_function(self):
        # Prefect reserves the name (ReservedArgumentError at definition). Here a direct
        # call passes it to a function that declares it; submit() still takes it.
        @task(cache_policy=NONE)
        def foo(wait_for):
            return wait_for

        assert foo(wait_for=3) == 3


# -- with_options ---------------------------------------------------------------------------------


class TestTaskWithOptions:
    def test_with_options_allows_override_of_task_settings(self):
        @task(
            name="Initial task",
            tags=["tag1", "tag2"],
            cache_expiration=timedelta(days=1),
            retries=2,
            retry_delay_seconds=5,
            persist_result=True,
            result_serializer="pickle",
            timeout_seconds=None,
            refresh_cache=False,
        )
        def initial_task():
            pass

        copied = initial_task.with_options(
            name="Copied task",
            tags=["tag3", "tag4"],
            cache_expiration=timedelta(days=2),
            retries=5,
            retry_delay_seconds=10,
            persist_result=False,
            result_serializer="json",
            timeout_seconds=42,
            refresh_cache=True,
        )
        assert copied.name == "Copied task"
        assert set(copied.tags) == {"tag3", "tag4"}
        assert copied.cache_expiration == timedelta(days=2)
        assert copied.retries == 5 and copied.retry_delay_seconds == 10
        assert copied.persist_result is False and copied.result_serializer == "json"
        assert copied.timeout_seconds == 42 and copied.refresh_cache is True
        assert initial_task.retries == 2 and initial_task.name == "Initial task"

    def test_with_options_uses_existing_settings_when_no_override(self):
        @task(
            name="Initial task",
            tags=["tag1"],
            cache_expiration=timedelta(days=1),
            retries=2,
            retry_delay_seconds=5,
            result_serializer="pickle",
            timeout_seconds=3,
            refresh_cache=True,
        )
        def initial_task():
            pass

        same = initial_task.with_options()
        assert same is not initial_task
        for name in (
            "name",
            "tags",
            "cache_expiration",
            "retries",
            "retry_delay_seconds",
            "result_serializer",
            "timeout_seconds",
            "refresh_cache",
            "cache_policy",
        ):
            assert getattr(same, name) == getattr(initial_task, name), name

    def test_with_options_allows_override_of_0_retries(self):
        @task(retries=3, retry_delay_seconds=10)
        def initial_task():
            pass

        zero = initial_task.with_options(retries=0, retry_delay_seconds=0)
        assert zero.retries == 0 and zero.retry_delay_seconds == 0

    def test_with_options_refresh_cache(self):
        calls = []

        @task(cache_policy=INPUTS)
        def counted(x):
            calls.append(x)
            return len(calls)

        assert counted(1) == 1 and counted(1) == 1
        assert counted.with_options(refresh_cache=True)(1) == 2
        assert counted(1) == 2  # the refreshed result is what the cache holds now


# -- map ------------------------------------------------------------------------------------------


class TestTaskMap:
    def test_simple_map(self):
        futures = plus_one.map([1, 2, 3])
        assert all(isinstance(f, TaskFuture) for f in futures)
        assert [f.result() for f in futures] == [2, 3, 4]

    def test_async_task_map(self):
        @task(cache_policy=NONE)
        async def aplus(x):
            return x + 1

        assert aplus.map([1, 2, 3]).result() == [2, 3, 4]

    def test_map_can_take_tuple_and_generator_as_input(self):
        assert plus_one.map((1, 2, 3)).result() == [2, 3, 4]
        assert plus_one.map(i for i in (1, 2, 3)).result() == [2, 3, 4]

    def test_map_can_take_future_as_input(self):
        @task(cache_policy=NONE)
        def some_numbers():
            return [1, 2, 3]

        assert plus_one.map(some_numbers.submit()).result() == [2, 3, 4]

    def test_map_of_a_failed_future_raises(self):
        with pytest.raises(UpstreamFailedError):
            plus_one.map(fails.submit())

    def test_map_of_allow_failure_of_a_list_of_futures(self):
        futures = identity.map(allow_failure([identity.submit(1), fails.submit()]))
        first, second = futures.result()
        assert first == 1 and isinstance(second, ValueError)

    @pytest.mark.parametrize("explicit", [True, False])
    def test_unmapped_int_and_str(self, explicit):
        other = unmapped(5) if explicit else 5
        assert add_together.map([1, 2, 3], other).result() == [6, 7, 8]
        text = unmapped("test") if explicit else "test"
        assert add_together.map(["a", "b", "c"], text).result() == ["atest", "btest", "ctest"]

    def test_unmapped_iterable(self):
        others = [4, 5, 6, 7]  # a different length
        assert add_together.map([[], [], []], unmapped(others)).result() == [others] * 3

    def test_with_keyword_defaults(self):
        @task(cache_policy=NONE)
        def add_some(x, y=5):
            return x + y

        @task(cache_policy=NONE)
        def add_sum(x, y=(1, 4)):
            return x + sum(y)

        assert add_some.map([1, 2, 3]).result() == [6, 7, 8]
        assert add_sum.map([1, 2, 3]).result() == [6, 7, 8]

    def test_with_variadic_keywords(self):
        @task(cache_policy=NONE)
        def add_some(x, **kwargs):
            return x + kwargs["y"]

        assert add_some.map([1, 2, 3], y=[4, 5, 6]).result() == [5, 7, 9]
        assert add_some.map([1, 2, 3], y=1).result() == [2, 3, 4]

    def test_wait_mapped_tasks_and_get_results(self):
        futures = plus_one.map([1, 2, 3])
        futures.wait()
        assert all(f.state.is_completed() for f in futures)
        assert futures.result() == [2, 3, 4]


# -- many futures (tests/test_futures.py) ---------------------------------------------------------


class TestFutureList:
    def test_results_with_failure(self):
        futures = FutureList([identity.submit(1), fails.submit(), identity.submit(3)])
        with pytest.raises(ValueError, match="Fail task!"):
            futures.result()

    def test_results_with_raise_on_failure_false(self):
        futures = FutureList([identity.submit(1), fails.submit(), identity.submit(3)])
        one, error, three = futures.result(raise_on_failure=False)
        assert (one, three) == (1, 3) and isinstance(error, ValueError)

    def test_results_with_timeout(self):
        futures = FutureList([identity.submit(1), blocked.submit("list")])
        with pytest.raises(TimeoutError):
            futures.result(timeout=0.01)
        gate("list").set()
        assert futures.result(timeout=30) == [1, "list"]

    def test_result_preserves_order_and_duplicates(self):
        first, second = blocked.submit("first"), identity.submit("second")
        futures = FutureList([first, second, first])
        gate("first").set()
        assert futures.result() == ["first", "second", "first"]


class TestUtilityFunctions:
    def test_wait(self):
        futures = [identity.submit(i) for i in range(3)]
        done, not_done = wait_all(futures)
        assert done == set(futures) and not not_done

    def test_wait_with_timeout(self):
        slow = blocked.submit("wait")
        done, not_done = wait_all([slow, identity.submit(1)], timeout=0.01)
        assert slow in not_done
        gate("wait").set()

    def test_as_completed(self):
        futures = [identity.submit(i) for i in range(3)]
        assert sorted(f.result() for f in as_completed(futures)) == [0, 1, 2]

    def test_as_completed_with_timeout(self):
        slow = blocked.submit("asc")
        with pytest.raises(TimeoutError):
            list(as_completed([slow, identity.submit(1)], timeout=0.01))
        gate("asc").set()

    def test_as_completed_yields_in_completion_order(self):
        first, second = blocked.submit("one"), blocked.submit("two")
        order = []
        it = as_completed([first, second], timeout=30)
        gate("two").set()
        order.append(next(it).result())
        gate("one").set()
        order.append(next(it).result())
        assert order == ["two", "one"]
