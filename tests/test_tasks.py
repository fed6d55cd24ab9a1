"""@task: the call path, options, explain, errors."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import notebook_flow as nf
from notebook_flow import task
from notebook_flow.cache_policies import DEFAULT, FILES, INPUTS, NONE, TASK_SOURCE, CachePolicy
from notebook_flow.errors import (
    CommitError,
    ConfigurationError,
    TaskTimeoutError,
    UnhashableInputError,
)


class CallLog(list):
    """Counts executions. Tasks key on the globals they read, so this one opts out of the
    key through the fingerprint hook (the documented escape hatch for such state)."""

    def __notebook_flow_fingerprint__(self):
        return "call-log"


calls = CallLog()


@task
def add(x, y=1):
    calls.append(("add", x, y))
    return x + y


@pytest.fixture(autouse=True)
def _reset_calls():
    calls.clear()


def flushed_history(**kw) -> pd.DataFrame:
    from notebook_flow import config

    config.get_metadata().flush()
    return nf.history(**kw)


def test_second_call_hits_and_returns_equal_value():
    assert add(1, 2) == 3
    assert add(1, 2) == 3
    assert add(x=1, y=2) == 3  # same binding, same key
    assert calls == [("add", 1, 2)]
    assert add(2) == 3  # default applied: a different key
    assert len(calls) == 2


def test_history_records_completed_and_cached_runs():
    add(1, 2)
    add(1, 2)
    h = flushed_history(task="add")
    assert sorted(h["state"].astype(str)) == ["CACHED", "COMPLETED"]
    s = nf.stats()
    assert s["hits"] == 1 and s["misses"] == 1


def test_cache_key_is_stable_and_namespaced_per_task():
    @task(cache_policy=INPUTS)
    def f(x):
        return x

    @task(cache_policy=INPUTS)
    def g(x):
        return x

    assert f.cache_key(1) == f.cache_key(1)
    assert f.cache_key(1) != f.cache_key(2)
    assert f.cache_key(1) != g.cache_key(1)  # never shared unless asked

    @task(cache_policy=INPUTS, cache_namespace="shared")
    def h1(x):
        return x

    @task(cache_policy=INPUTS, cache_namespace="shared")
    def h2(x):
        return x

    assert h1.cache_key(1) == h2.cache_key(1)


def test_numpy_and_pandas_results_round_trip():
    @task
    def make(n):
        calls.append(n)
        return np.arange(n, dtype="float64"), pd.DataFrame({"a": range(n), "s": ["x"] * n})

    arr, df = make(10)
    arr2, df2 = make(10)
    assert len(calls) == 1
    np.testing.assert_array_equal(arr, arr2)
    pd.testing.assert_frame_equal(df, df2)

    @task
    def frame(n):
        calls.append(n)
        return pd.DataFrame({"a": range(n), "s": [str(i) for i in range(n)]})

    pd.testing.assert_frame_equal(frame(5), frame(5))
    assert calls.count(5) == 1


def test_user_exception_propagates_as_itself_and_is_recorded_failed():
    class Boom(ValueError):
        pass

    @task
    def explode(x):
        raise Boom(f"bad {x}")

    with pytest.raises(Boom, match="bad 1"):
        explode(1)
    h = flushed_history(
        task=test_user_exception_propagates_as_itself_and_is_recorded_failed.__name__
        + ".<locals>.explode"
    )
    assert list(h["state"].astype(str)) == ["FAILED"]
    assert "Boom" in h["error"][0] and "Traceback" in h["traceback"][0]


def test_retries_with_delays_list_and_condition():
    attempts = []

    @task(retries=3, retry_delay_seconds=[0, 0.01], cache_policy=NONE)
    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return "ok"

    assert flaky() == "ok"
    assert len(attempts) == 3

    seen = []

    def only_connection_errors(t, run, state):  # Prefect's (task, task_run, state)
        seen.append((t.name, run.run_count))
        try:
            state.result()
        except ConnectionError:
            return True
        except Exception:
            return False
        return False

    @task(retries=5, retry_condition_fn=only_connection_errors, cache_policy=NONE)
    def wrong():
        raise KeyError("no retry")

    with pytest.raises(KeyError):
        wrong()
    assert len(seen) == 1


def test_async_task_retries_then_succeeds_or_fails_as_itself():
    attempts: list[int] = []

    @task(retries=2, retry_delay_seconds=0, cache_policy=NONE, name="aflaky")
    async def aflaky(fail_times: int) -> str:
        attempts.append(fail_times)
        await asyncio.sleep(0)
        if len(attempts) <= fail_times:
            raise ConnectionError(f"attempt {len(attempts)}")
        return "ok"

    assert asyncio.run(aflaky(2)) == "ok"
    assert len(attempts) == 3
    attempts.clear()
    with pytest.raises(ConnectionError, match="attempt 3"):
        asyncio.run(aflaky(5))  # retries exhausted: the task's own exception
    assert len(attempts) == 3
    states = flushed_history(task="aflaky")["state"].astype(str).tolist()
    assert sorted(states) == ["COMPLETED", "FAILED"]


def test_exponential_backoff_and_jitter():
    assert nf.exponential_backoff(2)(4) == [2.0, 4.0, 8.0, 16.0]
    t = task(retries=3, retry_delay_seconds=nf.exponential_backoff(0.001), retry_jitter_factor=0.5)(
        lambda: 1
    )
    assert t.retries == 3
    with pytest.raises(ConfigurationError):
        task(retries=-1)(lambda: 1)
    with pytest.raises(ConfigurationError):
        task(retry_delay_seconds=[-1], retries=1)(lambda: 1)


def test_timeout_raises_task_timeout_and_sets_cancel_flag():
    flags = []

    @task(timeout_seconds=0.2, cache_policy=NONE)
    def slow():
        run = nf.current_run()
        while not run.cancelled():
            time.sleep(0.01)
        flags.append("stopped")

    with pytest.raises(TaskTimeoutError, match="timeout_seconds=0.2"):
        slow()
    deadline = time.monotonic() + 5
    while not flags and time.monotonic() < deadline:
        time.sleep(0.01)
    assert flags == ["stopped"]


def test_async_task_caches():
    @task
    async def fetch(x):
        calls.append(x)
        await asyncio.sleep(0)
        return {"x": x}

    assert asyncio.run(fetch(3)) == {"x": 3}
    assert asyncio.run(fetch(3)) == {"x": 3}
    assert calls == [3]


def test_persist_result_false_does_not_cache(isolated_store: Path):
    # As Prefect 3: persist_result=False means NO_CACHE, every call runs.
    @task(persist_result=False)
    def mem(x):
        calls.append(x)
        return [x]

    assert mem(1) == [1] and mem(1) == [1]
    assert calls == [1, 1]
    assert (
        not list((isolated_store / "manifests").rglob("*.json"))
        if (isolated_store / "manifests").exists()
        else True
    )


def test_refresh_cache_recomputes_and_overwrites():
    add(5, 5)
    fresh = add.with_options(refresh_cache=True)
    assert fresh(5, 5) == 10
    assert len(calls) == 2
    assert add(5, 5) == 10
    assert len(calls) == 2


def test_cache_expiration_is_honored_and_explained(caplog):
    @task(cache_expiration=0.2)
    def short(x):
        calls.append(x)
        return x

    short(1)
    short(1)
    assert calls == [1]
    time.sleep(0.3)
    assert short.explain(1).status == "expired"
    with caplog.at_level(logging.INFO, logger="notebook_flow"):
        short(1)
    assert calls == [1, 1]
    assert "expired" in caplog.text
    with pytest.raises(ConfigurationError):
        task(cache_expiration=-5)(lambda: 1)
    assert task(cache_expiration=timedelta(days=1))(lambda: 1).cache_expiration == timedelta(days=1)


def test_explain_names_the_changed_argument():
    @task
    def scale(df, factor=2):
        return df * factor

    df = pd.DataFrame({"a": [1, 2, 3]})
    scale(df)
    assert scale.explain(df).status == "hit"
    df2 = df.copy()
    df2.loc[0, "a"] = 100
    exp = scale.explain(df2)
    assert exp.status == "miss"
    assert exp.reasons == ("argument `df` changed",)
    assert "argument `factor` changed" in str(scale.explain(df, factor=3))


def test_unhashable_argument_gives_a_clear_error(tmp_path):
    @task
    def read(f):
        return f.read()

    with open(tmp_path / "x.txt", "w") as fh, pytest.raises(UnhashableInputError) as info:
        read(fh)
    msg = str(info.value)
    assert "argument `f`" in msg and "INPUTS - 'f'" in msg and "from_cache_key_fn" in msg

    @task(cache_policy=INPUTS - "f")
    def read2(f):
        return 1

    with open(tmp_path / "x.txt", "w") as fh:
        assert read2(fh) == 1


def test_policy_composition():
    assert repr(DEFAULT) == "INPUTS + TASK_SOURCE"
    assert NONE + INPUTS == INPUTS
    p = (INPUTS + TASK_SOURCE) - "verbose"
    assert "verbose" in repr(p)
    assert TASK_SOURCE - "x" is TASK_SOURCE  # as Prefect: a no-op without inputs
    with pytest.raises(ConfigurationError):
        INPUTS.configure(isolation_level="DIRTY")

    @task(cache_policy=INPUTS - "verbose")
    def f(x, verbose=False):
        calls.append(x)
        return x

    f(1, verbose=True)
    f(1, verbose=False)
    assert calls == [1]


def test_files_policy_keys_on_contents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    Path("data/a.csv").write_text("1,2\n")

    @task(cache_policy=FILES("data/*.csv"))
    def load():
        calls.append(1)
        return Path("data/a.csv").read_text()

    k1 = load.cache_key()
    assert load() == "1,2\n" and load() == "1,2\n"
    assert calls == [1]
    Path("data/a.csv").write_text("3,4\n")
    assert load.cache_key() != k1
    assert load() == "3,4\n"
    Path("data/b.csv").write_text("")
    assert "file `data/b.csv` is new" in load.explain().reasons


def test_cache_key_fn_policy():
    def by_user(context, parameters):
        return f"user-{parameters['user']}"

    @task(cache_policy=CachePolicy.from_cache_key_fn(by_user))
    def charge(user, amount):
        calls.append((user, amount))
        return amount

    charge("a", 1)
    charge("a", 2)  # same key: the idempotency key ignores amount
    assert calls == [("a", 1)]
    with pytest.raises(ConfigurationError):
        CachePolicy.from_cache_key_fn(lambda: "x")


def test_no_cache_runs_every_time():
    @task(cache_policy=NONE)
    def tick():
        calls.append(1)

    tick()
    tick()
    assert len(calls) == 2
    assert tick.cache_key() is None


def test_clear_cache_removes_results():
    add(1, 1)
    assert add.clear_cache() == 1
    add(1, 1)
    assert len(calls) == 2


def test_corrupt_payload_is_a_miss_with_a_warning(isolated_store: Path, caplog):
    @task
    def value(x):
        calls.append(x)
        return {"x": x, "data": list(range(10_000))}  # over the inline limit: a payload file

    value(1)
    payloads = [p for p in (isolated_store / "results").rglob("*") if p.is_file()]
    assert len(payloads) == 1
    raw = bytearray(payloads[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    payloads[0].write_bytes(bytes(raw))
    from notebook_flow.tasks import _hot

    _hot.clear()  # as a fresh process would: this one still holds the verified value
    with caplog.at_level(logging.WARNING, logger="notebook_flow"):
        assert value(1) == {"x": 1, "data": list(range(10_000))}
    assert calls == [1, 1]
    assert "recomputing" in caplog.text


def test_commit_failure_raises_and_keeps_the_value(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    @task(result_storage=str(blocker / "store"))
    def compute():
        return 42

    with (
        pytest.warns(UserWarning, match="cannot read manifest"),
        pytest.raises(CommitError) as info,
    ):
        compute()
    assert info.value.result == 42


def test_tasks_pickle_and_still_work():
    clone = pickle.loads(pickle.dumps(add))
    assert clone is add  # module-level tasks travel by reference

    @task
    def local(x):
        return x * 2

    import cloudpickle

    copy = cloudpickle.loads(cloudpickle.dumps(local))
    assert copy(4) == 8
    # (Keys of a copy are compared with the original's in tests/test_keys.py, in fresh
    # processes: pytest's assertion rewriting changes how this module's source is found.)
    assert copy.cache_key(4) == cloudpickle.loads(cloudpickle.dumps(copy)).cache_key(4)


def test_bad_options_are_refused_clearly():
    with pytest.raises(ConfigurationError, match="CachePolicy"):
        task(cache_policy="inputs")(lambda: 1)
    with pytest.raises(ConfigurationError):
        task(timeout_seconds=0)(lambda: 1)
    with pytest.raises(ConfigurationError):
        add.with_options(colour="red")
    with pytest.raises(TypeError, match="task `add`"):
        add(1, 2, 3)


def test_threads_calling_the_same_task_all_get_the_value():
    results = []

    def worker():
        results.append(add(7, 7))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [14] * 8


def test_rebuild_index_from_manifests():
    add(1, 2)
    add(3, 4)
    from notebook_flow import config

    config.get_metadata().flush()
    assert nf.rebuild_index() == 2
    entries = nf.cache_entries()
    assert len(entries) == 2


def test_in_process_hot_cache_is_per_store_and_copies_mutable_values(tmp_path):
    @task
    def listing(x):
        calls.append(x)
        return [x]

    a = listing.with_options(result_storage=str(tmp_path / "a"))
    b = listing.with_options(result_storage=str(tmp_path / "b"))
    assert a(1) == [1] and a(1) == [1]
    assert b(1) == [1]  # same key, another store: computed there, not served from memory
    assert calls == [1, 1]
    got = a(1)
    got.append(99)  # mutating a returned value never changes what the next hit returns
    assert a(1) == [1]
    assert a.clear_cache() == 1
    assert a(1) == [1]  # a delete in this process is seen at once
    assert calls == [1, 1, 1]


def test_hot_cache_copies_a_mutable_value_only_once_it_is_used_again(tmp_path):
    """A value the hot cache would have to pickle is admitted the second time it passes
    (commit then hit, or two loads); an immutable one at once."""
    from notebook_flow.storage import ResultStore
    from notebook_flow.tasks import _hot

    store = ResultStore(str(tmp_path / "s"))

    @task(result_storage=store)
    def listing(x):
        return [x]

    @task(result_storage=store)
    def text(x):
        return str(x)

    def kept(t, x):
        return (store.url, t.cache_key(x)) in _hot._entries

    assert listing(1) == [1] and not kept(listing, 1)  # committed: seen once
    assert listing(1) == [1] and kept(listing, 1)  # loaded again: admitted
    assert text(1) == "1" and kept(text, 1)  # immutable: no copy needed, kept at once
    _hot.clear()
    assert listing(1) == [1] and not kept(listing, 1)  # as in a resumed kernel: one load
    assert listing(1) == [1] and kept(listing, 1)


_samples = iter(range(1000))


def test_hot_cache_sees_deletes_and_replacements_by_other_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, python_env: dict[str, str]
) -> None:
    """Hits are served from memory without a system call; another process's delete or
    replacement rewrites the store's generation file, which this process reads at most
    every recheck_after seconds (here: always), and a delete through another ResultStore
    object in this process is seen at once."""
    from notebook_flow.storage import ResultStore
    from notebook_flow.tasks import _hot

    root = tmp_path / "store"

    @task(result_storage=str(root))
    def sample(x):
        return next(_samples)

    def in_other_process(code: str) -> str:
        code = (
            f"from notebook_flow.storage import ResultStore\ns = ResultStore({str(root)!r})\n"
            + code
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=python_env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    first = sample(1)
    assert sample(1) == first  # hit (from memory)
    generation = root / "manifests" / "GENERATION"
    assert not generation.exists()  # commits of new keys leave it alone
    stats: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    assert sample(1) == first
    assert stats == []  # within the period: not even a stat
    monkeypatch.setattr(os, "stat", real_stat)

    monkeypatch.setattr(_hot, "recheck_after", 0.0)
    assert in_other_process("print(s.clear())") == "1"
    assert generation.exists()
    second = sample(1)
    assert second != first  # recomputed: the other process's delete was seen

    # Another object of the same store in this process: seen at once, whatever the period.
    monkeypatch.setattr(_hot, "recheck_after", 3600.0)
    assert sample(1) == second
    assert ResultStore(str(root)).clear() == 1
    third = sample(1)
    assert third not in (first, second)

    # A replacement (e.g. refresh_cache) by another process is a new generation too.
    monkeypatch.setattr(_hot, "recheck_after", 0.0)
    in_other_process(
        f"m = s.lookup({sample.cache_key(1)!r})\n"
        "s.commit(m.key, -1, task=m.task, components=m.components, run_id='other', "
        "duration=1.0, expires_at=None)\n"
    )
    assert sample(1) == -1


@pytest.mark.usefixtures("run_history_held")
def test_a_miss_does_not_wait_for_a_run_history_another_process_holds(caplog):
    """The miss log line looks up the task's latest entry, waiting ~1 s at most: another
    process's session (or a paused kernel holding it) must not hold up the computation
    for the index's lock_timeout (120 s)."""

    @task
    def double(x):
        return 2 * x

    done: list[int] = []
    with caplog.at_level(logging.INFO, logger="notebook_flow"):
        caller = threading.Thread(target=lambda: done.append(double(21)), daemon=True)
        caller.start()
        caller.join(60)  # liveness, not speed: it waited the full 120 s before
        assert done == [42]
    assert "cache miss: reason not looked up: the run history is busy" in caplog.text


def test_a_timed_out_body_keeps_its_key_locked_until_it_really_ends():
    """timeout_seconds gives up waiting for a body it cannot stop; with SERIALIZABLE, no one
    else may start the same key while that body still runs."""
    from notebook_flow.errors import TaskTimeoutError
    from notebook_flow.locks import MemoryLockManager

    manager = MemoryLockManager()
    go_on, ended = threading.Event(), threading.Event()

    @task(cache_policy=INPUTS.configure(lock_manager=manager), timeout_seconds=0.2)
    def slow(x):
        go_on.wait(60)
        ended.set()
        return x

    key = slow.cache_key(1)
    with pytest.raises(TaskTimeoutError):
        slow(1)
    assert not ended.is_set()
    assert manager.is_locked(key)  # the abandoned body still runs: its key stays taken
    go_on.set()
    assert ended.wait(30)
    assert manager.wait_for_release(key, timeout=30)
