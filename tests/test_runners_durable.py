"""Durable submissions: SIGKILL a process in the middle of a map, then resume() the runs it
left unfinished. Executions are counted with O_EXCL marker files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

# Imported up front: a worker thread's commit (serializers' accepts()) can otherwise see
# a half-imported pandas while the main thread imports it for history() (reported).
import pandas  # noqa: F401
import pytest
from _marks import MARK, count_marks, wait_for

import notebook_flow as nf
from notebook_flow import config, task
from notebook_flow.cache_policies import NONE
from notebook_flow.runners import journal, resume, shutdown
from notebook_flow.runners.resume import read_journal

SCRIPT = (
    textwrap.dedent(
        """
        import os, sys, threading, time
        import notebook_flow as nf
        from notebook_flow.cache_policies import INPUTS, NONE
        """
    )
    + MARK
    + textwrap.dedent(
        """
        @nf.task(cache_policy=INPUTS)
        def work(i):
            mark(f"work-{i}")
            if os.environ.get("BLOCK") and i >= 30:
                while True:
                    time.sleep(0.05)
            return i * 2

        @nf.task(cache_policy=NONE)
        def plus_one(x):
            mark(f"plus-{x}")
            return x + 1

        @nf.task(cache_policy=NONE)
        def total(values):
            mark("total")
            return sum(values)

        @nf.task(cache_policy=NONE)
        def holds(lock):
            return 1

        early = work.submit(-1)
        early.result()
        futs = work.map(range(100))
        after = plus_one.submit(futs[40])
        both = total.submit([early, futs[50]])
        nope = holds.submit(threading.Lock(), wait_for=[futs[99]])
        for f in futs[:30]:
            f.result()
        # The PENDING events reach DuckDB in the recorder's next batch; make that "now" so the
        # test can check they turn CRASHED (the journal is awaited by the test itself).
        nf.config.get_metadata().flush()
        print("ready", flush=True)
        time.sleep(600)
        """
    )
)


@pytest.fixture(autouse=True)
def _shutdown_worker():
    yield
    shutdown(wait=True)


def test_resume_after_sigkill_runs_only_what_was_unfinished(tmp_path, python_env, monkeypatch):
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = dict(python_env, MARKS=str(marks), BLOCK="1", NOTEBOOK_FLOW_WORKERS="4")
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        # The four workers are stuck in runs 30..33: the map is half done. The writer
        # thread journals within milliseconds; wait for it (an event, not a duration).
        wait_for(
            lambda: sum(1 for p in marks.iterdir() if p.name.startswith("work-3")) >= 4,
            "4 blocked runs",
        )
        folder = Path(config.get_store().local_dir("journal"))
        [journal] = [p for p in folder.iterdir() if f"_{proc.pid}_" in p.name]
        wait_for(
            lambda: len(read_journal(str(journal)).done) >= 31, "the journal of 31 finished runs"
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    before = count_marks(marks)
    assert sum(v for k, v in before.items() if k.startswith("work-")) == 35

    monkeypatch.setenv("MARKS", str(marks))
    futs = resume()
    assert len(futs) == 70 + 2  # the unfinished work runs, plus_one(futs[40]), total(...)
    results = {}
    for f in futs:
        results.setdefault(f.task.name, []).append(f.result(timeout=120))
    assert sorted(results["work"]) == [i * 2 for i in range(30, 100)]
    assert results["plus_one"] == [81]
    assert results["total"] == [-2 + 100]  # its finished upstream was re-submitted: a hit

    after = count_marks(marks)
    for i in range(100):  # unfinished runs executed (again); finished ones never again
        assert after.get(f"work-{i}") == (2 if 30 <= i < 34 else 1), i
    assert after["work--1"] == 1 and after["plus-80"] == 1 and after["total"] == 1

    # holds() took a lock: it cannot be journaled, and resume() says so.
    [skipped] = [s for s in futs.skipped if s.task == "holds"]
    assert "cannot be pickled" in skipped.reason

    # The dead process's unfinished runs are CRASHED in the history; the resumed ones ran.
    config.wait_startup()
    config.get_metadata().flush()
    h = nf.history()
    states = dict(zip(h["run_id"], h["state"].astype(str)))
    assert {states.get(futs.resumed_from[f.run_id]) for f in futs} == {"CRASHED"}
    assert {states[f.run_id] for f in futs if f.task.name == "work"} == {"COMPLETED"}

    # The journal was claimed and removed: a second resume() finds nothing.
    assert len(resume()) == 0
    folder = config.get_store().local_dir("journal")
    assert [n for n in os.listdir(folder) if f"_{os.getpid()}_" not in n] == []


gate = threading.Event()


@task(cache_policy=NONE)
def held():
    assert gate.wait(60)


@task(cache_policy=NONE)
def quick(i):
    return i


def test_journal_stays_small_and_keeps_only_live_runs(monkeypatch):
    monkeypatch.setattr(journal, "_COMPACT_AT", 8192)
    gate.clear()
    live = held.submit()
    journal.flush()  # its own batch: the only live content of the journal
    try:
        for _ in range(5):
            quick.map(range(200)).result(timeout=60)
        journal.flush()
        j = journal.journal_for(config.get_store())
        static = sum(len(frame) for frame in j._static)  # header, task defs, cell sources
        path = j.path
        # Rewritten whenever it outgrows 4× its live content (here: one held run).
        assert path is not None and os.path.getsize(path) <= static + 8192
        contents = read_journal(path)
        submitted = [run_id for meta, _ in contents.batches for run_id, _, _ in meta]
        assert set(submitted) - contents.done == {live.run_id}
    finally:
        gate.set()
    live.result(timeout=60)
