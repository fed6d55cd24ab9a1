"""Module-level functions over the default store: history, stats, cache entries, rebuild,
the locks held now.

>>> import notebook_flow as nf
>>> nf.history(task="load", limit=10)     # a pandas DataFrame, newest first  # doctest: +SKIP
>>> nf.stats()["time_saved"]                                                  # doctest: +SKIP
>>> nf.list_locks()                       # who holds which key, since when   # doctest: +SKIP
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .config import get_metadata, get_store
from .errors import ConfigurationError
from .storage import behind

if TYPE_CHECKING:
    import pandas as pd

    from .locks.base import LockManager
    from .storage import ResultStore

__all__ = [
    "break_lock",
    "cache_entries",
    "history",
    "list_locks",
    "rebuild_index",
    "stats",
    "wait_for_commits",
]


def _settled(store: str | ResultStore | None) -> ResultStore:
    """The store, once this process's background commits to it have finished (so that what
    the index says includes every result a call has already returned)."""
    s = get_store(store)
    behind.flush(s.url)
    return s


def wait_for_commits(timeout: float | None = None) -> bool:
    """Wait until the results this process is still committing in the background are
    durable; False if ``timeout`` seconds passed first.

    Large array results are committed on a background thread after the call returns (see
    ``configure(background_commits=...)``). Reading the history, stats or the store already
    waits for them; call this before copying the store folder or ending the process by
    other means than a normal exit (which waits too).
    """
    return behind.flush(timeout=timeout)


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
    from .options import count, optional_str

    optional_str("task", task)
    count("limit", limit, minimum=1, optional=True)  # checked before anything is opened
    s = _settled(store)
    return get_metadata(s).history(task=task, since=since, limit=limit)


def cache_entries(
    task: str | None = None, *, store: str | ResultStore | None = None
) -> pd.DataFrame:
    """The stored results (key, task, size, created, expires, component hashes)."""
    s = _settled(store)
    return get_metadata(s).cache_entries(task=task)


def stats(*, store: str | ResultStore | None = None) -> dict[str, Any]:
    """Totals: runs, hits, misses, failures, hit rate, time saved (s), bytes stored."""
    s = _settled(store)
    return get_metadata(s).stats()


def rebuild_index(*, store: str | ResultStore | None = None) -> int:
    """Rebuild the cache index in DuckDB from the manifests in the store.

    Results stay usable from manifests alone; use this after deleting or moving a damaged
    ``metadata.duckdb``, or after copying a store. Returns the number of entries indexed.

    Run events that Dask workers spooled to the store (``<store>/events/``) are ingested
    too: the runs of a client that died before its results came back get their real
    final states (see ``metadata/remote.py``).
    """
    from .metadata import CacheEntry
    from .metadata.remote import ingest_store_events

    s = get_store(store)
    entries = (
        CacheEntry.from_manifest(m, task=m.task.split(":", 1)[-1]) for m in s.iter_manifests()
    )
    meta = get_metadata(s)
    count = meta.rebuild(entries)
    ingest_store_events(s, meta)
    return count


# -- locks ------------------------------------------------------------------------------------
#
# Named list_locks / break_lock rather than the issue's ``locks()``: ``notebook_flow.locks``
# is the subpackage of lock managers (``from notebook_flow.locks import RedisLockManager``),
# and one attribute cannot be both.

_LOCK_COLUMNS = [
    "key", "task", "holder", "host", "pid", "run_id", "acquired", "lease_expires", "fence",
    "manager", "source",
]  # fmt: skip


def _reachable_manager(store: ResultStore, manager: LockManager | None) -> LockManager | None:
    """``manager``, else the store's default one; None for a remote store (it has none)."""
    if manager is not None:
        return manager
    from .locks import default_lock_manager_for

    try:
        return default_lock_manager_for(store)
    except ConfigurationError:
        return None


