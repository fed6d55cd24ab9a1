"""The dashboard inside Jupyter: a server extension and a jupyter-server-proxy entry.

Installed with the package: ``extension/jupyter_server_config.d/notebook_flow.json`` enables
the server extension, and the ``jupyter_serverproxy_servers`` entry point names
:func:`setup_proxy`. A user then finds "notebook_flow" in the JupyterLab launcher, or opens
``<jupyter>/notebook-flow/``; Jupyter authenticates every request (its token or login).

How the pieces fit:

* jupyter-server-proxy starts ``python -m notebook_flow.dashboard`` on the first request,
  on a free port of 127.0.0.1, under the URL prefix ``{base_url}notebook-flow``. That
  process watches its parent and stops when the Jupyter server is gone.
* That server still wants a token — any local user could reach 127.0.0.1 otherwise. The
  token is random per Jupyter server, handed to the process in its environment, and added by
  the proxy to every request and websocket as the ``X-Notebook-Flow-Token`` header.
* Behind the proxy the browser's websocket origin is Jupyter's, which Jupyter has checked
  already, so the dashboard accepts any origin there (``--proxied``).
* The server extension remembers Jupyter's ``root_dir``: when ``NOTEBOOK_FLOW_STORE`` is not
  set, the dashboard shows ``<root_dir>/.notebook_flow``, the store of notebooks at the root.
  It also answers ``GET {base_url}api/notebook-flow/stats`` (JSON totals, for status widgets)
  and redirects ``{base_url}notebook-flow-dashboard`` to the proxied app.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "PROXY_NAME",
    "_jupyter_server_extension_points",
    "_load_jupyter_server_extension",
    "setup_proxy",
]

logger = logging.getLogger("notebook_flow")

#: The proxy entry's name: the app lives at ``{base_url}notebook-flow/``.
PROXY_NAME = "notebook-flow"
_state: dict[str, str] = {}
_state_lock = threading.Lock()


def _token() -> str:
    """The token of this Jupyter server's proxied dashboard (made on first use)."""
    with _state_lock:
        if "token" not in _state:
            _state["token"] = secrets.token_urlsafe(32)
        return _state["token"]


def _icon_path() -> str:
    """The launcher icon: beside the package in a checkout, or where the wheel installs it."""
    candidates = [
        Path(__file__).resolve().parent.parent / "extension" / "notebook_flow.svg",
        Path(sys.prefix) / "share" / "notebook-flow" / "notebook_flow.svg",
    ]
    for path in candidates:
        if path.is_file():
            return str(path)
    return ""


def _environment() -> dict[str, str]:
    from .dashboard.cli import TOKEN_ENV

    env = {TOKEN_ENV: _token()}
    root = _state.get("root_dir")
    if not os.environ.get("NOTEBOOK_FLOW_STORE") and root:
        env["NOTEBOOK_FLOW_STORE"] = os.path.join(root, ".notebook_flow")
    return env


def setup_proxy() -> dict[str, Any]:
    """The jupyter-server-proxy entry for the dashboard (``jupyter_serverproxy_servers``).

    >>> setup_proxy()["launcher_entry"]["title"]
    'notebook_flow'
    """
    from .dashboard.serve import TOKEN_HEADER

    return {
        "command": [
            *(sys.executable, "-m", "notebook_flow.dashboard", "--proxied"),
            *("--port", "{port}", "--prefix", "{base_url}" + PROXY_NAME),
        ],
        "environment": _environment,
        # The backend sees the full path, so its page links to {base_url}notebook-flow/...
        "absolute_url": True,
        # Importing Panel and building the first page takes a few seconds on a small machine
        # and over a minute on a loaded one (Panel's import alone took 38 s beside other
        # jobs, and the proxy answered 500 after 60 s): a launcher must not fail for that.
        "timeout": 180,
        "request_headers_override": {TOKEN_HEADER: _token()},
        "new_browser_tab": False,
        "launcher_entry": {
            "enabled": True,
            "title": "notebook_flow",
            "icon_path": _icon_path(),
            # JupyterLab's launcher draws an icon URL only for its kernel categories
            # (Notebook, Console); in "Other" the tile stays blank.
            "category": "Notebook",
        },
    }


# -- server extension --------------------------------------------------------------------------


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """Tells Jupyter Server that this module is a server extension."""
    return [{"module": "notebook_flow.jupyter"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Remember the root folder; add the stats API and the short dashboard URL."""
    from jupyter_server.base.handlers import APIHandler, JupyterHandler
    from jupyter_server.utils import url_path_join
    from tornado import web

    with _state_lock:
        _state["root_dir"] = str(serverapp.root_dir)
    base_url = serverapp.web_app.settings.get("base_url", "/")

    class StatsHandler(APIHandler):  # type: ignore[misc]
        """GET: the store's totals (runs, hits, hit rate, time saved, …) as JSON."""

        @web.authenticated
        async def get(self) -> None:
            import asyncio

            stats = await asyncio.get_running_loop().run_in_executor(None, _stats)
            self.finish(json.dumps(stats))

    class DashboardRedirect(JupyterHandler):  # type: ignore[misc]
        @web.authenticated
        def get(self) -> None:
            self.redirect(url_path_join(base_url, PROXY_NAME) + "/")

    serverapp.web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base_url, "api", "notebook-flow", "stats"), StatsHandler),
            (url_path_join(base_url, "notebook-flow-dashboard"), DashboardRedirect),
        ],
    )
    serverapp.log.info(
        "notebook_flow: dashboard at %s (through jupyter-server-proxy)",
        url_path_join(base_url, PROXY_NAME) + "/",
    )


def _stats() -> dict[str, Any]:
    """Totals of the store the proxied dashboard shows (same default as ``_environment``)."""
    from .config import get_metadata, get_store, wait_startup

    url = os.environ.get("NOTEBOOK_FLOW_STORE") or _environment().get("NOTEBOOK_FLOW_STORE")
    store = get_store(url)
    wait_startup(store)
    stats: dict[str, Any] = get_metadata(store).stats()
    stats["store"] = store.url
    return stats
