"""Background commits of large array results (storage/behind.py): the call returns after a
snapshot, the commit follows on the committer thread, and nothing observable is lost.

A commit is held back by making the payload write wait for an event (fault injection on
the real store); everything else is the real call path, store, locks and processes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _kernels import connect, last_json_line, start_kernel
from _marks import MARK, count_marks
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401  (fixture)

import notebook_flow as nf
from notebook_flow.storage import behind, payload

BIG = behind.MIN_BYTES // 8 * 2  # float64 values: twice the smallest background commit


class Runs(list):  # type: ignore[type-arg]
    """Counts executions without being part of the key (the fingerprint escape hatch)."""

    def __notebook_flow_fingerprint__(self) -> str:
        return "runs"


@pytest.fixture
def held_commits(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Payload writes wait until the returned event is set (set at teardown too)."""
    gate = threading.Event()
    write = payload.write_payload

    def gated(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(60), "a test never released the held commits"
        return write(*args, **kwargs)

    monkeypatch.setattr(payload, "write_payload", gated)
    yield gate
    gate.set()
    assert nf.wait_for_commits(timeout=60)


def _history(task: str) -> list[str]:
    """The run states of ``task``, once the recorder has written what it was given."""
    from notebook_flow import config

    nf.wait_for_commits(timeout=60)  # the runs' last events are recorded by their commits
    config.get_metadata().flush()
    return sorted(nf.history(task=task)["state"].tolist())


def _manifest(store: Path, key: str) -> Path:
    return store / "manifests" / key[:2] / f"{key}.json"


def test_call_returns_before_the_commit_and_the_snapshot_is_what_is_stored(
    isolated_store: Path, held_commits: threading.Event
):
    runs = Runs()

    @nf.task
    def produce(seed: int) -> np.ndarray:
        runs.append(seed)
        return np.arange(BIG, dtype="float64") + seed

    value = produce(1)
    key = produce.cache_key(1)
    assert behind.pending_count() == 1
    assert not _manifest(isolated_store, key).exists()  # not committed yet
    value[:] = -1.0  # the caller owns its array: changing it at once is allowed

    held_commits.set()
    assert nf.wait_for_commits(timeout=60)
    assert _manifest(isolated_store, key).exists()
    again = produce(1)
    assert runs == [1]  # a hit
    assert float(again[0]) == 1.0 and float(again[-1]) == BIG  # the values returned, not -1
    assert _history(produce.name) == ["CACHED", "COMPLETED"]


def test_this_process_waits_for_its_own_pending_commit(held_commits: threading.Event):
    runs = Runs()

    @nf.task
    def produce(seed: int) -> np.ndarray:
        runs.append(seed)
        return np.zeros(BIG)

    produce(7)
    second: list[Any] = []
    caller = threading.Thread(target=lambda: second.append(produce(7)))
    caller.start()
    caller.join(0.3)
    assert caller.is_alive()  # waiting for the pending commit, not computing again
    held_commits.set()
    caller.join(60)
    assert not caller.is_alive()
    assert runs == [7] and second[0].shape == (BIG,)


def test_reading_history_waits_for_pending_commits(held_commits: threading.Event):
    @nf.task
    def produce(seed: int) -> np.ndarray:
        return np.zeros(BIG)

    produce(1)
    frames: list[Any] = []
    reader = threading.Thread(target=lambda: frames.append(nf.history(task=produce.name)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()
    held_commits.set()
    reader.join(60)
    assert not reader.is_alive() and len(frames) == 1
    assert frames[0]["state"].tolist() == ["COMPLETED"]  # not RUNNING: the commit landed
    assert len(nf.cache_entries(task=produce.name)) == 1


def test_submitted_runs_commit_in_the_background_and_shutdown_waits(
    isolated_store: Path, held_commits: threading.Event
):
    @nf.task
    def produce(seed: int) -> np.ndarray:
        return np.full(BIG, float(seed))

    fut = produce.submit(6)
    assert float(fut.result(timeout=60)[0]) == 6.0  # the future is done before the commit
    assert behind.pending_count() == 1
    stopper = threading.Thread(target=nf.shutdown)
    stopper.start()
    stopper.join(0.3)
    assert stopper.is_alive()  # shutdown(wait=True) waits for the pending commit
    held_commits.set()
    stopper.join(60)
    assert not stopper.is_alive()
    assert _manifest(isolated_store, produce.cache_key(6)).exists()


def test_small_object_over_budget_or_switched_off_commit_in_the_foreground(
    isolated_store: Path, monkeypatch: pytest.MonkeyPatch
):
    @nf.task
    def produce(kind: str) -> Any:
        if kind == "small":
            return np.zeros(1000)
        if kind == "objects":
            return np.array([{"a": 1}] * BIG, dtype=object)
        return np.zeros(BIG)

    def committed_at_return(kind: str) -> bool:
        produce(kind)
        done = _manifest(isolated_store, produce.cache_key(kind)).exists()
        assert behind.pending_count() == 0 or not done
        return done

    assert committed_at_return("small")
    assert committed_at_return("objects")  # an object array's copy would share its items
    monkeypatch.setattr(behind, "BUDGET_BYTES", BIG * 8 - 1)
    assert committed_at_return("over budget")
    monkeypatch.undo()
    nf.configure(background_commits=False)
    assert committed_at_return("switched off")
    nf.configure(background_commits=True)
    assert not committed_at_return("in the background")
    assert nf.wait_for_commits(timeout=60)


def test_a_background_commit_to_object_storage(
    s3_server: str,  # noqa: F811
    held_commits: threading.Event,
):
    url = unique_s3_url()
    nf.configure(store=url, storage_options=s3_options(s3_server))

    @nf.task
    def produce(seed: int) -> np.ndarray:
        return np.full(BIG, float(seed))

    value = produce(4)
    key = produce.cache_key(4)
    assert behind.pending_count() == 1
    value[:] = 0.0
    held_commits.set()
    manifest = nf.ResultStore(url, storage_options=s3_options(s3_server)).lookup(key)
    assert manifest is not None  # (lookup waited for the pending commit)
    assert float(nf.config.get_store().load(manifest)[0]) == 4.0


def test_an_async_task_commits_in_the_foreground(isolated_store: Path):
    import asyncio

    @nf.task
    async def produce(seed: int) -> np.ndarray:
        return np.zeros(BIG)

    asyncio.run(produce(1))
    assert behind.pending_count() == 0
    assert _manifest(isolated_store, produce.cache_key(1)).exists()


def test_configure_rejects_a_non_bool():
    with pytest.raises(
        nf.errors.ConfigurationError,
        match="background_commits=.yes. is not accepted: True or False",
    ):
        nf.configure(background_commits="yes")  # type: ignore[arg-type]


def test_a_failed_background_commit_is_reported_and_recomputed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    runs = Runs()

    @nf.task
    def produce(seed: int) -> np.ndarray:
        runs.append(seed)
        return np.ones(BIG)

    write = payload.write_payload

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(payload, "write_payload", full_disk)
    with caplog.at_level(logging.WARNING, logger="notebook_flow"):
        assert float(produce(3).sum()) == BIG  # the caller has its value
        assert nf.wait_for_commits(timeout=60)
    assert "storing it failed" in caplog.text and "No space left" in caplog.text
    assert _history(produce.name) == ["FAILED"]

    monkeypatch.setattr(payload, "write_payload", write)
    produce(3)
    assert runs == [3, 3]  # nothing was stored, so it runs again


def test_a_worker_process_call_commits_before_it_returns(isolated_store: Path):
    from notebook_flow.runners.base import RemoteConfig, remote_run

    @nf.task
    def produce(seed: int) -> np.ndarray:
        return np.zeros(BIG)

    value, state, _ = remote_run(produce, (5,), {}, "run-remote", RemoteConfig.current())
    assert state == "COMPLETED" and value.shape == (BIG,)
    assert behind.pending_count() == 0
    assert _manifest(isolated_store, produce.cache_key(5)).exists()


MODULE = (
    "import os\nimport numpy as np\nfrom notebook_flow import cache_policies, task\n"
    + MARK
    + textwrap.dedent(
        """
        @task(cache_policy=cache_policies.DEFAULT.configure(isolation_level="SERIALIZABLE"))
        def produce(seed):
            mark("run")
            return np.full({n}, float(seed))
        """
    )
)


OTHER = textwrap.dedent(
    """
    import bgmod
    from notebook_flow.config import get_store
    from notebook_flow.locks import default_lock_manager_for

    key = bgmod.produce.cache_key(2)
    holder = default_lock_manager_for(get_store()).holder_of(key)
    print("held" if holder is not None else "free", flush=True)
    input()  # until the test lets the held commit go
    print(float(bgmod.produce(2)[0]), flush=True)
    """
)


def test_the_key_stays_locked_until_its_background_commit_lands(
    tmp_path: Path,
    python_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    held_commits: threading.Event,
):
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "bgmod.py").write_text(MODULE.replace("{n}", str(BIG)))
    monkeypatch.setenv("MARKS", str(marks))
    monkeypatch.syspath_prepend(str(tmp_path))
    import bgmod

    bgmod.produce(2)  # computed here; its commit (and so its lock) is held back
    assert behind.pending_count() == 1

    path = os.pathsep.join([str(tmp_path), python_env["PYTHONPATH"]])
    env = dict(python_env, MARKS=str(marks), PYTHONPATH=path)
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdin is not None and other.stdout is not None
        assert other.stdout.readline().strip() == "held"  # another process sees the lock
        other.stdin.write("\n")
        other.stdin.flush()
        held_commits.set()  # the other process now waits for the lock or finds it released
        out, _ = other.communicate(timeout=120)
    finally:
        other.kill()
    assert other.returncode == 0
    assert out.strip() == "2.0"
    assert count_marks(marks) == {"run": 1}  # it waited, then hit: one run in all


@pytest.mark.kernel
def test_a_kernel_restart_right_after_the_call_keeps_the_result(
    tmp_path: Path, isolated_store: Path
):
    marks = tmp_path / "marks"
    marks.mkdir()
    env = dict(os.environ, NOTEBOOK_FLOW_STORE=str(isolated_store), MARKS=str(marks))
    cell = (
        "import json, os\nimport numpy as np\nfrom notebook_flow import task\n"
        + MARK
        + f"\n@task\ndef produce(seed):\n    mark('run')\n    return np.full({BIG * 4}, 1.5)\n"
        + "print(json.dumps(float(produce(1).sum())))\n"
    )
    km = start_kernel(env, tmp_path)
    try:
        kc = connect(km)
        first = last_json_line(kc, cell)
        kc.stop_channels()
        km.restart_kernel(now=False)  # what Jupyter's restart button does: ask, then wait
        kc = connect(km)
        assert last_json_line(kc, cell) == first
        assert count_marks(marks) == {"run": 1}
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
