"""A store's lifecycle at a glance: its size against its quota, its pins, what gc would free.

What the dashboard's cache view shows above its table (and ``summary().line()`` in text)::

    2.1 GB of a 5.0 GB quota · 3 pinned · gc --unreachable would free 640.0 MB (12 entries)

One listing of the store plus a read of its manifests (for code versions): done off the
UI thread, when the view loads.

>>> import tempfile
>>> from notebook_flow.storage import ResultStore
>>> summary(ResultStore(tempfile.mkdtemp()), max_size=10**9).line()
'0 B of a 1.0 GB quota · 0 entries · 0 pinned · gc --unreachable would free nothing'
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .gc import plan, sweep
from .inventory import scan
from .rules import Rules, format_bytes

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["Summary", "prune_unreachable", "summary"]


@dataclasses.dataclass(frozen=True)
class Summary:
    """Bytes stored, the quota (None: no quota), entries, pinned keys, and what
    ``gc --unreachable`` would free."""

    total: int
    max_size: int | None
    entries: int
    pinned: frozenset[str]
    unreachable_entries: int
    unreachable_bytes: int

    def line(self) -> str:
        quota = (
            f"of a {format_bytes(self.max_size)} quota" if self.max_size else "stored (no quota)"
        )
        if self.max_size and self.total > self.max_size:
            quota += " (over: eviction runs after the next commit)"
        free = (
            f"would free {format_bytes(self.unreachable_bytes)} ({self.unreachable_entries} "
            "entries)"
            if self.unreachable_entries
            else "would free nothing"
        )
        return (
            f"{format_bytes(self.total)} {quota} · {self.entries} entries · "
            f"{len(self.pinned)} pinned · gc --unreachable {free}"
        )


def summary(store: ResultStore, *, max_size: int | None = None) -> Summary:
    """The lifecycle summary of ``store`` (``max_size``: default the configured quota)."""
    if max_size is None:
        from notebook_flow.config import settings

        max_size = settings().max_size
    inv = scan(store)
    chosen = plan(store, Rules(unreachable=True), inv)
    pinned = frozenset(k for k in inv.pinned if k in inv.entries)
    return Summary(inv.total, max_size, len(inv.entries), pinned, len(chosen.doomed), chosen.freed)


def prune_unreachable(store: ResultStore) -> tuple[int, int]:
    """Remove what ``gc --unreachable`` chooses (the dashboard's action); (count, bytes)."""
    return sweep(store, plan(store, Rules(unreachable=True)).doomed)
