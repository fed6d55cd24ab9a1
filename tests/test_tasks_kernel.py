"""A task defined in a notebook cell hits after a kernel restart, with the same key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

CELL = """
from notebook_flow import task
import os, json

def helper(v):
    return v * 10

@task
def square(x):
    open(os.path.join({markers!r}, os.urandom(8).hex()), "x").close()   # count executions
    return helper(x) * x

print(json.dumps({{"value": square(4), "key": square.cache_key(4)}}))
"""


def run_cell(kc, code: str, timeout: float = 60) -> str:
    out: list[str] = []
    errors: list[str] = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            errors.append("\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok", errors
    return "".join(out)


def test_cell_task_hits_after_kernel_restart(tmp_path: Path, isolated_store: Path):
    from jupyter_client.manager import KernelManager

    markers = tmp_path / "markers"
    markers.mkdir()
    env = dict(os.environ, NOTEBOOK_FLOW_STORE=str(isolated_store))
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(tmp_path))
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        first = json.loads(run_cell(kc, CELL.format(markers=str(markers))).strip().splitlines()[-1])
        assert first["value"] == 160
        assert len(list(markers.iterdir())) == 1
        kc.stop_channels()

        km.restart_kernel(now=True)
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        second = json.loads(
            run_cell(kc, CELL.format(markers=str(markers))).strip().splitlines()[-1]
        )
        assert second == first
        assert len(list(markers.iterdir())) == 1  # the restarted kernel loaded, not recomputed

        # Editing a comment in the cell keeps the key; editing the helper changes it.
        commented = CELL.replace("return v * 10", "return v * 10  # ten times")
        third = json.loads(
            run_cell(kc, commented.format(markers=str(markers))).strip().splitlines()[-1]
        )
        assert third["key"] == first["key"]
        changed = CELL.replace("return v * 10", "return v * 11")
        fourth = json.loads(
            run_cell(kc, changed.format(markers=str(markers))).strip().splitlines()[-1]
        )
        assert fourth["key"] != first["key"] and fourth["value"] == 176
        assert len(list(markers.iterdir())) == 2
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
