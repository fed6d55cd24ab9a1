"""A process killed while committing a large result leaves nothing a reader would load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from notebook_flow import task

    @task
    def big(n):
        open(os.path.join(sys.argv[1], os.urandom(8).hex()), "x").close()  # count executions
        return np.ones(n, dtype="float64")

    value = big(25_000_000)   # 200 MB
    print(value.shape[0], float(value.sum()))
    """
)


def _payload_growing(store: Path) -> bool:
    results = store / "results"
    if not results.exists():
        return False
    for p in results.rglob("*"):
        try:
            if p.is_file() and p.stat().st_size > 1_000_000:
                return True
        except FileNotFoundError:
            pass
    return False


def _manifests(store: Path) -> list[Path]:
    folder = store / "manifests"
    return list(folder.rglob("*.json")) if folder.exists() else []


@pytest.mark.slow
def test_sigkill_during_200mb_commit_then_recompute(
    tmp_path: Path, isolated_store: Path, python_env
):
    script = tmp_path / "big.py"
    script.write_text(SCRIPT)
    markers = tmp_path / "markers"
    markers.mkdir()
    cmd = [sys.executable, str(script), str(markers)]

    proc = subprocess.Popen(cmd, env=python_env)
    deadline = time.monotonic() + 120
    while not _payload_growing(isolated_store):
        assert proc.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline, "no payload write started"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _manifests(isolated_store) == []  # nothing committed: the manifest comes last
    assert len(list(markers.iterdir())) == 1

    # The next run recomputes (same task, same key) and commits.
    out = subprocess.run(cmd, env=python_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["25000000", "25000000.0"]
    assert len(list(markers.iterdir())) == 2
    assert len(_manifests(isolated_store)) == 1

    # And the one after that loads it.
    out = subprocess.run(cmd, env=python_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["25000000", "25000000.0"]
    assert len(list(markers.iterdir())) == 2
