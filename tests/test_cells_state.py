"""What a cached cell stores and puts back: ambient state, effects through calls, identities
(issue 12). In-process, through an IPython shell; real kernels are in test_cells_kernel.py."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from notebook_flow.cells import ambient
from notebook_flow.cells.state import kept_paths, pack, reference_map, relink, unpack, walk
from notebook_flow.cells.state import update_in_place as update
from notebook_flow.errors import ConfigurationError


def run(sh: Any, code: str) -> None:
    result = sh.run_cell(code)
    assert not (result.error_before_exec or result.error_in_exec), result


def status(sh: Any) -> str:
    return str(sh.magics_manager.registry["FlowMagics"].runner.last.status)


# --------------------------------------------------------------------------- state.py


def test_pack_keeps_shared_objects_and_references_inputs() -> None:
    a, cfg = [1], {"k": [2]}
    refs = reference_map([(("a",), a), (("cfg",), cfg)])
    data = pack({"b": {"x": a}, "c": [cfg["k"], cfg["k"]]}, refs)
    out = unpack(data, {"a": a, "cfg": cfg})
    assert out["b"]["x"] is a
    assert out["c"][0] is out["c"][1] is cfg["k"]


def test_update_in_place_keeps_live_objects_where_the_cell_kept_them() -> None:
    inner = [1]
    live = {"keep": inner, "swap": [0], "gone": 1}
    before = walk([(("d",), live)])
    inner.append(2)  # changed in place ...
    live["swap"] = [9]  # ... and replaced
    del live["gone"]
    kept = kept_paths(before, ("d",), live) | {("d",)}
    stored = unpack(pack(live, {}), {})  # what a hit loads
    fresh_inner, fresh_swap = [1], [0]
    target = {"keep": fresh_inner, "swap": fresh_swap, "gone": 1}  # the state before, again
    assert update(target, stored, {}, kept, ("d",)) is target
    assert target == {"keep": [1, 2], "swap": [9]}
    assert target["keep"] is fresh_inner  # an alias of the part changed in place sees it
    assert target["swap"] is not fresh_swap  # an alias of the replaced part keeps the old


def test_update_in_place_arrays_generators_and_objects() -> None:
    arr, stored_arr = np.zeros(3), np.arange(3.0)
    assert update(arr, stored_arr, {}) is arr and arr.tolist() == [0.0, 1.0, 2.0]
    assert update(np.zeros(2), stored_arr, {}) is stored_arr  # another shape: rebind
    g, g2 = np.random.default_rng(1), np.random.default_rng(1)
    g2.normal()
    assert update(g, g2, {}) is g and g.normal() == g2.normal()

    class Box:
        def __init__(self, v: Any) -> None:
            self.v = v

    live, stored = Box([1]), Box([1, 2])
    assert update(live, stored, {}) is live and live.v == [1, 2]


def test_relink_points_stored_copies_at_live_objects() -> None:
    live, stored = [1], [1, 2]
    memo: dict[int, Any] = {}
    update(live, stored, memo)
    holder = relink({"a": (stored, 3), "b": [stored]}, memo)
    assert holder["a"][0] is live and holder["b"][0] is live


# --------------------------------------------------------------------------- ambient.py


def test_register_ambient_keys_and_restores(shell: Any, isolated_store: Path) -> None:
    setting = {"precision": 3}
    ambient.register_ambient(
        "test.setting", get=lambda: dict(setting), set=lambda v: setting.update(v)
    )
    try:
        run(shell, "%%task\nx = 1")
        run(shell, "%%task\nx = 1")
        assert status(shell) == "cached"
        setting["precision"] = 4  # read state changed: the key changes
        run(shell, "%%task\nx = 1")
        assert status(shell) == "computed"
        shell.user_ns["S"] = setting
        run(shell, "%%task\nS['precision'] = 7")  # a cell that changes it
        setting["precision"] = 4
        run(shell, "%%task\nS['precision'] = 7")
        assert status(shell) == "cached" and setting["precision"] == 7
    finally:
        ambient.unregister_ambient("test.setting")


def test_register_ambient_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigurationError, match="callables"):
        ambient.register_ambient("x", get=1, set=print)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="keyed"):
        ambient.register_ambient("x", get=dict, set=print, keyed="sometimes")  # type: ignore[arg-type]


def test_global_rng_is_keyed_only_by_cells_that_draw(shell: Any, isolated_store: Path) -> None:
    run(shell, "import random")
    random.seed(1)
    run(shell, "%%task\ny = 2")
    random.seed(2)  # another generator state: a cell that draws nothing still hits
    run(shell, "%%task\ny = 2")
    assert status(shell) == "cached"
    random.seed(1)
    run(shell, "%%task\nr = random.random()")
    after_cold = random.getstate()
    random.seed(1)
    run(shell, "%%task\nr = random.random()")
    assert status(shell) == "cached"
    assert random.getstate() == after_cold  # left where a plain run leaves it
    random.seed(2)
    run(shell, "%%task\nr = random.random()")
    assert status(shell) == "computed"


def test_cwd_and_sys_path_are_restored(
    shell: Any, isolated_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = "%%task\nimport os, sys\nos.chdir('sub')\nsys.path.insert(0, '/nf-test-path')"
    run(shell, code)
    monkeypatch.chdir(tmp_path)
    sys.path.remove("/nf-test-path")
    run(shell, code)
    assert status(shell) == "cached"
    assert Path.cwd() == tmp_path / "sub" and sys.path[0] == "/nf-test-path"


def test_pandas_options_are_keyed_and_restored(shell: Any, isolated_store: Path) -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", 60):
        run(shell, "%%task\nimport pandas as pd\npd.set_option('display.max_rows', 5)")
        pd.set_option("display.max_rows", 60)
        run(shell, "%%task\nimport pandas as pd\npd.set_option('display.max_rows', 5)")
        assert status(shell) == "cached"
        assert pd.get_option("display.max_rows") == 5


# --------------------------------------------------------------------------- effects.py


def test_an_object_only_a_called_function_reaches_is_stored(
    shell: Any, isolated_store: Path
) -> None:
    run(shell, "log = []\ndef note(x):\n    log.append(x)\n    return x")
    run(shell, "%%task\nv = note(5)")
    shell.user_ns["log"].clear()
    run(shell, "%%task\nv = note(5)")
    assert status(shell) == "cached"
    assert shell.user_ns["log"] == [5]


def test_an_unfingerprintable_object_a_function_reaches_runs_uncached(
    shell: Any, isolated_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    shell.user_ns["lock"] = threading.Lock()
    run(shell, "def use():\n    with lock:\n        return 1")
    run(shell, "%%task\nz = use()")
    assert status(shell) == "uncached"
    assert "reaches `lock`" in capsys.readouterr().err


def test_tuples_keep_their_live_items() -> None:
    est = {"fitted": False}
    live = [("model", est)]
    before = walk([(("steps",), live)])
    est["fitted"] = True
    kept = kept_paths(before, ("steps",), live) | {("steps",)}
    stored = unpack(pack(live, {}), {})
    fresh = {"fitted": False}
    target = [("model", fresh)]
    update(target, stored, {}, kept, ("steps",))
    assert target[0][1] is fresh and fresh == {"fitted": True}
