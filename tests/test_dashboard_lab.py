"""The dashboard and the live map status in a real JupyterLab, seen by headless Chromium
that can reach the Jupyter server's port and nothing else.

The browser's only way out is a small HTTP proxy started by the test (``PortGate``), with
loopback *not* bypassed (``<-loopback>``): it forwards requests and websocket tunnels to
the Jupyter server's port and refuses every other host or port, logging each refusal. The
kernel's own loopback ports (its zmq sockets, any server it might start) are therefore
unreachable from the page — what a browser on another machine (JupyterHub, a tunnel,
Codespaces) sees. The tests assert that the gate refused nothing the page needed and that
the views rendered and updated anyway.

Screenshots of every tab, of a running map and of the launcher go to
``test-output/dashboard-lab/`` for a person to look at.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    CHROMIUM_MARKS,
    PortGate,
    get,
    start_jupyter,
    stop_jupyter,
)

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "dashboard-lab"

pytestmark = [*CHROMIUM_MARKS, pytest.mark.kernel]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[dict[str, Any]]:
    lab = start_jupyter(tmp_path_factory.mktemp("lab"), lab=True)
    try:
        yield lab
    finally:
        stop_jupyter(lab)


@pytest.fixture(scope="module")
def gated_browser(lab) -> Iterator[tuple[Any, PortGate]]:
    """Chromium whose every request goes through a ``PortGate`` open to Jupyter's port only."""
    from playwright.sync_api import sync_playwright

    gate = PortGate(("127.0.0.1", lab["port"]))
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *gate.chromium_args]
        )
        try:
            yield browser, gate
        finally:
            browser.close()
            gate.close()


def write_notebook(path: Path, cells: list[str]) -> None:
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "metadata": {},
                "source": src,
                "outputs": [],
                "execution_count": None,
            }
            for src in cells
        ],  # fmt: skip
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb))


def open_notebook(browser: Any, lab: dict[str, Any], name: str) -> Any:
    context = browser.new_context(viewport={"width": 1300, "height": 1900})
    page = context.new_page()
    page.goto(f"{lab['base']}/lab/tree/{name}?token={lab['token']}", timeout=120_000)
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
        " && window.jupyterapp.shell.currentWidget.sessionContext"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
        " === 'idle'",
        timeout=120_000,
        polling=250,
    )
    return page


def run_cell(page: Any, index: int) -> None:
    """Select cell ``index`` of the open notebook and run it (without waiting)."""
    page.evaluate(
        """async (i) => {
            const app = window.jupyterapp;
            const panel = app.shell.currentWidget;
            panel.content.activeCellIndex = i;
            app.commands.execute('notebook:run-cell');  // resolves when the cell ends
        }""",
        index,
    )


def cell_output(page: Any, index: int) -> Any:
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea")


SETUP = """\
import time, threading
import notebook_flow
from notebook_flow import task
%load_ext notebook_flow

@task(name="square")
def square(x):
    return x * x

@task(name="broken", retries=0)
def broken(x):
    raise ValueError(f"bad input {x}")

for i in range(4):
    square(i)
square(1); square(2)
try:
    broken(7)
except ValueError:
    pass
notebook_flow.config.get_metadata().flush(60)
"""

DASHBOARD = "%flow dashboard"

MAP = """\
from IPython.display import display

@task(name="slow_step")
def slow_step(x):
    time.sleep(0.5)
    return x

slow_step.map(range(4)).result()   # four of the map below are cached already
futs = slow_step.map(range(16))
display(futs)
futs.wait()
import os
deadline = time.monotonic() + 600
while not os.path.exists("release") and time.monotonic() < deadline:
    time.sleep(0.1)   # the kernel stays busy until the test has seen the map finish
"""


def table_rows(out: Any, field: str) -> Any:
    """The shown rows of the table that has a column ``field`` (every tab stays in the page)."""
    return out.locator(f".tabulator-row:visible:has(.tabulator-cell[tabulator-field='{field}'])")


