"""MetadataStore: merging of run transitions, reads, cache index, crash marking, schema, errors."""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings
from datetime import datetime, timedelta, timezone

import duckdb
import filelock
import hypothesis
import pandas as pd
import pytest
from hypothesis import strategies as st

from notebook_flow import _identity, metadata
from notebook_flow.errors import MetadataError
from notebook_flow.metadata import CacheEntry, LockEvent, MetadataStore, RunEvent
from notebook_flow.metadata import database as metadata_database
from notebook_flow.metadata import recorder as metadata_recorder
from notebook_flow.metadata import registry as metadata_registry
from notebook_flow.states import RunState

T0 = 1_700_000_000.0


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "meta" / "metadata.duckdb")


@pytest.fixture
def store(path):
    s = MetadataStore(path, auto_mark_crashed=False)
    yield s
    s.close()


def ev(run_id, state, at, task="load", **kw):
    kw.setdefault("task_identity", f"{task}-id")
    kw.setdefault("key", None)
    return RunEvent(run_id=run_id, task=task, state=state, at=at, **kw)


def entry(key, task="load", created_at=T0, size=10, **kw):
    return CacheEntry(
        key=key,
        task=task,
        task_identity=kw.pop("task_identity", f"{task}-id"),
        size=size,
        created_at=created_at,
        expires_at=kw.pop("expires_at", None),
        duration=kw.pop("duration", 1.0),
        serializer="json",
        payload=f"payloads/{key}.json",
        components=kw.pop("components", {"source of task `load`": "aa"}),
        run_id=kw.pop("run_id", "r"),
    )


def one(store, run_id):
    df = store.history()
    return df[df.run_id == run_id].iloc[0]


# ------------------------------------------------------------------------- transitions


def test_transitions_in_one_batch_merge(store):
    store.record_run(ev("r1", RunState.PENDING, T0))
    store.record_run(ev("r1", RunState.RUNNING, T0 + 1))
    store.record_run(ev("r1", RunState.COMPLETED, T0 + 3, key="k1", duration=2.0, size=5))
    row = one(store, "r1")
    assert row.state == "COMPLETED"
    assert row.created == pd.Timestamp(T0, unit="s", tz="UTC")
    assert row.started == pd.Timestamp(T0 + 1, unit="s", tz="UTC")
    assert row.ended == pd.Timestamp(T0 + 3, unit="s", tz="UTC")
    assert (row.duration, row.key, row["size"]) == (2.0, "k1", 5)
    assert list(store.events("r1").state) == ["PENDING", "RUNNING", "COMPLETED"]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_transitions_in_any_order_and_batches_merge(store, order):
    events = [
        ev("r1", RunState.PENDING, T0, inputs='{"x": 1}'),
        ev("r1", RunState.RUNNING, T0 + 1),
        ev("r1", RunState.COMPLETED, T0 + 2, key="k", duration=1.0),
    ]
    for i in order:
        store.record_run(events[i])
        store.flush()  # each transition in its own transaction
    row = one(store, "r1")
    assert row.state == "COMPLETED"
    assert row.created == pd.Timestamp(T0, unit="s", tz="UTC")
    assert row.started == pd.Timestamp(T0 + 1, unit="s", tz="UTC")
    assert row.ended == pd.Timestamp(T0 + 2, unit="s", tz="UTC")
    assert (row.key, row.inputs, row.duration) == ("k", '{"x": 1}', 1.0)
    assert list(store.events("r1").state) == ["PENDING", "RUNNING", "COMPLETED"]


def test_final_state_never_regresses(store):
    store.record_run(ev("r1", RunState.COMPLETED, T0 + 1))
    store.flush()
    store.record_run(ev("r1", RunState.RUNNING, T0 + 5))  # late, odd clock: still ignored
    store.record_run(ev("r2", RunState.FAILED, T0 + 1, error="boom"))
    store.record_run(ev("r2", RunState.RETRYING, T0 + 9))  # same batch
    assert one(store, "r1").state == "COMPLETED"
    assert one(store, "r2").state == "FAILED"
    assert one(store, "r2").error == "boom"


def test_latest_final_state_wins(store):
    # A run marked crashed whose process turns out alive and completes later: COMPLETED.
    store.record_run(ev("r1", RunState.CRASHED, T0 + 3))
    store.flush()
    store.record_run(ev("r1", RunState.COMPLETED, T0 + 4))
    # An older final state arriving late does not replace a newer one.
    store.record_run(ev("r2", RunState.COMPLETED, T0 + 4))
    store.flush()
    store.record_run(ev("r2", RunState.CRASHED, T0 + 3))
    assert one(store, "r1").state == "COMPLETED"
    assert one(store, "r2").state == "COMPLETED"


