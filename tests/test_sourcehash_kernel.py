"""source_components in a real ipykernel: same hashes after a restart; an edit names its cell."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _kernels import connect, last_json_line, run_cell, start_kernel

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent

HELPER_CELL = """
THRESHOLD = 3
def helper(x):
    return x * 2 + THRESHOLD
"""
CLASS_CELL = """
class Scaler:
    def __init__(self, k):
        self.k = k
    def apply(self, x):
        return helper(x) * self.k
"""
TASK_CELL = """
import numpy as np
def f(x):
    return Scaler(2).apply(x) + helper(x) + np.sum([x])
"""
SHOW_CELL = """
import json
from notebook_flow.sourcehash import source_components, class_fingerprint
print(json.dumps({"components": source_components(f), "class": class_fingerprint(Scaler)}))
"""


MAGIC_CELL = """
import logging, io
log = io.StringIO()
logging.getLogger("notebook_flow").addHandler(logging.StreamHandler(log))
def timed():
    %time y = 1
    return y
print(json.dumps(sorted(source_components(timed))) if not log.getvalue() else log.getvalue())
"""


def show(kc: Any) -> dict[str, Any]:
    return last_json_line(kc, SHOW_CELL)  # type: ignore[no-any-return]


def notebook(kc: Any, helper: str = HELPER_CELL, task: str = TASK_CELL) -> dict[str, Any]:
    for cell in (helper, CLASS_CELL, task):
        run_cell(kc, cell)
    return show(kc)


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    km = start_kernel(env, tmp_path)
    try:
        yield km
    finally:
        km.shutdown_kernel(now=True)


def test_components_survive_a_restart_and_an_edit_names_its_helper(kernel: Any) -> None:
    kc = connect(kernel)
    try:
        first = notebook(kc)
    finally:
        kc.stop_channels()
    comps = first["components"]
    assert set(comps) == {
        "source of task `f`",
        "source of helper `helper`",
        "global `THRESHOLD`",
        "class `Scaler`",
        "package `numpy`",
    }

    kernel.restart_kernel(now=True)
    kc = connect(kernel)
    try:
        assert notebook(kc) == first  # a new process, new cell file names: same hashes

        # A docstring and comments would move a bytecode hash; equal hashes show that the
        # cells' source was found (ipykernel's /tmp/ipykernel_<pid>/<hash>.py in linecache).
        documented = TASK_CELL.replace("def f(x):", "def f(x):\n    '''Docs.'''  # note")
        assert notebook(kc, task=documented) == first

        # IPython's own objects reached from a cell (a line magic becomes get_ipython()...)
        # count as the IPython package, without a warning about the shell's state.
        magic = run_cell(kc, MAGIC_CELL).strip().splitlines()[-1]
        assert json.loads(magic) == ["package `IPython`", "source of task `timed`"]

        edited = notebook(kc, helper=HELPER_CELL.replace("x * 2", "x * 5"))
        changed = {k for k in comps if edited["components"][k] != comps[k]}
        assert changed == {"source of helper `helper`"}
        assert edited["class"] == first["class"]
    finally:
        kc.stop_channels()
