"""Run history a process could not write before it exited, kept for the next session.

DuckDB lets one process at a time open the index, and our file lock serializes sessions.
When another process keeps it longer than an exiting process's flush waits (a long batch,
a hung or paused kernel: ``SIGSTOP``, a debugger), the events still queued would be lost.
The exit hook writes them to ``<index>.spill/<host>-<pid>-<ns>.json`` instead (temp file,
fsync, rename; JSON, not pickle: reading the file must never run code). The next write
session of any process adds every spill file to its transaction, deduplicated (a session
that committed but died before removing a file leaves it behind), and removes the files
once the transaction committed.

A spill file that cannot be read (written by an incompatible version, damaged by hand) is
renamed ``*.broken`` with a warning, never retried forever nor deleted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from notebook_flow._localfs import fsync_dir
from notebook_flow.metadata.records import (
    CacheEntry,
    LockEvent,
    RunEvent,
    _MarkCrashed,
    _Op,
    _Remove,
)
from notebook_flow.states import RunState

logger = logging.getLogger("notebook_flow")

_SUFFIX = ".json"
_TYPES: dict[str, type] = {
    "run": RunEvent, "lock": LockEvent, "cache": CacheEntry, "remove": _Remove,
    "crashed": _MarkCrashed,
}  # fmt: skip
_NAMES = {cls: name for name, cls in _TYPES.items()}


def _encode(op: _Op) -> dict[str, Any]:
    fields = (
        {f.name: getattr(op, f.name) for f in dataclasses.fields(op)}
        if dataclasses.is_dataclass(op)
        else {}
    )
    if isinstance(op, RunEvent):
        fields["state"] = op.state.value
    return {"type": _NAMES[type(op)], "fields": fields}


def _decode(item: dict[str, Any]) -> _Op:
    cls = _TYPES[item["type"]]
    fields = dict(item["fields"])
    if cls is RunEvent:
        fields["state"] = RunState(fields["state"])
        fields["tags"] = tuple(fields.get("tags") or ())
    elif cls is _Remove and fields.get("keys") is not None:
        fields["keys"] = tuple(fields["keys"])
    op: _Op = cls(**fields)
    return op


def folder(db_path: str) -> str:
    return db_path + ".spill"


def write(db_path: str, ops: Sequence[_Op]) -> str:
    """Keep ``ops`` durably for the next session; returns the file's path."""
    spill = folder(db_path)
    os.makedirs(spill, exist_ok=True)
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())
    name = f"{host}-{os.getpid()}-{time.time_ns()}{_SUFFIX}"
    path = os.path.join(spill, name)
    tmp = os.path.join(spill, f".{name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([_encode(op) for op in ops], f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(spill)
    return path


def any_waiting(db_path: str) -> bool:
    """Whether spill files wait (one directory read; no folder is the common case)."""
    try:
        return any(n.endswith(_SUFFIX) for n in os.listdir(folder(db_path)))
    except OSError:
        return False


def take(db_path: str) -> tuple[list[str], list[_Op]]:
    """The waiting spill files and their operations, oldest first; the caller holds the
    index's lock, writes the operations (deduplicated) and then calls :func:`remove`."""
    spill = folder(db_path)
    try:
        names = sorted(n for n in os.listdir(spill) if n.endswith(_SUFFIX))
    except OSError:
        return [], []
    paths: list[str] = []
    ops: list[_Op] = []
    for name in names:
        path = os.path.join(spill, name)
        try:
            with open(path, encoding="utf-8") as f:
                loaded = [_decode(item) for item in json.load(f)]
        except FileNotFoundError:
            continue
        except Exception as exc:
            logger.warning("Cannot read the spilled run history %s (%s); set aside", path, exc)
            try:
                os.replace(path, path + ".broken")
            except OSError:
                pass
            continue
        paths.append(path)
        ops.extend(loaded)
    return paths, ops


def remove(paths: Sequence[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # written again (deduplicated) by the next session
            logger.warning("Cannot remove the spilled run history %s: %s", path, exc)
