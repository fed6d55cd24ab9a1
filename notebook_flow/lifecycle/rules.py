"""What goes: the decision of gc and of quota eviction, over an :class:`~.inventory.Inventory`.

Rules combine: ``task`` narrows the scope to one task (or named cell); ``older_than``
and ``unused_for`` choose entries committed before, and last used before, a point in time
(both must hold when both are given); ``unreachable`` chooses entries of code that no
recent run used; ``max_size`` then evicts the least recently used of what is left until
the scope (the store, or the task's entries) fits. Pinned entries are never chosen.

Reachability: an entry's *code version* is the hash of its code components (the
``source of ...`` and ``class ...`` parts of its key, see ``TASK_SOURCE``). For each task
the versions are ranked by their latest use (commit or hit, from any process); the newest
``keep_versions`` stay, and so does every version used within ``keep_days``. The rest is
the output of code nobody runs any more: no current call can produce its keys. Entries
whose key has no code component (``INPUTS`` alone) are never unreachable.

>>> from notebook_flow.lifecycle.inventory import Entry, Inventory
>>> inv = Inventory({k: Entry(k, 10, t, t) for k, t in (("a" * 32, 1.0), ("b" * 32, 2.0))},
...                 total=20, pinned=frozenset(), scanned_at=3.0)
>>> [(d.key[0], d.why) for d in decide(inv, Rules(max_size=15))]
[('a', 'least recently used (store over 15 B)')]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from operator import attrgetter
from typing import NamedTuple

import xxhash

from notebook_flow.figures import format_size as format_bytes

from .inventory import Entry, Inventory

__all__ = ["Doomed", "Rules", "code_version", "decide", "format_bytes"]

_CODE_LABELS = ("source of ", "class `")


@dataclasses.dataclass(frozen=True)
class Rules:
    """The gc rules (seconds and bytes); all None/False chooses nothing."""

    task: str | None = None
    older_than: float | None = None
    unused_for: float | None = None
    unreachable: bool = False
    keep_versions: int = 1
    keep_days: float = 0.0
    max_size: int | None = None

    def needs_manifests(self) -> bool:
        """Whether the decision reads manifests (task names, code versions)."""
        return self.task is not None or self.unreachable


class Doomed(NamedTuple):
    """One entry chosen to go, and why (a tuple: a decision may choose 50,000)."""

    key: str
    task: str
    size: int
    why: str
    committed: float


def code_version(components: dict[str, str]) -> str | None:
    """The hash of an entry's code components, or None when its key has none."""
    parts = sorted((k, v) for k, v in components.items() if k.startswith(_CODE_LABELS))
    if not parts:
        return None
    h = xxhash.xxh3_64()
    for label, value in parts:
        h.update(f"{label}\0{value}\0".encode())
    return h.hexdigest()


def _task_of(entry: Entry) -> str:
    return entry.manifest.task if entry.manifest is not None else ""


def matches_task(task: str, pattern: str) -> bool:
    """``pattern`` names ``task`` by identity (``mod:load``) or by name (``load``)."""
    return pattern in (task, task.rsplit(":", 1)[-1])


def _unreachable(entries: Iterable[Entry], rules: Rules, now: float) -> dict[str, str]:
    by_task: dict[str, dict[str, list[Entry]]] = {}
    for entry in entries:
        if entry.manifest is None:
            continue
        version = code_version(entry.manifest.components)
        if version is not None:
            by_task.setdefault(entry.manifest.task, {}).setdefault(version, []).append(entry)
    out: dict[str, str] = {}
    for versions in by_task.values():
        latest = {v: max(e.last_used for e in es) for v, es in versions.items()}
        ranked = sorted(latest, key=lambda v: latest[v], reverse=True)
        keep = set(ranked[: rules.keep_versions])
        if rules.keep_days > 0:
            keep |= {v for v in ranked if latest[v] >= now - rules.keep_days * 86400}
        for version in ranked:
            if version in keep:
                continue
            why = f"unreachable: code changed (not among the last {rules.keep_versions} used)"
            for entry in versions[version]:
                out[entry.key] = why
    return out


def decide(inv: Inventory, rules: Rules, *, now: float | None = None) -> list[Doomed]:
    """The entries ``rules`` remove from ``inv``, least recently used first."""
    now = inv.scanned_at if now is None else now
    if rules.task is None:
        scope = [e for e in inv.entries.values() if not e.pinned]
    else:
        scope = [
            e
            for e in inv.entries.values()
            if not e.pinned and matches_task(_task_of(e), rules.task)
        ]
    why: dict[str, str] = {}
    if rules.older_than is not None or rules.unused_for is not None:
        reasons = []
        if rules.older_than is not None:
            reasons.append(f"older than {_days(rules.older_than)}")
        if rules.unused_for is not None:
            reasons.append(f"unused for {_days(rules.unused_for)}")
        reason = " and ".join(reasons)
        for e in scope:
            old = rules.older_than is None or e.committed < now - rules.older_than
            unused = rules.unused_for is None or e.last_used < now - rules.unused_for
            if old and unused:
                why[e.key] = reason
    if rules.unreachable:
        for key, reason in _unreachable(scope, rules, now).items():
            why.setdefault(key, reason)
    if rules.max_size is not None:
        where = "store" if rules.task is None else f"task {rules.task}"
        lru = f"least recently used ({where} over {format_bytes(rules.max_size)})"
        if rules.task is None:
            size = inv.total
        else:
            size = sum(
                e.size for e in inv.entries.values() if matches_task(_task_of(e), rules.task)
            )
        size -= sum(inv.entries[k].size for k in why)
        limit = rules.max_size
        if not why:  # the usual quota pass: the LRU order is the answer's order
            out = []
            for e in _lru(scope):
                if size <= limit:
                    break
                out.append(Doomed(e.key, _task_of(e), e.size, lru, e.committed))
                size -= e.size
            return out
        for e in _lru(scope):
            if size <= limit:
                break
            if e.key not in why:
                why[e.key] = lru
                size -= e.size
    entries = inv.entries
    chosen = _lru(entries[k] for k in why)
    return [Doomed(e.key, _task_of(e), e.size, why[e.key], e.committed) for e in chosen]


def _lru(found: Iterable[Entry]) -> list[Entry]:
    """Eviction order: least recently used first, then oldest commit. Two stable sorts on
    one float each: half the time of one sort on (last_used, committed) tuples."""
    out = sorted(found, key=_COMMITTED)
    out.sort(key=_LAST_USED)
    return out


_COMMITTED = attrgetter("committed")
_LAST_USED = attrgetter("last_used")


def _days(seconds: float) -> str:
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{seconds / 86400:.0f}d"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds:g}s"
