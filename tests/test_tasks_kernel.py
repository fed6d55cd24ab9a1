"""A task defined in a notebook cell hits after a kernel restart, with the same key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _kernels import connect, last_json_line, start_kernel

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


def test_cell_task_hits_after_kernel_restart(tmp_path: Path, isolated_store: Path):
    markers = tmp_path / "markers"
    markers.mkdir()
    env = dict(os.environ, NOTEBOOK_FLOW_STORE=str(isolated_store))
    km = start_kernel(env, tmp_path)
    try:
        kc = connect(km)
        first = last_json_line(kc, CELL.format(markers=str(markers)))
        assert first["value"] == 160
        assert len(list(markers.iterdir())) == 1
        kc.stop_channels()

        km.restart_kernel(now=True)
        kc = connect(km)
        second = last_json_line(kc, CELL.format(markers=str(markers)))
        assert second == first
        assert len(list(markers.iterdir())) == 1  # the restarted kernel loaded, not recomputed

        # Editing a comment in the cell keeps the key; editing the helper changes it.
        commented = CELL.replace("return v * 10", "return v * 10  # ten times")
        third = last_json_line(kc, commented.format(markers=str(markers)))
        assert third["key"] == first["key"]
        changed = CELL.replace("return v * 10", "return v * 11")
        fourth = last_json_line(kc, changed.format(markers=str(markers)))
        assert fourth["key"] != first["key"] and fourth["value"] == 176
        assert len(list(markers.iterdir())) == 2
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
