"""TaskFuture: the handle of one submitted run (state, result, callbacks, awaitable).

Completion is lean on purpose (the worker completes tens of thousands of futures a
second): one process-wide lock guards every state change for a few instructions, and a
waiter allocates a gate lock only when it actually has to block.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from notebook_flow import _hooks
from notebook_flow.errors import TaskCancelledError
from notebook_flow.states import FINAL_STATES, Deferred, RunState, State
from notebook_flow.states import format_seconds as _seconds

if TYPE_CHECKING:
    from notebook_flow.tasks import Task, _Call

logger = logging.getLogger("notebook_flow")

R = TypeVar("R")

_lock = threading.Lock()  # guards the state of every future (held for a few instructions)
_allocate_gate = threading.Lock

_PENDING = RunState.PENDING
_RUNNING = RunState.RUNNING
_CANCELLED = RunState.CANCELLED
_FINAL = FINAL_STATES
_FAILED_STATES = frozenset({RunState.FAILED, RunState.CRASHED, RunState.CANCELLED})


class _Dispatcher(Protocol):
    """What a runner offers its futures (see ``runners/base.py``)."""

    def _dispatch(self, fut: TaskFuture[Any]) -> None: ...
    def _try_inline(self, fut: TaskFuture[Any]) -> bool: ...


class TaskFuture(Generic[R]):
    """The handle of one submitted run: ``task.submit(...)`` returns it at once.

    >>> fut = add.submit(1, 2)              # doctest: +SKIP
    >>> fut.result()                        # doctest: +SKIP
    3
    >>> fut.state, fut.run_id               # doctest: +SKIP
    (<RunState.COMPLETED: 'COMPLETED'>, '5f0c…')

    ``state`` moves PENDING → RUNNING → COMPLETED / CACHED / FAILED / CANCELLED.
    ``cancel()`` cancels a pending run; for a running one it sets the cooperative flag
    the body sees as ``notebook_flow.current_run().cancelled()``.
    """

    __slots__ = (
        "__weakref__",
        "_call",
        "_callbacks",
        "_cancel_requested",
        "_context",
        "_dependents",
        "_ended",
        "_exc",
        "_limits",
        "_phase",
        "_remaining",
        "_runner",
        "_started",
        "_state",
        "_upstream",
        "_value",
        "_wait_for",
        "_waiters",
        "run_id",
        "saved",
        "submitted_at",
        "task",
    )

    #: Set by ``runners.base``: called once when any future reaches a final state
    #: (in-flight registry, journal, concurrency limits). Kept as a hook so this module
    #: does not import the runners.
    _on_final: ClassVar[Callable[[TaskFuture[Any]], None] | None] = None

    def __init__(
        self, task: Task[..., Any], run_id: str, runner: _Dispatcher | None = None
    ) -> None:
        self.task = task
        self.run_id = run_id
        self.submitted_at = time.time()
        self.saved: float | None = None  # seconds saved by a cache hit
        self._runner = runner
        self._state: RunState = _PENDING
        self._phase: RunState = _PENDING  # live phase (RUNNING / RETRYING) for displays
        self._value: Any = None
        self._exc: BaseException | None = None
        self._waiters: list[Any] | None = None
        self._callbacks: list[Callable[[TaskFuture[Any]], object]] | None = None
        self._dependents: list[TaskFuture[Any]] | None = None
        self._upstream: tuple[TaskFuture[Any], ...] = ()
        self._wait_for: Any = None
        self._remaining = 0
        self._call: _Call | None = None
        self._context: Any = None
        self._limits: tuple[Any, ...] = ()
        self._started: float | None = None
        self._ended: float | None = None
        self._cancel_requested = False

    # -- state ---------------------------------------------------------------------------

    @property
    def run_state(self) -> RunState:
        """PENDING, RUNNING, RETRYING, or the final state of the run."""
        state = self._state
        if state is _RUNNING:
            return self._phase if self._phase is not _PENDING else state
        return state

    @property
    def state(self) -> State[R]:
        """The run's state as Prefect's futures have it: ``fut.state.is_completed()``,
        ``.is_failed()``, ``.name``, ``.result(raise_on_failure=False)``; ``.type`` is the
        :class:`RunState` (also ``fut.run_state``)."""
        with _lock:  # state, value and exception of one moment
            return State(self.run_state, self._value, self._exc)

    @property
    def key(self) -> str | None:
        """The cache key of the run, once the worker computed it (None: uncached)."""
        call = self._call
        return call.key if call is not None else None

    @property
    def elapsed(self) -> float | None:
        """Seconds the run has been (or was) running; None while pending."""
        if self._started is None:
            return None
        end = self._ended if self._ended is not None else time.perf_counter()
        return end - self._started

    def done(self) -> bool:
        """True once the run finished (any final state)."""
        return self._state in _FINAL

    def running(self) -> bool:
        return self._state is _RUNNING

    def cancelled(self) -> bool:
        return self._state is _CANCELLED

    # -- results -------------------------------------------------------------------------

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> R:
        """The task's return value; waits up to ``timeout`` seconds (None: forever).

        Raises the task's own exception if it failed (``raise_on_failure=False``: returns
        it, as Prefect does), :class:`TaskCancelledError` if it was cancelled and
        :class:`TimeoutError` if it is not done in time (the run keeps going). A worker
        thread that waits on a run nobody started yet runs it inline, so tasks that
        submit and wait on other tasks cannot starve the pool.
        """
        if self._state not in _FINAL and not self._wait(timeout):
            raise TimeoutError(
                f"run {self.run_id[:8]} of task `{self.task.name}` did not finish within "
                f"{timeout} s; it keeps running (fut.cancel() asks it to stop)"
            )
        if self._exc is not None:
            if not raise_on_failure:
                return self._exc  # type: ignore[return-value]
            raise self._exc
        value = self._value
        if type(value) is Deferred:
            value = self._value = value.get()
        return value  # type: ignore[no-any-return]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception the run failed with (None if it succeeded); waits like ``result``."""
        if self._state not in _FINAL and not self._wait(timeout):
            raise TimeoutError(
                f"run {self.run_id[:8]} of task `{self.task.name}` did not finish within "
                f"{timeout} s"
            )
        return self._exc

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the run is done; False if ``timeout`` passed first."""
        return self._state in _FINAL or self._wait(timeout)

    def _wait(self, timeout: float | None) -> bool:
        runner = self._runner
        if self._state is _PENDING and runner is not None and runner._try_inline(self):
            return True
        with _lock:
            if self._state in _FINAL:
                return True
            gate = _allocate_gate()
            gate.acquire()
            if self._waiters is None:
                self._waiters = [gate]
            else:
                self._waiters.append(gate)
        # Lock acquisition is interruptible on POSIX: Ctrl-C / a kernel interrupt lands
        # here as KeyboardInterrupt in the main thread, and the run keeps going.
        if gate.acquire(True, -1 if timeout is None else max(timeout, 0.0)):
            return True
        with _lock:
            if self._waiters is not None and gate in self._waiters:
                self._waiters.remove(gate)
        return self._state in _FINAL

    def add_done_callback(self, fn: Callable[[TaskFuture[R]], object]) -> None:
        """Call ``fn(future)`` when the run finishes (at once if it already has).

        Callbacks run in the thread that finishes the run; an exception in one is logged
        and does not affect the run, the other callbacks or the worker.
        """
        with _lock:
            if self._state not in _FINAL:
                if self._callbacks is None:
                    self._callbacks = [fn]  # type: ignore[list-item]
                else:
                    self._callbacks.append(fn)  # type: ignore[arg-type]
                return
        _call_callback(fn, self)

    def cancel(self) -> bool:
        """Cancel the run: a pending run is cancelled at once (its dependents fail);
        a running run gets the cooperative cancel flag. False if it already finished.
        """
        exc = TaskCancelledError(f"run {self.run_id[:8]} of task `{self.task.name}` was cancelled")
        if self._finish(_CANCELLED, None, exc, only_pending=True):
            call = self._call
            if call is not None:
                call.record(_CANCELLED, error="cancelled before it started")
            return True
        with _lock:
            if self._state in _FINAL:
                return False
            self._cancel_requested = True
            call = self._call
        ctx = call.ctx if call is not None else None
        if ctx is not None:
            ctx.cancel_requested.set()
        return True

    def __await__(self) -> Generator[Any, None, R]:
        if self._state not in _FINAL:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()

            def wake(_: TaskFuture[Any]) -> None:
                try:
                    loop.call_soon_threadsafe(_resolve_waiter, waiter)
                except RuntimeError:  # the loop was closed meanwhile: nobody is waiting
                    pass

            self.add_done_callback(wake)
            yield from waiter.__await__()
        return self.result()

    # -- display -------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<TaskFuture {describe(self)}>"

    def _ipython_display_(self) -> None:
        show = _hooks.show  # the notebook layer (set by the package root; see _hooks.py)
        if show is None:
            raise NotImplementedError  # IPython then shows the repr
        show(self)

    # -- internal: used by the runners ---------------------------------------------------

    def _claim(self) -> bool:
        """PENDING → RUNNING; False if the run was cancelled or claimed by another thread."""
        with _lock:
            if self._state is not _PENDING:
                return False
            self._state = _RUNNING
        self._started = time.perf_counter()
        return True

    def _finish(
        self,
        state: RunState,
        value: Any,
        exc: BaseException | None,
        *,
        only_pending: bool = False,
    ) -> bool:
        """Move to a final state and wake everyone; False if already final."""
        with _lock:
            current = self._state
            if current in _FINAL or (only_pending and current is not _PENDING):
                return False
            self._state = state
            self._value = value
            self._exc = exc
            waiters, self._waiters = self._waiters, None
            callbacks, self._callbacks = self._callbacks, None
            dependents, self._dependents = self._dependents, None
        self._ended = time.perf_counter()
        self._context = None
        call = self._call
        if call is not None:
            call._future = None  # type: ignore[attr-defined]  # break the cycle early
        if waiters:
            for gate in waiters:
                gate.release()
        hook = TaskFuture._on_final
        if hook is not None:
            hook(self)
        if dependents:
            for down in dependents:
                down._upstream_done()
        if callbacks:
            for fn in callbacks:
                _call_callback(fn, self)
        return True

    def _wire(self, upstream: tuple[TaskFuture[Any], ...]) -> bool:
        """Wait for ``upstream`` before dispatch; True if all are already done."""
        self._upstream = upstream
        with _lock:
            remaining = 1  # a guard, so an upstream finishing meanwhile cannot dispatch us
            for up in upstream:
                if up._state not in _FINAL:
                    remaining += 1
                    if up._dependents is None:
                        up._dependents = [self]
                    else:
                        up._dependents.append(self)
            self._remaining = remaining - 1
            return self._remaining == 0

    def _upstream_done(self) -> None:
        with _lock:
            self._remaining -= 1
            ready = self._remaining == 0
        if ready and self._runner is not None:
            self._runner._dispatch(self)


def _resolve_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _call_callback(fn: Callable[[TaskFuture[Any]], object], fut: TaskFuture[Any]) -> None:
    try:
        fn(fut)
    except Exception:
        logger.exception("a done-callback of %r raised; ignored", fut)


def describe(fut: TaskFuture[Any]) -> str:
    """One plain line: task, short run id, state and timing (also used by displays)."""
    state = fut.run_state
    text = f"`{fut.task.name}` {fut.run_id[:8]} {state.value.lower()}"
    elapsed = fut.elapsed
    if state is RunState.CACHED:
        if fut.saved:
            text += f" (saved {_seconds(fut.saved)})"
    elif elapsed is not None:
        text += f" {_seconds(elapsed)}"
    exc = fut._exc
    if exc is not None and state is not RunState.CACHED:
        text += f": {type(exc).__name__}: {exc}"
    return text


# Pickles and fingerprints name the class where it was first defined: notebook_flow.futures.
TaskFuture.__module__ = "notebook_flow.futures"
