"""A web endpoint that answers at once while the work finishes in the background.

    uvicorn examples.fastapi_app:app --port 8000
    curl -X POST localhost:8000/reports/42      # {"run_id": "...", "state": "PENDING"} at once
    curl localhost:8000/reports/runs/<run_id>   # PENDING / RUNNING / COMPLETED + the result

No broker, no second service: ``task.submit`` hands the run to the worker threads embedded
in this process. Results are committed to the store (``NOTEBOOK_FLOW_STORE``), so the same
report asked again — from this process, another one, or a notebook — is a cache hit.
Runs still in flight when the server dies are journaled: ``notebook_flow.resume()`` at the
next start re-submits them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import FastAPI, HTTPException

from notebook_flow import task
from notebook_flow.runners import running

app = FastAPI(title="notebook_flow background reports")


@task
def build_report(customer: int) -> dict[str, Any]:
    """Stands in for a slow job (a query, a model, a PDF)."""
    gate = os.environ.get("REPORT_GATE")  # tests hold the job here until they release it
    if gate:
        while not os.path.exists(gate):
            time.sleep(0.01)
    else:
        time.sleep(2.0)
    return {"customer": customer, "total": customer * 1.5}


_futures: dict[str, Any] = {}  # run id -> future, for status requests in this process


@app.post("/reports/{customer}", status_code=202)
def create_report(customer: int) -> dict[str, Any]:
    """Submit the job and answer immediately with its run id."""
    fut = build_report.submit(customer)
    _futures[fut.run_id] = fut
    return {"run_id": fut.run_id, "state": fut.run_state.value}


@app.get("/reports/runs/{run_id}")
def report_status(run_id: str) -> dict[str, Any]:
    fut = _futures.get(run_id)
    if fut is None:
        raise HTTPException(404, f"no run {run_id} in this process")
    body: dict[str, Any] = {"run_id": run_id, "state": fut.run_state.value}
    if fut.done():
        error = fut.exception()
        if error is None:
            body["result"] = fut.result()
            _futures.pop(run_id, None)
        else:
            body["error"] = f"{type(error).__name__}: {error}"
    return body


@app.get("/reports/running")
def in_flight() -> list[str]:
    return [f.run_id for f in running()]
