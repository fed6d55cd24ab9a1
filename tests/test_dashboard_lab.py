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
import os
import re
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "dashboard-lab"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = [
    pytest.mark.browser,
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the gate ------------------------------------------------------------------------------------


class PortGate:
    """An HTTP proxy on 127.0.0.1 that lets the browser reach ``allowed`` (host, port) only.

    Plain requests (absolute-form) are forwarded with ``Connection: close``; ``CONNECT``
    (what Chromium uses for websockets through a proxy) becomes a tunnel. Everything else
    gets 403 and lands in ``refused``.
    """

    def __init__(self, allowed: tuple[str, int]) -> None:
        self.allowed = allowed
        self.refused: list[str] = []
        self.forwarded = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closing = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            header, _, rest = head.partition(b"\r\n\r\n")
            lines = header.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                path = ""
            else:
                m = re.match(r"http://([^/:]+)(?::(\d+))?(/.*)?$", target)
                if m is None:
                    raise ValueError(target)
                host, port, path = m.group(1), m.group(2) or "80", m.group(3) or "/"
            if (host, int(port)) != self.allowed and not (
                host == "localhost" and int(port) == self.allowed[1]
            ):
                self.refused.append(f"{method} {target}")
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            upstream = socket.create_connection(self.allowed, timeout=30)
            upstream.settimeout(None)
            self.forwarded += 1
            if method == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
            else:
                kept = [
                    line
                    for line in lines[1:]
                    if not line.lower().startswith(("proxy-connection:", "connection:"))
                ]
                upgrade = any(line.lower().startswith("upgrade:") for line in lines[1:])
                kept.append("Connection: Upgrade" if upgrade else "Connection: close")
                request = "\r\n".join([f"{method} {path} {version}", *kept]) + "\r\n\r\n"
                upstream.sendall(request.encode("latin-1") + rest)
            _pipe(client, upstream)
        except Exception:  # a browser hanging up mid-request is fine
            pass
        finally:
            client.close()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while True:
            ready, _, _ = select.select([a, b], [], [], 300)
            if not ready:
                return
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)
    finally:
        b.close()


# -- JupyterLab ----------------------------------------------------------------------------------


def _get(url: str, timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read(), dict(exc.headers)


def start_lab(home: Path) -> dict[str, Any]:
    """``jupyter lab`` on 127.0.0.1 with notebook_flow's extension and the server proxy."""
    root = home / "root"
    root.mkdir()
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No "would you like news?" toast over the screenshots.
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    token = secrets.token_hex(16)
    port = _free_port()
    env = dict(os.environ)
    env.update(
        NOTEBOOK_FLOW_STORE=str(root / ".notebook_flow"),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    extensions = {"jupyter_server_proxy": True, "notebook_flow.jupyter": True}
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", f"--ServerApp.jpserver_extensions={extensions!r}",
        "--LabApp.expose_app_in_browser=True",
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = home / "jupyter.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed by stop_lab
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    lab = {
        "base": base, "port": port, "token": token, "root": root, "proc": proc,
        "log": log_path, "log_file": log, "env": env,
    }  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        try:
            if _get(f"{base}/api?token={token}", timeout=5)[0] == 200:
                return lab
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_lab(lab)
            raise AssertionError("jupyter lab did not start:\n" + log_path.read_text())
        time.sleep(0.2)


def stop_lab(lab: dict[str, Any]) -> None:
    proc = lab["proc"]
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    lab["log_file"].close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[dict[str, Any]]:
    lab = start_lab(tmp_path_factory.mktemp("lab"))
    try:
        yield lab
    finally:
        stop_lab(lab)


@pytest.fixture(scope="module")
def gated_browser(lab) -> Iterator[tuple[Any, PortGate]]:
    """Chromium whose every request goes through a ``PortGate`` open to Jupyter's port only."""
    from playwright.sync_api import sync_playwright

    gate = PortGate(("127.0.0.1", lab["port"]))
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                *CHROMIUM_ARGS,
                f"--proxy-server=http://127.0.0.1:{gate.port}",
                "--proxy-bypass-list=<-loopback>",
            ],
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


def loopback_refusals(gate: PortGate) -> list[str]:
    """What the page tried to reach on this machine besides Jupyter's port."""
    return [r for r in gate.refused if "127.0.0.1" in r or "localhost" in r]


def table_rows(out: Any, field: str) -> Any:
    """The shown rows of the table that has a column ``field`` (every tab stays in the page)."""
    return out.locator(f".tabulator-row:visible:has(.tabulator-cell[tabulator-field='{field}'])")


def open_tab(out: Any, name: str) -> None:
    out.locator(".bk-tab", has_text=re.compile(rf"^{name}$")).click()


def kernel_status(page: Any) -> str:
    return str(
        page.evaluate(
            "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
        )
    )


def cell_running(page: Any, index: int) -> bool:
    """True while cell ``index`` runs (its prompt shows ``[*]``).

    Not the kernel's status: ipykernel reports busy/idle for every message, also those
    handled beside a running cell (control requests), so it reads idle now and then.
    """
    prompt = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputPrompt")
    return "*" in prompt.inner_text()


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
    assert (
        out.locator(".nf-chip[data-state='FAILED']").first.evaluate(
            "e => getComputedStyle(e).backgroundColor"
        )
        == "rgb(209, 52, 56)"
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

    assert not loopback_refusals(gate), gate.refused
    assert not errors, errors
    assert "Traceback" not in out.inner_text()  # nothing went wrong under the view

    # Saved and reopened without a kernel: a snapshot or a note, nothing port-bound.
    page.wait_for_function("() => " + _KERNEL + ".status === 'idle'", timeout=120_000)
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
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
    page.evaluate("() => window.jupyterapp.commands.execute('kernelmenu:shutdown')")
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
        assert not loopback_refusals(gate), gate.refused
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
    import signal

    lab = start_lab(tmp_path)
    try:
        status, body, _ = _get(f"{lab['base']}/notebook-flow/?token={lab['token']}", 180)
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
        stop_lab(lab)
