"""The dashboard's components, filled by real task runs: counts, pages, actions, security.

Browser tests are in test_dashboard_browser.py, the Jupyter proxy in test_dashboard_jupyter.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import pytest
from _net import http_status, listening_addresses

import notebook_flow as nf
from notebook_flow import config, task
from notebook_flow.cache_policies import INPUTS

pytestmark = [
    # Bokeh 3.9's ColumnDataSource.from_df calls reset_index(inplace=True), which pandas 3.1
    # deprecates; not ours to fix.
    pytest.mark.filterwarnings(
        "ignore:The inplace keyword in DataFrame.reset_index:DeprecationWarning"
    ),
]


def _flush() -> None:
    config.get_metadata(config.get_store()).flush(60)


@pytest.fixture
def filled() -> dict[str, int]:
    """A store with 8 runs of `square` (5 computed, 3 hits) and 2 failed runs of `broken`."""

    @task(name="square")
    def square(x):
        return x * x

    @task(name="broken", retries=1, retry_delay_seconds=0)
    def broken(x):
        raise ValueError(f"no good: {x}")

    for i in range(5):
        square(i)
    for i in range(3):
        square(i)
    for i in range(2):
        with pytest.raises(ValueError):
            broken(i)
    _flush()
    return {"runs": 10, "hits": 3, "computed": 5, "failed": 2, "entries": 5}


def _dashboard(**kw):
    from notebook_flow.dashboard import Dashboard

    return Dashboard(refresh_seconds=0, **kw)


# -- overview -------------------------------------------------------------------------------


def test_overview_counts_real_runs(filled):
    dash = _dashboard()
    t = dash.overview.totals
    assert t["runs"] == filled["runs"]
    assert t["hits"] == filled["hits"]
    # A miss is a run of a cached task that did not hit (metadata.stats' definition).
    assert t["misses"] == filled["computed"] + filled["failed"]
    assert t["failures"] == filled["failed"]
    assert t["entries"] == filled["entries"]
    assert t["bytes"] > 0
    assert t["time_saved"] >= 0
    assert t["hit_rate"] == pytest.approx(3 / 10)
    assert t == {
        **t,
        **{k: v for k, v in nf.stats().items() if k in ("runs", "hits", "misses", "entries")},
    }
    html = dash.overview.kpis.object
    assert 'id="kpi-runs"' in html and ">10<" in html and "30.0%" in html

    tasks = dash.overview.tasks.value.set_index("Task")
    assert tasks.loc["square", "Calls"] == 8 and tasks.loc["square", "Hits"] == 3
    assert tasks.loc["square", "Hit %"] == pytest.approx(37.5)
    assert tasks.loc["broken", "Failures"] == 2
    chart = dash.overview.chart_source.data
    assert sum(chart["hits"]) + sum(chart["misses"]) + sum(chart["failures"]) == 10
    assert "Updated" in dash.status.object and dash.problem is None


def test_empty_store_renders_every_tab():
    dash = _dashboard()
    assert dash.overview.totals["runs"] == 0 and dash.overview.totals["hit_rate"] is None
    for index in range(6):
        dash.tabs.active = index  # opening a tab builds and reads it
        assert dash.problem is None, dash.problem
    assert dash.runs.page.total == 0 and dash.cache.page.total == 0
    assert dash.queue.in_flight == 0 and dash.timeline.count == 0


# -- runs -----------------------------------------------------------------------------------


def test_runs_table_pages_and_filters_in_sql(filled):
    dash = _dashboard(page_size=4)
    dash.tabs.active = 1
    runs = dash.runs
    assert runs.page.total == 10 and len(runs.table.value) == 4
    assert "1-4 of 10 runs" in runs.pager.label.object
    first_page = list(runs.run_ids)
    runs.pager.go(2)
    assert runs.page.page == 2 and len(runs.table.value) == 2
    assert not set(runs.run_ids) & set(first_page)
    assert runs.pager.next.disabled and not runs.pager.prev.disabled

    runs.task.value = "square"  # a filter goes back to the first page
    assert runs.page.page == 0 and runs.page.total == 8
    runs.states.value = ["CACHED"]
    assert runs.page.total == 3 and set(runs.page.rows["state"]) == {"CACHED"}
    assert all('data-state="CACHED"' in c for c in runs.table.value["State"])  # chips
    runs.task.value = "(all)"
    runs.states.value = ["FAILED"]
    assert runs.page.total == 2
    runs.period.value = "last hour"
    assert runs.page.total == 2
    assert sorted(runs.task.options) == sorted(["(all)", "square", "broken"])


def test_run_detail_shows_traceback_attempts_and_escapes(filled):
    dash = _dashboard()
    dash.tabs.active = 1
    runs = dash.runs
    runs.states.value = ["FAILED"]
    runs.table.selection = [0]
    detail = runs.detail.object
    assert "Traceback" in detail and "ValueError: no good" in detail
    assert "RETRYING" in detail  # the transitions list both attempts
    assert "<h4>Inputs</h4>" in detail and "x = " in detail

    import pandas as pd

    from notebook_flow.dashboard.views import run_detail_html

    hostile = run_detail_html(
        {"run_id": "r", "task": "<script>alert(1)</script>", "state": "FAILED"}, pd.DataFrame()
    )
    assert "<script>" not in hostile and "&lt;script&gt;" in hostile


def test_a_click_during_a_refresh_keeps_its_run_detail(filled):
    """A click on a row that reaches the server while a refresh rewrites the table (the
    auto-refresh runs on its own thread) keeps the detail it opened; seen in the JupyterLab
    stress loop, where the refresh then reset the selection and cleared the detail."""
    dash = _dashboard()
    dash.tabs.active = 1
    runs = dash.runs
    runs.refresh()

    @task(name="late")
    def late(x):
        return x

    late(1)  # the refresh below has a new row: it rewrites the table
    _flush()
    clicked: list[str] = []

    def click_meanwhile(_: object) -> None:  # the browser's click, between two writes
        if not clicked:
            target = next(r for r, t in zip(runs.run_ids, runs.page.rows["task"]) if t == "broken")
            clicked.append(target)
            runs.table.selection = [runs.run_ids.index(target)]

    watcher = runs.table.param.watch(click_meanwhile, "value")
    try:
        runs.refresh()
    finally:
        runs.table.param.unwatch(watcher)
    assert clicked and runs.detail_run == clicked[0]
    assert "ValueError: no good" in runs.detail.object
    assert runs.run_ids[runs.table.selection[0]] == clicked[0]
    # Nothing new: a refresh leaves the table (and a click on it) alone.
    value = runs.table.value
    runs.refresh()
    assert runs.table.value is value and runs.detail_run == clicked[0]


def test_run_detail_explains_a_miss(filled):
    @task(name="scaled")
    def scaled(x, factor=2):
        return x * factor

    scaled(1)
    scaled(1, factor=3)
    _flush()
    dash = _dashboard()
    dash.tabs.active = 1
    dash.runs.task.value = "scaled"
    dash.runs.table.selection = [0]  # newest first: the call with factor=3
    assert "Why it missed" in dash.runs.detail.object
    assert "factor" in dash.runs.detail.object


# -- timeline, queue ------------------------------------------------------------------------


def test_timeline_draws_a_bar_per_run(filled):
    dash = _dashboard()
    dash.tabs.active = 2
    bars = dash.timeline.bars.data
    assert len(bars["start"]) == 10 == dash.timeline.count
    assert all(e > s for s, e in zip(bars["start"], bars["end"]))
    timeline = dash.timeline
    assert timeline.lanes == ["broken", "square"]  # lanes by task, the busiest on top
    # It opens zoomed on the latest activity, not on a 24-hour axis.
    lo, hi = timeline.x_range.start, timeline.x_range.end
    assert lo <= min(bars["start"]) and hi >= max(bars["end"]) and hi - lo < 600_000
    timeline.lane_kind.value = "worker"  # one process ran them all
    assert len(timeline.lanes) == 1 and " · pid " in timeline.lanes[0]


def test_queue_shows_a_submitted_run_in_flight():
    gate, started = threading.Event(), threading.Event()

    @task(name="slow")
    def slow(x):
        started.set()
        gate.wait(30)
        return x

    fut = slow.submit(1)
    try:
        assert started.wait(30)
        _flush()
        dash = _dashboard()
        dash.tabs.active = 5
        assert dash.queue.in_flight == 1
        assert dash.queue.runs.value["Task"].tolist() == ["slow"]
        assert dash.queue.workers.value["Running"].tolist() == [1]
        assert dash.overview.totals["in_flight"] == 1
    finally:
        gate.set()
    assert fut.result(timeout=30) == 1
    _flush()
    dash.refresh()
    assert dash.queue.in_flight == 0


# -- cache ----------------------------------------------------------------------------------


def test_invalidate_an_entry_asks_then_deletes_from_store_and_index(filled):
    dash = _dashboard()
    dash.tabs.active = 3
    cache = dash.cache
    assert cache.page.total == 5
    key = cache.keys[0]
    store = config.get_store()
    assert store.lookup(key) is not None

    cache.table.selection = [0]
    assert not cache.delete_entry.disabled
    cache._ask_entry(None)
    assert cache.confirm.panel.visible and key in cache.confirm.message.object
    cache.confirm.cancel()  # changing one's mind deletes nothing
    assert store.lookup(key) is not None

    cache._ask_entry(None)
    cache.confirm._confirm()
    assert store.lookup(key) is None
    assert cache.page.total == 4 and key not in cache.keys
    assert "Invalidated 1" in cache.message.object


def test_invalidate_a_task(filled):
    @task(name="other")
    def other(x):
        return x

    other(1)
    _flush()
    dash = _dashboard()
    dash.tabs.active = 3
    cache = dash.cache
    assert cache.delete_task.disabled  # no task chosen
    cache.task.value = "square"
    assert cache.page.total == 5 and not cache.delete_task.disabled
    cache._ask_task(None)
    cache.confirm._confirm()
    assert cache.page.total == 1 and cache.table.value["Task"].tolist() == ["other"]
    assert nf.cache_entries(task="square").empty


def test_cache_view_shows_provenance_and_pins(filled):
    """Each entry says who made it where (its signed provenance) and whether it is pinned
    (the store's pin markers); search finds entries by their provenance too."""
    import getpass
    import socket

    from notebook_flow.storage.pins import pin

    store = config.get_store()
    [key] = nf.cache_entries(task="square").sort_values("key")["key"].head(1)
    pin(store, [key])
    dash = _dashboard()
    dash.tabs.active = 3
    cache = dash.cache
    table = cache.table.value
    pinned = dict(zip(cache.keys, table["Pinned"], strict=True))
    assert pinned[key] == "📌 pinned"
    assert [k for k, p in pinned.items() if p] == [key]
    made = table["Made in"].tolist()
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    assert all(who in m and "Python 3." in m for m in made), made
    cache.search.value = "notebook_flow=0."  # only in the provenance's package versions
    assert cache.page.total == 5


# -- locks ----------------------------------------------------------------------------------


def test_locks_view_shows_a_held_lock_and_breaks_it():
    gate, entered = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    @task(name="guarded", cache_policy=INPUTS.configure(isolation_level="SERIALIZABLE"))
    def guarded(x):
        entered.set()
        gate.wait(30)
        return x

    def call():
        try:
            guarded(1)
        except BaseException as exc:  # the broken lock may cost the commit its lease
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    try:
        assert entered.wait(30)
        _flush()
        dash = _dashboard()
        dash.tabs.active = 4
        locks = dash.locks
        table = locks.table.value
        assert table["Task"].tolist() == ["guarded"]
        assert "pid" in table["Holder"].iloc[0] and table["Lease"].iloc[0].startswith("expires")

        locks.table.selection = [0]
        assert not locks.break_button.disabled
        locks._ask(None)
        assert locks.confirm.panel.visible
        locks.confirm._confirm()
        assert "Broke the lock" in locks.message.object, locks.message.object
        assert locks.table.value.empty
    finally:
        gate.set()
        worker.join(30)


# -- refresh under contention ---------------------------------------------------------------


def test_a_busy_index_shows_as_waiting_then_updates(filled):
    import filelock

    dash = _dashboard()
    dash.busy_after = 0.1

    @task(name="late_busy")
    def late(x):
        return x

    late(1)  # the index changes, so the next refresh must read it (no shared earlier read)
    _flush()
    path = config.get_metadata(config.get_store()).path
    blocker = filelock.FileLock(path + ".lock", thread_local=False)
    blocker.acquire()
    done = threading.Thread(target=lambda: asyncio.run(dash.refresh_async()))
    try:
        done.start()
        deadline = time.monotonic() + 20
        while dash.problem != "busy" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert dash.problem == "busy"
        assert "waiting for the metadata index" in dash.status.object
    finally:
        blocker.release()
    done.join(30)
    assert dash.problem is None and "waiting" not in dash.status.object
    assert dash.overview.totals["runs"] == 11


# -- server: token, origins, loopback -------------------------------------------------------


@pytest.fixture
def server(filled):
    from notebook_flow.dashboard.serve import serve

    s = serve(threaded=True, refresh_seconds=0)
    yield s
    s.stop()


def test_server_wants_the_token(server):
    assert server.url.startswith("http://127.0.0.1:") and "token=" in server.url
    assert http_status(server.url) == 200
    assert http_status(server.base_url) == 403
    assert http_status(server.base_url + "?token=wrong") == 403
    assert http_status(server.base_url, {"X-Notebook-Flow-Token": server.token}) == 200
    cookie = f"notebook_flow_token_{server.port}={server.token}"
    assert http_status(server.base_url, {"Cookie": cookie}) == 200


def test_websocket_needs_token_and_own_origin(server):
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.websocket import websocket_connect

    ws_url = f"ws://127.0.0.1:{server.port}/ws"
    own = f"http://127.0.0.1:{server.port}"
    cookie = f"notebook_flow_token_{server.port}={server.token}"

    async def status(headers: dict[str, str]) -> int:
        request = HTTPRequest(ws_url, headers=headers)
        try:
            conn = await websocket_connect(request, subprotocols=["bokeh", "x"])
        except HTTPClientError as exc:
            return int(exc.code)
        conn.close()
        return 101

    assert asyncio.run(status({"Origin": own})) == 403  # no token
    assert asyncio.run(status({"Origin": "http://evil.example", "Cookie": cookie})) == 403
    assert asyncio.run(status({"Origin": own, "Cookie": cookie})) == 101


def test_server_listens_on_loopback_only(server):
    from notebook_flow.dashboard.serve import LOOPBACK

    assert LOOPBACK == "127.0.0.1"
    listening = listening_addresses(server.port)
    assert listening == {"127.0.0.1"}, listening


# -- entry points ---------------------------------------------------------------------------


def test_cli_registers_the_dashboard_subcommand():
    from notebook_flow.dashboard.cli import register, run

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["dashboard", "--store", "somewhere", "--port", "8765"])
    assert args.func is run and args.store == "somewhere" and args.port == 8765
    assert args.prefix == "" and not args.proxied


