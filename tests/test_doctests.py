"""The examples in the package's docstrings run as written (as the README's do, see
``test_readme.py``): a ``>>>`` line a reader pastes must not rot. Examples that need what a
test cannot have (a bucket, a cluster) say ``# doctest: +SKIP`` on each line.

They run in a process of their own: importing every module (the dashboard, the Dask and
Redis backends) must not change what the other tests of this worker see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN_ALL = """
import doctest, importlib, json, pkgutil, sys
import notebook_flow

failed, examples, modules = {}, 0, 0
for _, name, _ in pkgutil.walk_packages(notebook_flow.__path__, "notebook_flow."):
    if name.endswith("__main__"):
        continue
    module = importlib.import_module(name)
    modules += 1
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = []
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test, out=report.append)
    examples += runner.tries
    if runner.failures:
        failed[name] = "".join(report)
print(json.dumps({"modules": modules, "examples": examples, "failed": failed}))
"""


def test_docstring_examples_run_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTEBOOK_FLOW_CONFIG_DIR": str(tmp_path)}
    env["NOTEBOOK_FLOW_STORE"] = str(tmp_path / "store")
    done = subprocess.run(
        [sys.executable, "-c", RUN_ALL], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["modules"] > 100 and got["examples"] > 100, got  # it did look
    assert not got["failed"], "\n".join(f"== {k}\n{v}" for k, v in got["failed"].items())
