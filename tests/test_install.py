"""A plain install gives everything the README shows.

The wheel and sdist are built with the project's backend (hatchling, through its PEP 517
hooks); the wheel is installed *without extras* into a fresh venv, which then imports the
package, prints ``notebook-flow --help`` and runs the quickstart notebook twice with
``notebook-flow run`` (the second run resumes from the store). Nothing of the source tree
is importable there: no PYTHONPATH, and the commands run outside the repository.

The venv installs from a wheelhouse kept between runs (``NOTEBOOK_FLOW_TEST_WHEELHOUSE``,
default ``~/.cache/notebook_flow/test-wheelhouse``), filled through pip (and its cache)
only when a dependency is missing from it, so the test neither downloads every time nor
goes stale when the dependencies change.

The declared Pythons are checked at both ends: the install and the two runs happen with
this interpreter and again with the lowest (3.10) and the highest (3.13) supported one,
found on ``PATH`` or among pyenv's versions. Those two install with uv where the test
suite's venv has it (pip where it fails); this interpreter's venv installs with pip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from glob import glob
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.kernel]

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "notebooks" / "requirements.txt"  # what the notebooks import
WHEELHOUSE = Path(
    os.environ.get("NOTEBOOK_FLOW_TEST_WHEELHOUSE")
    or Path.home() / ".cache" / "notebook_flow" / "test-wheelhouse"
)
#: The extras of the package: optional backends only (and the test suite's tools).
EXTRAS = {"redis", "postgres", "s3", "dask", "lab", "test"}
#: The lowest and the highest Python the package declares (pyproject's classifiers).
PYTHONS = ("3.10", "3.13")


def _interpreter(version: str) -> str:
    """A working ``python<version>``: on PATH, else the newest of pyenv's versions."""
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob(f"{root}/versions/{version}.*/bin/python{version}"), reverse=True)
    candidates += [f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    for candidate in filter(None, candidates):
        probe = _run(candidate, "-c", "import sys; print(sys.version_info[:2])", timeout=60)
        if probe.returncode == 0 and probe.stdout.strip() == str(
            tuple(int(n) for n in version.split("."))
        ):
            return candidate
    pytest.skip(f"no Python {version} on this machine (PATH, pyenv): install it to check it")


def _run(*cmd: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 900)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel and the sdist, built by the project's build backend."""
    out = tmp_path_factory.mktemp("dist")
    code = (
        "import sys, hatchling.build as backend\n"
        "print(backend.build_wheel(sys.argv[1]))\n"
        "print(backend.build_sdist(sys.argv[1]))\n"
    )
    built = _run(sys.executable, "-c", code, out, cwd=ROOT)
    assert built.returncode == 0, built.stderr
    return out


@pytest.fixture(scope="module", params=["this", *PYTHONS])
def venv(
    request: pytest.FixtureRequest, dist: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A fresh venv with the wheel installed, no extras (plus the notebooks' matplotlib),
    of this interpreter or of the lowest or highest Python supported."""
    [wheel] = dist.glob("*.whl")
    base = sys.executable if request.param == "this" else _interpreter(request.param)
    root = tmp_path_factory.mktemp("venv") / "venv"
    made = _run(base, "-m", "venv", "--without-pip", root)
    assert made.returncode == 0, made.stderr
    python = root / "bin" / "python"
    uv = Path(sys.executable).with_name("uv")
    if request.param != "this" and uv.exists():
        # The other Pythons install with uv (as scripts/setup does) when it is there: pip
        # took 80-90 s for each of them on CI, downloading wheels for another Python; this
        # interpreter's venv below keeps the plain `pip install` a user makes.
        done = _run(
            uv, "pip", "install", "-q", "--python", python, wheel, "-r", REQUIREMENTS,
            env={**os.environ, "UV_LINK_MODE": "copy"},
        )  # fmt: skip
        if done.returncode == 0:
            return root
    pip = [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check"]
    install = [*pip, "install", "--no-compile", "-q", wheel, "-r", REQUIREMENTS]
    offline = ["--no-index", "--find-links", WHEELHOUSE]
    done = _run(*install, *offline)
    if done.returncode != 0:  # a dependency is not in the wheelhouse yet: fetch it once
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        fetched = _run(
            *pip, "download", "-q", "--only-binary=:all:", "--dest", WHEELHOUSE, wheel,
            "-r", REQUIREMENTS,
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr
        for stale in WHEELHOUSE.glob("notebook_flow-*"):
            stale.unlink()  # our own wheel is always the one just built
        done = _run(*install, *offline)
    assert done.returncode == 0, done.stderr
    return root


def _env(venv: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of a user of the venv: nothing of the source tree on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["NOTEBOOK_FLOW_STORE"] = str(tmp_path / "store")
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "jupyter")  # no kernel of the user's
    return env


def test_wheel_and_sdist_declare_what_a_plain_install_needs(dist: Path) -> None:
    [wheel] = dist.glob("notebook_flow-*.whl")
    [sdist] = dist.glob("notebook_flow-*.tar.gz")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = zf.read(metadata).decode()
        entry_points = zf.read(metadata.replace("METADATA", "entry_points.txt")).decode()
    assert "notebook_flow/py.typed" in names and "notebook_flow/cli.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert "notebook-flow = notebook_flow.cli:main" in entry_points
    assert "Requires-Python: >=3.10" in meta
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in meta
    assert set(re.findall(r"^Provides-Extra: (\S+)$", meta, re.M)) == EXTRAS
    plain = {
        re.split(r"[<>=!~\[; ]", line.split(": ", 1)[1])[0].lower().replace("_", "-")
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    # `notebook-flow run` works after a plain install: the notebook runner is not an extra.
    assert {"nbclient", "nbformat", "jupyter-client", "ipykernel"} <= plain
    # ... and the optional backends are not dependencies.
    assert not plain & {"redis", "psycopg", "s3fs", "dask", "distributed", "jupyterlab"}
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "notebook_flow/__init__.py"} <= members


def test_plain_install_runs_the_quickstart_twice(venv: Path, tmp_path: Path) -> None:
    env = _env(venv, tmp_path)
    imported = _run(
        venv / "bin" / "python", "-c", "import notebook_flow; print(notebook_flow.__file__)",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip().startswith(str(venv)), imported.stdout  # not the source tree

    helped = _run(venv / "bin" / "notebook-flow", "--help", cwd=tmp_path, env=env)
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "history", "stats", "clear", "gc", "dashboard", "locks", "key"):
        assert re.search(rf"^    {command}\b", helped.stdout, re.M), helped.stdout

    notebook = tmp_path / "quickstart.ipynb"
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", notebook)
    small = ["-p", "DAYS=3", "-p", "LATENCY=0.05", "-p", "N_BOOT=100"]
    run = [venv / "bin" / "notebook-flow", "run", notebook, *small]
    first = _run(*run, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"^done: (\d+)/\1 cells .*4 computed", first.stdout, re.M), first.stdout

    second = _run(*run, cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert re.search(r"^done: (\d+)/\1 cells .*4 cached", second.stdout, re.M), second.stdout
    assert "from the store: 5 cells and 3 task results" in second.stdout, second.stdout
    assert (tmp_path / "quickstart.out.ipynb").exists()
