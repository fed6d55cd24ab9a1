"""Who is running: host, process, kernel, notebook and thread.

Used as metadata on runs and as lock holder ids; never part of a cache key.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from contextvars import ContextVar, Token

__all__ = [
    "ProcessIdentity",
    "current_cell",
    "holder_id",
    "new_run_id",
    "notebook_path",
    "parse_holder",
    "pid_alive",
    "process",
    "process_start_time",
    "set_current_cell",
]


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), or None if unknown.

    Together with the pid it names a process uniquely, so a recycled pid is not mistaken
    for the holder that died.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True when ``pid`` runs on this host (and, if given, started at ``start_time``)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start_time is not None:
        actual = process_start_time(pid)
        if actual is not None and actual != start_time:
            return False
    # A zombie (killed but not reaped) is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        state = data[data.rfind(b")") + 2 :].split()[0]
        if state in (b"Z", b"X"):
            return False
    except (OSError, IndexError):
        pass
    return True


class ProcessIdentity:
    """The identity of the current process; recomputed after a fork (pid changes)."""

    __slots__ = ("host", "kernel", "pid", "session", "start_time")

    def __init__(self) -> None:
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.start_time = process_start_time(self.pid)
        self.kernel = _kernel_id()
        self.session = uuid.uuid4().hex[:12]

    def __repr__(self) -> str:
        return f"ProcessIdentity(host={self.host!r}, pid={self.pid}, kernel={self.kernel!r})"


_process: ProcessIdentity | None = None


def process() -> ProcessIdentity:
    """The current process's identity (cached, refreshed in a forked child)."""
    global _process
    if _process is None:
        _process = ProcessIdentity()
    return _process


def _forget_process() -> None:
    global _process
    _process = None


# A fork hook instead of an os.getpid() check per call: this runs on every run event.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_process)


def _kernel_id() -> str | None:
    """The Jupyter kernel id, read from the connection file name, if this is a kernel."""
    app = sys.modules.get("ipykernel.kernelapp")
    if app is None:
        return None
    try:
        inst = app.IPKernelApp.instance() if app.IPKernelApp.initialized() else None
    except Exception:
        return None
    if inst is None:
        return None
    name = os.path.basename(getattr(inst, "connection_file", "") or "")
    if name.startswith("kernel-") and name.endswith(".json"):
        return name[len("kernel-") : -len(".json")]
    return name or None


def new_run_id() -> str:
    """A fresh run id (32 hex characters)."""
    return uuid.uuid4().hex


def holder_id(run_id: str | None = None) -> str:
    """A lock holder id: ``host:pid:start_time:thread[:run_id]``.

    >>> holder_id("abc").count(":")
    4
    """
    p = process()
    parts = [p.host, str(p.pid), str(p.start_time or 0), str(threading.get_ident())]
    if run_id:
        parts.append(run_id)
    return ":".join(parts)


def parse_holder(holder: str) -> dict[str, str | int | None]:
    """Split a holder id into its parts; unknown formats come back as ``{"raw": holder}``."""
    parts = holder.split(":")
    if len(parts) < 4 or not parts[1].isdigit():
        return {"raw": holder}
    return {
        "host": parts[0],
        "pid": int(parts[1]),
        "start_time": int(parts[2]) if parts[2].isdigit() and parts[2] != "0" else None,
        "thread": parts[3],
        "run_id": parts[4] if len(parts) > 4 else None,
    }


_notebook: tuple[object, float, str | None] = (None, 0.0, None)


def notebook_path() -> str | None:
    """The notebook this code runs in, when the frontend says so; never part of a key.

    Looks at ``__session__`` (JupyterLab/Notebook ≥ 7), ``__vsc_ipynb_file__`` (VS Code)
    in the user namespace, then ``JPY_SESSION_NAME``. Cached for a second per ``__main__``
    module: it is read on every run event, and the frontend sets it once per kernel.
    """
    global _notebook
    main = sys.modules.get("__main__")
    cached_main, when, value = _notebook
    now = time.monotonic()
    if cached_main is main and now - when < 1.0:
        return value
    value = None
    for name in ("__session__", "__vsc_ipynb_file__"):
        found = getattr(main, name, None)
        if isinstance(found, str) and found:
            value = found
            break
    else:
        value = os.environ.get("JPY_SESSION_NAME") or None
    _notebook = (main, now, value)
    return value


_cell: ContextVar[str | None] = ContextVar("notebook_flow_cell", default=None)


def current_cell() -> str | None:
    """The id of the notebook cell running now, when the front end sent one."""
    return _cell.get()


def set_current_cell(cell_id: str | None) -> Token[str | None]:
    """Set the current cell id (done by the IPython extension before each cell)."""
    return _cell.set(cell_id)
