"""The ``notebook-flow`` command: headless runs that resume (the example notebooks run here,
as CI runs them), and the store commands."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from notebook_flow import cli

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def notebook_flow(
    env: dict[str, str], *args: str, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notebook_flow.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def statuses(stdout: str) -> dict[str, str]:
    """``{first line of the cell: status}`` from the progress lines of ``run``."""
    out = {}
    for line in stdout.splitlines():
        match = re.match(r"^  \[[ \d]+/\d+\] cell \d+\s+(.+?)\s+\d+\.\d+ s  (.*)$", line)
        if match:
            out[match.group(2).strip()] = match.group(1)
    return out


def notes(stdout: str) -> dict[str, str]:
    """``{first line of the cell: its ↳ note}`` (task results reused by a cell)."""
    out, last = {}, None
    for line in stdout.splitlines():
        match = re.match(r"^  \[[ \d]+/\d+\] cell \d+\s+(.+?)\s+\d+\.\d+ s  (.*)$", line)
        if match:
            last = match.group(2).strip()
        elif line.strip().startswith("↳") and last is not None:
            out[last] = line.strip()[1:].strip()
    return out


def write_notebook(path: Path, *sources: str, tags: dict[int, list[str]] | None = None) -> Path:
    import nbformat

    cells = [nbformat.v4.new_code_cell(s) for s in sources]
    for index, cell_tags in (tags or {}).items():
        cells[index].metadata["tags"] = cell_tags
    nb = nbformat.v4.new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    nbformat.write(nb, path)
    return path


@pytest.mark.kernel
def test_quickstart_runs_and_resumes(tmp_path: Path, python_env: dict[str, str]) -> None:
    import nbformat

    out = tmp_path / "out.ipynb"
    small = ["-p", "DAYS=3", "-p", "LATENCY=0.05", "-p", "N_BOOT=100"]
    args = ["run", str(NOTEBOOKS / "quickstart.ipynb"), *small, "--output", str(out)]
    first = notebook_flow(python_env, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    computed = [k for k, v in statuses(first.stdout).items() if v == "computed"]
    assert len(computed) == 4  # the %%task cells, listed by their first line of code
    assert not any(k.startswith("%%") for k in statuses(first.stdout))
    fetch = 'days = pd.date_range("2026-11-01", periods=DAYS…'
    assert statuses(first.stdout)[fetch] == "ran"

    second = notebook_flow(python_env, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert all(statuses(second.stdout)[k] == "cached" for k in computed)
    # The .map cell ran no task: every result came from the store, and the run says so.
    assert statuses(second.stdout)[fetch] == "reused"
    assert notes(second.stdout)[fetch].startswith("3 of 3 task results from the store")
    assert re.search(
        r"done: (\d+)/\1 cells .* from the store: 5 cells and 3 task results", second.stdout
    )

    nb = nbformat.read(out, as_version=4)
    mimes = {
        m for c in nb.cells if c.cell_type == "code" for o in c.outputs for m in o.get("data", {})
    }
    assert "image/png" in mimes and "text/html" in mimes
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "DAYS = 3" in injected[0].source


@pytest.mark.kernel
def test_resume_notebook_dies_then_resumes(tmp_path: Path, python_env: dict[str, str]) -> None:
    args = ["run", str(NOTEBOOKS / "resume.ipynb"), "-p", "STAGE_SECONDS=0.05"]
    args += ["--output", str(tmp_path / "out.ipynb")]
    first = notebook_flow(python_env, *args)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "kernel died" in first.stdout and "re-run the same command to resume" in first.stdout

    second = notebook_flow(python_env, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    got = statuses(second.stdout)
    assert got["walk1 = simulate(1, STAGE_SECONDS)"] == "cached"
    assert got["walk2 = walk1 + simulate(2, STAGE_SECONDS)"] == "cached"
    assert got["walk3 = walk2 + simulate(3, STAGE_SECONDS)"] == "computed"


@pytest.mark.kernel
def test_failing_cell_exits_non_zero_and_writes_the_notebook(
    tmp_path: Path, python_env: dict[str, str]
) -> None:
    import nbformat

    path = write_notebook(
        tmp_path / "fails.ipynb",
        "%%task\nx = 41\nprint('x is', x)",
        "raise ValueError('bad input file')",
        "print('never runs')",
    )
    result = notebook_flow(python_env, "run", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "failed" in result.stdout and "ValueError: bad input file" in result.stdout
    assert "never runs" not in result.stdout
    nb = nbformat.read(tmp_path / "fails.out.ipynb", as_version=4)
    assert nb.cells[0].outputs[0]["text"] == "x is 41\n"
    assert nb.cells[1].outputs[-1]["output_type"] == "error"
    assert nb.cells[2].outputs == []


@pytest.mark.kernel
def test_run_asks_for_each_cells_tally_in_its_own_request(
    tmp_path: Path, python_env: dict[str, str]
) -> None:
    """One execute request per code cell: the per-cell tally (task hits) rides on the
    cell's own request instead of a second round trip (60 ms a cell on a busy machine)."""
    import nbformat

    path = write_notebook(
        tmp_path / "count.ipynb",
        # Count the execute requests the kernel handles from here on.
        "handlers = get_ipython().kernel.shell_handlers\n"
        "handle, seen = handlers['execute_request'], []\n"
        "def counting(stream, idents, msg):\n"
        "    seen.append(msg['content']['code'])\n"
        "    return handle(stream, idents, msg)\n"
        "handlers['execute_request'] = counting",
        "x = 1",
        "print('requests', len(seen))",
    )
    result = notebook_flow(python_env, "run", str(path), "--output", str(tmp_path / "o.ipynb"))
    assert result.returncode == 0, result.stdout + result.stderr
    nb = nbformat.read(tmp_path / "o.ipynb", as_version=4)
    assert nb.cells[2].outputs[0]["text"] == "requests 2\n"  # cells 2 and 3, nothing between


