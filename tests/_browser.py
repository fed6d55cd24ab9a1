"""What the browser tests share: Debian's Chromium, a Jupyter server started on loopback,
and ``PortGate``, a proxy that lets the browser reach one port only.

Chromium is driven by Playwright through ``executable_path`` (no browser download); the
``browser`` fixture in ``conftest.py`` launches it once per test module.

>>> jupyter = start_jupyter(tmp_path, lab=True)       # doctest: +SKIP
>>> get(jupyter["base"] + "/api?token=" + jupyter["token"])[0]   # doctest: +SKIP
200
>>> stop_jupyter(jupyter)                              # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

#: The marks of a test that drives Chromium (``pytestmark = CHROMIUM_MARKS``).
CHROMIUM_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package"),
]


def needs_chromium(test: Any) -> Any:
    """Decorator form of ``CHROMIUM_MARKS`` for one test of a module."""
    for mark in CHROMIUM_MARKS:
        test = mark(test)
    return test


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def get(
    url: str, timeout: float = 300, *, redirects: bool = True
) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers of a GET of ``url`` (an error status too, not an exception);
    ``redirects=False`` returns a redirect itself."""
    opener = (
        urllib.request.build_opener() if redirects else urllib.request.build_opener(_NoRedirect)
    )
    try:
        with opener.open(urllib.request.Request(url), timeout=timeout) as r:
            return int(r.status), r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read(), dict(exc.headers)


# -- Jupyter ---------------------------------------------------------------------------------


def start_jupyter(home: Path, *, lab: bool, store: Path | None = None) -> dict[str, Any]:
    """``jupyter lab`` (or a bare ``jupyter server``) on 127.0.0.1 with a token, notebook_flow's
    server extension and jupyter-server-proxy; its notebooks in ``home/root``, its store at
    ``store`` (default ``home/root/.notebook_flow``). Returns what the tests need:
    base URL, port, token, root, process, log path, environment."""
    root = home / "root"
    root.mkdir()
    settings = home / "settings"
    apputils = settings / "@jupyterlab" / "apputils-extension"
    apputils.mkdir(parents=True)
    # No "would you like news?" toast over the screenshots.
    (apputils / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    token = secrets.token_hex(16)
    port = free_port()
    env = dict(os.environ)
    env.update(
        NOTEBOOK_FLOW_STORE=str(store or root / ".notebook_flow"),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    extensions = {"jupyter_server_proxy": True, "notebook_flow.jupyter": True}
    cmd = [
        sys.executable, "-m", "jupyterlab" if lab else "jupyter_server", "--no-browser",
        f"--port={port}", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", f"--ServerApp.jpserver_extensions={extensions!r}",
    ]  # fmt: skip
    if lab:
        cmd.append("--LabApp.expose_app_in_browser=True")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = home / "jupyter.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed by stop_jupyter
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    jupyter = {
        "base": base, "port": port, "token": token, "root": root, "proc": proc,
        "log": log_path, "log_file": log, "env": env, "store": env["NOTEBOOK_FLOW_STORE"],
    }  # fmt: skip
    # Generous: on a loaded machine importing the server's extensions alone took 40 s.
    deadline = time.monotonic() + 600
    while True:
        try:
            if get(f"{base}/api?token={token}", timeout=5)[0] == 200:
                return jupyter
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_jupyter(jupyter)
            raise AssertionError("jupyter did not start:\n" + log_path.read_text())
        time.sleep(0.2)


def stop_jupyter(jupyter: dict[str, Any]) -> None:
    """Terminate the server (jupyter-server-proxy stops what it started), kill if stuck."""
    proc = jupyter["proc"]
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    jupyter["log_file"].close()


# -- the gate --------------------------------------------------------------------------------


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

    @property
    def chromium_args(self) -> list[str]:
        """Chromium's flags sending every request, loopback too, through this gate."""
        return [f"--proxy-server=http://127.0.0.1:{self.port}", "--proxy-bypass-list=<-loopback>"]

    def loopback_refusals(self) -> list[str]:
        """What the page tried to reach on this machine besides the allowed port."""
        return [r for r in self.refused if "127.0.0.1" in r or "localhost" in r]

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
