"""TaskFuture, FutureList, wait, as_completed and the argument markers, independent of any
task: futures driven by hand through the same internal transitions a runner uses."""

from __future__ import annotations

import asyncio
import threading
from collections import namedtuple

import pytest

from notebook_flow import task
from notebook_flow.cache_policies import NONE
from notebook_flow.errors import TaskCancelledError, UpstreamFailedError
from notebook_flow.futures import (
    FutureList,
    TaskFuture,
    allow_failure,
    as_completed,
    collect_futures,
    resolve_futures,
    unmapped,
    wait,
)
from notebook_flow.states import RunState


@task(cache_policy=NONE)
def noop():
    return None


class Recorder:
    """A stand-in runner: remembers what was dispatched, never runs anything."""

    def __init__(self):
        self.dispatched: list[TaskFuture] = []

    def _dispatch(self, fut):
        self.dispatched.append(fut)

    def _try_inline(self, fut):
        return False


def make(runner=None, run_id="0" * 32) -> TaskFuture:
    return TaskFuture(noop, run_id, runner)


def complete(fut: TaskFuture, value=None, exc=None, state=None):
    fut._claim()
    if state is None:
        state = RunState.FAILED if exc is not None else RunState.COMPLETED
    assert fut._finish(state, value, exc)


def test_result_exception_and_states():
    fut = make()
    assert fut.run_state is RunState.PENDING and not fut.done()
    assert fut._claim() and fut.run_state is RunState.RUNNING and fut.running()
    assert not fut._claim()  # claimed once only
    fut._finish(RunState.COMPLETED, 42, None)
    assert fut.result() == 42 and fut.exception() is None and fut.done()
    assert not fut._finish(RunState.FAILED, None, ValueError())  # final is final
    bad = make()
    complete(bad, exc=KeyError("k"))
    with pytest.raises(KeyError):
        bad.result()
    assert isinstance(bad.exception(), KeyError)


def test_result_timeout_and_waiters_from_other_threads():
    fut = make()
    with pytest.raises(TimeoutError, match="did not finish"):
        fut.result(timeout=0.01)
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(fut.result(timeout=30))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    complete(fut, "v")
    for t in threads:
        t.join()
    assert got == ["v", "v", "v"]


def test_cancel_pending_only():
    fut = make()
    assert fut.cancel() and fut.cancelled()
    with pytest.raises(TaskCancelledError):
        fut.result()
    done = make()
    complete(done, 1)
    assert done.cancel() is False
    running = make()
    running._claim()
    assert running.cancel() is True and running._cancel_requested and not running.cancelled()


def test_callbacks_in_order_and_errors_contained(caplog):
    fut = make()
    seen = []
    fut.add_done_callback(lambda f: seen.append(1))
    fut.add_done_callback(lambda f: 1 / 0)
    fut.add_done_callback(lambda f: seen.append(2))
    complete(fut)
    assert seen == [1, 2] and "ZeroDivisionError" in caplog.text


def test_dependents_dispatch_after_the_last_upstream():
    runner = Recorder()
    a, b = make(), make()
    down = make(runner)
    assert down._wire((a, b)) is False
    complete(a)
    assert runner.dispatched == []
    complete(b, exc=ValueError("x"))
    assert runner.dispatched == [down]
    ready = make(runner)
    assert ready._wire((a, b)) is True  # all done already: dispatch at once


def test_collect_and_resolve_inside_containers():
    a, b = make(), make()
    complete(a, 1)
    complete(b, exc=ValueError("boom"), state=RunState.FAILED)
    Point = namedtuple("Point", "x y")
    value = {"l": [a, 2], "t": (a,), "s": {3}, "p": Point(a, 0), "plain": [1, 2]}
    found: dict = {}
    collect_futures(value, found)
    assert list(found.values()) == [a]
    resolved = resolve_futures(value)
    assert resolved == {"l": [1, 2], "t": (1,), "s": {3}, "p": Point(1, 0), "plain": [1, 2]}
    assert resolved["plain"] is value["plain"]  # untouched containers are not copied
    with pytest.raises(UpstreamFailedError, match="task `noop`") as info:
        resolve_futures([b])
    assert isinstance(info.value.__cause__, ValueError)
    [exc] = resolve_futures([allow_failure(b)])
    assert isinstance(exc, ValueError)
    assert repr(unmapped(3)) == "unmapped(3)"


def test_wait_and_as_completed():
    futs = [make(run_id=f"{i:032x}") for i in range(3)]
    complete(futs[1], "b")
    done, not_done = wait(futs, timeout=0.01)
    assert done == {futs[1]} and not_done == {futs[0], futs[2]}
    done, _ = wait(futs, return_when="FIRST_COMPLETED")
    assert done == {futs[1]}
    order = []
    it = as_completed(futs, timeout=30)
    order.append(next(it))
    threading.Timer(0.01, complete, (futs[2], "c")).start()
    order.append(next(it))
    complete(futs[0], exc=OSError())
    order.append(next(it))
    assert order == [futs[1], futs[2], futs[0]]
    late = make()
    with pytest.raises(TimeoutError):
        list(as_completed([late], timeout=0.01))
    complete(late, exc=OSError())
    assert wait([late, *futs], return_when="FIRST_EXCEPTION").not_done == set()


def test_future_list_helpers():
    futs = FutureList(make(run_id=f"{i:032x}") for i in range(4))
    complete(futs[0], 0)
    complete(futs[1], 1, state=RunState.CACHED)
    complete(futs[2], exc=ValueError())
    futs[3]._claim()
    assert futs.counts() == {"pending": 0, "running": 1, "completed": 1, "cached": 1, "failed": 1}
    assert (
        repr(futs) == "<FutureList of 4 runs of `noop`: 1 running, 1 completed, 1 cached, 1 failed>"
    )
    assert not futs.done() and futs.wait(timeout=0.01) is False
    futs[3]._finish(RunState.COMPLETED, 3, None)
    with pytest.raises(ValueError):
        futs.result()
    assert FutureList(futs[:2]).result() == [0, 1]


def test_displays_outside_a_kernel_print_the_status(capsys):
    futs = FutureList(make(run_id=f"{i:032x}") for i in range(2))
    complete(futs[0], 0)
    complete(futs[1], exc=ValueError("bad"))
    futs[0]._ipython_display_()
    futs._ipython_display_()
    out = capsys.readouterr().out
    assert "`noop` 00000000 completed" in out
    assert "2/2 done (1 ran, 0 cached, 1 failed)" in out and "ValueError: bad" in out


def test_await_a_future_from_another_thread():
    fut = make()

    async def main():
        threading.Timer(0.01, complete, (fut, "done")).start()
        return await fut

    assert asyncio.run(main()) == "done"
    assert "completed" in repr(fut) and fut.run_id[:8] in repr(fut)
