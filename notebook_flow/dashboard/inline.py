"""The dashboard inside a notebook, through the notebook's own connection to its kernel.

``%flow dashboard`` (``notebook_flow.dashboard()``) renders the Panel layout with Panel's
Jupyter comm rendering: the page and every update travel over the websocket the browser
already has to the Jupyter server, so the view works wherever the notebook does —
JupyterHub, an SSH tunnel, VS Code, Codespaces — and nothing listens on a second port.

What is saved with the notebook is the layout's state when it was saved (Panel embeds it)
and a plain-text line saying to re-run the cell; no URL, port or token. A reopened notebook
shows that snapshot (or the line), never a frame pointing at a dead server.

Refresh: a daemon thread re-reads the active tab every few seconds (the SQL on that
thread) and hands the new data to the kernel's event loop, where the browser's own events (a
click on a tab, a filter) are handled too, so one thread changes the widgets at a time.
Widget changes made from another thread while a cell runs did not reach the browser in
JupyterLab (tested), so a busy kernel shows the view as it was and catches up as soon as
the cell ends; the live line of a future or a ``.map`` keeps moving meanwhile (display
updates, not widgets). The thread ends when the output is gone (the cell re-run or
cleared) or ``stop()`` is called.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["RECONNECT", "InlineDashboard"]

logger = logging.getLogger("notebook_flow")

#: The plain-text form of an inline dashboard: what a reopened notebook without the
#: widgets' JavaScript shows, and what a terminal prints.
RECONNECT = (
    "notebook_flow dashboard of {store} (live while this kernel runs; "
    "re-run this cell to reconnect)"
)

#: Seconds the refresher waits for the browser to show the output before giving up.
FIRST_SHOW_GRACE = 120.0


class InlineDashboard:
    """A dashboard displayed through Jupyter comms, refreshed by a thread of the kernel.

    >>> view = InlineDashboard(store)     # doctest: +SKIP
    >>> view                              # the last expression of a cell shows it  # doctest: +SKIP
    >>> view.stop()                       # doctest: +SKIP
    """

    def __init__(
        self, store: str | ResultStore | None = None, *, refresh_seconds: float = 5.0
    ) -> None:
        import panel as pn

        from .app import Dashboard

        # Bokeh's and Panel's JavaScript travel with the output rather than from a CDN: a
        # JupyterHub or a tunnel may have no way out to the internet.
        pn.extension("tabulator", inline=True)
        # Panel's own timer would only run while the kernel is idle: ours is a thread.
        self.dashboard = Dashboard(store, refresh_seconds=0, lazy=False)
        self.layout: Any = self.dashboard.layout
        self.dashboard.auto.value = refresh_seconds > 0
        self.dashboard.auto.param.watch(self._auto_changed, "value")
        self.refresh_seconds = refresh_seconds if refresh_seconds > 0 else 5.0
        self._loop = _kernel_loop()
        self._pending = threading.Event()  # a refresh waits for the kernel's loop
        loop = self._loop
        if loop is not None:
            self.dashboard.defer = loop.add_callback
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if refresh_seconds > 0:
            self._start()

    # -- display -------------------------------------------------------------------------------

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]] | dict[str, Any]:
        bundle = self.layout._repr_mimebundle_(include, exclude)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        data = dict(data)
        data["text/plain"] = RECONNECT.format(store=self.dashboard.source.url)
        return data, metadata

    def __repr__(self) -> str:
        return RECONNECT.format(store=self.dashboard.source.url)

    # -- refresh -------------------------------------------------------------------------------

    def alive(self) -> bool:
        """True while the refresher thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop refreshing (the view stays as it is)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)

    def _start(self) -> None:
        if self.alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="notebook_flow-dashboard", daemon=True
        )
        self._thread.start()

    def _auto_changed(self, event: Any) -> None:
        if event.new:
            self._start()
        else:
            self._stop.set()

    def _shown(self) -> bool:
        """True while some browser output of the layout exists (Panel drops a model when
        its output's comm closes)."""
        return bool(getattr(self.layout, "_models", None))

    def _run(self) -> None:
        started = time.monotonic()
        seen = False
        while not self._stop.wait(self.refresh_seconds):
            shown = self._shown()
            seen = seen or shown
            if not shown and (seen or time.monotonic() - started > FIRST_SHOW_GRACE):
                return  # the output was cleared or the cell re-run
            if not shown:
                continue
            try:
                self.tick()
            except Exception:  # a refresh bug must not leave a thread spinning on errors
                logger.debug("inline dashboard refresh failed", exc_info=True)

    def tick(self) -> None:
        """One refresh of the active tab: read on this thread, draw on the kernel's loop.

        Skipped while the previous one still waits for the loop (a cell is running).
        """
        if self._pending.is_set():
            return
        dashboard = self.dashboard
        view = dashboard.active
        try:
            data: Any = view.load()
            failed: Exception | None = None
        except Exception as exc:
            data, failed = None, exc

        def draw() -> None:
            try:
                if failed is not None:
                    dashboard._failed(failed)
                elif view is dashboard.active:
                    dashboard._show(view, data)
            finally:
                self._pending.clear()

        if self._loop is None:
            draw()  # no kernel loop (a plain Python session): nothing else draws
            return
        self._pending.set()
        try:
            self._loop.add_callback(draw)
        except RuntimeError:  # the loop is closed: the kernel is shutting down
            self._pending.clear()
            self._stop.set()


def _kernel_loop() -> Any:
    """The running event loop of the kernel thread that builds the view (a cell runs inside
    it), or None outside one."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    from tornado.ioloop import IOLoop

    return IOLoop.current()
