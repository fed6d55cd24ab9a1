"""The dashboard's SQL over the metadata index, and its actions (invalidate, break a lock).

Every read goes through ``MetadataStore.sql`` (the cross-process-safe path: file lock →
read-only open → query → close), so the dashboard never holds the DuckDB file open and a
kernel writing runs at the same moment only makes a read wait. Queries return small
DataFrames: the runs table is paginated *in SQL* (``LIMIT``/``OFFSET`` with the total from a
window count in the same statement), so 100,000 runs cost one short query per page and
never travel to the browser.

Times in the index are epoch seconds (DOUBLE). Hits are runs in state CACHED, misses runs
of a cached task (with a key) that did not hit — the definitions of ``MetadataStore.stats``;
the hit rate is hits / (hits + misses).

>>> source = Source()                                       # doctest: +SKIP
>>> page = source.runs_page(RunFilters(task="load"), page=0, page_size=50)   # doctest: +SKIP
>>> page.total, len(page.rows)                              # doctest: +SKIP
(100000, 50)
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from notebook_flow.errors import NotebookFlowError

if TYPE_CHECKING:
    import pandas as pd

    from notebook_flow.locks.base import LockManager
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

logger = logging.getLogger("notebook_flow")

#: Reads shared between the sessions of this process: (index path, name) → (signature, value).
_shared_reads: dict[tuple[Any, str], tuple[tuple[Any, ...], Any]] = {}
_shared_lock = threading.Lock()

IN_FLIGHT = ("PENDING", "RUNNING", "RETRYING")
FAILED = ("FAILED", "CRASHED")
Sort = Literal["newest", "oldest", "slowest"]
SORTS: dict[str, str] = {
    "newest": "created DESC, run_id",
    "oldest": "created ASC, run_id",
    "slowest": "duration DESC NULLS LAST, created DESC, run_id",
}
#: The same orders reversed (every one ends on the unique run_id, so reversal is exact).
_REVERSED: dict[str, str] = {
    "newest": "created ASC, run_id DESC",
    "oldest": "created DESC, run_id DESC",
    "slowest": "duration ASC NULLS FIRST, created ASC, run_id DESC",
}
#: The side of a read's last ``created`` on which a listing's first rows lie, by the first
#: term of its order (see ``Source._read_runs``).
_PREFIX_SIDE = {"created DESC": ">=", "created ASC": "<="}
#: Bounds kept per session (one per listing, page window and direction looked at).
_MAX_BOUNDS = 64
#: Bucket widths for "hits and misses over time", smallest first (seconds).
BUCKETS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)
#: What a row of the runs table needs (not the traceback or inputs: those are per run).
_RUN_COLUMNS = (
    "run_id, task, state, created, started, ended, duration, saved, attempt, host, pid, "
    "kernel, notebook, cell"
)
#: How a worker (kernel or process) is named in tables: its host and pid, not a UUID.
WORKER_SQL = "coalesce(host, '?') || ' · pid ' || coalesce(CAST(pid AS VARCHAR), '?')"
#: What the timeline's lanes can be: the SQL of each.
LANES = {
    "task": "task",
    "notebook": "coalesce(notebook, '(no notebook)')",
    "worker": WORKER_SQL,
}
#: Runs drawn at most on the timeline (the most recent ones in the window).
TIMELINE_LIMIT = 3000


def bucket_width(span: float, max_buckets: int = 60) -> int:
    """The smallest bucket width that draws ``span`` seconds in at most ``max_buckets`` bars.

    >>> bucket_width(3600)
    60
    >>> bucket_width(86400 * 3)
    21600
    """
    for width in BUCKETS:
        if span / width <= max_buckets:
            return width
    return BUCKETS[-1] * max(1, math.ceil(span / BUCKETS[-1] / max_buckets))


@dataclass(frozen=True)
class RunFilters:
    """What the runs table shows; empty fields do not filter.

    ``since``/``until`` are epoch seconds on the run's creation time.

    >>> RunFilters(task="load", states=("FAILED",)).where()
    ('WHERE task = ? AND state IN (?)', ['load', 'FAILED'])
    """

    task: str | None = None
    states: tuple[str, ...] = ()
    notebook: str | None = None
    since: float | None = None
    until: float | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.task:
            clauses.append("task = ?")
            params.append(self.task)
        if self.states:
            clauses.append("state IN (" + ", ".join("?" for _ in self.states) + ")")
            params.extend(self.states)
        if self.notebook:
            clauses.append("notebook = ?")
            params.append(self.notebook)
        if self.since is not None:
            clauses.append("created >= ?")
            params.append(float(self.since))
        if self.until is not None:
            clauses.append("created < ?")
            params.append(float(self.until))
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


@dataclass(frozen=True)
class Page:
    """One page of a table and the number of rows across all pages.

    ``window`` holds the rows of pages ``first``, ``first + 1``, ... when more than the page
    was read (see ``Source.runs_page``); :meth:`page_of` cuts another page out of it.
    """

    rows: pd.DataFrame
    total: int
    page: int
    page_size: int
    window: pd.DataFrame | None = None
    first: int = 0

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.page_size))

    def page_of(self, page: int) -> Page | None:
        """Page ``page`` from the rows already read, or None when they do not hold it all."""
        if self.window is None or not 0 <= page < self.pages or page < self.first:
            return None
        start = (page - self.first) * self.page_size
        wanted = min(self.page_size, self.total - page * self.page_size)
        if start + wanted > len(self.window):
            return None
        rows = self.window.iloc[start : start + self.page_size].reset_index(drop=True)
        return Page(rows, self.total, page, self.page_size, self.window, self.first)


@dataclass(frozen=True)
class Overview:
    """What the overview shows.

    ``totals``: runs, hits, misses, failures, in_flight, time_saved (s), hit_rate (None
    without cached runs), entries, bytes, first/last (epoch s). ``tasks``: one row per task
    (calls, hits, misses, failures, mean_s/p95_s of computed runs, saved_s, last_run).
    ``buckets``: hits, misses (computed) and failures per ``width``-second bucket.
    """

    totals: dict[str, Any]
    tasks: pd.DataFrame
    buckets: pd.DataFrame
    width: int


@dataclass
class Source:
    """The dashboard's view of one store: queries over its metadata and the actions on it.

    Built from a ``ResultStore`` (default: the configured store); the metadata store comes
    from ``config.get_metadata`` so the dashboard shares the process's recorder.
    """

    store: ResultStore | None = None
    meta: MetadataStore = field(init=False)
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
        """What identifies the index's content now: size and mtime of its file and WAL
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
                parts.append((st.st_size, st.st_mtime_ns))
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
        total = {str(k): _py(v) for k, v in df[is_total].to_dict("records")[0].items()}
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
        width = int(_py(total["width"]) or BUCKETS[0])
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

    def runs_page(
        self,
        filters: RunFilters,
        *,
        page: int = 0,
        page_size: int = 50,
        sort: str = "newest",
        ahead: int = 0,
        behind: int = 0,
        total_hint: int | None = None,
    ) -> Page:
        """One page of runs (newest first by default) and the filtered total, in one read.

        ``total_hint`` (the total the caller last saw) lets a page in the second half be
        read from the other end: the same rows in the reverse order, so DuckDB's top-N sort
        serves the last page as cheaply as the first. The read also returns the total; when
        it differs from the hint the page is read again the usual way.

        ``ahead``/``behind`` more pages come in the same read (``Page.window``), so a view
        can flip to them without reading the index again: the read costs about the same
        for 50 rows or 300, since opening the file and sorting dominate.

        The total is a scalar subquery rather than ``count(*) OVER ()``: a window over every
        matching row would defeat DuckDB's top-N sort (3x slower at 100,000 runs).
        """
        where, params = filters.where()
        order = SORTS.get(sort, SORTS["newest"])
        page = max(0, int(page))
        first = max(0, page - behind)
        limit = (page - first + 1 + ahead) * page_size
        if total_hint and first * page_size > total_hint // 2:
            tail = self._runs_from_the_end(
                where, params, sort, offset=first * page_size, limit=limit, total=total_hint
            )
            if tail is not None:
                window = tail
                start = (page - first) * page_size
                rows = window.iloc[start : start + page_size].reset_index(drop=True)
                return Page(rows, total_hint, page, page_size, window=window, first=first)
        df = self._read_runs(where, params, order, limit=limit, offset=first * page_size)
        if not df.empty:
            total = int(df["_total"].iloc[0])
        else:  # nothing from ``first`` on: count, unless that is the very start
            total = 0 if first == 0 else self.count_runs(filters)
        last = max(0, math.ceil(total / page_size) - 1)
        if page > last:  # the filter shrank the table below this page
            return self.runs_page(
                filters, page=last, page_size=page_size, sort=sort, ahead=ahead, behind=behind
            )
        window = df.drop(columns="_total")
        start = (page - first) * page_size
        rows = window.iloc[start : start + page_size].reset_index(drop=True)
        return Page(rows, total, page, page_size, window=window, first=first)

    def _runs_from_the_end(
        self, where: str, params: list[Any], sort: str, *, offset: int, limit: int, total: int
    ) -> pd.DataFrame | None:
        """Rows ``offset`` … ``offset + limit`` of a ``total``-row listing, read in the
        reverse order from its end; None when the listing no longer has ``total`` rows."""
        stop = min(offset + limit, total)
        if stop <= offset:
            return None
        order = _REVERSED.get(sort, _REVERSED["newest"])
        df = self._read_runs(where, params, order, limit=stop - offset, offset=total - stop)
        if df.empty or int(df["_total"].iloc[0]) != total:
            return None  # runs came or went: read it the usual way
        window: pd.DataFrame = df.drop(columns="_total").iloc[::-1].reset_index(drop=True)
        return window

    def _read_runs(
        self, where: str, params: list[Any], order: str, *, limit: int, offset: int
    ) -> pd.DataFrame:
        """Rows ``offset`` … ``offset + limit`` of the runs ``where`` in ``order``, with the
        total of the unbounded listing in ``_total``.

        A read made before with the same listing, offset and limit left a bound: the
        ``created`` of its last row. The rows with ``created`` on this side of it are a
        prefix of the listing (ties included; NULLs sort last), so when that prefix still
        holds ``limit`` rows from ``offset`` on, they are exactly the rows asked for, and
        DuckDB finds them by skipping every row group whose min/max of ``created`` lies
        beyond the bound (runs are stored roughly in creation order). Otherwise (rows
        removed since) the read runs unbounded. Only orders that start on ``created``
        qualify.
        """

        def sql(clause: str) -> str:
            return (
                f"SELECT {_RUN_COLUMNS}, (SELECT count(*) FROM runs {where}) AS _total "
                f"FROM runs {clause} ORDER BY {order} LIMIT ? OFFSET ?"
            )

        side = _PREFIX_SIDE.get(order.split(",", maxsplit=1)[0])
        memo = (where, tuple(params), order, limit, offset)
        bound = self._bounds.get(memo) if side else None
        if bound is not None:
            clause = f"{where} AND created {side} ?" if where else f"WHERE created {side} ?"
            df = self.query(sql(clause), [*params, *params, bound, limit, offset])
            if len(df) == limit:
                self._remember(memo, df)
                return df
        df = self.query(sql(where), [*params, *params, limit, offset])
        if side:
            if len(df) == limit:
                self._remember(memo, df)
            else:
                self._bounds.pop(memo, None)
        return df

    def _remember(self, memo: tuple[Any, ...], df: pd.DataFrame) -> None:
        last = df["created"].iloc[-1]
        if last is None or math.isnan(last):  # NULL: no bound
            self._bounds.pop(memo, None)
            return
        self._bounds[memo] = float(last)
        while len(self._bounds) > _MAX_BOUNDS:  # oldest first (dicts keep insertion order)
            self._bounds.pop(next(iter(self._bounds)), None)

    def count_runs(self, filters: RunFilters) -> int:
        where, params = filters.where()
        return int(self.query(f"SELECT count(*) AS n FROM runs {where}", params)["n"].iloc[0])

    def run_detail(self, run_id: str) -> tuple[dict[str, Any] | None, pd.DataFrame]:
        """A run's record and its state transitions (attempts, errors), oldest first."""
        run = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        events = self.query(
            "SELECT time, state, attempt, duration, error FROM run_events "
            "WHERE run_id = ? ORDER BY time, attempt",
            [run_id],
        )
        record = (
            {str(k): _py(v) for k, v in run.to_dict("records")[0].items()}
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

    # -- cache -------------------------------------------------------------------------------

    def cache_tasks(self) -> list[str]:
        df = self.query("SELECT DISTINCT task FROM cache_entries ORDER BY task")
        return [str(t) for t in df["task"] if t is not None]

    def cache_columns(self) -> set[str]:
        """The columns ``cache_entries`` has (a later schema may add pins or provenance)."""
        if self._cache_columns is None:
            df = self.query(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'cache_entries'"
            )
            self._cache_columns = {str(c) for c in df["column_name"]}
        return self._cache_columns

    def cache_page(
        self,
        task: str | None,
        *,
        page: int = 0,
        page_size: int = 50,
        search: str = "",
    ) -> Page:
        """Cache entries, newest first: size, creation, last use, expiry, pin, the inputs
        and where they were made (from the run that computed them).

        ``search`` matches (case-insensitively) the task, key, inputs, notebook, cell or host.
        """
        clauses: list[str] = []
        params: list[Any] = []
        if task:
            clauses.append("c.task = ?")
            params.append(task)
        if search.strip():
            text = search.strip()
            for special in ("\\", "%", "_"):
                text = text.replace(special, "\\" + special)
            like = f"%{text}%"
            # The inputs as the table shows them (``x=3, y='a'``), not their JSON.
            shown = "regexp_replace(replace(r.inputs, '\": \"', '='), '[{}\"]', '', 'g')"
            fields: tuple[str, ...] = ("c.task", "c.key", shown, "r.notebook", "r.cell", "r.host")
            if "provenance" in self.cache_columns():  # who made it, with what, git commit
                fields += ("c.provenance",)
            clauses.append("(" + " OR ".join(f"{f} ILIKE ? ESCAPE '\\'" for f in fields) + ")")
            params.extend([like] * len(fields))
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        columns = self.cache_columns()
        provenance = "c.provenance" if "provenance" in columns else "NULL"
        joined = "FROM cache_entries c LEFT JOIN runs r ON r.run_id = c.run_id"
        df = self.query(
            "SELECT c.key, c.task, c.size, c.created_at, c.expires_at, c.duration, "
            "c.serializer, c.run_id, r.inputs, r.notebook, r.cell, r.host, r.pid, "
            f"NULL AS pinned, {provenance} AS provenance, "
            "(SELECT max(h.created) FROM runs h WHERE h.key = c.key "
            "AND h.state = 'CACHED') AS last_used, "
            f"(SELECT count(*) {joined} {where}) AS _total "
            f"{joined} {where} ORDER BY c.created_at DESC, c.key LIMIT ? OFFSET ?",
            [*params, *params, page_size, max(0, page) * page_size],
        )
        if df.empty and page > 0:
            return self.cache_page(task, page=0, page_size=page_size, search=search)
        # Pins are marker files in the store (storage/pins.py), shared by every machine.
        df["pinned"] = df["key"].isin(self.pinned_keys())
        total = int(df["_total"].iloc[0]) if not df.empty else 0
        return Page(df.drop(columns="_total"), total, page, page_size)

    def pinned_keys(self) -> frozenset[str]:
        """The store's pinned keys (its ``pins/`` markers: one listing), empty if unreadable."""
        from notebook_flow.storage.pins import pinned_keys

        if self.store is None:
            return frozenset()
        try:
            return pinned_keys(self.store)
        except OSError as exc:
            logger.warning("could not list the pins of %s: %s", self.url, exc)
            return frozenset()

    def invalidate(self, keys: Sequence[str]) -> int:
        """Delete results from the store and their index rows; returns how many were stored."""
        assert self.store is not None
        removed = 0
        for key in keys:
            try:
                removed += bool(self.store.delete(key))
            except NotebookFlowError as exc:  # a bad key in the index must not block the rest
                logger.warning("could not delete %s from %s: %s", key, self.url, exc)
        self.meta.remove_cache_entries(list(keys))
        self.meta.flush(timeout=30)
        return removed

    def invalidate_task(self, task: str) -> int:
        """Delete every stored result of ``task`` (as the index knows them)."""
        keys = self.query("SELECT key FROM cache_entries WHERE task = ?", [task])["key"].tolist()
        return self.invalidate([str(k) for k in keys])

    # -- locks -------------------------------------------------------------------------------

    def locks(self) -> pd.DataFrame:
        """Locks currently recorded as held, oldest first."""
        return self.query(
            "SELECT key, holder, task, manager, acquired, lease_expires, updated "
            "FROM locks ORDER BY acquired"
        )

    def lock_waits(self, limit: int = 100) -> pd.DataFrame:
        """The latest waits for a lock (who waited, for which key, how long)."""
        return self.query(
            "SELECT time, key, task, holder, waited, manager FROM lock_events "
            "WHERE event = 'waited' ORDER BY time DESC LIMIT ?",
            [limit],
        )

    def lock_manager(self) -> LockManager | None:
        """The store's default lock manager, or None when it has none (remote stores)."""
        from notebook_flow.locks import default_lock_manager_for

        try:
            return default_lock_manager_for(self.store)
        except NotebookFlowError:
            return None

    def break_lock(self, key: str, manager_name: str | None = None) -> str:
        """Break ``key``'s lock with the store's default manager; says what happened."""
        from notebook_flow.metadata import LockEvent

        manager = self.lock_manager()
        if manager is None or not hasattr(manager, "break_lock"):
            return (
                "This store has no default lock manager the dashboard can reach; break the "
                f"lock where it lives, e.g. manager.break_lock({key!r})."
            )
        kind = type(manager).__name__
        if manager_name and manager_name != kind:
            return (
                f"The lock is held in a {manager_name}, which the dashboard cannot reach; "
                f"break it with that manager: break_lock({key!r})."
            )
        holder = manager.holder_of(key)
        broken = manager.break_lock(key)
        self.meta.record_lock_event(
            LockEvent(
                key=key,
                holder=holder.holder if holder is not None else "",
                event="broken",
                at=time.time(),
                manager=kind,
            )
        )
        self.meta.flush(timeout=30)
        return (
            f"Broke the lock on {key}."
            if broken
            else f"No lock was held on {key}; cleared its record."
        )

    # -- queue -------------------------------------------------------------------------------

    def queue(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Runs in flight: a summary per kernel/process, and the runs themselves."""
        runs = self.query(
            "SELECT run_id, task, state, created, started, attempt, notebook, cell, "
            f"{WORKER_SQL} AS worker, host, pid "
            "FROM runs WHERE state IN ('PENDING', 'RUNNING', 'RETRYING') "
            "ORDER BY created LIMIT 1000"
        )
        per_worker = self.query(
            "SELECT coalesce(r.host, '?') || ' · pid ' || coalesce(CAST(r.pid AS VARCHAR), '?') "
            "AS worker, r.host, r.pid, "
            "count(*) FILTER (WHERE r.state = 'PENDING') AS pending, "
            "count(*) FILTER (WHERE r.state = 'RUNNING') AS running, "
            "count(*) FILTER (WHERE r.state = 'RETRYING') AS retrying, "
            "min(r.created) AS oldest, max(p.last_seen) AS last_seen "
            "FROM runs r LEFT JOIN processes p ON p.host = r.host AND p.pid = r.pid "
            "WHERE r.state IN ('PENDING', 'RUNNING', 'RETRYING') "
            "GROUP BY 1, 2, 3 ORDER BY oldest"
        )
        return per_worker, runs


def _py(value: Any) -> Any:
    """A numpy/pandas scalar as a plain Python value (NaN and NaT as None)."""
    if value is None:
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    item = getattr(value, "item", None)
    return item() if callable(item) else value
