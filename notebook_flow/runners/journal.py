"""Durable submissions: a per-process journal of what was submitted (read by ``resume.py``).

Every ``submit`` is recorded twice, both off the caller's path:

* a PENDING run event, through the metadata recorder's queue (DuckDB, batched) — so a
  dead process's pending and running runs show as CRASHED on the next start;
* a journal entry — the task (cloudpickled once per task object) and the call's
  arguments — appended by one writer thread to
  ``journal/<host>_<pid>_<start>_<session>.journal`` in the store's local folder (inside a
  local store; for a remote store, its folder in this user's cache: see
  ``ResultStore.local_dir``), so :func:`~notebook_flow.runners.resume` can re-submit the
  runs a dead session left unfinished without re-running its cells. A finished run
  (completed, cached, failed or cancelled) is marked done in the journal; a clean exit
  with nothing in flight removes the file.

What "durable" means, honestly: ``submit()`` returns before anything touches the disk
(that is how it stays in the tens of microseconds). The writer thread appends each burst
of submissions within a few milliseconds, as one ``write`` (then ``fdatasync``): from
then on the submission survives the death of the process (SIGKILL, OOM, kernel restart);
after the ``fdatasync`` it survives a power loss too. A process killed inside that
window loses the last few milliseconds of submissions; re-running the cell recovers
them, since runs whose results were committed are cache hits. Results themselves are
durable when their manifest is committed (``storage/``), independently of the journal.

Which runs cannot be resumed, and why (``resume()`` lists them in ``.skipped``):

* arguments that cannot be pickled (open files, locks, sockets, generators, …);
* arguments larger than :data:`MAX_JOURNALED_BYTES` when pickled (pass big data through
  an upstream task instead: a future is journaled as a reference, and resuming re-runs
  the upstream — a cache hit when its result was committed);
* tasks that cannot be pickled or unpickled in the new process (a module that no longer
  imports, a class that changed);
* runs that depend on one of the above;
* runs submitted from a process on another host (liveness of its pid is unknown here).

If the journal cannot be written (a full disk, permissions), a warning says so once and
journaling of that store stops in this process: runs still run, but are not resumable
after a crash.

Resumed runs get new run ids (the old ones stay CRASHED in the history, unless a Dask
worker finished them and its spooled events say so) and run on the *current* runner —
the innermost ``with runner:`` around ``resume()`` (a ``DaskRunner`` sends them to its
cluster), else the embedded thread worker — not on the runner that first took them. An
upstream run that a resumed run needs is re-submitted with it (a cache hit when its
result was committed).
Code from notebook cells is replayed with its source (the journal keeps the cells'
``linecache`` entries), so a resumed run computes the same cache key as the cell would.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import linecache
import logging
import os
import pickle
import re
import struct
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from notebook_flow import _identity
from notebook_flow.futures import TaskFuture

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore
    from notebook_flow.tasks import Task

__all__ = [
    "MAX_JOURNALED_BYTES",
    "Journal",
    "flush",
    "journal_for",
]

logger = logging.getLogger("notebook_flow")

#: Pickled arguments of one submission above this size are not journaled (the run is
#: then not resumable; see the module docstring).
MAX_JOURNALED_BYTES = 8 << 20

_MAGIC = b"NOTEBOOK_FLOW_JOURNAL 1\n"
_FRAME = struct.Struct(">cI")  # kind, payload length
_HEADER, _TASK, _LINES, _SUBMIT, _DONE, _UNRESUMABLE = b"H", b"T", b"L", b"S", b"D", b"U"
_COMPACT_AT = 4 << 20  # rewrite the journal when it outgrows its live content this much
_SUFFIX = ".journal"


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(kind, len(payload)) + payload


class _TooLarge(Exception):
    pass


class _CappedBuffer(io.BytesIO):
    """Stops pickling as soon as the output passes the cap (bounded cost for big args)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def write(self, b: Any) -> int:
        n = super().write(b)
        if self.tell() > self.cap:
            raise _TooLarge
        return n


