"""The recorder: one queue and daemon thread per (process, file) that writes batches.

``record_*`` calls append to the queue and return at once; the thread takes a batch only
once it holds the file lock (so waiting grows the batch), writes it in one transaction
(:mod:`notebook_flow.metadata.batch`), retries transient failures, writes heartbeats while
runs are in flight and checkpoints the WAL when idle.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from notebook_flow.errors import MetadataError
from notebook_flow.metadata import batch as _batch_mod
from notebook_flow.metadata import registry, spill
from notebook_flow.metadata.batch import _write_batch
from notebook_flow.metadata.database import _Database, _PermanentError
from notebook_flow.metadata.records import RunEvent, _Op
from notebook_flow.states import FINAL_STATES

if TYPE_CHECKING:
    import duckdb

logger = logging.getLogger("notebook_flow")

HEARTBEAT_INTERVAL = 60.0  # s between heartbeats while this process has runs in flight
# s the recorder waits after the first event, so bursts share a transaction. Each session
# (lock, open, write, close) costs ~50 ms of CPU in the recorder thread; a notebook run
# cell by cell (`notebook-flow run --cache-all`: two events a cell, most cells under a
# second) opened one per cell at 0.25 s, 1.2 s of CPU on a 20-cell notebook, a fifth of
# the kernel's own work. A flush, a read of this process's history and the exit do not
# wait for it; other processes (the dashboard) see the events up to a second later.
_LINGER = 1.0
_IDLE_CHECKPOINT = 1.0  # s without writes before the recorder checkpoints the WAL
_MAX_BATCH = 20_000  # operations per transaction
_MAX_PENDING = 200_000  # queued operations before producers wait for the recorder
_MAX_ATTEMPTS = 5  # transient failures of one batch before it is dropped and reported

_NOT_WRITTEN = object()  # _Recorder._write_once: the batch was not written


class _Recorder:
    """The queue and daemon thread that write one file's operations for this process."""

    def __init__(self, db: _Database, stale_after: float) -> None:
        # pandas (which DuckDB imports to read Arrow) imports concurrent.futures.thread, which
        # registers a threading exit hook, refused once the interpreter shuts down: a final
        # flush at exit would fail. Importing it now (stdlib, ~1 ms) makes that a no-op.
        import concurrent.futures.thread  # noqa: F401

        # DuckDB, pyarrow and pandas are imported by the recorder thread (``_Database.locked``),
        # not here: this runs in the first ``submit()`` of a process, whose caller must not
        # wait ~0.4-0.8 s for them (a web server's first request). An import in a
        # background thread runs slower while other threads run Python (it yields the GIL
        # at each file read), which only delays the first events' write. Code that asks
        # whether a library is loaded meanwhile uses ``_imports.loaded`` (never
        # ``sys.modules.get``), which waits for such an import to finish.

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
        self._cap: int | None = None  # smaller batches while a bad record is isolated
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
        if registry._exiting.is_set():
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

    def spill_queue(self) -> str | None:
        """At exit, when the index stayed locked: keep the queued events in a spill file
        (see :mod:`~notebook_flow.metadata.spill`); returns its path."""
        with self._cond:
            ops = [self._queue.popleft() for _ in range(len(self._queue))]
            if not ops:
                return None
            try:
                path = spill.write(self.db.path, ops)
            except Exception as exc:
                self._queue.extendleft(reversed(ops))
                logger.error("Cannot keep the unwritten run history of %s: %s", self.db.path, exc)
                return None
            self._done += len(ops)
            self._cond.notify_all()
        return path

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
        in_body = False  # the failure came from writing the records, not from the file
        began = time.perf_counter()
        try:
            with self.db.locked() as deadline:
                locked = time.perf_counter()
                with self._cond:  # take the batch only now: waiting for the lock grows it
                    size = min(len(self._queue), self._cap or _MAX_BATCH)
                    batch = [self._queue.popleft() for _ in range(size)]
                    self._writing = len(batch)
                    dedupe = self._dedupe
                # What processes that exited while the index was held could not write.
                spilled_files, spilled = spill.take(self.db.path)

                def body(con: duckdb.DuckDBPyConnection) -> None:
                    nonlocal in_body
                    if spilled:
                        _write_batch(con, self, spilled, True)
                    in_body = True
                    _write_batch(con, self, batch, dedupe)
                    in_body = False

                try:
                    self.db.write(deadline, body, after_commit)
                    spill.remove(spilled_files)
                except BaseException:
                    with self._cond:
                        self._queue.extendleft(reversed(batch))
                        self._writing = 0
                    raise
        except Exception as exc:
            if in_body and batch and _data_error(exc):
                self._isolate(exc, batch)
            else:
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
            self._cap = None
            self.batches += 1
            self.lock_wait += locked - began
            self.lock_held += end - locked
            self._last_beat = time.time()
            self._cond.notify_all()
        return None

    def _isolate(self, exc: Exception, batch: list[_Op]) -> None:
        """A record of the batch cannot be stored: write the batch in halves until the bad
        record is alone, then drop only it (one bad event never costs another)."""
        with self._cond:
            self._dedupe = True  # (the transaction rolled back; harmless either way)
            if len(batch) > 1:
                self._cap = max(1, len(batch) // 2)  # the batch went back to the queue
                logger.debug("Isolating a metadata record that fails: %s", exc)
                return
            self._queue.popleft()
            self._failures.append((self._done + 1, self._done + 1, exc))
            self._done += 1
            self._cap = None
            self._cond.notify_all()
        _batch_mod.drop_one(batch[0], exc, self.db.path)

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


def _data_error(exc: BaseException) -> bool:
    """True when writing failed because of a record's content (a conversion, a type, a
    constraint), which retrying the same batch cannot cure, rather than the file or lock."""
    cause = exc.__cause__ if isinstance(exc, MetadataError) else exc
    if isinstance(cause, (TypeError, ValueError, UnicodeError, OverflowError)):
        return True  # Python or pyarrow (ArrowInvalid is a ValueError) refused a value
    name = type(cause).__name__
    return name in _DUCKDB_DATA_ERRORS


_DUCKDB_DATA_ERRORS = frozenset(
    {
        "ConversionException",
        "ConstraintException",
        "InvalidInputException",
        "TypeMismatchException",
        "OutOfRangeException",
    }
)
