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
from notebook_flow.cells.sharing import SplitMemory, plan_sharing
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
    bg, bg2 = np.random.PCG64(3), np.random.PCG64(3)
    bg2.random_raw()
    assert update(bg, bg2, {}) is bg and bg.random_raw() == bg2.random_raw()
    r, r2 = random.Random(4), random.Random(4)
    r2.random()
    assert update(r, r2, {}) is r and r.random() == r2.random()

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


def test_an_attribute_set_on_a_library_module_is_keyed_and_restored(
    shell: Any, isolated_store: Path
) -> None:
    import json

    code = "%%task\nimport json\njson.nf_state_probe = [1, 2]"
    try:
        run(shell, code)
        assert status(shell) == "computed"
        del json.nf_state_probe
        run(shell, code)
        assert status(shell) == "cached" and json.nf_state_probe == [1, 2]
        json.nf_state_probe = [3]  # the state before the cell is keyed: another one misses
        run(shell, code)
        assert status(shell) == "computed"
    finally:
        vars(json).pop("nf_state_probe", None)


def test_an_attribute_set_on_a_module_the_cell_imports_first_runs_uncached(
    shell: Any, isolated_store: Path
) -> None:
    sys.modules.pop("tabnanny", None)
    run(shell, "%%task\nimport tabnanny\ntabnanny.verbose = 1")
    last = shell.magics_manager.registry["FlowMagics"].runner.last
    assert last.status == "uncached"
    assert "`tabnanny.verbose`" in " ".join(last.reasons) and "earlier cell" in " ".join(
        last.reasons
    )


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


def test_a_part_replaced_by_an_equal_copy_is_replaced_on_a_hit(
    shell: Any, isolated_store: Path
) -> None:
    code = "%%task\ndata['rows'] = list(data['rows'])"
    for _ in range(2):
        rows = [1, 2]
        shell.user_ns.update(data={"rows": rows}, old=rows)
        run(shell, code)
        assert shell.user_ns["data"]["rows"] == [1, 2]
        assert shell.user_ns["data"]["rows"] is not shell.user_ns["old"]  # as a plain run
    assert status(shell) == "cached"


def test_large_arrays_and_frames_are_stored_in_their_own_formats(
    shell: Any, isolated_store: Path
) -> None:
    """Issue 12: big cell variables go to .npy / Parquet files, not into the cell's pickle;
    on a hit they are writable (as after a plain run) and shared references stay shared."""
    code = (
        "%%task\nimport numpy as np, pandas as pd\n"
        "big = np.arange(300_000, dtype=float).reshape(1000, 300)\nsame = [big, big]\n"
        "df = pd.DataFrame({'a': np.arange(200_000), 'b': np.arange(200_000) * 0.5})"
    )
    run(shell, code)
    suffixes = sorted(p.suffix for p in (isolated_store / "results").rglob("*.*"))
    assert ".npy" in suffixes and ".parquet" in suffixes
    for name in ("big", "same", "df"):
        shell.user_ns.pop(name)
    run(shell, code)
    assert status(shell) == "cached"
    big, same = shell.user_ns["big"], shell.user_ns["same"]
    assert big.flags.writeable and same[0] is same[1] is big
    big[0, 0] = 7.0
    assert big[3, 4] == 904.0 and shell.user_ns["df"]["b"].iloc[-1] == 99_999.5


def test_a_cell_that_seeds_first_is_not_keyed_on_the_earlier_state(
    shell: Any, isolated_store: Path
) -> None:
    """``np.random.seed(0)`` (after imports) overwrites whatever state there was: a seeding
    cell hits in a new kernel, whose generators start from OS entropy."""
    code = "%%task\nimport numpy as np\nnp.random.seed(0)\nfirst = np.random.rand()"
    for entropy in (11, 12):
        np.random.seed(entropy)
        run(shell, code)
        assert np.random.get_state()[2] == 2  # where a plain run leaves it
    assert status(shell) == "cached"
    assert shell.user_ns["first"] == pytest.approx(0.5488135)
    ambient_names = ambient.reseeded(
        __import__("ast").parse("import random as r\nr.seed(1)\nnp.random.seed(x)"),
        {"np": np},
    )
    assert ambient_names == {"random"}  # an argument that is not a constant ends the run


