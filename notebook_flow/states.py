"""Run states, and how a run's durations read in the lines that report it."""

from __future__ import annotations

import enum

__all__ = ["FINAL_STATES", "RunState", "format_seconds"]


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


def format_seconds(value: float) -> str:
    """A duration as the notebook lines show it (``figures.format_duration``, the one
    formatter of every figure notebook_flow shows).

    >>> format_seconds(0.25), format_seconds(42), format_seconds(600)
    ('250 ms', '42.0 s', '10.0 min')
    """
    from .figures import format_duration

    return format_duration(value)
