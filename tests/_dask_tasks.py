"""Tasks the cluster tests run: importable on the workers (their PYTHONPATH has tests/).

``square`` leaves one marker file per execution in ``marks`` (a folder on this machine:
loopback workers share it; it counts executions, nothing else) after its body's work.
"""

from __future__ import annotations

import os
import time
import uuid

from notebook_flow import task
from notebook_flow.cache_policies import INPUTS


@task(cache_policy=INPUTS)
def square(x: int, marks: str | None = None, delay: float = 0.0) -> int:
    time.sleep(delay)
    if marks:
        with open(os.path.join(marks, f"{x}-{uuid.uuid4().hex}"), "x"):
            pass
    return x * x


@task(cache_policy=INPUTS)
def fails(x: int) -> int:
    raise ArithmeticError(f"cannot {x}")


@task(cache_policy=None)
def uncached(x: int) -> int:
    return x + 1


def count_marks(marks: str) -> dict[int, int]:
    """Executions per argument, from the marker files."""
    out: dict[int, int] = {}
    for name in os.listdir(marks):
        x = int(name.split("-", 1)[0])
        out[x] = out.get(x, 0) + 1
    return out
