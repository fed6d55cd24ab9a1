"""The dashboard's tabs: overview, runs, timeline, cache, locks and queue.

Each view splits its work in two so the app can query off the event loop:
``load()`` runs SQL only (thread-safe, no Panel objects touched) and returns plain data;
``render(data)`` updates the view's widgets. ``refresh()`` does both, synchronously.
Interactions (a filter, a page, a confirmation) call the view's own short queries directly.

All text that comes from the index (task names, errors, tracebacks, inputs) is escaped
before it reaches an HTML pane: a traceback is data, never markup.
"""

from __future__ import annotations

# Panel's widget and layout constructors take **params and are untyped.
# mypy: disable-error-code="no-untyped-call"
import json
import logging
import math
import time
from collections.abc import Callable
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING, Any

import panel as pn  # noqa: TID253 - the dashboard package is imported only when used
from panel.io import hold  # noqa: TID253

from .queries import IN_FLIGHT, Overview, Page, RunFilters, Source

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CSS",
    "CacheView",
    "LocksView",
    "OverviewView",
    "QueueView",
    "RunsView",
    "TimelineView",
    "View",
    "html",
]

logger = logging.getLogger("notebook_flow")

STATE_COLORS = {
    "CACHED": "#2e9d4b",
    "COMPLETED": "#2f6db5",
    "FAILED": "#d13438",
    "CRASHED": "#8a1c1c",
    "RUNNING": "#f08c00",
    "RETRYING": "#c9a100",
    "PENDING": "#9aa0a6",
    "CANCELLED": "#6b6b6b",
}
STATES = list(STATE_COLORS)
ALL = "(all)"
#: The runs table reads this many pages ahead (and one behind) with each page, and flips
#: through them from memory for this many seconds (auto-refresh reads them again anyway).
READ_AHEAD = 4
READ_AHEAD_SECONDS = 10.0
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
"""


def html(text: str = "", **params: Any) -> Any:
    """An HTML pane with the dashboard's styles (each pane has its own shadow DOM)."""
    return pn.pane.HTML(text, stylesheets=[CSS], **params)


# -- formatting ----------------------------------------------------------------------------


def missing(value: Any) -> bool:
    """True for None, NaN and pandas' missing values (what an SQL NULL becomes)."""
    if value is None:
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
    """A duration for people: ``850 ms``, ``12.3 s``, ``4.5 min``, ``2.1 h``, ``3.0 d``."""
    if missing(s):
        return ""
    s = float(s)
    if s < 0.001:
        return f"{s * 1e6:.0f} µs"
    if s < 0.01:
        return f"{s * 1000:.1f} ms"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


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
        return ""
    delta = (time.time() if now is None else now) - float(ts)
    return f"{fmt_seconds(delta)} ago" if delta >= 0 else f"in {fmt_seconds(-delta)}"


def local_ms(ts: Any) -> float:
    """Epoch seconds as milliseconds of *local* wall time, for Bokeh datetime axes (UTC)."""
    t = float(ts)
    return (t + (time.localtime(t).tm_gmtoff or 0)) * 1000.0


def _table(**params: Any) -> Any:
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
    return pn.widgets.Tabulator(**defaults)