def test_retries_keep_attempt_and_clear_error_on_success(store):
    store.record_run(ev("r1", RunState.RUNNING, T0, attempt=1))
    store.record_run(ev("r1", RunState.RETRYING, T0 + 1, attempt=1, error="ValueError: x"))
    store.flush()
    row = one(store, "r1")
    assert (row.state, row.error) == ("RETRYING", "ValueError: x")
    store.record_run(ev("r1", RunState.RUNNING, T0 + 2, attempt=2))
    store.record_run(ev("r1", RunState.COMPLETED, T0 + 3, attempt=2))
    row = one(store, "r1")
    assert (row.state, row.attempt, row.error) == ("COMPLETED", 2, None)
    assert row.started == pd.Timestamp(T0, unit="s", tz="UTC")  # the first attempt's start
    retry = store.events("r1").query("state == 'RETRYING'").iloc[0]
    assert retry.error == "ValueError: x"


def test_failed_run_keeps_error_and_traceback(store):
    store.record_run(ev("r1", RunState.RUNNING, T0))
    store.record_run(ev("r1", RunState.FAILED, T0 + 1, error="KeyError: 'a'", traceback="Tb..."))
    row = one(store, "r1")
    assert (row.state, row.error, row.traceback) == ("FAILED", "KeyError: 'a'", "Tb...")


def test_event_fields_round_trip(store):
    store.record_run(
        ev("r1", "CACHED", T0, saved=2.5, notebook="a.ipynb", cell="c1", tags=["x", "y"])
    )
    row = one(store, "r1")
    assert (row.state, row.saved, row.notebook, row.cell) == ("CACHED", 2.5, "a.ipynb", "c1")
    assert list(row.tags) == ["x", "y"]
    me = _identity.process()
    assert (row.host, row.pid) == (me.host, me.pid)


# ------------------------------------------------------------------------------- reads


def test_history_filters_by_task_since_and_limit(store):
    for i in range(6):
        task = "a" if i % 2 else "b"
        store.record_run(ev(f"r{i}", RunState.COMPLETED, T0 + i * 3600, task=task))
    assert list(store.history().run_id) == ["r5", "r4", "r3", "r2", "r1", "r0"]  # newest first
    assert list(store.history(task="a").run_id) == ["r5", "r3", "r1"]
    assert list(store.history(task="a-id").run_id) == ["r5", "r3", "r1"]  # identity too
    assert list(store.history(limit=2).run_id) == ["r5", "r4"]
    assert list(store.history(task="b", limit=1).run_id) == ["r4"]
    since = T0 + 3 * 3600
    expected = ["r5", "r4", "r3"]
    assert list(store.history(since=since).run_id) == expected
    assert list(store.history(since=datetime.fromtimestamp(since, timezone.utc)).run_id) == expected
    assert list(store.history(since=datetime.fromtimestamp(since)).run_id) == expected  # local
    iso = datetime.fromtimestamp(since, timezone.utc).isoformat().replace("+00:00", "Z")
    assert list(store.history(since=iso).run_id) == expected
    assert list(store.history(since=pd.Timestamp(since, unit="s", tz="UTC")).run_id) == expected
    assert store.history(task="nope").empty
    assert str(store.history().created.dtype) == "datetime64[ns, UTC]" or "UTC" in str(
        store.history().created.dtype
    )


def test_history_relative_since(store):
    now = time.time()
    store.record_run(ev("old", RunState.COMPLETED, now - 3 * 3600))
    store.record_run(ev("new", RunState.COMPLETED, now - 60))
    assert list(store.history(since="1h").run_id) == ["new"]
    assert list(store.history(since=timedelta(hours=4)).run_id) == ["new", "old"]
    assert list(store.history(since="2.5h").run_id) == ["new"]
    with pytest.raises(ValueError, match="age like"):
        store.history(since="yesterday-ish")


def test_reads_see_own_pending_events_and_empty_db(store):
    assert store.history().empty
    assert list(store.history().columns)[:3] == ["run_id", "task", "state"]
    store.record_run(ev("r1", RunState.RUNNING, T0))
    assert list(store.history().state) == ["RUNNING"]  # no explicit flush needed


def test_events_order_and_limit(store):
    for i, state in enumerate(["PENDING", "RUNNING", "COMPLETED"]):
        store.record_run(ev("r1", state, T0 + i))
    store.record_run(ev("r2", RunState.CACHED, T0 + 10))
    assert len(store.events()) == 4
    assert list(store.events(limit=2).state) == ["COMPLETED", "CACHED"]
    assert store.events("r1").time.is_monotonic_increasing


