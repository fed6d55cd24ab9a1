"""sourcehash: the deep TASK_SOURCE of functions and classes defined in notebook cells.

Cells are simulated the way IPython and ipykernel compile them: a fresh namespace, a
pseudo file name (``<ipython-input-N-…>`` or ``/tmp/ipykernel_<pid>/<n>.py``) and the cell's
text registered in ``linecache``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import json
import linecache
import logging
import os
import subprocess
import sys
import textwrap
import types
import uuid
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notebook_flow import sourcehash
from notebook_flow.sourcehash import class_fingerprint, function_fingerprint, source_components

_counter = itertools.count(1)


class Notebook:
    """A namespace that runs "cells" like IPython (``ipython``) or ipykernel (``ipykernel``)."""

    def __init__(self, style: str = "ipython") -> None:
        self.style = style
        self.ns: dict[str, object] = {"__name__": f"nbcell_{uuid.uuid4().hex[:8]}"}

    def run(self, source: str) -> Notebook:
        source = textwrap.dedent(source)
        n = next(_counter)
        tag = uuid.uuid4().hex[:12]
        if self.style == "ipython":
            filename = f"<ipython-input-{n}-{tag}>"
        else:
            filename = f"/tmp/ipykernel_{4000 + n}/{int(tag, 16)}.py"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec", dont_inherit=True), self.ns)
        return self

    def __getitem__(self, name: str) -> object:
        return self.ns[name]


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


@pytest.fixture(params=["ipython", "ipykernel"])
def nb(request: pytest.FixtureRequest) -> Notebook:
    return Notebook(request.param)


HELPERS = """
    THRESHOLD = 3
    def deep(x):
        return x * 2
    def clean(x):
        '''Clean a value.'''
        return deep(x) + THRESHOLD
"""
TASK = """
    def f(x):
        return clean(x) + 1