def list_locks(
    *, store: str | ResultStore | None = None, manager: LockManager | None = None
) -> pd.DataFrame:
    """The locks held now, one row per key, oldest first.

    Two sources are merged. The lock manager is asked directly (``manager``, by default the
    store's own: file locks beside a local store): those rows say ``source="manager"`` and
    are exact. Locks of other managers (a ``RedisLockManager`` that tasks configured, say)
    come from the metadata index, as the holders last reported them (``source="index"``);
    they are left out once their recorded lease has run out.

    >>> nf.list_locks()                                          # doctest: +SKIP
                                   key    task  holder  ... lease_expires  fence  source
    0  5b1e0a…                          charge  vm:4242:…  ...  2026-11-24 …   1795…  manager
    >>> nf.list_locks(manager=RedisLockManager(host="cache"))    # doctest: +SKIP
    """
    import pandas as pd

    from ._identity import parse_holder

    s = get_store(store)
    reachable = _reachable_manager(s, manager)
    live = reachable.list_locks() if reachable is not None else []
    index = get_metadata(s).sql(
        "SELECT key, holder, acquired, lease_expires, manager, task FROM locks"
    )
    tasks = {str(k): t for k, t in zip(index["key"], index["task"], strict=True)}
    rows: list[dict[str, Any]] = [
        {"key": i.key, "task": tasks.get(i.key), "holder": i.holder, "acquired": i.acquired_at,
         "lease_expires": i.lease_expires, "fence": i.fence, "manager": i.manager,
         "source": "manager"}
        for i in live
    ]  # fmt: skip
    seen = {i.key for i in live}
    ours = type(reachable).__name__ if reachable is not None else None
    now = time.time()
    for record in index.to_dict("records"):
        rec = {str(k): v for k, v in record.items()}
        lease = rec["lease_expires"]
        if rec["key"] in seen or rec["manager"] == ours or (lease is not None and lease < now):
            continue  # the manager we asked is exact about its own locks
        rows.append({**rec, "fence": None, "source": "index"})
    for row in rows:
        parts = parse_holder(str(row["holder"]))
        row.update(host=parts.get("host"), pid=parts.get("pid"), run_id=parts.get("run_id"))
    df = pd.DataFrame(rows, columns=_LOCK_COLUMNS)
    for column in ("acquired", "lease_expires"):
        df[column] = pd.to_datetime(df[column].astype("float64"), unit="s", utc=True)
    df["pid"] = df["pid"].astype("Int64")
    df["fence"] = df["fence"].astype("Int64")
    result: pd.DataFrame = df.sort_values(["acquired", "key"], ignore_index=True)
    return result


def break_lock(
    key: str, *, store: str | ResultStore | None = None, manager: LockManager | None = None
) -> bool:
    """Remove the lock on ``key`` whoever holds it; True if a live holder held it.

    An operator's tool for a holder that is stuck (alive, so never recovered, and renewing
    its lease). The holder is not stopped: its commit is refused (fencing) and it reports
    ``LeaseLostError``. Dead holders need no breaking; their locks are recovered. The
    event is recorded as ``broken`` in the metadata index.

    ``manager`` defaults to the store's own (file locks beside a local store); a lock that
    the index records under another manager needs that one:

    >>> nf.break_lock("5b1e0a…")                                              # doctest: +SKIP
    True
    >>> nf.break_lock("5b1e0a…", manager=RedisLockManager(host="cache"))      # doctest: +SKIP
    """
    from .metadata import LockEvent

    s = get_store(store)
    reachable = _reachable_manager(s, manager)
    if reachable is None:
        raise ConfigurationError(
            f"the store {s.url!r} is remote and has no default lock manager; pass the one "
            "its tasks use: break_lock(key, manager=RedisLockManager(...)) or "
            "PostgresLockManager(dsn) (CLI: notebook-flow locks --manager URL --break KEY)"
        )
    meta = get_metadata(s)
    recorded = meta.sql("SELECT manager FROM locks WHERE key = ?", [key])["manager"].tolist()
    kind = type(reachable).__name__
    info = reachable.holder_of(key)
    broken = reachable.break_lock(key)
    others = sorted({str(m) for m in recorded if m != kind})
    if not broken and others:  # leave that record alone: its manager may still hold the key
        raise ConfigurationError(
            f"lock {key!r} is not held in {reachable!r}, but the index records it as held "
            f"by a {others[0]}: pass that manager, e.g. break_lock(key, manager="
            f"{others[0]}(...)) (CLI: notebook-flow locks --manager URL --break KEY)"
        )
    if broken or recorded:  # also drops a stale record of a holder that is gone
        meta.record_lock_event(
            LockEvent(
                key=key,
                holder=info.holder if info is not None else "",
                event="broken",
                at=time.time(),
                manager=kind,
            )
        )
    return broken