def test_stats(store):
    assert store.stats() == {
        "runs": 0, "hits": 0, "misses": 0, "failures": 0, "crashed": 0, "in_flight": 0,
        "hit_rate": None, "time_saved": 0.0, "bytes_stored": 0, "entries": 0, "tasks": 0,
    }  # fmt: skip
    store.record_run(ev("h1", RunState.CACHED, T0, key="k1", saved=1.5))
    store.record_run(ev("h2", RunState.CACHED, T0, key="k1", saved=2.5, task="other"))
    store.record_run(ev("m1", RunState.COMPLETED, T0, key="k1"))
    store.record_run(ev("m2", RunState.FAILED, T0, key="k2"))
    store.record_run(ev("u1", RunState.COMPLETED, T0))  # uncached: neither hit nor miss
    store.record_run(ev("x1", RunState.RUNNING, T0))
    store.record_run(ev("c1", RunState.CRASHED, T0))
    store.record_cache_entry(entry("a" * 32, size=10))
    store.record_cache_entry(entry("b" * 32, size=20, task="other"))
    stats = store.stats()
    assert stats == {
        "runs": 7, "hits": 2, "misses": 2, "failures": 1, "crashed": 1, "in_flight": 1,
        "hit_rate": 0.5, "time_saved": 4.0, "bytes_stored": 30, "entries": 2, "tasks": 2,
    }  # fmt: skip
    other = store.stats(task="other")
    assert (other["runs"], other["hits"], other["bytes_stored"], other["entries"]) == (1, 1, 20, 1)


def test_prune_deletes_old_finished_runs(store):
    now = time.time()
    store.record_run(ev("old", RunState.COMPLETED, now - 40 * 86400))
    store.record_run(ev("old-running", RunState.RUNNING, now - 40 * 86400))
    store.record_run(ev("new", RunState.COMPLETED, now))
    store.record_lock_event(LockEvent("k", "h:1:2:3", "waited", now - 40 * 86400, "file"))
    store.record_cache_entry(entry("a" * 32, created_at=now - 40 * 86400))
    assert store.prune("30d") == 1
    assert sorted(store.history().run_id) == ["new", "old-running"]
    assert sorted(store.events().run_id) == ["new", "old-running"]
    assert store.lock_events().empty and len(store.cache_entries()) == 1


def test_sql_is_read_only_and_takes_params(store):
    store.record_run(ev("r1", RunState.COMPLETED, T0))
    df = store.sql("SELECT run_id, created FROM runs WHERE task = ?", ["load"])
    assert list(df.run_id) == ["r1"] and df.created[0] == T0  # epoch seconds in raw SQL
    with pytest.raises(MetadataError):
        store.sql("DELETE FROM runs")
    with pytest.raises(MetadataError):
        store.sql("SELEC nonsense")
    assert len(store.history()) == 1


# ------------------------------------------------------------------------ cache entries


def test_cache_entries_add_replace_remove(store):
    store.record_cache_entry(entry("a" * 32, created_at=T0))
    store.record_cache_entry(entry("b" * 32, created_at=T0 + 1))
    store.record_cache_entry(entry("c" * 32, created_at=T0 + 2, task="other"))
    df = store.cache_entries()
    assert list(df.key) == ["c" * 32, "b" * 32, "a" * 32]  # newest first
    assert "UTC" in str(df.created_at.dtype)
    assert list(store.cache_entries("load").key) == ["b" * 32, "a" * 32]
    assert list(store.cache_entries("other-id").key) == ["c" * 32]

    store.record_cache_entry(entry("a" * 32, created_at=T0, size=99))  # replaces
    assert store.cache_entries().set_index("key").loc["a" * 32, "size"] == 99
    store.remove_cache_entries([])  # nothing
    assert len(store.cache_entries()) == 3
    store.remove_cache_entries(["a" * 32])
    assert set(store.cache_entries().key) == {"b" * 32, "c" * 32}
    store.remove_cache_entries(task="other")
    assert list(store.cache_entries().key) == ["b" * 32]
    store.remove_cache_entries()  # everything
    assert store.cache_entries().empty


def test_cache_ops_keep_their_order_within_a_batch(store):
    store.record_cache_entry(entry("a" * 32))
    store.remove_cache_entries("a" * 32)
    store.record_cache_entry(entry("b" * 32))
    store.remove_cache_entries(["b" * 32])
    store.record_cache_entry(entry("b" * 32, size=7))
    df = store.cache_entries()
    assert list(df.key) == ["b" * 32] and df["size"][0] == 7


def test_rebuild_replaces_the_index(store):
    store.record_cache_entry(entry("a" * 32))
    manifest = types.SimpleNamespace(  # what storage.Manifest looks like
        key="d" * 32, task="load", serializer="npy", payload="p/d.npy", size=42, checksum="x",
        signature=None, created_at=T0 + 5, expires_at=T0 + 100, duration=0.5,
        components={"argument `x`": "11"}, run_id="r9", fence=None,
    )  # fmt: skip
    n = store.rebuild([entry("b" * 32), entry("c" * 32), manifest, entry("b" * 32)])
    assert n == 3
    df = store.cache_entries()
    assert set(df.key) == {"b" * 32, "c" * 32, "d" * 32}
    assert df.set_index("key").loc["d" * 32, "size"] == 42
    assert store.rebuild([]) == 0 and store.cache_entries().empty


