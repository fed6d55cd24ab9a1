"""The dashboard app: a header with the "updated" time, six tabs, and auto-refresh.

``build_dashboard()`` builds a fresh app for each browser session (Bokeh documents cannot be
shared between sessions), so nothing here lives at module level.

>>> from notebook_flow.dashboard import build_dashboard
>>> build_dashboard("path/to/store").servable()            # doctest: +SKIP

Refresh: a periodic callback re-reads the *active* tab (plus nothing else: hidden tabs are
read when opened) every ``refresh_seconds``. The SQL runs on a worker thread, so a read
that waits for the metadata lock (a kernel writing a batch of runs) never stalls the server's
event loop; the widgets are updated back on the loop. A busy index shows as "waiting for
the metadata index" next to the last successful update time, never as an error.
"""

from __future__ import annotations

# Panel's widget and layout constructors take **params and are untyped.
# mypy: disable-error-code="no-untyped-call"
import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING, Any, cast

import panel as pn  # noqa: TID253 - the dashboard package is imported only when used
from panel.io import hold  # noqa: TID253

from notebook_flow.errors import MetadataError

from .admin import CacheView, LocksView
from .queries import Source
from .views import OverviewView, QueueView, RunsView, TimelineView
from .widgets import View, html

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["Dashboard", "build_dashboard"]

logger = logging.getLogger("notebook_flow")

TABS = ("Overview", "Runs", "Timeline", "Cache", "Locks", "Queue")