def _empty(
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


def _note(text: str, kind: str = "info") -> str:
    return f'<div class="nf-note nf-{kind}">{escape(text)}</div>'


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


# -- overview ------------------------------------------------------------------------------


TASK_COLUMNS = {
    "task": "Task", "calls": "Calls", "hits": "Hits", "misses": "Misses", "hit_pct": "Hit %",
    "failures": "Failures", "mean_ms": "Mean (ms)", "p95_ms": "p95 (ms)", "saved": "Saved",
    "last": "Last run",
}  # fmt: skip


class OverviewView(View):
    """KPIs, the per-task table and hits/misses over time."""

    title = "Overview"

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        from bokeh.models import ColumnDataSource, DataRange1d, HoverTool
        from bokeh.plotting import figure

        self.totals: dict[str, Any] = {}
        self.kpis = html("", sizing_mode="stretch_width")
        self.tasks = _table(
            value=self._no_tasks(),
            max_height=330,
            sortable=True,
            header_tooltips={
                "Misses": "calls of a cached task that did not hit (computed or failed)",
                "Mean (ms)": "mean duration of the runs that computed",
                "p95 (ms)": "95th percentile duration of the runs that computed",
                "Saved": "time the cache hits saved",
            },
        )
        self.chart_source = ColumnDataSource({"t": [], "hits": [], "misses": [], "failures": []})
        fig = figure(
            x_axis_type="datetime",
            height=260,
            sizing_mode="stretch_width",
            toolbar_location=None,
            title="Hits and misses over time",
            y_range=DataRange1d(start=0),
        )
        self.bars = fig.vbar_stack(
            ["hits", "misses", "failures"],
            x="t",
            width=60_000,
            source=self.chart_source,
            color=[STATE_COLORS["CACHED"], STATE_COLORS["COMPLETED"], STATE_COLORS["FAILED"]],
            legend_label=["hits", "misses", "failures"],
        )
        fig.legend.location = "top_left"
        fig.legend.orientation = "horizontal"
        fig.add_tools(
            HoverTool(
                tooltips=[("hits", "@hits"), ("misses", "@misses"), ("failures", "@failures")]
            )
        )
        self.figure = fig
        self.panel = pn.Column(
            self.kpis,
            html("<h3>Tasks</h3>", margin=(0, 10)),
            self.tasks,
            pn.pane.Bokeh(fig, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )

    @staticmethod
    def _no_tasks() -> pd.DataFrame:
        return _empty(
            list(TASK_COLUMNS.values()),
            ints=("Calls", "Hits", "Misses", "Failures"),
            floats=("Hit %", "Mean (ms)", "p95 (ms)"),
        )

    def load(self) -> Overview:
        return self.source.overview()

    def render(self, data: Overview) -> None:
        t = data.totals
        self.totals = t
        rate = "-" if t["hit_rate"] is None else f"{t['hit_rate'] * 100:.1f}%"
        cards = [
            ("runs", "Runs", f"{t['runs']:,}", f"{t['in_flight']:,} in flight"),
            ("hit-rate", "Hit rate", rate, f"{t['hits']:,} hits · {t['misses']:,} misses"),
            ("time-saved", "Time saved", fmt_seconds(t["time_saved"]) or "0 ms", "by cache hits"),
            ("failures", "Failures", f"{t['failures']:,}", "failed or crashed runs"),
            ("storage", "Storage used", fmt_bytes(t["bytes"]), f"{t['entries']:,} cached results"),
        ]
        self.kpis.object = (
            '<div class="nf-kpis">'
            + "".join(
                f'<div class="nf-kpi" id="kpi-{k}"><div class="nf-kpi-label">{label}</div>'
                f'<div class="nf-kpi-value">{escape(value)}</div>'
                f'<div class="nf-kpi-sub">{escape(sub)}</div></div>'
                for k, label, value, sub in cards
            )
            + "</div>"
        )
        tasks = data.tasks
        if tasks.empty:
            self.tasks.value = self._no_tasks()
        else:
            decided = tasks["hits"] + tasks["misses"]
            rate_col = (tasks["hits"] / decided.where(decided > 0) * 100).round(1)
            self.tasks.value = tasks.assign(
                hit_pct=rate_col,
                mean_ms=(tasks["mean_s"] * 1000).round(1),
                p95_ms=(tasks["p95_s"] * 1000).round(1),
                saved=[fmt_seconds(s) for s in tasks["saved_s"]],
                last=[fmt_time(x) for x in tasks["last_run"]],
            )[list(TASK_COLUMNS)].rename(columns=TASK_COLUMNS)
        b = data.buckets
        width_ms = data.width * 1000
        for renderer in self.bars:
            renderer.glyph.width = width_ms * 0.9
        self.chart_source.data = {
            "t": [local_ms(x) + width_ms / 2 for x in b["bucket"]],
            "hits": b["hits"].tolist(),
            "misses": b["misses"].tolist(),
            "failures": b["failures"].tolist(),
        }


# -- runs ----------------------------------------------------------------------------------


class RunsView(View):
    """Run history, filtered and paged in SQL, with a run's detail on selection."""

    title = "Runs"
    columns = [
        "Started",
        "Task",
        "State",
        "Duration",
        "Saved",
        "Attempt",
        "Worker",
        "Notebook",
        "Run",
    ]

    def __init__(self, source: Source, page_size: int = 50) -> None:
        super().__init__(source)
        self.page: Page | None = None
        self.run_ids: list[str] = []
        self._cache: tuple[tuple[Any, ...], Page, float] | None = None
        self.task = pn.widgets.Select(label="Task", options=[ALL], value=ALL, width=180)
        self.states = pn.widgets.MultiChoice(label="State", options=STATES, width=260)
        self.notebook = pn.widgets.Select(label="Notebook", options=[ALL], value=ALL, width=200)
        self.period = pn.widgets.Select(
            label="Time", options=list(PERIODS), value="any time", width=140
        )
        self.range = pn.widgets.DatetimeRangePicker(label="Or between", width=300)
        self.sort = pn.widgets.Select(
            label="Order", options=["newest", "oldest", "slowest"], width=110
        )
        for w in (self.task, self.states, self.notebook, self.period, self.range, self.sort):
            w.param.watch(self._filters_changed, "value")
        self.pager = Pager(self.load_page, page_size, "runs")
        self.table = _table(
            value=_empty(self.columns, ints=("Attempt",)),
            selectable=1,
            max_height=680,
        )
        self.table.param.watch(self._selected, "selection")
        self.detail = html(
            _note("Select a run to see its inputs, attempts, traceback and why it missed."),
            sizing_mode="stretch_width",
        )
        self.panel = pn.Column(
            pn.Row(self.task, self.states, self.notebook, self.period, self.range, self.sort),
            self.pager.panel,
            self.table,
            self.detail,
            sizing_mode="stretch_width",
        )

    def filters(self) -> RunFilters:
        since = until = None
        if self.range.value:
            start, end = self.range.value
            since, until = _timestamp(start), _timestamp(end)
        else:
            window = PERIODS.get(self.period.value)
            since = time.time() - window if window else None
        return RunFilters(
            task=None if self.task.value == ALL else self.task.value,
            states=tuple(self.states.value),
            notebook=None if self.notebook.value == ALL else self.notebook.value,
            since=since,
            until=until,
        )

    def _key(self) -> tuple[Any, ...]:
        """What the rows read ahead depend on (not the page: flipping keeps them)."""
        return (
            self.task.value,
            tuple(self.states.value),
            self.notebook.value,
            self.period.value,
            self.range.value,
            self.sort.value,
            self.pager.page_size,
        )

    def _read(self) -> tuple[tuple[Any, ...], Page, float]:
        key = self._key()
        page = self.source.runs_page(
            self.filters(),
            page=self.pager.page,
            page_size=self.pager.page_size,
            sort=self.sort.value,
            ahead=READ_AHEAD,
            behind=1,
        )
        return key, page, time.monotonic()

    def load(self) -> dict[str, Any]:
        return {"choices": self.source.run_choices(), "read": self._read()}

    def render(self, data: dict[str, Any]) -> None:
        choices = data["choices"]
        with hold():
            self.task.options = [ALL, *choices["task"]]
            self.notebook.options = [ALL, *choices["notebook"]]
            self._cache = data["read"]
            self.show_page(self._cache[1])

    def load_page(self) -> None:
        """Show the pager's current page (after a filter, page or size change).

        A page among those read ahead in the last few seconds comes from memory; any other
        is one read of the index (with the pages around it).
        """
        if self._cache is not None:
            key, window, at = self._cache
            if key == self._key() and time.monotonic() - at < READ_AHEAD_SECONDS:
                page = window.page_of(self.pager.page)
                if page is not None:
                    self.show_page(page)
                    return
        self._cache = self._read()
        self.show_page(self._cache[1])

    def show_page(self, page: Page) -> None:
        with hold():
            self._show_page(page)

    def _show_page(self, page: Page) -> None:
        self.page = page
        self.pager.show(page)
        df = page.rows
        selected = (
            self.run_ids[self.table.selection[0]] if self.table.selection and self.run_ids else None
        )
        self.run_ids = [str(r) for r in df["run_id"]]
        worker = [
            k if isinstance(k, str) and k else f"{h}:{p}"
            for k, h, p in zip(df["kernel"], df["host"], df["pid"], strict=True)
        ]
        self.table.value = _frame(
            {
                "Started": [fmt_time(x) for x in df["created"]],
                "Task": df["task"].tolist(),
                "State": df["state"].tolist(),
                "Duration": [fmt_seconds(x) for x in df["duration"]],
                "Saved": [fmt_seconds(x) for x in df["saved"]],
                "Attempt": df["attempt"].tolist(),
                "Worker": worker,
                "Notebook": [_short_path(n) for n in df["notebook"]],
                "Run": self.run_ids,
            },
            self.columns,
        )
        # Keep the selection on the same run if it is still on this page.
        self.table.selection = [self.run_ids.index(selected)] if selected in self.run_ids else []

    def _filters_changed(self, _: object) -> None:
        self.pager.page = 0
        self.load_page()

    def _selected(self, event: Any) -> None:
        if not event.new or not self.run_ids:
            return
        run_id = self.run_ids[event.new[0]]
        record, events = self.source.run_detail(run_id)
        self.detail.object = run_detail_html(record, events)


def _timestamp(value: Any) -> float:
    """A picker's date or datetime (local time) as epoch seconds."""
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    return float(value.timestamp())


def run_detail_html(record: dict[str, Any] | None, events: pd.DataFrame) -> str:
    """A run's detail: identity, timings, why it missed, inputs, attempts, traceback."""
    if record is None:
        return _note("This run is no longer in the index.", "warning")
    e = escape
    rows = [
        ("Run", record["run_id"]),
        ("Task", record["task"]),
        ("State", record["state"]),
        ("Cache key", record.get("key") or "(uncached)"),
        ("Created", fmt_time(record.get("created"))),
        ("Started", fmt_time(record.get("started"))),
        ("Ended", fmt_time(record.get("ended"))),
        ("Duration", fmt_seconds(record.get("duration"))),
        ("Time saved", fmt_seconds(record.get("saved"))),
        ("Attempts", record.get("attempt")),
        (
            "Worker",
            f"{record.get('kernel') or ''} {record.get('host')}:{record.get('pid')}".strip(),
        ),
        ("Notebook", record.get("notebook") or ""),
        ("Cell", record.get("cell") or ""),
    ]
    html = ['<div class="nf-detail" id="run-detail"><h3>Run detail</h3><table>']
    html += [
        f"<tr><th>{e(k)}</th><td>{e(str(v if v is not None else ''))}</td></tr>" for k, v in rows
    ]
    html.append("</table>")
    if record.get("explain"):
        html.append(f"<h4>Why it missed</h4><p>{e(str(record['explain']))}</p>")
    inputs = record.get("inputs")
    if inputs:
        try:
            pretty = "\n".join(f"{k} = {v}" for k, v in json.loads(inputs).items())
        except (ValueError, AttributeError):
            pretty = str(inputs)
        html.append(f"<h4>Inputs</h4><pre>{e(pretty)}</pre>")
    if not events.empty:
        html.append(
            "<h4>Transitions</h4><table><tr><th>When</th><th>State</th><th>Attempt</th>"
            "<th>Duration</th><th>Error</th></tr>"
        )
        for when, state, attempt, duration, error in events[
            ["time", "state", "attempt", "duration", "error"]
        ].itertuples(index=False):
            html.append(
                f"<tr><td>{fmt_time(when)}</td><td>{e(str(state))}</td><td>{e(str(attempt))}</td>"
                f"<td>{fmt_seconds(duration)}</td><td>{e(str(error or ''))}</td></tr>"
            )
        html.append("</table>")
    if record.get("error"):
        html.append(f"<h4>Error</h4><pre>{e(str(record['error']))}</pre>")
    if record.get("traceback"):
        html.append(f"<h4>Traceback</h4><pre>{e(str(record['traceback']))}</pre>")
    html.append("</div>")
    return "".join(html)


def _short_path(path: Any) -> str:
    if not isinstance(path, str):
        return ""
    return path if len(path) <= 40 else "…" + path[-39:]


def _frame(data: dict[str, list[Any]], columns: list[str]) -> pd.DataFrame:
    import pandas as pd

    frame: pd.DataFrame = pd.DataFrame(data, columns=columns)
    return frame


# -- timeline ------------------------------------------------------------------------------


BAR_FIELDS = ("lane", "start", "end", "task", "state", "color", "duration", "run")


class TimelineView(View):
    """A Gantt-like chart: one lane per kernel or process, one bar per run."""

    title = "Timeline"

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        from bokeh.models import ColumnDataSource, FactorRange, HoverTool
        from bokeh.plotting import figure

        self.window = pn.widgets.Select(
            label="Window",
            options=[p for p in PERIODS if p != "last 30 days"],
            value="last 24 hours",
            width=160,
        )
        self.window.param.watch(lambda _: self.refresh(), "value")
        self.lanes: list[str] = []
        self.count = 0
        self.bars = ColumnDataSource({k: [] for k in BAR_FIELDS})
        self.y_range = FactorRange(factors=[])
        fig = figure(
            x_axis_type="datetime",
            y_range=self.y_range,
            height=440,
            sizing_mode="stretch_width",
            title="Runs per kernel / worker",
            tools="xpan,xwheel_zoom,reset",
            active_scroll="xwheel_zoom",
        )
        fig.hbar(y="lane", left="start", right="end", height=0.7, color="color", source=self.bars)
        fig.add_tools(
            HoverTool(
                tooltips=[
                    ("task", "@task"),
                    ("state", "@state"),
                    ("duration", "@duration"),
                    ("worker", "@lane"),
                    ("run", "@run"),
                ]
            )
        )
        self.figure = fig
        self.caption = html("", margin=(0, 10))
        legend = " ".join(
            f'<span class="nf-chip" style="background:{c}">{s.lower()}</span>'
            for s, c in STATE_COLORS.items()
        )
        self.panel = pn.Column(
            pn.Row(self.window, html(legend, margin=(28, 10))),
            pn.pane.Bokeh(fig, sizing_mode="stretch_width"),
            self.caption,
            sizing_mode="stretch_width",
        )

    def load(self) -> pd.DataFrame:
        window = PERIODS.get(self.window.value)
        return self.source.timeline(time.time() - window if window else None)

    def render(self, df: pd.DataFrame) -> None:
        self.count = len(df)
        if df.empty:
            self.lanes = []
            self.y_range.factors = []
            self.bars.data = {k: [] for k in BAR_FIELDS}
            self.caption.object = _note("No runs in this window.")
            return
        starts = [local_ms(s) for s in df["start"]]
        ends = [local_ms(e) for e in df["end_"]]
        span = (max(ends) - min(starts)) or 1000.0
        floor = span / 600  # a cache hit lasts ~1 ms: draw it at least one pixel-ish wide
        self.lanes = sorted({str(x) for x in df["lane"]})
        self.y_range.factors = self.lanes
        self.bars.data = {
            "lane": [str(x) for x in df["lane"]],
            "start": starts,
            "end": [max(e, s + floor) for s, e in zip(starts, ends, strict=True)],
            "task": df["task"].tolist(),
            "state": df["state"].tolist(),
            "color": [STATE_COLORS.get(str(s), "#999") for s in df["state"]],
            "duration": [fmt_seconds(d) for d in df["duration"]],
            "run": [str(r) for r in df["run_id"]],
        }
        self.figure.height = max(240, min(900, 90 + 34 * len(self.lanes)))
        self.caption.object = _note(
            f"{len(df):,} runs on {len(self.lanes)} kernel(s)/worker(s)"
            + (" (the most recent ones)" if len(df) >= 3000 else "")
        )


# -- cache ---------------------------------------------------------------------------------


class CacheView(View):
    """Stored results with size, age and expiry; invalidate one entry or a whole task."""

    title = "Cache"
    columns = ["Task", "Key", "Size", "Created", "Age", "Expires", "Compute time", "Format"]

    def __init__(self, source: Source, page_size: int = 50) -> None:
        super().__init__(source)
        self.page: Page | None = None
        self.keys: list[str] = []
        self.task = pn.widgets.Select(label="Task", options=[ALL], value=ALL, width=200)
        self.task.param.watch(self._task_changed, "value")
        self.pager = Pager(self.load_page, page_size, "entries")
        self.table = _table(value=_empty(self.columns), selectable=1, max_height=600)
        self.table.param.watch(self._selection_changed, "selection")
        self.delete_entry = pn.widgets.Button(
            label="Invalidate entry", color="warning", disabled=True
        )
        self.delete_task = pn.widgets.Button(
            label="Invalidate task", color="warning", disabled=True
        )
        self.delete_entry.on_click(self._ask_entry)
        self.delete_task.on_click(self._ask_task)
        self.confirm = Confirm()
        self.message = html("", sizing_mode="stretch_width")
        self.panel = pn.Column(
            pn.Row(
                self.task,
                pn.Column(pn.Spacer(height=18), pn.Row(self.delete_entry, self.delete_task)),
            ),
            self.confirm.panel,
            self.message,
            self.pager.panel,
            self.table,
            sizing_mode="stretch_width",
        )

    def load(self) -> dict[str, Any]:
        task = None if self.task.value == ALL else self.task.value
        return {
            "tasks": self.source.cache_tasks(),
            "page": self.source.cache_page(
                task, page=self.pager.page, page_size=self.pager.page_size
            ),
        }

    def render(self, data: dict[str, Any]) -> None:
        self.task.options = [ALL, *data["tasks"]]
        self.show_page(data["page"])

    def load_page(self) -> None:
        task = None if self.task.value == ALL else self.task.value
        with hold():
            self.show_page(
                self.source.cache_page(task, page=self.pager.page, page_size=self.pager.page_size)
            )

    def show_page(self, page: Page) -> None:
        self.page = page
        self.pager.show(page)
        df = page.rows
        selected = self.selected_key()
        self.keys = [str(k) for k in df["key"]]
        now = time.time()
        self.table.value = _frame(
            {
                "Task": df["task"].tolist(),
                "Key": self.keys,
                "Size": [fmt_bytes(s) for s in df["size"]],
                "Created": [fmt_time(c) for c in df["created_at"]],
                "Age": [fmt_seconds(now - c) for c in df["created_at"]],
                "Expires": [
                    "never" if missing(x) else ("expired" if x <= now else fmt_age(x, now))
                    for x in df["expires_at"]
                ],
                "Compute time": [fmt_seconds(d) for d in df["duration"]],
                "Format": df["serializer"].tolist(),
            },
            self.columns,
        )
        self.table.selection = [self.keys.index(selected)] if selected in self.keys else []
        self.delete_task.disabled = self.task.value == ALL

    def selected_key(self) -> str | None:
        sel = self.table.selection
        return self.keys[sel[0]] if sel and sel[0] < len(self.keys) else None

    def _task_changed(self, _: object) -> None:
        self.pager.page = 0
        self.confirm.cancel()
        self.load_page()

    def _selection_changed(self, _: object) -> None:
        self.delete_entry.disabled = self.selected_key() is None

    def _ask_entry(self, _: object) -> None:
        key = self.selected_key()
        if key is None:
            return
        self.confirm.ask(
            f"Delete the cached result {key}? The next call recomputes it.",
            lambda: self._invalidate([key]),
        )

    def _ask_task(self, _: object) -> None:
        task = self.task.value
        if task == ALL:
            return
        self.confirm.ask(
            f"Delete every cached result of task {task!r}? Its next calls recompute.",
            lambda: self._invalidate_task(task),
        )

    def _invalidate(self, keys: list[str]) -> None:
        n = self.source.invalidate(keys)
        self.message.object = _note(f"Invalidated {n} cached result(s).", "success")
        self.refresh()

    def _invalidate_task(self, task: str) -> None:
        n = self.source.invalidate_task(task)
        self.message.object = _note(f"Invalidated {n} cached result(s) of {task}.", "success")
        self.task.value = ALL
        self.refresh()


# -- locks ---------------------------------------------------------------------------------


class LocksView(View):
    """Locks held now (holder, age, lease), recent waits, and breaking a stale lock."""

    title = "Locks"
    columns = ["Key", "Task", "Holder", "Held for", "Lease", "Manager"]

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.rows: list[tuple[str, str | None]] = []  # (key, manager)
        self.table = _table(value=_empty(self.columns), selectable=1, max_height=300)
        self.table.param.watch(self._selection_changed, "selection")
        self.waits = _table(
            value=_empty(["When", "Key", "Task", "Waited", "Holder"]), max_height=300
        )
        self.break_button = pn.widgets.Button(label="Break lock", color="danger", disabled=True)
        self.break_button.on_click(self._ask)
        self.confirm = Confirm()
        self.message = html("", sizing_mode="stretch_width")
        self.held_note = html("", sizing_mode="stretch_width")
        self.waits_note = html("", sizing_mode="stretch_width")
        self.panel = pn.Column(
            html("<h3>Held now</h3>", margin=(0, 10)),
            self.held_note,
            self.table,
            pn.Row(self.break_button),
            self.confirm.panel,
            self.message,
            html("<h3>Recent waits</h3>", margin=(0, 10)),
            self.waits_note,
            self.waits,
            sizing_mode="stretch_width",
        )

    def load(self) -> dict[str, Any]:
        return {"locks": self.source.locks(), "waits": self.source.lock_waits()}

    def render(self, data: dict[str, Any]) -> None:
        from notebook_flow.locks.base import LockInfo, describe_holder

        now = time.time()
        locks = data["locks"]
        selected = self.rows[self.table.selection[0]][0] if self.table.selection else None
        self.rows = [
            (str(k), m if isinstance(m, str) else None)
            for k, m in zip(locks["key"], locks["manager"], strict=True)
        ]
        holders = []
        for key, holder, acquired, lease, manager in locks[
            ["key", "holder", "acquired", "lease_expires", "manager"]
        ].itertuples(index=False):
            info = LockInfo(
                str(key), str(holder), float(acquired or now), float(lease or now), str(manager), 0
            )
            holders.append(describe_holder(info, now).split(", since")[0])
        self.table.value = _frame(
            {
                "Key": [k for k, _ in self.rows],
                "Task": [t if isinstance(t, str) else "" for t in locks["task"]],
                "Holder": holders,
                "Held for": [fmt_seconds(now - a) for a in locks["acquired"]],
                "Lease": [_lease(x, now) for x in locks["lease_expires"]],
                "Manager": [m or "" for _, m in self.rows],
            },
            self.columns,
        )
        keys = [k for k, _ in self.rows]
        self.table.selection = [keys.index(selected)] if selected in keys else []
        self.held_note.object = "" if self.rows else _note("No lock is held right now.")
        waits = data["waits"]
        self.waits_note.object = "" if len(waits) else _note("No run has waited for a lock yet.")
        self.waits.value = _frame(
            {
                "When": [fmt_time(t) for t in waits["time"]],
                "Key": [str(k) for k in waits["key"]],
                "Task": [t if isinstance(t, str) else "" for t in waits["task"]],
                "Waited": [fmt_seconds(w) for w in waits["waited"]],
                "Holder": [str(h) for h in waits["holder"]],
            },
            ["When", "Key", "Task", "Waited", "Holder"],
        )

    def _selection_changed(self, _: object) -> None:
        self.break_button.disabled = not self.table.selection

    def _ask(self, _: object) -> None:
        if not self.table.selection:
            return
        key, manager = self.rows[self.table.selection[0]]
        self.confirm.ask(
            f"Break the lock on {key}? If its holder is still running, another run may compute "
            "the same key at the same time.",
            lambda: self._break(key, manager),
        )

    def _break(self, key: str, manager: str | None) -> None:
        try:
            text = self.source.break_lock(key, manager)
        except Exception as exc:  # a lock backend that is down must not kill the dashboard
            logger.warning("breaking lock %s failed", key, exc_info=True)
            text = f"Could not break the lock on {key}: {exc}"
        self.message.object = _note(text, "success" if text.startswith("Broke") else "warning")
        self.refresh()


def _lease(expires: Any, now: float) -> str:
    if missing(expires):
        return ""
    if float(expires) > now:
        return f"expires {fmt_age(expires, now)}"
    return f"expired {fmt_age(expires, now)} (stale)"


# -- queue ---------------------------------------------------------------------------------


class QueueView(View):
    """Runs in flight (pending, running, retrying), per kernel/process."""

    title = "Queue"

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.in_flight = 0
        self.workers = _table(
            value=_empty(
                ["Worker", "Pending", "Running", "Retrying", "Oldest", "Last seen"],
                ints=("Pending", "Running", "Retrying"),
            ),
            max_height=240,
        )
        self.runs = _table(
            value=_empty(["Task", "State", "Since", "Attempt", "Worker", "Run"], ints=("Attempt",)),
            max_height=400,
        )
        self.summary = html("", margin=(0, 10))
        self.panel = pn.Column(
            self.summary,
            html("<h3>Per kernel / worker</h3>", margin=(0, 10)),
            self.workers,
            html("<h3>Runs in flight</h3>", margin=(0, 10)),
            self.runs,
            sizing_mode="stretch_width",
        )

    def load(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.source.queue()

    def render(self, data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
        per_worker, runs = data
        now = time.time()
        self.in_flight = len(runs)
        self.summary.object = (
            f'<span id="queue-count" data-count="{len(runs)}">{len(runs):,} run(s) in flight '
            f"({', '.join(IN_FLIGHT).lower()}) on {len(per_worker)} kernel(s)/worker(s)</span>"
        )
        self.workers.value = _frame(
            {
                "Worker": [str(w) for w in per_worker["worker"]],
                "Pending": per_worker["pending"].tolist(),
                "Running": per_worker["running"].tolist(),
                "Retrying": per_worker["retrying"].tolist(),
                "Oldest": [fmt_age(t, now) for t in per_worker["oldest"]],
                "Last seen": [fmt_age(t, now) for t in per_worker["last_seen"]],
            },
            ["Worker", "Pending", "Running", "Retrying", "Oldest", "Last seen"],
        )
        self.runs.value = _frame(
            {
                "Task": runs["task"].tolist(),
                "State": runs["state"].tolist(),
                "Since": [
                    fmt_age(c if missing(s) else s, now)
                    for s, c in zip(runs["started"], runs["created"], strict=True)
                ],
                "Attempt": runs["attempt"].tolist(),
                "Worker": [str(w) for w in runs["worker"]],
                "Run": [str(r) for r in runs["run_id"]],
            },
            ["Task", "State", "Since", "Attempt", "Worker", "Run"],
        )
