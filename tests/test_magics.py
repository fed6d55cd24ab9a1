"""The extension in an in-process IPython shell: loading, ``%%task`` on bad input, ``%flow``.

Real kernels (outputs over the wire, SIGKILL and resume) are in ``test_magics_kernel.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def runner(sh: Any) -> Any:
    return sh.magics_manager.registry["FlowMagics"].runner


def manifests(store: Path) -> list[Any]:
    from notebook_flow.config import get_store

    return list(get_store(str(store)).iter_manifests())


# --------------------------------------------------------------------------- loading


def test_load_ext_is_fast_and_imports_nothing_heavy(python_env: dict[str, str]) -> None:
    code = (
        "import sys, time\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "import notebook_flow.magics as m\n"
        "m._preload_in_background = lambda shell: None  # what the call itself imports\n"
        "sh = InteractiveShell.instance()\n"
        "t0 = time.perf_counter()\n"
        "sh.extension_manager.load_extension('notebook_flow')\n"
        "print(time.perf_counter() - t0)\n"
        "heavy = ('pandas', 'duckdb', 'panel', 'pyarrow', 'numpy')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=python_env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    # Timing is reported by benchmarks/bench_resume.py; here only that nothing heavy loads.
    assert float(out[0]) >= 0
    assert out[1] == "[]"


def test_load_ext_preloads_in_the_background_and_exits_cleanly(
    python_env: dict[str, str],
) -> None:
    """The first task run's imports of DuckDB happen in a side thread; a process that exits
    at once still exits cleanly (a daemon thread inside an import would abort it). No
    module of ours is imported by that thread: two threads importing the package's
    re-exporting ``__init__`` cycles in different orders hand one of them a partially
    initialized module (seen in CI: ``cannot import name '_MISS' from partially
    initialized module 'notebook_flow.tasks.call'`` in a kernel's first ``%%task`` cell)."""
    record = (
        "import sys, threading\n"
        "ours_elsewhere = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith('notebook_flow') and threading.current_thread() is not "
        "threading.main_thread():\n"
        "            ours_elsewhere.append((threading.current_thread().name, name))\n"
        "sys.meta_path.insert(0, Spy())\n"
    )
    load = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "InteractiveShell.instance().extension_manager.load_extension('notebook_flow')\n"
    )
    quick = subprocess.run(
        [sys.executable, "-c", load], env=python_env, capture_output=True, text=True
    )
    assert quick.returncode == 0, quick.stderr
    wait = (
        "[t.join() for t in threading.enumerate() if t.name == 'notebook_flow-preload']\n"
        "print(sorted(m for m in ('duckdb', 'filelock') if m in sys.modules))\n"
        "print(ours_elsewhere)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", record + load + wait],
        env=python_env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["['duckdb', 'filelock']", "[]"], out.stdout


def test_load_unload_reload(shell: Any) -> None:
    manager = shell.magics_manager
    assert "task" in manager.magics["cell"] and "flow" in manager.magics["line"]
    shell.extension_manager.reload_extension("notebook_flow")
    assert sum(1 for cb in shell.events.callbacks["pre_run_cell"] if "FlowMagics" in repr(cb)) == 1
    shell.extension_manager.unload_extension("notebook_flow")
    assert "task" not in manager.magics["cell"] and "flow" not in manager.magics["line"]
    assert not any("FlowMagics" in repr(cb) for cb in shell.events.callbacks["pre_run_cell"])
    shell.extension_manager.load_extension("notebook_flow")
    assert "task" in manager.magics["cell"]


def test_root_logger_at_info_does_not_put_our_lines_into_cells(shell: Any) -> None:
    # logging.basicConfig(level=logging.INFO) in a notebook turns on its own log lines;
    # ours (a miss explained) would become part of the cell's output, unlike a plain run's.
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    ours = logging.getLogger("notebook_flow")
    try:
        shell.run_cell("import logging")
        shell.run_cell("%%task\nx_logged = 1 + 1\nlogging.getLogger('mine').info('mine')")
        assert "mine" in stream.getvalue()
        assert "cache miss" not in stream.getvalue()
        ours.warning("a warning shows")
        assert "a warning shows" in stream.getvalue()
        ours.setLevel(logging.INFO)  # asked for on our own logger: shown
        shell.run_cell("%%task\nx_logged = 2 + 2")
        assert "cache miss" in stream.getvalue()
        shell.extension_manager.unload_extension("notebook_flow")
        assert not ours.filters  # a script's process: the standard behaviour again
    finally:
        ours.setLevel(logging.NOTSET)
        root.removeHandler(handler)
        root.setLevel(saved)
        shell.extension_manager.load_extension("notebook_flow")


