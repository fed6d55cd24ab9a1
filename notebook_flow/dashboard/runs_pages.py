"""The runs table's pages: from the listing held in memory, or read from the index in SQL.

A page comes from memory (``runs_memory``) while the index is unchanged since the listing
was read; otherwise it is one SQL read (``LIMIT``/``OFFSET`` with the total in the same
statement), bounded on ``created`` when the same window was read before, and read from the
other end for pages in the second half. Either way the rows are the same (the filter and
order have one definition each, in ``model``), and only the page reaches the browser.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .model import RUN_COLUMNS, SORTS, Page, RunFilters
from .runs_memory import snapshot

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from notebook_flow.metadata import MetadataStore

__all__ = ["RunsPages"]

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


class RunsPages:
    """The runs pages of ``Source`` (a mixin: it uses the source's ``query`` and index)."""

    meta: MetadataStore
    #: Page from the listing held in memory when the index is unchanged (False: always SQL).
    in_memory: bool
    #: (listing, limit, offset) → ``created`` of the last row it returned (``_read_runs``).
    _bounds: dict[tuple[Any, ...], float]

    def query(self, sql: str, params: Any = ()) -> pd.DataFrame:
        raise NotImplementedError

    def _signature(self) -> tuple[Any, ...] | None:
        raise NotImplementedError

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
        """One page of runs (newest first by default) and the filtered total, in one read
        (none at all when the listing held in memory is current).

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
        page = max(0, int(page))
        first = max(0, page - behind)
        limit = (page - first + 1 + ahead) * page_size
        memory = self._memory_page(filters, sort, offset=first * page_size, limit=limit)
        if memory is not None:
            window, total = memory
            last = max(0, math.ceil(total / page_size) - 1)
            if page > last:  # the filter shrank the table below this page
                return self.runs_page(
                    filters, page=last, page_size=page_size, sort=sort, ahead=ahead, behind=behind
                )
            start = (page - first) * page_size
            rows = window.iloc[start : start + page_size].reset_index(drop=True)
            return Page(rows, total, page, page_size, window=window, first=first)
        where, params = filters.where()
        order = SORTS.get(sort, SORTS["newest"])
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
                f"SELECT {RUN_COLUMNS}, (SELECT count(*) FROM runs {where}) AS _total "
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

    def _memory_page(
        self, filters: RunFilters, sort: str, *, offset: int, limit: int
    ) -> tuple[pd.DataFrame, int] | None:
        """Rows ``offset`` … ``offset + limit`` and the total from the listing held in
        memory, or None when it is not current (``runs_memory.snapshot``)."""
        signature = self._signature() if self.in_memory else None
        if signature is None:
            return None
        held = snapshot(signature, self._read_listing)
        if held is None:
            return None
        return held.page(filters, sort, offset=offset, limit=limit)

    def _read_listing(self, limit: int) -> pa.Table:
        """At most ``limit`` runs, the columns of the runs table, in storage order."""
        table: pa.Table = self.meta.sql_arrow(f"SELECT {RUN_COLUMNS} FROM runs LIMIT ?", [limit])
        return table
