"""Several processes write runs into one store at once: exact counts, no lock errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import notebook_flow as nf
from notebook_flow import config

WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from notebook_flow import task, config

    @task
    def f(i, j):
        return {"i": i, "j": j}

    i = int(sys.argv[1])
    start = Path(sys.argv[2])
    while not start.exists():          # a start barrier: all processes begin together
        time.sleep(0.005)
    for j in range(200):
        assert f(i, j % 100) == {"i": i, "j": j % 100}
    config.get_metadata().flush()
    print("ok", i)
    """
)


@pytest.mark.slow
def test_eight_processes_times_200_runs(tmp_path: Path, python_env):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    start = tmp_path / "start"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(start)],
            env=python_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    time.sleep(0.5)
    start.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "Error" not in err and "Traceback" not in err, err
    h = nf.history()
    assert len(h) == 1600
    counts = h["state"].astype(str).value_counts().to_dict()
    assert counts == {"COMPLETED": 800, "CACHED": 800}
    assert h["run_id"].is_unique
    assert nf.stats()["entries"] == 800
    config.get_metadata().flush()
