"""The dashboard opened from a real kernel: ``%flow dashboard`` renders inline with nothing
port-bound in its output; ``%flow dashboard --server`` serves it from the kernel on
127.0.0.1 and keeps refreshing while a cell is busy. (The inline view in a real JupyterLab,
updating while a cell runs, is tested in ``test_dashboard_lab.py``.)"""

from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path

import pytest
from _browser import needs_chromium
from _kernels import connect, execute_ok, start_kernel

pytestmark = [pytest.mark.kernel]


OPEN = """
import notebook_flow
from notebook_flow import task

@task(name="in_kernel")
def in_kernel(x):
    return x + 1

in_kernel(1); in_kernel(1)
%load_ext notebook_flow
%flow dashboard --server
"""

INLINE = "%flow dashboard"


def test_flow_dashboard_renders_inline_with_nothing_port_bound(tmp_path: Path, isolated_store):
    env = dict(os.environ, NOTEBOOK_FLOW_STORE=str(isolated_store))
    km = start_kernel(env, tmp_path)
    try:
        kc = connect(km)
        execute_ok(kc, "%load_ext notebook_flow", timeout=120)
        shown = execute_ok(kc, INLINE, timeout=120)
        bundles = [
            m["content"]["data"]
            for m in shown
            if m["msg_type"] in ("display_data", "execute_result")
        ]
        result = bundles[-1]
        assert "re-run this cell to reconnect" in result["text/plain"]
        assert any("application/vnd.holoviews_exec.v0+json" in b for b in bundles)
        text = str(bundles)  # ("token=" alone occurs in Bokeh's own JavaScript)
        assert not re.search(r"[?&]token=\w", text), "a URL with a token in the output"
        assert "<iframe" not in text and "127.0.0.1:" not in text
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)


@needs_chromium
def test_flow_dashboard_in_a_kernel_refreshes_while_a_cell_runs(
    tmp_path: Path, isolated_store, browser
):
    from playwright.sync_api import expect

    env = dict(os.environ, NOTEBOOK_FLOW_STORE=str(isolated_store))
    km = start_kernel(env, tmp_path)
    try:
        kc = connect(km)
        shown = execute_ok(kc, OPEN, timeout=120)
        html = "".join(
            m["content"]["data"].get("text/html", "")
            for m in shown
            if m["msg_type"] in ("display_data", "execute_result")
        )
        match = re.search(r'<a href="([^"]+)"', html)
        assert match, html
        url = match.group(1).replace("&amp;", "&")
        assert url.startswith("http://127.0.0.1:") and "token=" in url

        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(url)
            expect(page.locator("#kpi-runs .nf-kpi-value")).to_have_text("2", timeout=60_000)
            # A busy cell: it records a run, then keeps the kernel busy until the test
            # lets it go (a marker file), so "still busy" does not depend on the clock. The
            # dashboard, served from a thread of that kernel, still answers and shows it.
            release = tmp_path / "release-the-cell"
            kc.execute(
                "in_kernel(2)\n"
                "notebook_flow.config.get_metadata().flush(30)\n"
                "import os, time\n"
                f"while not os.path.exists({str(release)!r}): time.sleep(0.05)"
            )
            # Auto-refresh (every 5 s) shows the run while the cell is still running.
            expect(page.locator("#kpi-runs .nf-kpi-value")).to_have_text("3", timeout=120_000)
            with urllib.request.urlopen(url, timeout=60) as r:
                assert r.status == 200
            assert not kc.shell_channel.msg_ready()  # no reply yet: the cell still runs
            release.touch()
        finally:
            context.close()
        km.interrupt_kernel()
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
