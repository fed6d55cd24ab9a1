"""The dashboard's read-only tabs: overview, timeline and queue (runs: ``runs_view``).

Each view splits its work in two so the app can query off the event loop:
``load()`` runs SQL only (thread-safe, no Panel objects touched) and returns plain data;
``render(data)`` updates the view's widgets. ``refresh()`` does both, synchronously.
Interactions (a filter, a page) call the view's own short queries directly. The tabs that
change the store (cache, locks) are in ``admin.py``.
"""

from __future__ import annotations

# Panel's widget and layout constructors take **params and are untyped.
# mypy: disable-error-code="no-untyped-call"
import time
from html import escape
from typing import TYPE_CHECKING, Any, cast

import panel as pn  # noqa: TID253 - the dashboard package is imported only when used

from .queries import IN_FLIGHT, LANES, Overview, Source
from .widgets import (
    HTML_CELL,
    PERIODS,
    STATE_COLORS,
    View,
    chip,
    empty,
    empty_frame,
    fmt_age,
    fmt_bytes,
    fmt_saved,
    fmt_seconds,
    fmt_time,
    frame,
    html,
    local_ms,
    missing,
    note,
    relative_path,
    table,
)

if TYPE_CHECKING:
    import pandas as pd
from .runs_view import READ_AHEAD, READ_AHEAD_SECONDS, RunsView, run_detail_html, worker

__all__ = [
    "READ_AHEAD",
    "READ_AHEAD_SECONDS",
    "OverviewView",
    "QueueView",
    "RunsView",
    "TimelineView",
    "run_detail_html",
    "worker",
]

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
        from bokeh.models import ColumnDataSource

        self.totals: dict[str, Any] = {}
        self.kpis = html("", sizing_mode="stretch_width")
        self.tasks = table(
            value=self._no_tasks(),
            max_height=330,
            sortable=True,
            header_tooltips={
                "Misses": "calls of a cached task that did not hit (computed or failed)",
                "Mean (ms)": "mean duration of the runs that computed",
                "p95 (ms)": "95th percentile duration of the runs that computed",
                "Saved": "time the cache hits saved (a dash: never hit)",
            },
        )
        self.chart_source = ColumnDataSource({"t": [], "hits": [], "misses": [], "failures": []})
        self.figure: Any = None  # the chart, made by build_chart()
        self.bars: list[Any] = []
        self._width_ms = 60_000.0
        #: The task table and the chart, once ``build_rest`` has run (a note until then).
        self.rest = pn.Column(
            html(note("Drawing the task table and chart…"), margin=(10, 10)),
            sizing_mode="stretch_width",
        )
        self.panel = pn.Column(self.kpis, self.rest, sizing_mode="stretch_width")

    def build_rest(self) -> None:
        """Show the task table and make the "hits and misses over time" chart (once). A
        served dashboard calls it once the first page has shown: the KPIs come first, as
        the table's and the figure's Bokeh models cost more to build and send than the rest
        of the page (their data is filled in already)."""
        if self.figure is not None:
            return
        from bokeh.models import DataRange1d, HoverTool
        from bokeh.plotting import figure

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
        # The legend sits above the plot area, never over the bars.
        legend = fig.legend[0]
        fig.center.remove(legend)
        legend.orientation = "horizontal"
        legend.location = "top_left"
        legend.border_line_alpha = 0
        legend.background_fill_alpha = 0
        fig.add_layout(legend, "above")
        fig.add_tools(
            HoverTool(
                tooltips=[("hits", "@hits"), ("misses", "@misses"), ("failures", "@failures")]
            )
        )
        for renderer in self.bars:
            renderer.glyph.width = self._width_ms * 0.9
        self.figure = fig
        self.rest.objects = [
            html("<h3>Tasks</h3>", margin=(0, 10)),
            self.tasks,
            pn.pane.Bokeh(fig, sizing_mode="stretch_width"),
        ]

    @staticmethod
    def _no_tasks() -> pd.DataFrame:
        return empty_frame(
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
            ("time-saved", "Time saved", fmt_saved(t["time_saved"], t["hits"]), "by cache hits"),
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
                saved=[
                    fmt_saved(s, h) for s, h in zip(tasks["saved_s"], tasks["hits"], strict=True)
                ],
                last=[fmt_time(x) for x in tasks["last_run"]],
            )[list(TASK_COLUMNS)].rename(columns=TASK_COLUMNS)
        b = data.buckets
        width_ms = self._width_ms = data.width * 1000
        for renderer in self.bars:
            renderer.glyph.width = width_ms * 0.9
        self.chart_source.data = {
            "t": [local_ms(x) + width_ms / 2 for x in b["bucket"]],
            "hits": b["hits"].tolist(),
            "misses": b["misses"].tolist(),
            "failures": b["failures"].tolist(),
        }


