"""The metadata index: runs, cache entries and locks, kept in one DuckDB file.

DuckDB lets only one *process* open a file at a time (DESIGN.md, "Metadata"), and several
kernels, a dashboard and the CLI share one store. So:

* Callers never wait for DuckDB: ``record_*`` appends to an in-memory queue (microseconds).
* One daemon recorder thread per (process, file) drains the queue and writes each batch in one
  transaction: file lock (``<path>.lock``) → open → write → close → unlock. The batch is taken
  *after* the lock is acquired, so the longer other processes keep us waiting, the bigger the
  batch. The file is never held open while idle.
* Reads take the same lock (DuckDB refuses even read-only opens while another process writes)
  and first flush this process's queue, so users see their own runs.
* While this process has runs in flight, the recorder writes a heartbeat every minute (so
  other hosts can tell it is alive); otherwise an idle process never opens the file.
* Every write is idempotent: runs merge by state (a final state never regresses; among equals
  the latest ``at`` wins), entries and locks are upserts, and the append-only tables skip rows
  already present when a batch is written again after a failure whose outcome is in doubt.

The index is not the only copy: results stay usable from the store's manifests, and
:meth:`MetadataStore.rebuild` recreates the cache index from them.

>>> import tempfile, time, os
>>> store = MetadataStore(os.path.join(tempfile.mkdtemp(), "meta", "metadata.duckdb"))
>>> store.record_run(RunEvent("r1", "load", "load-id", None, RunState.COMPLETED, time.time()))
>>> store.history()["state"].tolist()
['COMPLETED']
>>> store.close()
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import operator
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, get_args

from notebook_flow import _identity
from notebook_flow.errors import MetadataError
from notebook_flow.states import FINAL_STATES, RunState

if TYPE_CHECKING:
    import duckdb
    import filelock
    import pandas as pd

__all__ = ["SCHEMA_VERSION", "CacheEntry", "LockEvent", "MetadataStore", "RunEvent"]

logger = logging.getLogger("notebook_flow")

LOCK_TIMEOUT = 120.0  # s to wait for the cross-process lock before a MetadataError
STALE_AFTER = 600.0  # s without a heartbeat after which another host's run counts as crashed
HEARTBEAT_INTERVAL = 60.0  # s between heartbeats while this process has runs in flight
_LINGER = 0.25  # s the recorder waits after the first event, so bursts share a transaction
_IDLE_CHECKPOINT = 1.0  # s without writes before the recorder checkpoints the WAL
_WAL_KEEP = 256 * 1024  # bytes of WAL a write session may leave (each open replays it)
_POLL = 0.01  # s between attempts at the file lock
_MAX_BATCH = 20_000  # operations per transaction
_MAX_PENDING = 200_000  # queued operations before producers wait for the recorder
_MAX_ATTEMPTS = 5  # transient failures of one batch before it is dropped and reported
_EXIT_FLUSH_TIMEOUT = 30.0

# Set by the exit hook once this process's queues are flushed. A daemon thread still inside
# DuckDB when the interpreter finalizes is unwound through C++ frames and aborts the whole
# process ("terminate called without an active exception"), so from then on only the main
# thread may open the file; other threads park (they are daemons and vanish at exit).
_exiting = threading.Event()

_NON_FINAL = ("PENDING", "RUNNING", "RETRYING")
_NON_FINAL_SQL = "(" + ", ".join(f"'{s}'" for s in _NON_FINAL) + ")"


# --------------------------------------------------------------------------------- records


def _host() -> str:
    return _identity.process().host


def _pid() -> int:
    return _identity.process().pid


def _pid_start() -> int | None:
    return _identity.process().start_time


def _kernel() -> str | None:
    return _identity.process().kernel


@dataclass(slots=True)  # not frozen: a frozen init costs ~4 µs more, on every cache hit
class RunEvent:
    """One state transition of a run; the process fields default to the current process.

    >>> RunEvent("r1", "load", "load-id", None, RunState.RUNNING, 0.0).state
    <RunState.RUNNING: 'RUNNING'>
    """

    run_id: str
    task: str
    task_identity: str
    key: str | None
    state: RunState
    at: float
    attempt: int = 1
    duration: float | None = None
    saved: float | None = None  # seconds a cache hit saved
    error: str | None = None
    traceback: str | None = None
    explain: str | None = None
    size: int | None = None
    inputs: str | None = None  # short JSON summary
    notebook: str | None = None
    cell: str | None = None
    tags: tuple[str, ...] = ()
    host: str = field(default_factory=_host)
    pid: int = field(default_factory=_pid)
    pid_start: int | None = field(default_factory=_pid_start)
    kernel: str | None = field(default_factory=_kernel)

    def __post_init__(self) -> None:
        if not isinstance(self.state, RunState):
            object.__setattr__(self, "state", RunState(self.state))
        if not isinstance(self.tags, tuple):
            object.__setattr__(self, "tags", tuple(self.tags))


LockEventKind = Literal[
    "acquired", "waited", "released", "recovered", "broken", "renewed", "renew_failed", "lost"
]


@dataclass(frozen=True)
class LockEvent:
    """Something that happened to a lock; ``holder`` is the holder the event is about.

    >>> LockEvent("k", "host:1:2:3", "acquired", 0.0, "file").event
    'acquired'
    """

    key: str
    holder: str
    event: LockEventKind
    at: float
    manager: str
    lease_expires: float | None = None
    waited: float | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        if self.event not in get_args(LockEventKind):
            raise ValueError(
                f"unknown lock event {self.event!r}; use one of {get_args(LockEventKind)}"
            )


@dataclass(frozen=True)
class CacheEntry:
    """The index record of one committed result (mirrors the store's manifest).

    >>> CacheEntry("0" * 32, "load", "load-id", 10, 0.0, None, 1.5, "json", "p", {}).size
    10
    """

    key: str
    task: str
    task_identity: str
    size: int
    created_at: float
    expires_at: float | None
    duration: float
    serializer: str
    payload: str
    components: dict[str, str]
    run_id: str | None = None

    @classmethod
    def from_manifest(
        cls, manifest: Any, *, task_identity: str | None = None, size: int | None = None
    ) -> CacheEntry:
        """Build an entry from a ``storage.Manifest`` (or any object with its fields)."""
        identity = task_identity or getattr(manifest, "task_identity", None) or manifest.task
        return cls(
            key=manifest.key,
            task=manifest.task,
            task_identity=identity,
            size=int(manifest.size if size is None else size),
            created_at=float(manifest.created_at),
            expires_at=manifest.expires_at,
            duration=float(manifest.duration),
            serializer=manifest.serializer,
            payload=manifest.payload,
            components=dict(manifest.components),
            run_id=getattr(manifest, "run_id", None),
        )


@dataclass(frozen=True)
class _Remove:
    keys: tuple[str, ...] | None
    task: str | None


class _MarkCrashed:
    """Queued once per process and file: mark runs of dead processes crashed."""


_Op = RunEvent | CacheEntry | LockEvent | _Remove | _MarkCrashed


# ---------------------------------------------------------------------------------- schema

_RUNS = (
    ("run_id", "VARCHAR PRIMARY KEY"), ("task", "VARCHAR"), ("task_identity", "VARCHAR"),
    ("key", "VARCHAR"), ("state", "VARCHAR"), ("created", "DOUBLE"), ("started", "DOUBLE"),
    ("ended", "DOUBLE"), ("duration", "DOUBLE"), ("saved", "DOUBLE"), ("attempt", "INTEGER"),
    ("error", "VARCHAR"), ("traceback", "VARCHAR"), ("explain", "VARCHAR"), ("size", "BIGINT"),
    ("inputs", "VARCHAR"), ("host", "VARCHAR"), ("pid", "BIGINT"), ("pid_start", "BIGINT"),
    ("kernel", "VARCHAR"), ("notebook", "VARCHAR"), ("cell", "VARCHAR"), ("tags", "VARCHAR[]"),
    ("updated", "DOUBLE"),
)  # fmt: skip
_RUN_EVENTS = (
    ("run_id", "VARCHAR"), ("task", "VARCHAR"), ("task_identity", "VARCHAR"), ("key", "VARCHAR"),
    ("state", "VARCHAR"), ("time", "DOUBLE"), ("attempt", "INTEGER"), ("duration", "DOUBLE"),
    ("saved", "DOUBLE"), ("error", "VARCHAR"), ("traceback", "VARCHAR"), ("explain", "VARCHAR"),
    ("size", "BIGINT"), ("inputs", "VARCHAR"), ("host", "VARCHAR"), ("pid", "BIGINT"),
    ("pid_start", "BIGINT"), ("kernel", "VARCHAR"), ("notebook", "VARCHAR"), ("cell", "VARCHAR"),
)  # fmt: skip
_CACHE_ENTRIES = (
    ("key", "VARCHAR PRIMARY KEY"), ("task", "VARCHAR"), ("task_identity", "VARCHAR"),
    ("size", "BIGINT"), ("created_at", "DOUBLE"), ("expires_at", "DOUBLE"), ("duration", "DOUBLE"),
    ("serializer", "VARCHAR"), ("payload", "VARCHAR"), ("components", "VARCHAR"),
    ("run_id", "VARCHAR"),
)  # fmt: skip
_LOCKS = (
    ("key", "VARCHAR PRIMARY KEY"), ("holder", "VARCHAR"), ("acquired", "DOUBLE"),
    ("lease_expires", "DOUBLE"), ("manager", "VARCHAR"), ("task", "VARCHAR"), ("updated", "DOUBLE"),
)  # fmt: skip
_LOCK_EVENTS = (
    ("key", "VARCHAR"), ("holder", "VARCHAR"), ("event", "VARCHAR"), ("time", "DOUBLE"),
    ("manager", "VARCHAR"), ("lease_expires", "DOUBLE"), ("waited", "DOUBLE"), ("task", "VARCHAR"),
)  # fmt: skip
_PROCESSES = (
    ("process_id", "VARCHAR PRIMARY KEY"), ("host", "VARCHAR"), ("pid", "BIGINT"),
    ("pid_start", "BIGINT"), ("kernel", "VARCHAR"), ("started", "DOUBLE"), ("last_seen", "DOUBLE"),
)  # fmt: skip

_Columns = tuple[tuple[str, str], ...]


def _create(table: str, columns: _Columns) -> str:
    return f"CREATE TABLE {table} (" + ", ".join(f"{c} {t}" for c, t in columns) + ")"


def _names(columns: _Columns) -> str:
    """Explicit column lists everywhere: a later migration may add columns."""
    return ", ".join(c for c, _ in columns)


# Migrations by version; a migration runs once, in one transaction with its version row.
# Never edit a released migration: append a new version (e.g. ALTER TABLE ... ADD COLUMN).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        _create("runs", _RUNS),
        _create("run_events", _RUN_EVENTS),
        _create("cache_entries", _CACHE_ENTRIES),
        _create("locks", _LOCKS),
        _create("lock_events", _LOCK_EVENTS),
        _create("processes", _PROCESSES),
    ),
}
SCHEMA_VERSION = max(_MIGRATIONS)

# Runs fold in SQL, inside the write transaction: the batch's events and the rows already
# stored for the same runs are grouped by run_id. State-bound columns come from the winning
# transition, the others from the highest-ranked row that has them. A final state beats a
# non-final one; among equals the later transition wins, and among ties the one written
# last (stored rows rank below the batch, the batch in queue order). Done row by row in
# Python this cost ~15 µs of GIL time per event on the recorder thread, which slowed every
# other thread of the kernel; DuckDB runs the GROUP BY without holding the GIL.
_STATE_BOUND = ("state", "updated", "ended", "error", "traceback")
_MIN, _MAX = ("created", "started"), ("attempt",)

# A batch of run events as one Arrow table: the run_events columns (``time`` is the
# event's ``at``), then ``tags`` and ``seq`` (queue order), read with one attrgetter per
# event instead of a dict per row.
_BATCH_COLUMNS: _Columns = (*_RUN_EVENTS, ("tags", "VARCHAR[]"), ("seq", "BIGINT"))
_event_values = operator.attrgetter(*("at" if c == "time" else c for c, _ in _RUN_EVENTS), "tags")


def _rank(seq: str) -> str:
    return f"{{'final': state NOT IN {_NON_FINAL_SQL}, 'updated': updated, 'seq': {seq}}}"


def _fold_runs_sql() -> str:
    names = _names(_RUNS)
    from_batch = ", ".join(
        {
            "created": "time",
            "started": "CASE WHEN state = 'RUNNING' THEN time END",
            "ended": f"CASE WHEN state NOT IN {_NON_FINAL_SQL} THEN time END",
            "tags": "CASE WHEN len(tags) > 0 THEN tags END",
            "updated": "time",
        }.get(c, c)
        + f" AS {c}"
        for c, _ in _RUNS
    )
    aggregate = {c: f"arg_max_null({c}, rank)" for c in _STATE_BOUND}
    aggregate.update({c: f"min({c})" for c in _MIN} | {c: f"max({c})" for c in _MAX})
    # arg_max skips NULLs: the best-ranked value there is, for the merged columns.
    folded = "run_id, " + ", ".join(
        f"{aggregate.get(c, f'arg_max({c}, rank)')} AS {c}" for c, _ in _RUNS if c != "run_id"
    )
    return (
        f"INSERT OR REPLACE INTO runs ({names}) SELECT {folded} FROM ("
        f"SELECT {names}, {_rank('0')} AS rank FROM runs "
        "WHERE run_id IN (SELECT run_id FROM _batch) UNION ALL "
        f"SELECT {names}, {_rank('seq')} AS rank FROM (SELECT {from_batch}, seq FROM _batch)"
        ") GROUP BY run_id"
    )


_FOLD_RUNS = _fold_runs_sql()


def _batch_arrow(events: list[RunEvent]) -> Any:
    """The batch's run events, columnar (see _BATCH_COLUMNS)."""
    import pyarrow as pa

    columns = list(zip(*map(_event_values, events), strict=True))
    columns.append(range(1, len(events) + 1))  # type: ignore[arg-type]
    schema = _schema(_BATCH_COLUMNS)
    return pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)],
        schema=schema,
    )


