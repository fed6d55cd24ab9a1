"""A real Jupyter server with the extension answers the proxied dashboard URL with the app."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _browser import get, needs_chromium, start_jupyter, stop_jupyter

from notebook_flow import config, task

ROOT = Path(__file__).resolve().parent.parent


def _get(url: str) -> tuple[int, str, dict[str, str]]:
    status, body, headers = get(url, redirects=False)
    return status, body.decode(errors="replace"), headers


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """``jupyter server`` with notebook_flow's extension and jupyter-server-proxy enabled."""
    home = tmp_path_factory.mktemp("jupyter")
    started = start_jupyter(home, lab=False, store=home / "store")
    try:
        yield started
    finally:
        stop_jupyter(started)  # jupyter-server-proxy stops the dashboard process it started


@pytest.fixture(scope="module")
def filled_for_jupyter(jupyter) -> None:
    config.configure(store=jupyter["store"])

    @task(name="jupyter_square")
    def square(x):
        return x * x

    for i in (1, 2, 2):
        square(i)
    config.get_metadata(config.get_store()).flush(60)


def test_proxied_url_answers_with_the_app(jupyter, filled_for_jupyter):
    base, token = jupyter["base"], jupyter["token"]
    status, body, _ = _get(f"{base}/notebook-flow/?token={token}")
    assert status == 200, body[:500] + jupyter["log"].read_text()[-3000:]
    assert "<title>notebook_flow</title>" in body
    assert "bokeh" in body.lower()

    # Jupyter authenticates the proxy: no Jupyter token, no dashboard.
    status, _, headers = _get(f"{base}/notebook-flow/")
    assert status in (302, 403) and "token" not in headers.get("Location", "")

    # The launcher entry and the extension's own endpoints.
    status, body, _ = _get(f"{base}/server-proxy/servers-info?token={token}")
    entry = next(s for s in json.loads(body)["server_processes"] if s["name"] == "notebook-flow")
    assert (
        entry["launcher_entry"]["enabled"] and entry["launcher_entry"]["title"] == "notebook_flow"
    )
    status, body, _ = _get(f"{base}/api/notebook-flow/stats?token={token}")
    assert status == 200 and json.loads(body)["runs"] == 3 and json.loads(body)["hits"] == 1
    status, _, headers = _get(f"{base}/notebook-flow-dashboard?token={token}")
    assert status == 302 and headers["Location"].endswith("/notebook-flow/")


@needs_chromium
def test_dashboard_through_the_proxy_in_chromium(jupyter, filled_for_jupyter, browser):
    """The page's websocket works through the proxy (origin checked by Jupyter, header token)."""
    from playwright.sync_api import expect

    shots = ROOT / "test-output" / "dashboard"
    shots.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        page.goto(f"{jupyter['base']}/notebook-flow/?token={jupyter['token']}")
        expect(page.locator("#kpi-runs .nf-kpi-value")).to_have_text("3", timeout=60_000)
        page.locator(".bk-tab", has_text="Runs").click()  # needs the websocket
        expect(page.locator(".nf-pager:visible")).to_have_attribute(
            "data-total", "3", timeout=60_000
        )
        page.screenshot(path=str(shots / "7-jupyter-proxy.png"), full_page=True)
    finally:
        context.close()
