"""Module-level functions over the default store: history, stats, cache entries, rebuild.

>>> import notebook_flow as nf
>>> nf.history(task="load", limit=10)     # a pandas DataFrame, newest first  # doctest: +SKIP
>>> nf.stats()["time_saved"]                                                  # doctest: +SKIP
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from .config import get_metadata, get_store

if TYPE_CHECKING:
    import pandas as pd

    from .storage import ResultStore

__all__ = ["cache_entries", "history", "rebuild_index", "stats"]


def history(
    task: str | None = None,
    since: datetime | float | str | None = None,
    limit: int | None = None,
    *,
    store: str | ResultStore | None = None,
) -> pd.DataFrame:
    """Runs of tasks (one row per run, latest state, newest first) as a DataFrame.

    ``task`` filters by task name, ``since`` by start time (datetime, epoch seconds or an
    ISO string), ``limit`` caps the rows.
    """
    s = get_store(store)
    return get_metadata(s).history(task=task, since=since, limit=limit)


def cache_entries(
    task: str | None = None, *, store: str | ResultStore | None = None
) -> pd.DataFrame:
    """The stored results (key, task, size, created, expires, component hashes)."""
    s = get_store(store)
    return get_metadata(s).cache_entries(task=task)


def stats(*, store: str | ResultStore | None = None) -> dict[str, Any]:
    """Totals: runs, hits, misses, failures, hit rate, time saved (s), bytes stored."""
    s = get_store(store)
    return get_metadata(s).stats()


def rebuild_index(*, store: str | ResultStore | None = None) -> int:
    """Rebuild the cache index in DuckDB from the manifests in the store.

    Results stay usable from manifests alone; use this after deleting or moving a damaged
    ``metadata.duckdb``, or after copying a store. Returns the number of entries indexed.
    """
    from .metadata import CacheEntry

    s = get_store(store)
    entries = (
        CacheEntry(
            key=m.key,
            task=m.task.split(":", 1)[-1],
            task_identity=m.task,
            size=m.size,
            created_at=m.created_at,
            expires_at=m.expires_at,
            duration=m.duration,
            serializer=m.serializer,
            payload=m.payload,
            components=dict(m.components),
            run_id=m.run_id,
        )
        for m in s.iter_manifests()
    )
    return get_metadata(s).rebuild(entries)