def open_tab(out: Any, name: str) -> None:
    out.locator(".bk-tab", has_text=re.compile(rf"^{name}$")).click()


def cell_running(page: Any, index: int) -> bool:
    """True while cell ``index`` runs (its prompt shows ``[*]``).

    Not the kernel's status: ipykernel reports busy/idle for every message, also those
    handled beside a running cell (control requests), so it reads idle now and then.
    """
    prompt = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputPrompt")
    return "*" in prompt.inner_text()


# A whole session of a user (a dozen cells' worth of clicks, a map, a save and a reload):
# beside other jobs on 2 cores it ran past the suite's 600 s per test at its last step.
@pytest.mark.timeout(1800)
def test_inline_dashboard_and_live_map_in_jupyterlab(lab, gated_browser):
    from playwright.sync_api import expect

    browser, gate = gated_browser
    SHOTS.mkdir(parents=True, exist_ok=True)
    write_notebook(lab["root"] / "demo.ipynb", [SETUP, DASHBOARD, MAP])
    page = open_notebook(browser, lab, "demo.ipynb")
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    run_cell(page, 0)
    run_cell(page, 1)
    out = cell_output(page, 1)
    expect(out.locator("#kpi-runs .nf-kpi-value")).to_have_text("7", timeout=120_000)
    expect(out.locator("#kpi-hit-rate .nf-kpi-value")).to_have_text("28.6%")
    assert not out.locator("iframe").count()  # the view itself, not a frame onto a port
    page.wait_for_timeout(800)  # let the chart draw
    out.screenshot(path=str(SHOTS / "1-overview.png"))

    # Runs: state chips, names instead of ids.
    open_tab(out, "Runs")
    rows = table_rows(out, "Started")
    expect(rows).to_have_count(7, timeout=60_000)
    chips = out.locator(".tabulator-cell[tabulator-field='State'] .nf-chip")
    expect(chips.first).to_be_visible()
    states = {c.get_attribute("data-state") for c in chips.all()}
    assert states == {"CACHED", "COMPLETED", "FAILED"}, states
    # Retried: an auto-refresh may redraw the table between finding a chip and reading its
    # style (a detached cell has no computed style; seen once in a stress loop).
    expect(out.locator(".nf-chip[data-state='FAILED']").first).to_have_css(
        "background-color", "rgb(209, 52, 56)", timeout=60_000
    )
    notebooks = out.locator(".tabulator-cell[tabulator-field='Notebook']").all_inner_texts()
    assert set(notebooks) <= {"demo.ipynb", ""}, notebooks  # relative, not /tmp/...

    # The stale-detail case: select a run of `broken`, then filter to `square`.
    rows.filter(has_text="broken").first.click()
    detail = out.locator("#run-detail")
    expect(detail).to_contain_text("bad input 7", timeout=60_000)
    page.wait_for_timeout(300)
    out.screenshot(path=str(SHOTS / "2-runs.png"))
    out.locator("select").first.select_option("square")
    expect(rows).to_have_count(6, timeout=60_000)
    expect(detail).to_have_count(0, timeout=60_000)  # no detail of a run not in the list
    expect(out.get_by_text("Select a run to see its inputs")).to_be_visible()
    assert out.locator(".tabulator-row.tabulator-selected").count() == 0
    rows.first.click()
    expect(detail).to_contain_text("square", timeout=60_000)
    out.screenshot(path=str(SHOTS / "2-runs-filtered.png"))

    open_tab(out, "Timeline")
    expect(out.get_by_text("lane(s) by task")).to_be_visible(timeout=60_000)
    page.wait_for_timeout(800)
    out.screenshot(path=str(SHOTS / "3-timeline.png"))

    # Cache: each entry says which inputs made it; search narrows the list.
    open_tab(out, "Cache")
    inputs = out.locator(".tabulator-cell[tabulator-field='Inputs']:visible")
    try:
        expect(inputs).to_have_count(4, timeout=60_000)
    finally:
        out.screenshot(path=str(SHOTS / "4-cache.png"))
    assert sorted(inputs.all_inner_texts()) == ["x=0", "x=1", "x=2", "x=3"]
    made = out.locator(".tabulator-cell[tabulator-field='Made in']:visible").all_inner_texts()
    assert all(m.startswith("demo.ipynb") for m in made), made
    hint = out.locator(".nf-hint")
    expect(hint.first).to_contain_text("Select an entry in the table to invalidate it")
    assert out.get_by_role("button", name="Invalidate entry").is_disabled()
    out.screenshot(path=str(SHOTS / "4-cache.png"))
    search = out.get_by_placeholder("task, inputs, notebook")
    search.fill("x=3")
    search.press("Enter")
    expect(inputs).to_have_count(1, timeout=60_000)
    expect(inputs.first).to_have_text("x=3")
    search.fill("")
    search.press("Enter")
    expect(inputs).to_have_count(4, timeout=60_000)

    open_tab(out, "Locks")
    try:
        expect(out.locator(".nf-empty", has_text="No lock is held")).to_be_visible(timeout=60_000)
    finally:
        out.screenshot(path=str(SHOTS / "5-locks.png"))
    out.screenshot(path=str(SHOTS / "5-locks.png"))
    open_tab(out, "Queue")
    expect(out.locator(".nf-empty", has_text="Nothing is waiting or running")).to_be_visible(
        timeout=60_000
    )
    out.screenshot(path=str(SHOTS / "6-queue.png"))

    # A running map: its bar shows cached and computed runs apart while the cell runs, and
    # the dashboard (refreshed through the same connection) follows it *during* the cell:
    # the map's cell keeps the kernel busy until the test has seen the 27 runs.
    open_tab(out, "Overview")
    updated = out.locator("#nf-updated")
    before = float(updated.get_attribute("data-updated") or 0)
    run_cell(page, 2)
    bar = cell_output(page, 2).locator(".notebook-flow-map")
    expect(bar).to_have_attribute("data-cached", "4", timeout=120_000)
    expect(bar.locator(".nf-map-cached")).to_be_visible()
    assert cell_running(page, 2)
    cell_output(page, 2).screenshot(path=str(SHOTS / "7-map-running.png"))
    expect(bar).to_have_attribute("data-done", "16", timeout=120_000)
    expect(bar.locator(".nf-map-completed")).to_be_visible()
    expect(bar).to_contain_text("4 of 16 from cache")
    assert "Traceback" not in cell_output(page, 2).inner_text()
    expect(out.locator("#kpi-runs .nf-kpi-value")).to_have_text("27", timeout=180_000)
    assert cell_running(page, 2)  # all of it while the cell still runs
    assert float(updated.get_attribute("data-updated") or 0) > before
    out.screenshot(path=str(SHOTS / "9-overview-during-map.png"))
    cell_output(page, 2).screenshot(path=str(SHOTS / "8-map-done.png"))
    (lab["root"] / "release").write_text("")

    assert not gate.loopback_refusals(), gate.refused
    assert not errors, errors
    assert "Traceback" not in out.inner_text()  # nothing went wrong under the view

    # Saved and reopened without a kernel: a snapshot or a note, nothing port-bound.
    # The map's cell has ended (its prompt shows a number), then the kernel is idle: the
    # status alone reads idle now and then while a cell runs (see cell_running).
    page.wait_for_function(
        "() => !document.querySelectorAll('.jp-Notebook .jp-Cell')[2]"
        ".querySelector('.jp-InputPrompt').textContent.includes('*')",
        timeout=120_000,
    )
    page.wait_for_function("() => " + _KERNEL + ".status === 'idle'", timeout=120_000)
    command(page, "docmanager:save")
    page.wait_for_timeout(1500)
    saved = (lab["root"] / "demo.ipynb").read_text()
    leaks = [
        saved[max(0, m.start() - 200) : m.end() + 60]
        for m in re.finditer(
            re.escape(lab["token"]) + r"|[?&]token=\w|<iframe|127\.0\.0\.1:", saved
        )
    ]
    assert not leaks, leaks
    assert "re-run this cell to reconnect" in saved
    command(page, "kernelmenu:shutdown")
    page.wait_for_timeout(1500)
    page.reload()
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
        " && window.jupyterapp.shell.currentWidget.content.widgets.length === 3",
        timeout=120_000,
    )
    reopened = cell_output(page, 1)
    expect(reopened).to_be_visible(timeout=60_000)
    # The snapshot Panel saved (the view as first shown) or, untrusted, the plain line.
    expect(reopened).to_contain_text(
        re.compile(r"HIT RATE|Hit rate|re-run this cell to reconnect"), timeout=120_000
    )
    assert not reopened.locator("iframe").count()
    reopened.screenshot(path=str(SHOTS / "10-reopened.png"))
    page.context.close()