def test_record_cache_entry_accepts_a_manifest(store):
    manifest = types.SimpleNamespace(
        key="e" * 32, task="load", serializer="json", payload="p", size=1, created_at=T0,
        expires_at=None, duration=1.0, components={"a": "b"}, run_id="r",
    )  # fmt: skip
    store.record_cache_entry(manifest, size=123)
    assert store.cache_entries()["size"].tolist() == [123]


def test_latest_entry(store):
    assert store.latest_entry("load-id") is None
    store.record_cache_entry(entry("a" * 32, created_at=T0, components={"arg `x`": "1"}))
    store.record_cache_entry(entry("b" * 32, created_at=T0 + 1, components={"arg `x`": "2"}))
    store.record_cache_entry(entry("c" * 32, created_at=T0 + 2, task="other"))
    latest = store.latest_entry("load-id")
    assert latest is not None
    assert latest["key"] == "b" * 32
    assert latest["components"] == {"arg `x`": "2"}
    assert latest["created_at"] == T0 + 1 and latest["expires_at"] is None


# -------------------------------------------------------------------------------- locks


def test_lock_events_and_current_locks(store):
    holder = _identity.holder_id("r1")
    store.record_lock_event(LockEvent("k1", holder, "acquired", T0, "file", lease_expires=T0 + 30))
    store.record_lock_event(LockEvent("k2", holder, "acquired", T0, "file", task="load"))
    store.flush()
    store.record_lock_event(
        LockEvent("k1", holder, "renewed", T0 + 20, "file", lease_expires=T0 + 50)
    )
    store.record_lock_event(LockEvent("k2", "other:1:2:3", "waited", T0 + 1, "file", waited=1.0))
    store.record_lock_event(LockEvent("k2", holder, "released", T0 + 2, "file"))
    locks = store.locks()
    assert list(locks.key) == ["k1"]
    row = locks.iloc[0]
    assert row.acquired == pd.Timestamp(T0, unit="s", tz="UTC")  # renewal keeps acquisition time
    assert row.lease_expires == pd.Timestamp(T0 + 50, unit="s", tz="UTC")
    events = store.lock_events()
    assert list(events.event) == ["renewed", "released", "waited", "acquired", "acquired"]
    assert len(store.lock_events(limit=2)) == 2
    with pytest.raises(ValueError, match="unknown lock event"):
        LockEvent("k", holder, "stolen", T0, "file")  # type: ignore[arg-type]


