"""The embedded worker: daemon threads in this process run submitted tasks.

"Run a worker directly inside your process, no extra infrastructure": the first
``task.submit`` starts it, in a notebook, a script or a web server alike.

Design, for throughput (tens of thousands of no-op runs a second):

* one ``queue.SimpleQueue`` (C, lock-free put) of ready futures; a submit does one
  ``put`` and — until the pool is full — starts one more thread, nothing else;
* a future enters the queue only when it is *ready* (its upstream runs finished and a
  concurrency slot is free), so workers never block on dependencies or limits;
* a worker runs the call path and completes the future in the same thread: one
  handoff per run (submitter → worker), none back;
* a worker that waits on a run nobody has started yet runs it inline (no starvation
  when tasks submit and wait on tasks).

Threads are daemons: a kernel restart does not wait for them, and runs they leave
unfinished are marked CRASHED on the next start (and can be resumed, see ``journal.py``).
A kernel interrupt raises only in the main thread, so the worker keeps going.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

from notebook_flow.futures import TaskFuture

from .base import BaseRunner, execute
from .limits import limits_for

__all__ = ["ThreadRunner", "default_runner", "shutdown_default"]

logger = logging.getLogger("notebook_flow")

_local = threading.local()  # .runner: the ThreadRunner whose worker this thread is


class ThreadRunner(BaseRunner):
    """A pool of daemon worker threads; ``max_workers`` defaults to ``settings().workers``.

    >>> with ThreadRunner(max_workers=2):                   # doctest: +SKIP
    ...     futs = fetch.map(urls)
    """

    def __init__(self, max_workers: int | None = None) -> None:
        if max_workers is None:
            from notebook_flow.config import settings

            max_workers = settings().workers
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        self.max_workers = max_workers
        self._queue: queue.SimpleQueue[TaskFuture[Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._full = False
        self._spawn_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ThreadRunner {len(self._threads)}/{self.max_workers} threads>"

    def _send(self, fut: TaskFuture[Any]) -> None:
        self._queue.put(fut)
        if not self._full:
            self._spawn()

    def _spawn(self) -> None:
        with self._spawn_lock:
            if len(self._threads) >= self.max_workers or self._closed:
                self._full = True
                return
            t = threading.Thread(
                target=self._work,
                name=f"notebook_flow-worker-{len(self._threads)}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)
            self._full = len(self._threads) >= self.max_workers

    def _work(self) -> None:
        _local.runner = self
        get = self._queue.get
        while True:
            fut = get()
            if fut is None:
                return
            if fut._claim():
                try:
                    execute(fut)
                except Exception:  # execute() never raises; this would be our bug
                    logger.exception("notebook_flow worker: unexpected error running %r", fut)
            del fut

    def _try_inline(self, fut: TaskFuture[Any]) -> bool:
        if getattr(_local, "runner", None) is not self:
            return False
        if fut._remaining or limits_for(fut.task) or not fut._claim():
            return False
        execute(fut)
        return True

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        """Stop the workers once the queued runs are done (``wait``), or at once.

        ``cancel_pending=True`` cancels the runs that have not started.
        """
        super().shutdown(wait, cancel_pending=cancel_pending)
        with self._spawn_lock:
            threads, self._threads = self._threads, []
            self._full = True
        for _ in threads:
            self._queue.put(None)
        if wait:
            me = threading.current_thread()
            for t in threads:
                if t is not me:
                    t.join()


_default: ThreadRunner | None = None
_default_lock = threading.Lock()


def default_runner() -> ThreadRunner:
    """The process-wide embedded worker, started on first use."""
    global _default
    runner = _default
    if runner is None:
        with _default_lock:
            runner = _default
            if runner is None:
                runner = _default = ThreadRunner()
    return runner


def shutdown_default(wait: bool = True, *, cancel_pending: bool = False) -> None:
    """Shut the embedded worker down; the next ``submit`` starts a fresh one."""
    global _default
    with _default_lock:
        runner, _default = _default, None
    if runner is not None:
        runner.shutdown(wait, cancel_pending=cancel_pending)


def _after_fork_in_child() -> None:
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