@pytest.mark.kernel
def test_parameters_and_extension_loaded_by_the_runner(
    tmp_path: Path, python_env: dict[str, str]
) -> None:
    path = write_notebook(
        tmp_path / "params.ipynb",
        "n = 1\nlabel = 'default'",
        "%%task\ntotal = n * 10\nprint(label, total)",
        tags={0: ["parameters"]},
    )
    store = tmp_path / "elsewhere"
    args = ["run", str(path), "-p", "n=4", "-p", "label=custom", "--store", str(store)]
    result = notebook_flow(python_env, *args, "--output", str(tmp_path / "o.ipynb"))
    assert result.returncode == 0, result.stdout + result.stderr
    import nbformat

    nb = nbformat.read(tmp_path / "o.ipynb", as_version=4)
    assert nb.cells[1].source == "n = 4\nlabel = 'custom'"
    assert nb.cells[2].outputs[0]["text"] == "custom 40\n"
    assert any(store.joinpath("manifests").rglob("*.json"))


def test_parse_parameter() -> None:
    assert cli._parse_parameter("n=4") == ("n", 4)
    assert cli._parse_parameter("xs=[1, 2]") == ("xs", [1, 2])
    assert cli._parse_parameter("name=plain words") == ("name", "plain words")
    with pytest.raises(SystemExit):
        cli._parse_parameter("not a name=1")


# --------------------------------------------------------------------------- store commands


def make_results() -> None:
    from notebook_flow import task
    from notebook_flow.config import get_metadata, get_store

    @task(name="double")
    def double(x: int) -> int:
        return 2 * x

    @task(name="fleeting", cache_expiration=0.01)
    def fleeting(x: int) -> int:
        return x

    double(1)
    double(2)
    double(2)
    fleeting(1)
    get_metadata(get_store()).flush()