# ----------------------------------------------------------------------- crash marking


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = _identity.process_start_time(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, start


def test_mark_crashed_same_host(store):
    pid, start = _dead_pid()
    me = _identity.process()
    store.record_run(ev("dead", RunState.RUNNING, T0, pid=pid, pid_start=start))
    store.record_run(ev("dead-pending", RunState.PENDING, T0, pid=pid, pid_start=start))
    store.record_run(
        ev("recycled", RunState.RUNNING, T0, pid=me.pid, pid_start=(me.start_time or 0) + 12345)
    )
    store.record_run(ev("alive", RunState.RUNNING, T0))
    store.record_run(ev("done", RunState.COMPLETED, T0, pid=pid, pid_start=start))
    assert store.mark_crashed() == 3
    states = store.history().set_index("run_id").state.to_dict()
    assert states == {"dead": "CRASHED", "dead-pending": "CRASHED", "recycled": "CRASHED",
                      "alive": "RUNNING", "done": "COMPLETED"}  # fmt: skip
    assert str(pid) in one(store, "dead").error
    assert list(store.events("dead").state) == ["RUNNING", "CRASHED"]
    assert store.mark_crashed() == 0


def test_mark_crashed_other_hosts_use_heartbeats(store):
    now = time.time()
    store.record_run(ev("stale", RunState.RUNNING, now - 3600, host="elsewhere", pid=10))
    store.record_run(ev("fresh", RunState.RUNNING, now - 5, host="elsewhere", pid=11))
    store.record_run(
        ev("beating", RunState.RUNNING, now - 3600, host="elsewhere", pid=12, pid_start=None)
    )
    store.flush()
    store._write_now(
        lambda con: con.execute(
            "INSERT INTO processes VALUES ('elsewhere:12:0', 'elsewhere', 12, NULL, NULL, ?, ?)",
            [now - 7200, now - 30],
        )
    )
    assert store.mark_crashed() == 1
    assert store.history().set_index("run_id").state.to_dict() == {
        "stale": "CRASHED", "fresh": "RUNNING", "beating": "RUNNING",
    }  # fmt: skip


def test_crashed_runs_are_marked_on_first_use(path):
    pid, start = _dead_pid()
    with MetadataStore(path, auto_mark_crashed=False) as first:
        first.record_run(ev("dead", RunState.RUNNING, T0, pid=pid, pid_start=start))
    # A fresh process would do this on its first use; simulate with a fresh registry.
    metadata_registry._registry.pop(os.path.abspath(path), None)
    with MetadataStore(path) as second:
        assert one(second, "dead").state == "CRASHED"


def test_stale_lock_records_of_dead_processes_are_dropped(store):
    pid, start = _dead_pid()
    dead_holder = f"{_identity.process().host}:{pid}:{start}:1:r1"
    store.record_lock_event(LockEvent("k1", dead_holder, "acquired", T0, "file"))
    store.record_lock_event(LockEvent("k2", _identity.holder_id("r2"), "acquired", T0, "file"))
    store.mark_crashed()
    assert list(store.locks().key) == ["k2"]


# ------------------------------------------------------------------ schema and files


def test_schema_is_created_in_an_empty_duckdb_file(path):
    os.makedirs(os.path.dirname(path))
    duckdb.connect(path).close()  # a valid database without tables
    with MetadataStore(path, auto_mark_crashed=False) as store:
        assert store.history().empty
        versions = store.sql("SELECT version FROM schema_version").version.tolist()
        assert versions == list(range(1, metadata.SCHEMA_VERSION + 1))
        tables = set(store.sql("SELECT table_name FROM information_schema.tables").table_name)
        assert {
            "runs",
            "run_events",
            "cache_entries",
            "locks",
            "lock_events",
            "processes",
        } <= tables


def test_zero_byte_file_is_replaced(path):
    os.makedirs(os.path.dirname(path))
    open(path, "wb").close()
    with MetadataStore(path, auto_mark_crashed=False) as store:
        store.record_run(ev("r1", RunState.COMPLETED, T0))
        assert len(store.history()) == 1


def test_migrations_run_in_order_once(path, monkeypatch):
    with MetadataStore(path, auto_mark_crashed=False) as store:
        store.record_run(ev("r1", RunState.COMPLETED, T0))
    extra = max(metadata_database._MIGRATIONS) + 1
    migrations = {
        **metadata_database._MIGRATIONS,
        extra: ("ALTER TABLE runs ADD COLUMN extra VARCHAR",),
    }
    monkeypatch.setattr(metadata_database, "_MIGRATIONS", migrations)
    metadata_registry._registry.pop(os.path.abspath(path), None)
    with MetadataStore(path, auto_mark_crashed=False) as store:
        versions = store.sql("SELECT version FROM schema_version ORDER BY 1").version.tolist()
        assert versions == list(range(1, extra + 1))
        assert store.sql("SELECT run_id, extra FROM runs").extra.isna().all()
        store.record_run(ev("r2", RunState.COMPLETED, T0))
        assert len(store.history()) == 2
        assert store.sql("SELECT count(*) AS n FROM schema_version").n[0] == extra


def test_newer_schema_is_refused(path):
    with MetadataStore(path, auto_mark_crashed=False) as store:
        store._write_now(lambda con: con.execute("INSERT INTO schema_version VALUES (99, 0)"))
        with pytest.raises(MetadataError, match="Upgrade notebook_flow"):
            store.history()


def test_folder_is_created(tmp_path):
    path = tmp_path / "a" / "b" / "c" / "metadata.duckdb"
    with MetadataStore(path, auto_mark_crashed=False) as store:  # os.PathLike accepted
        store.record_run(ev("r1", RunState.COMPLETED, T0))
        assert len(store.history()) == 1
    assert path.is_file() and not (tmp_path / "a" / "b" / "c" / "metadata.duckdb.wal").exists()


def test_store_folder_deleted_while_in_use(store, path):
    store.record_run(ev("r1", RunState.COMPLETED, T0))
    store.flush()
    shutil.rmtree(os.path.dirname(path))
    store.record_run(ev("r2", RunState.COMPLETED, T0))
    assert list(store.history().run_id) == ["r2"]  # a fresh index; rebuild() restores entries


def test_corrupt_file_gives_a_clear_error(path):
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not a database " * 1000)
    store = MetadataStore(path, auto_mark_crashed=False)
    store.record_run(ev("r1", RunState.COMPLETED, T0))
    with pytest.raises(MetadataError, match="rebuild_index") as info:
        store.flush(timeout=60)
    assert path in str(info.value) and "mv " in str(info.value)
    with pytest.raises(MetadataError, match="rebuild_index"):
        store.history()
    os.rename(path, path + ".broken")  # the fix the message gives
    store.record_run(ev("r2", RunState.COMPLETED, T0))
    assert list(store.history().run_id) == ["r2"]
    store.close()


# ------------------------------------------------------------- concurrency and failures


def test_record_never_waits_for_the_database(store, path):
    held = filelock.FileLock(path + ".lock", thread_local=False)
    with held:
        for i in range(100):  # would hang (pytest-timeout) if recording waited for the lock
            store.record_run(ev(f"r{i}", RunState.CACHED, T0))
        with pytest.raises(MetadataError, match="not yet written"):
            store.flush(timeout=0.2)
    store.flush()
    assert len(store.history()) == 100


def test_a_full_queue_slows_producers_down_instead_of_losing_events(path, monkeypatch, caplog):
    """Back-pressure: past _MAX_PENDING queued events a producer waits for the recorder;
    only when the recorder makes no room within lock_timeout are new events dropped."""
    monkeypatch.setattr(metadata_recorder, "_MAX_PENDING", 10)
    # A lock_timeout far beyond the hold: on a loaded machine the release and the drain
    # may come long after 0.3 s, and nothing may be dropped for that.
    store = MetadataStore(path, lock_timeout=120)
    held = filelock.FileLock(path + ".lock", thread_local=False)
    held.acquire()
    release = threading.Timer(0.3, held.release)
    release.start()
    t0 = time.monotonic()
    for i in range(30):  # the 11th waits until the lock is released and the queue drains
        store.record_run(ev(f"r{i}", RunState.CACHED, T0))
    assert time.monotonic() - t0 >= 0.25
    store.flush()
    assert len(store.history()) == 30  # nothing lost
    assert "dropping new ones" not in caplog.text
    store.close()
    # A recorder that cannot write for lock_timeout: producers stop waiting and drop.
    other = os.path.join(os.path.dirname(path), "other", "metadata.duckdb")
    store = MetadataStore(other, lock_timeout=0.5)
    with filelock.FileLock(other + ".lock", thread_local=False):
        for i in range(30, 41):  # ten fit; the eleventh waits 0.5 s, then is dropped
            store.record_run(ev(f"r{i}", RunState.CACHED, T0))
    assert "dropping new ones" in caplog.text
    store.flush()
    # The first events are kept (the queue's ten, one of them maybe in the recorder's hands),
    # the last are dropped: never one from the middle.
    kept = sorted(store.history(limit=100)["run_id"])
    assert 9 <= len(kept) <= 10 and kept == [f"r{i}" for i in range(30, 30 + len(kept))]
    store.close()


def test_lock_timeout_names_the_lock_file(path):
    held = filelock.FileLock(path + ".lock", thread_local=False)
    os.makedirs(os.path.dirname(path))
    with held, MetadataStore(path, lock_timeout=0.2, auto_mark_crashed=False) as store:
        with pytest.raises(MetadataError, match=r"metadata\.duckdb\.lock"):
            store.history()


def test_foreign_duckdb_connection_is_waited_for(path):
    """A process that opens the file without our lock: opening fails, we retry, nothing is lost."""
    with MetadataStore(path, auto_mark_crashed=False) as store:
        store.record_run(ev("r0", RunState.COMPLETED, T0))
        store.flush()
        code = textwrap.dedent(f"""
            import duckdb, sys, time
            deadline = time.monotonic() + 120
            while True:  # our recorder may still be closing its session: wait for it
                try:
                    con = duckdb.connect({path!r})
                    break
                except duckdb.IOException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            print("open", flush=True)
            time.sleep(0.7)
            con.close()
        """)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "open"
        store.record_run(ev("r1", RunState.COMPLETED, T0 + 1))
        store.flush(timeout=60)
        assert proc.wait() == 0
        assert sorted(store.history().run_id) == ["r0", "r1"]


def test_transient_write_failure_is_retried(store, monkeypatch):
    real = metadata._Database.write
    calls = []

    def flaky(self, deadline, body, *after_commit):
        calls.append(1)
        if len(calls) == 1:
            real(self, deadline, body, *after_commit)  # committed, but the caller sees an error
            raise MetadataError("disk hiccup")
        return real(self, deadline, body, *after_commit)

    monkeypatch.setattr(metadata._Database, "write", flaky)
    store.record_run(ev("r1", RunState.RUNNING, T0))
    store.record_lock_event(LockEvent("k", "h:1:2:3", "waited", T0, "file"))
    store.flush(timeout=60)
    assert len(calls) == 2
    assert len(store.events()) == 1  # the retry skipped rows the first commit wrote
    assert len(store.lock_events()) == 1


def test_a_read_writes_pending_events_in_the_same_session(store, monkeypatch):
    """stats()/history() with events queued: one read-write session writes them and then
    reads (no second, read-only open); user SQL still gets a read-only connection."""
    store.record_run(ev("r0", RunState.COMPLETED, T0))
    store.flush()
    opened: list[bool] = []
    real = metadata._Database._connect

    def connect(self, *, read_only, deadline):
        opened.append(read_only)
        return real(self, read_only=read_only, deadline=deadline)

    monkeypatch.setattr(metadata._Database, "_connect", connect)
    store.record_run(ev("r1", RunState.CACHED, T0 + 1, saved=2.0))
    assert store.stats()["hits"] == 1
    assert opened == [False]
    opened.clear()
    store.record_run(ev("r2", RunState.CACHED, T0 + 2))
    assert len(store.sql("SELECT * FROM runs")) == 3
    assert opened == [False, True]  # flushed, then read on a read-only connection
    with pytest.raises(MetadataError, match="read-only"):
        store.sql("DELETE FROM runs")
    # A failing read in the writing session: the events are written all the same.
    store.record_run(ev("r3", RunState.CACHED, T0 + 3))
    with pytest.raises(MetadataError):
        store._read("SELECT * FROM no_such_table")
    assert store._recorder().pending() == 0
    assert len(store.history()) == 4


def test_writes_leave_the_wal_to_an_idle_checkpoint(path, monkeypatch):
    """A write session closes without checkpointing (~20-50 ms saved per transaction);
    the recorder checkpoints once the process has been idle, and when it stops."""
    monkeypatch.setattr(metadata_recorder, "_IDLE_CHECKPOINT", 0.3)
    store = MetadataStore(path)
    wal = path + ".wal"
    store.record_run(ev("r1", RunState.CACHED, T0))
    store.flush()
    assert os.path.exists(wal)  # committed, still in the WAL
    assert len(store.history()) == 1  # readers see it (DuckDB replays the WAL)
    deadline = time.monotonic() + 10
    while os.path.exists(wal) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(wal)
    monkeypatch.setattr(metadata_recorder, "_IDLE_CHECKPOINT", 3600.0)
    store.record_run(ev("r2", RunState.CACHED, T0))
    store.flush()
    assert os.path.exists(wal)
    store.close()  # stops the recorder, which checkpoints on its way out
    assert not os.path.exists(wal)
    assert len(MetadataStore(path).history()) == 2


def test_threads_share_one_store(store):
    def work(n):
        for i in range(50):
            store.record_run(ev(f"t{n}-{i}", RunState.CACHED, T0 + i))
            if i % 10 == 0:
                store.history(limit=5)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.history()) == 200


