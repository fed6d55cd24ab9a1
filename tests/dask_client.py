"""A client process of the cluster tests: ``python dask_client.py CONFIG_JSON``.

The config says:

* ``scheduler``: the scheduler address; ``store`` / ``endpoint``: the S3 store;
* ``mode``: ``"map"`` — ``square.map(range(n), marks, delay)`` through a DaskRunner,
  printing ``SUBMITTED`` once submitted and ``DONE`` once every result is in;
  ``"charge"`` — ``charge.map`` over ``names`` × ``repeat`` with a RedisLockManager
  (``redis_url``, ``prefix``): the body counts its executions in Redis.
"""

from __future__ import annotations

import json
import sys
import time

import notebook_flow as nf
from notebook_flow.runners import DaskRunner

cfg = json.loads(sys.argv[1])
nf.configure(
    store=cfg["store"],
    storage_options={"client_kwargs": {"endpoint_url": cfg["endpoint"]}, "key": "x", "secret": "x"},
)

if cfg["mode"] == "map":
    from _dask_tasks import square

    from notebook_flow.config import get_metadata
    from notebook_flow.runners import journal

    runner = DaskRunner(cfg["scheduler"])
    with runner:
        futs = square.map(range(cfg["n"]), cfg["marks"], cfg["delay"])
    # The journal and the PENDING events are durable within milliseconds; on a loaded
    # machine, wait for them, so the test is about the cluster, not about that window.
    journal.flush()
    get_metadata().flush(timeout=120)
    print("SUBMITTED", flush=True)
    values = [f.result(timeout=600) for f in futs]
    assert values == [x * x for x in range(cfg["n"])], values
    print("DONE", flush=True)
    runner.shutdown()

elif cfg["mode"] == "charge":
    from notebook_flow import task
    from notebook_flow.cache_policies import INPUTS
    from notebook_flow.locks import RedisLockManager

    manager = RedisLockManager(url=cfg["redis_url"], prefix=cfg["prefix"])

    @task(cache_policy=INPUTS.configure(lock_manager=manager))
    def charge(name: str) -> str:
        import redis

        client = redis.Redis.from_url(cfg["redis_url"])
        client.incr(f"{cfg['prefix']}:count:{name}")
        client.close()
        time.sleep(0.2)
        return name.upper()

    runner = DaskRunner(cfg["scheduler"])
    with runner:
        futs = charge.map(cfg["names"] * cfg["repeat"])
    values = [f.result(timeout=600) for f in futs]
    assert values == [n.upper() for n in cfg["names"] * cfg["repeat"]], values
    print("DONE", flush=True)
    runner.shutdown()
