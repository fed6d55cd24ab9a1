"""Issue 12's reproductions in real kernels: a cached run gives what a plain run gives.

Each test runs the cells cold in kernel A, then again in a fresh kernel B over the same
store (the cached run, ``cold_then_again``): every cell must print the same in both, and the
last, plain cell what a plain run prints (the output quoted in the issue).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _kernels
import pytest

pytestmark = pytest.mark.kernel


class Kernel(_kernels.Kernel):
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        super().__init__(env, cwd, ready_timeout=180, stderr=subprocess.DEVNULL)

    def cell(self, code: str) -> tuple[str, list[Any]]:
        """Run a cell that must succeed: (its stdout, its iopub messages)."""
        content, messages = _kernels.execute(self.kc, code, 120)
        assert content["status"] == "ok", (code, content.get("ename"), content.get("evalue"))
        out = "".join(
            m["content"]["text"]
            for m in messages
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        )
        return out, messages


def run_cells(env: dict[str, str], cwd: Path, cells: list[str]) -> list[tuple[str, list[Any]]]:
    """Every cell in a new kernel with the extension loaded: (stdout, messages) per cell."""
    kernel = Kernel(env, cwd)
    try:
        kernel.cell("%load_ext notebook_flow")
        return [kernel.cell(code) for code in cells]
    finally:
        kernel.close()


@dataclass(frozen=True)
class Runs:
    """The cells run cold in kernel A, then again in a fresh kernel B over the same store."""

    cold: list[tuple[str, list[Any]]]
    cached: list[tuple[str, list[Any]]]

    @property
    def last(self) -> str:
        """What the last (plain) cell printed, the same in both runs."""
        return self.cached[-1][0]

    def badges(self, cell: int) -> list[str]:
        """The badges cell ``cell`` showed in the cached run."""
        return badges(self.cached[cell][1])


def cold_then_again(env: dict[str, str], cwd: Path, cells: list[str]) -> Runs:
    """Run ``cells`` cold, then in a fresh kernel; every cell must print the same both times
    (a cached cell replays its output, and the plain cells after it see the same state)."""
    runs = Runs(cold=run_cells(env, cwd, cells), cached=run_cells(env, cwd, cells))
    cold, cached = ([out for out, _ in run] for run in (runs.cold, runs.cached))
    assert cold == cached, f"the cached run printed {cached}, the cold one {cold}"
    return runs


def badges(messages: list[Any]) -> list[str]:
    return [
        m["content"]["metadata"]["notebook_flow"]["badge"]
        for m in messages
        if m["msg_type"] == "display_data" and "notebook_flow" in m["content"].get("metadata", {})
    ]


def stderr(messages: list[Any]) -> str:
    """What a cell wrote to stderr (the one-line notes of ``%%task``)."""
    return "".join(
        m["content"]["text"]
        for m in messages
        if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
    )


def results(messages: list[Any]) -> list[str]:
    return [
        m["content"]["data"]["text/plain"] for m in messages if m["msg_type"] == "execute_result"
    ]


@pytest.fixture
def env(python_env: dict[str, str]) -> dict[str, str]:
    return dict(python_env, MPLBACKEND="agg")


def test_rng_state_is_an_input_and_an_output(env: dict[str, str], tmp_path: Path) -> None:
    """Reproduction 1: ``0.548814 0.715189`` cold and cached (was ``0.548814 0.771482``)."""
    cells = [
        "%%task\nimport numpy as np\nnp.random.seed(0)",
        "%%task\na = np.random.rand()",
        "b = np.random.rand()\nprint(f'{a:.6f} {b:.6f}')",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.last == "0.548814 0.715189\n"
    assert runs.badges(1) == ["cached"]


def test_rcparams_a_cached_cell_sets_reach_later_cells(env: dict[str, str], tmp_path: Path) -> None:
    """Reproduction 1: ``[2. 1.]`` cold and cached (was ``[6.4 4.8]``)."""
    cells = [
        "import matplotlib.pyplot as plt",
        "%%task\nplt.rc('figure', figsize=(2, 1))",
        "fig = plt.figure()\nprint(fig.get_size_inches())",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.last == "[2. 1.]\n"
    assert runs.badges(1) == ["cached"]


def test_an_edited_rc_call_misses_the_plot_cells_after_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Reproduction 1: a cached plot cell keys on rcParams, so an edited ``plt.rc`` before
    it makes it recompute (was: replayed the stale size)."""
    plot = "%%task\nfig = plt.figure()\nsize = list(fig.get_size_inches())\nprint(size)"
    first = ["import matplotlib.pyplot as plt", "plt.rc('figure', figsize=(2, 1))", plot]
    edited = ["import matplotlib.pyplot as plt", "plt.rc('figure', figsize=(3, 1))", plot]
    out_first = [c[0] for c in run_cells(env, tmp_path, first)]
    out_edited = run_cells(env, tmp_path, edited)
    assert out_first[2] == "[np.float64(2.0), np.float64(1.0)]\n"
    assert out_edited[2][0] == "[np.float64(3.0), np.float64(1.0)]\n"
    assert badges(out_edited[2][1]) == []