def test_stores_of_one_file_share_a_recorder(path):
    a = MetadataStore(path, auto_mark_crashed=False)
    b = MetadataStore(path, auto_mark_crashed=False)
    assert a._recorder() is b._recorder()
    a.record_run(ev("r1", RunState.COMPLETED, T0))
    a.close()
    b.record_run(ev("r2", RunState.COMPLETED, T0))  # still works after the other closed
    assert len(b.history()) == 2
    b.close()


def test_pickles_its_configuration_only(store):
    store.record_run(ev("r1", RunState.COMPLETED, T0))
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path == store.path and clone.auto_mark_crashed is False
    assert list(clone.history().run_id) == ["r1"]
    assert b"Thread" not in pickle.dumps(store)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_rewrite_the_parents_queue(store, path):
    held = filelock.FileLock(path + ".lock", thread_local=False)
    held.acquire()
    try:
        for i in range(10):
            store.record_run(ev(f"p{i}", RunState.CACHED, T0))  # queued: the lock is held
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                store.record_run(ev("child", RunState.CACHED, T0))
                store.flush(timeout=60)
                code = 0
            finally:
                os._exit(code)
    finally:
        held.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sorted(store.history().run_id) == ["child"] + [f"p{i}" for i in range(10)]
    assert len(store.events()) == 11