"""


# --------------------------------------------------------------------------- labels


def test_components_have_readable_labels(nb: Notebook) -> None:
    nb.run(HELPERS).run(TASK)
    comps = source_components(nb["f"])
    assert set(comps) == {
        "source of task `f`",
        "source of helper `clean`",
        "source of helper `deep`",
        "global `THRESHOLD`",
    }
    assert all(len(h) == 32 and int(h, 16) >= 0 for h in comps.values())


def test_label_argument_names_the_root() -> None:
    nb = Notebook().run(HELPERS).run(TASK)
    assert "source of task `load`" in source_components(nb["f"], label="load")
    assert "source of task `f (v2)`" in source_components(nb["f"], label="source of task `f (v2)`")
    plain = source_components(nb["f"])
    assert list(source_components(nb["f"], label="x").values()) == list(plain.values())


def test_result_is_a_copy() -> None:
    nb = Notebook().run(HELPERS).run(TASK)
    first = source_components(nb["f"])
    first["source of task `f`"] = "mutated"
    first.clear()
    assert source_components(nb["f"])["source of task `f`"] != "mutated"


# --------------------------------------------------------------------------- what changes the hash


def test_editing_a_helper_two_calls_deep_names_that_helper(nb: Notebook) -> None:
    nb.run(HELPERS).run(TASK)
    before = source_components(nb["f"])
    nb.run("""
        def deep(x):
            return x * 3
    """)
    after = source_components(nb["f"])
    assert changed(before, after) == {"source of helper `deep`"}
    assert function_fingerprint(nb["f"]) != before  # and the one-hash view moves too


def test_comments_whitespace_and_docstrings_do_not_count(nb: Notebook) -> None:
    nb.run(HELPERS).run(TASK)
    before = source_components(nb["f"])
    fp_before = function_fingerprint(nb["f"])
    nb.run('''
        THRESHOLD = 3

        def deep(x):   # doubled
            # a comment line
            return x   *   2

        def clean(x):
            """A different docstring, spread
            over two lines."""

            return deep(x) + THRESHOLD
    ''').run("""
        def f(x):
            '''Now with a docstring.'''
            return clean(x) + 1  # plus one
    """)
    assert source_components(nb["f"]) == before
    assert function_fingerprint(nb["f"]) == fp_before


def test_decorators_of_the_task_do_not_count_but_its_body_does() -> None:
    nb = (
        Notebook()
        .run(HELPERS)
        .run("""
        import functools
        def deco(fn):
            return fn
        def f(x):
            return clean(x) + 1
    """)
    )
    plain = source_components(nb["f"])["source of task `f`"]
    nb.run("""
        @deco
        def f(x):
            return clean(x) + 1
    """)
    assert source_components(nb["f"])["source of task `f`"] == plain
    nb.run("""
        @deco
        def f(x):
            return clean(x) + 2
    """)
    assert source_components(nb["f"])["source of task `f`"] != plain


def test_global_constant_changes(nb: Notebook) -> None:
    nb.run(HELPERS).run(TASK)
    before = source_components(nb["f"])
    nb.run("THRESHOLD = 4")
    assert changed(before, source_components(nb["f"])) == {"global `THRESHOLD`"}
    nb.run("THRESHOLD = 4.0")  # equal, but a different type: still a change
    nb.run("THRESHOLD = 4")
    assert changed(before, source_components(nb["f"])) == {"global `THRESHOLD`"}
    nb.run("THRESHOLD = 3")
    assert source_components(nb["f"]) == before


def test_mutable_globals_are_rehashed_on_every_call() -> None:
    import numpy as np

    nb = Notebook().run("""
        import numpy as np
        CONFIG = {"lr": 0.1, "layers": [64, 64]}
        WEIGHTS = np.arange(6.0)
        def f(x):
            return x * CONFIG["lr"] + WEIGHTS.sum()
    """)
    before = source_components(nb["f"])
    assert "global `CONFIG`" in before and "global `WEIGHTS`" in before
    nb.ns["CONFIG"]["layers"].append(32)  # type: ignore[index]
    after = source_components(nb["f"])
    assert changed(before, after) == {"global `CONFIG`"}
    nb.ns["WEIGHTS"][2] = 7.0  # type: ignore[index]
    assert changed(after, source_components(nb["f"])) == {"global `WEIGHTS`"}
    assert isinstance(nb["WEIGHTS"], np.ndarray)


def test_closure_values(nb: Notebook) -> None:
    nb.run("""
        def make(n, scale=2):
            def inner(x):
                return x * scale + n
            return inner
        add1 = make(1)
        add2 = make(2)
    """)
    one, two = source_components(nb["add1"]), source_components(nb["add2"])
    assert set(one) == {"source of task `make.inner`", "closure `n`", "closure `scale`"}
    assert changed(one, two) == {"closure `n`"}


def test_closure_cell_rebound_with_nonlocal() -> None:
    nb = Notebook().run("""
        def counter():
            step = 1
            def bump(x):
                return x + step
            def set_step(v):
                nonlocal step
                step = v
            return bump, set_step
        bump, set_step = counter()
    """)
    before = source_components(nb["bump"])
    nb["set_step"](5)  # type: ignore[operator]
    assert changed(before, source_components(nb["bump"])) == {"closure `step`"}


def test_helper_closures_and_globals_of_other_helpers() -> None:
    nb = Notebook().run("""
        def make(k):
            def scaled(x):
                return x * k
            return scaled
        triple = make(3)
        def f(x):
            return triple(x)
    """)
    comps = source_components(nb["f"])
    assert "closure `k` of `make.scaled`" in comps
    nb.run("triple = make(4)")
    assert changed(comps, source_components(nb["f"])) == {"closure `k` of `make.scaled`"}


def test_empty_closure_cell_is_rechecked() -> None:
    nb = Notebook().run("""
        def outer():
            def inner(x):
                return later(x)
            first = source_components(inner)
            def later(x):
                return x
            return inner, first
    """)
    nb.ns["source_components"] = source_components
    inner, first = nb["outer"]()  # type: ignore[operator]
    assert "source of helper `outer.later`" not in first  # the cell was still empty
    assert "source of helper `outer.later`" in source_components(inner)


def test_parameters_and_locals_are_not_globals() -> None:
    nb = Notebook().run("""
        x = 100
        y = 200
        def f(x):
            y = x + 1
            return [y for x in range(3)]
    """)
    assert set(source_components(nb["f"])) == {"source of task `f`"}


def test_defaults_of_helpers_count() -> None:
    nb = Notebook().run("""
        def helper(x, factor=2):
            return x * factor
        def f(x):
            return helper(x)
    """)
    before = source_components(nb["f"])
    nb.ns["helper"].__defaults__ = (3,)  # type: ignore[union-attr]
    assert changed(before, source_components(nb["f"])) == {"source of helper `helper`"}


# --------------------------------------------------------------------------- classes


CLASS = """
    SCALE = 2
    def helper(v):
        return v + 1
    class Point:
        '''A point.'''
        ORIGIN = (0, 0)
        registry = []
        def __init__(self, x, y):
            self.x, self.y = x, y
        def norm(self):
            return helper(self.x ** 2 + self.y ** 2) ** 0.5 * SCALE
        @property
        def flipped(self):
            return Point(self.y, self.x)
        @staticmethod
        def zero():
            return Point(0, 0)
        @classmethod
        def unit(cls):
            return cls(1, 0)
    def f(x):
        return Point(x, x).norm()
