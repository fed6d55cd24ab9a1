"""The three snippets of Prefect's "Don't replay. Resume." page (prefect.io, solutions /
durable execution), each with only its import changed, each run in fresh processes.

1. ``app.py``: a FastAPI endpoint submits a task to the worker embedded in the server
   process and answers at once.
2. ``pipeline.py``: ``extract`` (INPUTS, reused for an hour) and ``transform`` (INPUTS +
   TASK_SOURCE): a run that failed in ``transform`` resumes from there in a new process,
   without running ``extract`` again.
3. exactly once: a SERIALIZABLE task behind a Redis lock runs once although two
   processes call it at the same moment. (The stored copy of the page is cut off inside
   this snippet; it is written here as DESIGN §1 quotes it.)

The snippets use names they do not define (``big_query``, ``clean``): the driver provides
them as builtins, so the snippet text stays as published apart from its import lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

PYTHON = sys.executable

APP_PY = """\
from fastapi import FastAPI
from notebook_flow import task

app = FastAPI()

@task
def process_file(id: str):
    print(f"Processing {id}")

@app.post("/upload")
async def upload(id: str):
    # Run in background on this server
    process_file.submit(id)
    return {"status": "processing"}
"""

PIPELINE_PY = """\
from datetime import timedelta
from notebook_flow import task
from notebook_flow.cache_policies import INPUTS, TASK_SOURCE

@task(cache_policy=INPUTS, cache_expiration=timedelta(hours=1))
def extract():
    # "Reuse if < 1 hour old"
    return big_query.fetch()

@task(cache_policy=INPUTS + TASK_SOURCE)
def transform(data):
    # "Re-run if I change the logic"
    # Resumes from here if 'extract' succeeded
    return clean(data)
"""

CHARGE_PY = """\
from notebook_flow import task
from notebook_flow.cache_policies import INPUTS
from notebook_flow.locks import RedisLockManager

@task(cache_policy=INPUTS.configure(
    lock_manager=RedisLockManager(host="localhost"),
    isolation_level="SERIALIZABLE",
))
def charge(user_id, amount):
    return payments.charge(user_id, amount)
"""


def _run(script: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_app_py_submits_from_an_endpoint_and_answers_at_once(tmp_path, python_env):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    (tmp_path / "app.py").write_text(APP_PY)
    out = _run(
        """
        from fastapi.testclient import TestClient
        import notebook_flow
        from app import app

        with TestClient(app) as client:
            response = client.post("/upload", params={"id": "doc-7"})
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "processing"}
        notebook_flow.shutdown(wait=True)  # the background run finishes
        print("served")
        """,
        tmp_path,
        python_env,
    )
    assert "Processing doc-7" in out and "served" in out


DRIVER = """
import builtins, os, sys

class BigQuery:
    def fetch(self):
        with open(os.environ["CALLS"], "a") as f:
            f.write("extract\\n")
        return [3, 1, 2]

def clean(data):
    with open(os.environ["CALLS"], "a") as f:
        f.write("transform\\n")
    if os.environ.get("FAIL_TRANSFORM"):
        raise RuntimeError("transform failed")
    return sorted(data)

builtins.big_query = BigQuery()
builtins.clean = clean

from pipeline import extract, transform
try:
    print("result", transform(extract()))
except RuntimeError as exc:
    print("failed", exc)
"""


def test_pipeline_py_resumes_after_the_failed_step_in_a_new_process(tmp_path, python_env):
    (tmp_path / "pipeline.py").write_text(PIPELINE_PY)
    calls = tmp_path / "calls.txt"
    env = dict(python_env, CALLS=str(calls))

    out = _run(DRIVER, tmp_path, dict(env, FAIL_TRANSFORM="1"))
    assert "failed transform failed" in out
    assert _lines(calls) == ["extract", "transform"]

    out = _run(DRIVER, tmp_path, env)  # a new process: extract's result is reused
    assert "result [1, 2, 3]" in out
    assert _lines(calls) == ["extract", "transform", "transform"]

    out = _run(DRIVER, tmp_path, env)  # and now nothing runs at all
    assert "result [1, 2, 3]" in out
    assert _lines(calls) == ["extract", "transform", "transform"]


CHARGER = """
import builtins, os, sys, time
from notebook_flow.locks import redis as redis_locks

# The lab's Redis rule (db 15, a fresh key prefix), without touching the snippet's text.
init = redis_locks.RedisLockManager.__init__
init.__defaults__ = ("localhost", 6379, 15)
init.__kwdefaults__ = dict(init.__kwdefaults__, prefix=os.environ["PREFIX"])

class Payments:
    def charge(self, user_id, amount):
        with open(os.environ["CALLS"], "a") as f:
            f.write(f"{user_id} {amount}\\n")
        time.sleep(0.5)  # a slow payment API: the other caller arrives meanwhile
        return {"user": user_id, "charged": amount}

builtins.payments = Payments()

from charge import charge
with open(os.environ["READY"], "a") as f:
    f.write("ready\\n")
while len(open(os.environ["READY"]).read().splitlines()) < int(os.environ["CALLERS"]):
    time.sleep(0.01)  # both processes call at the same moment
print("result", charge(os.environ["USER_ID"], 42))
"""


def test_exactly_once_snippet_runs_the_charge_once_across_processes(tmp_path, python_env):
    from test_locks_contract import require_server

    require_server("redis")
    (tmp_path / "charge.py").write_text(CHARGE_PY)
    calls, ready = tmp_path / "calls.txt", tmp_path / "ready.txt"
    user = f"user-{uuid.uuid4().hex[:8]}"
    env = dict(
        python_env,
        CALLS=str(calls),
        READY=str(ready),
        CALLERS="2",
        USER_ID=user,
        PREFIX=f"nf-test-{uuid.uuid4().hex}",
    )
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", CHARGER],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, out + err
        outs.append(out)
    expected = f"result {{'user': '{user}', 'charged': 42}}"
    assert all(expected in out for out in outs), outs
    assert _lines(calls) == [f"{user} 42"]  # one charge, although both called

    os.remove(ready)
    out = _run(CHARGER, tmp_path, dict(env, CALLERS="1"))  # later: a hit, no charge
    assert expected in out and _lines(calls) == [f"{user} 42"]
