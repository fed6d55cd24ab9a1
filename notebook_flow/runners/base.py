"""What every runner shares: the submit path, dependencies, concurrency limits, and the
registry of in-flight runs.

``submit`` does only in-memory work, so it stays in the tens of microseconds:

1. bind the arguments (a bad call raises ``TypeError`` here, in the caller);
2. find futures among the arguments and ``wait_for`` (dependencies);
3. record the run PENDING through the metadata recorder's queue (never DuckDB itself);
4. hand the submission to the journal writer thread (see ``journal.py``);
5. dispatch it once its upstream runs are done and a concurrency slot is free.

The run itself goes through the same call path as a direct call (``tasks._run_sync``):
key → lookup → (lock) → run with retries and timeout → commit → record.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from notebook_flow import _identity
from notebook_flow.errors import TaskCancelledError, reraise_interrupt
from notebook_flow.futures import (
    FutureList,
    TaskFuture,
    allow_failure,
    collect_futures,
    resolve_futures,
    unmapped,
)
from notebook_flow.futures.arguments import _SCALARS
from notebook_flow.metadata import RunEvent as _RunEvent
from notebook_flow.states import RunState
from notebook_flow.storage import behind
from notebook_flow.tasks import _Call, _run_async, _run_sync

from .journal import journal_for
from .limits import admit, limits_for, release
from .output import task_output

if TYPE_CHECKING:
    from notebook_flow.metadata import MetadataStore
    from notebook_flow.storage import ResultStore
    from notebook_flow.tasks import Task

__all__ = [
    "BaseRunner",
    "RemoteConfig",
    "Runner",
    "WorkerCall",
    "current_runner",
    "execute",
    "in_flight",
    "remote_run",
]

logger = logging.getLogger("notebook_flow")

_current_cell = _identity.current_cell
_process = _identity.process
_JPY_SESSION = os.environ.get("JPY_SESSION_NAME") or None


def _notebook_path() -> str | None:
    # The lookups of _identity.notebook_path(), through the namespace dict: a missing
    # module attribute costs an AttributeError (~3 µs), and this runs on every submit.
    namespace = getattr(sys.modules.get("__main__"), "__dict__", None) or {}
    for name in ("__session__", "__vsc_ipynb_file__"):
        value = namespace.get(name)
        if isinstance(value, str) and value:
            return value
    return _JPY_SESSION


_PENDING = RunState.PENDING
_RUNNING = RunState.RUNNING
_RETRYING = RunState.RETRYING
_CACHED = RunState.CACHED
_COMPLETED = RunState.COMPLETED
_FAILED = RunState.FAILED
_CANCELLED = RunState.CANCELLED


# --------------------------------------------------------------------------- the call


class WorkerCall(_Call):
    """A ``_Call`` that reports its progress to its future (live state, time saved) and
    honours cooperative cancellation. The call path itself is unchanged."""

    __slots__ = ("_cell", "_future", "_notebook", "_saved")

    def __init__(
        self,
        t: Task[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run_id: str | None = None,
        future: TaskFuture[Any] | None = None,
    ) -> None:
        super().__init__(t, args, kwargs, run_id=run_id)
        self._future = future
        self._saved: float | None = None
        # Constant for a run, so read once at submit rather than for each of its events.
        self._notebook = _notebook_path()
        self._cell = _current_cell()

    def record(self, state: RunState, **fields: Any) -> None:
        """The same event as ``_Call.record``; the metadata store is resolved once per
        store (``config.get_metadata`` checks the store's folder on every call), since
        this runs three times per submitted run."""
        if state is _CACHED:
            self._saved = fields.get("saved")
        fut = self._future
        if fut is not None:
            if state is _RUNNING or state is _RETRYING:
                fut._phase = state
            elif state is _CACHED:
                fut.saved = self._saved
        t = self.task
        p = _process()
        try:
            event = _RunEvent(
                run_id=self.run_id,
                task=t.name,
                task_identity=t.identity,
                key=self.key,
                state=state,
                at=time.time(),
                notebook=self._notebook,
                cell=self._cell,
                tags=tuple(sorted(t.tags)),
                host=p.host,
                pid=p.pid,
                pid_start=p.start_time,
                kernel=p.kernel,
                **fields,
            )
            _metadata(self.store).record_run(event)
        except Exception as exc:  # a metadata problem never fails a task (as in tasks/call.py)
            reraise_interrupt(exc)  # but Ctrl-C during the first event's imports is Ctrl-C
            logger.warning("could not record metadata for %s", self.store.url, exc_info=True)

    def begin(self, why: str) -> contextvars.Token[Any]:
        token = super().begin(why)
        fut = self._future
        if fut is not None and fut._cancel_requested and self.ctx is not None:
            self.ctx.cancel_requested.set()  # cancel() arrived before the body started
        return token

    def should_retry(self, attempt: int, exc: BaseException) -> bool:
        if isinstance(exc, TaskCancelledError):
            return False
        if self.ctx is not None and self.ctx.cancel_requested.is_set():
            return False
        return super().should_retry(attempt, exc)

    def failed(self, attempt: int, exc: BaseException) -> None:
        if isinstance(exc, TaskCancelledError):
            self.record(_CANCELLED, attempt=attempt, error=f"{type(exc).__name__}: {exc}")
        else:
            super().failed(attempt, exc)

    def rebind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Replace the arguments (futures resolved to their values)."""
        bound = self.task._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        self.args = args
        self.kwargs = kwargs
        self.arguments = bound.arguments


_metadata_cache: dict[int, tuple[ResultStore, MetadataStore]] = {}


def _metadata(store: ResultStore) -> MetadataStore:
    # Keyed by the store object (held, so its id cannot be reused); a reset of the
    # settings creates new store objects, hence new entries.
    entry = _metadata_cache.get(id(store))
    if entry is None or entry[0] is not store:
        from notebook_flow.config import get_metadata

        if len(_metadata_cache) > 64:
            _metadata_cache.clear()
        entry = _metadata_cache[id(store)] = (store, get_metadata(store))
    return entry[1]


def _run_in_thread(call: _Call) -> Any:
    with task_output():  # in a kernel, the run's printed lines reach its cell whole
        if call.task.is_async:
            return asyncio.run(_run_async(call))
        return _run_sync(call)


def resolve_arguments(fut: TaskFuture[Any]) -> None:
    """Replace the futures among a run's arguments by their results.

    Raises ``UpstreamFailedError`` naming a failed upstream (unless ``allow_failure``).
    """
    call = fut._call
    assert isinstance(call, WorkerCall)
    if fut._wait_for is not None:
        resolve_futures(fut._wait_for)  # raises for a failed upstream; values unused
    args = tuple(resolve_futures(a) for a in call.args)
    kwargs = {k: resolve_futures(v) for k, v in call.kwargs.items()}
    call.rebind(args, kwargs)


def execute(fut: TaskFuture[Any]) -> None:
    """Run a claimed future through the task's call path in this thread and complete it.

    Never raises: whatever the run raises becomes the future's exception.
    """
    call = fut._call
    assert isinstance(call, WorkerCall)
    try:
        if fut._upstream:
            try:
                resolve_arguments(fut)
            except Exception as exc:
                call.failed(1, exc)
                raise
        value = fut._context.run(_run_in_thread, call)
    # A worker thread must survive anything a task body raises (even SystemExit): it
    # all becomes the future's exception. KeyboardInterrupt only reaches the main thread.
    except BaseException as exc:
        state = _CANCELLED if isinstance(exc, TaskCancelledError) else _FAILED
        fut._finish(state, None, exc)
    else:
        cached = call.ctx is None and call.key is not None
        fut._finish(_CACHED if cached else _COMPLETED, value, None)


# --------------------------------------------------------------------------- remote runs


@dataclasses.dataclass(frozen=True)
class RemoteConfig:
    """The settings a worker process needs to reach the same store (travels with a run).

    The signing key travels too, inside the cluster's own channel: a worker without it
    could not sign or verify pickled results.
    """

    store: str
    storage_options: dict[str, Any]
    signing_key: bytes | None

    @classmethod
    def current(cls) -> RemoteConfig:
        from notebook_flow.config import get_store, settings

        s = settings()
        store = get_store()  # the key in use (also a default one: the worker's may differ)
        return cls(store.url, dict(s.storage_options), s.signing_key or store._signing_key())

    def apply(self) -> None:
        from notebook_flow.config import use_store

        use_store(self.store, self.storage_options, self.signing_key)


def remote_run(
    task: Task[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    run_id: str,
    config: RemoteConfig,
) -> tuple[Any, str, float | None]:
    """Run one call in a worker process (loky, Dask): returns ``(value, state, saved)``.

    Events are flushed before returning, because pool processes may be stopped at any time.
    """
    from notebook_flow.config import get_metadata

    config.apply()
    call = WorkerCall(task, args, kwargs, run_id=run_id)
    # Durable before returning: the pool may stop this process as soon as it has returned.
    token = behind.foreground.set(True)
    try:
        value = _run_in_thread(call)
    finally:
        behind.foreground.reset(token)
        try:
            get_metadata(call.store).flush(timeout=30)
        except Exception:
            logger.warning("could not flush run events in the worker process", exc_info=True)
    state = _CACHED if call.ctx is None and call.key is not None else _COMPLETED
    return value, state.value, call._saved


def complete_remote(
    fut: TaskFuture[Any], outcome: Any = None, error: BaseException | None = None
) -> None:
    """Finish ``fut`` with what a worker process returned (or raised)."""
    if error is not None:
        state = _CANCELLED if isinstance(error, TaskCancelledError) else _FAILED
        fut._finish(state, None, error)
        return
    value, state_name, saved = outcome
    fut.saved = saved
    fut._finish(RunState(state_name), value, None)


def send_remote(fut: TaskFuture[Any], submit: Callable[..., Any]) -> None:
    """Run a claimable ``fut`` in a worker process: ``submit(remote_run, *args)`` hands it
    to a pool or cluster and returns its concurrent.futures / Dask future, whose result
    completes ``fut`` (Dask runs done-callbacks in a thread of its own, not its loop)."""
    if not fut._claim():
        return
    call = fut._call
    assert isinstance(call, WorkerCall)
    try:
        if fut._upstream:
            resolve_arguments(fut)
        pending = submit(
            remote_run, fut.task, call.args, call.kwargs, fut.run_id, RemoteConfig.current()
        )
    except Exception as exc:
        call.failed(1, exc)
        complete_remote(fut, error=exc)
        return

    def done(pending: Any) -> None:
        try:
            outcome = pending.result()
        except BaseException as exc:  # the worker's exception, or the pool/cluster broke
            complete_remote(fut, error=exc)
        else:
            complete_remote(fut, outcome)

    pending.add_done_callback(done)


# --------------------------------------------------------------------------- runners


class Runner(Protocol):
    """Where submitted runs execute: the embedded thread worker (default), a process
    pool or a Dask cluster. Use one explicitly, or as a context manager::

        with ProcessRunner(max_workers=2):
            futs = crunch.map(chunks)
    """

    def submit(
        self,
        task: Task[..., Any],
        /,
        *args: Any,
        wait_for: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> TaskFuture[Any]: ...
    def map(
        self,
        task: Task[..., Any],
        /,
        *args: Any,
        wait_for: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> FutureList: ...
    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False) -> None: ...
    def _dispatch(self, fut: TaskFuture[Any]) -> None: ...
    def _try_inline(self, fut: TaskFuture[Any]) -> bool: ...


_current: contextvars.ContextVar[BaseRunner | None] = contextvars.ContextVar(
    "notebook_flow_runner", default=None
)


class BaseRunner:
    """Submit, map, limits and the context-manager protocol over one method, ``_send``."""

    _closed = False

    def submit(
        self,
        task: Task[..., Any],
        /,
        *args: Any,
        wait_for: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> TaskFuture[Any]:
        """Submit one run of ``task``; returns its future at once."""
        return submit_with(self, task, args, kwargs, wait_for)

    def map(
        self,
        task: Task[..., Any],
        /,
        *args: Any,
        wait_for: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> FutureList:
        """Submit one run per element of the zipped iterables (``unmapped(x)``: constant)."""
        return map_with(self, task, args, kwargs, wait_for)

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        """Stop accepting runs; cancel pending ones if asked; wait for the rest if asked."""
        self._closed = True
        mine = [f for f in in_flight() if f._runner is self]
        if cancel_pending:
            for fut in mine:
                if fut._state is _PENDING:
                    fut.cancel()
        if wait:
            for fut in mine:
                fut.wait()

    def _dispatch(self, fut: TaskFuture[Any]) -> None:
        limits = limits_for(fut.task)
        if limits and not admit(fut, limits):
            return
        self._send(fut)

    def _send(self, fut: TaskFuture[Any]) -> None:
        raise NotImplementedError

    def _try_inline(self, fut: TaskFuture[Any]) -> bool:
        return False

    def _accept(self, task: Task[..., Any]) -> None:
        """Raise ``ConfigurationError`` for a task this runner cannot run (see dask.py)."""

    def _burst(self) -> contextlib.AbstractContextManager[Any]:
        """Around the submissions of one map: a runner may send them together (dask.py)."""
        return contextlib.nullcontext()

    def __enter__(self) -> BaseRunner:
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)


def current_runner() -> BaseRunner:
    """The runner ``task.submit`` uses here: the innermost ``with runner:``, else the
    embedded thread worker (started on first use)."""
    runner = _current.get()
    if runner is not None:
        return runner
    from .thread import default_runner

    return default_runner()


# --------------------------------------------------------------------------- submit


_inflight: dict[str, TaskFuture[Any]] = {}
_copy_context = contextvars.copy_context


def in_flight() -> list[TaskFuture[Any]]:
    return list(_inflight.values())


def submit_with(
    runner: BaseRunner,
    task: Task[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    wait_for: Sequence[Any] | None,
) -> TaskFuture[Any]:
    """The submit path shared by all runners (in-memory work only)."""
    if runner._closed:
        raise RuntimeError("this runner was shut down; create a new one (or use the default)")
    runner._accept(task)  # a setup this runner cannot run raises here, in the caller
    call = WorkerCall(task, args, kwargs)
    run_id = call.run_id
    fut: TaskFuture[Any] = TaskFuture(task, run_id, runner)
    call._future = fut
    fut._call = call
    # The submitter's context travels with the run: its cell id, and in a kernel the
    # parent header, so the task's prints land in the cell that submitted it.
    fut._context = _copy_context()
    found: dict[int, TaskFuture[Any]] | None = None
    for value in args:
        if type(value) not in _SCALARS:
            found = {} if found is None else found
            collect_futures(value, found)
    if kwargs:
        for value in kwargs.values():
            if type(value) not in _SCALARS:
                found = {} if found is None else found
                collect_futures(value, found)
    waits: list[Any] | None = None
    if wait_for:
        found = {} if found is None else found
        waits = list(wait_for)
        collect_futures(waits, found)
        fut._wait_for = waits
    call.record(_PENDING)  # queued for the recorder thread; never waits for DuckDB
    _inflight[run_id] = fut
    journal_for(call.store).add(run_id, task, args, kwargs, waits, cell=call._cell)
    if not found or fut._wire(tuple(found.values())):
        runner._dispatch(fut)
    return fut


def map_with(
    runner: BaseRunner,
    task: Task[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    wait_for: Sequence[Any] | None,
) -> FutureList:
    """Zip the iterable arguments and submit one run per element.

    Iterables (lists, tuples, ranges, arrays, futures lists …) are mapped; strings, bytes,
    dicts and non-iterables are passed unchanged to every run, as is ``unmapped(x)``.
    """
    columns: list[tuple[str | int, list[Any]]] = []
    constants_args: list[Any] = list(args)
    constants_kwargs = dict(kwargs)
    for i, value in enumerate(args):
        items, constants_args[i] = _mapping_of(value)
        if items is not None:
            columns.append((i, items))
    for name, value in kwargs.items():
        items, constants_kwargs[name] = _mapping_of(value)
        if items is not None:
            columns.append((name, items))
    if not columns:
        raise TypeError(
            f"task `{task.name}`.map needs at least one iterable argument; "
            "use .submit for a single run"
        )
    lengths = {len(items) for _, items in columns}
    if len(lengths) > 1:
        detail = ", ".join(f"{'argument ' + repr(k)}: {len(v)}" for k, v in columns)
        raise ValueError(f"task `{task.name}`.map: iterables differ in length ({detail})")
    out = FutureList()
    append = out.append
    positions = [(k, items) for k, items in columns]
    with runner._burst():
        for row in range(lengths.pop()):
            a = list(constants_args)
            kw = dict(constants_kwargs)
            for k, items in positions:
                if isinstance(k, int):
                    a[k] = items[row]
                else:
                    kw[k] = items[row]
            append(submit_with(runner, task, tuple(a), kw, wait_for))
    return out


def _mapping_of(value: Any) -> tuple[list[Any] | None, Any]:
    """``(items, None)`` for an argument mapped over, ``(None, constant)`` otherwise.

    As Prefect's ``map``: a future at the top is waited for and its result mapped over
    (a failed one raises ``UpstreamFailedError``); ``allow_failure(x)`` is looked through
    and each element re-wrapped, so ``allow_failure(list_of_futures)`` gives every run
    one future with failures allowed.
    """
    wrap = type(value) is allow_failure
    inner = value.value if wrap else value
    if type(inner) is TaskFuture:
        inner.wait()  # in a worker thread, a run nobody started yet runs inline
        inner = resolve_futures(inner, wrap)
    if isinstance(inner, unmapped):
        return None, allow_failure(inner.value) if wrap else inner.value
    items = _as_mapped(inner)
    if items is None:
        return None, value if type(value) is not TaskFuture else inner
    if wrap:
        items = [allow_failure(item) for item in items]
    return items, None


def _as_mapped(value: Any) -> list[Any] | None:
    if isinstance(value, (str, bytes, bytearray, dict, unmapped)) or type(value) is TaskFuture:
        return None
    if isinstance(value, Iterable):
        return list(value)
    return None


# --------------------------------------------------------------------------- completion


def _on_final(fut: TaskFuture[Any]) -> None:
    _inflight.pop(fut.run_id, None)
    limits = fut._limits
    if limits:
        fut._limits = ()
        release(limits)
    call = fut._call
    if call is not None:
        journal_for(call.store).done(fut.run_id)


TaskFuture._on_final = _on_final


def _after_fork_in_child() -> None:
    # Runs of the parent are not ours: their threads do not exist in the child.
    _inflight.clear()
    from notebook_flow.futures import future

    future._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
