"""Building blocks of the dashboard's tabs: styles, formatting, tables, pager, confirmation.

All text that comes from the index (task names, errors, tracebacks, inputs) is escaped
before it reaches an HTML pane: a traceback is data, never markup.
"""

from __future__ import annotations

# Panel's widget and layout constructors take **params and are untyped.
# mypy: disable-error-code="no-untyped-call"
import math
import time
from collections.abc import Callable
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING, Any

import panel as pn  # noqa: TID253 - the dashboard package is imported only when used

from notebook_flow.figures import DASH, format_duration, format_saved
from notebook_flow.figures import STATE_COLORS as _STATE_COLORS

from .queries import Page, Source

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ALL",
    "CSS",
    "HTML_CELL",
    "PERIODS",
    "STATES",
    "STATE_COLORS",
    "Confirm",
    "Pager",
    "View",
    "button",
    "chip",
    "empty",
    "empty_frame",
    "fmt_age",
    "fmt_bytes",
    "fmt_saved",
    "fmt_seconds",
    "fmt_time",
    "frame",
    "html",
    "local_ms",
    "missing",
    "note",
    "relative_path",
    "short_path",
    "table",
]

STATE_COLORS = _STATE_COLORS
STATES = list(STATE_COLORS)
ALL = "(all)"
PERIODS: dict[str, float | None] = {
    "any time": None,
    "last 15 minutes": 900,
    "last hour": 3600,
    "last 24 hours": 86400,
    "last 7 days": 7 * 86400,
    "last 30 days": 30 * 86400,
}

CSS = """
.nf-title { font-size: 20px; font-weight: 600; }
.nf-title small { font-weight: 400; color: #666; font-size: 13px; margin-left: 8px; }
.nf-status { color: #555; font-size: 13px; }
.nf-status .nf-busy { color: #a26b00; }
.nf-status .nf-error { color: #b00020; }
.nf-kpis { display: flex; flex-wrap: wrap; gap: 12px; margin: 4px 0 8px 0; }
.nf-kpi { flex: 1 1 150px; border: 1px solid #dde3ea; border-radius: 8px; padding: 10px 14px;
          background: #f8fafc; }
.nf-kpi-label { color: #556; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.nf-kpi-value { font-size: 26px; font-weight: 600; color: #1d2b3a; margin: 2px 0; }
.nf-kpi-sub { color: #778; font-size: 12px; }
.nf-note { padding: 6px 10px; border-radius: 6px; background: #eef3f8; color: #334; }
.nf-success { background: #e8f5ec; color: #1b5e20; }
.nf-warning { background: #fff4e0; color: #7a4b00; }
.nf-detail table { border-collapse: collapse; font-size: 13px; }
.nf-detail th { text-align: left; padding: 2px 12px 2px 0; color: #556; font-weight: 500; }
.nf-detail td { padding: 2px 12px 2px 0; }
.nf-detail pre { background: #f5f5f5; padding: 8px; max-height: 320px; overflow: auto;
                 font-size: 12px; white-space: pre-wrap; }
.nf-chip { display: inline-block; color: white; border-radius: 4px; padding: 1px 6px;
           font-size: 11px; margin-right: 3px; }
.nf-pager { color: #444; font-size: 13px; }
.nf-hint { color: #667; font-size: 12px; }
.nf-empty { padding: 18px 12px; color: #556; background: #f6f8fa; border: 1px dashed #cfd6de;
            border-radius: 8px; text-align: center; }
"""

#: Disabled buttons that look disabled (Bokeh's default barely dims them).
BUTTON_CSS = """
.bk-btn:disabled, .bk-btn[disabled] { opacity: 0.45; cursor: not-allowed; filter: grayscale(0.8); }
"""


def html(text: str = "", **params: Any) -> Any:
    """An HTML pane with the dashboard's styles (each pane has its own shadow DOM)."""
    return pn.pane.HTML(text, stylesheets=[CSS], **params)


# -- formatting ----------------------------------------------------------------------------


