"""``notebook-flow check | export | import``: the lifecycle subcommands.

::

    $ notebook-flow check                    # report only; exit 1 if anything is wrong
    checked 1,204 entries (3.1 GB): 2 bad, 1 orphan
      forged     manifests/5b/5b1e….json  its mac does not verify under this store's key …
      truncated  manifests/9c/9c02….json  its payload has 1000 bytes, the manifest says 4096
      orphan     results/aa/aa41…-….npy   no manifest names it
    run `notebook-flow check --fix` to quarantine bad entries and remove orphans
    $ notebook-flow check --fix              # quarantine/, remove orphans, rebuild the index
    $ notebook-flow export load --to s3://team/cache      # or --all
    $ notebook-flow import --from s3://team/cache          # every entry; or a TASK

Exit codes: 0 all well; 1 something was wrong (even if ``--fix`` repaired it) or an entry
was refused; 2 a usage error (bad option, a store that cannot be opened). Object stores
take their options from the environment (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...), or
from ``configure(storage_options=...)`` for ``--store``. ``notebook_flow/cli.py`` adds
these through its ``EXTENSIONS`` table.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from notebook_flow.errors import NotebookFlowError

__all__ = ["register_check", "register_export", "register_import"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store", help="result store URL (default: $NOTEBOOK_FLOW_STORE or ./.notebook_flow)"
    )
    p.add_argument(
        "--progress", action="store_true", help="show a progress bar (default: on a terminal)"
    )


def register_check(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check",
        help="verify every entry (mac, checksum); --fix quarantines bad ones",
        description=(
            "Verify every entry of the store: its manifest's authentication, its payload's "
            "size, checksum and signature. Reports problems and leftovers of interrupted "
            "writes (exit 1), or with --fix moves bad entries into quarantine/ (with a "
            "reason.txt), removes the leftovers and rebuilds the index."
        ),
    )
    p.add_argument("--fix", action="store_true", help="quarantine, remove orphans, reindex")
    p.add_argument(
        "--older-than",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="only leftovers older than this are orphans (default 3600: a commit in flight "
        "is not one)",
    )
    _common(p)
    p.set_defaults(func=_cmd_check)


def register_export(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="copy a task's entries (or --all) to another store, with their provenance",
        description=(
            "Copy entries from --store to --to: verified with this store's key, re-signed "
            "with the destination's (--to-key-file, default: the same key)."
        ),
    )
    p.add_argument("task", nargs="?", help="a task (name or module:qualname) or a cell name")
    p.add_argument("--all", action="store_true", help="every entry")
    p.add_argument("--to", required=True, metavar="URL", help="the destination store")
    p.add_argument("--to-key-file", metavar="PATH", help="file with the destination's key")
    p.add_argument("--replace", action="store_true", help="replace other results of a key")
    _common(p)
    p.set_defaults(func=_cmd_export)


def register_import(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import",
        help="copy entries from another store into this one (verified, re-signed)",
        description=(
            "Copy entries from --from into --store: verified with the source's key "
            "(--from-key-file, default: this store's key), re-signed with this store's."
        ),
    )
    p.add_argument("task", nargs="?", help="only this task (default: every entry)")
    p.add_argument("--from", dest="source", required=True, metavar="URL", help="source store")
    p.add_argument("--from-key-file", metavar="PATH", help="file with the source's key")
    p.add_argument("--replace", action="store_true", help="replace other results of a key")
    _common(p)
    p.set_defaults(func=_cmd_import)


def _fail(command: str, exc: BaseException) -> int:
    print(f"notebook-flow {command}: {exc}", file=sys.stderr)
    return 2


def _cmd_check(args: argparse.Namespace) -> int:
    from notebook_flow.cli import _store
    from notebook_flow.figures import format_size

    from .check import check_store
    from .progress import wanted

    try:
        store = _store(args)
        report = check_store(
            store, fix=args.fix, older_than=args.older_than, progress=wanted(args.progress)
        )
    except (NotebookFlowError, OSError) as exc:
        return _fail("check", exc)
    bad = [p for p in report.problems if p.kind != "orphan"]
    orphans = len(report.problems) - len(bad)
    print(
        f"checked {report.entries:,} entries ({format_size(report.bytes)}) in {store.url}: "
        + (
            f"{len(bad)} bad, {orphans} orphan{'s' * (orphans != 1)}"
            if report.problems
            else "all good"
        )
    )
    for p in report.problems[:200]:
        print(f"  {p.kind:<10} {p.rel}  {p.reason}")
    if len(report.problems) > 200:
        print(f"  ... and {len(report.problems) - 200} more")
    if report.skipped:
        print(f"skipped {len(report.skipped)} entries written by a newer notebook_flow")
    if report.resigned:
        print(f"re-signed {len(report.resigned)} legacy entries of this private store")
    if args.fix:
        if report.quarantined:
            print(f"quarantined {len(report.quarantined)} entries into {store.url}/quarantine/")
        if report.removed_orphans:
            print(f"removed {len(report.removed_orphans)} orphans")
        print(f"index rebuilt: {report.indexed} entries")
    elif report.problems:
        print("run `notebook-flow check --fix` to quarantine bad entries and remove orphans")
    return 0 if report.ok else 1


def _key(path: str | None) -> bytes | None:
    if path is None:
        return None
    from notebook_flow.signing import check_key

    with open(path, "rb") as f:
        return check_key(f.read(4096).strip(), f"the key in {path}")


def _other_store(url: str, key_file: str | None) -> Any:
    from notebook_flow.config import _normalize_url
    from notebook_flow.storage import ResultStore

    return ResultStore(_normalize_url(url), signing_key=_key(key_file))


def _transfer(command: str, source: Any, dest: Any, args: argparse.Namespace) -> int:
    from notebook_flow.figures import format_size

    from .progress import wanted
    from .transfer import transfer

    report = transfer(
        source, dest, task=args.task, replace=args.replace, progress=wanted(args.progress)
    )
    print(
        f"copied {len(report.copied)} entries ({format_size(report.bytes)}) from {source.url} "
        f"to {dest.url}; skipped {len(report.skipped)}, refused {len(report.refused)}"
    )
    reasons: dict[str, int] = {}
    for _, why in report.skipped:
        reasons[why] = reasons.get(why, 0) + 1
    for why, n in sorted(reasons.items()):
        print(f"  skipped {n}: {why}")
    for key, why in report.refused[:50]:
        print(f"  refused {key}: {why}")
    if report.refused:
        hint = (
            "signed with another key? pass it with --from-key-file"
            if command == "import"
            else "run `notebook-flow check` on this store"
        )
        print(f"refused entries did not verify (forged, damaged, or {hint})")
    return 0 if report.ok else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from notebook_flow.cli import _store

    if bool(args.task) == bool(args.all):
        print("notebook-flow export: give a TASK or --all", file=sys.stderr)
        return 2
    try:
        source = _store(args)
        dest = _other_store(args.to, args.to_key_file)
        return _transfer("export", source, dest, args)
    except (NotebookFlowError, OSError) as exc:
        return _fail("export", exc)


def _cmd_import(args: argparse.Namespace) -> int:
    from notebook_flow.cli import _store

    try:
        dest = _store(args)
        source = _other_store(args.source, args.from_key_file)
        return _transfer("import", source, dest, args)
    except (NotebookFlowError, OSError) as exc:
        return _fail("import", exc)
