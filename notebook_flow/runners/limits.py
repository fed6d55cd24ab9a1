"""Concurrency limits: per task (``@task(max_concurrency=n)``) and per tag
(:func:`set_concurrency_limit`), in this process.

A run takes a slot of every limit that applies before it is dispatched; when one is full
the run is parked on it (it occupies no worker) and re-dispatched when a slot frees. The
global limit is the size of the worker pool (``settings().workers`` for the threads).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from notebook_flow.errors import ConfigurationError
from notebook_flow.states import RunState

if TYPE_CHECKING:
    from notebook_flow.futures import TaskFuture
    from notebook_flow.tasks import Task

__all__ = ["admit", "limits_for", "release", "set_concurrency_limit"]

_PENDING = RunState.PENDING


class _Limit:
    """A concurrency limit: at most ``limit`` runs hold it; the others wait, parked."""

    __slots__ = ("active", "limit", "name", "parked")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.active = 0
        self.parked: deque[TaskFuture[Any]] = deque()

    def __repr__(self) -> str:
        return f"<limit {self.name}: {self.active}/{self.limit}, {len(self.parked)} waiting>"


_limits_lock = threading.Lock()
_task_limits: dict[str, _Limit] = {}
_tag_limits: dict[str, _Limit] = {}


def set_concurrency_limit(tag: str, limit: int | None) -> None:
    """At most ``limit`` runs of tasks tagged ``tag`` run at once in this process
    (None removes the limit). Per-task limits use ``@task(max_concurrency=n)``.

    >>> set_concurrency_limit("database", 2)                # doctest: +SKIP
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigurationError(f"limit must be a positive int or None, got {limit!r}")
    with _limits_lock:
        current = _tag_limits.get(tag)
        if limit is None:
            _tag_limits.pop(tag, None)
            if current is not None:
                current.limit = 1 << 30  # release everything parked on it
        elif current is None:
            _tag_limits[tag] = _Limit(f"tag {tag!r}", limit)
        else:
            current.limit = limit
    if current is not None:
        _admit_parked((current,))


def limits_for(task: Task[..., Any]) -> tuple[_Limit, ...]:
    n = task.max_concurrency
    if n is None and not _tag_limits:
        return ()
    found: list[_Limit] = []
    with _limits_lock:
        if n is not None:
            limit = _task_limits.get(task.identity)
            if limit is None:
                limit = _task_limits[task.identity] = _Limit(f"task `{task.name}`", n)
            limit.limit = n
            found.append(limit)
        for tag in task.tags:
            limit = _tag_limits.get(tag)
            if limit is not None:
                found.append(limit)
    return tuple(found)


def admit(fut: TaskFuture[Any], limits: tuple[_Limit, ...]) -> bool:
    """Take a slot of every limit, or park the run on the first full one."""
    with _limits_lock:
        for limit in limits:
            if limit.active >= limit.limit:
                limit.parked.append(fut)
                return False
        for limit in limits:
            limit.active += 1
    fut._limits = limits  # held: released when the run finishes
    return True


def release(limits: tuple[_Limit, ...]) -> None:
    with _limits_lock:
        for limit in limits:
            limit.active -= 1
    _admit_parked(limits)


def _admit_parked(limits: tuple[_Limit, ...]) -> None:
    for limit in limits:
        while True:
            with _limits_lock:
                if not limit.parked or limit.active >= limit.limit:
                    break
                fut = limit.parked.popleft()
            if fut._state is _PENDING and fut._runner is not None:
                fut._runner._dispatch(fut)


def _after_fork_in_child() -> None:
    global _limits_lock
    _limits_lock = threading.Lock()
    _task_limits.clear()
    _tag_limits.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