# -- timeline ------------------------------------------------------------------------------


BAR_FIELDS = (
    "lane", "start", "end", "task", "state", "color", "duration", "run", "notebook", "cell",
    "worker",
)  # fmt: skip
#: The timeline opens on the latest burst of activity: runs less than this far apart (s)
#: belong to one burst, and the view spans at most this many of the latest runs.
BURST_GAP = 600.0
BURST_RUNS = 400


def recent_window(starts: list[float], ends: list[float]) -> tuple[float, float]:
    """The x range (ms) the timeline opens on: the latest burst of runs, padded.

    Walking back from the latest run, a burst ends at a gap longer than ``BURST_GAP``
    (or after ``BURST_RUNS`` runs), so 40 half-second runs of the last minute fill the
    width instead of being slivers of a 24-hour axis.

    >>> recent_window([0, 1000, 10_000_000, 10_001_000], [500, 1500, 10_000_500, 10_001_500])
    (9999925.0, 10001575.0)
    """
    order = sorted(range(len(starts)), key=lambda k: starts[k], reverse=True)
    lo = starts[order[0]]
    hi = max(ends)
    for n, k in enumerate(order[1:], 1):
        if lo - ends[k] > BURST_GAP * 1000 or n >= BURST_RUNS:
            break
        lo = min(lo, starts[k])
    pad = max((hi - lo) * 0.05, 50.0)
    return lo - pad, hi + pad


class TimelineView(View):
    """A Gantt-like chart: one lane per task (or notebook, or worker), one bar per run,
    opened on the latest burst of activity."""

    title = "Timeline"

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Range1d
        from bokeh.plotting import figure

        self.window = pn.widgets.Select(
            label="Window",
            options=[p for p in PERIODS if p != "last 30 days"],
            value="last 24 hours",
            width=160,
        )
        self.lane_kind = pn.widgets.RadioButtonGroup(
            label="Lanes", options=list(LANES), value="task", color="light", margin=(26, 10)
        )
        self.window.param.watch(lambda _: self.refresh(), "value")
        self.lane_kind.param.watch(lambda _: self.refresh(), "value")
        self.lanes: list[str] = []
        self.count = 0
        self.zoomed: tuple[float, float] | None = None
        self._key: tuple[Any, ...] | None = None
        self.bars = ColumnDataSource({k: [] for k in BAR_FIELDS})
        self.y_range = FactorRange(factors=[])
        self.x_range = Range1d(start=0, end=1)
        fig = figure(
            x_axis_type="datetime",
            x_range=self.x_range,
            y_range=self.y_range,
            height=320,
            sizing_mode="stretch_width",
            title="Runs by task",
            tools="xpan,xwheel_zoom,reset",
            active_scroll="xwheel_zoom",
            toolbar_location="above",
        )
        fig.hbar(y="lane", left="start", right="end", height=0.7, color="color", source=self.bars)
        fig.add_tools(
            HoverTool(
                tooltips=[
                    ("task", "@task"),
                    ("state", "@state"),
                    ("duration", "@duration"),
                    ("notebook", "@notebook"),
                    ("cell", "@cell"),
                    ("worker", "@worker"),
                ]
            )
        )
        fig.yaxis.major_label_text_font_size = "12px"
        self.figure = fig
        self.caption = html("", margin=(0, 10))
        legend = " ".join(chip(s) for s in STATE_COLORS)
        self.panel = pn.Column(
            pn.FlexBox(
                self.window,
                self.lane_kind,
                html(legend, margin=(32, 10)),
                flex_wrap="wrap",
                sizing_mode="stretch_width",
            ),
            pn.pane.Bokeh(fig, sizing_mode="stretch_width"),
            self.caption,
            sizing_mode="stretch_width",
        )

    def load(self) -> pd.DataFrame:
        window = PERIODS.get(self.window.value)
        return self.source.timeline(
            time.time() - window if window else None, lanes=self.lane_kind.value
        )

    def render(self, df: pd.DataFrame) -> None:
        self.count = len(df)
        kind = self.lane_kind.value
        cast(Any, self.figure.title).text = f"Runs by {kind}"
        if df.empty:
            self.lanes = []
            self.y_range.factors = []
            self.bars.data = {k: [] for k in BAR_FIELDS}
            self.caption.object = empty(
                "No runs in this window: choose a longer one, or run a task.", "timeline"
            )
            return
        base = self.source.project_dir
        starts = [local_ms(s) for s in df["start"]]
        ends = [local_ms(e) for e in df["end_"]]
        lo, hi = recent_window(starts, ends)
        floor = (hi - lo) / 600  # a cache hit lasts ~1 ms: draw it at least a pixel wide
        lanes = [relative_path(x, base) if kind == "notebook" else str(x) for x in df["lane"]]
        # Lanes in order of first appearance, the busiest first reading down.
        self.lanes = sorted(set(lanes), key=lambda name: -lanes.count(name))[::-1]
        self.y_range.factors = self.lanes
        self.bars.data = {
            "lane": lanes,
            "start": starts,
            "end": [max(e, s + floor) for s, e in zip(starts, ends, strict=True)],
            "task": df["task"].tolist(),
            "state": [str(x).lower() for x in df["state"]],
            "color": [STATE_COLORS.get(str(x), "#999") for x in df["state"]],
            "duration": [fmt_seconds(d) for d in df["duration"]],
            "run": [str(r) for r in df["run_id"]],
            "notebook": [relative_path(n, base) for n in df["notebook"]],
            "cell": [c if isinstance(c, str) else "" for c in df["cell"]],
            "worker": [str(w) for w in df["worker"]],
        }
        # Zoom to the latest burst when the data changes (a new window or lane kind, new
        # runs); otherwise a refresh keeps the user's pan and zoom.
        key = (self.window.value, kind, len(df))
        if self._key != key or self.zoomed is None:
            self.x_range.start, self.x_range.end = lo, hi
            self.x_range.reset_start, self.x_range.reset_end = lo, hi
            self.zoomed = (lo, hi)
            self._key = key
        self.figure.height = max(200, min(900, 110 + 30 * len(self.lanes)))
        self.caption.object = note(
            f"{len(df):,} runs in {len(self.lanes)} lane(s) by {kind}; showing the latest "
            "activity (scroll to zoom, drag to pan, reset to come back)"
            + (" — the most recent ones" if len(df) >= 3000 else "")
        )


