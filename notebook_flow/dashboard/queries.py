"""The dashboard's view of one store: its queries over the metadata index and its actions.

``Source`` gathers them by concern: the overview, filter choices, a run's detail and the
timeline here; the runs table's pages in ``runs_pages`` (from memory while the index is
unchanged, see ``runs_memory``); the cache, locks and queue tabs and their actions in
``store_queries``. The shapes they return and the filters and orders they take are in
``model``.

Every read goes through ``MetadataStore.sql`` (the cross-process-safe path: file lock →
read-only open → query → close), so the dashboard never holds the DuckDB file open and a
kernel writing runs at the same moment only makes a read wait. Queries return small
DataFrames; 100,000 runs never travel to the browser.

Times in the index are epoch seconds (DOUBLE). Hits are runs in state CACHED, misses runs
of a cached task (with a key) that did not hit — the definitions of ``MetadataStore.stats``;
the hit rate is hits / (hits + misses).

>>> source = Source()                                       # doctest: +SKIP
>>> page = source.runs_page(RunFilters(task="load"), page=0, page_size=50)   # doctest: +SKIP
>>> page.total, len(page.rows)                              # doctest: +SKIP
(100000, 50)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .model import (
    BUCKETS,
    IN_FLIGHT,
    LANES,
    SORTS,
    TIMELINE_LIMIT,
    WORKER_SQL,
    Overview,
    Page,
    RunFilters,
    bucket_width,
    py_scalar,
)
from .runs_pages import RunsPages
from .store_queries import StoreQueries

if TYPE_CHECKING:
    import pandas as pd

    from notebook_flow.metadata import MetadataStore
    from notebook_flow.storage import ResultStore

__all__ = [
    "IN_FLIGHT",
    "LANES",
    "SORTS",
    "WORKER_SQL",
    "Overview",
    "Page",
    "RunFilters",
    "Source",
    "bucket_width",
]

#: Reads shared between the sessions of this process: (index path, name) → (signature, value).
_shared_reads: dict[tuple[Any, str], tuple[tuple[Any, ...], Any]] = {}
_shared_lock = threading.Lock()


@dataclass
class Source(RunsPages, StoreQueries):
    """The dashboard's view of one store: queries over its metadata and the actions on it.

    Built from a ``ResultStore`` (default: the configured store); the metadata store comes
    from ``config.get_metadata`` so the dashboard shares the process's recorder.
    """

    store: ResultStore | None = None
    meta: MetadataStore = field(init=False)
    #: Page runs from the listing held in memory while the index is unchanged (False: SQL).
    in_memory: bool = True
    _cache_columns: set[str] | None = field(default=None, init=False, repr=False)
    #: (listing, limit, offset) → ``created`` of the last row it returned (``_read_runs``).
    _bounds: dict[tuple[Any, ...], float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        from notebook_flow.config import get_metadata, get_store, wait_startup

        self.store = get_store(self.store)
        wait_startup(self.store)
        self.meta = get_metadata(self.store)

    @property
    def url(self) -> str:
        assert self.store is not None
        return str(self.store.url)

    @property
    def project_dir(self) -> str | None:
        """The folder that holds a local store (notebook paths are shown relative to it)."""
        import os

        url = self.url
        if url.startswith("file://"):
            url = url[len("file://") :]
        elif "://" in url:
            return None
        return os.path.dirname(os.path.abspath(url.rstrip("/\\")))

    # -- plumbing ----------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Run read-only SQL on the index (``MetadataStore.sql``).

        Contention is handled there: a read waits for the cross-process lock while kernels
        write (and retries opening a file another program holds); what reaches the caller is
        a ``MetadataError`` after that wait, which the app shows as "waiting", not as a failure.
        """
        return self.meta.sql(sql, list(params))

    # -- overview ----------------------------------------------------------------------------

    def _signature(self) -> tuple[Any, ...] | None:
        """What identifies the index's content now: inode, size and times of its file and WAL
        (every write changes one of them); None when the index is not a local file."""
        path = getattr(self.meta, "path", None)
        if not isinstance(path, str):
            return None
        parts: list[Any] = [path]
        for name in (path, path + ".wal"):
            try:
                st = os.stat(name)
            except OSError:
                parts.append(None)
            else:
                parts.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(parts)

    def _shared(self, name: str, read: Callable[[], Any]) -> Any:
        """``read()``, or its result from another session of this process when the index has
        not changed since (a page opened by several tabs, or reopened, reads it once)."""
        signature = self._signature()
        if signature is None:
            return read()
        with _shared_lock:
            hit = _shared_reads.get((signature[0], name))
        if hit is not None and hit[0] == signature:
            return hit[1]
        value = read()
        with _shared_lock:
            _shared_reads[(signature[0], name)] = (signature, value)
        return value

    def overview(self) -> Overview:
        """Totals, per-task figures and hits/misses over time, in one read of the index
        (shared with other sessions while the index is unchanged)."""
        result: Overview = self._shared("overview", self._read_overview)
        return result

    def _read_overview(self) -> Overview:
        """Totals, per-task figures and hits/misses over time, in one read of the index.

        One statement (``GROUPING SETS``) rather than three: each read opens the DuckDB
        file under the cross-process lock, and that open costs more than the aggregation.
        """
        width_sql = " ".join(f"WHEN span <= {w * 60} THEN {w}" for w in BUCKETS)
        last = BUCKETS[-1]
        df = self.query(
            "WITH w AS (SELECT CASE " + width_sql + f" ELSE {last} * ceil(span / {last * 60}) END "
            "AS width FROM (SELECT coalesce(max(created) - min(created), 0) AS span FROM runs)), "
            "r AS (SELECT runs.*, floor(created / w.width) * w.width AS bucket, w.width "
            "FROM runs, w) "
            "SELECT grouping(task) AS g_task, grouping(bucket) AS g_bucket, task, bucket, "
            "any_value(width) AS width, count(*) AS calls, "
            "count(*) FILTER (WHERE state = 'CACHED') AS hits, "
            "count(*) FILTER (WHERE key IS NOT NULL AND state <> 'CACHED') AS misses, "
            "count(*) FILTER (WHERE key IS NOT NULL "
            "AND state NOT IN ('CACHED', 'FAILED', 'CRASHED')) AS computed, "
            "count(*) FILTER (WHERE state IN ('FAILED', 'CRASHED')) AS failures, "
            "count(*) FILTER (WHERE state IN ('PENDING', 'RUNNING', 'RETRYING')) AS in_flight, "
            "coalesce(sum(saved) FILTER (WHERE state = 'CACHED'), 0) AS saved_s, "
            "avg(duration) FILTER (WHERE state = 'COMPLETED') AS mean_s, "
            "quantile_cont(duration, 0.95) FILTER (WHERE state = 'COMPLETED') AS p95_s, "
            "min(created) AS first, max(created) AS last_run, "
            "(SELECT count(*) FROM cache_entries) AS entries, "
            "(SELECT coalesce(sum(size), 0) FROM cache_entries) AS bytes "
            "FROM r GROUP BY GROUPING SETS ((), (task), (bucket)) "
            "ORDER BY g_task, g_bucket, calls DESC, task, bucket"
        )
        is_total = (df["g_task"] == 1) & (df["g_bucket"] == 1)
        total = {str(k): py_scalar(v) for k, v in df[is_total].to_dict("records")[0].items()}
        hits, misses = int(total["hits"] or 0), int(total["misses"] or 0)
        totals = {
            "runs": int(total["calls"] or 0),
            "hits": hits,
            "misses": misses,
            "failures": int(total["failures"] or 0),
            "in_flight": int(total["in_flight"] or 0),
            "time_saved": float(total["saved_s"] or 0.0),
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "entries": int(total["entries"] or 0),
            "bytes": int(total["bytes"] or 0),
            "first": total["first"],
            "last": total["last_run"],
        }
        tasks = df[(df["g_task"] == 0)][
            [
                "task",
                "calls",
                "hits",
                "misses",
                "failures",
                "mean_s",
                "p95_s",
                "saved_s",
                "last_run",
            ]
        ].reset_index(drop=True)
        buckets = df[(df["g_bucket"] == 0)][["bucket", "hits", "computed", "failures"]]
        buckets = buckets.rename(columns={"computed": "misses"}).sort_values("bucket")
        width = int(py_scalar(total["width"]) or BUCKETS[0])
        return Overview(totals, tasks, buckets.reset_index(drop=True), width)

    # -- runs --------------------------------------------------------------------------------

    def run_choices(self) -> dict[str, list[str]]:
        """The values the runs filters offer: task names and notebooks that have runs."""
        result: dict[str, list[str]] = self._shared("run_choices", self._read_run_choices)
        return result

    def _read_run_choices(self) -> dict[str, list[str]]:
        df = self.query(
            "SELECT 'task' AS kind, task AS value FROM (SELECT DISTINCT task FROM runs) "
            "UNION ALL SELECT 'notebook', notebook FROM "
            "(SELECT DISTINCT notebook FROM runs WHERE notebook IS NOT NULL) ORDER BY 1, 2"
        )
        out: dict[str, list[str]] = {"task": [], "notebook": []}
        for kind, value in zip(df["kind"], df["value"], strict=True):
            if value is not None:
                out[str(kind)].append(str(value))
        return out

    def run_detail(self, run_id: str) -> tuple[dict[str, Any] | None, pd.DataFrame]:
        """A run's record and its state transitions (attempts, errors), oldest first."""
        run = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        events = self.query(
            "SELECT time, state, attempt, duration, error FROM run_events "
            "WHERE run_id = ? ORDER BY time, attempt",
            [run_id],
        )
        record = (
            {str(k): py_scalar(v) for k, v in run.to_dict("records")[0].items()}
            if not run.empty
            else None
        )
        return record, events

    # -- timeline ----------------------------------------------------------------------------

    def timeline(
        self, since: float | None, limit: int = TIMELINE_LIMIT, lanes: str = "task"
    ) -> pd.DataFrame:
        """The latest runs (at most ``limit``) since ``since``, with a lane per task,
        notebook or worker (``lanes``, one of ``LANES``)."""
        where = "WHERE created >= ?" if since is not None else ""
        params: list[Any] = [since] if since is not None else []
        lane = LANES.get(lanes, LANES["task"])
        return self.query(
            "SELECT run_id, task, state, coalesce(started, created) AS start, "
            f"coalesce(ended, ?) AS end_, duration, notebook, cell, {lane} AS lane, "
            f"{WORKER_SQL} AS worker "
            f"FROM runs {where} ORDER BY created DESC LIMIT ?",
            [time.time(), *params, limit],
        )