def test_pending_events_are_written_at_exit(path):
    code = textwrap.dedent(f"""
        import time
        from notebook_flow.metadata import MetadataStore, RunEvent
        store = MetadataStore({path!r})
        for i in range(20):
            store.record_run(RunEvent(f"r{{i}}", "t", "t-id", None, "COMPLETED", time.time()))
        # no flush, no close: the atexit hook writes them
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with MetadataStore(path, auto_mark_crashed=False) as store:
        assert len(store.history()) == 20


def test_exit_with_daemon_threads_inside_duckdb_does_not_abort(path):
    """A daemon thread inside DuckDB at interpreter exit aborts the process unless the exit
    hook lets its session finish and keeps it out of DuckDB afterwards."""
    code = textwrap.dedent(f"""
        import threading, time
        from notebook_flow.metadata import MetadataStore, RunEvent
        store = MetadataStore({path!r})
        store.record_run(RunEvent("r1", "t", "t-id", None, "COMPLETED", time.time()))
        store.flush()
        def spin():
            while True:
                store.history()
                store.record_run(RunEvent("r1", "t", "t-id", None, "COMPLETED", time.time()))
        for _ in range(2):
            threading.Thread(target=spin, daemon=True).start()
        time.sleep(0.3)
    """)
    for _ in range(2):  # without the hook, this aborted (SIGABRT) most of the time
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_replayed_batch_is_deduplicated(store):
    events = [ev("r1", RunState.PENDING, T0), ev("r1", RunState.COMPLETED, T0 + 1)]
    for e in events:
        store.record_run(e)
    store.flush()
    rec = store._recorder()
    store._write_now(lambda con: metadata._write_batch(con, rec, list(events), True))
    assert len(store.events()) == 2
    assert one(store, "r1").state == "COMPLETED"


def test_history_a_process_could_not_write_before_exiting_is_kept_for_the_next_session(
    run_history_held, python_env, isolated_store
):
    """Another process holds the index (a paused kernel) while one exits: its queued events
    go to a spill file, and the next session anywhere writes them, each exactly once even if
    a file is seen twice (a session that died between commit and removal)."""
    import notebook_flow as nf

    code = textwrap.dedent(
        """
        import notebook_flow as nf
        from notebook_flow.metadata import registry
        registry._EXIT_FLUSH_TIMEOUT = 0.5

        @nf.task
        def double(x):
            return 2 * x

        print(sum(double(i) for i in range(3)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=python_env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "6", out.stderr
    folder = isolated_store / "metadata.duckdb.spill"
    (kept,) = folder.glob("*.json")
    shutil.copy(kept, folder / f"again-{kept.name}")
    run_history_held()  # the other process lets go
    runs = nf.history()
    assert sorted(runs.state) == ["COMPLETED"] * 3
    assert sorted(runs.task) == ["double"] * 3
    assert not list(folder.glob("*.json"))


def test_an_unreadable_spill_file_is_set_aside_not_lost(isolated_store):
    import notebook_flow as nf

    folder = isolated_store / "metadata.duckdb.spill"
    folder.mkdir(parents=True)
    (folder / "host-1-2.json").write_text("[{not json")
    assert nf.history().empty
    assert (folder / "host-1-2.json.broken").read_text() == "[{not json"


# -- the write path binds no parameters (schema._lit)

_texts = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", "'", "''", "\\", "\\'", "a\x00b", "\x00", "it's", "--", "/*", ";", "é\u2028漢"]
)
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e9, max_value=2e9),  # epoch seconds, our commonest value
    _texts,
    st.lists(_texts, max_size=4).map(tuple),
)


