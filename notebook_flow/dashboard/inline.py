"""The dashboard inside a notebook, through the notebook's own connection to its kernel.

``%flow dashboard`` (``notebook_flow.dashboard()``) renders the Panel layout with Panel's
Jupyter comm rendering: the page and every update travel over the websocket the browser
already has to the Jupyter server, so the view works wherever the notebook does —
JupyterHub, an SSH tunnel, VS Code, Codespaces — and nothing listens on a second port.

What is saved with the notebook is the layout's state when it was saved (Panel embeds it)
and a plain-text line saying to re-run the cell; no URL, port or token. A reopened notebook
shows that snapshot (or the line), never a frame pointing at a dead server.

Refresh: a daemon thread re-reads the active tab every few seconds (the SQL on that
thread). Who draws the new data depends on what the kernel's main thread is doing:

- while a cell runs, the main thread is inside that cell and handles no browser event, so
  the refresher draws itself: Panel sends each change over the output's comm from the
  calling thread and ipykernel forwards it to iopub, so the view moves *during* a long
  cell (the reason it did not before: every draw was handed to the kernel's event loop,
  which a running cell blocks);
- while the kernel is idle, the draw is handed to the kernel's event loop, where the
  browser's own events (a click on a tab, a filter) are handled too, so one thread changes
  the widgets at a time.

The switch is exact: ``pre_run_cell``/``post_run_cell`` hooks flip a flag under the draw
lock, and the end-of-cell hook waits for a draw in progress, so the main thread never
goes back to browser events while the refresher is drawing. Each read carries a sequence
number and an older read is never drawn over a newer one (a draw handed to the loop just
before a cell started runs only after it ended). The thread ends when the output is gone
(the cell re-run or cleared) or ``stop()`` is called.

The browser's messages take the draw lock too. ipykernel 7 hands comm messages from
JupyterLab 4 to a *subshell* thread, which handles them while a cell runs and while the
refresher draws; Bokeh documents are not thread-safe. And Panel's page sends back every
change the kernel makes (its comm listener does not skip changes that came from the
kernel): after each draw, the table rows, cell styles and HTML the kernel just sent come
back, ~0.1 s of kernel CPU each. Applied beside the next draw, such an echo put an older
page back into the document, which Panel sent on again, and the browser echoed again: a
stress round once spent 17 minutes draining them. Here an echo never reaches the
document: the attributes only the kernel sets in this view (:data:`KERNEL_OWNED`) are
dropped from a browser message before Panel sees it; what a person does (a tab, a filter,
a click, a zoom) goes on to a thread of its own, which applies it under the draw lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["KERNEL_OWNED", "RECONNECT", "InlineDashboard"]

logger = logging.getLogger("notebook_flow")

#: The plain-text form of an inline dashboard: what a reopened notebook without the
#: widgets' JavaScript shows, and what a terminal prints.
RECONNECT = (
    "notebook_flow dashboard of {store} (live while this kernel runs; "
    "re-run this cell to reconnect)"
)

#: Attributes of this view that only the kernel sets (tables are read-only; HTML, chart
#: data and styles are drawn by the kernel): a browser message changing one is an echo.
KERNEL_OWNED = frozenset(
    {
        *("data", "cell_styles", "text", "children", "tabs", "options", "label", "title"),
        *("stylesheets", "styles", "css_classes", "visible", "disabled", "description"),
        *("columns", "formatters", "titles", "configuration", "hidden_columns", "max_page"),
    }
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
        # Panel binds ``layout._on_msg`` to the comm when the layout is displayed.
        setattr(self.layout, "_on_msg", self._on_browser_msg)  # noqa: B010 - a method
        self._inbox: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._inbox_lock = threading.Lock()
        self._applier: threading.Thread | None = None
        self.dashboard.auto.value = refresh_seconds > 0
        self.dashboard.auto.param.watch(self._auto_changed, "value")
        self.refresh_seconds = refresh_seconds if refresh_seconds > 0 else 5.0
        self._loop = _kernel_loop()
        self._pending = threading.Event()  # a draw waits for the kernel's loop
        loop = self._loop
        if loop is not None:
            self.dashboard.defer = loop.add_callback
        # Held while the refresher draws and while a browser message is applied; the
        # end-of-cell hook takes it too (see the module). Reentrant: a browser message may
        # turn auto-refresh on, which registers the hooks under it.
        self._draw_lock = threading.RLock()
        # True while the main thread runs a cell (set when the hooks are registered).
        self._cell_running = loop is not None
        self._read_seq = 0  # the number of the latest read (refresher thread only)
        self._drawn_seq = 0  # the number of the read on screen (under ``_draw_lock``)
        self._shell = _shell() if loop is not None else None
        self._hooked = False
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

    def _on_browser_msg(self, ref: str, manager: Any, msg: Any) -> None:
        """A message from the browser's view: its echoes dropped, the rest queued for the
        events thread, which applies them in order under the draw lock.

        Returns at once: the comm wraps this call in a swap of the process-wide
        ``sys.stdout`` (to catch what a callback prints), and on a subshell thread that
        swap would catch the running cell's prints for as long as a draw held us up.
        """
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, dict) and isinstance(content.get("events"), list):
            events = content["events"]
            kept = [e for e in events if not _echo(e)]
            if events and not kept:
                return
            content["events"] = kept
        self._inbox.put((ref, manager, msg))
        with self._inbox_lock:
            if self._applier is None:
                self._applier = threading.Thread(
                    target=self._apply_browser_msgs,
                    name="notebook_flow-dashboard-events",
                    daemon=True,
                )
                self._applier.start()

    def _apply_browser_msgs(self) -> None:
        while True:
            try:
                ref, manager, msg = self._inbox.get(timeout=30)
            except queue.Empty:
                with self._inbox_lock:
                    if self._inbox.empty():  # a message put now starts a new thread
                        self._applier = None
                        return
                continue
            try:
                with self._draw_lock:
                    type(self.layout)._on_msg(self.layout, ref, manager, msg)
            except Exception as exc:  # as Panel's comm would: say so, and the view goes on
                logger.debug("a browser event of the inline dashboard failed", exc_info=True)
                logger.warning(
                    "notebook_flow dashboard: a click or filter could not be applied (%s: %s)",
                    type(exc).__name__,
                    exc,
                )

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
        self._unhook()

    def _start(self) -> None:
        if self.alive():
            return
        self._hook()
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
        try:
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
        finally:
            self._unhook()

    # -- the kernel's cells ----------------------------------------------------------------------

    def _hook(self) -> None:
        shell = self._shell
        if shell is None or self._hooked:
            return
        # Called on the main thread: by a cell (built there, or auto-refresh turned on by
        # code) or by a browser event between cells (the auto-refresh box ticked).
        with self._draw_lock:
            self._cell_running = _in_cell(shell)
        shell.events.register("pre_run_cell", self._cell_started)
        shell.events.register("post_run_cell", self._cell_ended)
        self._hooked = True

    def _unhook(self) -> None:
        shell = self._shell
        if shell is None or not self._hooked:
            return
        self._hooked = False
        for event, callback in (
            ("pre_run_cell", self._cell_started),
            ("post_run_cell", self._cell_ended),
        ):
            try:
                shell.events.unregister(event, callback)
            except ValueError:  # already gone (the shell was reset)
                pass

    def _cell_started(self, info: Any = None) -> None:
        with self._draw_lock:
            self._cell_running = True

    def _cell_ended(self, result: Any = None) -> None:
        # Waits for a draw the refresher is making: after this hook the main thread goes
        # back to the browser's events, which must not meet a half-drawn tab.
        with self._draw_lock:
            self._cell_running = False

    # -- drawing ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """One refresh of the active tab: read on this thread, then draw it here while a
        cell runs or on the kernel's loop while the kernel is idle.

        While an earlier draw still waits for the loop and no cell runs, the read is
        skipped (the loop is busy with the browser's events).
        """
        dashboard = self.dashboard
        if self._pending.is_set() and not self._cell_running:
            return
        view = dashboard.active
        self._read_seq += 1
        seq = self._read_seq
        try:
            data: Any = view.load()
            failed: Exception | None = None
        except Exception as exc:
            data, failed = None, exc

        def draw() -> None:
            if seq <= self._drawn_seq:
                return  # a newer read is on screen already
            self._drawn_seq = seq
            if failed is not None:
                dashboard._failed(failed)
            elif view is dashboard.active:
                dashboard._show(view, data)

        with self._draw_lock:
            if self._loop is None or self._cell_running:
                # No kernel loop (a plain Python session) or the main thread is inside a
                # cell: nothing else touches the widgets now.
                draw()
                return

        def draw_on_loop() -> None:
            try:
                with self._draw_lock:
                    draw()
            finally:
                self._pending.clear()

        self._pending.set()
        try:
            self._loop.add_callback(draw_on_loop)
        except RuntimeError:  # the loop is closed: the kernel is shutting down
            self._pending.clear()
            self._stop.set()


def _echo(event: Any) -> bool:
    """True for a browser event that changes an attribute only the kernel sets."""
    return (
        isinstance(event, dict)
        and event.get("kind") == "ModelChanged"
        and event.get("attr") in KERNEL_OWNED
    )


def _in_cell(shell: Any) -> bool:
    """True when the main thread runs a cell now (the kernel's current request is an
    ``execute_request``), False while it handles a browser's message between cells."""
    get_parent = getattr(getattr(shell, "kernel", None), "get_parent", None)
    if get_parent is None:
        return True  # no kernel to ask: the caller is the user's code
    try:
        return bool(get_parent()["header"].get("msg_type") == "execute_request")
    except (KeyError, TypeError, AttributeError):
        return True


def _shell() -> Any:
    """The running IPython shell (its ``events`` tell when a cell starts and ends)."""
    from IPython import get_ipython

    shell = get_ipython()
    return shell if shell is not None and hasattr(shell, "events") else None


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
