"""examples/fastapi_app.py served for real on loopback: a request returns before its task
completes, and the task's result then appears in the store."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parent.parent


def _poll(fn, what: str):
    for _ in range(3000):
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_endpoint_answers_before_the_background_task_finishes(python_env, tmp_path, isolated_store):
    gate = tmp_path / "gate"
    env = dict(python_env, REPORT_GATE=str(gate))
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.fastapi_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        port = None
        for line in server.stderr:
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "uvicorn did not start"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            reply = client.post("/reports/7")
            assert reply.status_code == 202
            run_id = reply.json()["run_id"]
            # The job is held at the gate: the answer came first, nothing is stored yet.
            assert not gate.exists()
            assert client.get(f"/reports/runs/{run_id}").json()["state"] in {"PENDING", "RUNNING"}
            assert client.get("/reports/running").json() == [run_id]
            gate.touch()
            status = _poll(
                lambda: (
                    (s := client.get(f"/reports/runs/{run_id}").json())["state"] == "COMPLETED"
                    and s
                ),
                "the background run to complete",
            )
            assert status["result"] == {"customer": 7, "total": 10.5}
    finally:
        server.terminate()
        server.wait(30)

    from notebook_flow.storage import ResultStore

    store = ResultStore(str(isolated_store))
    [manifest] = [m for m in store.iter_manifests() if m.task.endswith(":build_report")]
    assert manifest.run_id == run_id
    assert store.load(manifest) == {"customer": 7, "total": 10.5}
