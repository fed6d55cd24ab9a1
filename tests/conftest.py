"""Shared fixtures: every test gets its own result store; servers come from scripts/services.sh."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The signing key file of the test session (and of the kernels and processes it starts):
# never the developer's own ~/.config/notebook_flow.
os.environ["NOTEBOOK_FLOW_CONFIG_DIR"] = tempfile.mkdtemp(prefix="nf-test-config-")


@pytest.fixture(autouse=True)
def isolated_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh local store per test, through the same env var users set."""
    from notebook_flow import config

    store = tmp_path / "store"
    monkeypatch.setenv("NOTEBOOK_FLOW_STORE", str(store))
    monkeypatch.delenv("NOTEBOOK_FLOW_SIGNING_KEY", raising=False)
    config._reset_for_tests()
    yield store
    config._reset_for_tests()


@pytest.fixture(autouse=True)
def _restore_main_module() -> Iterator[None]:
    """An in-process IPython shell replaces sys.modules["__main__"] with its namespace
    module (no __spec__); later tests that spawn processes (Dask's nanny, multiprocessing
    spawn) then fail or hang. Put the real one back after every test."""
    main = sys.modules.get("__main__")
    yield
    if main is not None and sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main


@pytest.fixture
def shell() -> Iterator[Any]:
    """The in-process IPython shell, reset, with the extension loaded (history off)."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    if InteractiveShell.initialized():
        sh = InteractiveShell.instance()
    else:
        config = Config()
        config.HistoryManager.enabled = False
        sh = InteractiveShell.instance(config=config)
    sh.reset(new_session=False)
    sh.extension_manager.load_extension("notebook_flow")
    yield sh
    sh.extension_manager.unload_extension("notebook_flow")
    sh.reset(new_session=False)


@pytest.fixture
def python_env(isolated_store: Path) -> dict[str, str]:
    """Environment for subprocesses: same interpreter path, same store, repo importable."""
    env = dict(os.environ)
    env["NOTEBOOK_FLOW_STORE"] = str(isolated_store)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On CI a skipped test is a failure: every server, kernel and browser the suite needs
    is installed by scripts/setup, so a skip there means a missing part, not a choice."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped on CI (not allowed): {reason}"


@pytest.fixture
def run_history_held(
    isolated_store: Path, python_env: dict[str, str]
) -> Iterator[Callable[[], None]]:
    """Another process holds the store's metadata lock (a long write, a paused kernel);
    calling the fixture's value releases it early."""
    isolated_store.mkdir(parents=True, exist_ok=True)
    code = (
        "import filelock, sys, time\n"
        "lock = filelock.FileLock(sys.argv[1])\n"  # referenced: collected, it would unlock
        "lock.acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    lock = str(isolated_store / "metadata.duckdb.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", code, lock], stdout=subprocess.PIPE, text=True, env=python_env
    )

    def release() -> None:
        holder.kill()
        holder.wait()

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield release
    finally:
        release()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's, through Playwright), one per test module."""
    from _browser import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
