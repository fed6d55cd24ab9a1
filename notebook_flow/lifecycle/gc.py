"""``notebook-flow gc`` and ``%flow gc``: clean a store by rules, showing first what would go.

.. code-block:: text

    notebook-flow gc                                   expired results, leftovers of crashes
    notebook-flow gc --unreachable                     + results of code no recent run uses
    notebook-flow gc --older-than 30d --unused-for 14d --max-size 10GB --task NAME
    notebook-flow gc ... --yes                         remove what the table showed

Expired results and the leftovers of interrupted writes are always removed (nothing can
use them). Entries chosen by a rule are only listed — a table of task, entries, bytes and
why — until ``--yes`` is given. Rules combine as :mod:`.rules` says; pinned entries are
never chosen. ``%flow gc`` takes the same options in a notebook.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from notebook_flow import options
from notebook_flow.errors import ConfigurationError

from . import usage
from .evict import CLAIMS_DIR, remove_entries
from .inventory import Inventory, listing, scan
from .quota import forget
from .rules import Doomed, Rules, decide, format_bytes

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["Plan", "add_rule_options", "plan", "register", "rules_from_args", "sweep"]

#: Leftovers (temp files, unnamed payloads, claim markers) younger than this may belong to
#: a write in flight and are left alone.
LEFTOVER_AGE = 3600.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the rules would remove from a store, and the store's size now."""

    doomed: list[Doomed]
    total: int
    entries: int
    pinned: int

    @property
    def freed(self) -> int:
        return sum(d.size for d in self.doomed)

    def table(self) -> str:
        """One line per task and reason: entries and bytes (the dry-run output)."""
        groups: dict[tuple[str, str], list[int]] = {}
        for d in self.doomed:
            row = groups.setdefault((d.task or "?", d.why), [0, 0])
            row[0] += 1
            row[1] += d.size
        rows = [("task", "entries", "bytes", "why")] + [
            (task, str(n), format_bytes(size), why)
            for (task, why), (n, size) in sorted(groups.items(), key=lambda kv: -kv[1][1])
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows
        )


def plan(store: ResultStore, rules: Rules, inv: Inventory | None = None) -> Plan:
    """What ``rules`` would remove (nothing is removed)."""
    inv = scan(store) if inv is None else inv
    if rules.needs_manifests():
        inv.with_manifests(store)  # task names and code versions for the rules
        doomed = decide(inv, rules, now=time.time())
    else:  # the listing decides; only the chosen entries' manifests are read (task names)
        doomed = decide(inv, rules, now=time.time())
        inv.with_manifests(store, [d.key for d in doomed if inv.entries[d.key].manifest is None])
        doomed = [d._replace(task=_task(inv, d.key)) for d in doomed]
    pinned = sum(1 for e in inv.entries.values() if e.pinned)
    return Plan(doomed, inv.total, len(inv.entries), pinned)


def _task(inv: Inventory, key: str) -> str:
    manifest = inv.entries[key].manifest
    return manifest.task if manifest is not None else ""


def remove_leftovers(store: ResultStore, older_than: float = LEFTOVER_AGE) -> int:
    """Temp files, unnamed payloads and stale eviction claims; returns how many."""
    removed = len(store.remove_orphans(older_than=older_than))
    cutoff = time.time() - older_than
    from notebook_flow.storage import files

    for rel, _size, mtime in listing(store, CLAIMS_DIR) if not store.is_local else []:
        if mtime <= cutoff:
            with contextlib.suppress(OSError):
                removed += bool(files.remove(store, rel))
    return removed


def sweep(store: ResultStore, doomed: Sequence[Doomed]) -> tuple[int, int]:
    """Remove the ``doomed`` entries (each claimed, so never twice); (count, bytes)."""
    removed = remove_entries(store, ((d.key, d.committed, ()) for d in doomed))
    forget(store, [key for key, _ in removed])
    return len(removed), sum(n for _, n in removed)


# -- the command ---------------------------------------------------------------------------


