"""The notebook_flow dashboard: cache hits, time saved, runs, timeline, cache, locks, queue.

Three ways to open it::

    notebook_flow.dashboard()          # in a notebook (or %flow dashboard): a live view
    notebook-flow dashboard            # standalone, on 127.0.0.1 with a secret token
    JupyterLab launcher → "notebook_flow"   # through jupyter-server-proxy (jupyter.py)

``show()`` serves the app from a background thread of the kernel and displays it in an
iframe, so its views keep refreshing while a cell runs (Panel's inline periodic callbacks
only run while the kernel is idle); ``show(inline=True)`` renders the Panel layout directly
instead (for a remote kernel whose 127.0.0.1 the browser cannot reach).

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
    from .serve import DashboardServer

# ``serve()`` itself lives in ``notebook_flow.dashboard.serve`` (the submodule's name would
# shadow a package-level function of the same name once imported).
__all__ = ["Dashboard", "DashboardServer", "build_dashboard", "show", "stop_all"]

_LAZY = {
    "Dashboard": "app",
    "build_dashboard": "app",
    "DashboardServer": "serve",
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
    inline: bool = False,
    port: int = 0,
    refresh_seconds: float = 5.0,
) -> Any:
    """Open the dashboard of ``store`` (default: the configured store) in the notebook.

    Returns an object that displays as the dashboard: a ``DashboardServer`` (an iframe of a
    server on 127.0.0.1 run by a thread of this kernel, reused by later calls; ``.url`` has
    the token, ``.stop()`` ends it) or, with ``inline=True``, the Panel layout itself.

    >>> import notebook_flow
    >>> notebook_flow.dashboard()          # doctest: +SKIP
    """
    from notebook_flow.config import get_store

    resolved = get_store(store)
    if inline:
        import panel as pn

        from .app import build_dashboard

        pn.extension("tabulator")
        return build_dashboard(resolved, refresh_seconds=refresh_seconds)
    from .serve import serve

    with _servers_lock:
        running = _servers.get(resolved.url)
        if running is not None and running.alive():
            return running
        server = serve(resolved, port=port, threaded=True, refresh_seconds=refresh_seconds)
        _servers[resolved.url] = server
        return server


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
