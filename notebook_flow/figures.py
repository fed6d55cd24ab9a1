"""The figures notebook_flow reports, defined and formatted once.

Every place that shows a duration — the cached-cell badge, a future's status line, the
``.map`` progress bar, ``%flow status`` / ``%flow stats``, ``notebook-flow stats`` and the
dashboard — formats it with :func:`format_duration` and computes these figures here:

* **computed in** — how long the run that produced a stored result took (its manifest's
  ``duration``); the same number on every hit of that result.
* **time saved** by a cache hit — *computed in* minus what the hit itself took (load and
  replay), never below zero: :func:`time_saved`. A task's or store's time saved is the sum
  over its hits; one that never hit shows a dash (:data:`DASH`), not "0 ms".

>>> format_duration(0.25), format_duration(42), format_duration(600), format_duration(None)
('250 ms', '42.0 s', '10.0 min', '—')
>>> format_saved(0.0, hits=0), format_saved(1.5, hits=3)
('—', '1.5 s')
"""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = [
    "DASH",
    "STATE_COLORS",
    "cached_summary",
    "format_duration",
    "format_saved",
    "format_when",
    "time_saved",
]

#: What a figure that does not apply shows (a task that never hit has no time saved).
DASH = "—"


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def format_duration(seconds: Any) -> str:
    """A duration for people: ``<1 ms``, ``850 ms``, ``12.3 s``, ``4.5 min``, ``2.1 h``,
    ``3.0 d``; a dash when there is none."""
    if _missing(seconds):
        return DASH
    s = max(float(seconds), 0.0)
    if s < 0.0005:
        return "<1 ms" if s > 0 else "0 ms"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def time_saved(computed_in: float, hit_took: float) -> float:
    """Seconds a cache hit saved: the producing run's duration minus the hit's own time."""
    return max(float(computed_in) - float(hit_took), 0.0)


def format_saved(seconds: Any, hits: int | None = None) -> str:
    """Time saved for display: a dash when nothing hit (``hits == 0``) or nothing is known."""
    if hits is not None and not _missing(hits) and int(hits) == 0:
        return DASH
    return format_duration(seconds)


def format_when(epoch: float, now: float | None = None) -> str:
    """``today 14:03:07`` for today, else ``2026-12-01 09:15``."""
    now = time.time() if now is None else now
    day = time.strftime("%Y-%m-%d", time.localtime(epoch))
    if day == time.strftime("%Y-%m-%d", time.localtime(now)):
        return "today " + time.strftime("%H:%M:%S", time.localtime(epoch))
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def cached_summary(created_at: float, computed_in: float, saved: float | None = None) -> str:
    """``computed today 14:03:07 in 840 ms · saved 732 ms``: the words of a hit, everywhere.

    >>> cached_summary(0.0, 0.84, 0.732).split(" in ")[1]
    '840 ms · saved 732 ms'
    """
    text = f"computed {format_when(created_at)} in {format_duration(computed_in)}"
    if saved is not None:
        text += f" · saved {format_duration(saved)}"
    return text


#: One colour per run state, the same in the dashboard, its charts and the notebook's
#: live lines: cached green, computed blue, failed red, in flight amber, waiting grey.
STATE_COLORS = {
    "CACHED": "#2e9d4b",
    "COMPLETED": "#2f6db5",
    "FAILED": "#d13438",
    "CRASHED": "#8a1c1c",
    "RUNNING": "#e07b00",
    "RETRYING": "#b58f00",
    "PENDING": "#8a9096",
    "CANCELLED": "#6b6b6b",
}


def format_size(n: float) -> str:
    """Bytes in B / kB / MB / GB (powers of 1000, as ``ls -h --si`` and pip print them).

    >>> format_size(512), format_size(3_400_000)
    ('512 B', '3.4 MB')
    """
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