_pickler: type[pickle.Pickler] | None = None


def _pickler_class() -> type[pickle.Pickler]:
    """cloudpickle's Pickler, with two changes for the journal:

    * futures among the arguments are journaled as references to their runs;
    * code objects keep their file name. cloudpickle replaces it with
      ``<dynamic-code>``, which would hide the source of functions defined in notebook
      cells from ``TASK_SOURCE`` in the resuming process (the journal carries those
      cells' ``linecache`` entries), so a resumed run would compute another key than
      the cell does.
    """
    global _pickler
    if _pickler is not None:
        return _pickler
    import types
    from collections import ChainMap

    import cloudpickle

    base_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)

    def code_reduce(code: types.CodeType) -> Any:
        assert base_reduce is not None
        rebuild, args = base_reduce(code)
        return rebuild, tuple(
            code.co_filename if type(a) is str and a == "<dynamic-code>" else a for a in args
        )

    class JournalPickler(cloudpickle.Pickler):  # type: ignore[misc]
        if base_reduce is not None:
            dispatch_table = ChainMap(
                {types.CodeType: code_reduce}, cloudpickle.Pickler.dispatch_table
            )

        def persistent_id(self, obj: Any) -> Any:
            if type(obj) is TaskFuture:
                return ("run", obj.run_id)
            return None

    _pickler = JournalPickler
    return JournalPickler


def _dumps_capped(obj: object, cap: int) -> bytes:
    buf = _CappedBuffer(cap)
    _pickler_class()(buf, protocol=5).dump(obj)
    return buf.getvalue()


@dataclasses.dataclass
class _Batch:
    frame: bytes
    live: set[str]


# --------------------------------------------------------------------------- writing