def _schema(columns: _Columns) -> Any:
    """The Arrow schema of a table's columns, with their exact types."""
    import pyarrow as pa

    types = {"VARCHAR": pa.string(), "DOUBLE": pa.float64(), "BIGINT": pa.int64(),
             "INTEGER": pa.int32(), "VARCHAR[]": pa.list_(pa.string())}  # fmt: skip
    return pa.schema([(c, types[t.split(" ")[0]]) for c, t in columns])


def _arrow(columns: _Columns, rows: Sequence[dict[str, Any]]) -> Any:
    """An Arrow table with the table's exact column types (all-NULL columns included)."""
    import pyarrow as pa

    return pa.table({c: [r.get(c) for r in rows] for c, _ in columns}, schema=_schema(columns))


# -------------------------------------------------------------------------------- database

_FOREIGN_LOCK = ("Could not set lock on file", "Conflicting lock")
_UNREADABLE = (
    "not a valid DuckDB database file", "Corrupt database", "Could not read enough bytes",
    "checksum", "version number", "Serialization Error", "INTERNAL Error",
)  # fmt: skip


class _PermanentError(MetadataError):
    """The file cannot be used as it is; retrying the same batch will not help."""


class _Database:
    """Short, serialized sessions with one DuckDB file; shared by the threads of a process."""

    def __init__(self, path: str, lock_timeout: float) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self._mutex = threading.Lock()  # one session per process at a time
        self._file_lock: filelock.BaseFileLock | None = None  # made by the first session
        # Writes leave their changes in the WAL (closing skips the checkpoint, which cost
        # each ~20-50 ms); the recorder checkpoints once the process has been idle a while.
        self.dirty = False

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[float]:
        """Hold the in-process and cross-process locks; yields the deadline (monotonic)."""
        # Import before locking: a first import of duckdb + pyarrow + pandas takes long
        # enough that every other process would wait for it.
        import duckdb  # noqa: F401
        import filelock
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401

        timeout = self.lock_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:  # again on every session: the store's folder may have been deleted meanwhile
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise MetadataError(f"Cannot create the folder of {self.path}: {exc}") from exc
        _park_if_exiting()
        if not self._mutex.acquire(timeout=timeout):
            raise self._timeout_error(timeout)
        try:
            if self._file_lock is None:
                # thread_local=False: the mutex already serialises this process's threads.
                self._file_lock = filelock.FileLock(self.path + ".lock", thread_local=False)
            file_lock = self._file_lock
            try:
                file_lock.acquire(
                    timeout=max(0.0, deadline - time.monotonic()), poll_interval=_POLL
                )
            except filelock.Timeout as exc:
                raise self._timeout_error(timeout) from exc
            try:
                if not _may_open():  # the exit hook ran while we waited for the lock
                    raise _Exiting
                yield deadline
            finally:
                file_lock.release()
        except _Exiting:
            pass
        finally:
            self._mutex.release()
        _park_if_exiting()

    def drain(self, timeout: float) -> None:
        """Wait for a session in flight (in any thread) to end."""
        if self._mutex.acquire(timeout=timeout):
            self._mutex.release()

    def _timeout_error(self, timeout: float) -> MetadataError:
        return MetadataError(
            f"Waited {timeout:.0f}s for the metadata lock {self.path}.lock. Another process "
            "(a kernel, the dashboard or the CLI) keeps it; if that process hangs, stop it. "
            "Raise the wait with MetadataStore(path, lock_timeout=...)."
        )

    def unreadable(self, exc: BaseException) -> _PermanentError:
        return _PermanentError(
            f"The metadata index {self.path} cannot be used: {exc}. It is only an index of "
            f"the result store (cached results are safe). Move it away (mv '{self.path}' "
            f"'{self.path}.broken') and run notebook_flow.rebuild_index() to rebuild it from "
            "the store's manifests (run history is lost)."
        )

    def _error(self, exc: BaseException) -> MetadataError:
        import duckdb

        if any(m in str(exc) for m in _UNREADABLE):
            return self.unreadable(exc)
        if isinstance(exc, duckdb.ProgrammingError):  # parser/binder/catalog: same every time
            return _PermanentError(f"The metadata index {self.path} refused a query: {exc}")
        return MetadataError(f"The metadata index {self.path} failed: {exc}")

    def _connect(self, *, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
        import duckdb

        if not read_only and os.path.isfile(self.path) and os.path.getsize(self.path) == 0:
            # A DuckDB file is never empty; an empty one (touch, failed copy) holds nothing.
            logger.warning("Replacing the empty metadata file %s", self.path)
            os.unlink(self.path)
        delay = 0.01
        while True:
            try:
                # threads=1: opening costs ~40% less, and our queries are small.
                return duckdb.connect(self.path, read_only=read_only, config={"threads": 1})
            except duckdb.Error as exc:
                # Nothing was written: opening failed. Only then is retrying safe. This happens
                # when a process outside our file lock (a `duckdb` shell, foreign code) has it open.
                if any(m in str(exc) for m in _FOREIGN_LOCK):
                    if time.monotonic() + delay < deadline:
                        time.sleep(delay)
                        delay = min(delay * 2, 0.5)
                        continue
                    raise MetadataError(
                        f"The metadata index {self.path} is held open by another process that "
                        f"does not use notebook_flow's lock ({exc}). Close that connection."
                    ) from exc
                raise self._error(exc) from exc

    def _version(self, con: duckdb.DuckDBPyConnection) -> int:
        import duckdb

        try:
            row = con.execute("SELECT max(version) FROM schema_version").fetchone()
        except duckdb.CatalogException:
            return 0
        return int(row[0]) if row and row[0] is not None else 0

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        latest = max(_MIGRATIONS)
        current = self._version(con)
        if current > latest:
            raise _PermanentError(
                f"The metadata index {self.path} has schema version {current}, newer than this "
                f"notebook_flow understands ({latest}). Upgrade notebook_flow in this environment."
            )
        if current == latest:
            return
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, applied DOUBLE)"
            )
            for version in range(current + 1, latest + 1):
                for statement in _MIGRATIONS[version]:
                    con.execute(statement)
                con.execute(
                    "INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                    [version, time.time()],
                )
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                con.execute("ROLLBACK")
            raise
        logger.debug("Migrated %s from schema version %d to %d", self.path, current, latest)

    def write(
        self,
        deadline: float,
        body: Callable[[duckdb.DuckDBPyConnection], Any],
        after_commit: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
    ) -> Any:
        """open → migrate → BEGIN → body → COMMIT → after_commit → close; the caller holds
        :meth:`locked`. ``after_commit`` (a read on the same connection) must not raise."""
        import duckdb

        con = self._connect(read_only=False, deadline=deadline)
        try:
            keep_wal = self._wal_size() <= _WAL_KEEP  # else this close checkpoints
            if keep_wal:
                con.execute("PRAGMA disable_checkpoint_on_shutdown")  # see self.dirty
            self._migrate(con)
            con.execute("BEGIN TRANSACTION")
            try:
                result = body(con)
                con.execute("COMMIT")
                self.dirty = keep_wal  # the close checkpoints otherwise
            except BaseException:
                with contextlib.suppress(Exception):
                    con.execute("ROLLBACK")
                raise
            if after_commit is not None:
                after_commit(con)
            return result
        except duckdb.Error as exc:
            raise self._error(exc) from exc
        finally:
            self._close(con)

    def _wal_size(self) -> int:
        try:
            return os.path.getsize(self.path + ".wal")
        except OSError:
            return 0

    def checkpoint(self, deadline: float) -> None:
        """Move the WAL into the database file (readers then need not replay it); the caller
        holds :meth:`locked`."""
        import duckdb

        con = self._connect(read_only=False, deadline=deadline)
        try:
            con.execute("CHECKPOINT")
            self.dirty = False
        except duckdb.Error as exc:
            raise self._error(exc) from exc
        finally:
            self._close(con)

    def read(
        self,
        deadline: float,
        query: str,
        params: Sequence[Any] = (),
        fetch: Callable[[duckdb.DuckDBPyConnection], Any] | None = None,
    ) -> Any:
        """Run a query on a read-only connection (so user SQL cannot modify the index).

        Returns ``fetch(cursor)``, by default a pandas DataFrame; the caller holds :meth:`locked`.
        """
        import duckdb

        if not os.path.isfile(self.path) or os.path.getsize(self.path) == 0:
            self.write(deadline, lambda con: None)  # create the file and schema
        con = self._connect(read_only=True, deadline=deadline)
        try:
            if self._version(con) != max(_MIGRATIONS):
                self._close(con)
                self.write(deadline, lambda con: None)
                con = self._connect(read_only=True, deadline=deadline)
            cur = con.execute(query, list(params))
            return cur.df() if fetch is None else fetch(cur)
        except duckdb.Error as exc:
            raise self._error(exc) from exc
        finally:
            self._close(con)

    def _close(self, con: duckdb.DuckDBPyConnection) -> None:
        try:
            con.close()  # checkpoints; a failure leaves the committed data in the WAL
        except Exception as exc:
            logger.warning("Closing the metadata index %s failed: %s", self.path, exc)


