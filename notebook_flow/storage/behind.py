"""Background commits: a large array result is copied once and made durable on a thread.

A task that returns a 100 MB array used to wait for the commit: writing 100 MB into the
page cache (~20 ms here), the fsync tail, the manifest. The copy alone takes ~9 ms, so the
call path (``tasks/call.py``) snapshots such a result and hands the commit to the one
committer thread of the process, together with whatever the commit must still do after it
(record the cache entry and the COMPLETED event, release the key's lock). The caller gets
its value back at once and may mutate it: the thread writes the private snapshot.

What stays as it was, and why it is safe:

* **The commit protocol** is unchanged (``ResultStore.commit``: payload, fsync, manifest);
  a crash before the manifest leaves nothing a reader loads, as before. What a crash can
  now lose is a result whose commit had not finished (tens of milliseconds): the next run
  computes it again.
* **Exactly-once**: a SERIALIZABLE key stays locked until its manifest is committed (the
  lock travels with the job), so no other kernel starts the same key in that window.
* **This process** never misses its own pending result: ``ResultStore.lookup``,
  ``commit``, ``delete``, ``clear`` and ``iter_manifests`` first wait for a pending commit
  of the key (or store) they touch; ``history()``, ``stats()``, ``cache_entries()`` and
  ``rebuild_index()`` wait for the store's pending commits.
* **Memory** is bounded: pending snapshots hold at most :data:`BUDGET_BYTES`; a result that
  would go over is committed in the foreground, as before (which also slows a producer down
  to the speed of the disk).
* **Exit**: ``atexit`` waits for pending commits (before the metadata recorder's own exit
  flush, which records their events). Worker processes (loky, Dask) commit in the
  foreground (``foreground``), because a pool may stop them as soon as they return.

A failed background commit (disk full, a lost lease) is logged as a warning and recorded
as a FAILED run; the value the caller already has is unaffected, and the next call with the
same key computes it again.
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("notebook_flow")

__all__ = [
    "BUDGET_BYTES",
    "MIN_BYTES",
    "flush",
    "foreground",
    "pending_count",
    "reserve",
    "wait_key",
]

#: Results smaller than this commit in the foreground: their write is short, the copy and
#: the thread hop would be most of the saving.
MIN_BYTES = 8 << 20


def _default_budget() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return int(min(1 << 30, physical // 8))


#: Bytes of snapshots that may wait for their commit at once (read at each reservation).
BUDGET_BYTES = _default_budget()

#: How long the exit hook waits for pending commits before it gives up on them (logged).
EXIT_TIMEOUT = 120.0

#: Set (to True) where a result must be durable before the call returns: worker processes.
foreground: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "notebook_flow_foreground_commits", default=False
)


@dataclass(eq=False)
class Job:
    """One pending commit. ``run`` is set by ``start``; ``done`` is set when it has finished
    (committed, failed or cancelled)."""

    url: str
    key: str
    nbytes: int
    run: Callable[[], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _Committer:
    """The process's committer thread and its pending jobs (a per-process resource)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._pending: dict[tuple[str, str], Job] = {}
        self._bytes = 0
        self._thread: threading.Thread | None = None

    def reserve(self, url: str, key: str, nbytes: int) -> Job | None:
        with self._cond:
            if (url, key) in self._pending or self._bytes + nbytes > BUDGET_BYTES:
                return None
            job = self._pending[(url, key)] = Job(url, key, nbytes)
            self._bytes += nbytes
            return job

    def start(self, job: Job, run: Callable[[], None]) -> None:
        job.run = run
        _register_exit_hook()
        with self._cond:
            self._queue.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="notebook_flow-committer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def finish(self, job: Job) -> None:
        """Forget ``job`` (done, failed or never started) and wake its waiters."""
        with self._cond:
            if self._pending.get((job.url, job.key)) is job:
                del self._pending[(job.url, job.key)]
                self._bytes -= job.nbytes
            job.run = None  # drop the snapshot now, not when the job object goes
            job.done.set()
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                job = self._queue.popleft()
            try:
                assert job.run is not None
                job.run()
            except BaseException:  # the job reports its own failures; this is a last resort
                logger.warning("a background commit of key %s failed", job.key, exc_info=True)
            finally:
                self.finish(job)

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def job_for(self, url: str, key: str) -> Job | None:
        return self._pending.get((url, key))

    def wait_all(self, url: str | None, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while any(url is None or u == url for u, _ in self._pending):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def count(self) -> int:
        return len(self._pending)


_committer = _Committer()


def reserve(url: str, key: str, nbytes: int) -> Job | None:
    """Room for a background commit of ``nbytes`` for ``key``, or None (commit in the
    foreground): over the budget, or a commit of that key is already pending. A reserved
    job must be passed to ``start`` or ``cancel``."""
    return _committer.reserve(url, key, nbytes)


def start(job: Job, run: Callable[[], None]) -> None:
    """Queue ``run`` (the commit and what follows it) for the committer thread."""
    _committer.start(job, run)


def cancel(job: Job) -> None:
    """Give a reservation back unused."""
    _committer.finish(job)


def wait_key(url: str, key: str, timeout: float | None = None) -> None:
    """Wait until no commit of ``key`` to ``url`` is pending in this process."""
    if not _committer._pending or _committer.on_thread():
        return
    job = _committer.job_for(url, key)
    if job is not None:
        job.done.wait(timeout)


def flush(url: str | None = None, timeout: float | None = None) -> bool:
    """Wait for pending background commits (of one store URL, or all); False on timeout."""
    if not _committer._pending or _committer.on_thread():
        return True
    return _committer.wait_all(url, timeout)


def pending_count() -> int:
    """How many background commits are pending in this process."""
    return _committer.count()


def _register_exit_hook() -> None:
    """(Re-)register the exit flush as the newest hook, so that it runs before the hooks
    its jobs still need (atexit is last-in, first-out): the metadata recorder's exit flush,
    the lock managers' connection pools."""
    import notebook_flow.metadata.registry  # noqa: F401  (registers its atexit hook first)

    atexit.unregister(_flush_at_exit)
    atexit.register(_flush_at_exit)


def _flush_at_exit() -> None:
    n = pending_count()
    if n and not flush(timeout=EXIT_TIMEOUT):
        logger.warning(
            "%d result(s) were still being committed after %.0f s at exit and are lost; "
            "their tasks will run again",
            pending_count(),
            EXIT_TIMEOUT,
        )


def _after_fork_in_child() -> None:
    # The thread and its jobs belong to the parent; a child starts with none.
    # (The exit hook, if registered, was inherited and flushes the child's own jobs.)
    global _committer
    _committer = _Committer()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