def test_history_stats_clear_gc(capsys: pytest.CaptureFixture[str]) -> None:
    import time

    make_results()
    assert cli.main(["history"]) == 0
    out = capsys.readouterr().out
    assert "double" in out and "CACHED" in out and "COMPLETED" in out
    assert cli.main(["history", "double", "-n", "1"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # header + 1 run
    assert cli.main(["stats"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^runs +4 \(1 hits, 3 misses, 0 failed, 0 crashed\)$", out, re.M), out
    assert re.search(r"^hit rate +25\.0%$", out, re.M), out
    assert re.search(r"^stored +3 results of 2 tasks and cells, \d+ B$", out, re.M), out

    time.sleep(0.05)
    assert cli.main(["gc"]) == 0
    assert "removed 1 expired" in capsys.readouterr().out
    assert cli.main(["clear"]) == 2
    assert cli.main(["clear", "double"]) == 0
    assert "removed 2 stored results" in capsys.readouterr().out
    assert cli.main(["clear", "--all", "-y"]) == 0
    assert "removed 0" in capsys.readouterr().out


def test_extension_commands_are_loaded_only_when_used(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[Any] = []

    def register(subparsers: Any) -> None:
        p = subparsers.add_parser("fake", help="a command of another module")
        p.add_argument("--flag", action="store_true")
        p.set_defaults(func=lambda args: calls.append(args.flag) or 0)

    module = types.ModuleType("fake_cli_module")
    module.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_cli_module", module)
    monkeypatch.setitem(cli.EXTENSIONS, "fake", "fake_cli_module:register")
    monkeypatch.setitem(cli.EXTENSIONS, "missing", "no_such_module_anywhere.cli:register")

    assert cli.main(["fake", "--flag"]) == 0
    assert calls == [True]
    assert cli.main(["missing"]) == 2
    assert "not available" in capsys.readouterr().err
    assert cli.main([]) == 2  # no command: help
    assert "fake" in capsys.readouterr().out


def test_history_shows_the_attempts_of_a_retried_run(capsys: pytest.CaptureFixture[str]) -> None:
    from notebook_flow import task
    from notebook_flow.config import get_metadata, get_store

    calls: list[int] = []

    @task(name="flaky", retries=2, retry_delay_seconds=0)
    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise ConnectionError("the service hiccuped")
        return x

    assert flaky(1) == 1
    get_metadata(get_store()).flush()
    assert cli.main(["history", "flaky"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["created", "task", "state", "attempts", "duration", "saved", "error"]
    assert row.split()[2:5] == ["flaky", "COMPLETED", "3"]


def test_formats_for_people() -> None:
    assert cli.format_size(512) == "512 B"
    assert cli.format_size(3_400_000) == "3.4 MB"
    text = cli.format_stats(
        {"runs": 154, "hits": 108, "misses": 46, "failures": 0, "crashed": 0, "in_flight": 2,
         "hit_rate": 0.7012987012987013, "time_saved": 83.25, "bytes_stored": 2_500_000_000,
         "entries": 19, "tasks": 7},
        "/data/.notebook_flow",
    )  # fmt: skip
    assert "70.1%" in text and "83.2 s" in text and "2.5 GB" in text and "2 running" in text
    assert "0.7012" not in text
    empty = cli.format_stats(
        {"runs": 0, "hits": 0, "misses": 0, "failures": 0, "crashed": 0, "in_flight": 0,
         "hit_rate": None, "time_saved": 0.0, "bytes_stored": 0, "entries": 0, "tasks": 0},
        "memory://x",
    )  # fmt: skip
    assert "hit rate    n/a" in empty
    assert cli._first_line("%%task --name clean\n# drop glitches\nvalid = raw.ok\n") == (
        "valid = raw.ok"
    )
    assert cli._first_line("%%task\n") == "%%task"
    assert cli._summary({"ran": 3, "cached": 4}, 5, 14, 20.15) == (
        "3 ran, 4 cached · from the store: 5 cells and 14 task results, 20.1 s of computing saved"
    )
    assert cli._summary({"ran": 1}, 1, 0, 0.001) == "1 ran · from the store: 1 cell"


def test_help_describes_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "see `" not in out
    commands = ["run", "history", "stats", "clear", "gc", *cli.EXTENSIONS]
    for name in commands:
        match = re.search(rf"^    {name}\s+(\S.*)$", out, re.M) or re.search(
            rf"^    {name}\n\s+(\S.*)$", out, re.M
        )
        assert match and len(match.group(1)) > 15, (name, out)
    assert set(cli.EXTENSIONS) <= set(cli.EXTENSION_HELP)


def test_flow_history_in_a_notebook_shows_attempts(shell: Any) -> None:
    from notebook_flow.config import get_metadata, get_store

    shell.run_cell(
        "from notebook_flow import task\n"
        "tries = []\n"
        "@task(name='shaky', retries=2, retry_delay_seconds=0)\n"
        "def shaky(x):\n"
        "    tries.append(x)\n"
        "    if len(tries) < 2:\n"
        "        raise ConnectionError('once')\n"
        "    return x\n"
        "shaky(1)\n"
    )
    get_metadata(get_store()).flush()
    runs = shell.run_line_magic("flow", "history shaky")
    assert list(runs["state"]) == ["COMPLETED"] and list(runs["attempt"]) == [2]
