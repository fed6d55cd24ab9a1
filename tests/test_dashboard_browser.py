"""The standalone dashboard (`python -m notebook_flow.dashboard`) in headless Chromium.

Debian's chromium (the ``browser`` fixture of conftest.py, see ``_browser.py``).
Each tab's screenshot is saved to ``test-output/dashboard/`` for a person to look at.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _browser import CHROMIUM_MARKS
from _net import http_status, listening_addresses

from notebook_flow import config, task
from notebook_flow.cache_policies import INPUTS

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "dashboard"

pytestmark = CHROMIUM_MARKS


def start_dashboard(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m notebook_flow.dashboard`` and return it with the URL it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "notebook_flow.dashboard", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "token=" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(120):
        proc.kill()
        raise AssertionError("the dashboard did not print its URL:\n" + "".join(lines))
    url = next(line.strip() for line in lines if "token=" in line)
    return proc, url


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(20)
    if proc.stdout is not None:
        proc.stdout.close()


def fill_store() -> None:
    @task(name="square")
    def square(x):
        return x * x

    @task(name="broken", retries=0)
    def broken(x):
        raise ValueError(x)

    for i in range(5):
        square(i)
    for i in range(3):
        square(i)
    for i in range(2):
        with pytest.raises(ValueError):
            broken(i)
    # Two calls racing for one key under SERIALIZABLE: the second waits for the lock.
    both = [threading.Thread(target=guarded, args=(7,)) for _ in range(2)]
    for t in both:
        t.start()
        time.sleep(0.05)
    for t in both:
        t.join(60)
    config.get_metadata(config.get_store()).flush(60)


@task(name="guarded", cache_policy=INPUTS.configure(isolation_level="SERIALIZABLE"))
def guarded(x):
    time.sleep(0.5 if x == 7 else 0)
    if x == 99:
        GATE.wait(60)
    return x


@task(name="slow", cache_policy=INPUTS)
def slow(x):
    GATE.wait(60)
    return x


GATE = threading.Event()


def open_tab(page, name: str) -> None:
    page.locator(".bk-tab", has_text=re.compile(rf"^{name}$")).click()


@pytest.fixture
def dashboard(python_env) -> Iterator[str]:
    fill_store()
    proc, url = start_dashboard(python_env, "--refresh", "1")
    yield url
    stop(proc)


def test_standalone_dashboard_shows_runs_and_invalidates(browser, dashboard):
    from playwright.sync_api import expect

    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(dashboard)
        runs_kpi = page.locator("#kpi-runs .nf-kpi-value")
        expect(runs_kpi).to_have_text("12", timeout=60_000)
        expect(page.locator("#kpi-hit-rate .nf-kpi-value")).to_have_text("33.3%")
        expect(page.locator("#kpi-failures .nf-kpi-value")).to_have_text("2")
        expect(page.locator("#kpi-storage")).to_contain_text("6 cached results")
        # The task table and the chart follow the first page (built once it has loaded).
        expect(page.locator("canvas").first).to_be_visible(timeout=60_000)
        expect(page.locator(".tabulator-row", has_text="square").first).to_be_visible()
        expect(page.get_by_text("Drawing the task table")).to_have_count(0)
        page.wait_for_timeout(500)  # let the chart draw before the screenshot
        page.screenshot(path=str(SHOTS / "1-overview.png"), full_page=True)

        # Auto-refresh (every second here): a run made now shows up without a reload.
        @task(name="late")
        def late(x):
            return x

        late(1)
        config.get_metadata(config.get_store()).flush(60)
        expect(runs_kpi).to_have_text("13", timeout=60_000)

        open_tab(page, "Runs")
        pager = page.locator(".nf-pager:visible")
        expect(pager).to_have_attribute("data-total", "13", timeout=60_000)
        expect(page.locator(".tabulator-row:visible")).to_have_count(13)
        page.locator(".tabulator-row:visible").first.click()
        expect(page.locator("#run-detail")).to_contain_text("Run detail", timeout=60_000)
        page.screenshot(path=str(SHOTS / "2-runs.png"), full_page=True)

        open_tab(page, "Timeline")
        expect(page.get_by_text("13 runs in 4 lane(s) by task")).to_be_visible(timeout=60_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(SHOTS / "3-timeline.png"), full_page=True)

        open_tab(page, "Cache")
        expect(pager).to_have_attribute("data-total", "7", timeout=60_000)
        rows = page.locator(".tabulator-row:visible")
        expect(rows).to_have_count(7)
        shown = rows.first.locator(".tabulator-cell[tabulator-field='Key']").inner_text()
        prefix = shown.strip().rstrip("…")
        meta = config.get_metadata(config.get_store())
        (key,) = [
            k for k in meta.sql("SELECT key FROM cache_entries")["key"] if k.startswith(prefix)
        ]
        assert config.get_store().lookup(key) is not None
        rows.first.click()
        invalidate = page.get_by_role("button", name="Invalidate entry")
        expect(invalidate).to_be_enabled(timeout=60_000)
        invalidate.click()
        page.get_by_role("button", name="Confirm").click()
        expect(pager).to_have_attribute("data-total", "6", timeout=60_000)
        expect(page.get_by_text("Invalidated 1 cached result(s).")).to_be_visible()
        assert config.get_store().lookup(key) is None
        expect(page.locator(".tabulator:visible")).not_to_contain_text(prefix)  # redraw async
        page.screenshot(path=str(SHOTS / "4-cache.png"), full_page=True)

        # A lock held and a run in flight while we look at the Locks and Queue tabs.
        holder = threading.Thread(target=guarded, args=(99,))
        holder.start()
        future = slow.submit(1)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                config.get_metadata(config.get_store()).flush(60)
                if len(config.get_metadata(config.get_store()).locks()) and len(
                    config.get_metadata(config.get_store()).history(task="slow")
                ):
                    break
                time.sleep(0.1)
            open_tab(page, "Locks")
            expect(page.locator(".tabulator-row:visible")).not_to_have_count(0, timeout=60_000)
            expect(page.locator(".tabulator:visible").first).to_contain_text("guarded")
            expect(page.locator(".tabulator:visible").nth(1)).to_contain_text("guarded")  # a wait
            page.screenshot(path=str(SHOTS / "5-locks.png"), full_page=True)

            open_tab(page, "Queue")  # the run holding the lock and the submitted one
            expect(page.locator("#queue-count")).to_have_attribute(
                "data-count", "2", timeout=60_000
            )
            page.screenshot(path=str(SHOTS / "6-queue.png"), full_page=True)
        finally:
            GATE.set()
            holder.join(60)
            assert future.result(timeout=60) == 1
        expect(page.locator("#queue-count")).to_have_attribute("data-count", "0", timeout=60_000)
        assert not errors, errors
    finally:
        context.close()


def test_standalone_refuses_without_token_and_binds_loopback(browser, python_env):
    proc, url = start_dashboard(python_env)
    try:
        base, _, token = url.partition("?token=")
        port = int(base.rsplit(":", 1)[1].strip("/"))
        assert base.startswith("http://127.0.0.1:")
        assert http_status(base) == 403
        assert http_status(base + "?token=" + "x" * len(token)) == 403
        context = browser.new_context()
        page = context.new_page()
        response = page.goto(base)
        assert response is not None and response.status == 403
        context.close()

        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        stop(proc)
