"""The notebook_flow dashboard: cache hits, time saved, runs, timeline, cache, locks, queue.

Three ways to open it::

    notebook_flow.dashboard()          # in a notebook (or %flow dashboard): a live view
    notebook-flow dashboard            # standalone, on 127.0.0.1 with a secret token
    JupyterLab launcher → "notebook_flow"   # through jupyter-server-proxy (jupyter.py)

In a notebook, ``show()`` renders the dashboard through the notebook's own connection to
the kernel (Jupyter comms, see ``inline.py``): no second port, so it works on JupyterHub,
behind a tunnel, in VS Code and Codespaces, and nothing secret is saved in the notebook.
``show(server=True)`` instead serves it on 127.0.0.1 from a thread of the kernel (a URL
with a token, for a browser on the kernel's machine).

Importing this package is cheap: Panel and Bokeh load on first use.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

    from .app import Dashboard, build_dashboard
    from .inline import InlineDashboard
    from .serve import DashboardServer

# ``serve()`` itself lives in ``notebook_flow.dashboard.serve`` (the submodule's name would
# shadow a package-level function of the same name once imported).
__all__ = [
    "Dashboard",
    "DashboardServer",
    "InlineDashboard",
    "build_dashboard",
    "show",
    "stop_all",
]

_LAZY = {
    "Dashboard": "app",
    "build_dashboard": "app",
    "DashboardServer": "serve",
    "InlineDashboard": "inline",
}
_servers: dict[str, DashboardServer] = {}  # store URL -> the server this kernel runs for it
_servers_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


def show(
    store: str | ResultStore | None = None,
    *,
    server: bool = False,
    port: int = 0,
    refresh_seconds: float = 5.0,
) -> Any:
    """Open the dashboard of ``store`` (default: the configured store) in the notebook.

    Returns an object that displays as the dashboard: an ``InlineDashboard`` (the Panel
    layout over Jupyter comms, refreshed by a thread of this kernel every
    ``refresh_seconds``) or, with ``server=True``, a ``DashboardServer`` on 127.0.0.1 run by
    a thread of this kernel (reused by later calls; ``.url`` has the token, ``.stop()`` ends
    it), shown as a link to open in a browser on this machine.

    >>> import notebook_flow
    >>> notebook_flow.dashboard()          # doctest: +SKIP
    """
    from notebook_flow.config import get_store

    resolved = get_store(store)
    if not server:
        from .inline import InlineDashboard

        return InlineDashboard(resolved, refresh_seconds=refresh_seconds)
    from .serve import serve

    with _servers_lock:
        running = _servers.get(resolved.url)
        if running is not None and running.alive():
            return running
        started = serve(resolved, port=port, threaded=True, refresh_seconds=refresh_seconds)
        _servers[resolved.url] = started
        return started


def stop_all() -> None:
    """Stop every dashboard server this process started with ``show()``."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.stop()


class _CallableModule(types.ModuleType):
    """Lets ``notebook_flow.dashboard()`` open the dashboard while staying a package."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return show(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
