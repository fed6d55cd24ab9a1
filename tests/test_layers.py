"""The layers of the run path import one way (see ``notebook_flow/_hooks.py``).

Bottom to top: ``tasks`` (the call path) → ``futures`` → ``runners`` → ``notebook``
(display). A module of a lower layer must not reach a higher layer through any chain of
imports — module level, inside functions, or under ``TYPE_CHECKING`` alike — so no
import cycle can run between these packages. The graph is read from the source with
``ast`` (nothing is imported), like import-linter's "layers" contract.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "notebook_flow"
LAYERS = (
    "notebook_flow.tasks",
    "notebook_flow.futures",
    "notebook_flow.runners",
    "notebook_flow.notebook",
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that defines ``name`` (a module, or an attribute of one)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (every import statement it contains)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] != "notebook_flow":
                    continue
                owner = _owner(target, modules)
                if owner is not None and owner != name:
                    deps.add(owner)
        graph[name] = deps
    return graph


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return i
    return None


def upward_chains(graph: dict[str, set[str]]) -> list[list[str]]:
    """For each module of a layer, the shortest import chain that reaches a higher layer."""
    found = []
    for start in sorted(graph):
        level = _layer(start)
        if level is None:
            continue
        parents: dict[str, str | None] = {start: None}
        queue = deque([start])
        while queue:
            current = queue.popleft()
            other = _layer(current)
            if other is not None and other > level:
                chain = [current]
                while (previous := parents[chain[-1]]) is not None:
                    chain.append(previous)
                found.append(chain[::-1])
                break
            for dep in sorted(graph[current]):
                if dep not in parents:
                    parents[dep] = current
                    queue.append(dep)
    return found


def test_every_layer_module_is_seen():
    graph = import_graph()
    for layer in LAYERS:
        assert layer in graph, layer
    assert "notebook_flow.tasks.call" in graph and "notebook_flow.runners.base" in graph


def test_no_import_chain_goes_up_a_layer():
    chains = upward_chains(import_graph())
    assert not chains, "imports going up a layer (use a hook, see _hooks.py):\n" + "\n".join(
        " -> ".join(chain) for chain in chains
    )


def test_the_check_finds_a_cycle_when_one_is_added():
    # The checker itself: a lazy import of the runners inside tasks/ is reported.
    graph = import_graph()
    graph["notebook_flow.tasks.definition"] = graph["notebook_flow.tasks.definition"] | {
        "notebook_flow.runners"
    }
    chains = upward_chains(graph)
    assert ["notebook_flow.tasks.definition", "notebook_flow.runners"] in chains


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from notebook_flow.runners import submit_task", "notebook_flow.runners"),
        ("def f():\n    from ..notebook import show", "notebook_flow.notebook"),
        (
            "import typing\nif typing.TYPE_CHECKING:\n    from notebook_flow import futures",
            "notebook_flow.futures",
        ),
    ],
)
def test_every_kind_of_import_is_an_edge(tmp_path, monkeypatch, source, expected):
    package = tmp_path / "notebook_flow"
    for module in ("tasks", "futures", "runners"):
        (package / module).mkdir(parents=True)
        (package / module / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "notebook.py").write_text("")
    (package / "tasks" / "call.py").write_text(source + "\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    assert expected in import_graph()["notebook_flow.tasks.call"]


def test_the_hooks_load_their_layers_only_when_used(python_env):
    # The package root wires the hooks without importing the runners or the display:
    # defining a task imports neither; submit() loads the runners; only a display, the
    # notebook layer.
    script = (
        "import sys\n"
        "from notebook_flow import task\n"
        "@task\n"
        "def f(x):\n"
        "    return x\n"
        "print(sorted(m for m in sys.modules if m.startswith(('notebook_flow.runners', "
        "'notebook_flow.futures', 'notebook_flow.notebook'))))\n"
        "import notebook_flow\n"
        "assert f.submit(2).result(timeout=60) == 2\n"
        "print('notebook_flow.runners' in sys.modules, 'notebook_flow.notebook' in sys.modules)\n"
        "notebook_flow.shutdown()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=python_env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "True False"]


def test_a_future_reaches_the_display_only_through_the_hook(monkeypatch):
    from notebook_flow import _hooks, task
    from notebook_flow.cache_policies import NONE
    from notebook_flow.futures import FutureList
    from notebook_flow.runners import shutdown

    @task(cache_policy=NONE)
    def one() -> int:
        return 1

    fut = one.submit()
    fut.result(timeout=60)
    shown: list[object] = []
    monkeypatch.setattr(_hooks, "show", shown.append)
    fut._ipython_display_()
    FutureList([fut])._ipython_display_()
    assert shown[0] is fut and isinstance(shown[1], FutureList)
    monkeypatch.setattr(_hooks, "show", None)  # no display layer: IPython shows the repr
    with pytest.raises(NotImplementedError):
        fut._ipython_display_()
    shutdown(wait=True)
