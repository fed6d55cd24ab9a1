"""The embedded thread worker: submit, map, dependencies, failures, retries, cancellation,
timeouts, callbacks, limits, shutdown. Orderings and counters, never wall-clock times."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time

import pytest

import notebook_flow as nf
from notebook_flow import config, task
from notebook_flow.cache_policies import INPUTS, NONE
from notebook_flow.errors import TaskCancelledError, TaskTimeoutError, UpstreamFailedError
from notebook_flow.futures import FutureList, TaskFuture, allow_failure, unmapped
from notebook_flow.runners import ThreadRunner, running, set_concurrency_limit, shutdown
from notebook_flow.states import RunState

events: list[tuple] = []
_events_lock = threading.Lock()


def log(*item) -> None:
    with _events_lock:
        events.append(item)


@pytest.fixture(autouse=True)
def _clean():
    events.clear()
    gates.clear()
    yield
    for g in list(gates.values()):
        g.set()
    shutdown(wait=True)


gates: dict[str, threading.Event] = {}


def gate(name: str) -> threading.Event:
    return gates.setdefault(name, threading.Event())


@task(cache_policy=INPUTS)
def square(x):
    log("square", x)
    return x * x


@task(cache_policy=INPUTS)
def add(a, b=0):
    log("add", a, b)
    return a + b


@task(cache_policy=NONE)
def total(values):
    log("total", tuple(values) if isinstance(values, list) else values)
    return sum(values) if isinstance(values, list) else sum(values.values())


@task(cache_policy=NONE)
def boom(x):
    log("boom", x)
    raise ValueError(f"bad {x}")


@task(cache_policy=NONE)
def wait_gate(name, value=None):
    log("start", name)
    assert gate(name).wait(30), "test gate never opened"
    log("end", name)
    return value


def flushed_history(**kw):
    config.get_metadata().flush()
    return nf.history(**kw)


def test_submit_returns_a_future_and_runs_the_call_path():
    fut = square.submit(3)
    assert isinstance(fut, TaskFuture)
    assert fut.result(timeout=30) == 9
    assert fut.run_state is RunState.COMPLETED and fut.done() and fut.key is not None
    again = square.submit(3)
    assert again.result(timeout=30) == 9
    assert again.run_state is RunState.CACHED  # same key → lookup hit, body not run
    assert events == [("square", 3)]
    h = flushed_history(task="square")
    assert set(h["run_id"]) == {fut.run_id, again.run_id}
    assert sorted(h["state"].astype(str)) == ["CACHED", "COMPLETED"]


def test_submitted_runs_are_recorded_pending_first():
    g = gate("pending")
    fut = wait_gate.submit("pending")
    config.get_metadata().flush()
    h = nf.history(task="wait_gate")
    assert list(h["run_id"]) == [fut.run_id]
    assert str(h["state"].iloc[0]) in {"PENDING", "RUNNING"}
    g.set()
    fut.result(timeout=30)
    assert str(flushed_history(task="wait_gate")["state"].iloc[0]) == "COMPLETED"


def test_a_bad_call_raises_in_the_caller():
    with pytest.raises(TypeError, match="square"):
        square.submit(1, 2, 3)


def test_map_zips_iterables_and_passes_unmapped_constants():
    futs = add.map([1, 2, 3], b=unmapped(10))
    assert isinstance(futs, FutureList)
    assert futs.result(timeout=30) == [11, 12, 13]
    assert add.map(range(3), [10, 20, 30]).result(timeout=30) == [10, 21, 32]
    assert add.map([1, 2], b=[5, 6]).result(timeout=30) == [6, 8]
    assert futs.counts()["completed"] == 3
    with pytest.raises(ValueError, match="differ in length"):
        add.map([1, 2], [1, 2, 3])
    with pytest.raises(TypeError, match="iterable"):
        add.map(1, 2)


def test_futures_in_arguments_are_resolved_first():
    a = square.submit(2)
    b = square.submit(3)
    c = total.submit([a, b, 5])
    d = total.submit({"x": a, "y": c})
    chained = add.submit(d, b=square.submit(d))
    assert c.result(timeout=30) == 4 + 9 + 5
    assert d.result(timeout=30) == 4 + 18
    assert chained.result(timeout=30) == 22 + 22 * 22
    order = [e[0] for e in events]
    assert order.index("total") > max(i for i, e in enumerate(events) if e == ("square", 3))


def test_map_over_futures_chains_per_element():
    firsts = square.map([1, 2, 3])
    seconds = add.map(firsts, b=unmapped(1))
    assert seconds.result(timeout=30) == [2, 5, 10]


def test_wait_for_orders_without_passing_data():
    g = gate("first")
    first = wait_gate.submit("first", 1)
    second = square.submit(7, wait_for=[first])
    assert not second.done() and second.run_state is RunState.PENDING
    g.set()
    assert second.result(timeout=30) == 49
    assert events.index(("end", "first")) < events.index(("square", 7))


def test_failed_upstream_fails_downstream_naming_it():
    up = boom.submit(1)
    down = total.submit([up, 1])
    with pytest.raises(UpstreamFailedError, match=r"upstream run .* of task `boom`") as info:
        down.result(timeout=30)
    assert isinstance(info.value.__cause__, ValueError)
    assert ("total", (1,)) not in events and down.run_state is RunState.FAILED
    with pytest.raises(ValueError, match="bad 1"):
        up.result()  # the user's own exception, not wrapped
    after = square.submit(5, wait_for=[up])
    with pytest.raises(UpstreamFailedError):
        after.result(timeout=30)


def test_allow_failure_runs_downstream_with_the_exception():
    @task(cache_policy=NONE)
    def describe(value):
        return type(value).__name__

    up = boom.submit(2)
    assert describe.submit(allow_failure(up)).result(timeout=30) == "ValueError"
    ok = square.submit(4, wait_for=[allow_failure(up)])
    assert ok.result(timeout=30) == 16


def test_retries_happen_on_the_worker():
    attempts: list[int] = []

    @task(cache_policy=NONE, retries=2)
    def flaky():
        attempts.append(len(attempts) + 1)
        if len(attempts) < 3:
            raise OSError("transient")
        return "ok"

    fut = flaky.submit()
    assert fut.result(timeout=30) == "ok"
    assert attempts == [1, 2, 3]
    h = flushed_history()
    assert h[h["run_id"] == fut.run_id]["state"].astype(str).tolist() == ["COMPLETED"]


def test_cancel_pending_and_cooperative_cancel_of_running():
    runner = ThreadRunner(max_workers=1)
    g = gate("blocker")
    with runner:
        blocker = wait_gate.submit("blocker")
        pending = square.submit(11)
        downstream = add.submit(pending, 1)
    assert pending.cancel() is True
    assert pending.cancelled() and pending.run_state is RunState.CANCELLED
    with pytest.raises(TaskCancelledError):
        pending.result()
    g.set()
    blocker.result(timeout=30)
    with pytest.raises(UpstreamFailedError, match="cancelled"):
        downstream.result(timeout=30)
    assert ("square", 11) not in events
    assert blocker.cancel() is False  # already finished

    started = threading.Event()

    @task(cache_policy=NONE)
    def polite():
        started.set()
        while not nf.current_run().cancelled():
            time.sleep(0.005)
        raise TaskCancelledError("stopped on request")

    with runner:
        fut = polite.submit()
    assert started.wait(30)
    assert fut.cancel() is True  # running: the cooperative flag
    with pytest.raises(TaskCancelledError):
        fut.result(timeout=30)
    assert fut.run_state is RunState.CANCELLED
    runner.shutdown()
    states = dict(zip(*[flushed_history()[c].astype(str) for c in ("run_id", "state")]))
    assert states[pending.run_id] == "CANCELLED" and states[fut.run_id] == "CANCELLED"


def test_timeouts():
    @task(cache_policy=NONE, timeout_seconds=0.05)
    def slow():
        while not nf.current_run().cancelled():
            time.sleep(0.005)

    with pytest.raises(TaskTimeoutError):
        slow.submit().result(timeout=30)
    g = gate("long")
    fut = wait_gate.submit("long")
    with pytest.raises(TimeoutError, match="did not finish"):
        fut.result(timeout=0.01)
    assert not fut.done()  # the run keeps going
    g.set()
    fut.result(timeout=30)


def test_exception_in_a_done_callback_is_logged_and_contained(caplog):
    seen: list[str] = []

    def bad(f):
        raise RuntimeError("callback bug")

    g = gate("cb")
    fut = wait_gate.submit("cb", 5)
    fut.add_done_callback(bad)
    fut.add_done_callback(lambda f: seen.append(f.run_id))
    with caplog.at_level(logging.ERROR, logger="notebook_flow"):
        g.set()
        assert fut.result(timeout=30) == 5
        assert square.submit(12).result(timeout=30) == 144  # the worker is fine
    assert seen == [fut.run_id]
    assert "callback bug" in caplog.text
    late: list[str] = []
    fut.add_done_callback(lambda f: late.append("now"))  # already done: called at once
    assert late == ["now"]


def test_per_task_and_tag_concurrency_limits():
    active = {"n": 0, "max": 0}
    lock = threading.Lock()

    def body():
        with lock:
            active["n"] += 1
            active["max"] = max(active["max"], active["n"])
        time.sleep(0.01)
        with lock:
            active["n"] -= 1

    @task(cache_policy=NONE, max_concurrency=2)
    def limited(i):
        body()
        return i

    with ThreadRunner(max_workers=6) as runner:
        assert limited.map(range(12)).result(timeout=60) == list(range(12))
    assert active["max"] <= 2

    @task(cache_policy=NONE, tags=["db"])
    def tagged(i):
        body()
        return i

    active["max"] = 0
    set_concurrency_limit("db", 1)
    try:
        with runner:
            assert tagged.map(range(6)).result(timeout=60) == list(range(6))
        assert active["max"] == 1
    finally:
        set_concurrency_limit("db", None)
    runner.shutdown()


def test_running_lists_in_flight_and_shutdown_waits():
    g = gate("inflight")
    futs = wait_gate.map(["inflight"] * 3)
    assert set(running()) >= set(futs)
    threading.Timer(0.05, g.set).start()
    shutdown(wait=True)
    assert all(f.done() for f in futs)
    assert not set(running()) & set(futs)
    assert square.submit(2).result(timeout=30) == 4  # a fresh worker after shutdown


def test_shutdown_can_cancel_pending():
    g = gate("cp")
    with ThreadRunner(max_workers=1) as runner:
        first = wait_gate.submit("cp")
        rest = square.map([21, 22])
    threading.Timer(0.05, g.set).start()
    runner.shutdown(wait=True, cancel_pending=True)
    assert first.result() is None
    assert all(f.cancelled() for f in rest)
    with pytest.raises(RuntimeError, match="shut down"):
        runner.submit(square, 1)


def test_tasks_that_submit_and_wait_do_not_starve_a_one_thread_pool():
    @task(cache_policy=NONE)
    def parent(n):
        return sum(square.submit(i).result(timeout=30) for i in range(n))

    with ThreadRunner(max_workers=1):
        assert parent.submit(4).result(timeout=30) == 0 + 1 + 4 + 9


def test_async_task_and_awaiting_a_future():
    @task(cache_policy=NONE)
    async def fetch(x):
        await asyncio.sleep(0)
        return x + 1

    assert fetch.submit(1).result(timeout=30) == 2

    async def main():
        return await square.submit(6), await fetch.submit(2)

    assert asyncio.run(main()) == (36, 3)


def test_submit_from_many_threads():
    out: list[TaskFuture] = []
    lock = threading.Lock()

    def client(k):
        futs = [square.submit(k * 100 + i) for i in range(50)]
        with lock:
            out.extend(futs)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 200
    assert sorted(f.result(timeout=60) for f in out) == sorted(
        (k * 100 + i) ** 2 for k in range(4) for i in range(50)
    )


def test_plain_repr_outside_jupyter_imports_no_widget_library(python_env):
    import subprocess

    code = (
        "import sys, notebook_flow as nf\n"
        "from notebook_flow.cache_policies import NONE\n"
        "@nf.task(cache_policy=NONE)\n"
        "def f(x): return x\n"
        "fut = f.submit(1); fut.result(timeout=30)\n"
        "futs = f.map([1, 2]); futs.result(timeout=30)\n"
        "print(repr(fut)); print(repr(futs))\n"
        "heavy = ('IPython', 'ipywidgets', 'notebook_flow.notebook')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=python_env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("<TaskFuture `f` ") and "completed" in lines[0]
    assert lines[1] == "<FutureList of 2 runs of `f`: 2 completed>"
    assert lines[2] == "[]"
