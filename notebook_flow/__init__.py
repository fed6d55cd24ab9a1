"""notebook_flow — Don't replay. Resume.

Cached, durable tasks for Jupyter notebooks::

    from notebook_flow import task

    @task
    def load(path): ...

Names are resolved lazily (PEP 562) so ``import notebook_flow`` stays fast: pandas,
DuckDB, Panel and IPython are imported only when a feature needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _hooks

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "CachePolicy": "cache_policies",
    "DaskRunner": "runners",
    "Explanation": "tasks",
    "FileLockManager": "locks",
    "FutureList": "futures",
    "MemoryLockManager": "locks",
    "PostgresLockManager": "locks",
    "ProcessRunner": "runners",
    "RedisLockManager": "locks",
    "ResultStore": "storage",
    "RunContext": "tasks",
    "RunState": "states",
    "Settings": "config",
    "Task": "tasks",
    "TaskFuture": "futures",
    "ThreadRunner": "runners",
    "allow_failure": "futures",
    "as_completed": "futures",
    "break_lock": "api",
    "cache_entries": "api",
    "configure": "config",
    "current_run": "tasks",
    "exponential_backoff": "tasks",
    "history": "api",
    "list_locks": "api",
    "rebuild_index": "api",
    "register_ambient": "cells.ambient",
    "resume": "runners",
    "running": "runners",
    "set_concurrency_limit": "runners",
    "settings": "config",
    "shutdown": "runners",
    "stats": "api",
    "task": "tasks",
    "unmapped": "futures",
    "wait": "futures",
    "wait_for_commits": "api",
}
_SUBMODULES = (
    "cache_policies",
    "dashboard",
    "errors",
    "hashing",
    "locks",
    "serializers",
    "storage",
)

__all__ = [
    "CachePolicy",
    "DaskRunner",
    "Explanation",
    "FileLockManager",
    "FutureList",
    "MemoryLockManager",
    "PostgresLockManager",
    "ProcessRunner",
    "RedisLockManager",
    "ResultStore",
    "RunContext",
    "RunState",
    "Settings",
    "Task",
    "TaskFuture",
    "ThreadRunner",
    "__version__",
    "allow_failure",
    "as_completed",
    "break_lock",
    "cache_entries",
    "cache_policies",
    "configure",
    "current_run",
    "dashboard",
    "errors",
    "exponential_backoff",
    "hashing",
    "history",
    "list_locks",
    "load_ipython_extension",
    "locks",
    "rebuild_index",
    "register_ambient",
    "resume",
    "running",
    "serializers",
    "set_concurrency_limit",
    "settings",
    "shutdown",
    "stats",
    "storage",
    "task",
    "unload_ipython_extension",
    "unmapped",
    "wait",
    "wait_for_commits",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # next access skips __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'notebook_flow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext notebook_flow``: registers ``%%task`` and ``%flow``."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext notebook_flow``."""
    from .magics import unload_ipython_extension as unload

    unload(ipython)


# -- wiring of the layers (see _hooks.py) ---------------------------------------------------
# The package root is the one module that knows every layer: it points the hooks of the
# lower layers at the higher ones, each imported on first use (so ``import notebook_flow``
# imports none of them).


def _submit_run(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], wait_for: Any) -> Any:
    from .runners import submit_task

    return submit_task(task, args, kwargs, wait_for=wait_for)


def _map_runs(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], wait_for: Any) -> Any:
    from .runners import map_task

    return map_task(task, args, kwargs, wait_for=wait_for)


def _show(obj: Any) -> None:
    from .notebook import show

    show(obj)


_hooks.submit_run = _submit_run
_hooks.map_runs = _map_runs
_hooks.show = _show

if TYPE_CHECKING:
    from . import cache_policies, dashboard, errors, hashing, locks, serializers, storage
    from .api import (
        break_lock,
        cache_entries,
        history,
        list_locks,
        rebuild_index,
        stats,
        wait_for_commits,
    )
    from .cache_policies import CachePolicy
    from .cells.ambient import register_ambient
    from .config import Settings, configure, settings
    from .futures import FutureList, TaskFuture, allow_failure, as_completed, unmapped, wait
    from .locks import FileLockManager, MemoryLockManager, PostgresLockManager, RedisLockManager
    from .runners import (
        DaskRunner,
        ProcessRunner,
        ThreadRunner,
        running,
        set_concurrency_limit,
        shutdown,
    )
    from .runners.resume import resume
    from .states import RunState
    from .storage import ResultStore
    from .tasks import Explanation, RunContext, Task, current_run, exponential_backoff, task