"""


def test_class_defined_in_a_cell(nb: Notebook) -> None:
    nb.run(CLASS)
    with pytest.raises((OSError, TypeError)):  # what the stdlib can't do for notebook classes
        inspect.getsource(nb["Point"])  # type: ignore[arg-type]
    comps = source_components(nb["f"])
    assert {"class `Point`", "source of helper `helper`", "global `SCALE`"} <= set(comps)
    fp = class_fingerprint(nb["Point"])  # type: ignore[arg-type]
    assert comps["class `Point`"] == fp

    nb.run(CLASS.replace("return cls(1, 0)", "return cls(1, 1)"))  # a classmethod body
    assert class_fingerprint(nb["Point"]) != fp  # type: ignore[arg-type]
    assert changed(comps, source_components(nb["f"])) == {"class `Point`"}

    nb.run(CLASS.replace("'''A point.'''", "'''Docs.'''  # note"))  # cosmetic
    assert class_fingerprint(nb["Point"]) == fp  # type: ignore[arg-type]

    nb.run(CLASS.replace("ORIGIN = (0, 0)", "ORIGIN = (0, 1)"))  # a class constant
    assert class_fingerprint(nb["Point"]) != fp  # type: ignore[arg-type]

    nb.run(CLASS.replace("return v + 1", "return v + 2"))  # what a method calls
    after = source_components(nb["f"])
    assert changed(comps, after) == {"source of helper `helper`"}


def test_class_level_data_counts_by_value() -> None:
    src = """
        class Options:
            DEFAULTS = {"lr": 0.1, "layers": [64]}
            def get(self, k):
                return self.DEFAULTS[k]
    """
    nb = Notebook().run(src)
    fp = class_fingerprint(nb["Options"])  # type: ignore[arg-type]
    nb.run(src.replace("[64]", "[64, 32]"))
    assert class_fingerprint(nb["Options"]) != fp  # type: ignore[arg-type]


def test_class_holding_its_own_instance_terminates() -> None:
    nb = Notebook().run("""
        class Unit:
            def __init__(self, v=1):
                self.v = v
        Unit.ONE = Unit()
        def f():
            return Unit.ONE.v
    """)
    fp = class_fingerprint(nb["Unit"])  # type: ignore[arg-type]
    assert fp == class_fingerprint(nb["Unit"])  # type: ignore[arg-type]
    assert "class `Unit`" in source_components(nb["f"])


def test_class_state_filled_in_place_keeps_the_fingerprint() -> None:
    nb = Notebook().run(CLASS)
    fp = class_fingerprint(nb["Point"])  # type: ignore[arg-type]
    nb.ns["Point"].registry.append(1)  # type: ignore[union-attr]
    assert class_fingerprint(nb["Point"]) == fp  # type: ignore[arg-type]


def test_monkeypatched_method_is_seen() -> None:
    nb = Notebook().run(CLASS)
    before = source_components(nb["f"])
    nb.run("""
        def norm(self):
            return 0.0
        Point.norm = norm
    """)
    assert "class `Point`" in changed(before, source_components(nb["f"]))


def test_user_bases_count_recursively_library_bases_by_version() -> None:
    nb = Notebook().run("""
        import collections
        import json
        class Base:
            def size(self):
                return 1
        class Child(Base, json.JSONEncoder):
            pass
        def f():
            return Child().size()
    """)
    comps = source_components(nb["f"])
    assert {"class `Child`", "class `Base`"} <= set(comps)
    fp = class_fingerprint(nb["Child"])  # type: ignore[arg-type]
    nb.run("""
        class Base:
            def size(self):
                return 2
        class Child(Base, json.JSONEncoder):
            pass
    """)
    assert class_fingerprint(nb["Child"]) != fp  # type: ignore[arg-type]


def test_mangled_names_and_super_keep_source_hashing() -> None:
    # A docstring edit would move a bytecode hash (docstrings are code constants), so an
    # unchanged fingerprint proves these methods were hashed from their source.
    src = """
        class Base:
            def __init__(self):
                self.__secret = 1
        class Child(Base):
            def __init__(self):
                '''DOC'''
                super().__init__()
                self.__own = 2
            def get(self):
                return self.__own
    """
    nb = Notebook().run(src)
    fp = class_fingerprint(nb["Child"])  # type: ignore[arg-type]
    nb.run(src.replace("DOC", "Other documentation"))
    assert class_fingerprint(nb["Child"]) == fp  # type: ignore[arg-type]


def test_dataclass_and_enum_in_cells() -> None:
    src = """
        import dataclasses
        import enum
        @dataclasses.dataclass(frozen=True)
        class Config:
            lr: float = 0.1
            tags: list = dataclasses.field(default_factory=list)
        class Color(enum.Enum):
            RED = 1
            GREEN = 2
        def f():
            return Config(), Color.RED
    """
    nb = Notebook().run(src)
    comps = source_components(nb["f"])
    assert {"class `Config`", "class `Color`"} <= set(comps)
    config, color = class_fingerprint(nb["Config"]), class_fingerprint(nb["Color"])  # type: ignore[arg-type]
    nb.run(src.replace("lr: float = 0.1", "lr: float = 0.2").replace("GREEN = 2", "GREEN = 3"))
    assert class_fingerprint(nb["Config"]) != config  # type: ignore[arg-type]
    assert class_fingerprint(nb["Color"]) != color  # type: ignore[arg-type]
    nb.run(src)
    assert source_components(nb["f"]) == comps


def test_instances_of_user_classes_as_globals() -> None:
    nb = Notebook().run("""
        class Model:
            def __init__(self, w):
                self.w = w
            def predict(self, x):
                return x * self.w
        model = Model(3)
        predict = model.predict
        def f(x):
            return model.predict(x) + predict(x)
    """)
    before = source_components(nb["f"])
    assert {"global `model`", "global `predict`", "class `Model`"} <= set(before)
    nb.ns["model"].w = 4  # type: ignore[attr-defined]
    assert changed(before, source_components(nb["f"])) == {"global `model`", "global `predict`"}


# --------------------------------------------------------------------------- libraries, modules


def test_third_party_code_counts_by_package_version() -> None:
    import numpy as np
    import pandas as pd

    nb = Notebook().run("""
        import json, math
        import numpy as np
        from pandas import DataFrame
        def f(x):
            return np.linalg.norm(x), DataFrame(), math.sqrt(2), json.dumps(len(x))
    """)
    comps = source_components(nb["f"])
    assert set(comps) == {"source of task `f`", "package `numpy`", "package `pandas`"}
    assert comps["package `numpy`"] == xxhash.xxh3_128_hexdigest(
        f"numpy=={np.__version__}".encode()
    )
    assert comps["package `pandas`"] == xxhash.xxh3_128_hexdigest(
        f"pandas=={pd.__version__}".encode()
    )


def test_library_objects_and_instances() -> None:
    nb = Notebook().run("""
        import numpy as np
        add = np.add                      # a ufunc: code, not data
        norm = np.linalg.norm             # a library function under another name
        TABLE = np.arange(3)              # library *data*: by value (and its package)
        def f(x):
            return add(x, 1), norm(x), TABLE
    """)
    comps = source_components(nb["f"])
    assert set(comps) == {"source of task `f`", "package `numpy`", "global `TABLE`"}


def test_library_function_as_the_task_itself() -> None:
    import json

    import pandas as pd

    comps = source_components(pd.read_csv)
    assert set(comps) == {"source of task `read_csv`", "package `pandas`"}
    assert set(source_components(json.dumps)) == {"source of task `dumps`"}
    assert source_components(len) == source_components(len)


def _write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def user_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("nfsh_")]:
        del sys.modules[name]


def test_user_module_attributes_are_followed(user_modules: Path) -> None:
    pkg = user_modules / "nfsh_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write_module(
        pkg,
        "sub",
        """
        FACTOR = 3
        def scale(x):
            return x * FACTOR
        def unused(x):
            return x
    """,
    )
    _write_module(
        user_modules,
        "nfsh_utils",
        """
        LIMIT = 10
        def clean(x):
            return x[:LIMIT]
    """,
    )
    nb = Notebook().run("""
        import nfsh_utils
        import nfsh_pkg.sub
        def f(x):
            return nfsh_utils.clean(x), nfsh_pkg.sub.scale(2)
    """)
    comps = source_components(nb["f"])
    assert set(comps) == {
        "source of task `f`",
        "source of helper `nfsh_utils.clean`",
        "global `nfsh_utils.LIMIT`",
        "source of helper `nfsh_pkg.sub.scale`",
        "global `nfsh_pkg.sub.FACTOR`",
    }
    _write_module(
        user_modules,
        "nfsh_utils",
        """
        LIMIT = 10
        def clean(x):
            return x[:LIMIT - 1]
    """,
    )
    importlib.reload(sys.modules["nfsh_utils"])
    assert changed(comps, source_components(nb["f"])) == {"source of helper `nfsh_utils.clean`"}


def test_local_imports_inside_the_body(user_modules: Path) -> None:
    _write_module(
        user_modules,
        "nfsh_local",
        """
        def helper(x):
            return x + 1
    """,
    )
    nb = Notebook().run("""
        def f(x):
            from nfsh_local import helper
            return helper(x)
    """)
    import nfsh_local  # noqa: F401  (imported by the cell's body at run time)

    assert "source of helper `nfsh_local.helper`" in source_components(nb["f"])


def test_a_module_edited_but_not_reloaded_keys_on_the_running_code(user_modules: Path) -> None:
    _write_module(
        user_modules,
        "nfsh_stale",
        """
        def helper(x):
            '''Doc.'''
            return x + 1
    """,
    )
    import nfsh_stale

    nb = Notebook().run("""
        import nfsh_stale
        def f(x):
            return nfsh_stale.helper(x)
    """)
    _write_module(
        user_modules,
        "nfsh_stale",
        """
        def helper(x):
            '''Doc.'''
            return x + 20  # (a new size: a same-second, same-size edit reuses the .pyc)
    """,
    )
    linecache.checkcache()
    stale = source_components(nb["f"])["source of helper `nfsh_stale.helper`"]
    importlib.reload(nfsh_stale)
    fresh = source_components(nb["f"])["source of helper `nfsh_stale.helper`"]
    # The text on disk is not what runs: keying on it would store x + 1 results under the
    # key of x + 20. The running code is hashed instead, which differs from the new source.
    assert stale != fresh
    assert nb["f"](1) == 21  # type: ignore[operator]


# --------------------------------------------------------------------------- shapes of code


def test_recursion_and_mutual_recursion_terminate(nb: Notebook) -> None:
    nb.run("""
        def even(n):
            return True if n == 0 else odd(n - 1)
        def odd(n):
            return False if n == 0 else even(n - 1)
        def fact(n):
            return 1 if n <= 1 else n * fact(n - 1)
    """)
    assert set(source_components(nb["even"])) == {"source of task `even`", "source of helper `odd`"}
    assert set(source_components(nb["fact"])) == {"source of task `fact`"}


def test_a_global_holding_the_function_itself_terminates() -> None:
    nb = Notebook().run("""
        def f(x):
            return HANDLERS["f"](x - 1) if x else 0
        HANDLERS = {"f": f}
    """)
    a = source_components(nb["f"])
    b = source_components(nb["f"])
    assert a == b and "global `HANDLERS`" in a


def test_lambdas_several_per_line(nb: Notebook) -> None:
    nb.run("""
        sq, cube = (lambda x: x * x), (lambda x: x ** 3)
        def f(x):
            return sq(x) + cube(x)
    """)
    before = source_components(nb["f"])
    assert {"source of helper `sq`", "source of helper `cube`"} <= set(before)
    nb.run("sq, cube = (lambda x: x*x), (lambda x: x ** 4)   # cube changed")
    assert changed(before, source_components(nb["f"])) == {"source of helper `cube`"}


def test_code_without_source_is_hashed_by_its_code_object() -> None:
    def define(source: str) -> types.FunctionType:
        ns: dict[str, object] = {"__name__": "nbexec"}
        exec(
            compile(textwrap.dedent(source), "<string>", "exec", dont_inherit=True), ns
        )  # no linecache entry
        return ns["f"]  # type: ignore[return-value]

    base = source_components(
        define("""
        def f(x):
            return x * 2 + len({"a", "b"})
    """)
    )
    cosmetic = source_components(
        define("""
        def f(x):   # comment

            return x*2   +   len({"a", "b"})
    """)
    )
    edited = source_components(
        define("""
        def f(x):
            return x * 3 + len({"a", "b"})
    """)
    )
    assert base == cosmetic
    assert base != edited


def test_nested_function_as_task_and_async_and_generators() -> None:
    nb = Notebook().run("""
        async def fetch(x):
            return x
        def gen(n):
            yield from range(n)
        def f(n):
            return list(gen(n)), fetch
    """)
    assert {"source of helper `gen`", "source of helper `fetch`"} <= set(source_components(nb["f"]))


# --------------------------------------------------------------------------- wrappers


def test_tasks_partials_bound_methods_and_lru_cache() -> None:
    class FakeTask:
        __notebook_flow_task__ = True

        def __init__(self, fn: object) -> None:
            self.fn = fn

    nb = Notebook().run("""
        import functools
        def step(x):
            return x + 1
        @functools.lru_cache
        def memo(x):
            return x * 2
        def base(x, k):
            return x ** k
        square = functools.partial(base, k=2)
        def f(x):
            return step_task(x) + memo(x) + square(x)
    """)
    nb.ns["step_task"] = FakeTask(nb["step"])
    comps = source_components(nb["f"])
    assert {
        "source of helper `step`",
        "source of helper `memo`",
        "source of helper `base`",
        "global `square`",  # the partial's bound arguments
    } <= set(comps)
    # A Task object as the root hashes its function.
    assert source_components(FakeTask(nb["f"])) == comps
    nb.run("square = functools.partial(base, k=3)")
    assert changed(comps, source_components(nb["f"])) == {"global `square`"}


def test_singledispatch_and_library_wrappers_reach_user_code() -> None:
    nb = Notebook().run("""
        import functools
        import typing
        Number = typing.Union[int, float]
        Pair = tuple[int, int]
        @functools.singledispatch
        def describe(x):
            return "thing"
        @describe.register
        def _(x: int):
            return "int"
        def f(x):
            return describe(x), isinstance(x, Pair), Number
    """)
    comps = source_components(nb["f"])
    assert {"source of helper `describe`", "source of helper `_`"} <= set(comps)
    assert not any("Number" in k or "Pair" in k for k in comps)
    nb.run("""
        @describe.register
        def _(x: int):
            return "an int"
    """)
    assert changed(comps, source_components(nb["f"])) == {"source of helper `_`"}


def test_unhashable_global_warns_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sourcehash.walk, "_warned", set())  # where _warn_unhashable reads it
    nb = Notebook().run("""
        import threading
        LOCK = threading.Lock()
        def f():
            with LOCK:
                return 1
    """)
    with caplog.at_level(logging.WARNING, logger="notebook_flow"):
        comps = source_components(nb["f"])
        nb.run("def f():\n    with LOCK:\n        return 2\n")
        source_components(nb["f"])
    assert "global `LOCK`" in comps
    warnings = [r for r in caplog.records if "global `LOCK`" in r.getMessage()]
    assert len(warnings) == 1
    assert "cannot see changes" in warnings[0].getMessage()


# --------------------------------------------------------------------------- caching


def test_repeated_calls_are_served_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    nb = (
        Notebook()
        .run(HELPERS)
        .run(CLASS)
        .run("""
        def g(x):
            return clean(x) + Point(1, 2).norm()
    """)
    )
    first = source_components(nb["g"])
    calls = []
    real = sourcehash.components._compute  # patched where _entry() reads it
    monkeypatch.setattr(
        sourcehash.components, "_compute", lambda root: calls.append(root) or real(root)
    )
    for _ in range(5):
        assert source_components(nb["g"]) == first
        function_fingerprint(nb["g"])
    assert calls == []
    nb.run("THRESHOLD = 9")  # any guard failing recomputes
    assert source_components(nb["g"]) != first
    assert len(calls) == 1


def test_code_swapped_in_place_is_seen() -> None:
    # %autoreload replaces __code__ of existing function objects.
    nb = Notebook().run(HELPERS).run(TASK)
    before = source_components(nb["f"])
    other = Notebook().run("def deep(x):\n    return -x\n")
    nb.ns["deep"].__code__ = other.ns["deep"].__code__  # type: ignore[union-attr]
    assert changed(before, source_components(nb["f"])) == {"source of helper `deep`"}


def test_newly_defined_global_shadowing_a_builtin() -> None:
    nb = Notebook().run("def f(x):\n    return len(x)\n")
    before = source_components(nb["f"])
    nb.run("def len(x):\n    return 0\n")
    assert changed(before, source_components(nb["f"])) == {"source of helper `len`"}


# --------------------------------------------------------------------------- properties

BODY = [
    "def f(x, y=2):",
    "    '''Docstring.'''",
    "    total = x + y",
    "    for i in range(3):",
    "        total = total * helper(i)",
    "    return total",
]


@st.composite
def cosmetic_variants(draw: st.DrawFn) -> str:
    out = []
    for i, line in enumerate(BODY):
        for _ in range(draw(st.integers(0, 2))):  # blank and comment-only lines
            indent = " " * draw(st.integers(0, 8))
            out.append(
                draw(st.sampled_from(["", f"{indent}# {draw(st.text('abc xyz', max_size=8))}"]))
            )
        if i and draw(st.booleans()):
            line = line.replace(" + ", draw(st.sampled_from([" + ", "+", "  +   "])))
            line = line.replace(" = ", draw(st.sampled_from([" = ", "=", "   =  "])))
        if i == 1:
            line = f"    '''{draw(st.text('abcdef .', min_size=1, max_size=20))}'''"
        if draw(st.booleans()):
            line += "  # " + draw(st.text("abc#'\" ", max_size=10))
        out.append(line)
    return "\n".join(out) + "\n"


def _helper_ns() -> Notebook:
    return Notebook().run("def helper(i):\n    return i + 1\n")


REFERENCE = source_components(_helper_ns().run("\n".join(BODY) + "\n")["f"])  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cosmetic_variants())
def test_property_comments_and_whitespace_preserve_the_hash(source: str) -> None:
    nb = _helper_ns().run(source)
    assert source_components(nb["f"]) == REFERENCE  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(st.integers(-1000, 1000), st.integers(-1000, 1000))
def test_property_a_constant_in_a_helper_changes_the_hash(a: int, b: int) -> None:
    def comps(c: int) -> dict[str, str]:
        nb = (
            Notebook()
            .run(f"def helper(i):\n    return i * {c}\n")
            .run("def f(x):\n    return helper(x)\n")
        )
        return source_components(nb["f"])  # type: ignore[arg-type]

    first, second = comps(a), comps(b)
    assert (first == second) == (a == b)
    if a != b:
        assert changed(first, second) == {"source of helper `helper`"}


# --------------------------------------------------------------------------- across processes

CROSS_PROCESS = r'''
import json, linecache, sys
from notebook_flow.sourcehash import source_components, class_fingerprint, function_fingerprint

def cell(ns, name, src):
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    exec(compile(src, name, "exec"), ns)

ns = {"__name__": "__main__"}
cell(ns, "<ipython-input-1-aa>", """
import dataclasses, enum
import numpy as np
TAGS = frozenset({"alpha", "beta", "gamma", "delta"})
CONFIG = {"b": [1, 2], "a": {"x", "y", "z"}}
class Kind(enum.Enum):
    A = "a"
    B = "b"
