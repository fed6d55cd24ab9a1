"""Where submitted runs execute.

``task.submit(...)`` and ``task.map(...)`` use the embedded worker — daemon threads in
this process, started on first use — unless a runner is active::

    fut = load.submit("a.csv")                 # embedded thread worker
    with ProcessRunner(max_workers=2):         # joblib / loky worker processes
        futs = crunch.map(chunks)
    with DaskRunner("tcp://scheduler:8786"):   # a Dask distributed cluster
        futs = crunch.map(chunks)

Layout: ``base.py`` (the submit path, dependencies), ``limits.py`` (concurrency limits),
``thread.py`` (the embedded worker), ``process.py`` and ``dask.py`` (other pools;
``dask_worker.py`` is what runs on a Dask worker),
``journal.py`` (durable submissions), ``resume.py`` (:func:`resume`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from notebook_flow.futures import FutureList, TaskFuture

from .base import (
    BaseRunner,
    Runner,
    current_runner,
    in_flight,
    map_with,
    submit_with,
)
from .limits import set_concurrency_limit
from .resume import Resumed, Unresumable, resume
from .thread import ThreadRunner, shutdown_default

if TYPE_CHECKING:
    from notebook_flow.tasks import Task

    from .dask import DaskRunner
    from .process import ProcessRunner

__all__ = [
    "BaseRunner",
    "DaskRunner",
    "ProcessRunner",
    "Resumed",
    "Runner",
    "ThreadRunner",
    "Unresumable",
    "map_task",
    "resume",
    "running",
    "set_concurrency_limit",
    "shutdown",
    "submit_task",
]

logger = logging.getLogger("notebook_flow")


def submit_task(
    task: Task[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    wait_for: Sequence[Any] | None = None,
) -> TaskFuture[Any]:
    """``task.submit(*args, **kwargs)``: one run on the current runner."""
    return submit_with(current_runner(), task, args, kwargs, wait_for)


def map_task(
    task: Task[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    wait_for: Sequence[Any] | None = None,
) -> FutureList:
    """``task.map(*iterables, **kwargs)``: one run per element, on the current runner."""
    return map_with(current_runner(), task, args, kwargs, wait_for)


def running() -> FutureList:
    """The futures of this process's runs that have not finished (pending or running).

    >>> notebook_flow.running()                            # doctest: +SKIP
    <FutureList of 3 runs of `load`: 1 pending, 2 running>
    """
    return FutureList(in_flight())


def shutdown(wait: bool = True, *, cancel_pending: bool = False) -> None:
    """Stop the embedded worker: wait for in-flight runs (``wait``), or cancel the ones
    not started (``cancel_pending``). The next ``submit`` starts a fresh worker.

    Events and the journal are flushed, so ``history()`` shows the final states; with
    ``wait``, so are the results still being committed in the background.
    """
    from notebook_flow.config import get_metadata, get_store
    from notebook_flow.storage import behind

    from .journal import flush

    stores = {id(f._call.store): f._call.store for f in in_flight() if f._call is not None}
    shutdown_default(wait, cancel_pending=cancel_pending)
    flush()
    if wait:
        behind.flush()
        default = get_store()
        stores.setdefault(id(default), default)
        for store in stores.values():
            try:
                get_metadata(store).flush(timeout=30)
            except Exception:  # a metadata problem never fails a shutdown
                logger.warning("could not flush the run events of %s", store.url, exc_info=True)


def __getattr__(name: str) -> Any:
    # The process and Dask runners import joblib / distributed only when asked for.
    if name == "ProcessRunner":
        from .process import ProcessRunner

        return ProcessRunner
    if name == "DaskRunner":
        from .dask import DaskRunner

        return DaskRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
