"""A real Jupyter server with the extension answers the proxied dashboard URL with the app."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from notebook_flow import config, task

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 120) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as r:
            return int(r.status), r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace"), dict(exc.headers)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory) -> Iterator[dict[str, str]]:
    """``jupyter server`` with notebook_flow's extension and jupyter-server-proxy enabled."""
    home = tmp_path_factory.mktemp("jupyter")
    store = home / "store"
    root = home / "root"
    root.mkdir()
    token = secrets.token_hex(16)
    port = _free_port()
    env = dict(os.environ)
    env.update(
        NOTEBOOK_FLOW_STORE=str(store),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    extensions = {"jupyter_server_proxy": True, "notebook_flow.jupyter": True}
    cmd = [
        sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", f"--ServerApp.jpserver_extensions={extensions!r}",
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(home / "jupyter.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _get(f"{base}/api?token={token}", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "jupyter server did not start:\n" + (home / "jupyter.log").read_text()
                )
            time.sleep(0.2)
        yield {"base": base, "token": token, "store": str(store), "log": str(home / "jupyter.log")}
    finally:
        proc.terminate()  # jupyter-server-proxy stops the dashboard process it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()


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
    assert status == 200, body[:500] + open(jupyter["log"]).read()[-3000:]
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


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package")
def test_dashboard_through_the_proxy_in_chromium(jupyter, filled_for_jupyter):
    """The page's websocket works through the proxy (origin checked by Jupyter, header token)."""
    from playwright.sync_api import expect, sync_playwright

    shots = ROOT / "test-output" / "dashboard"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{jupyter['base']}/notebook-flow/?token={jupyter['token']}")
            expect(page.locator("#kpi-runs .nf-kpi-value")).to_have_text("3", timeout=60_000)
            page.locator(".bk-tab", has_text="Runs").click()  # needs the websocket
            expect(page.locator(".nf-pager:visible")).to_have_attribute(
                "data-total", "3", timeout=60_000
            )
            page.screenshot(path=str(shots / "7-jupyter-proxy.png"), full_page=True)
        finally:
            browser.close()
