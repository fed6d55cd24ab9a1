"""The locks held now, for people: ``notebook_flow.list_locks()``, ``break_lock()`` and
``notebook-flow locks [--break KEY]``; and the index's lock table they read."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_locks_contract import REDIS_URL, require_server

from notebook_flow import cli, config, current_run, task
from notebook_flow.api import break_lock, list_locks
from notebook_flow.cache_policies import INPUTS
from notebook_flow.errors import ConfigurationError, LeaseLostError
from notebook_flow.locks import (
    FileLockManager,
    MemoryLockManager,
    PostgresLockManager,
    RedisLockManager,
)
from notebook_flow.locks.cli import manager_from_url
from notebook_flow.metadata import LockEvent, MetadataStore


@contextmanager
def holding(policy=None) -> Iterator[dict[str, object]]:
    """A SERIALIZABLE task running in a thread and waiting inside its body until the block
    ends; yields ``key``, ``run_id`` and, once the thread is done, ``result`` or ``error``."""
    inside, leave = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    @task(name="charge", cache_policy=policy or INPUTS.configure(isolation_level="SERIALIZABLE"))
    def charge(user: str) -> str:
        run = current_run()
        assert run is not None
        seen.update(key=run.key, run_id=run.run_id)
        inside.set()
        leave.wait(300)  # generous: under a load average of 70 a test's block outlived 30 s
        return user

    def call() -> None:
        try:
            seen["result"] = charge("ada")
        except Exception as exc:
            seen["error"] = exc

    worker = threading.Thread(target=call)
    worker.start()
    try:
        assert inside.wait(300)
        yield seen
    finally:
        leave.set()
        worker.join(300)


# -- the index ------------------------------------------------------------------------------------


def test_lock_table_applies_every_event_of_a_batch(tmp_path: Path):
    import filelock

    a, b, c = "h:1:2:3:a", "h:1:2:3:b", "h:1:2:3:c"
    t = time.time()
    path = str(tmp_path / "m.duckdb")
    with MetadataStore(path, auto_mark_crashed=False) as meta:
        for key in ("k1", "k2"):
            meta.record_lock_event(LockEvent(key, a, "acquired", t, "FileLockManager"))
        meta.flush(30)  # A holds both keys
        with filelock.FileLock(path + ".lock", thread_local=False):  # queue one batch
            for i, (key, holder, event) in enumerate(
                [
                    ("k1", a, "released"), ("k1", b, "acquired"), ("k1", b, "released"),
                    ("k2", c, "recovered"), ("k2", a, "lost"),  # A notices after C took over
                ],
                start=1,
            ):  # fmt: skip
                meta.record_lock_event(LockEvent(key, holder, event, t + i, "FileLockManager"))
        locks = meta.locks()
    assert list(zip(locks["key"], locks["holder"], strict=True)) == [("k2", c)]


# -- list_locks / break_lock -------------------------------------------------------------------


def test_list_locks_shows_the_holder_while_a_task_runs():
    assert list_locks().empty
    with holding() as seen:
        df = list_locks()
        assert len(df) == 1
        row = df.iloc[0]
        assert row["key"] == seen["key"]
        assert row["task"] == "charge"
        assert row["pid"] == os.getpid()
        assert row["run_id"] == seen["run_id"]
        assert row["source"] == "manager"
        assert row["fence"] > 0
        assert row["manager"].startswith("file:")
        assert row["lease_expires"] > row["acquired"]
    assert seen["result"] == "ada"
    assert list_locks().empty


def test_list_locks_includes_locks_of_other_managers_from_the_index():
    with holding(INPUTS.configure(lock_manager=MemoryLockManager())) as seen:
        config.get_metadata().flush(30)
        df = list_locks()  # the store's default manager (file) does not hold it
        assert list(df["key"]) == [seen["key"]]
        assert list(df["source"]) == ["index"]
        assert list(df["manager"]) == ["MemoryLockManager"]
        assert df["fence"].isna().all()
    assert list_locks().empty


def test_breaking_a_stuck_holders_lock_refuses_its_commit():
    with holding() as seen:
        key = str(seen["key"])
        assert break_lock(key) is True
        assert list_locks().empty
    assert isinstance(seen["error"], LeaseLostError)
    assert config.get_store().lookup(key) is None
    events = config.get_metadata().lock_events(limit=None)
    assert "broken" in set(events["event"])
    assert break_lock(key) is False  # nothing held any more


def test_break_lock_needs_the_manager_that_holds_the_key():
    manager = MemoryLockManager()
    with holding(INPUTS.configure(lock_manager=manager)) as seen:
        key = str(seen["key"])
        config.get_metadata().flush(30)
        with pytest.raises(ConfigurationError, match="MemoryLockManager"):
            break_lock(key)  # the store's file locks do not hold it
        assert manager.is_locked(key)  # and it was left alone
        assert break_lock(key, manager=manager) is True
    assert isinstance(seen["error"], LeaseLostError)


def test_remote_store_without_a_manager_says_which_to_pass(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTEBOOK_FLOW_CACHE_DIR", str(tmp_path / "cache"))
    store = f"s3://bucket-{uuid.uuid4().hex[:8]}/x"
    with pytest.raises(ConfigurationError, match="RedisLockManager"):
        break_lock("0" * 32, store=store)
    assert list_locks(store=store).empty  # the index of a store never used: nothing held


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_lists_and_breaks_locks(isolated_store, capsys):
    assert cli.main(["locks", "--store", str(isolated_store)]) == 0
    assert "no locks held" in capsys.readouterr().out
    with holding() as seen:
        key = str(seen["key"])
        assert cli.main(["locks", "--store", str(isolated_store)]) == 0
        out = capsys.readouterr().out
        header, line = out.splitlines()
        assert header.split()[:3] == ["KEY", "TASK", "HOLDER"]
        assert line.startswith(f"{key}  charge  run {seen['run_id']} on ")
        assert f"pid {os.getpid()}" in line
        assert cli.main(["locks", "--store", str(isolated_store), "--break", key]) == 0
        assert f"broke the lock on {key} (held by run {seen['run_id']}" in capsys.readouterr().out
    assert isinstance(seen["error"], LeaseLostError)
    assert cli.main(["locks", "--store", str(isolated_store), "--break", key]) == 1
    assert "nothing to break" in capsys.readouterr().out


def test_cli_asks_another_manager_by_url(isolated_store, capsys):
    require_server("redis")
    manager = RedisLockManager(url=REDIS_URL)  # the default prefix, as tasks use it
    key = uuid.uuid4().hex
    holder = f"{os.uname().nodename}:{os.getpid()}:0:1:cli-test-run"
    assert manager.acquire(key, holder, timeout=0, lease=30)
    try:
        assert cli.main(["locks", "--manager", REDIS_URL]) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(key)]
        assert len(lines) == 1 and "run cli-test-run on" in lines[0]
        assert lines[0].split()[-1] == "manager"
        assert cli.main(["locks", "--manager", REDIS_URL, "--break", key]) == 0
        assert not manager.is_locked(key)
    finally:
        manager.break_lock(key)


def test_manager_from_url():
    assert isinstance(manager_from_url("redis://localhost:6379/2"), RedisLockManager)
    assert isinstance(manager_from_url("postgresql://app@db/app"), PostgresLockManager)
    files = manager_from_url("file:///tmp/x/locks")
    assert isinstance(files, FileLockManager) and files.directory == "/tmp/x/locks"
    with pytest.raises(ConfigurationError, match="redis://"):
        manager_from_url("s3://bucket/locks")
