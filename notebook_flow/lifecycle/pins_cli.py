"""``notebook-flow pin KEY|TASK ...`` / ``unpin``: keep entries out of eviction and gc rules.

A 32-hex argument is a cache key; anything else names a task (``load`` or ``mod:load``)
or a ``%%task --name`` cell, whose entries stored now are all (un)pinned. ``pin`` without
an argument lists the pinned entries.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Any

from notebook_flow.storage.pins import pin, pinned_keys, unpin

from .rules import format_bytes, matches_task

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["register_pin", "register_unpin", "resolve"]

_KEY_RE = re.compile(r"^[0-9a-f]{32}$")


def resolve(store: ResultStore, targets: list[str]) -> tuple[list[str], list[str]]:
    """(keys, targets that matched nothing): keys as given, tasks by their stored entries."""
    keys = [t for t in targets if _KEY_RE.match(t)]
    names = [t for t in targets if not _KEY_RE.match(t)]
    if not names:
        return keys, []
    found: dict[str, int] = dict.fromkeys(names, 0)
    for manifest in store.iter_manifests(verified=False):
        for name in names:
            if matches_task(manifest.task, name):
                keys.append(manifest.key)
                found[name] += 1
    return keys, [name for name, n in found.items() if n == 0]


def _add(subparsers: Any, name: str, text: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(name, help=text, description=__doc__)
    p.add_argument("targets", nargs="*", metavar="KEY|TASK")
    p.add_argument(
        "--store", help="result store URL (default: $NOTEBOOK_FLOW_STORE or ./.notebook_flow)"
    )
    return p


def register_pin(subparsers: Any) -> None:
    """Add ``pin`` to the ``notebook-flow`` command."""
    _add(
        subparsers, "pin", "never evict or prune these entries (KEY or TASK); none: list"
    ).set_defaults(func=lambda args: _cmd(args, True))


def register_unpin(subparsers: Any) -> None:
    """Add ``unpin`` to the ``notebook-flow`` command."""
    p = _add(subparsers, "unpin", "let eviction and gc rules remove these entries again")
    p.set_defaults(func=lambda args: _cmd(args, False))


def _cmd(args: argparse.Namespace, pinning: bool) -> int:
    from notebook_flow.cli import _store

    store = _store(args)
    if not args.targets:
        if not pinning:
            print("notebook-flow unpin: give KEY or TASK", file=sys.stderr)
            return 2
        return _list(store)
    keys, unknown = resolve(store, args.targets)
    if unknown:
        print(
            f"notebook-flow {'pin' if pinning else 'unpin'}: no stored entries for "
            f"{', '.join(unknown)} (a task name, mod:task, a %%task --name, or a 32-hex key)",
            file=sys.stderr,
        )
        return 1
    changed = (pin if pinning else unpin)(store, keys)
    verb = "pinned" if pinning else "unpinned"
    print(f"{verb} {changed} entries ({len(keys) - changed} already {verb})")
    return 0


def _list(store: ResultStore) -> int:
    pinned = pinned_keys(store)
    shown = 0
    for manifest in store.iter_manifests(verified=False):
        if manifest.key in pinned:
            print(f"{manifest.key}  {manifest.task}  {format_bytes(manifest.size)}")
            shown += 1
    print(
        f"{shown} pinned entries"
        + (f" ({len(pinned) - shown} not stored)" if len(pinned) > shown else "")
    )
    return 0
