"""Real kernels: the quickstart killed mid-way resumes, and cell-defined tasks keep their keys.

Executions are counted with marker files created with ``O_EXCL`` (one new file per run of a
cell or task body), so a count survives the SIGKILL of the kernel that made it.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import _kernels
import pytest

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "notebooks" / "quickstart.ipynb"
SMALL = {"DAYS": 3, "LATENCY": 0.05, "N_BOOT": 100, "SEED": 7}

MARKER_HELPER = '''
def _nf_mark(name):
    """Count one execution of ``name``: a new marker file; wait while a hold file exists."""
    import os, time
    i = 0
    while True:
        i += 1
        try:
            fd = os.open(os.path.join(MARKERS, f"{name}.{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        break
    while os.path.exists(os.path.join(MARKERS, f"hold-{name}")):
        time.sleep(0.02)
'''


class Kernel(_kernels.Kernel):
    """A real IPython kernel with the test's store, and a way to run code in it."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        super().__init__(env, cwd, stderr=subprocess.DEVNULL)

    def run(self, code: str, timeout: float = 120) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return _kernels.execute(self.kc, code, timeout)

    def ok(self, code: str) -> list[dict[str, Any]]:
        content, outputs = self.run(code)
        assert content["status"] == "ok", (
            code,
            content.get("ename"),
            content.get("evalue"),
            outputs,
        )
        return outputs

    def run_in_cell(self, code: str, cell_id: str) -> None:
        """Execute as JupyterLab does, with the cell's id in the request's metadata."""
        content = {"code": code, "silent": False, "store_history": True}
        content.update(user_expressions={}, allow_stdin=False, stop_on_error=True)
        msg = self.kc.session.msg("execute_request", content, metadata={"cellId": cell_id})
        self.kc.shell_channel.send(msg)
        reply = self.kc.get_shell_msg(timeout=60)
        while reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
            reply = self.kc.get_shell_msg(timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]

    def kill(self) -> None:
        os.kill(self.km.provisioner.pid, signal.SIGKILL)  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while self.km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.close()


