"""``%flow auto`` / ``configure(auto_cells=True)`` / ``notebook-flow run --cache-all``: every
code cell is cached without editing the notebook (issue 12, reproduction 7)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from notebook_flow.cells.auto import auto_plain_reason, worth_storing

ROOT = Path(__file__).resolve().parent.parent


def run(sh: Any, code: str) -> Any:
    result = sh.run_cell(code)
    assert not (result.error_before_exec or result.error_in_exec), result
    return result


def last(sh: Any) -> Any:
    return sh.magics_manager.registry["FlowMagics"].runner.last


@pytest.fixture
def auto(shell: Any, isolated_store: Path) -> Any:
    run(shell, "%flow auto on")
    yield shell
    run(shell, "%flow auto off")


def test_auto_caches_a_slow_cell_and_runs_cheap_ones_plain(
    auto: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from notebook_flow.cells import auto as auto_rules

    run(auto, "import time\nbase = 20")
    run(auto, "time.sleep(0.3)\nslow = base + 1\nprint('slow', slow)")
    assert last(auto).status == "computed"
    # "Cheap" is measured; a busy machine can stretch any cell, so raise the bar here.
    minimum = auto_rules.MIN_SECONDS
    monkeypatch.setattr(auto_rules, "MIN_SECONDS", 30.0)
    run(auto, "quick = slow * 2")
    assert last(auto).status == "not stored"  # cheaper to run than to store
    assert auto.user_ns["quick"] == 42
    monkeypatch.setattr(auto_rules, "MIN_SECONDS", minimum)  # (undo() would undo fixtures)
    auto.user_ns.pop("slow")
    capsys.readouterr()
    run(auto, "time.sleep(0.3)\nslow = base + 1\nprint('slow', slow)")
    assert last(auto).status == "cached"
    assert auto.user_ns["slow"] == 21
    assert "slow 21" in capsys.readouterr().out


def test_storing_stops_once_it_costs_more_than_the_cell_is_worth(
    auto: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quick cell whose state is slow to serialize (a figure's object graph, here 300,000
    lists) is not stored, and serializing it stops at the point where it could no longer
    be worth it (duration / STORE_FACTOR), instead of finishing first."""
    from notebook_flow.cells import runner as runner_mod
    from notebook_flow.cells import state

    monkeypatch.delenv("NOTEBOOK_FLOW_AUTO_MIN_SECONDS", raising=False)
    magics = auto.magics_manager.registry["FlowMagics"]
    monkeypatch.setattr(magics.runner, "commit_seconds", 0.0)  # no commit measured yet
    outcomes: list[str] = []
    pack_result = runner_mod.pack_result

    def spy(*args: Any, **kwargs: Any) -> Any:
        assert kwargs["deadline"] is not None
        try:
            return pack_result(*args, **kwargs)
        except state.OverBudget:
            outcomes.append("over budget")
            raise

    monkeypatch.setattr(runner_mod, "pack_result", spy)
    run(auto, "import time\ntime.sleep(0.1)\nbig = [[i] for i in range(300_000)]")
    assert outcomes == ["over budget"]
    assert last(auto).status == "not stored"
    assert auto.user_ns["big"][-1] == [299_999]
    # A state that is quick to store is stored as before.
    run(auto, "time.sleep(0.2)\nsmall = [1, 2, 3]")
    assert last(auto).status == "computed"
    assert outcomes == ["over budget"]
    # A value of a (non-builtin) type that ran out of time once is not tried again with
    # no more time than it had: the second such cell is not even serialized.
    run(auto, "class Heavy:\n    pass")
    run(auto, "time.sleep(0.3)\nh1 = Heavy()\nh1.items = [[i] for i in range(300_000)]")
    assert outcomes == ["over budget"] * 2  # (it had 0.1 s or more)
    calls = len(outcomes)
    monkeypatch.setattr(runner_mod, "pack_result", lambda *a, **k: outcomes.append("packed"))
    run(auto, "time.sleep(0.06)\nh2 = Heavy()\nh2.items = [[1]]")  # (about 0.02 s to store)
    assert len(outcomes) == calls
    assert last(auto).status == "not stored"
    assert auto.user_ns["h2"].items == [[1]]


