"""A process that calls one SERIALIZABLE task: the child of the exactly-once tests.

``python exactly_once_worker.py CONFIG_JSON`` where the config says:

* ``manager``: a pickled lock manager (base64), or null for the store's default (file locks);
* ``lease`` / ``lock_timeout``: seconds;
* ``names``: call ``charge(name)`` for each, in order (each name is its own key);
* ``threads``: callers per name in this process (default 1), all released together;
* ``barrier``: a folder; the process writes ``ready-<pid>`` there and waits for ``go``;
* ``markers``: the body creates ``<markers>/<name>/<unique>`` with O_EXCL per execution;
* ``kill_in_body``: the body SIGKILLs its own process (the ``mid_body`` crash point);
* ``pause``: the body writes ``<pause>/in-body`` and waits for ``<pause>/proceed``;
* ``host``: pretend to run on another host (so only a lease expiry frees our locks).

Every call prints ``KEY <name> <key>`` first, then ``RESULT <name> <json>`` or
``ERROR <name> <ExceptionType>: <message>``. The exit status is 1 if any call failed.
NOTEBOOK_FLOW_CRASH_AT and NOTEBOOK_FLOW_STORE come from the environment.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import notebook_flow
from notebook_flow import _identity, current_run, task
from notebook_flow.cache_policies import INPUTS

cfg: dict[str, Any] = json.loads(sys.argv[1])
if cfg.get("host"):
    _identity.process().host = cfg["host"]
manager = pickle.loads(base64.b64decode(cfg["manager"])) if cfg.get("manager") else None
policy = (
    INPUTS.configure(lock_manager=manager)
    if manager is not None
    else INPUTS.configure(isolation_level="SERIALIZABLE")
)
notebook_flow.configure(lock_lease=cfg.get("lease", 30.0), lock_timeout=cfg.get("lock_timeout", 60))
MARKERS = Path(cfg["markers"])
PAUSE = Path(cfg["pause"]) if cfg.get("pause") else None


@task(name="charge", cache_policy=policy)
def charge(name: str) -> dict[str, Any]:
    folder = MARKERS / name
    folder.mkdir(parents=True, exist_ok=True)
    os.close(os.open(folder / uuid.uuid4().hex, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    if cfg.get("kill_in_body"):
        os.kill(os.getpid(), signal.SIGKILL)
    if PAUSE is not None:
        (PAUSE / "in-body").touch()
        while not (PAUSE / "proceed").exists():
            time.sleep(0.01)
    run = current_run()
    return {
        "name": name,
        "executed_by": f"{os.getpid()}:{threading.get_ident()}",
        "run_id": run.run_id if run is not None else None,
    }


def wait_for_go() -> None:
    barrier = cfg.get("barrier")
    if not barrier:
        return
    Path(barrier, f"ready-{os.getpid()}").touch()
    while not Path(barrier, "go").exists():
        time.sleep(0.002)


lock = threading.Lock()
failed = False


def call(name: str, start: threading.Barrier | None) -> None:
    global failed
    if start is not None:
        start.wait()
    try:
        line = f"RESULT {name} {json.dumps(charge(name), sort_keys=True)}"
    except Exception as exc:
        line = f"ERROR {name} {type(exc).__name__}: {exc}"
        failed = True
    with lock:
        print(line, flush=True)


threads = int(cfg.get("threads", 1))
for name in cfg["names"]:
    print(f"KEY {name} {charge.cache_key(name)}", flush=True)
wait_for_go()
for name in cfg["names"]:
    if threads == 1:
        call(name, None)
        continue
    start = threading.Barrier(threads)
    workers = [threading.Thread(target=call, args=(name, start)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
sys.exit(1 if failed else 0)