def test_a_closure_variable_a_called_function_rebinds_is_restored(
    shell: Any, isolated_store: Path
) -> None:
    make = (
        "def make():\n    n = 0\n    def step():\n        nonlocal n\n        n += 1\n"
        "        return n\n    return step\nstep = make()"
    )
    outs = []
    for _ in range(2):
        run(shell, make)
        run(shell, "%%task\nfirst = step()")
        run(shell, "second = step()")
        outs.append((shell.user_ns["first"], shell.user_ns["second"]))
    assert status(shell) == "cached"
    assert outs == [(1, 2), (1, 2)]


# --------------------------------------------------------------------------- files.py


def test_a_changed_data_file_or_folder_makes_a_hit_a_miss(
    shell: Any, isolated_store: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("x\n1\n")
    shell.user_ns["folder"] = str(data)
    code = (
        "%%task\nimport glob, os\nnames = sorted(os.listdir(folder))\n"
        "text = open(os.path.join(folder, 'a.csv')).read()"
    )
    run(shell, code)
    run(shell, code)
    assert status(shell) == "cached"
    (data / "a.csv").write_text("x\n2\n")  # the file changed: recompute
    run(shell, code)
    assert status(shell) == "computed" and shell.user_ns["text"] == "x\n2\n"
    run(shell, code)
    assert status(shell) == "cached"
    (data / "b.csv").write_text("x\n3\n")  # the folder changed: recompute
    run(shell, code)
    assert status(shell) == "computed" and shell.user_ns["names"] == ["a.csv", "b.csv"]


def test_a_file_named_in_the_cell_counts_even_when_read_outside_python(
    shell: Any, isolated_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow opens files in C++, unseen by the audit hook: the name in the code is."""
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"a": [1, 2]}).to_parquet("t.parquet")
    code = "%%task\nimport pandas as pd\nt = pd.read_parquet('t.parquet')"
    run(shell, code)
    run(shell, code)
    assert status(shell) == "cached"
    pd.DataFrame({"a": [5]}).to_parquet("t.parquet")
    run(shell, code)
    assert status(shell) == "computed" and shell.user_ns["t"]["a"].tolist() == [5]


def test_library_files_read_by_an_import_are_left_out_without_resolving_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import records thousands of library files; telling them from data must not cost
    a symlink resolution apiece. Data files are still found (and through symlinks)."""
    import os
    import site

    from notebook_flow.cells import files

    data = tmp_path / "data.csv"
    data.write_text("x\n1\n")
    (tmp_path / "link.csv").symlink_to(data)
    library = [os.path.join(site.getsitepackages()[0], "pkg", f"m{i}.so") for i in range(50)] + [
        os.path.join(sys.base_prefix, "lib", f"n{i}.txt") for i in range(50)
    ]
    resolved: list[str] = []
    realpath = os.path.realpath

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        resolved.append(str(path))
        return realpath(path, *args, **kwargs)

    monkeypatch.setattr(files.os.path, "realpath", counting)
    found = files.fingerprints({*library, str(data), str(tmp_path / "link.csv")})
    assert sorted(found) == sorted([str(data), str(tmp_path / "link.csv")])
    assert not set(resolved) & set(library)


def test_rcparams_changes_are_seen_and_the_defaults_are_not() -> None:
    import matplotlib

    with matplotlib.rc_context():  # whatever the test changes is undone
        original = {k: v for k, v in matplotlib.rcParamsOrig.items() if "backend" not in k}
        matplotlib.rcParams.update(original)
        before = ambient.snapshot()
        assert "matplotlib.rcParams" not in before.digests  # at its defaults: not keyed
        matplotlib.rcParams["figure.figsize"] = (2.0, 1.0)
        after = ambient.snapshot()
        assert "matplotlib.rcParams" in ambient.changed(before, after)
        assert after.values["matplotlib.rcParams"]["figure.figsize"] == [2.0, 1.0]


def test_views_are_stored_as_views_and_arrays_own_their_memory_again() -> None:
    a = np.arange(6.0)
    f = np.asfortranarray(np.arange(12).reshape(3, 4))
    value = {"a": a, "b": a[1:], "r": a[::-2], "f": f, "g": f[1:, ::2]}
    out = unpack(pack(value, {}, bases=[a, f]), {})
    assert out["b"].base is out["a"] and out["r"].base is out["a"]
    assert out["g"].base is out["f"] and out["f"].base is None
    out["a"][3] = 99.0
    assert out["b"].tolist() == [1.0, 2.0, 99.0, 4.0, 5.0] and out["r"][1] == 99.0
    assert np.array_equal(out["g"], f[1:, ::2]) and out["f"].flags.f_contiguous
    assert out["a"].flags.owndata  # as the stored array did (`a.resize(...)` works)
    # A view of a big array stored nowhere else is a copy (not the whole base).
    big = np.zeros(1_000_000)
    alone = unpack(pack({"v": big[:3]}, {}), {})["v"]
    assert alone.base is None or alone.base.nbytes < big.nbytes
    # A view of an input is a view of the live input after a load.
    x = np.arange(4)
    refs = reference_map([(("x",), x)])
    y = unpack(pack({"y": x[2:]}, refs), {"x": x})["y"]
    x[3] = 7
    assert y.tolist() == [2, 7]


def test_snapshots_reuse_digests_only_for_equal_values() -> None:
    import pandas as pd

    first = ambient.snapshot()
    again = ambient.snapshot()
    assert again.digests == first.digests
    np.random.rand()
    random.random()
    with pd.option_context("display.max_rows", 7):
        changed = ambient.snapshot()
    assert {"numpy.random", "random", "pandas.options"} <= set(ambient.changed(first, changed))
    assert ambient.snapshot().digests.get("pandas.options") == first.digests.get("pandas.options")
    assert not ambient._equal((1, 0.0), (1, -0.0)) and not ambient._equal(np.nan, np.nan)


def test_functions_held_in_containers_are_found_by_paths_that_reach_them() -> None:
    from notebook_flow.cells import effects

    def f() -> None: ...

    class Box:
        pass

    box = Box()
    box.hook = f  # type: ignore[attr-defined]
    ns = {"x": {"a": [1, 2, (f,)], "b": {1: f}, "c": box}}
    paths, why = effects.held_functions("x", ns["x"], effects.reaches)
    assert why is None and paths == ["x['a'][2][0]", "x['b'][1]", "x['c']", "x['c'].hook"]
    assert all(effects.lookup(ns, p) is (box if p == "x['c']" else f) for p in paths)
    # Where no path can reach a function again, the cell cannot be cached faithfully.
    assert effects.held_functions("y", {(1, 2): f}, effects.reaches)[1]
    assert effects.held_functions("z", [{f}], effects.reaches)[1]
    assert effects.held_functions("n", list(range(1000)), effects.reaches) == ([], None)


def _plan(outputs: dict[str, Any], inputs: dict[str, Any] | None = None, existed: Any = ()) -> Any:
    ins = walk([((n,), v) for n, v in (inputs or {}).items()])
    outs = walk([((n,), v) for n, v in outputs.items()])
    return plan_sharing(outs, ins, reference_map(ins), {id(o) for o in existed})


def test_views_of_an_array_nobody_names_are_stored_with_it() -> None:
    """Two views of one array that is no output: the array is stored with them, so a write
    through one shows in the other after a load, as in the run."""
    big = np.arange(1_000_000)
    value = {"v1": big[:3], "v2": big[1:4]}
    owners = _plan(value)
    assert len(owners) == 1 and owners[0] is big
    out = unpack(pack(value, {}, [], bases=[*value.values(), *owners]), {}, lambda i: big.copy())
    out["v1"][1] = 7
    assert out["v2"].tolist() == [7, 2, 3]
    # One view alone shares nothing: no owner stored, a copy is as good.
    assert _plan({"v": big[:3]}) == []
    # A view of an input is a view of the live input: nothing to store.
    assert _plan({"v": big[:3], "w": big[2:5]}, {"big": big}) == []
    # Read-only views of one array: a write cannot show, so nothing is needed.
    ro = np.arange(10)
    a, b = ro[:5], ro[3:]
    a.flags.writeable = b.flags.writeable = False
    assert _plan({"a": a, "b": b}) == []


def test_a_frame_and_an_array_over_its_data_are_stored_when_a_round_trip_keeps_them_shared(
    shell: Any, isolated_store: Path
) -> None:
    """A statsmodels result holds its data as a frame and as a numpy view of the frame's
    data: pickled together, the view comes back over the restored frame's array, so the
    cell is stored (it ran uncached, and every cell reading the result after it)."""
    import pandas as pd

    runner = shell.magics_manager.registry["FlowMagics"].runner
    code = (
        "%%task\nimport pandas as pd\nfr = pd.DataFrame({'t': [1.0, 2.0]})\n"
        "box = {'frame': fr, 'values': fr['t'].to_numpy()}"
    )
    run(shell, code)
    assert runner.last.status == "computed", runner.last.reasons
    del shell.user_ns["fr"], shell.user_ns["box"]
    run(shell, code)
    assert runner.last.status == "cached"
    box = shell.user_ns["box"]
    assert isinstance(box["frame"], pd.DataFrame)
    assert np.shares_memory(box["frame"]["t"].to_numpy(), box["values"])


def test_an_array_over_an_input_frames_data_is_a_view_of_the_live_frame_after_a_hit(
    shell: Any, isolated_store: Path
) -> None:
    """`SARIMAX(dta)` keeps `np.asarray(dta)` next to `dta`: the array is stored as a view of
    the live input's data (by its place in the frame, with a digest), so a hit gives a view
    of the frame the notebook has, as the run did. A frame of the same content laid out in
    other blocks cannot be pointed into: the cell recomputes."""
    import pandas as pd

    runner = shell.magics_manager.registry["FlowMagics"].runner
    shell.user_ns["fr"] = pd.DataFrame({"t": [1.0, 2.0], "u": [3.0, 4.0]})
    code = "%%task\nyy = fr.to_numpy()\nzz = fr['u'].to_numpy()"
    run(shell, code)
    assert runner.last.status == "computed", runner.last.reasons
    for layout in ("same", "same", "blocks"):
        if layout == "same":
            fr = pd.DataFrame({"t": [1.0, 2.0], "u": [3.0, 4.0]})
        else:  # equal content, one block per column
            parts = [pd.DataFrame({"t": [1.0, 2.0]}), pd.DataFrame({"u": [3.0, 4.0]})]
            fr = pd.concat(parts, axis=1)
        shell.user_ns["fr"] = fr
        del shell.user_ns["zz"]
        run(shell, code)
        assert runner.last.status == ("cached" if layout == "same" else "computed")
        zz = shell.user_ns["zz"]
        assert zz.tolist() == [3.0, 4.0] and np.shares_memory(zz, fr["u"].to_numpy())


def test_memory_a_restore_cannot_share_again_is_refused_with_the_names() -> None:
    import pandas as pd

    arr = np.zeros((4, 2))
    with pytest.raises(SplitMemory, match=r"`df` and `arr` share memory \(a pandas object"):
        _plan({"df": pd.DataFrame(arr, copy=False), "arr": arr})
    frame = pd.DataFrame({"t": [1.0, 2.0]})
    with pytest.raises(SplitMemory, match="`y` and `frame`|`frame` and `y`"):
        _plan({"y": frame["t"].to_numpy()}, {"frame": frame})
    o = np.array([1, "x", None], dtype=object)
    with pytest.raises(SplitMemory, match="Python objects"):
        _plan({"o": o, "p": o[1:]})
    # An array the cell changed in place (it existed before, and is restored in place):
    # a new view of it would be a view of the stored copy.
    ia = np.arange(5)
    with pytest.raises(SplitMemory, match="earlier object"):
        _plan({"ia": ia, "ic": ia[1:]}, existed=[ia])
    # A view stored inside a container is named by its path.
    with pytest.raises(SplitMemory, match=r"`d\['o'\]`"):
        _plan({"d": {"o": o}, "p": o[1:]})
    buffer = bytearray(16)
    with pytest.raises(SplitMemory, match="one buffer"):
        _plan({"f1": np.frombuffer(buffer, np.int64), "f2": np.frombuffer(buffer, np.int32)})
    # pandas objects sharing memory among themselves: copy-on-write keeps them apart.
    assert _plan({"frame": frame, "col": frame["t"]}) == []


def test_warning_filters_a_cell_changes_are_applied_again_and_never_keyed(
    shell: Any, isolated_store: Path
) -> None:
    """A hit puts the cell's filter in front of the filters it finds (a library imported
    since added its own: they stay), and a filter added by anything else does not change
    the cell's key."""
    import warnings

    code = "%%task\nimport warnings\nwarnings.simplefilter('error', UserWarning)"
    with warnings.catch_warnings():
        run(shell, code)
        assert status(shell) == "computed"
        assert warnings.filters[0][:3] == ("error", None, UserWarning)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="nf-probe-library-filter")
        run(shell, code)
        assert status(shell) == "cached"
        assert warnings.filters[0][:3] == ("error", None, UserWarning)
        assert any(
            getattr(f[1], "pattern", None) == "nf-probe-library-filter" for f in warnings.filters
        )


def test_named_loggers_a_cell_configures_are_configured_again_and_never_keyed(
    shell: Any, isolated_store: Path
) -> None:
    """A hit sets again the level, propagation, disabling and handlers a cell gave named
    loggers (`logging.getLogger("lib").setLevel(...)`, `dictConfig` disabling others); a
    logger another library configured since stays as it is and does not change the key."""
    import logging

    names = ("nf.probe.quiet", "nf.probe.loud", "nf.probe.off", "nf.probe.library")
    code = (
        "%%task\nimport logging, sys\n"
        "logging.getLogger('nf.probe.quiet').setLevel(logging.ERROR)\n"
        "loud = logging.getLogger('nf.probe.loud')\n"
        "loud.propagate = False\n"
        "loud.addHandler(logging.StreamHandler(sys.stdout))\n"
        "logging.getLogger('nf.probe.off').disabled = True"
    )

    def fresh() -> None:
        for name in names:
            lg = logging.getLogger(name)
            lg.setLevel(logging.NOTSET)
            lg.propagate, lg.disabled = True, False
            for h in list(lg.handlers):
                lg.removeHandler(h)

    try:
        fresh()
        run(shell, code)
        assert status(shell) == "computed"
        fresh()
        logging.getLogger("nf.probe.library").setLevel(logging.CRITICAL)  # "an import"
        run(shell, code)
        assert status(shell) == "cached"
        quiet, loud, off, library = (logging.getLogger(n) for n in names)
        assert quiet.level == logging.ERROR and off.disabled
        assert loud.propagate is False and [type(h) for h in loud.handlers] == [
            logging.StreamHandler
        ]
        assert loud.handlers[0].stream is sys.stdout
        assert library.level == logging.CRITICAL
    finally:
        fresh()


def test_an_object_kept_at_one_path_is_kept_wherever_else_it_is_reached() -> None:
    class Box:
        def __init__(self, **kw: Any) -> None:
            vars(self).update(kw)

    def make() -> Any:
        data = Box(v=[1])
        return Box(model=Box(data=data), data=data)  # `model` is met before `data`

    cold = make()
    before = walk([(("r",), cold)])
    cold.data.v.append(2)  # changed in place, reached by two paths
    cold.model.other = [0]
    kept = kept_paths(before, ("r",), cold) | {("r",)}
    stored = unpack(pack(cold, {}), {})
    live = make()
    assert update(live, stored, {}, kept, ("r",)) is live
    assert live.model.data is live.data and live.data.v == [1, 2]
    # An object the cell put at the second path stays a different object.
    cold = make()
    before = walk([(("r",), cold)])
    cold.model.data = Box(v=[9])
    kept = kept_paths(before, ("r",), cold) | {("r",)}
    stored = unpack(pack(cold, {}), {})
    live = make()
    update(live, stored, {}, kept, ("r",))
    assert live.model.data is not live.data and live.model.data.v == [9] and live.data.v == [1]


def test_what_pandas_caches_on_a_frame_is_not_part_of_its_state() -> None:
    """pandas before 3 keeps the columns it handed out in `frame._item_cache` (views of the
    frame's blocks): never pickled, rebuilt on use. Walked as state, it made every cell that
    read a column share memory "without copy-on-write" and run uncached (the quickstart's
    `clean` on Python 3.10, where pandas 3 cannot be installed)."""
    import pandas as pd

    frame = pd.DataFrame({"a": [1, 2], "b": [1.0, 2.0]})
    series = frame["a"].copy()
    for obj in (frame, series):
        object.__setattr__(obj, "_item_cache", {"a": frame["a"]})  # as pandas 2 fills it
        object.__setattr__(obj, "_is_copy", None)
    found = walk([(("frame",), frame), (("series",), series)])
    assert not [p for p in found if any(step[1] in ("_item_cache", "_is_copy") for step in p)]
    assert ("frame", ("a", "_mgr")) in found  # the data itself is still walked
