"""``notebook-flow locks``: list the locks held now, or break one.

::

    $ notebook-flow locks
    KEY                               TASK    HOLDER                       HELD   LEASE  SOURCE
    5b1e0a9c4f3d2e1b0a9c8d7e6f5a4b3c  charge  run 3f…01 on vm, pid 4242   12 s   28 s   manager
    $ notebook-flow locks --break 5b1e0a9c4f3d2e1b0a9c8d7e6f5a4b3c
    broke the lock on 5b1e0a9c4f3d2e1b0a9c8d7e6f5a4b3c (held by run 3f…01 on vm, pid 4242)
    $ notebook-flow locks --manager redis://cache:6379/0       # locks of a RedisLockManager

``notebook_flow/cli.py`` adds this subcommand through its ``EXTENSIONS`` table, calling
:func:`register`. The work is done by ``notebook_flow.list_locks`` / ``break_lock``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import LockManager

__all__ = ["manager_from_url", "register", "run"]


def manager_from_url(url: str) -> LockManager:
    """A lock manager from a URL: ``redis://`` / ``rediss://``, ``postgresql://`` /
    ``postgres://`` (a libpq DSN), or a directory of file locks (a path or ``file://``).

    >>> manager_from_url("/tmp/store/locks")
    FileLockManager('/tmp/store/locks')
    """
    from .file import FileLockManager
    from .postgres import PostgresLockManager
    from .redis import RedisLockManager

    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        return RedisLockManager(url=url)
    if scheme in ("postgresql", "postgres"):
        return PostgresLockManager(url)
    if scheme in ("", "file"):
        return FileLockManager(url.removeprefix("file://"))
    from notebook_flow.errors import ConfigurationError

    raise ConfigurationError(
        f"--manager {url!r}: use redis://host:port/db, postgresql://user@host/db or the "
        "folder of file locks"
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``locks`` subcommand to ``notebook-flow``'s subparsers (sets ``func``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "locks",
        help="the locks held now; --break KEY removes a stuck holder's lock",
        description=(
            "List the locks of SERIALIZABLE tasks held now: those of the store's own lock "
            "manager (file locks beside a local store, or --manager), exactly, and those "
            "other managers reported to the metadata index. Dead holders' locks are "
            "recovered on their own; --break is for a holder that is alive but stuck (its "
            "commit will then be refused)."
        ),
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="result store (path or fsspec URL); default: $NOTEBOOK_FLOW_STORE or ./.notebook_flow",
    )
    parser.add_argument(
        "--manager",
        metavar="URL",
        help="the lock manager to ask: redis://host:port/db, postgresql://user@host/db, or a "
        "folder of file locks (default: the store's own)",
    )
    parser.add_argument(
        "--break", dest="break_key", metavar="KEY", help="remove the lock on KEY, whoever holds it"
    )
    parser.set_defaults(func=run)
    return parser


def _age(seconds: float) -> str:
    if seconds < 0:
        return "expired"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _who(row: dict[Any, Any]) -> str:
    if not isinstance(row.get("host"), str):  # a holder id of an unknown format
        return str(row["holder"])
    run = f"run {row['run_id']} on " if isinstance(row.get("run_id"), str) else ""
    return f"{run}{row['host']}, pid {row['pid']}"


def run(args: argparse.Namespace) -> int:
    """List the locks, or break one; returns the exit code (1: nothing to break)."""
    from notebook_flow.api import break_lock, list_locks
    from notebook_flow.config import configure, get_store, wait_startup
    from notebook_flow.errors import NotebookFlowError

    try:
        if args.store:
            configure(store=args.store)
        store = get_store()
        wait_startup(store)
        manager = manager_from_url(args.manager) if args.manager else None
        if args.break_key:
            holders = list_locks(store=store, manager=manager)
            held = holders[holders["key"] == args.break_key].to_dict("records")
            if break_lock(args.break_key, store=store, manager=manager):
                who = f" (held by {_who(held[0])})" if held else ""
                print(f"broke the lock on {args.break_key}{who}")
                return 0
            print(f"no live lock on {args.break_key}; nothing to break")
            return 1
        df = list_locks(store=store, manager=manager)
    except NotebookFlowError as exc:
        print(f"notebook-flow locks: {exc}", file=sys.stderr)
        return 2
    if df.empty:
        print("no locks held in", store.url)
        return 0
    now = time.time()
    table = [("KEY", "TASK", "HOLDER", "HELD", "LEASE", "MANAGER", "SOURCE")]
    for row in df.to_dict("records"):
        table.append(
            (
                str(row["key"]),
                row["task"] if isinstance(row["task"], str) else "",
                _who(row),
                _age(now - row["acquired"].timestamp()),
                _age(row["lease_expires"].timestamp() - now),
                str(row["manager"]),
                str(row["source"]),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0
