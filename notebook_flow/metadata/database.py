"""Short, serialized sessions with one DuckDB file: lock, connect, migrate, write, read.

DuckDB lets only one process open a file at a time, so every session holds this process's
mutex and the cross-process file lock ``<path>.lock``, and the file is open only for the
session. DuckDB errors are converted to :class:`~notebook_flow.errors.MetadataError` here;
``_PermanentError`` marks those that retrying the same batch will not cure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from notebook_flow.errors import MetadataError
from notebook_flow.metadata.registry import _Exiting, _may_open, _park_if_exiting
from notebook_flow.metadata.schema import _MIGRATIONS, _values

if TYPE_CHECKING:
    import duckdb
    import filelock

logger = logging.getLogger("notebook_flow")

_WAL_KEEP = 256 * 1024  # bytes of WAL a write session may leave (each open replays it)
_POLL = 0.01  # s between attempts at the file lock

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
        self._in_session = False  # a thread holds the file lock (see drain())
        # Writes leave their changes in the WAL (closing skips the checkpoint, which cost
        # each ~20-50 ms); the recorder checkpoints once the process has been idle a while.
        self.dirty = False

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[float]:
        """Hold the in-process and cross-process locks; yields the deadline (monotonic)."""
        # Import before locking: a first import of duckdb takes long enough that every other
        # process would wait for it. Writes need nothing more (see schema._lit); readers
        # import what their results need first (store._read).
        import duckdb  # noqa: F401
        import filelock

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
                # Flag first, then look (drain() sets the exit flag, then looks at this one).
                self._in_session = True
                if not _may_open():  # the exit hook ran while we waited for the lock
                    raise _Exiting
                yield deadline
            finally:
                self._in_session = False
                file_lock.release()
        except _Exiting:
            pass
        finally:
            self._mutex.release()
        _park_if_exiting()

    def drain(self, timeout: float) -> None:
        """Wait for a session in flight (in any thread) to end. A thread still waiting for
        the file lock is not waited for: once the exit flag is set, it opens nothing."""
        deadline = time.monotonic() + timeout
        while self._in_session and time.monotonic() < deadline:
            time.sleep(0.005)

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
                row = _values((version, time.time()))  # no parameters: see schema._lit
                con.execute(f"INSERT INTO schema_version (version, applied) VALUES ({row})")
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
