"""Many processes, one DuckDB metadata file (DESIGN.md, "Metadata": the measured hazard).

8 writer processes × 200 runs × 3 transitions while a reader process calls history() in a
loop: every acknowledged event must land exactly once, and no process may see an error.
A writer killed with SIGKILL loses nothing it flushed, and its runs in flight become CRASHED.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from notebook_flow.metadata import MetadataStore

pytestmark = pytest.mark.slow

WRITERS, RUNS = 8, 200

WRITER = r"""
import json, os, random, sys, time
from notebook_flow.metadata import MetadataStore, RunEvent

import duckdb, pandas, pyarrow  # imported up front: measure writing, not importing

path, wid, runs, go, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
store = MetadataStore(path)
recorder = store._recorder()
rng = random.Random(wid)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
start = time.time()
for i in range(runs):
    run_id = f"w{wid}-{i:04d}"
    for state in ("PENDING", "RUNNING", "COMPLETED"):
        store.record_run(RunEvent(run_id, f"task{wid % 3}", f"task{wid % 3}-id", None, state,
                                  time.time(), inputs=json.dumps({"i": i})))
        if mode == "paced":
            time.sleep(rng.random() * 0.002)
    if mode != "burst" and i % 25 == 24:
        store.flush()
        print("acked", i, flush=True)
store.close()
print(json.dumps({"batches": recorder.batches, "start": start, "end": time.time(),
                  "held": recorder.lock_held, "waited": recorder.lock_wait}), flush=True)
"""

READER = r"""
import json, os, sys
from notebook_flow.metadata import MetadataStore

path, done = sys.argv[1], sys.argv[2]
store = MetadataStore(path)
reads, last = 0, 0
while not os.path.exists(done):
    df = store.history()
    assert len(df) >= last, (len(df), last)  # committed runs never disappear
    assert set(df.state) <= {"PENDING", "RUNNING", "COMPLETED"}, set(df.state)
    last, reads = len(df), reads + 1
store.close()
print(json.dumps({"reads": reads, "last": last}), flush=True)
"""


def _spawn(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # Any retry, drop or traceback is logged to stderr: there must be none.
    assert "Traceback" not in err and "metadata" not in err.lower(), err
    return out


@pytest.mark.parametrize("mode", ["paced", "burst"])
def test_many_writers_and_a_reader_lose_nothing(tmp_path, mode, capsys):
    path = str(tmp_path / "store" / "metadata.duckdb")
    go, done = tmp_path / "go", tmp_path / "done"
    writers = [_spawn(WRITER, path, w, RUNS, go, mode) for w in range(WRITERS)]
    reader = _spawn(READER, path, done)
    for w in writers:  # wait until all have imported; the go file starts everyone at once
        assert w.stdout is not None and w.stdout.readline().strip() == "ready"
    go.touch()
    results = [json.loads(_finish(w).splitlines()[-1]) for w in writers]
    done.touch()
    read = json.loads(_finish(reader).splitlines()[-1])

    with MetadataStore(path, auto_mark_crashed=False) as store:
        history = store.history()
        events = store.events()
        assert len(history) == WRITERS * RUNS
        assert history.run_id.is_unique
        assert set(history.state) == {"COMPLETED"}
        assert len(events) == 3 * WRITERS * RUNS
        per_run = events.groupby("run_id").state.agg(lambda s: ",".join(sorted(s)))
        assert (per_run == "COMPLETED,PENDING,RUNNING").all()
        assert history.started.notna().all() and history.ended.notna().all()
        assert store.stats()["in_flight"] == 0

    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    batches = sum(r["batches"] for r in results)
    held = sum(r["held"] for r in results)
    with capsys.disabled():
        print(
            f"\n[{mode}] {3 * WRITERS * RUNS} events from {WRITERS} processes in {elapsed:.2f}s "
            f"= {3 * WRITERS * RUNS / elapsed:.0f} events/s; {batches} transactions "
            f"({3 * WRITERS * RUNS / batches:.1f} events each, "
            f"{1000 * held / batches:.0f} ms in the lock); "
            f"reader: {read['reads']} history() calls"
        )


def test_sigkilled_writer_loses_nothing_it_flushed(tmp_path):
    path = str(tmp_path / "store" / "metadata.duckdb")
    go = tmp_path / "go"
    victim = _spawn(WRITER, path, 0, 100_000, go, "flush")
    others = [_spawn(WRITER, path, w, RUNS // 2, go, "paced") for w in range(1, 4)]
    for w in [victim, *others]:
        assert w.stdout is not None and w.stdout.readline().strip() == "ready"
    go.touch()
    acked = -1
    assert victim.stdout is not None
    while acked < 149:  # six acknowledged flushes, then kill it wherever it is
        line = victim.stdout.readline()
        assert line, victim.stderr.read() if victim.stderr else ""
        acked = int(line.split()[1])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for w in others:
        _finish(w)

    with MetadataStore(path) as store:  # first use marks the victim's runs in flight crashed
        history = store.history().set_index("run_id")
        mine = history[history.index.str.startswith("w0-")]
        flushed = [f"w0-{i:04d}" for i in range(acked + 1)]
        assert (mine.loc[flushed].state == "COMPLETED").all()  # acknowledged ⇒ durable
        assert set(mine.state) <= {"COMPLETED", "CRASHED"}
        assert len(history) - len(mine) == 3 * (RUNS // 2)
        assert set(history.drop(mine.index).state) == {"COMPLETED"}
        events = store.events()
        assert not events.duplicated(["run_id", "state", "time"]).any()