def shown(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a notebook would show: streams joined per name, rich data, no badges."""
    out: list[tuple[Any, ...]] = []
    for msg in messages:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if out and out[-1][0] == "stream" and out[-1][1] == content["name"]:
                out[-1] = ("stream", content["name"], out[-1][2] + content["text"])
            else:
                out.append(("stream", content["name"], content["text"]))
        elif kind in ("display_data", "execute_result"):
            if "notebook_flow" in content.get("metadata", {}):
                continue  # the "cached" badge
            out.append((kind, content["data"]))
    return out


def count(markers: Path, name: str) -> int:
    return len(list(markers.glob(f"{name}.*")))


def instrument(source: str, index: int) -> str:
    """Mark each execution of a %%task cell body and of each @task function body."""
    lines = source.splitlines()
    if lines and lines[0].startswith("%%task"):
        lines.insert(1, f'_nf_mark("cell-{index}")')
        return "\n".join(lines)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    inserts = []
    for node in ast.walk(tree):
        decorators = [
            d.func if isinstance(d, ast.Call) else d for d in getattr(node, "decorator_list", [])
        ]
        if isinstance(node, ast.FunctionDef) and any(
            isinstance(d, ast.Name) and d.id == "task" for d in decorators
        ):
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                first = node.body[1]  # after the docstring
            inserts.append((first.lineno - 1, first.col_offset, f"task-{node.name}"))
    for lineno, col, name in sorted(inserts, reverse=True):
        lines.insert(lineno, " " * col + f'_nf_mark("{name}")')
    return "\n".join(lines)


def notebook_cells() -> list[str]:
    import nbformat

    nb = nbformat.read(QUICKSTART, as_version=4)
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "parameters" in cell.metadata.get("tags", []):
            cells.append("\n".join(f"{k} = {v!r}" for k, v in SMALL.items()))
        else:
            cells.append(instrument(cell.source, len(cells)))
    return cells


def test_quickstart_killed_mid_way_resumes_from_cache(
    tmp_path: Path, python_env: dict[str, str]
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    cells = notebook_cells()
    setup = f"MARKERS = {str(markers)!r}\n{MARKER_HELPER}"
    task_cells = [i for i, c in enumerate(cells) if c.startswith("%%task")]
    kill_at = next(i for i in task_cells if "--name report" in cells[i])
    before = [i for i in task_cells if i < kill_at]
    assert len(before) >= 3  # clean, summary, the plot

    # Run 1: every cell up to `report`, which is killed while it runs.
    first: dict[int, list[tuple[Any, ...]]] = {}
    kernel = Kernel(python_env, tmp_path)
    try:
        kernel.ok(setup)
        for i in range(kill_at):
            first[i] = shown(kernel.ok(cells[i]))
        (markers / f"hold-cell-{kill_at}").touch()
        kernel.kc.execute(cells[kill_at])
        deadline = time.monotonic() + 60
        while not count(markers, f"cell-{kill_at}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count(markers, f"cell-{kill_at}") == 1
    finally:
        kernel.kill()
    (markers / f"hold-cell-{kill_at}").unlink()
    fetched = count(markers, "task-fetch_day")
    assert fetched == SMALL["DAYS"]

    # Run 2: a new kernel runs every cell again.
    second: dict[int, list[tuple[Any, ...]]] = {}
    badges: dict[int, bool] = {}
    kernel = Kernel(python_env, tmp_path)
    try:
        kernel.ok(setup)
        for i, code in enumerate(cells):
            messages = kernel.ok(code)
            second[i] = shown(messages)
            badges[i] = any("notebook_flow" in m["content"].get("metadata", {}) for m in messages)
    finally:
        kernel.close()

    # Finished cells and tasks were not executed again; the killed cell and the rest were.
    for i in before:
        assert count(markers, f"cell-{i}") == 1, cells[i].splitlines()[0]
        assert badges[i], cells[i].splitlines()[0]
    assert count(markers, f"cell-{kill_at}") == 2
    assert not badges[kill_at]
    assert count(markers, "task-fetch_day") == SMALL["DAYS"]
    assert count(markers, "task-bootstrap_mean") == 5  # one per station, run 1 only

    # Replayed outputs equal the originals: stdout, HTML tables, the plot's image/png.
    for i in before:
        assert second[i] == first[i], cells[i].splitlines()[0]
    kinds = set()
    for i in before:
        for out in first[i]:
            kinds.update((out[0], part) for part in ([out[1]] if out[0] == "stream" else out[1]))
    assert ("display_data", "image/png") in kinds
    assert ("execute_result", "text/html") in kinds
    assert ("stream", "stdout") in kinds


CELL_V1 = """
from notebook_flow import task
import mymod

NOTE = "first version"  # an unrelated line in the same cell


@task
def square(x):
    _nf_mark("task-square")
    return x * x
"""


def test_cell_tasks_keep_keys_across_restarts_and_unrelated_edits(
    tmp_path: Path, python_env: dict[str, str]
) -> None:
    python_env["JPY_SESSION_NAME"] = str(tmp_path / "analysis.ipynb")
    markers = tmp_path / "markers"
    markers.mkdir()
    (tmp_path / "mymod.py").write_text("def f():\n    return 1\n")
    setup = f"MARKERS = {str(markers)!r}\n{MARKER_HELPER}"
    autoreload_cell = "%load_ext autoreload\n%autoreload 2"
    module_cell = '%%task\n_nf_mark("cell-mod")\nvalue = mymod.f()\n'

    kernel = Kernel(python_env, tmp_path)
    try:
        kernel.ok(setup)
        kernel.ok("%load_ext notebook_flow")
        kernel.ok(autoreload_cell)
        kernel.ok(CELL_V1)
        kernel.ok("assert square(3) == 9")
        kernel.ok(module_cell)
        kernel.ok("assert value == 1")
    finally:
        kernel.close()
    assert count(markers, "task-square") == 1

    edited = CELL_V1.replace('"first version"  # an unrelated', '"second version"  # an edited')
    kernel = Kernel(python_env, tmp_path)
    try:
        kernel.ok(setup)
        kernel.ok(autoreload_cell)
        kernel.ok("%load_ext notebook_flow")
        kernel.ok(edited)
        kernel.ok("assert square(3) == 9")
        assert count(markers, "task-square") == 1  # a hit after restart and edit
        kernel.ok(module_cell)
        assert count(markers, "cell-mod") == 1
        # %autoreload picks up the module's new code, and the key follows it.
        time.sleep(1.1)  # a new mtime for autoreload
        (tmp_path / "mymod.py").write_text("def f():\n    return 2\n")
        kernel.ok(module_cell)
        kernel.ok("assert value == 2")
        assert count(markers, "cell-mod") == 2
        kernel.ok(textwrap.dedent(edited).replace("x * x", "x * x + 0"))
        kernel.ok("assert square(3) == 9")
        assert count(markers, "task-square") == 2  # the task's own code changed
        # Notebook identity (path, cell id) is recorded with runs, never used in keys.
        kernel.run_in_cell("%%task --name ident\nv = 1", "cell-one")
        kernel.run_in_cell("%%task --name ident\nv = 1", "cell-two")
        content, outputs = kernel.run(
            "import notebook_flow as nf\nfrom notebook_flow import config\n"
            "config.get_metadata(config.get_store()).flush()\n"
            "h = nf.history(task='ident')\n"
            "print(sorted(zip(h.state, h.cell, h.notebook)))"
        )
    finally:
        kernel.close()
    text = "".join(o["content"].get("text", "") for o in outputs)
    notebook = python_env["JPY_SESSION_NAME"]
    assert f"('CACHED', 'cell-two', '{notebook}')" in text
    assert f"('COMPLETED', 'cell-one', '{notebook}')" in text
