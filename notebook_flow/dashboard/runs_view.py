"""The runs tab: run history filtered and paged (``Source.runs_page``), a run's detail on
selection (inputs, why it missed, attempts, traceback)."""

from __future__ import annotations

# Panel's widget and layout constructors take **params and are untyped.
# mypy: disable-error-code="no-untyped-call"
import json
import time
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING, Any

import panel as pn  # noqa: TID253 - the dashboard package is imported only when used
from panel.io import hold  # noqa: TID253

from notebook_flow.figures import DASH

from .queries import Page, RunFilters, Source
from .widgets import (
    ALL,
    HTML_CELL,
    PERIODS,
    STATES,
    Pager,
    View,
    chip,
    empty,
    empty_frame,
    fmt_seconds,
    fmt_time,
    frame,
    html,
    missing,
    note,
    relative_path,
    table,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["READ_AHEAD", "READ_AHEAD_SECONDS", "RunsView", "run_detail_html", "worker"]

#: The runs table reads this many pages ahead (and one behind) with each page, and flips
#: through them from memory for this many seconds (auto-refresh reads them again anyway).
READ_AHEAD = 4
READ_AHEAD_SECONDS = 10.0


class RunsView(View):
    """Run history, filtered and paged in SQL, with a run's detail on selection."""

    title = "Runs"
    columns = [
        "Started",
        "Task",
        "State",
        "Duration",
        "Saved",
        "Notebook",
        "Cell",
        "Worker",
        "Attempt",
    ]
    #: What the detail panel says when no run on the current page is selected.
    NO_SELECTION = "Select a run to see its inputs, attempts, traceback and why it missed."

    def __init__(self, source: Source, page_size: int = 50) -> None:
        super().__init__(source)
        self.page: Page | None = None
        self.run_ids: list[str] = []
        self._cache: tuple[tuple[Any, ...], Page, float] | None = None
        self._key_of_page: tuple[Any, ...] | None = None
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
        self.table = table(
            value=empty_frame(self.columns, ints=("Attempt",)),
            selectable=1,
            max_height=520,
            formatters={"State": HTML_CELL},
        )
        self.table.param.watch(self._selected, "selection")
        self.detail_run: str | None = None  # the run the detail panel shows
        self.detail = html(note(self.NO_SELECTION), sizing_mode="stretch_width")
        self.empty = html("", sizing_mode="stretch_width")
        self.panel = pn.Column(
            pn.FlexBox(
                *(self.task, self.states, self.notebook, self.period, self.range, self.sort),
                flex_wrap="wrap",
                sizing_mode="stretch_width",
            ),
            self.pager.panel,
            self.empty,
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
            # The total last shown for these filters: far pages read from the other end.
            total_hint=self.page.total if self.page and self._key_of_page == key else None,
        )
        self._key_of_page = key
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
        run_ids = [str(r) for r in df["run_id"]]
        base = self.source.project_dir
        shown = frame(
            {
                "Started": [fmt_time(x) for x in df["created"]],
                "Task": df["task"].tolist(),
                "State": [chip(x) for x in df["state"]],
                "Duration": [fmt_seconds(x) for x in df["duration"]],
                "Saved": [
                    fmt_seconds(x) if st == "CACHED" else DASH
                    for x, st in zip(df["saved"], df["state"], strict=True)
                ],
                "Notebook": [relative_path(n, base) for n in df["notebook"]],
                "Cell": [c if isinstance(c, str) else "" for c in df["cell"]],
                "Worker": [worker(h, p) for h, p in zip(df["host"], df["pid"], strict=True)],
                "Attempt": df["attempt"].tolist(),
            },
            self.columns,
        )
        # The same rows as shown (an auto-refresh with nothing new): leave the table and its
        # selection alone. Rewriting them raced with a click on a row arriving meanwhile
        # (seen in the JupyterLab stress loop: the refresh's reset of the selection cleared
        # the detail the click had just opened).
        unchanged = run_ids == self.run_ids and shown.equals(self.table.value)
        self.run_ids = run_ids
        if not unchanged:
            self.table.value = shown
        self.table.visible = bool(page.total)
        self.empty.object = (
            ""
            if page.total
            else empty(
                "No run matches these filters. Runs appear here as tasks and %%task cells "
                "run; clear a filter to see more.",
                "runs",
            )
        )
        if unchanged:
            return
        # Keep the selection on the run the detail shows if it is still on this page;
        # otherwise the detail must not go on showing a run the list no longer has.
        selected = self.detail_run
        if selected in self.run_ids:
            self.table.selection = [self.run_ids.index(selected)]
        else:
            self.table.selection = []
            if self.detail_run is not None and self.detail_run not in self.run_ids:
                self._clear_detail()

    def _filters_changed(self, _: object) -> None:
        self.pager.page = 0
        self.load_page()

    def _selected(self, event: Any) -> None:
        if not event.new or not self.run_ids or event.new[0] >= len(self.run_ids):
            self._clear_detail()
            return
        run_id = self.run_ids[event.new[0]]
        record, events = self.source.run_detail(run_id)
        self.detail_run = run_id
        self.detail.object = run_detail_html(record, events, self.source.project_dir)

    def _clear_detail(self) -> None:
        self.detail_run = None
        self.detail.object = note(self.NO_SELECTION)


def _timestamp(value: Any) -> float:
    """A picker's date or datetime (local time) as epoch seconds."""
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    return float(value.timestamp())


def worker(host: Any, pid: Any) -> str:
    """A worker as people know it: host and pid (the kernel id is in the run's detail)."""
    h = host if isinstance(host, str) and host else "?"
    return f"{h} · pid {int(pid)}" if not missing(pid) else h


def run_detail_html(
    record: dict[str, Any] | None, events: pd.DataFrame, base: str | None = None
) -> str:
    """A run's detail: identity, timings, why it missed, inputs, attempts, traceback."""
    if record is None:
        return note("This run is no longer in the index.", "warning")
    e = escape
    notebook = record.get("notebook") or ""
    shown = relative_path(notebook, base)
    rows = [
        ("Task", record["task"]),
        ("State", record["state"]),
        ("Notebook", f"{shown} ({notebook})" if shown and shown != notebook else notebook),
        ("Cell", record.get("cell") or ""),
        ("Run id", record["run_id"]),
        ("Cache key", record.get("key") or "(uncached)"),
        ("Created", fmt_time(record.get("created"))),
        ("Started", fmt_time(record.get("started"))),
        ("Ended", fmt_time(record.get("ended"))),
        ("Duration", fmt_seconds(record.get("duration"))),
        ("Time saved", fmt_seconds(record.get("saved")) if record["state"] == "CACHED" else DASH),
        ("Attempts", record.get("attempt")),
        ("Worker", worker(record.get("host"), record.get("pid"))),
        ("Kernel id", record.get("kernel") or ""),
    ]
    html = [
        f'<div class="nf-detail" id="run-detail" data-run="{e(str(record["run_id"]))}">'
        f"<h3>Run detail {chip(record['state'])}</h3><table>"
    ]
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