_KERNEL = "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"


def command(page: Any, name: str, timeout_s: float = 120) -> None:
    """Run a JupyterLab command and wait for it, failing (not hanging: ``evaluate`` has no
    timeout) when it has not finished in ``timeout_s``. A stress round once hung for 17
    minutes at the save or the kernel shutdown here, the kernel busy with the browser's
    queued comm messages."""
    page.evaluate(
        """([name, ms]) => Promise.race([
          window.jupyterapp.commands.execute(name),
          new Promise((_, reject) => setTimeout(
            () => reject(new Error(name + ' did not finish in ' + ms + ' ms')), ms)),
        ])""",
        [name, int(timeout_s * 1000)],
    )


def test_launcher_tile_shows_the_dashboard_icon(lab, gated_browser):
    from playwright.sync_api import expect

    browser, gate = gated_browser
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    page = context.new_page()
    try:
        # A fresh workspace: the launcher, not the notebook an earlier test left open.
        page.goto(
            f"{lab['base']}/lab/workspaces/launcher-test?reset&token={lab['token']}",
            timeout=120_000,
        )
        page.wait_for_function(
            "() => window.jupyterapp && window.jupyterapp.commands.hasCommand('launcher:create')",
            timeout=120_000,
        )
        page.wait_for_timeout(2000)  # let the workspace restore before adding a launcher
        if not page.locator(".jp-LauncherCard").count():
            page.evaluate("() => window.jupyterapp.commands.execute('launcher:create')")
        card = page.locator(".jp-LauncherCard", has_text="notebook_flow")
        expect(card).to_be_visible(timeout=60_000)
        icon = card.locator("img")
        expect(icon).to_have_attribute("src", re.compile(r"/server-proxy/icon/notebook-flow$"))
        page.wait_for_function(
            "(img) => img.complete && img.naturalWidth > 0", arg=icon.element_handle()
        )
        card.screenshot(path=str(SHOTS / "11-launcher-tile.png"))
        page.screenshot(path=str(SHOTS / "11-launcher.png"))
        assert not gate.loopback_refusals(), gate.refused
    finally:
        context.close()


def _children(pid: int) -> dict[int, str]:
    """pid → command line of the live processes whose parent is ``pid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_proxied_dashboard_ends_with_the_jupyter_server(tmp_path, how):
    """Through the launcher's URL the proxy starts the dashboard; when Jupyter ends — shut
    down cleanly or killed outright — that process ends too, never adopted by init."""
    lab = start_jupyter(tmp_path, lab=True)
    try:
        status, body, _ = get(f"{lab['base']}/notebook-flow/?token={lab['token']}")
        assert status == 200 and b"<title>notebook_flow</title>" in body
        dashboards = {
            pid: cmd
            for pid, cmd in _children(lab["proc"].pid).items()
            if "notebook_flow.dashboard" in cmd and "--proxied" in cmd
        }
        assert len(dashboards) == 1, dashboards
        (pid,) = dashboards
        lab["proc"].send_signal(signal.SIGTERM if how == "terminate" else signal.SIGKILL)
        lab["proc"].wait(60)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), f"the proxied dashboard {pid} outlived Jupyter"
    finally:
        stop_jupyter(lab)
