"""The runs listing held in memory (``dashboard/runs_memory.py``): its pages are the pages
an SQL read returns (filters, orders, NULLs, ties), it follows the index as runs come, and
holding it never keeps the DuckDB file open: another process records runs while the
dashboard pages through them."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from notebook_flow import config
from notebook_flow.dashboard import runs_memory
from notebook_flow.dashboard.queries import RunFilters, Source
from notebook_flow.metadata import RunEvent
from notebook_flow.states import RunState

N = 600
PAGE = 40
STATES = (RunState.CACHED, RunState.COMPLETED, RunState.FAILED, RunState.RUNNING)


def _record(first: int, n: int, at: float) -> None:
    """``n`` runs over 2 tasks and 2 notebooks (one run in 5 without one); four share each
    creation time, and running ones have no duration (NULLs in the "slowest" order)."""
    meta = config.get_metadata(config.get_store())
    for i in range(first, first + n):
        state = STATES[i % len(STATES)]
        meta.record_run(
            RunEvent(
                f"{(i * 7919) % 100_003:032x}", f"task_{i % 2}", f"t:task_{i % 2}",
                f"{i:032x}", state, at + (i // 4),
                duration=None if state is RunState.RUNNING else (i % 13) / 10,
                notebook=None if i % 5 == 0 else f"/p/nb_{i % 3 % 2}.ipynb",
                host="h", pid=1, kernel="k",
            )
        )  # fmt: skip
    meta.flush(60)


FILTERS = [
    RunFilters(),
    RunFilters(task="task_1"),
    RunFilters(states=("FAILED", "RUNNING")),
    RunFilters(notebook="/p/nb_0.ipynb", states=("CACHED",)),
    RunFilters(task="task_0", since=1_000.0 + 40, until=1_000.0 + 120),
    RunFilters(task="no such task"),
]


@pytest.mark.parametrize("sort", ["newest", "oldest", "slowest"])
def test_memory_pages_are_the_pages_sql_reads(sort: str) -> None:
    _record(0, N, 1_000.0)
    memory, sql = Source(), Source(in_memory=False)
    for filters in FILTERS:
        for page in (0, 1, 4, 7, 14):
            got = memory.runs_page(filters, page=page, page_size=PAGE, sort=sort, ahead=2, behind=1)
            want = sql.runs_page(filters, page=page, page_size=PAGE, sort=sort, ahead=2, behind=1)
            assert (got.total, got.page) == (want.total, want.page), (filters, page)
            assert list(got.window["run_id"]) == list(want.window["run_id"]), (filters, page)
            assert list(got.rows["run_id"]) == list(want.rows["run_id"]), (filters, page)
    held = runs_memory._snapshots[memory._signature()[0]]
    assert held.runs is not None and held.runs.num_rows == N  # pages did come from memory


def test_memory_pages_follow_new_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    _record(0, N, 1_000.0)
    source, filters = Source(), RunFilters()
    before = source.runs_page(filters, page=0, page_size=PAGE)
    _record(N, 9, 5_000.0)  # newer: on top of "newest"
    for gap in (runs_memory.RELOAD_GAP, 0.0):  # read just now (SQL), then read again
        monkeypatch.setattr(runs_memory, "RELOAD_GAP", gap)
        after = source.runs_page(filters, page=0, page_size=PAGE)
        fresh = Source(in_memory=False).runs_page(filters, page=0, page_size=PAGE)
        assert after.total == before.total + 9 == fresh.total
        assert list(after.rows["run_id"]) == list(fresh.rows["run_id"])
    held = runs_memory._snapshots[source._signature()[0]]
    assert held.runs is not None and held.runs.num_rows == N + 9


WRITER = r"""
import sys, time
from notebook_flow.metadata import MetadataStore, RunEvent
path, n = sys.argv[1], int(sys.argv[2])
store = MetadataStore(path, lock_timeout=20)
for i in range(n):
    store.record_run(RunEvent(f"w{i:05d}", "writer", "writer-id", None, "COMPLETED",
                              2_000_000_000.0 + i, duration=0.1))
    if i % 10 == 9:
        store.flush(20)
        time.sleep(0.01)
store.close()
print("wrote", n, flush=True)
"""


def test_another_process_records_runs_while_the_dashboard_pages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """DuckDB lets one process open the file at a time: a dashboard that kept it open
    between reads would make the writer fail (its lock wait is short here)."""
    _record(0, N, 1_000.0)
    source = Source()
    source.runs_page(RunFilters(), page=0, page_size=PAGE)  # the listing is held now
    path = source._signature()[0]
    stop = threading.Event()
    pages = 0

    def page_through() -> None:
        nonlocal pages
        while not stop.is_set():
            source.runs_page(RunFilters(), page=pages % 15, page_size=PAGE, sort="oldest")
            pages += 1

    reader = threading.Thread(target=page_through, daemon=True)
    reader.start()
    try:
        writer = subprocess.run(
            [sys.executable, "-c", WRITER, path, "200"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        stop.set()
        reader.join(60)
    assert writer.returncode == 0, writer.stderr
    assert "Traceback" not in writer.stderr, writer.stderr
    assert pages > 0
    time.sleep(runs_memory.RELOAD_GAP)
    last = source.runs_page(RunFilters(), page=0, page_size=PAGE)  # newest: the writer's
    assert last.total == N + 200
    assert list(last.rows["run_id"][:3]) == ["w00199", "w00198", "w00197"]
    assert runs_memory._snapshots[path].runs.num_rows == N + 200
