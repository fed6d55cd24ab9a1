"""What the dashboard's queries take and return: run filters, orders, pages, the overview.

A filter and an order each have one definition here, used two ways: as SQL for a read of
the index (``RunFilters.where``, ``SORTS``) and over the runs held in memory
(``RunFilters.mask``, ``sort_keys``); ``tests/test_dashboard_paging.py`` holds them equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "BUCKETS",
    "FAILED",
    "IN_FLIGHT",
    "LANES",
    "RUN_COLUMNS",
    "SORTS",
    "TIMELINE_LIMIT",
    "WORKER_SQL",
    "Overview",
    "Page",
    "RunFilters",
    "bucket_width",
    "py_scalar",
    "sort_keys",
]

IN_FLIGHT = ("PENDING", "RUNNING", "RETRYING")
FAILED = ("FAILED", "CRASHED")
Sort = Literal["newest", "oldest", "slowest"]
SORTS: dict[str, str] = {
    "newest": "created DESC, run_id",
    "oldest": "created ASC, run_id",
    "slowest": "duration DESC NULLS LAST, created DESC, run_id",
}


def sort_keys(sort: str) -> list[tuple[str, str, str]]:
    """``SORTS[sort]`` as pyarrow sort keys: (column, order, null placement). NULLs sort
    last unless the SQL says otherwise (DuckDB's default, ascending or descending).

    >>> sort_keys("slowest")[0]
    ('duration', 'descending', 'at_end')
    """
    keys = []
    for term in SORTS.get(sort, SORTS["newest"]).split(","):
        words = term.split()
        order = "descending" if "DESC" in words[1:] else "ascending"
        keys.append((words[0], order, "at_start" if "FIRST" in words[1:] else "at_end"))
    return keys


#: Bucket widths for "hits and misses over time", smallest first (seconds).
BUCKETS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)
#: What a row of the runs table needs (not the traceback or inputs: those are per run).
RUN_COLUMNS = (
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

    def mask(self, runs: pa.Table) -> Any:
        """The rows of ``runs`` that ``where()`` selects, as a numpy bool array (a NULL
        field matches no filter on it, as in SQL)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        keep: Any = None

        def both(cond: Any) -> None:
            nonlocal keep
            keep = cond if keep is None else pc.and_kleene(keep, cond)

        if self.task:
            both(pc.equal(runs["task"], self.task))
        if self.states:
            states = pa.array(list(self.states)).cast(runs.schema.field("state").type)
            both(pc.is_in(runs["state"], value_set=states))
        if self.notebook:
            both(pc.equal(runs["notebook"], self.notebook))
        if self.since is not None:
            both(pc.greater_equal(runs["created"], float(self.since)))
        if self.until is not None:
            both(pc.less(runs["created"], float(self.until)))
        if keep is None:
            import numpy as np

            return np.ones(runs.num_rows, dtype=bool)
        return pc.fill_null(keep, False).to_numpy(zero_copy_only=False)


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


def py_scalar(value: Any) -> Any:
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