# -------------------------------------------------------------------------------- recorder


_NOT_WRITTEN = object()  # _Recorder._write_once: the batch was not written


class _Recorder:
    """The queue and daemon thread that write one file's operations for this process."""

    def __init__(self, db: _Database, stale_after: float) -> None:
        # pandas (which DuckDB imports to read Arrow) imports concurrent.futures.thread, which
        # registers a threading exit hook, refused once the interpreter shuts down: a final
        # flush at exit would fail. Importing it now (stdlib, ~1 ms) makes that a no-op.
        import concurrent.futures.thread  # noqa: F401

        # Import what the recorder thread needs here, in the thread that records first: an
        # import in a background thread, while this one runs Python, waits a GIL switch
        # interval after each of its hundreds of file reads (~40 ms became ~600 ms).
        import duckdb  # noqa: F401
        import filelock  # noqa: F401
        import pyarrow  # noqa: F401

        self.db = db
        self.stale_after = stale_after
        self.crash_check_scheduled = False
        self.users = 0
        self.batches = 0  # transactions written, and seconds spent (for tests and benchmarks)
        self.lock_wait = self.lock_held = 0.0
        self._cond = threading.Condition()
        self._queue: collections.deque[_Op] = collections.deque()
        self._writing = 0  # operations taken off the queue by the transaction in progress
        self._done = 0  # operations written, or dropped and reported in _failures
        self._failures: list[tuple[int, int, BaseException]] = []  # (first, last, error)
        self._attempts = 0
        self._dedupe = False  # the next batch may already be (partly) written
        self._flush_waiters = 0
        self._stop = False
        self._active: set[str] = set()  # this process's runs in flight → heartbeats
        self._last_beat = 0.0
        self._warned_full = False
        self._thread: threading.Thread | None = None
        self._sleeping = False  # the recorder waits for work (put() must notify)
        self._final_checkpoint = False  # a stopping recorder checkpoints once before it ends
        self.started_at = time.time()

    def put(self, op: _Op) -> None:
        # Without taking _cond: the queue and the set are thread-safe, and a worker thread
        # that blocked on a lock the submitting thread held (three events per run) then
        # waited a whole GIL switch interval (5 ms) to run again: 2x less throughput.
        queue = self._queue
        if len(queue) >= _MAX_PENDING and not self._wait_for_room():
            if not self._warned_full:
                self._warned_full = True
                logger.warning(
                    "The metadata recorder for %s wrote nothing for %gs and %d events wait; "
                    "dropping new ones until it catches up",
                    self.db.path,
                    self.db.lock_timeout,
                    len(queue),
                )
            return
        if type(op) is RunEvent:
            if op.state in FINAL_STATES:
                self._active.discard(op.run_id)
            else:
                self._active.add(op.run_id)
        queue.append(op)
        # The recorder raises _sleeping before it looks at the queue, we append before we
        # look at _sleeping: one of us sees the other, so no wake-up is lost. A recorder
        # only ends when stopped with an empty queue; a lingering one stops lingering when
        # a whole batch waits.
        if self._sleeping or self._stop or self._thread is None or len(queue) == _MAX_BATCH:
            with self._cond:
                self._ensure_thread()
                self._cond.notify_all()

    def _wait_for_room(self) -> bool:
        """Back-pressure: a producer far ahead of the database waits for the recorder (runs
        slow down rather than lose their history). False if it made no room in time (e.g.
        another process holds the metadata lock), or from the recorder thread itself."""
        if threading.current_thread() is self._thread:
            return False
        with self._cond:
            self._ensure_thread()
            self._cond.notify_all()
            return (
                self._cond.wait_for(
                    lambda: len(self._queue) < _MAX_PENDING or self._thread is None,
                    self.db.lock_timeout,
                )
                and len(self._queue) < _MAX_PENDING
            )

    def pending(self) -> int:
        """Operations queued or being written."""
        return len(self._queue) + self._writing

    def _ensure_thread(self) -> bool:
        """A running recorder thread (the caller holds _cond); False when none can start."""
        if self._thread is not None and self._thread.is_alive():
            return True  # (a stopping one still writes what is queued before it ends)
        if _exiting.is_set():
            return False
        self._stop = self._final_checkpoint = False
        thread = threading.Thread(target=self._loop, name="notebook_flow-metadata", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutdown: flush() writes in the caller's thread
            return False
        self._thread = thread
        return True

    def flush(self, timeout: float | None, *, raise_errors: bool = True) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._done + self._writing + len(self._queue)
            if self._done < target and not self._ensure_thread():
                if threading.current_thread() is not threading.main_thread():
                    raise MetadataError(f"Not flushed to {self.db.path}: the interpreter exits")
                self._cond.release()  # no thread can be started (exiting): write here
                try:
                    while self._done < target and (deadline is None or time.monotonic() < deadline):
                        self._write_once()
                finally:
                    self._cond.acquire()
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                done = self._cond.wait_for(lambda: self._done >= target, timeout)
            finally:
                self._flush_waiters -= 1
            if not done:
                raise MetadataError(
                    f"{target - self._done} metadata events were not yet written to "
                    f"{self.db.path} after {timeout}s; another process may keep "
                    f"{self.db.path}.lock (a hanging kernel?)."
                )
            failed = [f for f in self._failures if f[0] <= target]
            if failed and raise_errors:
                self._failures = [f for f in self._failures if f[0] > target]
                lost = sum(last - first + 1 for first, last, _ in failed)
                raise MetadataError(
                    f"{lost} metadata events were lost: {failed[-1][2]}"
                ) from failed[-1][2]

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _beat_due_in(self) -> float | None:
        if not self._active:
            return None
        return self._last_beat + HEARTBEAT_INTERVAL - time.time()

    def _loop(self) -> None:
        while True:
            with self._cond:
                try:
                    while True:
                        self._sleeping = True  # first, then look (see put())
                        if self._queue or self._stop:
                            break
                        # A heartbeat or an idle checkpoint may fall due before new work.
                        dues = [self._beat_due_in(), self._checkpoint_due_in()]
                        due = min((t for t in dues if t is not None), default=None)
                        if due is not None and due <= 0:
                            break
                        self._cond.wait(due)
                finally:
                    self._sleeping = False
                stopping = self._stop and not self._queue
                idle = self._checkpoint_due_in()
                checkpoint = (
                    not self._queue
                    and idle is not None
                    and (idle <= 0 or (stopping and not self._final_checkpoint))
                )
                self._final_checkpoint |= checkpoint and stopping  # tried once, not forever
                if stopping and not checkpoint:
                    self._thread = None  # in the same critical section: put() starts a new one
                    return
            if checkpoint:
                self._checkpoint()
                continue
            with self._cond:
                # Linger so that a burst shares one transaction.
                if self._queue and not self._flush_waiters and not self._stop:
                    self._cond.wait_for(  # no lingering once a whole batch is waiting
                        lambda: (
                            self._flush_waiters > 0 or self._stop or len(self._queue) >= _MAX_BATCH
                        ),
                        timeout=_LINGER,
                    )
            try:
                self._write_once()
            except Exception:  # never let the recorder die; _write_once reports its own errors
                logger.exception("The metadata recorder for %s failed", self.db.path)
                time.sleep(1.0)

    def _checkpoint_due_in(self) -> float | None:
        """Seconds until the WAL should be checkpointed (None: nothing to checkpoint)."""
        if not self.db.dirty:
            return None
        return self._last_beat + _IDLE_CHECKPOINT - time.time()

    def _checkpoint(self) -> None:
        try:
            with self.db.locked() as deadline:
                self.db.checkpoint(deadline)
        except Exception as exc:  # the WAL stays; readers replay it, the next idle retries
            logger.debug("Checkpointing %s failed: %s", self.db.path, exc)
            with self._cond:
                self._last_beat = time.time()

    def write_then_read(self, read: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """Write everything queued, then ``read`` on the same connection after the commit:
        one session where flush() and then a read-only session open the file twice (each
        open and close costs ~10-50 ms). Returns _NOT_WRITTEN if the write failed (the
        caller then flushes and reads as usual); raises what ``read`` raises."""
        while len(self._queue) > _MAX_BATCH:
            if self._write_once() is _NOT_WRITTEN:
                return _NOT_WRITTEN
        outcome: list[tuple[bool, Any]] = []

        def capture(con: duckdb.DuckDBPyConnection) -> None:
            try:
                outcome.append((True, read(con)))
            except Exception as exc:  # raised below, once the batch is accounted for
                outcome.append((False, exc))

        if self._write_once(capture) is _NOT_WRITTEN or not outcome:
            return _NOT_WRITTEN
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _write_once(self, after_commit: Callable[[Any], None] | None = None) -> object:
        batch: list[_Op] = []
        began = time.perf_counter()
        try:
            with self.db.locked() as deadline:
                locked = time.perf_counter()
                with self._cond:  # take the batch only now: waiting for the lock grows it
                    batch = [
                        self._queue.popleft() for _ in range(min(len(self._queue), _MAX_BATCH))
                    ]
                    self._writing = len(batch)
                    dedupe = self._dedupe
                try:
                    self.db.write(
                        deadline, lambda con: _write_batch(con, self, batch, dedupe), after_commit
                    )
                except BaseException:
                    with self._cond:
                        self._queue.extendleft(reversed(batch))
                        self._writing = 0
                    raise
        except Exception as exc:
            self._failed(exc, len(batch))
            return _NOT_WRITTEN
        end = time.perf_counter()
        logger.debug(
            "Wrote %d metadata operations to %s in %.1f ms (after %.1f ms waiting for the lock)",
            len(batch), self.db.path, 1000 * (end - locked), 1000 * (locked - began),
        )  # fmt: skip
        with self._cond:
            self._done += len(batch)
            self._writing = 0
            self._attempts = 0
            self._dedupe = False
            self.batches += 1
            self.lock_wait += locked - began
            self.lock_held += end - locked
            self._last_beat = time.time()
            self._cond.notify_all()
        return None

    def _failed(self, exc: Exception, size: int) -> None:
        with self._cond:
            self._attempts += 1
            self._dedupe = True  # the commit may or may not have happened
            if not isinstance(exc, _PermanentError) and self._attempts < _MAX_ATTEMPTS:
                delay = min(0.1 * 2**self._attempts, 5.0)
                logger.warning("Writing metadata failed (retrying in %.1fs): %s", delay, exc)
                self._cond.wait_for(lambda: self._stop, timeout=delay)
                return
            size = size or min(len(self._queue), _MAX_BATCH)
            for _ in range(size):
                self._queue.popleft()
            if size:
                self._failures.append((self._done + 1, self._done + size, exc))
            self._done += size
            self._attempts = 0
            self._cond.notify_all()
        if size:
            logger.error("Dropped %d metadata events for %s: %s", size, self.db.path, exc)
        else:
            logger.warning("Metadata heartbeat for %s failed: %s", self.db.path, exc)


def _write_batch(
    con: duckdb.DuckDBPyConnection, rec: _Recorder, batch: list[_Op], dedupe: bool
) -> None:
    """Write one batch inside an open transaction; order matters only among cache ops."""
    events: list[RunEvent] = []
    lock_events: list[LockEvent] = []
    cache_ops: list[CacheEntry | _Remove] = []
    for op in batch:
        if type(op) is RunEvent:
            events.append(op)
        elif isinstance(op, LockEvent):
            lock_events.append(op)
        elif isinstance(op, (CacheEntry, _Remove)):
            cache_ops.append(op)
        else:
            count = _mark_crashed(con, rec.stale_after)
            if count:
                logger.info("Marked %d runs of dead processes as crashed", count)
    if events:
        _write_run_events(con, events, dedupe=dedupe)
    _apply_cache_ops(con, cache_ops)
    if lock_events:
        _apply_lock_events(con, lock_events, dedupe)
    me = _identity.process()
    con.execute(
        f"INSERT INTO processes ({_names(_PROCESSES)}) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (process_id) "
        "DO UPDATE SET last_seen = greatest(processes.last_seen, excluded.last_seen)",
        [f"{me.host}:{me.pid}:{me.start_time or 0}", me.host, me.pid, me.start_time, me.kernel,
         rec.started_at, time.time()],
    )  # fmt: skip


def _write_run_events(
    con: duckdb.DuckDBPyConnection, events: list[RunEvent], *, dedupe: bool
) -> None:
    """Append the events to run_events and fold them into runs (see _FOLD_RUNS)."""
    con.register("_batch", _batch_arrow(events))
    try:
        key = ("run_id", "state", "time", "attempt")
        _insert_from(con, "_batch", "run_events", _RUN_EVENTS, key, dedupe=dedupe)
        con.execute(_FOLD_RUNS)
    finally:
        con.unregister("_batch")


def _append(
    con: duckdb.DuckDBPyConnection,
    table: str,
    columns: _Columns,
    rows: list[dict[str, Any]],
    natural_key: tuple[str, ...],
    *,
    dedupe: bool,
) -> None:
    """Append rows; when a retry may repeat an earlier commit, skip rows already there."""
    con.register("_rows", _arrow(columns, rows))
    try:
        _insert_from(con, "_rows", table, columns, natural_key, dedupe=dedupe)
    finally:
        con.unregister("_rows")


def _insert_from(
    con: duckdb.DuckDBPyConnection,
    source: str,
    table: str,
    columns: _Columns,
    natural_key: tuple[str, ...],
    *,
    dedupe: bool,
) -> None:
    """INSERT the rows of a registered ``source``; with ``dedupe`` (a retry may repeat an
    earlier commit) only those whose ``natural_key`` is not in ``table`` yet."""
    where = ""
    if dedupe:
        match = " AND ".join(f"t.{c} IS NOT DISTINCT FROM b.{c}" for c in natural_key)
        where = f" WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {match})"
    names = _names(columns)
    con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {source} b{where}")


def _entry_row(e: CacheEntry) -> dict[str, Any]:
    return {
        "key": e.key, "task": e.task, "task_identity": e.task_identity, "size": e.size,
        "created_at": e.created_at, "expires_at": e.expires_at, "duration": e.duration,
        "serializer": e.serializer, "payload": e.payload,
        "components": json.dumps(e.components, sort_keys=True), "run_id": e.run_id,
    }  # fmt: skip


def _apply_cache_ops(con: duckdb.DuckDBPyConnection, ops: list[CacheEntry | _Remove]) -> None:
    pending: dict[str, CacheEntry] = {}

    def put() -> None:
        if pending:
            con.register(
                "_entries", _arrow(_CACHE_ENTRIES, [_entry_row(e) for e in pending.values()])
            )
            con.execute(
                f"INSERT OR REPLACE INTO cache_entries ({_names(_CACHE_ENTRIES)}) "
                f"SELECT {_names(_CACHE_ENTRIES)} FROM _entries"
            )
            con.unregister("_entries")
            pending.clear()

    for op in ops:
        if isinstance(op, CacheEntry):
            pending[op.key] = op
            continue
        put()  # a removal applies to what was recorded before it
        if op.keys is not None:
            con.register("_keys", _arrow((("key", "VARCHAR"),), [{"key": k} for k in op.keys]))
            con.execute("DELETE FROM cache_entries WHERE key IN (SELECT key FROM _keys)")
            con.unregister("_keys")
        elif op.task is not None:
            con.execute(
                "DELETE FROM cache_entries WHERE task = ? OR task_identity = ?", [op.task, op.task]
            )
        else:
            con.execute("DELETE FROM cache_entries")
    put()


def _apply_lock_events(
    con: duckdb.DuckDBPyConnection, events: list[LockEvent], dedupe: bool
) -> None:
    rows = [
        {"key": e.key, "holder": e.holder, "event": e.event, "time": e.at, "manager": e.manager,
         "lease_expires": e.lease_expires, "waited": e.waited, "task": e.task}
        for e in events
    ]  # fmt: skip
    _append(
        con, "lock_events", _LOCK_EVENTS, rows, ("key", "holder", "event", "time"), dedupe=dedupe
    )
    # The current lock table keeps, per key, the holder of the latest acquisition or renewal
    # unless that holder gave the lock up since. Every release in the batch is applied, not
    # only the latest event: "A released, B acquired, B released" must remove A's row too.
    last: dict[str, LockEvent] = {}
    acquired: dict[tuple[str, str], float] = {}
    gone: list[LockEvent] = []
    for e in sorted(events, key=lambda e: e.at):
        if e.event in ("waited", "renew_failed"):
            continue
        if e.event in ("acquired", "recovered"):
            acquired[(e.key, e.holder)] = e.at
        if e.event in ("acquired", "recovered", "renewed"):
            last[e.key] = e
        else:  # released, lost, broken
            gone.append(e)
            held = last.get(e.key)
            if held is not None and (e.event == "broken" or held.holder == e.holder):
                del last[e.key]
    for e in gone:
        if e.event == "broken":
            con.execute("DELETE FROM locks WHERE key = ? AND updated <= ?", [e.key, e.at])
        else:  # released, lost
            con.execute(
                "DELETE FROM locks WHERE key = ? AND holder = ? AND updated <= ?",
                [e.key, e.holder, e.at],
            )
    for e in last.values():
        if e.event in ("acquired", "recovered", "renewed"):
            con.execute(
                f"INSERT INTO locks ({_names(_LOCKS)}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET "
                "acquired = CASE WHEN excluded.holder = locks.holder "
                "THEN least(locks.acquired, excluded.acquired) ELSE excluded.acquired END, "
                "holder = excluded.holder, lease_expires = excluded.lease_expires, "
                "manager = excluded.manager, task = coalesce(excluded.task, locks.task), "
                "updated = excluded.updated WHERE excluded.updated >= locks.updated",
                [e.key, e.holder, acquired.get((e.key, e.holder), e.at), e.lease_expires,
                 e.manager, e.task, e.at],
            )  # fmt: skip


def _process_dead(
    host: str | None, pid: int | None, start: int | None, seen: float, stale: float
) -> bool:
    if host == _identity.process().host:
        return pid is None or not _identity.pid_alive(int(pid), start)
    return seen < time.time() - stale  # another host: only its heartbeat tells


def _mark_crashed(con: duckdb.DuckDBPyConnection, stale_after: float) -> int:
    """Mark runs in flight whose process is dead as CRASHED; drop their stale lock records."""
    rows = con.execute(
        "SELECT r.run_id, r.state, r.host, r.pid, r.pid_start, "
        "greatest(r.updated, coalesce(p.last_seen, r.updated)) "
        "FROM runs r LEFT JOIN processes p ON p.host = r.host AND p.pid = r.pid "
        "AND p.pid_start IS NOT DISTINCT FROM r.pid_start "
        f"WHERE r.state IN {_NON_FINAL_SQL}"
    ).fetchall()
    now = time.time()
    dead = [
        {"run_id": run_id, "error": f"Process {pid} on {host} ended while the run was {state}"}
        for run_id, state, host, pid, start, seen in rows
        if _process_dead(host, pid, start, seen or 0.0, stale_after)
    ]
    if dead:
        con.register("_dead", _arrow((("run_id", "VARCHAR"), ("error", "VARCHAR")), dead))
        con.execute(
            f"INSERT INTO run_events ({_names(_RUN_EVENTS)}) SELECT r.run_id, r.task, "
            "r.task_identity, r.key, 'CRASHED', ?, r.attempt, NULL, NULL, d.error, NULL, NULL, "
            "NULL, NULL, r.host, r.pid, "
            "r.pid_start, r.kernel, r.notebook, r.cell FROM runs r JOIN _dead d USING (run_id) "
            f"WHERE r.state IN {_NON_FINAL_SQL}",
            [now],
        )
        con.execute(
            "UPDATE runs SET state = 'CRASHED', ended = ?, updated = ?, error = d.error "
            f"FROM _dead d WHERE runs.run_id = d.run_id AND runs.state IN {_NON_FINAL_SQL}",
            [now, now],
        )
    for key, holder, lease in con.execute(
        "SELECT key, holder, lease_expires FROM locks"
    ).fetchall():
        h = _identity.parse_holder(holder)
        if "raw" in h:
            continue
        seen = lease if lease is not None else 0.0
        host, pid, start = h["host"], h["pid"], h["start_time"]
        if _process_dead(
            str(host), int(pid or 0), start if isinstance(start, int) else None, seen, stale_after
        ):
            con.execute("DELETE FROM locks WHERE key = ? AND holder = ?", [key, holder])
    return len(dead)


# ------------------------------------------------------------------------ process registry

# One recorder per (process, file): a registry of per-process resources, not a user-facing
# singleton. A forked child starts with an empty registry, so it never writes (twice) what
# its parent had queued, and never touches locks or threads copied in an unknown state.
_registry: dict[str, _Recorder] = {}
_registry_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _registry, _registry_lock, _exiting
    _registry = {}
    _registry_lock = threading.Lock()
    _exiting = threading.Event()
    # multiprocessing's forked children leave through os._exit(), skipping atexit; its own
    # exit hook still runs finalizers, so flush from there.
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        mp_util.Finalize(None, _flush_all_at_exit, exitpriority=100)


class _Exiting(Exception):
    pass


def _may_open() -> bool:
    return not _exiting.is_set() or threading.current_thread() is threading.main_thread()


def _park_if_exiting() -> None:
    if not _may_open():
        threading.Event().wait()  # forever: see _exiting


def _flush_all_at_exit() -> None:
    recorders = list(_registry.values())
    for rec in recorders:
        try:
            rec.flush(_EXIT_FLUSH_TIMEOUT, raise_errors=False)
        except Exception as exc:
            logger.warning("Metadata for %s not written at exit: %s", rec.db.path, exc)
        rec.stop(timeout=5.0)
    _exiting.set()
    for rec in recorders:  # sessions other threads began before the flag was set
        rec.db.drain(timeout=_EXIT_FLUSH_TIMEOUT)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_flush_all_at_exit)


# ---------------------------------------------------------------------------------- public

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
        with _registry_lock:
            if self._rec is not None and self._rec_pid == os.getpid():
                return self._rec  # another thread got here first
            rec = _registry.get(self.path)
            if rec is None:
                db = _Database(self.path, self.lock_timeout)
                rec = _registry[self.path] = _Recorder(db, self.stale_after)
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
            with _registry_lock:
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
        rows: dict[str, dict[str, Any]] = {}
        for item in entries:  # materialised before the lock: manifests may come from S3
            entry = item if isinstance(item, CacheEntry) else CacheEntry.from_manifest(item)
            rows[entry.key] = _entry_row(entry)

        def body(con: duckdb.DuckDBPyConnection) -> int:
            con.execute("DELETE FROM cache_entries")
            if rows:
                con.register("_entries", _arrow(_CACHE_ENTRIES, list(rows.values())))
                names = _names(_CACHE_ENTRIES)
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
        self, query: str, params: Sequence[Any] = (), fetch: Any = None, *, ours: bool = True
    ) -> Any:
        """Run ``query`` after this process's queued events are written. Our own queries
        (``ours``) run in the session that writes them, when there are any; user SQL always
        runs on a read-only connection."""
        rec = self._recorder()
        if ours and rec.pending() and threading.current_thread() is not rec._thread:
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
        with rec.db.locked(self.lock_timeout) as deadline:
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

    def latest_entry(self, task_identity: str) -> dict[str, Any] | None:
        """The newest cache entry of a task, with ``components`` as a dict (for explain()).

        Times are epoch seconds here.
        """
        rows = self._read(
            "SELECT * FROM cache_entries WHERE task_identity = ? ORDER BY created_at DESC LIMIT 1",
            [task_identity],
            _rows,
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
