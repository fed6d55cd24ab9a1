"""Real public notebooks (tests/corpus) run with ``notebook-flow run --cache-all`` give the
results of a plain run: cold, a second time, resumed after a SIGKILL of the kernel, and
after a one-parameter edit. Every output and the final namespace (values and aliases) are
compared with a plain nbclient run, except what corpus.toml declares nondeterministic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("statsmodels")
pytest.importorskip("sklearn")

sys.path.insert(0, str(Path(__file__).resolve().parent / "corpus"))
import harness  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

CORPUS = harness.load_corpus()
#: Each notebook's tests run in one xdist worker (scripts/test passes --dist loadgroup), so
#: that they share its plain run (see _plain) instead of each worker making its own.
NOTEBOOKS = [pytest.param(nb, id=nb.name, marks=pytest.mark.xdist_group(nb.name)) for nb in CORPUS]


def test_corpus_is_declared_and_vendored() -> None:
    assert len(CORPUS) >= 8
    readme = (harness.HERE / "README.md").read_text()
    for nb in CORPUS:
        assert nb.path.exists(), nb.name
        assert nb.source in readme and nb.name in readme, f"{nb.name} missing from README"


_PLAIN: dict[str, harness.Run] = {}


def _plain(nb: harness.Notebook, factory: pytest.TempPathFactory) -> harness.Run:
    """The notebook's plain run, once per session: both tests below compare with it (its
    outputs do not depend on the folder it ran in, or no cached run could equal it)."""
    if nb.name not in _PLAIN:
        home = factory.mktemp(f"plain-{nb.name}")
        path = harness.prepare(nb, home / "plain", edited=False, cached=False)
        _PLAIN[nb.name] = harness.run_plain(path, harness.kernel_env(home))
    return _PLAIN[nb.name]


def _check(nb: harness.Notebook, reference: object, run: harness.Run, what: str) -> None:
    assert run.returncode == 0, f"{what} run failed:\n{run.log}"
    diffs = harness.differences(nb, reference, run.notebook)
    assert not diffs, f"{nb.name}, {what} run differs from the plain run:\n" + "\n".join(diffs)


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_cached_runs_equal_the_plain_run(
    nb: harness.Notebook, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = harness.kernel_env(tmp_path)
    plain = _plain(nb, tmp_path_factory)
    path = harness.prepare(nb, tmp_path / "cached", edited=False, cached=True)
    store = tmp_path / "store"

    cold = harness.run_cached(path, store, env)
    _check(nb, plain.notebook, cold, "cold")
    second = harness.run_cached(path, store, env)
    _check(nb, plain.notebook, second, "second")

    # The one-parameter edit, on the store of the runs above.
    edited_plain = harness.run_plain(
        harness.prepare(nb, tmp_path / "plain", edited=True, cached=False), env
    )
    edited = harness.run_cached(
        harness.prepare(nb, tmp_path / "cached", edited=True, cached=True), store, env
    )
    _check(nb, edited_plain.notebook, edited, "edited")


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_resume_after_a_kill_equals_the_plain_run(
    nb: harness.Notebook, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Killed half-way through a cold ``--cache-all`` run, then run again on its store (the
    first half from the store): equals the plain run. Its own test, so that scripts/stress
    can loop it alone."""
    env = harness.kernel_env(tmp_path)
    plain = _plain(nb, tmp_path_factory)
    path = harness.prepare(nb, tmp_path / "cached", edited=False, cached=True)
    store = tmp_path / "store"
    cells = len(harness._code_cells(plain.notebook))
    killed = harness.run_cached(path, store, env, kill_at=cells // 2)
    assert killed.returncode != 0, killed.log
    _check(nb, plain.notebook, harness.run_cached(path, store, env), "resumed")
