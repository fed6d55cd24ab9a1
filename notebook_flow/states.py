"""Run states, and how a run's durations read in the lines that report it."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["FINAL_STATES", "MIN_SAVING", "Deferred", "RunState", "State", "format_seconds"]

R = TypeVar("R")


class RunState(str, enum.Enum):
    """The state of one run of a task.

    >>> RunState.CACHED.is_final
    True
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    COMPLETED = "COMPLETED"
    CACHED = "CACHED"
    FAILED = "FAILED"
    CRASHED = "CRASHED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset(
    {RunState.COMPLETED, RunState.CACHED, RunState.FAILED, RunState.CRASHED, RunState.CANCELLED}
)


#: Seconds saved below which a hit's saving is not mentioned (badges, run summaries): a
#: trivial cell "saved 0 ms" is noise, not news.
MIN_SAVING = 0.05

_NAMES = {
    "PENDING": "Pending",
    "RUNNING": "Running",
    "RETRYING": "Retrying",
    "COMPLETED": "Completed",
    "CACHED": "Cached",
    "FAILED": "Failed",
    "CRASHED": "Crashed",
    "CANCELLED": "Cancelled",
}


class State(Generic[R]):
    """A run's state with its outcome, as Prefect 3's ``State`` reads: what
    ``fut.state`` returns and what ``retry_condition_fn(task, task_run, state)`` receives.

    >>> state = State(RunState.FAILED, exception=ValueError("bad row"))
    >>> state.is_failed(), state.name
    (True, 'Failed')
    >>> state.result(raise_on_failure=False)
    ValueError('bad row')

    ``type`` is the :class:`RunState` (``CACHED`` is a completed state, as Prefect's
    ``Cached`` is of type ``COMPLETED``); ``result()`` returns the value, or raises the
    run's exception (``raise_on_failure=False``: returns it instead).
    """

    __slots__ = ("_exception", "_value", "message", "type")

    def __init__(
        self,
        type: RunState,
        value: Any = None,
        exception: BaseException | None = None,
        message: str | None = None,
    ) -> None:
        self.type = type
        self._value = value
        self._exception = exception
        if message is None and exception is not None:
            message = f"{_builtin_type(exception).__name__}: {exception}"
        self.message = message

    @property
    def name(self) -> str:
        """``"Completed"``, ``"Cached"``, ``"Failed"``, … (Prefect's state names)."""
        return _NAMES[self.type.value]

    def is_pending(self) -> bool:
        return self.type is RunState.PENDING

    def is_running(self) -> bool:
        return self.type is RunState.RUNNING or self.type is RunState.RETRYING

    def is_completed(self) -> bool:
        return self.type is RunState.COMPLETED or self.type is RunState.CACHED

    def is_failed(self) -> bool:
        return self.type is RunState.FAILED

    def is_crashed(self) -> bool:
        return self.type is RunState.CRASHED

    def is_cancelled(self) -> bool:
        return self.type is RunState.CANCELLED

    def is_final(self) -> bool:
        return self.type in FINAL_STATES

    def result(self, raise_on_failure: bool = True) -> R:
        """The run's return value; its exception is raised (or, with
        ``raise_on_failure=False``, returned). A run not final yet raises ``RuntimeError``.
        """
        exc = self._exception
        if exc is not None:
            if raise_on_failure:
                raise exc
            return exc  # type: ignore[return-value]
        if not self.is_final():
            raise RuntimeError(f"the run is {self.name.lower()}: it has no result yet")
        value = self._value
        if _builtin_type(value) is Deferred:
            value = value.get()
        return value  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        detail = f"message={self.message!r}, " if self.message else ""
        return f"{self.name}({detail}type={self.type.value})"


_builtin_type = type  # (``State.__init__`` takes a parameter named ``type``, as Prefect)


class Deferred:
    """A result that stays where it is — a remote run's result in the store — until the
    first ``result()`` asks for it (then loaded once, memory-mapped where the format
    allows; a load that fails raises from ``result()``). Set by the Dask runner as a
    future's value; ``TaskFuture.result()`` and ``State.result()`` resolve it."""

    __slots__ = ("_load", "_loaded", "_lock")

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._loaded: tuple[Any] | None = None

    def get(self) -> Any:
        with self._lock:  # one load, whichever thread asks first
            if self._loaded is None:
                self._loaded = (self._load(),)
            return self._loaded[0]


def format_seconds(value: float) -> str:
    """A duration as the notebook lines show it (``figures.format_duration``, the one
    formatter of every figure notebook_flow shows).

    >>> format_seconds(0.25), format_seconds(42), format_seconds(600)
    ('250 ms', '42.0 s', '10.0 min')
    """
    from .figures import format_duration

    return format_duration(value)
