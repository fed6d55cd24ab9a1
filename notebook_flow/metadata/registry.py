"""Per-process state of the metadata layer: the recorder registry and its exit/fork hooks.

This module holds the only copies of that state. ``_after_fork_in_child`` rebinds
``_registry``, ``_registry_lock``, ``_exiting`` and ``_runs``, so other modules read them
through the module (``registry._registry``), never through a ``from ... import`` of the name.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from notebook_flow.metadata.recorder import _Recorder
    from notebook_flow.metadata.records import RunEvent
    from notebook_flow.states import RunState

logger = logging.getLogger("notebook_flow")

# How long an exiting process waits for the index before it spills what is left (spill.py).
_EXIT_FLUSH_TIMEOUT = 10.0
# How long it then waits for a write session already in flight (in another thread) to end.
# That session holds the file lock, so it waits for no other process, only for CPU; but it
# must end before the interpreter finalizes (see _exiting), and on a loaded machine (load
# average 40 on 2 cores) it outlived a 10 s wait: the process aborted with SIGABRT instead
# of exiting 0 (tests/test_exactly_once.py, 16 processes exiting at once).
_EXIT_DRAIN_TIMEOUT = 120.0

# Set by the exit hook once this process's queues are flushed. A daemon thread still inside
# DuckDB when the interpreter finalizes is unwound through C++ frames and aborts the whole
# process ("terminate called without an active exception"), so from then on only the main
# thread may open the file; other threads park (they are daemons and vanish at exit).
_exiting = threading.Event()

# One recorder per (process, file): a registry of per-process resources, not a user-facing
# singleton. A forked child starts with an empty registry, so it never writes (twice) what
# its parent had queued, and never touches locks or threads copied in an unknown state.
_registry: dict[str, _Recorder] = {}
_registry_lock = threading.Lock()


# The runs this process recorded, by run id: [started, state, tags, saved] (the latest
# state). ``notebook-flow run`` asks after every cell what ran in it (cli.run_tally);
# answering from here costs microseconds, where a DuckDB history read cost 0.1-0.5 s a cell.
_runs: dict[str, list[Any]] = {}
_MAX_RUNS = 10_000


def note_run(event: RunEvent) -> None:
    """Remember a run event of this process for :func:`runs_since`."""
    if event.pid != os.getpid():
        return
    entry = _runs.get(event.run_id)
    if entry is None:
        if len(_runs) >= _MAX_RUNS:  # the oldest go first (dicts keep insertion order)
            for old in list(_runs)[: _MAX_RUNS // 10]:
                _runs.pop(old, None)
        _runs[event.run_id] = [event.at, event.state, event.tags, event.saved]
    else:
        entry[1:] = [event.state, event.tags, event.saved if event.saved is not None else entry[3]]


def runs_since(since: float) -> list[tuple[RunState, tuple[str, ...], float | None]]:
    """``(latest state, tags, seconds saved)`` of each run this process started at or after
    ``since`` (epoch seconds)."""
    return [(e[1], e[2], e[3]) for e in list(_runs.values()) if e[0] >= since]


def _after_fork_in_child() -> None:
    global _registry, _registry_lock, _exiting, _runs
    _registry = {}
    _registry_lock = threading.Lock()
    _exiting = threading.Event()
    _runs = {}
    # multiprocessing's forked children leave through os._exit(), skipping atexit; its own
    # exit hook still runs finalizers, so flush from there.
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        mp_util.Finalize(None, _flush_all_at_exit, exitpriority=100)


class _Exiting(Exception):
    pass


def _may_open() -> bool:
    return not _exiting.is_set() or threading.current_thread() is threading.main_thread()


def _park_if_exiting() -> None:
    if not _may_open():
        threading.Event().wait()  # forever: see _exiting


def _flush_all_at_exit() -> None:
    recorders = list(_registry.values())
    for rec in recorders:
        try:
            rec.flush(_EXIT_FLUSH_TIMEOUT, raise_errors=False)
        except Exception as exc:
            kept = rec.spill_queue()
            if kept is not None:
                logger.warning(
                    "The metadata index %s stayed locked (%s); the run history not written yet "
                    "is kept in %s for the next session",
                    rec.db.path,
                    exc,
                    kept,
                )
            else:
                logger.warning("Metadata for %s not written at exit: %s", rec.db.path, exc)
        rec.stop(timeout=5.0)
    _exiting.set()
    for rec in recorders:  # sessions other threads began before the flag was set
        rec.db.drain(timeout=_EXIT_DRAIN_TIMEOUT)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_flush_all_at_exit)