def test_an_object_changed_through_a_call_is_stored(env: dict[str, str], tmp_path: Path) -> None:
    """Reproduction 2: ``0.345584``, ``0.821618`` cold and cached (was 0.345584 twice)."""
    cells = [
        "import numpy as np\nrs = np.random.default_rng(1)",
        "def draw():\n    return rs.normal()",
        "%%task\nprint(f'{draw():.6f}')",
        "%%task\nprint(f'{draw():.6f}')",
        "print(f'{rs.normal():.6f}')",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert [out for out, _ in runs.cached[2:4]] == ["0.345584\n", "0.821618\n"]
    assert runs.badges(2) == runs.badges(3) == ["cached"]


def test_a_closure_and_a_module_global_changed_through_calls(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Reproduction 2, other paths: a closure variable and a local module's list."""
    (tmp_path / "helpers.py").write_text("SEEN = []\n\ndef remember(x):\n    SEEN.append(x)\n")
    cells = [
        "import helpers\n"
        "def make():\n    counts = {'n': 0}\n    def bump():\n        counts['n'] += 1\n"
        "        return counts['n']\n    return bump\nbump = make()",
        "%%task\nprint(bump(), helpers.remember(5))",
        "print(bump(), helpers.SEEN)",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.last == "2 [5]\n"


def test_restoring_keeps_aliases(env: dict[str, str], tmp_path: Path) -> None:
    """Reproduction 3: ``{'x': [1, 2]}`` cold and cached (was ``{'x': [1]}``)."""
    cells = ["%%task\na = [1]\nb = {'x': a}", "%%task\na.append(2)", "print(b)"]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.last == "{'x': [1, 2]}\n"
    assert runs.badges(0) == runs.badges(1) == ["cached"]


def test_outputs_that_point_at_inputs_stay_aliases(env: dict[str, str], tmp_path: Path) -> None:
    cells = [
        "data = {'rows': [1, 2]}",
        "%%task\nview = data['rows']\nboth = [data, data]",
        "data['rows'].append(3)\nprint(view, both[0] is both[1] is data)",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.last == "[1, 2, 3] True\n"


def test_trailing_semicolon_hides_the_value(env: dict[str, str], tmp_path: Path) -> None:
    """Reproduction 5: ``x.sum();`` shows nothing, cold and cached (was ``np.int64(3)``)."""
    cells = [
        "import numpy as np\nx = np.array([1, 2])",
        "%%task\nx.sum();",
        "%%task\nx.sum()",
        "%%task\nx.sum();  # a comment",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    for run in (runs.cold, runs.cached):
        assert results(run[1][1]) == []
        assert results(run[2][1]) == ["np.int64(3)"]
        assert results(run[3][1]) == []


def test_in_place_changes_of_frames_and_objects_reach_their_aliases(
    env: dict[str, str], tmp_path: Path
) -> None:
    """``inplace=True`` on a DataFrame and a fitted model seen through another name; an
    attribute the cell *replaced* stays replaced for an alias of the old value."""
    cells = [
        "import numpy as np, pandas as pd\n"
        "df = pd.DataFrame({'x': [1.0, np.nan, 3.0]})\nalias = df\n"
        "class Model:\n    def __init__(self):\n        self.coef = np.zeros(2)\n"
        "        self.history = []\n"
        "    def fit(self, k):\n        self.coef = np.full(2, k)\n"
        "        self.history.append(k)\n        return self\n"
        "m = Model()\npipe = [m]\nold_coef = m.coef\nhist = m.history",
        "%%task\ndf.dropna(inplace=True)\nm.fit(3)",
        "print(alias.shape, pipe[0].coef.tolist(), old_coef.tolist(), hist)",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.last == "(2, 1) [3, 3] [0.0, 0.0] [3]\n"
    assert runs.badges(1) == ["cached"]


def test_a_failing_cell_shows_the_traceback_a_plain_cell_shows(
    env: dict[str, str], tmp_path: Path
) -> None:
    """No ``run_cell_magic(...)`` frame on top: the body's frames, as without the magic."""
    kernel = Kernel(env, tmp_path)
    try:
        kernel.cell("%load_ext notebook_flow\ndef f():\n    return 1 / 0")
        shown = []
        for code in ("x = 1\ny = f()", "%%task\nx = 1\ny = f()"):
            content, messages = _kernels.execute(kernel.kc, code, 120)
            assert content["status"] == "error" and content["ename"] == "ZeroDivisionError"
            (error,) = [m for m in messages if m["msg_type"] == "error"]
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", t) for t in error["content"]["traceback"]]
            shown.append([line for line in lines if "Cell In[" in line])
        plain, cached = shown
        assert len(plain) == len(cached) == 2
        assert not any("run_cell_magic" in "".join(t) for t in shown)
    finally:
        kernel.close()


def test_objects_of_notebook_classes_keep_their_class(env: dict[str, str], tmp_path: Path) -> None:
    """A cached instance of a class defined in the notebook is an instance of the live class
    (made by a function the cell calls: the class is not read by the cell itself)."""
    cells = [
        "class P:\n    def __init__(self, v):\n        self.v = v\n\ndef make(v):\n    return P(v)",
        "%%task\np = make(3)\nitems = [make(1), make(2)]",
        "print(isinstance(p, P), type(items[1]) is P, p.v)",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.last == "True True 3\n"
    assert runs.badges(1) == ["cached"]


@pytest.mark.parametrize(
    "holder, call",
    [
        ("fns = {'draw': draw}", 'fns["draw"]()'),
        ("handlers = [draw]", "handlers[0]()"),
        ("handlers = ({'f': [draw]},)", 'handlers[0]["f"][0]()'),
    ],
    ids=["dict", "list", "nested"],
)
def test_an_object_changed_through_a_function_in_a_container_is_stored(
    env: dict[str, str], tmp_path: Path, holder: str, call: str
) -> None:
    """Reproduction 2 through a container: the function that advances the generator is
    reached through the dict or list the cell reads, not by name."""
    cells = [
        "import numpy as np\nrs = np.random.default_rng(1)",
        f"def draw():\n    return rs.normal()\n{holder}",
        f"%%task\nprint(f'{{{call}:.6f}}')",
        f"%%task\nprint(f'{{{call}:.6f}}')",
        "print(f'{rs.normal():.6f}')",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    plain = [c[0] for c in run_cells(env, tmp_path, [c.replace("%%task\n", "") for c in cells])]
    assert [out for out, _ in runs.cached[2:]] == plain[2:]
    assert plain[2:4] == ["0.345584\n", "0.821618\n"]
    assert runs.badges(2) == runs.badges(3) == ["cached"]


def test_a_view_stored_by_a_cell_stays_a_view_of_its_base(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Issue 12, array views: ``b = a[1:]`` then ``a[2] = 9``; the plain cell's ``b`` sees the
    write in a plain run, so it must after a hit too."""
    cells = [
        "%%task\nimport numpy as np\na = np.arange(5)\nb = a[1:]",
        "%%task\na[2] = 9",
        "print(b.tolist(), a.tolist(), b.base is a)",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    plain = [c[0] for c in run_cells(env, tmp_path, [c.replace("%%task\n", "") for c in cells])]
    assert plain[2] == "[1, 9, 3, 4] [0, 1, 9, 3, 4] True\n"
    assert runs.last == plain[2]


def test_a_frame_keeps_the_index_it_shares_with_a_series(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Found on the corpus (pdsh_hierarchical_indexing): a frame built from a series shares
    the series' index object, so renaming the series' index levels renames the frame's."""
    cells = [
        "%%task\nimport pandas as pd\n"
        "pop = pd.Series([1, 2], index=pd.MultiIndex.from_tuples([('a', 1), ('b', 2)]))",
        "%%task\npop_df = pd.DataFrame({'total': pop, 'under18': [0, 1]})",
        "pop.index.names = ['state', 'year']\nprint(list(pop_df.index.names))",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.last == "['state', 'year']\n"
    assert runs.badges(1) == ["cached"]


def test_an_index_renamed_by_a_cached_cell_is_renamed_for_every_frame_on_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Found by CI on the corpus (pdsh_hierarchical_indexing, a busy machine made its short
    cells worth storing): the rename above, in a cached cell. A hit gave the series a new
    index with the names and left the frame on the old one, unnamed: `[None, None] False`."""
    cells = [
        "%%task\nimport pandas as pd\n"
        "pop = pd.Series([1, 2], index=pd.MultiIndex.from_tuples([('a', 1), ('b', 2)]))\n"
        "s = pd.Series([3, 4], index=pd.Index(['x', 'y']))",
        "%%task\npop_df = pd.DataFrame({'total': pop, 'under18': [0, 1]})\n"
        "t = pd.DataFrame({'v': s})",
        "%%task\npop.index.names = ['state', 'year']\ns.index.name = 'key'",
        "print(list(pop_df.index.names), pop_df.index is pop.index, t.index.name, "
        "t.index is s.index)",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.cold[3][0] == "['state', 'year'] True key True\n"
    assert runs.last == runs.cold[3][0]
    assert runs.badges(1) == runs.badges(2) == ["cached"]


def test_memory_shared_between_outputs_survives_a_hit_or_the_cell_runs_uncached(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Issue 12, views and shared memory: every write after the cached cells shows where a
    plain run shows it. Views of one array nobody names (the array is stored with them) are
    restored as views of one array, and so is the array `to_numpy()` gives over a frame
    stored with it; memory a restore cannot share again (a big DataFrame over an array,
    stored apart as Parquet, an array of Python objects, a view of an array the cell
    changed in place) makes the cell run uncached with a one-line reason."""
    cached = [  # cells whose views come back as views of one stored array
        "%%task\nimport numpy as np\nbig = np.arange(1_000_000)\nv1, v2 = big[:3], big[1:4]\n"
        "w1, w2 = big[:300_000], big[1:300_001]\nd = {'a': big, 'v': big[:3]}\ndel big",
        "%%task\nla = np.arange(1_000_000)\nlb = la[1:]\nlc = la[400_000:]",
        # a frame and the array `to_numpy()` gives over its data: pickled together, the
        # array comes back as a view of the restored frame's data (checked on a round trip)
        "%%task\nimport pandas as pd\nframe = pd.DataFrame({'t': [1.0, 2.0]})\n"
        "y = frame['t'].to_numpy()",
    ]
    uncached = [  # cells a restore could not rebuild
        "%%task\nimport pandas as pd\narr = np.zeros((200_000, 2))\n"
        "df = pd.DataFrame(arr, copy=False)",
        "%%task\no = np.array([1, 'x', None], dtype=object)\np = o[1:]",
        "%%task\nia = np.arange(5)",
        "%%task\nia[2] = 9\nic = ia[1:]",
    ]
    check = (
        "v1[1] = 7; w1[1] = 7; d['a'][2] = -5; la[2] = 9; lb[500_000] = -1\n"
        "arr[1, 1] = 5; o[1] = 'changed'; ia[3] = 7; frame.iloc[0, 0] = 99\n"
        "print(v2.tolist(), w2[:3].tolist(), d['v'].tolist(), lb[:2].tolist(), lc[100_001])\n"
        "print(df.iloc[1, 1], p.tolist(), ic.tolist(), y.tolist())"
    )
    cells = [*cached, *uncached, check]
    runs = cold_then_again(env, tmp_path, cells)
    plain = run_cells(env, tmp_path, [c.replace("%%task\n", "") for c in cells])
    assert (
        runs.last
        == plain[-1][0]
        == (
            "[7, -5, 3] [7, -5, 3] [0, 7, -5] [1, 9] -1\n"
            "5.0 ['changed', None] [1, 9, 7, 4] [99.0, 2.0]\n"
        )
    )
    assert [runs.badges(i) for i in range(len(cached))] == [["cached"]] * len(cached)
    for i in range(len(cached), len(cells) - 1):
        if i == len(cached) + 2:  # `ia = np.arange(5)` alone shares nothing
            continue
        assert runs.badges(i) != ["cached"], cells[i]
        notes = [stderr(runs.cached[i][1])]
        assert any("share memory" in n and "not cached" in n for n in notes), (cells[i], notes)


def test_functions_in_a_local_modules_containers_are_watched(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Issue 12, effects through calls: a function held in a local module's dict, called
    through it (`helpers.REG["draw"]()`) or by a function that reaches the dict, draws from
    the module's generator: the draws are outputs, restored on a hit, so the next cached
    cell and the plain cell after them see what a plain run sees (the second cell replayed
    the first one's number, and the plain cell the first draw, before)."""
    (tmp_path / "helpers.py").write_text(
        "import numpy as np\nrng = np.random.default_rng(1)\n"
        "def draw():\n    return rng.normal()\n"
        "REG = {'draw': draw}\n"
        "def run():\n    return REG['draw']()\n"
    )
    cells = [
        "%%task\nimport helpers\nfrom helpers import run",
        "%%task\nprint(f'{helpers.REG[\"draw\"]():.6f}')",
        "%%task\nprint(f'{helpers.REG[\"draw\"]():.6f}')",
        "%%task\nprint(f'{run():.6f}')",
        "print(f'{helpers.rng.normal():.6f}')",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    plain = run_cells(env, tmp_path, [c.replace("%%task\n", "") for c in cells])
    assert [out for out, _ in plain] == [out for out, _ in runs.cached]
    assert [out for out, _ in plain][1:] == [
        "0.345584\n",
        "0.821618\n",
        "0.330437\n",
        "-1.303157\n",
    ]
    assert [runs.badges(i) for i in (1, 2, 3)] == [["cached"]] * 3


def test_environment_and_numpy_print_and_error_settings_are_ambient_state(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Issue 12, ambient state: a cached cell that sets an environment variable, numpy's
    print options or its floating-point error handling leaves them set on a hit, as a plain
    run does (the plain cell printed `None [0.33333333] warn` after a hit before)."""
    cells = [
        "%%task\nimport os\nos.environ['NF_PROBE'] = '1'\nos.environ.pop('NF_GONE', None)",
        "%%task\nimport numpy as np\nnp.set_printoptions(precision=2)",
        "%%task\nold = np.seterr(all='ignore')",
        "%%task\nprint(np.array([2 / 3]), os.environ.get('NF_PROBE'))",
        "print(os.environ.get('NF_PROBE'), os.environ.get('NF_GONE'), np.array([1 / 3]),"
        " np.geterr()['divide'])",
    ]
    runs = cold_then_again(dict(env, NF_GONE="x"), tmp_path, cells)
    assert runs.last == "1 None [0.33] ignore\n"
    assert runs.cached[3][0] == "[0.67] 1\n"
    assert [runs.badges(i) for i in range(4)] == [["cached"]] * 4


def test_warnings_decimal_recursion_logging_sklearn_and_module_attributes_are_restored(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Issue 12, ambient state found by probing a fresh kernel's second run: a cached cell
    that sets a warnings filter, decimal's precision, the recursion limit, the root logger,
    scikit-learn's config or an attribute of a library module left none of them set on a
    hit (the plain cell printed `no error 0.1428571428571428571428571429 1000 [] diagram
    None` before)."""
    cells = [
        "%%task\nimport warnings\nwarnings.simplefilter('error', UserWarning)",
        "%%task\nimport decimal\ndecimal.getcontext().prec = 5",
        "%%task\nimport sys\nsys.setrecursionlimit(1234)",
        "%%task\nimport logging\nlogging.basicConfig(format='LOG %(message)s', stream=sys.stdout)",
        "%%task\nimport sklearn\nsklearn.set_config(display='text')",
        "%%task\nimport json\njson.nf_probe_flag = 5",
        "try:\n    warnings.warn('w', UserWarning)\n    raised = 'no error'\n"
        "except UserWarning:\n    raised = 'error'\n"
        "logging.warning('hello')\n"
        "print(raised, decimal.Decimal(1) / decimal.Decimal(7), sys.getrecursionlimit(),"
        " sklearn.get_config()['display'], getattr(json, 'nf_probe_flag', None))",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.last == "LOG hello\nerror 0.14286 1234 text 5\n"
    assert [runs.badges(i) for i in range(6)] == [["cached"]] * 6


def test_a_local_module_the_cell_imports_itself_is_watched_or_the_cell_runs_uncached(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Issue 12, effects through calls: a cell that imports a local module and changes it
    (`import helpers as h2; h2.ITEMS.append(2)`, `from helpers import draw; draw()`) leaves
    the module as a plain run does after a hit (the append and the draws were lost, so the
    plain cell printed `[1]` and the first draw again). A module the cell imports for the
    first time has no state before to compare with: that cell runs uncached, saying so."""
    module = "import numpy as np\nITEMS = []\nrng = np.random.default_rng(1)\n"
    module += "def draw():\n    return rng.normal()\n"
    (tmp_path / "helpers.py").write_text(module)
    (tmp_path / "fresh.py").write_text(module)
    cells = [
        "%%task\nimport helpers",
        "%%task\nhelpers.ITEMS.append(1)",
        "%%task\nimport helpers as h2\nh2.ITEMS.append(2)",
        "%%task\nfrom helpers import draw\nprint(f'{draw():.6f}')",
        "%%task\nfrom helpers import draw\nprint(f'{draw():.6f}')",
        "%%task\nimport fresh\nprint(f'{fresh.draw():.6f}')",
        "print(helpers.ITEMS, f'{helpers.rng.normal():.6f}', f'{fresh.rng.normal():.6f}')",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert [out for out, _ in runs.cached][3:] == [
        "0.345584\n",
        "0.821618\n",
        "0.345584\n",
        "[1, 2] 0.330437 0.821618\n",
    ]
    assert [runs.badges(i) for i in range(5)] == [["cached"]] * 5
    assert runs.badges(5) != ["cached"]
    notes = stderr(runs.cached[5][1])
    assert "imports the local module `fresh` and uses it in the same cell" in notes


def test_state_functions_and_classes_carry_is_keyed_and_a_change_runs_uncached(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Issue 12, effects through calls: a class attribute (`Counter.count += 1`), a mutable
    default argument (`def f(x, acc=[])`), a function attribute (`g.calls`), changed by a
    cached cell directly or through a call, were lost on a hit (the plain cell printed
    `0 1 1` instead of `1 5 2`); and a cell calling `f` after a plain cell changed its
    default replayed a result of another state. Such state is keyed; a cell that changes
    it runs uncached, saying so."""
    cells = [
        "class Counter:\n    count = 0\n"
        "def f(x, acc=[]):\n    acc.append(x)\n    return len(acc)\n"
        "def g():\n    g.calls = getattr(g, 'calls', 0) + 1\n    return g.calls\n"
        "def h():\n    return f(0)\n"
        "def size():\n    return len(f.__defaults__[0])",
        "%%task\nCounter.count += 1",
        "%%task\nprint(f(1))",
        "%%task\nprint(g())",
        "%%task\nprint(h())",
        "%%task\nprint(size())",
        "f(5)",
        "%%task\nprint(size())",
        "print(Counter.count, f(2), g())",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert [out for out, _ in runs.cached][2:] == ["1\n", "1\n", "2\n", "2\n", "", "3\n", "1 4 2\n"]
    assert runs.badges(5) == runs.badges(7) == ["cached"]  # read the state, did not change it
    for i in (1, 2, 3, 4):
        notes = stderr(runs.cached[i][1])
        assert "not cached: the cell changed the state" in notes, (cells[i], notes)


def test_an_axes_made_in_one_cell_and_drawn_on_in_the_next(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The second cell reads ``ax``: fingerprinting it never ended (its transforms share
    parts at every level), so the cell hung. It now runs, uncached or from the lineage of
    the cell that made ``ax``, and the figure is the one a plain run draws."""
    cells = [
        "import matplotlib.pyplot as plt",
        "%%task\nfig, ax = plt.subplots()",
        "%%task\nax.plot([1, 2, 3])\nax.set_title('t')",
        "print(len(fig.axes[0].lines), fig.axes[0] is ax, ax.get_title())",
    ]
    runs = cold_then_again(env, tmp_path, cells)
    assert runs.last == "1 True t\n"


def test_an_object_reached_by_two_paths_stays_one_object_after_an_in_place_restore(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A statsmodels result reaches its data twice (`res._results.data` is
    `res._results.model.data`). Reading `res.aic` fills the result's cache: the result
    changed in place, restored in place on a hit. The data was kept at its first path and
    replaced at the second, so a hit split it in two: `predict` wrote to one, and the
    results' data had no `predict_*` (the plain cell printed `False []`)."""
    pytest.importorskip("statsmodels")
    cells = [
        "%%task\nimport numpy as np\nfrom statsmodels.tsa.statespace.sarimax import SARIMAX\n"
        "res = SARIMAX(np.sin(np.arange(80) / 4.0), order=(2, 0, 0)).fit(disp=False)",
        "%%task\nprint(round(res.aic, 4))",
        "%%task\nprint(res.params.round(4).tolist())",
        "p = res.predict(start=70, end=85)\nd = res._results.data\n"
        "print(d is res._results.model.data,"
        " sorted(k for k in vars(d) if k.startswith('predict')))",
    ]
    runs = cold_then_again(dict(env, MPLBACKEND="agg"), tmp_path, cells)
    assert runs.last == "True ['predict_dates', 'predict_end', 'predict_start']\n"
    assert runs.badges(1) == runs.badges(2) == ["cached"]


def test_loading_in_a_kernel_imports_our_modules_in_the_main_thread_only(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The extension warms the first ``%%task`` cell's imports, ours in the kernel's main
    thread (from its idle event loop) and only DuckDB in a side thread: two threads
    importing the package's re-exporting ``__init__`` cycles at once gave a kernel's first
    ``%%task`` cell ``ImportError: cannot import name '_MISS' from partially initialized
    module 'notebook_flow.tasks.call'`` (CI, once)."""
    kernel = Kernel(env, tmp_path)
    try:
        kernel.cell(
            "import sys, threading\n"
            "_elsewhere = []\n"
            "class _Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.startswith('notebook_flow') and "
            "threading.current_thread() is not threading.main_thread():\n"
            "            _elsewhere.append(name)\n"
            "sys.meta_path.insert(0, _Spy())\n"
            "%load_ext notebook_flow"
        )
        out, _ = kernel.cell(
            "for _t in threading.enumerate():\n"
            "    if _t.name == 'notebook_flow-preload':\n"
            "        _t.join()\n"  # it queued the import of ours on the kernel's loop...
            "print('duckdb' in sys.modules, _elsewhere)"
        )
        assert out.strip() == "True []", out
        out, _ = kernel.cell("print('notebook_flow.cells' in sys.modules, _elsewhere)")
        assert out.strip() == "True []", out  # ... which ran it before this cell
        out, _ = kernel.cell("%%task\nx = 41 + 1\nprint(x)")
        assert out.strip() == "42"
    finally:
        kernel.close()
