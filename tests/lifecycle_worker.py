"""A process that commits and hits under a quota: the child of the lifecycle stress tests.

``python lifecycle_worker.py CONFIG_JSON`` where the config says:

* ``store`` / ``storage_options``: the store (a folder, or s3:// on the test server);
* ``max_size``: the store's quota (bytes);
* ``seed`` / ``calls``: how many calls of ``blob(i)`` with ``i`` drawn from ``keys``;
* ``pinned``: call ``keep(i)`` (``pin=True``) for these ``i`` first;
* ``barrier``: a folder; the process writes ``ready-<pid>`` there and waits for ``go``.

Every value returned (hit or computed) is checked against what ``blob(i)`` must be; a
mismatch prints ``TORN <i>`` and the exit status is 1. The last line is
``DONE <calls> <hits>``. The process waits for its evictions before it exits.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import notebook_flow
from notebook_flow import task
from notebook_flow.cache_policies import INPUTS
from notebook_flow.lifecycle import quota

N = 40_000  # float64: 320 KB a result

calls_run = 0


@task(cache_policy=INPUTS, name="lifecycle-blob")
def blob(i: int) -> Any:
    global calls_run
    calls_run += 1
    return np.full(N, float(i))


@task(cache_policy=INPUTS, name="lifecycle-keep", pin=True)
def keep(i: int) -> Any:
    return np.full(N, float(-i - 1))


def main() -> int:
    cfg: dict[str, Any] = json.loads(sys.argv[1])
    notebook_flow.configure(
        store=cfg["store"],
        storage_options=cfg.get("storage_options") or {},
        max_size=cfg["max_size"],
        background_commits=False,
    )
    barrier = cfg.get("barrier")
    if barrier:
        Path(barrier, f"ready-{os.getpid()}").touch()
        while not Path(barrier, "go").exists():
            time.sleep(0.01)
    bad = 0
    for i in cfg.get("pinned", []):
        value = keep(i)
        if value.shape != (N,) or not (value == float(-i - 1)).all():
            print(f"TORN keep {i}", flush=True)
            bad += 1
    rng = random.Random(cfg["seed"])
    for _ in range(cfg["calls"]):
        i = rng.choice(cfg["keys"])
        value = blob(i)
        if value.shape != (N,) or not (value == float(i)).all():
            print(f"TORN {i}", flush=True)
            bad += 1
    quota.wait_idle(120)
    print(f"DONE {cfg['calls']} {cfg['calls'] - calls_run}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
