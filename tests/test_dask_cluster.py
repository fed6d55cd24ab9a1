"""DaskRunner on a real cluster: a ``dask scheduler`` and two ``dask worker`` processes on
loopback (each with its own HOME, working directory and cache folder), moto's S3 server
as the store. One cluster per module; map sizes stay small (the machine is shared)."""

from __future__ import annotations

import json
import linecache
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dask_cluster import ROOT, Cluster
from _dask_tasks import count_marks, fails, square, uncached
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401

import notebook_flow as nf
from notebook_flow import task
from notebook_flow.cache_policies import INPUTS
from notebook_flow.config import get_metadata, get_store
from notebook_flow.errors import ConfigurationError
from notebook_flow.locks import MemoryLockManager
from notebook_flow.states import RunState

pytest.importorskip("distributed")

CLIENT = str(Path(__file__).with_name("dask_client.py"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("dask-cluster"))
    try:
        from distributed import Client

        with Client(c.address) as probe:
            c.wait_for_workers(probe)
        yield c
    finally:
        c.close()


@pytest.fixture
def s3_store(s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    """A fresh S3 prefix as this process's store; its index in this test's own cache dir."""
    monkeypatch.setenv("NOTEBOOK_FLOW_CACHE_DIR", str(tmp_path / "client-cache"))
    url = unique_s3_url()
    nf.configure(store=url, storage_options=s3_options(s3_server))
    return url


@pytest.fixture
def runner(cluster: Cluster) -> Iterator[nf.runners.DaskRunner]:
    from distributed import Client

    from notebook_flow.runners import DaskRunner

    with Client(cluster.address) as probe:
        cluster.wait_for_workers(probe)
    r = DaskRunner(cluster.address)
    yield r
    r.shutdown()


def _states(df) -> dict[str, int]:
    return {str(k): int(v) for k, v in df["state"].value_counts().items()}


def test_history_after_a_map_is_complete_and_nothing_opens_duckdb_on_workers(
    cluster, runner, s3_store
):
    with runner:
        futs = square.map(range(12))
        failed = fails.submit(1)
        plain = uncached.submit(41)
    assert [f.result(timeout=300) for f in futs] == [x * x for x in range(12)]
    assert [f.run_state for f in futs] == [RunState.COMPLETED] * 12
    with pytest.raises(ArithmeticError, match="cannot 1"):
        failed.result(timeout=300)
    assert plain.result(timeout=300) == 42  # not stored: the value came back in-band
    with runner:
        again = square.map(range(12))
    assert [f.result(timeout=300) for f in again] == [x * x for x in range(12)]
    assert [f.run_state for f in again] == [RunState.CACHED] * 12

    history = nf.history()
    assert len(history) == 26
    assert _states(history) == {"COMPLETED": 13, "CACHED": 12, "FAILED": 1}
    ours = {f.run_id for f in [*futs, *again, failed, plain]}
    assert set(history["run_id"]) == ours
    pids = set(cluster.worker_pids(runner.client).values())
    by_run = history.set_index("run_id")
    ran = [f.run_id for f in [*futs, failed, plain]]
    assert set(by_run.loc[ran, "pid"]) <= pids, "the final events of runs are the workers'"
    # Hits are decided here, in one batched lookup: they never went to the cluster.
    assert set(by_run.loc[[f.run_id for f in again], "pid"]) == {os.getpid()}
    row = history.set_index("run_id").loc[failed.run_id]
    assert "ArithmeticError: cannot 1" in row["error"] and "Traceback" in row["traceback"]
    stats = nf.stats()
    assert (stats["runs"], stats["hits"], stats["misses"], stats["failures"]) == (26, 12, 13, 1)
    assert (stats["crashed"], stats["in_flight"], stats["entries"]) == (0, 0, 12)
    # Explained on the worker from the components the client sent: first run, no result.
    first = nf.history(task="square").set_index("run_id").loc[futs[0].run_id]
    assert first["explain"] == "no earlier result of this task was found"
    assert not list(cluster.root.glob("w*/**/*.duckdb")), "a worker opened DuckDB"


def test_a_task_defined_in_a_cell_gets_the_same_key_on_the_cluster(cluster, runner, s3_store):
    # Source that exists only here, in linecache, as a notebook cell's does.
    filename = f"<ipython-input-7-{uuid.uuid4().hex[:12]}>"
    source = "OFFSET = 1000\n\ndef from_cell(x):\n    return x + OFFSET\n"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    cell_task = task(namespace["from_cell"])  # the default policy: INPUTS + TASK_SOURCE

    assert runner.client.run(lambda: linecache.getlines(filename)) == {
        addr: [] for addr in runner.client.scheduler_info(n_workers=-1)["workers"]
    }, "the workers must not have the cell's source"
    with runner:
        futs = cell_task.map([1, 2])
    assert [f.result(timeout=300) for f in futs] == [1001, 1002]
    assert futs[0].key == cell_task.cache_key(1)
    assert cell_task(1) == 1001  # a direct call here hits what the cluster committed
    last = nf.history(task="from_cell", limit=1)
    assert last["state"].tolist() == ["CACHED"]


def test_a_map_pickles_its_task_once_and_the_next_map_sees_a_changed_global(
    cluster, runner, s3_store, monkeypatch
):
    import cloudpickle

    from notebook_flow.tasks import Task

    pickled: list[object] = []
    real = cloudpickle.dumps

    def counting(obj, *args, **kwargs):
        if isinstance(obj, Task):
            pickled.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(cloudpickle, "dumps", counting)
    namespace = {"__name__": "__main__", "OFFSET": 1000}
    filename = f"<ipython-input-8-{uuid.uuid4().hex[:12]}>"
    exec(compile("def shifted(x):\n    return x + OFFSET\n", filename, "exec"), namespace)
    shifted = task(cache_policy=INPUTS)(namespace["shifted"])
    with runner:
        futs = shifted.map(range(40))
    assert [f.result(timeout=300) for f in futs] == [x + 1000 for x in range(40)]
    assert len(pickled) == 1, "one map, one pickle of its task"
    namespace["OFFSET"] = 2000  # a cell redefines a global between two maps
    with runner:
        futs = shifted.map(range(40, 80))
    assert [f.result(timeout=300) for f in futs] == [x + 2000 for x in range(40, 80)]
    with runner:
        single = shifted.submit(80)
    assert single.result(timeout=300) == 2080
    assert len(pickled) == 3


def test_results_stay_in_the_store_until_asked_for(cluster, runner, s3_store):
    import numpy as np

    from notebook_flow.states import Deferred

    @task(cache_policy=INPUTS)
    def big(n: int):
        return np.arange(n, dtype="float64")

    with runner:
        fut = big.submit(100_000)
    fut.wait(300)
    assert type(fut._value) is Deferred, "the value must not have come back with the run"
    value = fut.result()
    assert value.shape == (100_000,) and value[-1] == 99_999.0
    assert fut.result() is value  # loaded once
    assert fut.state.is_completed() and fut.state.result() is value


def test_a_burst_that_cannot_be_sent_fails_its_runs_and_the_next_one_goes(
    cluster, runner, s3_store, monkeypatch
):
    def broken() -> int:
        raise OSError("scheduler unreachable")

    monkeypatch.setattr(runner, "worker_threads", broken)
    with runner:
        lost = square.map([101, 102])
    for fut in lost:
        with pytest.raises(OSError, match="scheduler unreachable"):
            fut.result(timeout=300)
    monkeypatch.undo()
    with runner:
        futs = square.map([101, 102])
    assert [f.result(timeout=300) for f in futs] == [101 * 101, 102 * 102]


def test_refuses_a_memory_store_and_a_memory_lock_manager(runner, s3_store):
    @task(cache_policy=INPUTS.configure(lock_manager=MemoryLockManager()))
    def locked(x: int) -> int:
        return x

    with runner, pytest.raises(ConfigurationError, match="MemoryLockManager.*RedisLockManager"):
        locked.submit(1)
    nf.configure(store="memory://dask-refused", storage_options={})
    with runner, pytest.raises(ConfigurationError, match="memory.*s3://"):
        square.submit(1)
    assert len(nf.runners.running()) == 0, "a refused submit leaves no run behind"


def test_refuses_a_local_store_when_workers_run_on_other_hosts(runner, isolated_store):
    # Other hosts cannot exist on this machine: the scheduler's answer is replaced by one
    # that lists a worker elsewhere (the detection itself is real: local_addresses()).
    real = runner.client.scheduler_info

    def elsewhere(*args, **kwargs):
        info = real(*args, **kwargs)
        info["workers"]["tcp://10.11.12.13:4000"] = {"host": "10.11.12.13", "name": "far"}
        return info

    runner.client.scheduler_info = elsewhere
    runner._hosts = (0.0, [])
    with runner, pytest.raises(ConfigurationError, match="10.11.12.13.*shared_filesystem=True"):
        square.submit(1)
    runner.shared_filesystem = True  # the declared shared mount is accepted
    with runner:
        fut = square.submit(3)
    assert fut.result(timeout=300) == 9
    runner.client.scheduler_info = real


def test_a_worker_killed_mid_map_is_replaced_and_every_run_completes_once(
    cluster, runner, s3_store, tmp_path
):
    marks = tmp_path / "marks"
    marks.mkdir()
    with runner:
        futs = square.map(range(16), str(marks), 0.5)
    deadline = time.monotonic() + 120
    while len(os.listdir(marks)) < 3:
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.05)
    victim = cluster.worker_pids(runner.client)["w0"]
    os.kill(victim, signal.SIGKILL)
    assert [f.result(timeout=600) for f in futs] == [x * x for x in range(16)]
    history = nf.history()
    assert len(history) == 16 and set(history["run_id"]) == {f.run_id for f in futs}
    # A run the dead worker had committed is a hit when the cluster runs it again.
    assert set(_states(history)) <= {"COMPLETED", "CACHED"}
    finals = get_metadata().sql(
        "SELECT run_id, count(*) AS n FROM run_events "
        "WHERE state IN ('COMPLETED', 'CACHED') GROUP BY run_id"
    )
    assert len(finals) == 16 and set(finals["n"]) == {1}
    # Each item ran once, but for those the killed worker was running (2 threads):
    # their bodies may have got as far as the marker before the kill.
    executed = count_marks(str(marks))
    assert set(executed) == set(range(16))
    assert sum(executed.values()) - 16 <= 2 and set(executed.values()) <= {1, 2}
    assert len({m.key for m in get_store().iter_manifests()}) == 16
    cluster.wait_for_workers(runner.client)  # the nanny restarts the killed worker


def test_a_worker_killed_mid_chunk_loses_no_run_and_repeats_only_what_it_was_running(
    cluster, runner, s3_store, tmp_path, monkeypatch
):
    from notebook_flow.runners import dask as dask_runner

    # 32 runs in 4 chunks of 8 (one per worker thread): each Dask task runs 8 items.
    monkeypatch.setattr(dask_runner, "RUNS_PER_THREAD", 1)
    monkeypatch.setattr(dask_runner, "MAX_CHUNK", 8)
    marks = tmp_path / "marks"
    marks.mkdir()
    n = 32
    with runner:
        futs = square.map(range(n), str(marks), 0.3)
    deadline = time.monotonic() + 120
    while len(os.listdir(marks)) < 6:  # chunks are under way on both workers
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.05)
    victim = cluster.worker_pids(runner.client)["w0"]
    os.kill(victim, signal.SIGKILL)
    assert [f.result(timeout=600) for f in futs] == [x * x for x in range(n)]
    assert {f.run_state for f in futs} <= {RunState.COMPLETED, RunState.CACHED}
    # Dask ran the dead worker's chunks again: what they had committed was a hit there.
    # Only the item each of its 2 threads was running (past its marker, before its
    # commit) may have run twice.
    executed = count_marks(str(marks))
    assert set(executed) == set(range(n))
    assert sum(executed.values()) - n <= 2 and set(executed.values()) <= {1, 2}, executed
    assert len({m.key for m in get_store().iter_manifests()}) == n
    history = nf.history()
    assert set(history["run_id"]) == {f.run_id for f in futs}
    cluster.wait_for_workers(runner.client)


