"""The runs listing held in memory, read again only when the index has changed.

A far page of 100,000 runs read from the index costs an open of the DuckDB file (~20 ms)
plus a sort (~12 ms) each time. Here the listing's columns (``RUN_COLUMNS``) are read once
into an Arrow table (~30 ms at 100,000 runs) and every page after that is a filter mask and
a slice of a sort made once per order — about a millisecond — for as long as the index file
and its WAL keep the same size, mtime and inode (every write changes one of them).

The DuckDB file is *not* kept open between reads: DuckDB lets one process open a file at a
time, so a dashboard holding it would stop every kernel from recording (DESIGN.md §3). The
snapshot is read under the same cross-process lock as any other read and the file is
closed right after.

While the index changes at every read (a kernel recording runs), re-reading the whole
listing for each page would cost more than paging in SQL: a snapshot older than the index
is read again at most once per ``RELOAD_GAP`` seconds; in between, pages come from SQL.
Above ``MAX_ROWS`` runs the listing stays in SQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .model import RunFilters, sort_keys

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = ["MAX_ROWS", "RELOAD_GAP", "Snapshot", "snapshot"]

#: Runs above which the listing is paged in SQL rather than held in memory (~100 bytes a run).
MAX_ROWS = 1_000_000
#: Seconds between two reads of the whole listing while the index keeps changing.
RELOAD_GAP = 1.0
#: Seconds before a listing found too large for memory is counted again.
TOO_LARGE_RECHECK = 60.0


@dataclass
class Snapshot:
    """The runs listing as of ``signature`` (see ``Source._signature``)."""

    signature: tuple[Any, ...]
    runs: pa.Table | None  # None: more than MAX_ROWS runs, page in SQL
    read_at: float  # time.monotonic() of the read
    _orders: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def order(self, sort: str) -> Any:
        """Row numbers of the listing in ``sort`` order (numpy), made once per order."""
        import pyarrow.compute as pc

        assert self.runs is not None
        with self._lock:
            got = self._orders.get(sort)
            if got is None:
                indices = pc.sort_indices(self.runs, sort_keys=sort_keys(sort))
                got = self._orders[sort] = indices.to_numpy()
            return got

    def page(
        self, filters: RunFilters, sort: str, *, offset: int, limit: int
    ) -> tuple[pd.DataFrame, int]:
        """Rows ``offset`` … ``offset + limit`` of the runs ``filters`` selects in ``sort``
        order (the same rows as the SQL read), and how many it selects."""
        assert self.runs is not None
        order = self.order(sort)
        keep = filters.mask(self.runs)
        rows = order if keep.all() else order[keep[order]]
        picked = self.runs.take(rows[offset : offset + limit])
        return picked.to_pandas(), len(rows)


_snapshots: dict[str, Snapshot] = {}  # index path → the latest snapshot (shared by sessions)
_read_lock = threading.Lock()  # one read of a listing at a time (others then share it)


def snapshot(signature: tuple[Any, ...], read: Callable[[int], pa.Table]) -> Snapshot | None:
    """The listing of the index ``signature`` names (its path first): the snapshot held
    when the index is unchanged, else ``read(MAX_ROWS + 1)`` (at most that many rows).

    None when the listing is better paged in SQL: more than ``MAX_ROWS`` runs, or the
    held snapshot is stale but was read less than ``RELOAD_GAP`` seconds ago.
    """
    path = signature[0]
    held = _snapshots.get(path)
    if held is not None and held.signature == signature:
        return held if held.runs is not None else None
    with _read_lock:
        held = _snapshots.get(path)
        if held is not None and held.signature != signature:
            # Stale: read again, unless it was read a moment ago (the index keeps changing)
            # or the listing was too large for memory (count it again now and then).
            wait = RELOAD_GAP if held.runs is not None else TOO_LARGE_RECHECK
            if time.monotonic() - held.read_at < wait:
                return None
        if held is None or held.signature != signature:
            runs = read(MAX_ROWS + 1)
            fits = runs.num_rows <= MAX_ROWS
            held = Snapshot(signature, runs if fits else None, time.monotonic())
            _snapshots[path] = held
    return held if held.runs is not None else None
