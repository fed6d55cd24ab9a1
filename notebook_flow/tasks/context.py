"""What a running body sees: run ids, :class:`RunContext` and :func:`current_run`."""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .definition import Task

# Run ids: a random per-process prefix plus a counter. os.urandom per call cost ~10-50 µs
# on our VMs (getrandom syscall), a quarter of the whole cache-hit budget.
_run_prefix: tuple[int, str] = (0, "")
_run_counter = itertools.count()


def new_run_id() -> str:
    """A run id, unique across processes and hosts (64 random bits + a counter)."""
    global _run_prefix
    if not _run_prefix[1]:
        _run_prefix = (0, os.urandom(8).hex())
    return f"{_run_prefix[1]}{next(_run_counter):016x}"


def _reseed_run_ids() -> None:  # a forked child must not repeat its parent's ids
    global _run_prefix
    _run_prefix = (0, "")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_run_ids)


@dataclasses.dataclass
class RunContext:
    """What a running task body can see: ``notebook_flow.current_run()``; also the
    ``task_run`` that ``retry_condition_fn(task, task_run, state)`` receives.

    ``cancel_requested`` is set when the run is cancelled or timed out; long bodies may
    poll :meth:`cancelled` to stop early (cancellation of running threads is cooperative).
    """

    run_id: str
    task: Task[Any, Any]
    key: str | None
    attempt: int = 1
    # Made on first use: a threading.Event costs ~4 µs to create, on every run.
    _cancel: threading.Event | None = dataclasses.field(default=None, repr=False)

    @property
    def cancel_requested(self) -> threading.Event:
        """The cancel flag (a ``threading.Event``): set, wait on or poll it."""
        event = self._cancel
        if event is None:
            with _cancel_lock:  # one Event per run, whichever thread asks first
                event = self._cancel
                if event is None:
                    event = self._cancel = threading.Event()
        return event

    @property
    def id(self) -> str:
        """The run id (the name Prefect's ``TaskRun`` gives it)."""
        return self.run_id

    @property
    def run_count(self) -> int:
        """The attempt being run, from 1 (as Prefect's ``task_run.run_count``)."""
        return self.attempt

    @property
    def name(self) -> str:
        """``<task name>-<short run id>``, as Prefect names task runs."""
        return f"{self.task.name}-{self.run_id[:8]}"

    def cancelled(self) -> bool:
        event = self._cancel
        return event is not None and event.is_set()


_cancel_lock = threading.Lock()


_current_run: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "notebook_flow_run", default=None
)


def current_run() -> RunContext | None:
    """The run whose body is executing in this context, or None outside a task."""
    return _current_run.get()