def test_help(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shell.run_cell("%flow help")
    out = capsys.readouterr().out
    assert "%flow history" in out and "%flow explain" in out
    doc = shell.magics_manager.magics["cell"]["task"].__doc__
    assert "--expire" in doc and "--outputs" in doc


def test_bad_options_are_usage_errors(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    for line in ("%%task --expire soon", "%%task --inputs 1x", "%%task --bogus"):
        result = shell.run_cell(f"{line}\nx = 1\n")
        assert not result.success
    err = capsys.readouterr().err
    assert "UsageError" in err and "duration" in err
    assert "x" not in shell.user_ns


# --------------------------------------------------------------------------- bad input


def test_unstorable_variable_is_named_and_work_is_kept(
    shell: Any, isolated_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = shell.run_cell("%%task\nimport os\nf = open(os.devnull)\nanswer = 42\n")
    assert result.success
    err = capsys.readouterr().err
    assert "`f` (TextIOWrapper: an open file or stream)" in err
    assert "not cached" in err
    assert shell.user_ns["answer"] == 42 and not shell.user_ns["f"].closed
    shell.user_ns["f"].close()
    assert manifests(isolated_store) == []
    assert runner(shell).last.status == "not stored"


def test_unpicklable_variable_found_by_pickling(
    shell: Any, isolated_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = shell.run_cell("%%task\nimport threading\nguard = threading.Condition()\nok = 1\n")
    assert result.success
    assert "`guard` (Condition" in capsys.readouterr().err
    assert manifests(isolated_store) == []
    assert shell.user_ns["ok"] == 1


def test_futures_are_named_not_stored(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shell.run_cell("from notebook_flow import task\n@task\ndef double(x):\n    return 2 * x")
    result = shell.run_cell(
        "%%task\nfuts = double.map([1, 2])\nvals = [f.result() for f in futs]\n"
    )
    assert result.success
    err = capsys.readouterr().err
    assert "`futs` (FutureList: it holds a future of background work; store `.result()`)" in err
    assert shell.user_ns["vals"] == [2, 4]


@pytest.mark.parametrize(
    "body",
    [
        "exec('q = 1')",
        "q = eval('1')",
        "global q\nq = 1",
        "from math import *\nq = floor(1.5)",
    ],
)
def test_opaque_cells_run_uncached(
    shell: Any, isolated_store: Path, capsys: pytest.CaptureFixture[str], body: str
) -> None:
    assert shell.run_cell(f"%%task\n{body}\n").success
    assert shell.user_ns["q"] == 1
    assert "running uncached" in capsys.readouterr().err
    assert manifests(isolated_store) == []


def test_opaque_cell_with_explicit_inputs_and_outputs_is_cached(
    shell: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.user_ns["n"] = 3
    cell = "%%task --inputs n --outputs q\nexec('q = n * 2')\n"
    assert shell.run_cell(cell).success
    del shell.user_ns["q"]
    assert shell.run_cell(cell).success
    assert shell.user_ns["q"] == 6
    assert runner(shell).last.status == "cached"
    shell.user_ns["n"] = 4
    assert shell.run_cell(cell).success
    assert shell.user_ns["q"] == 8


def test_top_level_await_runs_uncached(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    result = shell.run_cell("%%task\nimport asyncio\nawait asyncio.sleep(0)\nw = 7\n")
    assert result.success
    assert shell.user_ns["w"] == 7
    assert "top-level `await`" in capsys.readouterr().err


def test_reading_output_history_runs_uncached(
    shell: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.run_cell("1 + 1")
    assert shell.run_cell("%%task\nlast = _\n").success
    assert "output history" in capsys.readouterr().err


def test_unhashable_input_runs_uncached_with_its_name(
    shell: Any, isolated_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    shell.user_ns["guard"] = threading.Lock()
    assert shell.run_cell("%%task\nheld = guard.locked()\n").success
    err = capsys.readouterr().err
    assert "`guard`" in err and "running uncached" in err
    assert manifests(isolated_store) == []


def test_syntax_error(shell: Any, isolated_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = shell.run_cell("%%task\nx = = 1\n")
    assert isinstance(result.error_in_exec, SyntaxError)
    err = capsys.readouterr()
    text = err.out + err.err
    assert "SyntaxError" in text
    # Shown like a cell's own syntax error, without our frames (any file of notebook_flow/cells/).
    assert not re.search(r"\bcells(\.py|[/\\])", text), text
    assert manifests(isolated_store) == []


def test_cell_raising_half_way_caches_nothing_and_is_failed(
    shell: Any, isolated_store: Path
) -> None:
    from notebook_flow.api import history

    cell = (
        '%%task --name halfway\nfirst = 1\nprint("before")\nraise ValueError("boom")\nsecond = 2\n'
    )
    result = shell.run_cell(cell)
    assert isinstance(result.error_in_exec, ValueError)
    assert shell.user_ns["first"] == 1 and "second" not in shell.user_ns
    assert manifests(isolated_store) == []
    runs = history(task="halfway")
    assert list(runs["state"]) == ["FAILED"]
    assert "ValueError: boom" in runs["error"].iloc[0]
    # The next run computes again (nothing was cached).
    shell.run_cell(cell)
    assert runner(shell).last.status == "failed"


def test_keyboard_interrupt_is_cancelled(shell: Any) -> None:
    from notebook_flow.api import history

    result = shell.run_cell("%%task --name stop\nraise KeyboardInterrupt\n")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert list(history(task="stop")["state"]) == ["CANCELLED"]


def test_store_not_writable(
    shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from notebook_flow import config
    from notebook_flow.errors import StorageError
    from notebook_flow.storage import StorageWarning

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NOTEBOOK_FLOW_STORE", str(blocker / "store"))
    config._reset_for_tests()
    with pytest.warns(StorageWarning, match="cannot read manifest"):
        result = shell.run_cell("%%task\nresult = 6 * 7\n")
    assert isinstance(result.error_in_exec, StorageError)
    assert shell.user_ns["result"] == 42  # the work is not lost
    assert "could not be stored" in capsys.readouterr().err


# --------------------------------------------------------------------------- options


def test_refresh_expire_and_name(shell: Any, isolated_store: Path) -> None:
    shell.user_ns["base"] = 1
    cell = "%%task --name tally --expire 1h\nn = base + 1\n"
    shell.run_cell(cell)
    shell.run_cell(cell)
    assert runner(shell).last.status == "cached"
    shell.run_cell(cell.replace("--expire 1h", "--expire 1h --refresh"))
    assert runner(shell).last.status == "computed"
    (manifest,) = manifests(isolated_store)
    assert manifest.task == "cell:tally"
    assert (
        manifest.expires_at is not None and 3500 < manifest.expires_at - manifest.created_at < 3700
    )


def test_expired_result_is_recomputed(shell: Any) -> None:
    import time

    cell = "%%task --expire 250ms\nstamp = object.__name__\n"
    shell.run_cell(cell)
    time.sleep(0.3)
    shell.run_cell(cell)
    last = runner(shell).last
    assert last.status == "computed" and "expired" in last.reasons[0]


@pytest.mark.usefixtures("run_history_held")
def test_a_cell_miss_does_not_wait_for_a_run_history_another_process_holds(shell: Any) -> None:
    """The miss explanation waits ~1 s at most for the index, not its 120 s lock_timeout."""
    shell.run_cell("%%task\nanswer = 6 * 7\n")
    last = runner(shell).last
    assert last.status == "computed" and shell.user_ns["answer"] == 42
    assert list(last.reasons) == [
        "reason not looked up: the run history is busy (another process holds it)"
    ]


def test_lock_option(shell: Any) -> None:
    cell = "%%task --lock\nlocked_value = 5\n"
    shell.run_cell(cell)
    shell.run_cell(cell)
    assert runner(shell).last.status == "cached"
    assert shell.user_ns["locked_value"] == 5


def test_display_outputs_are_replayed(shell: Any) -> None:
    from IPython.utils.capture import capture_output

    cell = (
        "%%task\nfrom IPython.display import HTML, display\nimport sys\n"
        "print('to stdout')\nprint('to stderr', file=sys.stderr)\n"
        "display(HTML('<b>bold</b>'))\nvalue = 3\n"
    )
    with capture_output() as first:
        shell.run_cell(cell)
    with capture_output() as second:
        shell.run_cell(cell)
    assert runner(shell).last.status == "cached"
    assert first.stdout == second.stdout == "to stdout\n"
    assert first.stderr == second.stderr == "to stderr\n"
    html = [o.data for o in second.outputs if "text/html" in o.data]
    assert html[0]["text/html"] == "<b>bold</b>"
    assert "✓ cached" in html[-1]["text/plain"]


# --------------------------------------------------------------------------- %flow


def test_flow_commands(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from notebook_flow.config import get_metadata, get_store

    shell.run_cell("%%task --name counted\nc = 1\n")
    shell.run_cell("%%task --name counted\nc = 1\n")
    get_metadata(get_store()).flush()
    capsys.readouterr()

    shell.run_cell("%flow status")
    out = capsys.readouterr().out
    assert "store:" in out and "cell `counted`: cached" in out

    shell.run_cell("%flow stats")
    assert "hits 1" in capsys.readouterr().out

    runs = shell.run_line_magic("flow", "history counted -n 5")
    assert list(runs["state"]) == ["CACHED", "COMPLETED"]

    shell.run_cell("%flow explain")
    assert "cell `counted`: cached" in capsys.readouterr().out

    shell.run_cell("%flow config")
    assert "store = " in capsys.readouterr().out

    shell.run_cell("%flow clear --all")
    assert "add -y" in capsys.readouterr().out
    shell.run_cell("%flow clear counted")
    assert "removed 1 stored results" in capsys.readouterr().out
    shell.run_cell("%%task --name counted\nc = 1\n")
    assert runner(shell).last.status == "computed"
    shell.run_cell("%flow clear --all -y")
    assert "removed 1" in capsys.readouterr().out

    shell.run_line_magic("flow", "wait")
    assert "nothing to wait for" in capsys.readouterr().out
    locks = shell.run_line_magic("flow", "locks")
    assert locks.empty

    result = shell.run_cell("%flow frobnicate")
    assert not result.success


def test_flow_explain_names_what_changed(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shell.user_ns["threshold"] = 1
    shell.run_cell("%%task --name filt\nkept = [v for v in range(5) if v > threshold]\n")
    shell.user_ns["threshold"] = 2
    shell.run_cell("%%task --name filt\nkept = [v for v in range(5) if v > threshold]\n")
    capsys.readouterr()
    shell.run_cell("%flow explain filt")
    out = capsys.readouterr().out
    assert "cell `filt`: computed" in out and "variable `threshold` changed" in out


def test_flow_config_changes_settings(shell: Any, tmp_path: Path) -> None:
    from notebook_flow.config import settings

    shell.run_line_magic("flow", f"config store={tmp_path / 'other'} workers=3")
    assert settings().store == str(tmp_path / "other") and settings().workers == 3
    assert not shell.run_cell("%flow config workers=zero").success


def test_flow_status_and_wait_see_background_tasks(
    shell: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    gate = threading.Event()
    shell.user_ns["gate"] = gate
    shell.run_cell(
        "from notebook_flow import task\n"
        "@task(cache_policy=None)\ndef slow(x):\n    gate.wait(30)\n    return x\n"
        "fut = slow.submit(1)"
    )
    capsys.readouterr()
    shell.run_cell("%flow status")
    assert "background tasks: 1 not finished" in capsys.readouterr().out
    shell.run_cell("%flow wait --timeout 0.1")  # the task waits for the gate: still running
    assert "0 finished (0 failed), 1 still running" in capsys.readouterr().out
    gate.set()
    assert shell.user_ns["fut"].result(timeout=20) == 1
