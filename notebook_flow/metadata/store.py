"""MetadataStore: the public face of the index (queued writes, maintenance, reads)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from notebook_flow.errors import MetadataError
from notebook_flow.metadata import registry, spill
from notebook_flow.metadata.batch import _entry_row, _mark_crashed
from notebook_flow.metadata.database import _Database
from notebook_flow.metadata.recorder import _NOT_WRITTEN, _Recorder
from notebook_flow.metadata.records import CacheEntry, LockEvent, RunEvent, _MarkCrashed, _Remove
from notebook_flow.metadata.schema import _CACHE_ENTRIES, _NON_FINAL_SQL, _lit, _names, _table

if TYPE_CHECKING:
    import duckdb
    import pandas as pd
    import pyarrow as pa

__all__ = ["MetadataStore"]

LOCK_TIMEOUT = 120.0  # s to wait for the cross-process lock before a MetadataError
STALE_AFTER = 600.0  # s without a heartbeat after which another host's run counts as crashed

_HISTORY_COLUMNS = (
    "run_id, task, state, created, started, ended, "
    "coalesce(duration, ended - started) AS duration, saved, attempt, key, error, explain, "
    "size, inputs, notebook, cell, tags, host, pid, kernel, "
    "task_identity, traceback, updated"
)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhdw])\s*$")


def _epoch(value: datetime | timedelta | float | str) -> float:
    """Epoch seconds from a datetime (naive = local time), epoch number, timedelta or
    string: ISO 8601 (``"2026-11-01T12:00Z"``) or a relative age (``"30m"``, ``"2h"``, ``"1d"``)."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, timedelta):
        return time.time() - value.total_seconds()
    if isinstance(value, (int, float)):
        return float(value)
    match = _RELATIVE.match(value)
    if match:
        return time.time() - float(match[1]) * _UNITS[match[2]]
    try:
        return datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(
            f"since={value!r} is neither an ISO date/time nor an age like '30m', '2h', '1d'"
        ) from None


