"""The examples in the package's docstrings run as written (as the README's do, see
``test_readme.py``): a ``>>>`` line a reader pastes must not rot. Examples that need what a
test cannot have (a bucket, a cluster) say ``# doctest: +SKIP`` on each line.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import notebook_flow

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(notebook_flow.__path__, "notebook_flow.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run_as_written(name: str) -> None:
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
