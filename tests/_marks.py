"""Counting executions across processes with marker files, and waiting for an event.

``MARK`` is source for the process under test (a script, a kernel cell): ``mark(name)``
creates a new file ``name.<n>`` with ``O_EXCL`` in the folder named by ``$MARKS``, so a
count survives the SIGKILL of the process that made it. ``count_marks`` reads them back.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path

MARK = textwrap.dedent(
    """
    def mark(name):
        folder = os.environ["MARKS"]
        n = 0
        while True:
            try:
                path = os.path.join(folder, f"{name}.{n}")
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return
            except FileExistsError:
                n += 1
    """
)


def count_marks(folder: Path) -> dict[str, int]:
    """How many times each name was marked in ``folder``."""
    out: dict[str, int] = {}
    for p in folder.iterdir():
        name = p.name.rsplit(".", 1)[0]
        out[name] = out.get(name, 0) + 1
    return out


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Poll ``predicate`` every 20 ms until it is true; fail after about ``timeout`` s."""
    for _ in range(round(timeout / 0.02)):
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
