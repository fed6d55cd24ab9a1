"""Worker processes through joblib's loky: for CPU-bound pure-Python tasks the GIL would
serialize on the thread worker.

>>> from notebook_flow.runners import ProcessRunner
>>> with ProcessRunner(max_workers=2):                     # doctest: +SKIP
...     futs = crunch.map(chunks)

Each run goes through the full call path *in the worker process* (key → lookup → run →
commit → record), against the same store: the store's URL, options and signing key travel
with the run. The submitting process records PENDING and journals the submission; the
worker records the rest and flushes its events before it returns. Upstream futures are
resolved here, so their values travel to the worker pickled (cloudpickle, by value for
functions and classes defined in a notebook).

Limits: a task's prints go to the worker's stdout (the terminal that started Jupyter),
not to the cell; cancelling a run that reached the pool only sets its flag here.
"""

from __future__ import annotations

import os
from typing import Any

from notebook_flow.futures import TaskFuture

from .base import BaseRunner, send_remote

__all__ = ["ProcessRunner"]


class ProcessRunner(BaseRunner):
    """Runs tasks in a reusable loky process pool (``max_workers`` defaults to the CPUs)."""

    def __init__(self, max_workers: int | None = None, *, idle_timeout: float = 300.0) -> None:
        self.max_workers = max_workers or os.cpu_count() or 1
        self.idle_timeout = idle_timeout

    def __repr__(self) -> str:
        return f"<ProcessRunner max_workers={self.max_workers}>"

    def _executor(self) -> Any:
        from joblib.externals.loky import get_reusable_executor

        return get_reusable_executor(max_workers=self.max_workers, timeout=self.idle_timeout)

    def _send(self, fut: TaskFuture[Any]) -> None:
        send_remote(fut, lambda fn, *args: self._executor().submit(fn, *args))

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        """Wait for this runner's runs; the loky pool itself is shared and reused."""
        super().shutdown(wait, cancel_pending=cancel_pending)