def _with_datetimes(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    for c in columns:
        if c in df.columns:
            df[c] = pd.to_datetime(df[c], unit="s", utc=True)
    return df


def _rows(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


class MetadataStore:
    """The run history, cache index and lock records of one store, in a DuckDB file.

    Safe to share between threads and processes (each process has one recorder thread per
    file; the options of its first store of that file apply to it); picklable (it pickles
    its configuration only).

    >>> import tempfile, os
    >>> with MetadataStore(os.path.join(tempfile.mkdtemp(), "m.duckdb")) as store:
    ...     store.stats()["runs"]
    0
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_timeout: float = LOCK_TIMEOUT,
        stale_after: float = STALE_AFTER,
        auto_mark_crashed: bool = True,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.lock_timeout = lock_timeout
        self.stale_after = stale_after
        self.auto_mark_crashed = auto_mark_crashed
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise MetadataError(
                f"Cannot create the folder of the metadata index {self.path}: {exc}"
            ) from exc
        self._rec: _Recorder | None = None
        self._rec_pid = 0

    def __repr__(self) -> str:
        return f"MetadataStore({self.path!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "lock_timeout": self.lock_timeout,
            "stale_after": self.stale_after,
            "auto_mark_crashed": self.auto_mark_crashed,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _recorder(self) -> _Recorder:
        rec = self._rec
        if rec is not None and self._rec_pid == os.getpid():
            return rec
        with registry._registry_lock:
            if self._rec is not None and self._rec_pid == os.getpid():
                return self._rec  # another thread got here first
            rec = registry._registry.get(self.path)
            if rec is None:
                db = _Database(self.path, self.lock_timeout)
                rec = registry._registry[self.path] = _Recorder(db, self.stale_after)
            rec.users += 1
            check = self.auto_mark_crashed and not rec.crash_check_scheduled
            rec.crash_check_scheduled |= check
            self._rec, self._rec_pid = rec, os.getpid()
        if check:  # once per process and file, in the recorder's first transaction
            rec.put(_MarkCrashed())
        return rec

    # -- writes (queued; the caller never waits for DuckDB)

    def record_run(self, event: RunEvent) -> None:
        """Queue one state transition of a run (returns at once)."""
        registry.note_run(event)
        self._recorder().put(event)

    def record_cache_entry(self, entry: CacheEntry | Any, *, size: int | None = None) -> None:
        """Queue a committed result's index record: a :class:`CacheEntry` or a manifest."""
        if not isinstance(entry, CacheEntry):
            entry = CacheEntry.from_manifest(entry, size=size)
        self._recorder().put(entry)

    def remove_cache_entries(
        self, keys: Sequence[str] | None = None, *, task: str | None = None
    ) -> None:
        """Queue the removal of entries by key, or of a task's (name or identity) entries.

        With neither, every entry is removed (``%flow clear``); an empty list removes none.
        """
        if isinstance(keys, str):
            keys = [keys]
        self._recorder().put(_Remove(None if keys is None else tuple(keys), task))

    def record_lock_event(self, event: LockEvent) -> None:
        """Queue a lock event; the ``locks`` table follows it (acquired → row, released → none)."""
        self._recorder().put(event)

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything queued so far by this process is durable.

        Raises MetadataError if it is not after ``timeout`` seconds, or if some of it was
        dropped because the index could not be written.
        """
        self._recorder().flush(timeout)

    def close(self) -> None:
        """Flush; stop the recorder thread when no other store of this process uses the file."""
        rec, self._rec = (self._rec if self._rec_pid == os.getpid() else None), None
        if rec is None:
            return
        try:
            rec.flush(self.lock_timeout)
        finally:
            with registry._registry_lock:
                rec.users -= 1
                last = rec.users <= 0
            if last:
                rec.stop(timeout=5.0)

    # -- synchronous maintenance

    def _write_now(self, body: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        rec = self._recorder()
        rec.flush(self.lock_timeout, raise_errors=False)
        with rec.db.locked(self.lock_timeout) as deadline:
            return rec.db.write(deadline, body)

    def mark_crashed(self) -> int:
        """Mark runs in flight whose process is dead as CRASHED; returns how many.

        Same host: the pid is gone or belongs to a newer process (start time differs).
        Other hosts: no heartbeat for ``stale_after`` seconds (10 min by default). Runs
        automatically once per process and file, in the recorder's first transaction.
        """
        return int(self._write_now(lambda con: _mark_crashed(con, self.stale_after)))

    def rebuild(self, entries: Iterable[CacheEntry | Any]) -> int:
        """Replace the cache index with ``entries`` (CacheEntry or manifests); returns the count.

        >>> store.rebuild(result_store.iter_manifests())  # doctest: +SKIP
        """
        rows: dict[str, tuple[Any, ...]] = {}
        for item in entries:  # materialised before the lock: manifests may come from S3
            entry = item if isinstance(item, CacheEntry) else CacheEntry.from_manifest(item)
            rows[entry.key] = _entry_row(entry)

        def body(con: duckdb.DuckDBPyConnection) -> int:
            con.execute("DELETE FROM cache_entries")
            if rows:
                names = _names(_CACHE_ENTRIES)
                with _table(con, "_entries", _CACHE_ENTRIES, list(rows.values())):
                    con.execute(f"INSERT INTO cache_entries ({names}) SELECT {names} FROM _entries")
            return len(rows)

        return int(self._write_now(body))

    def prune(self, before: datetime | timedelta | float | str) -> int:
        """Delete finished runs created before ``before`` (with their events), and older
        lock events and process records; returns the number of runs deleted.

        The cache index is untouched. ``before`` takes what ``history(since=...)`` takes.

        >>> store.prune("30d")  # doctest: +SKIP
        """
        cutoff = _epoch(before)

        def body(con: duckdb.DuckDBPyConnection) -> int:
            old = f"created < ? AND state NOT IN {_NON_FINAL_SQL}"
            con.execute(
                f"DELETE FROM run_events WHERE run_id IN (SELECT run_id FROM runs WHERE {old})",
                [cutoff],
            )
            row = con.execute(f"DELETE FROM runs WHERE {old} RETURNING 1", [cutoff]).fetchall()
            con.execute("DELETE FROM lock_events WHERE time < ?", [cutoff])
            con.execute("DELETE FROM processes WHERE last_seen < ?", [cutoff])
            return len(row)

        return int(self._write_now(body))

    # -- reads (flush this process's queue first, so users see their own runs)

    def _read(
        self,
        query: str,
        params: Sequence[Any] = (),
        fetch: Any = None,
        *,
        ours: bool = True,
        wait: float | None = None,
    ) -> Any:
        """Run ``query`` after this process's queued events are written. Our own queries
        (``ours``) run in the session that writes them, when there are any; user SQL always
        runs on a read-only connection. With ``wait``: only what is written already, waiting
        at most that long for the index (MetadataError after)."""
        if fetch is None or params:
            # Before any lock (see _Database.locked): DuckDB imports these to return a
            # frame, or to bind a parameter (whatever its type).
            import pandas  # noqa: F401
            import pyarrow  # noqa: F401

        rec = self._recorder()
        if wait is None:
            if (
                ours
                and threading.current_thread() is not rec._thread
                and (rec.pending() or spill.any_waiting(rec.db.path))
            ):
                import duckdb

                def read(con: duckdb.DuckDBPyConnection) -> Any:
                    cur = con.execute(query, list(params))
                    return cur.df() if fetch is None else fetch(cur)

                try:
                    result = rec.write_then_read(read)
                except duckdb.Error as exc:
                    raise rec.db._error(exc) from exc
                if result is not _NOT_WRITTEN:
                    return result
            rec.flush(self.lock_timeout, raise_errors=False)
        with rec.db.locked(self.lock_timeout if wait is None else wait) as deadline:
            return rec.db.read(deadline, query, params, fetch)

    def history(
        self,
        task: str | None = None,
        since: datetime | timedelta | float | str | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """One row per run (its latest state), newest first; times are UTC datetimes.

        ``task`` matches a task name or identity; ``since`` takes a datetime, epoch
        seconds, an ISO string or an age like ``"2h"``.

        >>> store.history(task="load", since="1d", limit=20)  # doctest: +SKIP
        """
        where: list[str] = []
        params: list[Any] = []
        if task is not None:
            where.append("(task = ? OR task_identity = ?)")
            params += [task, task]
        if since is not None:
            where.append("created >= ?")
            params.append(_epoch(since))
        query = f"SELECT {_HISTORY_COLUMNS} FROM runs"
        query += (
            " WHERE " + " AND ".join(where) if where else ""
        ) + " ORDER BY created DESC, run_id"
        if limit is not None:
            query += f" LIMIT {max(0, int(limit))}"
        return _with_datetimes(
            self._read(query, params), ("created", "started", "ended", "updated")
        )

    def events(self, run_id: str | None = None, limit: int | None = None) -> pd.DataFrame:
        """State transitions in time order (of one run, or the latest ``limit`` of all)."""
        query = "SELECT *, rowid AS _seq FROM run_events"
        params: list[Any] = []
        if run_id is not None:
            query += " WHERE run_id = ?"
            params.append(run_id)
        if limit is not None:
            query += f" ORDER BY time DESC, _seq DESC LIMIT {max(0, int(limit))}"
        df = self._read(f"SELECT * EXCLUDE (_seq) FROM ({query}) ORDER BY time, _seq", params)
        return _with_datetimes(df, ("time",))

    def cache_entries(self, task: str | None = None) -> pd.DataFrame:
        """The cache index (of one task, by name or identity), newest first."""
        query, params = "SELECT * FROM cache_entries", []
        if task is not None:
            query += " WHERE task = ? OR task_identity = ?"
            params = [task, task]
        df = self._read(query + " ORDER BY created_at DESC, key", params)
        return _with_datetimes(df, ("created_at", "expires_at"))

    def latest_entry(
        self, task_identity: str, *, timeout: float | None = None
    ) -> dict[str, Any] | None:
        """The newest cache entry of a task, with ``components`` as a dict (for explain()).

        Times are epoch seconds here. With ``timeout``: what is written already, waiting at
        most that long for the index (raises MetadataError after): the miss log line must
        never hold up a computation behind another process's session.
        """
        rows = self._read(
            # A literal, not a parameter: a miss in a notebook that never used pandas must
            # not import it (DuckDB does, to bind any parameter; see schema._lit).
            f"SELECT * FROM cache_entries WHERE task_identity = {_lit(task_identity)} "
            "ORDER BY created_at DESC LIMIT 1",
            (),
            _rows,
            wait=timeout,
        )
        if not rows:
            return None
        entry: dict[str, Any] = rows[0]
        entry["components"] = json.loads(entry["components"] or "{}")
        return entry

    def stats(self, task: str | None = None) -> dict[str, Any]:
        """Counts and totals: runs, hits, misses, failures, crashed, in_flight, hit_rate,
        time_saved (s), bytes_stored, entries, tasks.

        A miss is a run of a cached task (it has a key) that computed instead of hitting.
        """
        where, params = "", []
        if task is not None:
            where, params = " WHERE task = ? OR task_identity = ?", [task, task]
        rows = self._read(
            "SELECT count(*), count(*) FILTER (state = 'CACHED'), "
            "count(*) FILTER (key IS NOT NULL AND state <> 'CACHED'), "
            "count(*) FILTER (state = 'FAILED'), count(*) FILTER (state = 'CRASHED'), "
            f"count(*) FILTER (state IN {_NON_FINAL_SQL}), "
            "coalesce(sum(saved) FILTER (state = 'CACHED'), 0), count(DISTINCT task), "
            f"(SELECT count(*) FROM cache_entries{where}), "
            f"(SELECT coalesce(sum(size), 0) FROM cache_entries{where}) FROM runs{where}",
            params * 3,
            lambda cur: cur.fetchone(),
        )
        runs, hits, misses, failures, crashed, in_flight, saved, tasks, entries, size = rows
        return {
            "runs": int(runs), "hits": int(hits), "misses": int(misses),
            "failures": int(failures), "crashed": int(crashed), "in_flight": int(in_flight),
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "time_saved": float(saved), "bytes_stored": int(size), "entries": int(entries),
            "tasks": int(tasks),
        }  # fmt: skip

    def lock_events(self, limit: int | None = 100) -> pd.DataFrame:
        """Lock events, newest first."""
        query = "SELECT * FROM lock_events ORDER BY time DESC"
        if limit is not None:
            query += f" LIMIT {max(0, int(limit))}"
        return _with_datetimes(self._read(query), ("time", "lease_expires"))

    def locks(self) -> pd.DataFrame:
        """The locks held now, as last recorded (oldest first)."""
        df = self._read("SELECT * FROM locks ORDER BY acquired")
        return _with_datetimes(df, ("acquired", "lease_expires", "updated"))

    def sql(self, query: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Run a read-only SQL query against the index; timestamps are epoch seconds.

        >>> store.sql("SELECT task, count(*) AS n FROM runs GROUP BY task")  # doctest: +SKIP
        """
        df: pd.DataFrame = self._read(query, params, ours=False)
        return df

    def sql_arrow(self, query: str, params: Sequence[Any] = ()) -> pa.Table:
        """``sql`` as an Arrow table (no pandas conversion: ~50x cheaper for many string
        rows, e.g. the dashboard's listing of every run)."""

        import pyarrow  # noqa: F401  (before the lock: see _Database.locked)

        def fetch(cur: Any) -> pa.Table:
            got = cur.arrow()
            table: pa.Table = got.read_all() if hasattr(got, "read_all") else got
            return table

        result: pa.Table = self._read(query, params, fetch, ours=False)
        return result
