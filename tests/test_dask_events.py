"""Run events made on Dask workers: the event-file format (untrusted input), and how a
later client or ``rebuild_index()`` ingests them (no cluster needed here)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import notebook_flow as nf
from notebook_flow.config import get_metadata, get_store
from notebook_flow.metadata import CacheEntry, LockEvent, RunEvent
from notebook_flow.metadata.remote import decode, encode, ingest, session_dir
from notebook_flow.states import RunState
from notebook_flow.storage import files

KEY = b"k" * 32


def _event(state: RunState, at: float, **fields) -> RunEvent:
    return RunEvent("r" * 32, "square", "m:square", "a" * 32, state, at, **fields)


def test_event_files_round_trip_and_refuse_tampering():
    ops = [
        _event(RunState.RUNNING, 1.0, explain="why", tags=("t",)),
        _event(RunState.COMPLETED, 2.0, duration=1.0, size=3),
        CacheEntry("a" * 32, "square", "m:square", 3, 2.0, None, 1.0, "json", "", {"x": "1"}),
        LockEvent("a" * 32, "h:1:2:3", "acquired", 1.5, "RedisLockManager"),
    ]
    blob = encode(ops, KEY)
    assert decode(blob, KEY) == ops
    head, body = blob.split(b"\n", 1)
    with pytest.raises(ValueError, match="signed"):
        decode(head + b"\n" + body.replace(b"COMPLETED", b"FAILED\x20\x20\x20"), KEY)
    with pytest.raises(ValueError, match="signed"):
        decode(blob, b"x" * 32)
    with pytest.raises(ValueError, match="signed"):
        decode(encode(ops, None), KEY)  # unsigned, while this store signs
    with pytest.raises(ValueError, match="not an event file"):
        decode(b"garbage", None)


def test_invalid_events_are_skipped_one_by_one():
    good = _event(RunState.CACHED, 3.0)
    blob = encode([good], None)
    head, body = blob.split(b"\n", 1)
    items = json.loads(body)
    items += [
        {"run": {**items[0]["run"], "state": "EXPLODED"}},
        {"run": {**items[0]["run"], "at": "yesterday"}},
        {"lock": {"key": "k", "holder": "h", "event": "stolen", "at": 1.0, "manager": "m"}},
        {"other": {}},
        "a string",
    ]
    assert decode(head + b"\n" + json.dumps(items).encode(), None) == [good]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_a_dead_clients_run_finished_by_a_worker_is_completed_not_crashed():
    meta = get_metadata()
    run_id = "d" * 32
    pid = _dead_pid()
    pending = RunEvent(run_id, "square", "m:square", "a" * 32, RunState.PENDING, time.time() - 5,
                       pid=pid, pid_start=None)  # fmt: skip
    meta.record_run(pending)
    meta.flush()
    assert meta.mark_crashed() == 1
    assert nf.history()["state"].tolist() == ["CRASHED"]
    # What the worker spooled for that run (it carries the worker's own pid).
    done = RunEvent(run_id, "square", "m:square", "a" * 32, RunState.COMPLETED,
                    time.time() - 4, duration=0.5)  # fmt: skip
    store = get_store()
    data = encode([done], store._signing_key() if store.signing else None)
    files.write_atomic(
        store, f"{session_dir('host_1_2_abc')}/w-1.json", lambda w: w(memoryview(data))
    )
    nf.rebuild_index()
    history = nf.history()
    assert history["state"].tolist() == ["COMPLETED"] and history["error"].isna().all()
    nf.rebuild_index()  # idempotent: the same file ingested again adds nothing
    events = meta.events(run_id)
    # In time order: the crash mark came later than the worker's COMPLETED, and lost.
    assert events["state"].tolist() == ["PENDING", "COMPLETED", "CRASHED"]


def test_ingest_skips_events_already_in_the_index():
    meta = get_metadata()
    ops = [_event(RunState.RUNNING, 1.0), _event(RunState.COMPLETED, 2.0)]
    for op in ops:
        meta.record_run(op)
    meta.flush()
    ingest(meta, ops)
    assert len(meta.events("r" * 32)) == 2
