"""Run states and the records that describe a run's transitions."""

from __future__ import annotations

import enum

__all__ = ["FINAL_STATES", "RunState"]


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