def test_walk_and_pack_stop_at_their_deadline() -> None:
    import time

    from notebook_flow.cells.state import OverBudget, pack, walk

    value = [[i] for i in range(5_000)]
    past = time.perf_counter() - 1
    with pytest.raises(OverBudget):
        walk([(("v",), value)], deadline=past)
    with pytest.raises(OverBudget):
        pack(value, {}, deadline=past)
    assert len(walk([(("v",), value)])) == 5_001  # no deadline: the whole walk
    assert len(walk([(("v",), [1, 2])], deadline=past)) == 1  # too small to look at the clock
    assert pack(value, {}, deadline=time.perf_counter() + 3600)
    with pytest.raises(OverBudget):  # scalars count too
        pack(list(range(5_000)), {}, deadline=past)


def test_off_cell_magics_and_ipython_commands_run_plain(
    auto: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run(auto, "%%task --off\nimport time\ntime.sleep(0.06)\noff = 1")
    assert auto.user_ns["off"] == 1
    run(auto, "%%capture\nx = 1")  # another cell magic: left alone
    run(auto, "%pwd")
    assert "running uncached" not in capsys.readouterr().err
    run(auto, "y = 2\n%pwd")
    assert "running uncached: it runs IPython magics" in capsys.readouterr().err
    assert auto.user_ns["y"] == 2


def test_auto_is_off_by_default_and_set_by_config(shell: Any, isolated_store: Path) -> None:
    from notebook_flow import config

    assert not config.settings().auto_cells
    run(shell, "z = 1")
    magics = shell.magics_manager.registry["FlowMagics"]
    assert magics._runner is None or magics._runner.last is None
    config.configure(auto_cells=True)
    run(shell, "import time\ntime.sleep(0.3)\nz = 2")
    assert last(shell).status == "computed"


def test_auto_env_variable(monkeypatch: pytest.MonkeyPatch, isolated_store: Path) -> None:
    from notebook_flow import config
    from notebook_flow.errors import ConfigurationError

    monkeypatch.setenv("NOTEBOOK_FLOW_AUTO_CELLS", "1")
    config._reset_for_tests()
    assert config.settings().auto_cells
    monkeypatch.setenv("NOTEBOOK_FLOW_AUTO_CELLS", "maybe")
    config._reset_for_tests()
    with pytest.raises(ConfigurationError, match="NOTEBOOK_FLOW_AUTO_CELLS"):
        config.settings()
    monkeypatch.delenv("NOTEBOOK_FLOW_AUTO_CELLS")
    config._reset_for_tests()


def test_plain_reasons() -> None:
    from notebook_flow.cells import analyze_cell

    assert auto_plain_reason(analyze_cell("import os\ndef f():\n    pass")) == ""
    assert auto_plain_reason(analyze_cell("get_ipython().run_line_magic('pwd', '')")) == ""
    assert auto_plain_reason(analyze_cell("x = 1")) is None
    assert not worth_storing(0.01, 0.0)
    assert not worth_storing(0.2, 0.1)
    assert worth_storing(0.2, 0.01)


@pytest.mark.kernel
def test_run_cache_all_caches_an_unedited_notebook(
    tmp_path: Path, python_env: dict[str, str]
) -> None:
    """Reproduction 7: a notebook without one %%task is cached by ``run --cache-all``."""
    import nbformat

    sources = [
        "import time\nimport numpy as np\nitems = [3, 1, 2]",
        "items.sort()\nnp.random.seed(0)",
        "time.sleep(0.3)\nsquares = [v * v for v in items]\na = np.random.rand()\nprint(squares)",
        "b = np.random.rand()\nprint(items, squares, f'{a:.6f} {b:.6f}')",
    ]
    cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb = nbformat.v4.new_notebook(
        cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}}
    )
    path = tmp_path / "plain.ipynb"
    nbformat.write(nb, path)

    def run_it(out: str) -> Any:
        proc = subprocess.run(
            [sys.executable, "-m", "notebook_flow.cli", "run", str(path), "--cache-all"]
            + ["--output", str(tmp_path / out)],
            env=python_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return nbformat.read(tmp_path / out, as_version=4)

    def streams(cell: Any) -> str:
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    first, second = run_it("first.ipynb"), run_it("second.ipynb")
    badges = [
        o.get("metadata", {}).get("notebook_flow", {}).get("badge") for o in second.cells[2].outputs
    ]
    assert "cached" in badges  # the slow cell came from the store
    expected = "[1, 2, 3] [1, 4, 9] 0.548814 0.715189\n"  # as a plain run prints it
    assert streams(first.cells[3]) == streams(second.cells[3]) == expected
    assert streams(first.cells[2]) in streams(second.cells[2])
