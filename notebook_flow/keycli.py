"""``notebook-flow key``: show, import or locate the signing key every entry is signed with.

::

    $ notebook-flow key show            # prints the key (creates one on first use)
    3f9a...e1
    $ notebook-flow key import 3f9a...e1   # on a teammate's machine (or: ... import -  < file)
    imported the signing key into /home/ada/.config/notebook_flow/signing_key
    $ notebook-flow key path            # where the key file is, and which key is in use
    /home/ada/.config/notebook_flow/signing_key (key id 5b1e0a9c4f3d2e1b)

A team that shares a store shares one key: results signed with another key are cache
misses (see :mod:`notebook_flow.signing`). ``$NOTEBOOK_FLOW_SIGNING_KEY`` overrides the
file. ``notebook_flow/cli.py`` adds this subcommand through its ``EXTENSIONS`` table.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .errors import ConfigurationError
from .signing import SIGNING_KEY_ENV, default_signing_key, import_key, key_file_path, key_id

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``key`` subcommand to the ``notebook-flow`` parser."""
    p = subparsers.add_parser(
        "key", help="show or import the signing key (share one with everyone using a store)"
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("show", help="print the key in use (created on first use)")
    imp = actions.add_parser("import", help="use this key from now on (replaces the key file)")
    imp.add_argument("key", help="the key as `key show` printed it, or - to read it from stdin")
    imp.add_argument("-y", "--yes", action="store_true", help="replace an existing key silently")
    actions.add_parser("path", help="where the key file is, and the id of the key in use")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "show":
            print(default_signing_key().decode())
            return 0
        if args.action == "path":
            source = SIGNING_KEY_ENV if os.environ.get(SIGNING_KEY_ENV) else "key file"
            key = default_signing_key()
            print(f"{key_file_path()} (in use: {source}, key id {key_id(key)})")
            return 0
        text = sys.stdin.read() if args.key == "-" else args.key
        path = key_file_path()
        if os.path.exists(path) and not args.yes:
            print(
                f"notebook-flow key import: {path} exists; results signed with it become "
                "cache misses. Pass --yes to replace it.",
                file=sys.stderr,
            )
            return 1
        import_key(text)
        print(f"imported the signing key into {path}")
        if os.environ.get(SIGNING_KEY_ENV):
            print(f"note: {SIGNING_KEY_ENV} is set and overrides the file", file=sys.stderr)
        return 0
    except (ConfigurationError, OSError) as exc:
        print(f"notebook-flow key: {exc}", file=sys.stderr)
        return 2
