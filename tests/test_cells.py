"""Cell analysis (reads, writes, opaque constructs) and what a ``%%task`` key depends on.

The key tests run cells through an in-process IPython shell with the extension loaded;
real kernels are in ``test_magics_kernel.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from notebook_flow.cells import analyze_cell, parse_duration
from notebook_flow.errors import ConfigurationError

# --------------------------------------------------------------------------- analysis


@pytest.mark.parametrize(
    ("code", "reads", "writes"),
    [
        ("y = f(x)", ["f", "x"], {"y"}),
        ("x += 1", ["x"], {"x"}),
        ("x[0] = 1", ["x"], {"x"}),
        ("x.attr = 1", ["x"], {"x"}),
        ("x['a'].b[2] = y", ["y", "x"], {"x"}),
        ("a, (b, *c) = t", ["t"], {"a", "b", "c"}),
        ("x = 1\nprint(x)", ["print"], {"x"}),
        ("x = x + 1", ["x"], {"x"}),
        ("import numpy as np\nm = np.mean(data)", ["data"], {"np", "m"}),
        ("from os import path as p, sep", [], {"p", "sep"}),
        ("def f(df):\n    return df.x + K\nr = f(data)", ["data", "K"], {"f", "r"}),
        (
            "class A:\n    k = 1\n    def m(self):\n        return helper(self.k)\na = A()",
            ["helper"],
            {"A", "a"},
        ),
        ("y = [v * k for v in vals]", ["vals", "k"], {"y"}),
        ("total = sum(v for v in vals)", ["sum", "vals"], {"total"}),
        ("if cond:\n    z = 1\nprint(z)", ["cond", "print", "z"], {"z"}),
        ("for i in range(3):\n    acc = acc + i", ["range", "acc"], {"i", "acc"}),
        ("with open(p) as fh:\n    txt = fh.read()", ["open", "p"], {"fh", "txt"}),
        ("del tmp", [], {"tmp"}),
        ("f = lambda v: v + offset", ["offset"], {"f"}),
    ],
)
def test_reads_and_writes(code: str, reads: list[str], writes: set[str]) -> None:
    a = analyze_cell(code)
    assert list(a.reads) == reads
    assert set(a.writes) == writes
    assert not a.opaque


def test_definitions_are_names_bound_only_by_def_class_import() -> None:
    a = analyze_cell("import math\ndef f(): ...\nclass C: ...\nx = 1\nimport os\nos = None")
    assert a.definitions == {"math", "f", "C"}
    assert a.context_names == frozenset()


def test_mutated_definition_is_a_value() -> None:
    a = analyze_cell("def f(): ...\nf.cache = {}")
    assert "f" not in a.definitions and "f" in a.writes


def test_with_targets_and_deletes() -> None:
    a = analyze_cell("with open(p) as fh:\n    data = fh.read()\ndel scratch")
    assert a.context_names == {"fh"}
    assert a.deletes == {"scratch"}


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("global g\ng = 1", "uses `global` g"),
        ("def f():\n    global counter\n    counter += 1\nf()", "uses `global` counter"),
        ("exec('q = 1')", "calls `exec`"),
        ("v = eval('1 + 1')", "calls `eval`"),
        ("from os import *", "uses `import *`"),
        ("ns = globals()", "calls `globals()`"),
        ("import asyncio\nawait asyncio.sleep(0)", "uses top-level `await`"),
        ("async with lock:\n    pass", "uses top-level `await`"),
    ],
)
def test_opaque_cells(code: str, reason: str) -> None:
    assert reason in analyze_cell(code).opaque


def test_await_inside_async_def_is_not_opaque() -> None:
    a = analyze_cell("async def f():\n    await g()\nr = f")
    assert not a.opaque
    assert "g" in a.reads


def test_code_hash_ignores_comments_and_spacing_but_not_code() -> None:
    base = analyze_cell("x = f(a)  # first\ny = x + 1\n").code_hash
    assert analyze_cell("# a comment\nx = f( a )\n\n\ny = x+1").code_hash == base
    assert analyze_cell("x = f(a)\ny = x + 2").code_hash != base


def test_syntax_error_is_raised() -> None:
    with pytest.raises(SyntaxError):
        analyze_cell("x = = 1")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("2w", 1209600.0),
        ("250ms", 0.25),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1x", "-1h", "0"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigurationError, match="duration"):
        parse_duration(text)


# --------------------------------------------------------------------------- keys, in a shell


def run(sh: Any, code: str) -> Any:
    result = sh.run_cell(code)
    if result.error_before_exec or result.error_in_exec:
        raise AssertionError(f"cell failed: {result.error_before_exec or result.error_in_exec!r}")
    return result


def status(sh: Any) -> str:
    magics = sh.magics_manager.registry["FlowMagics"]
    return str(magics.runner.last.status)


CELL = """%%task
total = helper(values) * factor  # a comment
runs.append(total)
"""


def define(sh: Any, factor: int = 2, inner_offset: int = 0) -> None:
    run(sh, "runs = []")
    run(
        sh,
        f"def inner(v):\n    return v + {inner_offset}\n\n"
        "def helper(vs):\n    return sum(inner(v) for v in vs)",
    )
    sh.user_ns["values"] = [1, 2, 3]
    sh.user_ns["factor"] = factor


def test_same_cell_hits_and_restores(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    define(shell)
    run(shell, CELL + 'print("computed", total)')
    assert status(shell) == "computed"
    assert shell.user_ns["runs"] == [12]
    first = capsys.readouterr().out
    del shell.user_ns["total"]
    shell.user_ns["runs"] = []
    run(shell, CELL + 'print("computed", total)')
    assert status(shell) == "cached"
    assert shell.user_ns["total"] == 12
    assert shell.user_ns["runs"] == [12]  # mutated in place: stored and restored
    replayed = capsys.readouterr().out
    assert "computed 12" in first and "computed 12" in replayed
    assert "✓ cached" in replayed


def test_comment_spacing_and_position_do_not_change_the_key(shell: Any) -> None:
    from notebook_flow import _identity

    define(shell)
    _identity.set_current_cell("cell-a")
    run(shell, CELL)
    shell.user_ns["runs"] = []
    run(shell, "unrelated = 1")  # the cell moves: other cells run in between
    _identity.set_current_cell("cell-b")
    run(
        shell,
        "%%task\n# recomputing the total\ntotal = helper( values )*factor\n\nruns.append(total)\n",
    )
    assert status(shell) == "cached"
    _identity.set_current_cell(None)


def test_changing_a_read_variable_misses(shell: Any) -> None:
    define(shell, factor=2)
    run(shell, CELL)
    shell.user_ns["runs"] = []
    shell.user_ns["factor"] = 3
    run(shell, CELL)
    assert status(shell) == "computed"
    assert shell.user_ns["total"] == 18
    magics = shell.magics_manager.registry["FlowMagics"]
    assert "variable `factor` changed" in magics.runner.last.reasons


def test_changing_a_helper_two_calls_deep_misses(shell: Any) -> None:
    define(shell, inner_offset=0)
    run(shell, CELL)
    define(shell, inner_offset=10)  # `inner` is called by `helper`, which the cell calls
    run(shell, CELL)
    assert status(shell) == "computed"
    assert shell.user_ns["total"] == 2 * (6 + 30)
    magics = shell.magics_manager.registry["FlowMagics"]
    assert "function `helper` changed" in magics.runner.last.reasons


def test_changing_the_code_misses(shell: Any) -> None:
    define(shell)
    run(shell, CELL)
    run(shell, CELL.replace("* factor", "* factor + 1"))
    assert status(shell) == "computed"


def test_functions_defined_in_a_cached_cell_use_the_live_namespace(shell: Any) -> None:
    cell = "%%task\nimport math\ndef scaled(v):\n    return v * SCALE\nroot = math.sqrt(n)\n"
    shell.user_ns.update(SCALE=2, n=16)
    run(shell, cell)
    for name in ("scaled", "math", "root"):
        del shell.user_ns[name]
    run(shell, cell)
    assert status(shell) == "cached"
    assert shell.user_ns["root"] == 4.0
    scaled = shell.user_ns["scaled"]
    assert scaled.__globals__ is shell.user_ns  # re-defined, not unpickled by value
    shell.user_ns["SCALE"] = 5
    assert scaled(2) == 10


def test_instances_of_classes_defined_in_the_cell_get_the_new_class(shell: Any) -> None:
    cell = "%%task\nclass Point:\n    def __init__(self, x):\n        self.x = x\np = Point(x0)\n"
    shell.user_ns["x0"] = 3
    run(shell, cell)
    del shell.user_ns["p"], shell.user_ns["Point"]
    run(shell, cell)
    assert status(shell) == "cached"
    assert isinstance(shell.user_ns["p"], shell.user_ns["Point"])
    assert shell.user_ns["p"].x == 3


def test_deleted_names_are_deleted_on_a_hit(shell: Any) -> None:
    cell = "%%task\nkeep = scratch * 2\ndel scratch\n"
    shell.user_ns["scratch"] = 4
    run(shell, cell)
    assert "scratch" not in shell.user_ns
    shell.user_ns["scratch"] = 4
    run(shell, cell)
    assert status(shell) == "cached"
    assert "scratch" not in shell.user_ns and shell.user_ns["keep"] == 8


def test_library_modules_key_by_version_and_builtins_not_at_all(shell: Any) -> None:
    from notebook_flow.cells import cell_components, input_names

    run(shell, "import json, numpy as np\nvalues = [1, 2]")
    a = analyze_cell("out = np.asarray(json.loads('[1]') + values); print(len(out))")
    names = input_names(a, shell.user_ns, shell.user_ns_hidden)
    assert names == ["np", "json", "values"]
    components = cell_components(a, shell.user_ns, names)
    assert "package `numpy`" in components
    assert not any("json" in label for label in components)  # stdlib: not keyed
    assert "variable `values`" in components


def test_names_bound_earlier_in_a_loop_body_are_not_inputs() -> None:
    """Issue 12, reproduction 6: a name assigned in a ``for`` body and read after it in the
    same body is not an input (it was keyed on, so the cell missed every run)."""
    a = analyze_cell("for i in range(3):\n    y = i * 2\n    print(y)\nwhile c:\n    w = 1\n    w")
    assert "y" not in a.reads and "w" not in a.reads and "i" not in a.reads
    # After the loop the old value may still be there (the loop may not run): an input.
    assert "y" in analyze_cell("for i in r:\n    y = i\nprint(y)").reads


def test_a_trailing_semicolon_is_part_of_the_code_hash() -> None:
    assert analyze_cell("x.sum();").code_hash != analyze_cell("x.sum()").code_hash
    assert analyze_cell("x.sum();  # c").code_hash == analyze_cell("x.sum() ;").code_hash