class Dashboard:
    """The views of one session and their refresh; ``layout`` is what is displayed.

    >>> dash = Dashboard(store)          # doctest: +SKIP
    >>> dash.refresh()                   # re-read the active tab now  # doctest: +SKIP
    >>> dash.overview.totals["runs"]     # doctest: +SKIP
    12
    """

    def __init__(
        self,
        store: str | ResultStore | None = None,
        *,
        refresh_seconds: float = 5.0,
        page_size: int = 50,
        title: str = "notebook_flow",
        lazy: bool = True,
    ) -> None:
        self.source = Source(store)  # type: ignore[arg-type]
        # The overview's read of the index runs while the widgets are built (DuckDB releases
        # the GIL), so the first page is ready sooner.
        first_read: concurrent.futures.Future[Any] = concurrent.futures.Future()
        threading.Thread(
            target=_fill_future, args=(first_read, self.source.overview), daemon=True
        ).start()
        # 0 starts with auto-refresh off; ticking the box then refreshes every 5 s.
        self.refresh_seconds = refresh_seconds if refresh_seconds > 0 else 5.0
        self.updated_at: float | None = None
        self.problem: str | None = None
        self._refreshing = False
        self._callback: Any = None
        self.busy_after = 2.0  # s a refresh may wait for the metadata lock before we say so
        #: Runs a function after the current browser event is handled (set by the inline
        #: view: a tab's first draw inside the tab-change event could be lost over comms).
        self.defer: Callable[[Callable[[], None]], None] | None = None

        self.page_size = page_size
        # Views are built when their tab is first opened: a session that only looks at the
        # overview costs a fifth of the widgets, and the first page reaches the browser sooner.
        self._factories: list[Callable[[], View]] = [
            lambda: OverviewView(self.source),
            lambda: RunsView(self.source, page_size),
            lambda: TimelineView(self.source),
            lambda: CacheView(self.source, page_size),
            lambda: LocksView(self.source),
            lambda: QueueView(self.source),
        ]
        self._views: dict[int, View] = {}
        self._slots = [pn.Column(sizing_mode="stretch_width") for _ in TABS]

        self.status = html("", css_classes=["nf-status"], margin=(14, 10))
        self.auto = pn.widgets.Checkbox(
            label=f"auto-refresh every {self.refresh_seconds:g} s",
            value=refresh_seconds > 0,
            margin=(16, 10),
        )
        self.auto.param.watch(self._auto_changed, "value")
        self.refresh_button = pn.widgets.Button(label="Refresh", width=90, margin=(8, 10))
        self.refresh_button.on_click(lambda _: self.refresh())
        # dynamic: only the active tab is sent to the browser, so the first page is light.
        # ``lazy=False`` (the notebook's inline view) builds every tab up front instead: over
        # Jupyter comms, widgets created while a tab opens lose their first update.
        if not lazy:
            for index in range(len(TABS)):
                self.view(index)
        else:  # tables arrive after the first page (overview, runs): load their code with it
            pn.extension("tabulator")
        self.tabs = pn.Tabs(
            *zip(TABS, self._slots, strict=True), dynamic=lazy, sizing_mode="stretch_width"
        )
        self.tabs.param.watch(self._tab_changed, "active")
        header = pn.Row(
            html(
                f'<div class="nf-title">{escape(title)} '
                f"<small>{escape(self.source.url)}</small></div>",
                margin=(12, 10),
            ),
            pn.layout.HSpacer(),
            self.status,
            self.auto,
            self.refresh_button,
            sizing_mode="stretch_width",
        )
        self.layout = pn.Column(
            header,
            self.tabs,
            sizing_mode="stretch_width",
            css_classes=["nf-dashboard"],
        )
        overview = self.overview  # built while the read runs
        try:  # the first page arrives with data
            data = first_read.result()
        except Exception as exc:
            self._failed(exc)
        else:
            self._show(overview, data)
        if lazy:  # the task table and chart follow the first page (no server: at once)
            pn.state.onload(overview.build_rest)
        else:
            overview.build_rest()
        if refresh_seconds > 0:
            self._start_timer()

    # -- views -------------------------------------------------------------------------------

    def view(self, index: int) -> View:
        """The view of tab ``index``, built on first use."""
        view = self._views.get(index)
        if view is None:
            view = self._views[index] = self._factories[index]()
            self._slots[index].objects = [view.panel]
        return view

    @property
    def views(self) -> list[View]:
        """The views built so far, in tab order."""
        return [self._views[i] for i in sorted(self._views)]

    @property
    def active(self) -> View:
        return self.view(self.tabs.active)

    @property
    def overview(self) -> OverviewView:
        return cast(OverviewView, self.view(0))

    @property
    def runs(self) -> RunsView:
        return cast(RunsView, self.view(1))

    @property
    def timeline(self) -> TimelineView:
        return cast(TimelineView, self.view(2))

    @property
    def cache(self) -> CacheView:
        return cast(CacheView, self.view(3))

    @property
    def locks(self) -> LocksView:
        return cast(LocksView, self.view(4))

    @property
    def queue(self) -> QueueView:
        return cast(QueueView, self.view(5))

    # -- refresh -----------------------------------------------------------------------------

    def refresh(self, view: View | None = None) -> None:
        """Re-read ``view`` (default: the active tab) now, on this thread."""
        view = view or self.active
        try:
            data = view.load()
        except Exception as exc:
            self._failed(exc)
            return
        self._show(view, data)

    async def refresh_async(self) -> None:
        """Re-read the active tab with the SQL on a worker thread (the periodic callback).

        When the read waits for the metadata lock longer than ``busy_after`` seconds (kernels
        are writing), the status says so; the read carries on and the tab updates when it
        completes. Meanwhile later ticks are skipped rather than queued.
        """
        if self._refreshing:
            return
        self._refreshing = True
        view = self.active
        try:
            future = asyncio.get_running_loop().run_in_executor(None, view.load)
            done, _ = await asyncio.wait({future}, timeout=self.busy_after)
            if not done:
                self.problem = "busy"
                self._status()
            data = await future
        except Exception as exc:
            self._failed(exc)
            return
        finally:
            self._refreshing = False
        if view is self.active:
            self._show(view, data)

    def _show(self, view: View, data: Any) -> None:
        try:
            with hold():  # one message to the browser for all of the tab's changes
                view.render(data)
        except Exception as exc:  # a rendering bug must not stop the other tabs refreshing
            logger.exception("the dashboard's %s tab failed to render", view.title)
            self._failed(exc)
            return
        view.loaded_at = self.updated_at = time.time()
        self.problem = None
        self._status()

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, MetadataError) and "cannot be used" not in str(exc):
            # Contention: kernels are writing. Keep the last data and say we are waiting.
            self.problem = "busy"
            logger.debug("dashboard refresh waits for the metadata index: %s", exc)
        else:
            self.problem = f"{type(exc).__name__}: {exc}"
            logger.warning("dashboard refresh failed", exc_info=exc)
        self._status()

    def _status(self) -> None:
        when = (
            datetime.fromtimestamp(self.updated_at).strftime("%H:%M:%S")
            if self.updated_at
            else "never"
        )
        stamp = f"{self.updated_at:.3f}" if self.updated_at else ""
        text = f'<span id="nf-updated" data-updated="{stamp}">Updated {when}</span>'
        if self.problem == "busy":
            text += ' · <span class="nf-busy">waiting for the metadata index…</span>'
        elif self.problem:
            text += f' · <span class="nf-error">{escape(self.problem[:300])}</span>'
        self.status.object = text

    def _tab_changed(self, event: Any) -> None:
        view = self.view(event.new)
        if view.loaded_at is None or time.time() - view.loaded_at > 1.0:
            if self.defer is not None:
                self.defer(lambda: self.refresh(view))
            else:
                self.refresh(view)

    # -- timer -------------------------------------------------------------------------------

    def _start_timer(self) -> None:
        if self._callback is None and self.auto.value:
            # Panel runs a coroutine function as a coroutine (its stubs only say Callable).
            callback = cast(Any, self.refresh_async)
            self._callback = pn.state.add_periodic_callback(
                callback, period=int(self.refresh_seconds * 1000)
            )

    def stop(self) -> None:
        """Stop auto-refresh (the session's end stops it too)."""
        if self._callback is not None:
            self._callback.stop()
            self._callback = None

    def _auto_changed(self, event: Any) -> None:
        if event.new:
            self._start_timer()
        else:
            self.stop()


def _fill_future(future: concurrent.futures.Future[Any], fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to the waiting thread, which reports it
        future.set_exception(exc)


def build_dashboard(
    store: str | ResultStore | None = None,
    *,
    refresh_seconds: float = 5.0,
    page_size: int = 50,
    title: str = "notebook_flow",
) -> pn.Column:
    """A new dashboard for ``store`` (default: the configured store), as a Panel layout.

    Call it once per session (``pn.serve({"/": lambda: build_dashboard(url)})``); it reads
    the store's metadata index through the cross-process-safe path and refreshes the active
    tab every ``refresh_seconds`` (0: only on demand).
    """
    dashboard = Dashboard(store, refresh_seconds=refresh_seconds, page_size=page_size, title=title)
    layout = dashboard.layout
    cast(Any, layout).dashboard = dashboard  # reachable for tests and notebooks; one per layout
    return layout