class Journal:
    """The journal of this process for one store. ``add`` and ``done`` are O(1) appends
    from any thread; the writer thread serializes and writes."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.path: str | None = None  # known once the writer opened it
        self._items: deque[Any] = deque()
        self._fd: int | None = None
        self._failed = False
        self._tasks: weakref.WeakKeyDictionary[Task[..., Any], int] = weakref.WeakKeyDictionary()
        self._task_error: dict[int, str | None] = {}  # why a task could not be pickled
        self._static: list[bytes] = []  # header, task and lines frames (kept for compaction)
        self._lines_seen: set[str] = set()
        self._batches: dict[int, _Batch] = {}
        self._run_batch: dict[str, _Batch] = {}
        self._unresumable: dict[str, bytes] = {}
        self._size = 0
        self._live_bytes = 0

    def add(
        self,
        run_id: str,
        task: Task[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        wait_for: list[Any] | None,
        *,
        cell: str | None = None,
    ) -> None:
        self._items.append((run_id, task, args, kwargs, wait_for, time.time(), cell))
        _writer.poke()

    def done(self, run_id: str) -> None:
        self._items.append(run_id)
        _writer.poke()

    @property
    def live(self) -> int:
        """Submissions not known to be finished (including those not yet written)."""
        return (
            len(self._run_batch)
            + len(self._unresumable)
            + sum(1 for item in list(self._items) if type(item) is tuple)
        )

    # -- writer thread only -----------------------------------------------------------

    def _drain(self) -> None:
        items = []
        pop = self._items.popleft
        try:
            while True:
                items.append(pop())
        except IndexError:
            pass
        if not items:
            return
        subs = [it for it in items if type(it) is tuple]
        done = [it for it in items if type(it) is str]
        out: list[bytes] = []
        if subs:
            self._encode_submissions(subs, out)
        if done:
            out.append(_frame(_DONE, b"".join(bytes.fromhex(r) for r in done)))
            for run_id in done:
                self._finished(run_id)
        self._write(b"".join(out))

    def _finished(self, run_id: str) -> None:
        batch = self._run_batch.pop(run_id, None)
        if batch is not None:
            batch.live.discard(run_id)
            if not batch.live:
                self._batches.pop(id(batch), None)
                self._live_bytes -= len(batch.frame)
        else:
            self._unresumable.pop(run_id, None)

    def _encode_submissions(self, subs: list[tuple[Any, ...]], out: list[bytes]) -> None:
        self._encode_lines(out)
        records = []
        for run_id, task, args, kwargs, wait_for, at, cell in subs:
            index = self._task_index(task, out)
            error = self._task_error[index]
            if error is not None:
                reason = f"the task cannot be pickled ({error}; check the globals it uses)"
                self._skip(run_id, task.name, reason, out)
                continue
            records.append((run_id, index, task.name, args, kwargs, wait_for, at, cell))
        if not records:
            return
        try:
            blob = _dumps_capped([r[3:] for r in records], MAX_JOURNALED_BYTES)
            self._add_batch(records, blob, out)
            return
        except Exception:
            pass  # find the culprit(s): journal one by one
        for record in records:
            try:
                blob = _dumps_capped([record[3:]], MAX_JOURNALED_BYTES)
            except _TooLarge:
                self._skip(
                    record[0],
                    record[2],
                    f"its arguments pickle to more than {MAX_JOURNALED_BYTES >> 20} MiB (pass "
                    "large data through an upstream task; futures are journaled as references)",
                    out,
                )
            except Exception as exc:
                self._skip(
                    record[0],
                    record[2],
                    f"its arguments cannot be pickled ({type(exc).__name__}: {exc})",
                    out,
                )
            else:
                self._add_batch([record], blob, out)

    def _add_batch(self, records: list[tuple[Any, ...]], blob: bytes, out: list[bytes]) -> None:
        meta = [(r[0], r[1], r[2]) for r in records]  # run id, task index, task name
        frame = _frame(_SUBMIT, pickle.dumps((meta, blob), protocol=5))
        batch = _Batch(frame, {r[0] for r in records})
        self._batches[id(batch)] = batch
        for r in records:
            self._run_batch[r[0]] = batch
        self._live_bytes += len(frame)
        out.append(frame)

    def _skip(self, run_id: str, task_name: str, reason: str, out: list[bytes]) -> None:
        logger.info(
            "run %s of task `%s` cannot be resumed later: %s", run_id[:8], task_name, reason
        )
        frame = _frame(_UNRESUMABLE, pickle.dumps((run_id, task_name, reason)))
        self._unresumable[run_id] = frame
        out.append(frame)

    def _task_index(self, task: Task[..., Any], out: list[bytes]) -> int:
        index = self._tasks.get(task)
        if index is not None:
            return index
        index = len(self._task_error)
        try:
            blob: bytes | None = _dumps_capped(task, 1 << 30)
            error = None
        except Exception as exc:
            blob, error = None, f"{type(exc).__name__}: {exc}"
            logger.info("task `%s` cannot be journaled: %s", task.name, error)
        self._tasks[task] = index
        self._task_error[index] = error
        frame = _frame(
            _TASK, pickle.dumps((index, task.name, task.identity, blob, error), protocol=5)
        )
        self._static.append(frame)
        out.append(frame)
        return index

    def _encode_lines(self, out: list[bytes]) -> None:
        # Source of notebook cells (linecache entries without a file): kept so a resumed
        # task hashes the same source, hence computes the same key, as the cell would.
        fresh = {}
        for name, entry in list(linecache.cache.items()):
            if name in self._lines_seen or len(entry) != 4 or entry[1] is not None:
                continue
            self._lines_seen.add(name)
            fresh[name] = entry
        if fresh:
            frame = _frame(_LINES, pickle.dumps(fresh, protocol=5))
            self._static.append(frame)
            out.append(frame)

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        if self.path is None:
            p = _identity.process()
            folder = self.store.local_dir("journal")
            host = re.sub(r"[^A-Za-z0-9.-]", "-", p.host)
            name = f"{host}_{p.pid}_{p.start_time or 0}_{p.session}{_SUFFIX}"
            self.path = os.path.join(folder, name)
            header = {
                "host": p.host,
                "pid": p.pid,
                "start_time": p.start_time,
                "kernel": p.kernel,
                "notebook": _identity.notebook_path(),
                "created": time.time(),
            }
            self._static.insert(0, _frame(_HEADER, pickle.dumps(header)))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if os.fstat(fd).st_size == 0:  # new (or removed meanwhile): header and task frames
            start = b"".join([_MAGIC, *self._static])
            os.write(fd, start)
            self._size = len(start)
        self._fd = fd
        return fd

    def _write(self, data: bytes) -> None:
        if not data or self._failed:
            return
        try:
            fd = self._open()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
            self._size += len(data)
            if self._size > max(_COMPACT_AT, 4 * self._live_bytes):
                self._compact()
            if not self._run_batch and not self._unresumable:
                self._close(remove=False)  # idle: no descriptor held between bursts
        except OSError as exc:
            self._failed = True
            logger.warning(
                "could not write the submission journal %s (%s); runs submitted from now on "
                "cannot be resumed after a crash, but run normally",
                self.path,
                exc,
            )

    def _compact(self) -> None:
        """Rewrite the journal with only what is still live (atomic rename)."""
        assert self.path is not None
        parts = [_MAGIC, *self._static]
        for batch in self._batches.values():
            parts.append(batch.frame)
            meta, _ = pickle.loads(batch.frame[_FRAME.size :])
            finished = [run_id for run_id, _, _ in meta if run_id not in batch.live]
            if finished:
                parts.append(_frame(_DONE, b"".join(bytes.fromhex(r) for r in finished)))
        parts.extend(self._unresumable.values())
        data = b"".join(parts)
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._close(remove=False)
        self._size = len(data)

    def _close(self, remove: bool) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove and self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class _Writer:
    """One thread per process writes every journal, in bursts."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._signalled = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one drain at a time (thread, flush(), exit)

    def poke(self) -> None:
        # Only the first item of a burst signals; the thread resets the flag before it
        # drains, so an item appended later always triggers another drain.
        if not self._signalled:
            self._signalled = True
            if self._thread is None:
                self._start()
            self._event.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                t = threading.Thread(target=self._loop, name="notebook_flow-journal", daemon=True)
                t.start()
                self._thread = t

    def _loop(self) -> None:
        while True:
            self._event.wait()
            self._event.clear()
            time.sleep(0.002)  # let a burst of submissions gather into one write
            self._signalled = False
            self.drain()

    def drain(self) -> None:
        with self._lock:
            for journal in list(_journals.values()):
                try:
                    journal._drain()
                except Exception:
                    logger.warning("notebook_flow journal: unexpected error", exc_info=True)


_writer = _Writer()
_journals: dict[str, Journal] = {}
_journals_lock = threading.Lock()


def journal_for(store: ResultStore) -> Journal:
    """This process's journal for ``store`` (created on first use, opened by the writer)."""
    journal = _journals.get(store.url)
    if journal is None:
        with _journals_lock:
            journal = _journals.get(store.url)
            if journal is None:
                journal = _journals[store.url] = Journal(store)
    return journal


def flush() -> None:
    """Write every journal entry queued so far (the writer thread does it within ms)."""
    _writer.drain()


def _at_exit() -> None:
    # A clean exit with nothing in flight leaves no journal behind; runs still in
    # flight (daemon worker threads die with the process) stay resumable.
    _writer.drain()
    with _writer._lock:
        for journal in _journals.values():
            journal._close(remove=journal.live == 0)


atexit.register(_at_exit)


def _after_fork_in_child() -> None:
    global _writer, _journals_lock
    _writer = _Writer()
    _journals.clear()
    _journals_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
