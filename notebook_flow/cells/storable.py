"""What a cell result cannot hold: handles on things outside the process, and values
pickle refuses.

:func:`handle_reason` names an open file, socket, connection, thread, lock or future among
a cell's variables (pickle may "succeed" on some, but what comes back is not what the cell
made); :func:`unstorable` finds the variables pickle rejects, to name them in the note.
"""

from __future__ import annotations

import io
import itertools
import sys
import types
from typing import Any

__all__ = ["handle_reason", "unstorable"]


def handle_reason(value: Any, nested: bool = False) -> str | None:
    """Why ``value`` is a handle on something outside the process (None: it is data).

    Pickle would "succeed" on some of these (cloudpickle reads an open file's contents into
    a StringIO), but what comes back is not what the cell made. Containers are looked into
    one level deep (a list of futures, a dict of connections).
    """
    if not nested and isinstance(value, (list, tuple, set, frozenset, dict)):
        items = value.values() if isinstance(value, dict) else value
        for item in itertools.islice(items, 1000):
            why = handle_reason(item, nested=True)
            if why:
                return f"it holds {why}"

    if isinstance(value, io.IOBase) and not isinstance(value, (io.BytesIO, io.StringIO)):
        return "an open file or stream"
    if isinstance(value, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return "a generator or coroutine, which cannot be saved mid-way"
    checks = (
        ("socket", "socket", "a network socket"),
        ("sqlite3", "Connection", "a database connection"),
        ("sqlite3", "Cursor", "a database cursor"),
        ("threading", "Thread", "a thread"),
        ("subprocess", "Popen", "a running process"),
        ("notebook_flow.futures", "TaskFuture", "a future of background work; store `.result()`"),
    )
    for module_name, attr, why in checks:
        cls = getattr(sys.modules.get(module_name), attr, None)
        if isinstance(cls, type) and isinstance(value, cls):
            return why
    lock_types = (type(_thread_lock()), type(_thread_rlock()))
    if isinstance(value, lock_types):
        return "a lock"
    return None


def _thread_lock() -> Any:
    import threading

    return threading.Lock()


def _thread_rlock() -> Any:
    import threading

    return threading.RLock()


def unstorable(variables: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(name, type, reason)`` for each variable that cannot be pickled."""
    import cloudpickle

    bad = []
    for name, value in variables.items():
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            bad.append((name, type(value).__name__, f"{type(exc).__name__}: {exc}"))
    return bad
