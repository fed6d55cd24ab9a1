"""A cold process behaves like a warm one (DESIGN §7), and its first ``submit()`` does
not make the caller import the heavy libraries (the issue: a web server's first request
waited 0.4-0.8 s for DuckDB, pyarrow and numpy). Times are measured by
``benchmarks/bench_worker.py``; these tests check *which thread* imports what, and that
nothing reads a half-imported module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

from notebook_flow._imports import loaded

HEAVY = ("duckdb", "pyarrow", "pandas", "numpy", "cloudpickle", "filelock")

FIRST_SUBMIT = """
import builtins, json, sys, threading

from notebook_flow import task
from notebook_flow.cache_policies import INPUTS

@task(cache_policy=INPUTS)
def double(x):
    return 2 * x

heavy = {HEAVY!r}
on_caller = []
real_import = builtins.__import__

def watching(name, *args, **kwargs):
    top = name.partition(".")[0]
    if top in heavy and top not in sys.modules and threading.current_thread() is caller:
        on_caller.append(top)
    return real_import(name, *args, **kwargs)

caller = threading.current_thread()
before = sorted(m for m in heavy if m in sys.modules)
builtins.__import__ = watching
try:
    fut = double.submit(21)
finally:
    builtins.__import__ = real_import
value = fut.result(timeout=120)
import notebook_flow
notebook_flow.shutdown(wait=True)
print(json.dumps({{"before": before, "on_caller": on_caller, "value": value}}))
"""


def test_first_submit_imports_no_heavy_library_on_the_callers_thread(python_env):
    done = subprocess.run(
        [sys.executable, "-c", FIRST_SUBMIT.format(HEAVY=HEAVY)],
        env=python_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["value"] == 42
    assert report["before"] == []  # import notebook_flow + @task load none of them
    assert report["on_caller"] == [], report  # the worker and recorder threads do


def test_a_cold_process_submits_and_hits_like_a_warm_one(python_env):
    # The first run records its events (DuckDB imported by the recorder thread) and
    # commits; a second fresh process hits the same key.
    script = textwrap.dedent(
        """
        import notebook_flow
        from notebook_flow import task
        from notebook_flow.cache_policies import INPUTS

        @task(cache_policy=INPUTS)
        def square(x):
            return x * x

        futs = square.map(range(20))
        print(futs.result(timeout=120), [f.state.name for f in futs][:1])
        notebook_flow.shutdown(wait=True)
        """
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", script],
            env=python_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    squares = str([x * x for x in range(20)])
    assert runs[0].stdout.startswith(squares) and "['Completed']" in runs[0].stdout
    assert runs[1].stdout.startswith(squares) and "['Cached']" in runs[1].stdout


def test_loaded_waits_for_a_module_another_thread_is_importing(tmp_path, monkeypatch):
    # slowlib's body pauses half way (its first half defined, not its second) until the
    # test lets it go: meanwhile loaded() in a third thread must wait, not return it.
    gate = tmp_path / "nf_gate.py"
    gate.write_text("import threading\nstarted = threading.Event()\nrelease = threading.Event()\n")
    (tmp_path / "nf_slowlib.py").write_text(
        "import nf_gate\nFIRST = 1\nnf_gate.started.set()\n"
        "assert nf_gate.release.wait(30)\nDataFrame = object\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import nf_gate  # type: ignore[import-not-found]

    importer = threading.Thread(target=__import__, args=("nf_slowlib",))
    importer.start()
    assert nf_gate.started.wait(30)
    assert "nf_slowlib" in sys.modules  # half-imported: what sys.modules.get would see
    assert not hasattr(sys.modules["nf_slowlib"], "DataFrame")

    got: list[object] = []
    looker = threading.Thread(target=lambda: got.append(loaded("nf_slowlib")))
    looker.start()
    looker.join(0.2)
    assert looker.is_alive() and not got  # still waiting for the import to finish
    nf_gate.release.set()
    looker.join(30)
    importer.join(30)
    assert got and hasattr(got[0], "DataFrame")
    for name in ("nf_slowlib", "nf_gate"):
        sys.modules.pop(name, None)


def test_loaded_never_imports_and_finds_imported_modules():
    assert loaded("json") is json
    assert loaded("notebook_flow_no_such_module") is None
    assert "notebook_flow_no_such_module" not in sys.modules