@dataclasses.dataclass
class Point:
    x: float = 0.0
    labels: frozenset = frozenset({"p", "q", "r"})
    def norm(self):
        return (self.x ** 2) ** 0.5
pick = lambda s: s in {"one", "two", "three"}
""")
cell(ns, "/tmp/ipykernel_999/12345.py", """
def f(x):
    return pick(x), Point(1.0).norm(), x in TAGS, CONFIG["a"], Kind.A, np.arange(3)
""")
print(json.dumps({
    "components": source_components(ns["f"]),
    "point": class_fingerprint(ns["Point"]),
    "kind": class_fingerprint(ns["Kind"]),
    "fp": function_fingerprint(ns["f"]),
}, sort_keys=True))
'''


def test_stable_across_processes_and_hash_seeds(tmp_path: Path, python_env: dict[str, str]) -> None:
    script = tmp_path / "cross.py"
    script.write_text(CROSS_PROCESS)
    outputs = []
    for seed in ("0", "12345"):
        env = dict(python_env, PYTHONHASHSEED=seed)
        proc = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(proc.stdout))
    assert outputs[0] == outputs[1]
    comps = outputs[0]["components"]
    assert {
        "source of task `f`",
        "source of helper `pick`",
        "class `Point`",
        "class `Kind`",
        "global `TAGS`",
        "global `CONFIG`",
        "package `numpy`",
    } <= set(comps)


def test_path_classification() -> None:
    from notebook_flow._codehash import path_kind as kind

    assert kind("<ipython-input-3-0123abcd>") == "user"
    assert kind(os.path.join("/tmp", "ipykernel_41", "2790428.py")) == "user"
    assert kind(functools.__file__) == "stdlib"
    assert kind(xxhash.__file__) == "library"
    assert kind("<frozen os>") == "stdlib"
    assert kind("<string>") is None
    assert kind(__file__) == "user"
