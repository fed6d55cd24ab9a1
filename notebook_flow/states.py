"""Run states, and how a run's durations read in the lines that report it."""

from __future__ import annotations

import enum

__all__ = ["FINAL_STATES", "MIN_SAVING", "RunState", "format_seconds"]


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


def format_seconds(value: float) -> str:
    """A duration as the notebook lines show it.

    >>> format_seconds(0.25), format_seconds(42), format_seconds(600)
    ('250 ms', '42.0 s', '10.0 min')
    """
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"
