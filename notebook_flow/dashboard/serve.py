"""Serve the dashboard: a Bokeh/Panel server on 127.0.0.1 that wants a secret token.

>>> from notebook_flow.dashboard.serve import serve
>>> server = serve(threaded=True)                # doctest: +SKIP
>>> server.url                                   # doctest: +SKIP
'http://127.0.0.1:40123/?token=3k…'
>>> server.stop()                                # doctest: +SKIP

Security model (the dashboard can delete cached results and break locks, so it is not a
read-only page):

* The server binds the loopback interface only; nothing on the network can reach it.
* Every HTTP request and the websocket handshake must carry the token, one of: the
  ``token`` query argument (the printed URL), the cookie that a request with a valid query
  token sets (so the page's websocket and later requests need not repeat it), or the
  ``X-Notebook-Flow-Token`` header (what the Jupyter proxy injects, see ``jupyter.py``).
  Anything else gets 403 before a Bokeh session exists. Tokens are compared in constant
  time. Cookies are not isolated by port, so the cookie's name carries the port.
* Websocket origins are restricted to the server's own address; behind jupyter-server-proxy
  the browser's origin is Jupyter's, which Jupyter has already checked, and the header
  token proves the request came through the proxy.

``threaded=True`` runs the server on its own thread and event loop, which is what keeps the
views of an inline dashboard refreshing while the notebook's kernel is busy with a cell
(Panel's inline periodic callbacks only run while the kernel is idle).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["TOKEN_HEADER", "DashboardServer", "free_port", "serve"]

logger = logging.getLogger("notebook_flow")

#: The header jupyter-server-proxy adds to every proxied request (see ``jupyter.py``).
TOKEN_HEADER = "X-Notebook-Flow-Token"
LOOPBACK = "127.0.0.1"


def free_port(address: str = LOOPBACK) -> int:
    """A TCP port that is free on ``address`` right now.

    Bokeh builds its websocket origin allow-list before binding, so the port must be known
    up front; the short race with another process taking it is retried by ``serve``.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _make_auth_provider(token: str, cookie_name: str, prefix: str) -> Any:
    """A Bokeh ``AuthProvider`` that accepts the token and refuses everything else with 403."""
    from bokeh.server.auth_provider import AuthProvider
    from tornado.web import HTTPError

    expected = token.encode()

    def matches(candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(str(candidate).encode(), expected)

    async def check(handler: Any) -> str:
        # Only the query string counts: a token in a form body would let a cross-site POST
        # try guesses without reading the response.
        query = handler.get_query_argument("token", None)
        if matches(query):
            # Keep the token in a cookie so the websocket and later loads need not repeat it.
            # SameSite=Strict: another site cannot make the browser send it.
            with contextlib.suppress(Exception):  # a websocket handshake cannot set cookies
                handler.set_cookie(
                    cookie_name, token, path=prefix or "/", httponly=True, samesite="Strict"
                )
            return "notebook-flow"
        if matches(handler.request.headers.get(TOKEN_HEADER)) or matches(
            handler.get_cookie(cookie_name)
        ):
            return "notebook-flow"
        raise HTTPError(403, reason="notebook_flow dashboard: missing or wrong token")

    def refuse(handler: Any) -> str:  # never reached: ``check`` raises first
        raise HTTPError(403, reason="notebook_flow dashboard: missing or wrong token")

    class TokenAuth(AuthProvider):  # type: ignore[misc]
        @property
        def get_user_async(self) -> Callable[[Any], Any]:
            return check

        @property
        def get_login_url(self) -> Callable[[Any], str]:
            return refuse

    return TokenAuth()


@dataclass
class DashboardServer:
    """A running dashboard server: its URL (with the token), and ``stop()``.

    In a notebook, its HTML representation is a link to open it in a browser on this
    machine (the inline view, ``show()``, needs no server).
    """

    url: str
    port: int
    token: str = field(repr=False)
    address: str = LOOPBACK
    prefix: str = ""
    _thread: Any = field(default=None, repr=False)
    _server: Any = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        """The URL without the token."""
        return f"http://{self.address}:{self.port}{self.prefix}/"

    def alive(self) -> bool:
        """True while a threaded server runs."""
        return self._thread is not None and bool(self._thread.is_alive())

    def stop(self) -> None:
        """Stop the server (and its thread); open browser tabs lose their session."""
        if self._thread is not None:
            self._thread.stop()
            self._thread.join(10)
        elif self._server is not None:
            self._server.io_loop.add_callback(self._server.io_loop.stop)

    def _repr_html_(self) -> str:
        url = escape(self.url, quote=True)
        return (
            f'<div><a href="{url}" target="_blank" rel="noopener">open the notebook_flow '
            f"dashboard</a> (served by this kernel on {escape(self.base_url)}; reachable from a "
            "browser on this machine only — in a notebook elsewhere use %flow dashboard)</div>"
        )


def _wait_listening(address: str, port: int, thread: threading.Thread, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((address, port)) == 0:
                return
        if not thread.is_alive():
            raise RuntimeError(f"the dashboard server on {address}:{port} failed to start")
        time.sleep(0.02)
    raise TimeoutError(f"the dashboard server on {address}:{port} did not start in {timeout} s")


def serve(
    store: str | ResultStore | None = None,
    *,
    port: int = 0,
    token: str | None = None,
    prefix: str = "",
    threaded: bool = False,
    show: bool = False,
    proxied: bool = False,
    refresh_seconds: float = 5.0,
    ready_timeout: float = 60.0,
    on_ready: Callable[[DashboardServer], None] | None = None,
) -> DashboardServer:
    """Serve the dashboard of ``store`` on 127.0.0.1:``port`` (0: a free port).

    ``token`` defaults to a fresh random one; ``prefix`` is the URL path the app lives under
    (behind a proxy). ``threaded=True`` returns at once with the server running on a
    background thread; otherwise this blocks until the server stops (Ctrl-C), calling
    ``on_ready`` first. ``proxied=True`` accepts any websocket origin, for use behind
    jupyter-server-proxy only (Jupyter checks the origin; the proxy adds the token header).
    """
    import panel as pn

    from .app import build_dashboard

    token = token or secrets.token_urlsafe(24)
    prefix = ("/" + prefix.strip("/")) if prefix.strip("/") else ""
    chosen = port or free_port()
    origins = ["*"] if proxied else [f"{LOOPBACK}:{chosen}", f"localhost:{chosen}"]
    server = DashboardServer(
        url=f"http://{LOOPBACK}:{chosen}{prefix}/?token={token}",
        port=chosen,
        token=token,
        prefix=prefix,
    )

    def session() -> Any:  # a fresh dashboard per browser session
        return build_dashboard(store, refresh_seconds=refresh_seconds)

    options: dict[str, Any] = {
        "port": chosen,
        "address": LOOPBACK,
        "websocket_origin": origins,
        "show": False,
        "title": "notebook_flow",
        "verbose": False,
        "prefix": prefix,
        "auth_provider": _make_auth_provider(token, f"notebook_flow_token_{chosen}", prefix),
        # Sessions of closed tabs go after a minute instead of Bokeh's default hour.
        "unused_session_lifetime_milliseconds": 60_000,
        # Build one session before listening: the imports and Panel's model caches are then
        # warm, and the first browser gets its page a second sooner.
        "warm": True,
        "check_unused_sessions_milliseconds": 10_000,
    }
    serve_panel: Any = pn.serve  # untyped in Panel
    if threaded:
        thread = serve_panel({"/": session}, threaded=True, **options)
        server._thread = thread
        _wait_listening(LOOPBACK, chosen, thread, ready_timeout)
        if show:
            _open_browser(server.url)
        if on_ready is not None:
            on_ready(server)
        return server
    bokeh_server = serve_panel({"/": session}, start=False, **options)
    server._server = bokeh_server
    if on_ready is not None:
        on_ready(server)
    if show:
        _open_browser(server.url)
    bokeh_server.start()
    with contextlib.suppress(KeyboardInterrupt):
        bokeh_server.io_loop.start()
    return server


def _open_browser(url: str) -> None:
    import webbrowser

    try:
        webbrowser.open(url)
    except Exception:  # no browser is fine: the URL was printed
        logger.debug("could not open a browser", exc_info=True)
