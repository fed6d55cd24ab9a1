"""Task state hooks, as in Prefect 3: ``on_completion`` and ``on_failure`` get
``(task, task_run, state)``; ``on_commit`` and ``on_rollback`` get the task's
:class:`~notebook_flow.transactions.Transaction` (they run from there).

>>> @task(on_completion=[notify])            # doctest: +SKIP
... def load(path): ...
>>> @load.on_failure                          # doctest: +SKIP
... def page(task, task_run, state):
...     print(task_run.name, state.message)

A completion hook runs after a computed *or* cached result (``state.name`` says which), a
failure hook once, after the last retry. A hook that raises is logged and the others
still run; a coroutine hook is awaited. ``task_run`` and ``state`` are small records with
Prefect's names (:class:`TaskRun`, :class:`State`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from notebook_flow.errors import ConfigurationError

if TYPE_CHECKING:
    from .call import _Call
    from .definition import Task

logger = logging.getLogger("notebook_flow")

__all__ = ["HOOK_KINDS", "State", "StateType", "TaskRun", "check_hooks"]

#: The hook options of a task, in Prefect's names.
HOOK_KINDS = ("on_completion", "on_failure", "on_commit", "on_rollback")

Hook = Callable[..., Any]


class StateType(str, enum.Enum):
    """The type of a :class:`State` (Prefect's ``StateType`` names)."""

    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CRASHED = "CRASHED"


@dataclasses.dataclass(frozen=True)
class State:
    """The final state of a run as a hook sees it.

    ``name`` is ``"Completed"``, ``"Cached"`` or ``"Failed"``; :meth:`result` returns the
    value, or raises the run's exception (``raise_on_failure=False`` returns it).
    """

    type: StateType
    name: str
    message: str | None = None
    data: Any = None
    exception: BaseException | None = None

    def is_completed(self) -> bool:
        return self.type is StateType.COMPLETED

    def is_failed(self) -> bool:
        return self.type is StateType.FAILED

    def is_crashed(self) -> bool:
        return self.type is StateType.CRASHED

    def is_running(self) -> bool:
        return False

    def is_cached(self) -> bool:
        return self.name == "Cached"

    def result(self, raise_on_failure: bool = True) -> Any:
        """The run's value; its exception is raised (or returned)."""
        if self.exception is not None:
            if raise_on_failure:
                raise self.exception
            return self.exception
        return self.data


@dataclasses.dataclass(frozen=True)
class TaskRun:
    """One run of a task, as a hook sees it (a subset of Prefect's ``TaskRun``)."""

    id: str
    name: str
    task_key: str
    cache_key: str | None
    run_count: int
    tags: frozenset[str]
    flow_run_id: None = None

    @property
    def task_name(self) -> str:
        return self.name


def check_hooks(kind: str, hooks: Any) -> list[Hook]:
    """The hooks of option ``kind`` as a list; an error naming the fix otherwise."""
    if hooks is None:
        return []
    example = f"@task({kind}=[hook1, hook2])\ndef my_task():\n\tpass"
    if callable(hooks) or not isinstance(hooks, Iterable) or isinstance(hooks, (str, bytes)):
        raise ConfigurationError(
            f"Expected iterable for {kind!r}; got {type(hooks).__name__} instead. Please "
            f"provide a list of hooks to {kind!r}:\n\n{example}"
        )
    out = list(hooks)
    for hook in out:
        if not callable(hook):
            raise ConfigurationError(
                f"Expected callables in {kind!r}; got {type(hook).__name__} instead. Please "
                f"provide a list of hooks to {kind!r}:\n\n{example}"
            )
    return out


def hook_name(hook: Hook) -> str:
    return str(
        getattr(hook, "__name__", None)
        or getattr(getattr(hook, "func", None), "__name__", repr(hook))
    )


def run_to_end(result: Any) -> Any:
    """Finish a coroutine a sync hook returned (on a fresh loop, in a thread when this
    thread already runs one)."""
    if not asyncio.iscoroutine(result):
        return result
    coro: Coroutine[Any, Any, Any] = result
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="notebook_flow-hook", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _task_run(call: _Call, attempt: int) -> TaskRun:
    t = call.task
    return TaskRun(
        id=call.run_id,
        name=t.name,
        task_key=t.identity,
        cache_key=call.key,
        run_count=attempt,
        tags=frozenset(t.tags),
    )


def _state_hooks(t: Task[Any, Any], state: State) -> list[Hook]:
    return list(t.on_failure_hooks if state.is_failed() else t.on_completion_hooks)


def _run_state_hooks(call: _Call, state: State, attempt: int) -> None:
    t = call.task
    task_run = _task_run(call, attempt)
    for hook in _state_hooks(t, state):
        name = hook_name(hook)
        logger.info("task `%s`: running hook %r (state %s)", t.name, name, state.name)
        try:
            run_to_end(hook(t, task_run, state))
        except Exception:
            logger.error("task `%s`: hook %r raised", t.name, name, exc_info=True)


async def _arun_state_hooks(call: _Call, state: State, attempt: int) -> None:
    t = call.task
    task_run = _task_run(call, attempt)
    for hook in _state_hooks(t, state):
        name = hook_name(hook)
        logger.info("task `%s`: running hook %r (state %s)", t.name, name, state.name)
        try:
            result = hook(t, task_run, state)
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            logger.error("task `%s`: hook %r raised", t.name, name, exc_info=True)


def _completed_state(value: Any, cached: bool) -> State:
    return State(StateType.COMPLETED, "Cached" if cached else "Completed", data=value)


def _failed_state(exc: BaseException) -> State:
    return State(StateType.FAILED, "Failed", f"{type(exc).__name__}: {exc}", exception=exc)


def completed(call: _Call, value: Any, *, cached: bool = False, attempt: int = 1) -> Any:
    """Run the task's completion hooks (if any); returns ``value``."""
    if call.task.on_completion_hooks:
        _run_state_hooks(call, _completed_state(value, cached), attempt)
    return value


def failed(call: _Call, exc: BaseException, attempt: int) -> None:
    """Run the task's failure hooks (if any) for a run that failed for good."""
    if call.task.on_failure_hooks:
        _run_state_hooks(call, _failed_state(exc), attempt)


async def acompleted(call: _Call, value: Any, *, cached: bool = False, attempt: int = 1) -> Any:
    """:func:`completed` for async tasks (coroutine hooks run on the task's loop)."""
    if call.task.on_completion_hooks:
        await _arun_state_hooks(call, _completed_state(value, cached), attempt)
    return value


async def afailed(call: _Call, exc: BaseException, attempt: int) -> None:
    """:func:`failed` for async tasks."""
    if call.task.on_failure_hooks:
        await _arun_state_hooks(call, _failed_state(exc), attempt)
