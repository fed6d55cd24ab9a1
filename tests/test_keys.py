"""Cache keys: stable across processes and hash seeds; sensitive to what matters only."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODULE = textwrap.dedent(
    """
    from notebook_flow import task

    LIMIT = 10

    def inner(v):
        return v + 1

    def outer(v):
        return inner(v) * 2

    @task
    def pipeline(data, factor=1):
        return [outer(x) for x in data][:LIMIT], factor
    """
)

KEYS = textwrap.dedent(
    """
    import pickle, sys
    sys.path.insert(0, sys.argv[1])
    import keymod
    cases = pickle.load(sys.stdin.buffer)
    sys.stdout.buffer.write(pickle.dumps([keymod.pipeline.cache_key(*a, **k) for a, k in cases]))
    """
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
        | st.frozensets(st.integers(), max_size=4)
    ),
    max_leaves=12,
)


def _keys_in_subprocess(folder: Path, cases: list, seed: str, env: dict) -> list:
    out = subprocess.run(
        [sys.executable, "-c", KEYS, str(folder)],
        input=pickle.dumps(cases),
        capture_output=True,
        env=dict(env, PYTHONHASHSEED=seed),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()
    return pickle.loads(out.stdout)


def _write_module(folder: Path, source: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keymod.py").write_text(source)


def test_keys_equal_in_two_fresh_processes(tmp_path: Path, python_env):
    _write_module(tmp_path / "m", MODULE)
    cases = [
        (([1, 2, 3],), {}),
        (([1, 2, 3],), {"factor": 2}),
        (({"b": 1, "a": [1.5, None]},), {}),
        (({3, 1, 2},), {}),
        (("text",), {"factor": frozenset({"x", "y"})}),
    ]
    a = _keys_in_subprocess(tmp_path / "m", cases, "1", python_env)
    b = _keys_in_subprocess(tmp_path / "m", cases, "2", python_env)
    assert a == b
    assert len(set(a)) == len(a)  # different arguments, different keys


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values)
def test_equal_values_give_equal_keys(value, tmp_path: Path):
    import copy

    from notebook_flow import task

    @task
    def f(x):
        return x

    assert f.cache_key(value) == f.cache_key(copy.deepcopy(value))
    if isinstance(value, dict):
        reordered = dict(reversed(list(value.items())))
        assert f.cache_key(value) == f.cache_key(reordered)


def test_source_changes_deep_and_cosmetic(tmp_path: Path, python_env):
    case = [(([1, 2],), {})]

    def key_for(source: str, name: str) -> str:
        _write_module(tmp_path / name, source)
        return _keys_in_subprocess(tmp_path / name, case, "0", python_env)[0]

    base = key_for(MODULE, "base")
    # Comments and whitespace don't count.
    cosmetic = MODULE.replace("return v + 1", "return  v+1   # plus one").replace(
        "def outer(v):", "\n\ndef outer(v):  # doubles"
    )
    assert key_for(cosmetic, "cosmetic") == base
    # A helper two calls deep counts.
    assert key_for(MODULE.replace("return v + 1", "return v + 2"), "deep") != base
    # A used global counts.
    assert key_for(MODULE.replace("LIMIT = 10", "LIMIT = 11"), "glob") != base
    # An argument counts (checked above); the task's own body counts.
    assert key_for(MODULE.replace("[:LIMIT], factor", "[:LIMIT], factor, 0"), "body") != base