def missing(value: Any) -> bool:
    """True for None, NaN and pandas' missing values (what an SQL NULL becomes)."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def fmt_time(ts: Any) -> str:
    """Epoch seconds as local ``YYYY-MM-DD HH:MM:SS`` ('' for none)."""
    if missing(ts):
        return ""
    return datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


def fmt_seconds(s: Any) -> str:
    """A duration as every view shows it (``figures.format_duration``; a dash for none)."""
    return format_duration(s)


def fmt_saved(s: Any, hits: Any = None) -> str:
    """Time saved; a dash for a task that never hit (``figures.format_saved``)."""
    return format_saved(s, None if missing(hits) else int(hits))


def chip(state: Any) -> str:
    """A run state as a coloured chip (HTML with inline styles: tables have their own
    shadow DOM, so the dashboard's stylesheet does not reach them)."""
    name = str(state) if isinstance(state, str) else ""
    color = STATE_COLORS.get(name, "#8a9096")
    return (
        f'<span class="nf-chip nf-state-{escape(name.lower())}" data-state="{escape(name)}" '
        f'style="background:{color};color:#fff;border-radius:9px;padding:1px 8px;'
        f'font-size:11px;font-weight:600;letter-spacing:.02em">{escape(name.lower())}</span>'
    )


#: Tabulator formatters: columns whose cells are HTML we built (escaped) — state chips.
HTML_CELL = {"type": "html"}


def fmt_bytes(n: Any) -> str:
    if missing(n):
        return ""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_age(ts: Any, now: float | None = None) -> str:
    """``3.2 min ago`` / ``in 5.0 s`` relative to now."""
    if missing(ts):
        return DASH
    delta = (time.time() if now is None else now) - float(ts)
    return f"{fmt_seconds(delta)} ago" if delta >= 0 else f"in {fmt_seconds(-delta)}"


def local_ms(ts: Any) -> float:
    """Epoch seconds as milliseconds of *local* wall time, for Bokeh datetime axes (UTC)."""
    t = float(ts)
    return (t + (time.localtime(t).tm_gmtoff or 0)) * 1000.0


class _ReadOnlyTable(pn.widgets.Tabulator):  # type: ignore[misc]
    """A Tabulator that never takes rows back from the browser.

    Every table here is read-only, so rows the browser sends are only an echo of what we
    sent — and, over Jupyter comms, an echo of a page already replaced (7 rows after the
    table went to 6), which Panel cannot fit and reports as a traceback in the notebook.
    """

    def _process_data(self, data: Any) -> None:
        return None


def table(**params: Any) -> Any:
    """A read-only Tabulator; sorting happens in SQL, so header clicks do not sort a page."""
    defaults: dict[str, Any] = dict(
        disabled=True,
        show_index=False,
        sortable=False,
        sizing_mode="stretch_width",
        layout="fit_data_stretch",
        theme="simple",
    )
    defaults.update(params)
    return _ReadOnlyTable(**defaults)


def empty_frame(
    columns: list[str], ints: tuple[str, ...] = (), floats: tuple[str, ...] = ()
) -> pd.DataFrame:
    """An empty frame with the column types the filled table will have.

    Tabulator picks each column's formatter from the first frame it is given, so an
    empty float column would show later strings as NaN.
    """
    import pandas as pd

    frame: pd.DataFrame = pd.DataFrame(
        {
            c: pd.Series([], dtype="int64" if c in ints else "float64" if c in floats else object)
            for c in columns
        }
    )
    return frame


def note(text: str, kind: str = "info") -> str:
    return f'<div class="nf-note nf-{kind}">{escape(text)}</div>'


def empty(text: str, name: str = "") -> str:
    """An empty state: what would be here and how it gets there."""
    ident = f' id="empty-{escape(name)}"' if name else ""
    return f'<div class="nf-empty"{ident}>{escape(text)}</div>'


def button(label: str, **params: Any) -> Any:
    """A button whose disabled state is visible, with a tooltip (``description``)."""
    return pn.widgets.Button(label=label, stylesheets=[BUTTON_CSS], **params)


def short_path(path: Any) -> str:
    if not isinstance(path, str):
        return ""
    return path if len(path) <= 40 else "…" + path[-39:]


def relative_path(path: Any, base: str | None) -> str:
    """``path`` relative to ``base`` (the project folder) when it lies under it, else the
    last two parts; the full path stays in the run's detail."""
    import os

    if not isinstance(path, str) or not path:
        return ""
    if base:
        try:
            rel = os.path.relpath(path, base)
        except ValueError:  # another drive
            rel = ""
        if rel and not rel.startswith(".."):
            return rel
    parts = path.replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def frame(data: dict[str, list[Any]], columns: list[str]) -> pd.DataFrame:
    import pandas as pd

    frame: pd.DataFrame = pd.DataFrame(data, columns=columns)
    return frame


# -- base ----------------------------------------------------------------------------------


class View:
    """One tab: ``panel`` is what it shows; ``load``/``render`` refresh it."""

    title = ""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.loaded_at: float | None = None
        self.panel: Any = pn.Column(sizing_mode="stretch_width")

    def load(self) -> Any:
        raise NotImplementedError

    def render(self, data: Any) -> None:
        raise NotImplementedError

    def refresh(self) -> None:
        self.render(self.load())
        self.loaded_at = time.time()


class Pager:
    """First/previous/next/last buttons and "rows a-b of N" for a table paged in SQL."""

    def __init__(self, on_change: Callable[[], None], page_size: int, noun: str) -> None:
        self.on_change = on_change
        self.noun = noun
        self.page = 0
        self.pages = 1
        self.total = 0
        self.first = pn.widgets.Button(label="«", width=40, disabled=True)
        self.prev = pn.widgets.Button(label="Prev", width=80, disabled=True)
        self.next = pn.widgets.Button(label="Next", width=80, disabled=True)
        self.last = pn.widgets.Button(label="»", width=40, disabled=True)
        sizes = sorted({25, 50, 100, 200, page_size})
        self.size = pn.widgets.Select(label="", options=sizes, value=page_size, width=80)
        self.label = html("", margin=(12, 10))
        self.first.on_click(lambda _: self.go(0))
        self.prev.on_click(lambda _: self.go(self.page - 1))
        self.next.on_click(lambda _: self.go(self.page + 1))
        self.last.on_click(lambda _: self.go(self.pages - 1))
        self.size.param.watch(lambda _: self.go(0), "value")
        self.panel = pn.Row(self.first, self.prev, self.label, self.next, self.last, self.size)

    @property
    def page_size(self) -> int:
        return int(self.size.value)

    def go(self, page: int) -> None:
        self.page = max(0, min(page, self.pages - 1))
        self.on_change()

    def show(self, page: Page) -> None:
        self.page, self.pages, self.total = page.page, page.pages, page.total
        start = page.page * page.page_size + 1 if page.total else 0
        end = min(page.total, (page.page + 1) * page.page_size)
        self.label.object = (
            f'<span class="nf-pager" data-total="{page.total}" data-page="{page.page + 1}">'
            f"{start:,}-{end:,} of {page.total:,} {self.noun} · page {page.page + 1:,} of "
            f"{page.pages:,}</span>"
        )
        self.first.disabled = self.prev.disabled = page.page <= 0
        self.next.disabled = self.last.disabled = page.page >= page.pages - 1


class Confirm:
    """An inline "are you sure?" bar: ``ask(text, action)`` shows it; Confirm runs ``action``."""

    def __init__(self) -> None:
        self.message = html("", margin=(8, 10))
        self.yes = pn.widgets.Button(label="Confirm", color="danger", width=100)
        self.no = pn.widgets.Button(label="Cancel", width=90)
        self.panel = pn.Row(
            self.message, self.yes, self.no, visible=False, css_classes=["nf-confirm"]
        )
        self._action: Callable[[], None] | None = None
        self.yes.on_click(self._confirm)
        self.no.on_click(lambda _: self.cancel())

    def ask(self, text: str, action: Callable[[], None]) -> None:
        self.message.object = f"<b>{escape(text)}</b>"
        self._action = action
        self.panel.visible = True

    def cancel(self) -> None:
        self._action = None
        self.panel.visible = False

    def _confirm(self, _: object = None) -> None:
        action, self._action = self._action, None
        self.panel.visible = False
        if action is not None:
            action()
