"""``notebook-flow dashboard``: serve the dashboard on 127.0.0.1 with a secret token.

::

    $ notebook-flow dashboard --store .notebook_flow --port 8765
    notebook_flow dashboard for /home/me/project/.notebook_flow
      http://127.0.0.1:8765/?token=Qm9…
    Press Ctrl-C to stop.

``notebook_flow/cli.py`` adds this subcommand with :func:`register`; the same arguments
work as ``python -m notebook_flow.dashboard`` (what the Jupyter proxy entry runs).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["TOKEN_ENV", "add_arguments", "exit_with_parent", "main", "register", "run"]

logger = logging.getLogger("notebook_flow")

#: A token given by the environment (the Jupyter proxy entry sets it; see ``jupyter.py``).
#: The environment, not the command line: other users can read a process's arguments.
TOKEN_ENV = "NOTEBOOK_FLOW_DASHBOARD_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The dashboard's options, shared by ``notebook-flow dashboard`` and ``-m``."""
    parser.add_argument(
        "--store",
        metavar="URL",
        help="result store (path or fsspec URL); default: $NOTEBOOK_FLOW_STORE or ./.notebook_flow",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)"
    )
    parser.add_argument(
        "--refresh",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="auto-refresh period of the open tab (0: only on demand; default 5)",
    )
    parser.add_argument("--open", action="store_true", help="open the URL in a web browser")
    # For the Jupyter proxy entry only: the URL prefix the proxy forwards, and trust in the
    # proxy (any websocket origin, with the token in a header the proxy adds).
    parser.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    parser.add_argument("--proxied", action="store_true", help=argparse.SUPPRESS)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``dashboard`` subcommand to ``notebook-flow``'s subparsers.

    The handler is set as ``func`` (``args.func(args)`` returns the exit code).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dashboard",
        help="serve the dashboard on 127.0.0.1 with a secret token",
        description=(
            "Serve the notebook_flow dashboard (runs, cache hits, time saved, timeline, cache, "
            "locks, queue) on 127.0.0.1. The printed URL carries a random token; requests "
            "without it are refused."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; returns the exit code."""
    from .serve import DashboardServer, serve

    def ready(server: DashboardServer) -> None:
        # Behind the Jupyter proxy the token stays out of the output (it lands in Jupyter's
        # log); the proxy adds it to every request itself.
        url = server.base_url if args.proxied else server.url
        print(f"notebook_flow dashboard for {store_url}\n  {url}\nPress Ctrl-C to stop.")
        sys.stdout.flush()
        if args.proxied:
            exit_with_parent(server)

    from notebook_flow.config import get_store

    store = get_store(args.store)
    store_url = store.url
    serve(
        store,
        port=args.port,
        token=os.environ.get(TOKEN_ENV) or None,
        prefix=args.prefix,
        proxied=args.proxied,
        show=args.open,
        refresh_seconds=args.refresh,
        on_ready=ready,
    )
    return 0


def exit_with_parent(server: Any, interval: float = 1.0) -> threading.Thread:
    """Stop ``server`` once the process that started this one (the Jupyter server) is
    gone, so a proxied dashboard never outlives Jupyter (adopted by init, ppid 1).

    Watches the parent pid from a daemon thread: when it changes, the parent has exited,
    however it ended (a clean shutdown, a crash, SIGKILL).
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                logger.info("notebook_flow dashboard: Jupyter (pid %d) is gone; stopping", parent)
                server.stop()
                return

    thread = threading.Thread(target=watch, name="notebook_flow-parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m notebook_flow.dashboard [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m notebook_flow.dashboard", description="Serve the notebook_flow dashboard."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