def _column_type(value: object) -> str:
    if isinstance(value, bool):
        return "BOOLEAN"
    return {int: "BIGINT", float: "DOUBLE", str: "VARCHAR", tuple: "VARCHAR[]"}.get(
        type(value), "VARCHAR"
    )


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(row=st.lists(_values, min_size=1, max_size=6))
def test_a_literal_reads_back_as_the_value_a_parameter_binds(row):
    """Every value the write path renders as SQL text (to spare the pandas import that
    binding a parameter costs) must read back exactly as the bound parameter does: a
    rounded timestamp or a mangled string would be a wrong history."""
    from notebook_flow.metadata.schema import _values

    con = duckdb.connect()
    columns = ", ".join(f"c{i} {_column_type(v)}" for i, v in enumerate(row))
    con.execute(f"CREATE TABLE t ({columns})")
    con.execute(f"INSERT INTO t VALUES ({_values(row)})")
    con.execute(f"INSERT INTO t VALUES ({', '.join('?' * len(row))})", list(row))
    literal, bound = con.execute("SELECT * FROM t").fetchall()
    for a, b in zip(literal, bound, strict=True):
        if isinstance(b, float) and b != b:
            assert a != a
        else:
            assert a == b and type(a) is type(b), (a, b)


def test_a_literal_of_a_kind_it_does_not_know_is_refused():
    from notebook_flow.metadata.schema import _lit

    with pytest.raises(TypeError, match="no SQL literal for a bytes"):
        _lit(b"x")


def test_recording_runs_imports_neither_pandas_nor_pyarrow(tmp_path):
    """A notebook that never used pandas pays nothing for it: DuckDB imports numpy, pandas
    and pyarrow to bind a parameter or scan Arrow (~0.5-2 s, often at the kernel's exit)."""
    code = textwrap.dedent(
        f"""
        import sys
        import notebook_flow as nf
        from notebook_flow.config import get_metadata
        nf.configure(store={str(tmp_path)!r})

        @nf.task
        def f(x):
            return x + 1

        assert f(1) == f(1) == 2  # a miss (explained from the index), then a hit
        f.with_options(refresh_cache=True)(1)
        get_metadata()._recorder().flush(60)
        loaded = [m for m in ("numpy", "pandas", "pyarrow") if m in sys.modules]
        assert "duckdb" in sys.modules and not loaded, loaded
        stats = get_metadata().stats()
        assert (stats["runs"], stats["hits"], stats["misses"]) == (3, 1, 2), stats
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
