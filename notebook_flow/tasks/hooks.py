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
still run; a coroutine hook is awaited. ``task_run`` is the run's
:class:`~notebook_flow.tasks.RunContext` (``.id``, ``.name``, ``.run_count``, ``.task``) and
``state`` a :class:`~notebook_flow.states.State` (``.name``, ``.is_completed()``,
``.result()``), as ``retry_condition_fn`` receives them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from notebook_flow.errors import ConfigurationError
from notebook_flow.states import RunState, State

from .context import RunContext

if TYPE_CHECKING:
    from .call import _Call
    from .definition import Task

logger = logging.getLogger("notebook_flow")

__all__ = ["HOOK_KINDS", "check_hooks"]

#: The hook options of a task, in Prefect's names.
HOOK_KINDS = ("on_completion", "on_failure", "on_commit", "on_rollback")

Hook = Callable[..., Any]


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


def _task_run(call: _Call, attempt: int) -> RunContext:
    """The run's context (a cache hit, which runs no body, gets one made here)."""
    ctx = call.ctx
    if ctx is None:
        ctx = RunContext(call.run_id, call.task, call.key)
    ctx.attempt = attempt
    return ctx


def _state_hooks(t: Task[Any, Any], state: State[Any]) -> list[Hook]:
    return list(t.on_failure_hooks if state.is_failed() else t.on_completion_hooks)


def _run_state_hooks(call: _Call, state: State[Any], attempt: int) -> None:
    t = call.task
    task_run = _task_run(call, attempt)
    for hook in _state_hooks(t, state):
        name = hook_name(hook)
        logger.info("task `%s`: running hook %r (state %s)", t.name, name, state.name)
        try:
            run_to_end(hook(t, task_run, state))
        except Exception:
            logger.error("task `%s`: hook %r raised", t.name, name, exc_info=True)


async def _arun_state_hooks(call: _Call, state: State[Any], attempt: int) -> None:
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


def _completed_state(value: Any, cached: bool) -> State[Any]:
    return State(RunState.CACHED if cached else RunState.COMPLETED, value)


def _failed_state(exc: BaseException) -> State[Any]:
    return State(RunState.FAILED, exception=exc)


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