def _client_env(cluster: Cluster, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env["NOTEBOOK_FLOW_CACHE_DIR"] = os.environ["NOTEBOOK_FLOW_CACHE_DIR"]
    return env


def test_a_client_killed_mid_map_is_resumed_by_a_fresh_client(
    cluster,
    s3_store,
    s3_server,  # noqa: F811
    tmp_path,
):
    from distributed import Client

    from notebook_flow.runners import DaskRunner, resume

    with Client(cluster.address) as probe:
        cluster.wait_for_workers(probe)
        workers_before = cluster.worker_pids(probe)
    marks = tmp_path / "marks"
    marks.mkdir()
    n = 16
    cfg = {"mode": "map", "scheduler": cluster.address, "store": s3_store,
           "endpoint": s3_server, "n": n, "marks": str(marks), "delay": 0.4}  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, CLIENT, json.dumps(cfg)],
        env=_client_env(cluster, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "SUBMITTED", (
            child.stderr.read() if child.stderr else ""
        )
        deadline = time.monotonic() + 120
        while len(os.listdir(marks)) < 6:
            assert time.monotonic() < deadline and child.poll() is None, cluster.logs()
            time.sleep(0.02)
    finally:
        child.kill()
        child.wait()
    first_ids = set(nf.history()["run_id"])
    assert len(first_ids) == n
    # The runner waits for the runs the dead client left executing on the workers
    # (orphan_wait), then ingests the events they spooled to the store.
    runner = DaskRunner(cluster.address)
    try:
        with runner:
            resumed = resume()
        for fut in resumed:
            fut.result(timeout=600)
    finally:
        runner.shutdown()
    with Client(cluster.address) as probe:
        cluster.wait_for_workers(probe)
        workers_after = cluster.worker_pids(probe)
    executed = count_marks(str(marks))
    events = get_metadata().sql(
        "SELECT run_id, state, time, host, pid, key, explain FROM run_events ORDER BY time"
    )
    if workers_after != workers_before:
        # A worker died on its own (an overloaded machine: its nanny restarted it). A run
        # it was executing may have got past its marker but not to its commit: without a
        # lock manager, that item runs again (see docs/dask.md, "Exactly once").
        assert set(executed) == set(range(n)) and set(executed.values()) <= {1, 2}
        executed = dict.fromkeys(range(n), 1)
    assert executed == dict.fromkeys(range(n), 1), (
        f"an item ran twice, or never: {executed}\n{events.to_string()}\n"
        f"resumed_from={resumed.resumed_from}\n{cluster.logs()}"
    )
    store = get_store()
    committed_by_first = {m.run_id for m in store.iter_manifests()} & first_ids
    history = nf.history().set_index("run_id")
    old = history.loc[sorted(first_ids)]
    # What the workers finished for the dead client is COMPLETED, not CRASHED.
    assert set(old.index[old["state"] == "COMPLETED"]) == committed_by_first
    assert set(old["state"]) <= {"COMPLETED", "CRASHED"}
    assert len(committed_by_first) >= 4
    new = history.drop(index=sorted(first_ids))
    assert len(new) == len(resumed)
    assert set(new["state"]) <= {"COMPLETED", "CACHED"}
    assert (new["state"] == "COMPLETED").sum() == n - len(committed_by_first)


def test_exactly_once_with_redis_across_three_clients(cluster, s3_store, s3_server, tmp_path):  # noqa: F811
    redis = pytest.importorskip("redis")
    from test_locks_contract import REDIS_URL, require_server

    require_server("redis")
    prefix = f"nftest-dask-{uuid.uuid4().hex[:10]}"
    names = ["a", "b", "c", "d", "e"]
    cfg = {"mode": "charge", "scheduler": cluster.address, "store": s3_store,
           "endpoint": s3_server, "names": names, "repeat": 4, "redis_url": REDIS_URL,
           "prefix": prefix}  # fmt: skip
    env = _client_env(cluster, tmp_path)
    children = [
        subprocess.Popen(
            [sys.executable, CLIENT, json.dumps(cfg)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for child in children:
            out, err = child.communicate(timeout=600)
            assert child.returncode == 0 and "DONE" in out, err[-3000:]
        counts = {n: int(client.get(f"{prefix}:count:{n}") or 0) for n in names}
        assert counts == dict.fromkeys(names, 1)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()