# -- queue ---------------------------------------------------------------------------------


class QueueView(View):
    """Runs in flight (pending, running, retrying), per kernel/process."""

    title = "Queue"
    RUN_COLUMNS = ["Task", "State", "Since", "Notebook", "Cell", "Worker", "Attempt"]

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.in_flight = 0
        self.workers = table(
            value=empty_frame(
                ["Worker", "Pending", "Running", "Retrying", "Oldest", "Last seen"],
                ints=("Pending", "Running", "Retrying"),
            ),
            max_height=240,
        )
        self.runs = table(
            value=empty_frame(self.RUN_COLUMNS, ints=("Attempt",)),
            max_height=400,
            formatters={"State": HTML_CELL},
        )
        self.summary = html("", margin=(0, 10))
        self.empty = html("", sizing_mode="stretch_width")
        self.tables = pn.Column(
            html("<h3>Per kernel / worker</h3>", margin=(0, 10)),
            self.workers,
            html("<h3>Runs in flight</h3>", margin=(0, 10)),
            self.runs,
            sizing_mode="stretch_width",
        )
        self.panel = pn.Column(self.summary, self.empty, self.tables, sizing_mode="stretch_width")

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
        self.workers.value = frame(
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
        base = self.source.project_dir
        self.runs.value = frame(
            {
                "Task": runs["task"].tolist(),
                "State": [chip(x) for x in runs["state"]],
                "Since": [
                    fmt_age(c if missing(s) else s, now)
                    for s, c in zip(runs["started"], runs["created"], strict=True)
                ],
                "Notebook": [relative_path(n, base) for n in runs["notebook"]],
                "Cell": [c if isinstance(c, str) else "" for c in runs["cell"]],
                "Worker": [str(w) for w in runs["worker"]],
                "Attempt": runs["attempt"].tolist(),
            },
            self.RUN_COLUMNS,
        )
        self.tables.visible = bool(len(runs))
        self.empty.object = (
            ""
            if len(runs)
            else empty(
                "Nothing is waiting or running. Submitted runs (task.submit, task.map, "
                "%%task --background) show here until they finish.",
                "queue",
            )
        )