def test_notebook_flow_cli_knows_the_dashboard():
    from notebook_flow import cli

    args = cli.build_parser("dashboard").parse_args(["dashboard", "--refresh", "2"])
    assert args.refresh == 2.0 and callable(args.func)


def test_module_is_callable_and_show_reuses_its_server(filled):
    import notebook_flow.dashboard as dashboard

    first = dashboard(server=True)  # a threaded server for the kernel
    try:
        assert first.alive() and http_status(first.url) == 200
        assert "<iframe" not in first._repr_html_() and first.token in first._repr_html_()
        assert dashboard.show(server=True) is first
    finally:
        dashboard.stop_all()
    assert not first.alive()


def test_show_renders_inline_with_nothing_secret_or_port_bound(filled):
    from notebook_flow.dashboard import InlineDashboard, show

    view = show(refresh_seconds=0)  # what %flow dashboard shows: no server, no port
    assert isinstance(view, InlineDashboard) and not view.alive()
    assert view.dashboard.overview.totals["runs"] == 10
    data, _ = view._repr_mimebundle_()
    assert "re-run this cell to reconnect" in data["text/plain"]
    saved = json.dumps(data)
    assert "?token=" not in saved and "127.0.0.1:" not in saved and "<iframe" not in saved


def test_proxy_entry_for_jupyter_server_proxy():
    from notebook_flow import jupyter

    entry = jupyter.setup_proxy()
    cmd = entry["command"]
    assert cmd[1:3] == ["-m", "notebook_flow.dashboard"] and "{port}" in cmd
    assert "{base_url}notebook-flow" in cmd and "--proxied" in cmd
    assert entry["absolute_url"] is True
    token = entry["request_headers_override"]["X-Notebook-Flow-Token"]
    assert len(token) >= 32 and entry["environment"]()["NOTEBOOK_FLOW_DASHBOARD_TOKEN"] == token
    assert entry["launcher_entry"]["title"] == "notebook_flow"
    assert entry["launcher_entry"]["icon_path"].endswith("notebook_flow.svg")
    assert jupyter._jupyter_server_extension_points() == [{"module": "notebook_flow.jupyter"}]


WRITER = """
import os, sys, time
import notebook_flow as nf

@nf.task(name="writer")
def write(i):
    return i

end = time.time() + float(sys.argv[1])
n = 0
while time.time() < end:
    write(os.getpid() * 100_000 + n)
    n += 1
nf.config.get_metadata().flush(120)
print(n)
"""


def test_refreshing_while_processes_write_never_fails(python_env, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    dash = _dashboard()
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), "4"], env=python_env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    refreshes = 0
    try:
        while any(w.poll() is None for w in writers):
            dash.tabs.active = refreshes % 6
            dash.refresh()
            assert dash.problem is None, dash.problem
            refreshes += 1
    finally:
        written = [int(w.communicate(timeout=120)[0].strip()) for w in writers]
    dash.tabs.active = 0
    dash.refresh()
    assert refreshes > 3 and dash.problem is None
    assert dash.overview.totals["runs"] == sum(written)
