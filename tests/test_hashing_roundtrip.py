"""Fingerprints survive a store/load round trip (the real ResultStore and its serializers)
and a change of process: property tests over the objects real notebooks keep in variables."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from notebook_flow.hashing import fingerprint
from notebook_flow.storage import ResultStore

sklearn = pytest.importorskip("sklearn")
scipy_stats = pytest.importorskip("scipy.stats")
sm = pytest.importorskip("statsmodels.api")

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ResultStore:
    return ResultStore(str(tmp_path_factory.mktemp("roundtrip")), signing_key=b"k" * 32)


_counter = iter(range(10**9))


def round_trip(store: ResultStore, value: Any, serializer: str | None = None) -> Any:
    key = f"{next(_counter):032x}"
    manifest = store.commit(
        key,
        value,
        task="roundtrip",
        components={},
        run_id="r",
        duration=0.0,
        expires_at=None,
        serializer=serializer,
    )
    return store.load(manifest)


def assert_stable(store: ResultStore, value: Any) -> None:
    before = fingerprint(value)
    for serializer in (None, "pickle"):  # the one chosen by type, and pickle
        loaded = round_trip(store, value, serializer)
        assert fingerprint(loaded) == before, serializer
    assert fingerprint(value) == before  # storing did not change it


# --------------------------------------------------------------------------- strategies

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)


@st.composite
def frames(draw: Any) -> pd.DataFrame:
    n = draw(st.integers(0, 30))
    cols: dict[str, Any] = {
        "x": draw(st.lists(floats, min_size=n, max_size=n)),
        "k": draw(st.lists(st.integers(-(2**40), 2**40), min_size=n, max_size=n)),
        "s": draw(st.lists(names, min_size=n, max_size=n)),
    }
    frame = pd.DataFrame(cols)
    if draw(st.booleans()):
        frame["c"] = pd.Categorical(draw(st.lists(st.sampled_from("abc"), min_size=n, max_size=n)))
    if draw(st.booleans()):
        frame.index = pd.date_range("2020-01-01", periods=n, freq="D", name="day")
    return frame


arrays = hnp.arrays(
    dtype=st.sampled_from([np.float64, np.int32, np.bool_, np.complex128]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
)


@st.composite
def bunches(draw: Any) -> Any:
    from sklearn.utils import Bunch

    data = draw(arrays)
    return Bunch(data=data, target=draw(st.lists(st.integers(0, 3), max_size=10)), name=draw(names))


@st.composite
def distributions(draw: Any) -> Any:
    kind = draw(st.sampled_from(["norm", "poisson", "gamma", "binom", "expon"]))
    loc = draw(st.floats(-5, 5))
    if kind == "norm":
        return scipy_stats.norm(loc, draw(st.floats(0.1, 5)))
    if kind == "poisson":
        return scipy_stats.poisson(draw(st.floats(0.1, 20)))
    if kind == "gamma":
        return scipy_stats.gamma(draw(st.floats(0.5, 5)), loc=loc)
    if kind == "binom":
        return scipy_stats.binom(draw(st.integers(1, 50)), draw(st.floats(0, 1)))
    return scipy_stats.expon(scale=draw(st.floats(0.1, 5)))


@st.composite
def generators(draw: Any) -> Any:
    seed = draw(st.integers(0, 2**32 - 1))
    rng: Any = np.random.default_rng(seed) if draw(st.booleans()) else np.random.RandomState(seed)
    for _ in range(draw(st.integers(0, 3))):  # part-way through its stream
        rng.standard_normal()
    return rng


@st.composite
def regressions(draw: Any) -> Any:
    seed = draw(st.integers(0, 10_000))
    n = draw(st.integers(12, 40))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    y = x @ np.array([1.5, -2.0]) + rng.normal(size=n)
    kind = draw(st.sampled_from(["ols", "glm", "linreg", "scaler", "tree"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "ols":
            return sm.OLS(y, sm.add_constant(x)).fit()
        if kind == "glm":
            return sm.GLM(y, sm.add_constant(x)).fit()
    if kind == "linreg":
        from sklearn.linear_model import LinearRegression

        return LinearRegression().fit(x, y)
    if kind == "scaler":
        from sklearn.preprocessing import StandardScaler

        return StandardScaler().fit(x)
    from sklearn.tree import DecisionTreeRegressor

    return DecisionTreeRegressor(max_depth=3, random_state=seed).fit(x, y)


# --------------------------------------------------------------------------- round trips


@SETTINGS
@given(value=frames())
def test_dataframes_round_trip(store: ResultStore, value: pd.DataFrame) -> None:
    assert_stable(store, value)


@SETTINGS
@given(value=arrays)
def test_arrays_round_trip(store: ResultStore, value: np.ndarray) -> None:
    assert_stable(store, value)


@SETTINGS
@given(value=bunches())
def test_sklearn_bunches_round_trip(store: ResultStore, value: Any) -> None:
    assert_stable(store, value)


def test_bundled_dataset_bunch_round_trips(store: ResultStore) -> None:
    from sklearn.datasets import load_diabetes, load_iris

    assert_stable(store, load_iris())
    assert_stable(store, load_diabetes(as_frame=True))


@SETTINGS
@given(value=distributions())
def test_scipy_distributions_round_trip(store: ResultStore, value: Any) -> None:
    assert_stable(store, value)
    loaded = round_trip(store, value, "pickle")
    # Still drawing from numpy's global generator, as before it was stored.
    assert loaded.dist._random_state is np.random.mtrand._rand


@SETTINGS
@given(value=generators())
def test_random_generators_round_trip(store: ResultStore, value: Any) -> None:
    assert_stable(store, value)


@SETTINGS
@given(value=regressions())
def test_fitted_models_round_trip(store: ResultStore, value: Any) -> None:
    assert_stable(store, value)


@SETTINGS
@given(value=st.dictionaries(names, st.one_of(frames(), arrays, distributions()), max_size=3))
def test_containers_of_them_round_trip(store: ResultStore, value: dict[str, Any]) -> None:
    assert_stable(store, value)


# --------------------------------------------------------------------------- distinctions


def test_distributions_differ_by_parameters_and_private_generator() -> None:
    norm = scipy_stats.norm
    assert fingerprint(norm(0, 1)) == fingerprint(norm(0, 1))
    assert fingerprint(norm(0, 1)) != fingerprint(norm(0, 2))
    assert fingerprint(norm(0, 1)) != fingerprint(scipy_stats.logistic(0, 1))
    assert fingerprint(scipy_stats.poisson(3)) != fingerprint(scipy_stats.poisson(3, loc=1))
    seeded, other = norm(0, 1), norm(0, 1)
    seeded.random_state = 1
    other.random_state = 2
    assert fingerprint(seeded) != fingerprint(other)
    assert fingerprint(seeded) != fingerprint(norm(0, 1))


def test_global_generator_draws_do_not_change_a_distribution() -> None:
    d = scipy_stats.norm(0, 1)
    before = fingerprint(d)
    np.random.rand(3)
    assert fingerprint(d) == before


def test_generators_differ_by_state() -> None:
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    assert fingerprint(a) == fingerprint(b)
    a.random()
    assert fingerprint(a) != fingerprint(b)
    r = np.random.RandomState(1)
    before = fingerprint(r)
    r.standard_normal()  # leaves a Box-Muller spare behind
    assert fingerprint(r) != before


def test_bunch_with_bookkeeping_still_differs_by_content() -> None:
    from sklearn.utils import Bunch

    a, b = Bunch(x=1), Bunch(x=2)
    assert fingerprint(a) != fingerprint(b)
    c = Bunch(x=1)
    c._set_deprecated(1, new_key="x", deprecated_key="y", warning_message="old")
    assert fingerprint(c) != fingerprint(a)  # non-empty bookkeeping is hashed


# --------------------------------------------------------------------------- processes

_BUILD = """
import warnings
import numpy as np, scipy.stats as st, statsmodels.api as sm
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from notebook_flow.hashing import fingerprint
rng = np.random.default_rng(7)
x = rng.normal(size=(40, 2)); y = x @ [1.0, 2.0] + rng.normal(size=40)
iris = load_iris()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    clf = LogisticRegression(max_iter=500).fit(iris.data, iris.target)
values = {
    "iris": iris, "norm": st.norm(0, 1), "poisson": st.poisson(3), "norm_gen": st.norm,
    "rng": np.random.default_rng(3), "rs": np.random.RandomState(3),
    "ols": sm.OLS(y, sm.add_constant(x)).fit(), "clf": clf,
    "frame": sm.datasets.longley.load_pandas().data,
    # GLM keeps an np.empty_like scratch buffer (garbage bytes) in its state
    "glm": sm.GLM(y, sm.add_constant(x), family=sm.families.Gaussian()).fit(),
}
"""


def _fingerprints_in_subprocess(code: str) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "random"},
    )
    return dict(line.split("=", 1) for line in out.stdout.split())


def test_fingerprints_are_the_same_in_every_process_and_after_a_store_round_trip(
    tmp_path: Path,
) -> None:
    # Three processes (each importing sklearn, scipy and statsmodels: the cost of this
    # test): one builds the values, stores them and prints their fingerprints; a second
    # builds them again; a third loads the stored ones.
    url = str(tmp_path / "store")
    code = (
        _BUILD
        + "from notebook_flow.storage import ResultStore\n"
        + f"store = ResultStore({url!r}, signing_key=b'k' * 32)\n"
        + "for i, (k, v) in enumerate(sorted(values.items())):\n"
        + "    store.commit(f'{i:032x}', v, task='t', components={}, run_id='r', duration=0.0,"
        + " expires_at=None)\n"
        + "    print(f'{k}={fingerprint(v)}')\n"
    )
    stored = _fingerprints_in_subprocess(code)
    assert len(stored) == 10
    rebuilt = _fingerprints_in_subprocess(
        _BUILD + "for k, v in values.items(): print(f'{k}={fingerprint(v)}')\n"
    )
    assert rebuilt == stored  # the same in every process
    load = (
        "from notebook_flow.hashing import fingerprint\n"
        "from notebook_flow.storage import ResultStore\n"
        f"store = ResultStore({url!r}, signing_key=b'k' * 32)\n"
        f"names = {sorted(stored)!r}\n"
        "for i, k in enumerate(names):\n"
        "    v = store.load(store.lookup(f'{i:032x}'))\n"
        "    print(f'{k}={fingerprint(v)}')\n"
    )
    assert _fingerprints_in_subprocess(load) == stored  # and after a round trip


def test_cell_restoring_a_distribution_keeps_it_on_the_global_generator(shell: Any) -> None:
    # Before: the cells' pickle copied numpy's global RandomState into the distribution, so
    # after a hit `d.rvs()` drew from a stale private copy, and `d` fingerprinted differently.
    code = "%%task\nfrom scipy import stats\nimport numpy as np\nd = stats.t(3)\nx = np.arange(3)\n"
    shell.run_cell(code)
    first = fingerprint(shell.user_ns["d"])
    shell.reset(new_session=False)
    result = shell.run_cell(code)
    assert result.success
    d = shell.user_ns["d"]
    assert d.dist._random_state is np.random.mtrand._rand
    assert fingerprint(d) == first