def add_rule_options(p: argparse.ArgumentParser) -> None:
    """The gc options, shared by ``notebook-flow gc`` and ``%flow gc``."""
    p.add_argument("--unreachable", action="store_true", help="results of code no run uses now")
    p.add_argument(
        "--keep-versions",
        type=int,
        default=1,
        metavar="N",
        help="with --unreachable: keep each task's N most recently used code versions (1)",
    )
    p.add_argument(
        "--keep-days",
        default=None,
        metavar="D",
        help="with --unreachable: also keep code versions used in the last D (e.g. 7d)",
    )
    p.add_argument("--older-than", metavar="AGE", help="committed longer ago than AGE (30d)")
    p.add_argument("--unused-for", metavar="AGE", help="not hit for AGE (14d)")
    p.add_argument("--max-size", metavar="SIZE", help="evict least recently used past SIZE")
    p.add_argument("--task", metavar="NAME", help="only this task or named cell")
    p.add_argument("-y", "--yes", action="store_true", help="remove what the rules choose")


def rules_from_args(args: argparse.Namespace) -> Rules:
    """Rules from parsed options; a bad value raises ConfigurationError naming it."""
    keep = options.count("--keep-versions", args.keep_versions, minimum=1)
    assert keep is not None
    return Rules(
        task=args.task,
        older_than=_maybe(options.duration, "--older-than", args.older_than),
        unused_for=_maybe(options.duration, "--unused-for", args.unused_for),
        unreachable=args.unreachable,
        keep_versions=keep,
        keep_days=(_maybe(options.duration, "--keep-days", args.keep_days) or 0.0) / 86400,
        max_size=options.byte_size("--max-size", args.max_size, optional=True),
    )


def _maybe(check: Any, name: str, value: object) -> Any:
    return None if value is None else check(name, value)


def has_rules(rules: Rules) -> bool:
    return bool(
        rules.unreachable
        or rules.older_than is not None
        or rules.unused_for is not None
        or rules.max_size is not None
    )


def run(store: ResultStore, args: argparse.Namespace, out: Any = None) -> int:
    """``gc`` with parsed ``args``; prints to ``out`` (stdout); returns the exit code."""
    out = out or sys.stdout
    try:
        rules = rules_from_args(args)
    except ConfigurationError as exc:
        print(f"gc: {exc}", file=sys.stderr)
        return 2
    from notebook_flow.cli import clear_entries

    count, size = clear_entries(store, expired=True, task=args.task)
    leftovers = remove_leftovers(store)
    usage.compact(store)  # fold the touch files of every process into one
    print(
        f"removed {count} expired results ({format_bytes(size)}) and {leftovers} leftover "
        "files of interrupted writes",
        file=out,
    )
    if not has_rules(rules):
        if args.task:
            print("(--task alone only narrows the rules: add one, e.g. --unreachable)", file=out)
        return 0
    chosen = plan(store, rules)
    if not chosen.doomed:
        print(
            f"the rules choose nothing: {chosen.entries} entries, {format_bytes(chosen.total)}"
            f" ({chosen.pinned} pinned)",
            file=out,
        )
        return 0
    print(chosen.table(), file=out)
    if not args.yes:
        print(
            f"would remove {len(chosen.doomed)} entries ({format_bytes(chosen.freed)}) of "
            f"{chosen.entries} ({format_bytes(chosen.total)}); pinned entries are kept. "
            "Run again with --yes to remove them.",
            file=out,
        )
        return 0
    removed, freed = sweep(store, chosen.doomed)
    print(f"removed {removed} entries ({format_bytes(freed)})", file=out)
    return 0


def build_parser(prog: str = "notebook-flow gc") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_rule_options(p)
    return p


def register(subparsers: Any) -> None:
    """Add ``gc`` to the ``notebook-flow`` command (see ``cli.EXTENSIONS``)."""
    p = subparsers.add_parser(
        "gc",
        help="remove expired results and leftovers; with rules, show (then --yes remove) more",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_rule_options(p)
    p.add_argument(
        "--store", help="result store URL (default: $NOTEBOOK_FLOW_STORE or ./.notebook_flow)"
    )
    p.set_defaults(func=_cmd_gc)


def _cmd_gc(args: argparse.Namespace) -> int:
    from notebook_flow.cli import _store

    return run(_store(args), args)
