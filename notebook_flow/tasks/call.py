"""One call of a task, top to bottom: key → lookup → (lock → re-check) → run with retries →
commit → record. (Retry delays: :mod:`.retries`; a lock kept past the call: :mod:`.held`.)

:class:`_Call` holds the state of one invocation and one method per step; :func:`_run_sync`
and :func:`_run_async` chain the steps (the embedded worker runs ``_run_sync`` on a
subclass that also reports to its future). A failed *read* degrades to a miss; a failed
*commit* raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import os
import random
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from notebook_flow import _identity, config, transactions
from notebook_flow._crash import crash_point as _crash_point
from notebook_flow.cache_policies import KeyContext, combine_components
from notebook_flow.errors import (
    CommitError,
    MetadataError,
    PayloadCorruptError,
    SerializationError,
    StorageError,
    TaskTimeoutError,
    reraise_interrupt,
)
from notebook_flow.figures import time_saved
from notebook_flow.hashing import lineage
from notebook_flow.lifecycle import evict, quota, usage
from notebook_flow.metadata import CacheEntry, LockEvent, RunEvent
from notebook_flow.states import RunState, State

from . import hooks
from .context import RunContext, _current_run, new_run_id
from .explain import BUSY_REASON, EXPLAIN_WAIT, _expired_reason, diff_components
from .held import _commit_in_background, _locked_past_abandoned, _release_when_done
from .hot import _hot, _immutable
from .retries import _delays

if TYPE_CHECKING:
    from notebook_flow.metadata import MetadataStore
    from notebook_flow.storage import Manifest, ResultStore
    from notebook_flow.storage.store import StageOptions

    from .definition import Task

logger = logging.getLogger("notebook_flow")

_MISS: Any = object()  # sentinel: "no usable cached result"


# --------------------------------------------------------------------------- store and metadata


def _store_for(t: Task[Any, Any]) -> ResultStore:
    """The task's store, cached on the task until the settings change."""
    cached = t._store_cache
    if cached is not None and cached[0] == config.generation:
        return cached[1]
    storage = t._policy.key_storage or t.result_storage
    if isinstance(storage, os.PathLike):  # pathlib.Path, as Prefect accepts
        storage = os.fspath(storage)
    store = config.get_store(storage)
    t._store_cache = (config.generation, store)
    return store


#: Where this context's run, cache-entry and lock events go instead of the store's DuckDB
#: recorder: set on a Dask worker (``runners/dask_worker.py``), which never opens DuckDB;
#: its events travel to the submitting process. Anything with the ``record_*`` methods.
event_sink: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "notebook_flow_event_sink", default=None
)
#: The sink for events outside any run's context on a process that must not open DuckDB
#: (a lease renewer thread on a Dask worker); None elsewhere.
process_sink: list[Any] = [None]


def _metadata_for(store: ResultStore, action: Callable[[MetadataStore], None]) -> None:
    """Hand an event to the metadata recorder; a metadata problem never fails a task."""
    try:
        sink = event_sink.get() or process_sink[0]
        action(sink if sink is not None else config.get_metadata(store))
    except Exception as exc:
        reraise_interrupt(exc)
        logger.warning("could not record metadata for %s", store.url, exc_info=True)


def _record_run(
    store: ResultStore,
    run_id: str,
    name: str,
    identity: str,
    key: str | None,
    *,
    state: RunState,
    tags: tuple[str, ...],
    **fields: Any,
) -> None:
    """Record one state of a run made in this process, in the notebook cell running now
    (task calls and ``%%task`` cells; the embedded worker builds its events itself, with the
    process fields resolved once per run)."""
    event = RunEvent(
        run_id=run_id,
        task=name,
        task_identity=identity,
        key=key,
        state=state,
        at=time.time(),
        notebook=_identity.notebook_path(),
        cell=_identity.current_cell(),
        tags=tags,
        **fields,
    )
    _metadata_for(store, lambda m: m.record_run(event))


# --------------------------------------------------------------------------- one call


class _Call:
    """The state of one invocation: arguments, key, store, run id, timings."""

    __slots__ = (
        "abandoned",
        "args",
        "arguments",
        "components",
        "ctx",
        "key",
        "kwargs",
        "run_id",
        "started",
        "store",
        "task",
    )

    def __init__(
        self,
        t: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run_id: str | None = None,
    ) -> None:
        self.task = t
        self.args = args
        self.kwargs = kwargs
        self.arguments = t._bind(args, kwargs)
        self.run_id = run_id or new_run_id()
        self.started = time.time()
        self.key: str | None = None
        self.components: dict[str, str] | None = None
        self.store = _store_for(t)
        self.ctx: RunContext | None = None
        self.abandoned: list[threading.Thread] | None = None  # bodies timeout_seconds left

    def compute_key(self) -> str | None:
        t = self.task
        if config.settings().disable_caching:  # Prefect's PREFECT_TASKS_DISABLE_CACHING
            components = None
        else:
            components = t._policy.compute_components(KeyContext(t, self.arguments, self.run_id))
        self.components = components
        if components is None:
            self.key = None
        else:
            self.key = combine_components(t.cache_namespace or t.identity, components)
        return self.key

    # -- events ------------------------------------------------------------------------------

    def record(self, state: RunState, **fields: Any) -> None:
        t = self.task
        _record_run(
            self.store,
            self.run_id,
            t.name,
            t.identity,
            self.key,
            state=state,
            tags=tuple(sorted(t.tags)),
            **fields,
        )

    def inputs_summary(self) -> str:
        if not self.arguments:
            return "{}"
        out: dict[str, str] = {}
        for name, value in self.arguments.items():
            out[name] = _short_repr(value)
        return json.dumps(out)

    # -- lookup ------------------------------------------------------------------------------

    def lookup(self) -> Any:
        """The cached value for this call's key, or _MISS (logging why on a miss)."""
        t = self.task
        key = self.key
        if key is None or t._refreshing():
            return _MISS
        t0 = time.perf_counter()
        staged = transactions.staged(self.store, key)  # this transaction's own result
        if staged is not None:
            try:
                # The caller may have changed a mutable value since: read the payload.
                value = (
                    staged.value if _immutable(staged.value) else self.store.load(staged.manifest)
                )
            except (PayloadCorruptError, SerializationError, StorageError) as exc:
                logger.warning("task `%s`: its staged result cannot be read (%s)", t.name, exc)
                return _MISS
            self.record(RunState.CACHED, duration=time.perf_counter() - t0)
            lineage.record_outputs(lineage.produced_by(staged.manifest), [("return", value)])
            return value
        hot = _hot.get(self.store, key)
        manifest = hot[0] if hot is not None else self.store.lookup(key)
        if manifest is None:
            return _MISS
        if hot is not None:
            value = hot[1]
        if manifest.expired():
            self.explain_miss([_expired_reason(manifest)])
            return _MISS
        if hot is None:
            try:
                value = self.store.load(manifest)
            except (PayloadCorruptError, SerializationError, StorageError) as exc:
                logger.warning(
                    "task `%s`: the stored result for key %s cannot be used (%s); recomputing",
                    t.name,
                    key,
                    exc,
                )
                return _MISS
            if t.cache_result_in_memory:
                _hot.put(self.store, manifest, value)
        elapsed = time.perf_counter() - t0
        usage.touch(self.store, key)  # last use, for LRU eviction: a dict write, no I/O
        t._last_components = self.components
        self.record(
            RunState.CACHED,
            duration=elapsed,
            saved=time_saved(manifest.duration, elapsed),
            size=manifest.size,
        )
        lineage.record_outputs(lineage.produced_by(manifest), [("return", value)])
        return value

    def explain_miss(self, reasons: list[str] | None = None) -> str:
        if reasons is None:
            from notebook_flow.config import settings

            if not settings().log_misses or self.components is None:
                return ""
            try:
                reference = self.task._reference_components(self.store, timeout=EXPLAIN_WAIT)
            except MetadataError:
                reasons = [BUSY_REASON]
            else:
                reasons = diff_components(reference, self.components)
        text = "; ".join(reasons)
        logger.info("task `%s`: cache miss: %s", self.task.name, text)
        return text

    # -- locking -----------------------------------------------------------------------------

    def locked(self) -> contextlib.AbstractContextManager[Any]:
        """A lock on the key for SERIALIZABLE policies, else a no-op."""
        t = self.task
        policy = t._policy
        level = policy.isolation_level or transactions.isolation_level_here()
        if self.key is None or level != "SERIALIZABLE":
            return contextlib.nullcontext()
        from notebook_flow.config import settings
        from notebook_flow.locks import as_lock_manager, default_lock_manager_for, hold

        given = policy.lock_manager or transactions.lock_manager_here()
        if given is not None:
            manager = as_lock_manager(given)
            evict.note_lock_manager(self.store, manager)  # eviction here skips its locks
        else:
            manager = default_lock_manager_for(self.store)
        s = settings()

        def on_event(event: str, info: dict[str, Any]) -> None:
            le = LockEvent(
                key=self.key or "",
                holder=str(info.get("holder", "")),
                event=event,  # type: ignore[arg-type]
                at=time.time(),
                manager=type(manager).__name__,
                lease_expires=info.get("lease_expires"),
                waited=info.get("waited"),
                task=t.name,
            )
            _metadata_for(self.store, lambda m: m.record_lock_event(le))

        return hold(
            manager,
            self.key,
            _identity.holder_id(self.run_id),
            lease=s.lock_lease,
            timeout=t.lock_timeout if t.lock_timeout is not None else s.lock_timeout,
            on_event=on_event,
        )

    # -- running -----------------------------------------------------------------------------

    def retry_delay(self, attempt: int) -> float:
        t = self.task
        delay = _delays(t.retries, t.retry_delay_seconds)[attempt - 1]
        if t.retry_jitter_factor:
            f = t.retry_jitter_factor
            delay = max(0.0, random.uniform(delay * (1 - f), delay * (1 + f)))
        return delay

    def should_retry(self, attempt: int, exc: BaseException) -> bool:
        t = self.task
        if attempt > t.retries or not isinstance(exc, Exception):
            return False
        if t.retry_condition_fn is not None and self.ctx is not None:
            # Prefect's signature: (task, task_run, state), where state.result() raises
            # the exception (and state.result(raise_on_failure=False) returns it).
            state: State[Any] = State(RunState.FAILED, exception=exc)
            try:
                return bool(t.retry_condition_fn(t, self.ctx, state))
            except Exception:
                logger.warning(
                    "retry_condition_fn of `%s` raised; not retrying", t.name, exc_info=True
                )
                return False
        return True

    def start_attempt(self, attempt: int) -> float:
        """Number the attempt in the run context; its start on the perf counter."""
        self.ctx.attempt = attempt  # type: ignore[union-attr]
        return time.perf_counter()

    def after_failure(self, attempt: int, exc: BaseException) -> float | None:
        """The delay before the next attempt (recorded RETRYING), or None when the run has
        failed for good (recorded FAILED; the caller re-raises)."""
        if not self.should_retry(attempt, exc):
            self.failed(attempt, exc)
            return None
        delay = self.retry_delay(attempt)
        self.retrying(attempt, exc, delay)
        return delay

    def call_body_sync(self) -> Any:
        t = self.task
        if t.timeout_seconds is None:
            return t.fn(*self.args, **self.kwargs)
        # A thread we can stop waiting for; the body itself cannot be killed, so it is told
        # to stop through the run context (cooperative) and abandoned as a daemon thread.
        box: dict[str, Any] = {}
        context = contextvars.copy_context()

        def target() -> None:
            try:
                box["value"] = context.run(t.fn, *self.args, **self.kwargs)
            except BaseException as exc:
                box["error"] = exc

        worker = threading.Thread(target=target, name=f"notebook_flow-{t.name}", daemon=True)
        worker.start()
        worker.join(t.timeout_seconds)
        if worker.is_alive():
            if self.ctx is not None:
                self.ctx.cancel_requested.set()
            if self.abandoned is None:
                self.abandoned = []
            self.abandoned.append(worker)  # the key's lock outlives it (_locked_past_abandoned)
            raise TaskTimeoutError(
                f"task `{t.name}` ran longer than timeout_seconds={t.timeout_seconds}; the body "
                "was told to stop (check notebook_flow.current_run().cancelled()) and abandoned"
            )
        if "error" in box:
            raise box["error"]
        return box["value"]

    async def call_body_async(self) -> Any:
        t = self.task
        coro = cast(Awaitable[Any], t.fn(*self.args, **self.kwargs))
        if t.timeout_seconds is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, t.timeout_seconds)
        except asyncio.TimeoutError:
            raise TaskTimeoutError(
                f"task `{t.name}` ran longer than timeout_seconds={t.timeout_seconds}"
            ) from None

    def begin(self, why: str) -> contextvars.Token[RunContext | None]:
        self.ctx = RunContext(self.run_id, self.task, self.key)
        self.record(RunState.RUNNING, explain=why or None, inputs=self.inputs_summary())
        return _current_run.set(self.ctx)

    def failed(self, attempt: int, exc: BaseException) -> None:
        state = RunState.FAILED if isinstance(exc, Exception) else RunState.CANCELLED
        self.record(
            state,
            attempt=attempt,
            duration=time.time() - self.started,
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        )

    def retrying(self, attempt: int, exc: BaseException, delay: float) -> None:
        logger.info(
            "task `%s` failed on attempt %d (%s: %s); retrying in %.3g s",
            self.task.name,
            attempt,
            type(exc).__name__,
            exc,
            delay,
        )
        self.record(RunState.RETRYING, attempt=attempt, error=f"{type(exc).__name__}: {exc}")

    # -- commit ------------------------------------------------------------------------------

    def commit(
        self,
        value: Any,
        duration: float,
        attempt: int,
        lease: Any,
        *,
        txn: transactions.Transaction | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        """Persist the result (payload first, manifest last), then record COMPLETED.

        In a transaction (``txn``) only the payload is written: the manifest follows at the
        transaction's commit, and ``release`` (the key's lock) runs once it is published
        or discarded. A value that cannot be serialized is not stored: a warning says so
        and the call returns it (as Prefect)."""
        t = self.task
        size: int | None = None
        staged: Manifest | None = None
        produced: str | None = None  # the stored result's key and run, for lineage
        if self.key is not None and t.persist_result:
            expires_at = (
                time.time() + t.cache_expiration.total_seconds() if t.cache_expiration else None
            )
            lease_check = getattr(lease, "check", None)

            def check() -> None:  # the fencing point: refuse to commit after a lost lease
                if lease_check is not None:
                    lease_check()
                _crash_point("after_payload")

            options: StageOptions = {
                "task": t.identity,
                "components": self.components or {},
                "run_id": self.run_id,
                "duration": duration,
                "expires_at": expires_at,
                "serializer": t.result_serializer,
                "fence": getattr(lease, "fence", None),
            }
            try:
                if txn is not None:
                    staged = self.store.stage(self.key, value, **options)
                else:
                    manifest = self.store.commit(self.key, value, before_manifest=check, **options)
            except SerializationError as exc:
                logger.warning(
                    "task `%s`: its result cannot be stored (%s); returning it without "
                    "caching, so the next call runs again",
                    t.name,
                    exc,
                )
            except Exception as exc:
                self.failed(attempt, exc)
                if isinstance(exc, CommitError):
                    exc.result = value  # type: ignore[attr-defined]
                raise
            else:
                if txn is None:
                    _crash_point("after_manifest")
                    size = manifest.size
                    produced = lineage.produced_by(manifest)
                    self.published(manifest, value)
        if txn is not None:
            transactions.stage_call(txn, self, staged, value, lease=lease, release=release)
        t._last_components = self.components
        if produced is not None:  # results with no content fingerprint: known by their run
            lineage.record_outputs(produced, [("return", value)])
        self.record(RunState.COMPLETED, attempt=attempt, duration=duration, size=size)

    def published(self, manifest: Manifest, value: Any, *, remember: bool = True) -> None:
        """After the manifest is written: the hot cache (unless ``remember`` is False: a
        mutable value the caller has had since) and the index learn the entry."""
        if remember and self.task.cache_result_in_memory:
            _hot.put(self.store, manifest, value)  # the next hit in this process is in memory
        entry = CacheEntry.from_manifest(manifest, task=self.task.name)
        _metadata_for(self.store, lambda m: m.record_cache_entry(entry))
        # Pin it (@task(pin=True)); past a quota, eviction runs in the background.
        quota.committed(self.store, manifest, max_size=self.task.max_size, pinned=self.task.pin)


def _short_repr(value: Any, limit: int = 80) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (str, bytes)):
        return f"{type(value).__name__}{tuple(shape)!r}"
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- the call path


def _run_sync(call: _Call) -> Any:
    """Key → lookup → (lock → re-check) → run with retries → commit → record.

    Hooks (``hooks.py``) run after the final state; inside a transaction (or with
    commit/rollback hooks) the result is staged in the call's transaction instead of
    committed (``transactions.for_call``)."""
    if call.compute_key() is not None:
        value = call.lookup()
        if value is not _MISS:
            return hooks.completed(call, value, cached=True)
    why = call.explain_miss() if call.key is not None and not call.task._refreshing() else ""
    with _locked_past_abandoned(call) as held:
        lease = held.lease
        if lease is not None:
            _crash_point("after_lock")
            value = call.lookup()  # the holder before us may have committed it
            if value is not _MISS:
                return hooks.completed(call, value, cached=True)
        token = call.begin(why)
        try:
            with transactions.for_call(call) as txn:
                attempt = 1
                while True:
                    t0 = call.start_attempt(attempt)
                    try:
                        value = call.call_body_sync()
                        break
                    except BaseException as exc:
                        if (delay := call.after_failure(attempt, exc)) is None:
                            hooks.failed(call, exc, attempt)
                            raise
                    time.sleep(delay)
                    attempt += 1
                duration = time.perf_counter() - t0
                if txn is not None:
                    release = None
                    if lease is not None:
                        stack = held.hand_off()
                        release = functools.partial(_release_when_done, call, lease, stack)
                    call.commit(value, duration, attempt, lease, txn=txn, release=release)
                elif not _commit_in_background(call, value, duration, attempt, held):
                    call.commit(value, duration, attempt, lease)
                    _crash_point("before_release")
        finally:
            _current_run.reset(token)
    return hooks.completed(call, value, attempt=attempt)


async def _run_async(call: _Call) -> Any:
    """The same path for ``async def`` tasks; blocking steps run in a thread (the key's
    lock in a thread of its own, kept past the call when a transaction stages the
    result)."""
    if call.compute_key() is not None:
        value = await asyncio.to_thread(call.lookup)
        if value is not _MISS:
            return await hooks.acompleted(call, value, cached=True)
    why = call.explain_miss() if call.key is not None and not call.task._refreshing() else ""
    from notebook_flow.locks.threaded import HandOff, held_in_thread

    hand_off = HandOff()
    # Not on the loop's executor: waiters filled it while the holder needed it to commit.
    async with held_in_thread(call.locked(), hand_off) as lease:
        if lease is not None:
            value = await asyncio.to_thread(call.lookup)
            if value is not _MISS:
                return await hooks.acompleted(call, value, cached=True)
        token = call.begin(why)
        try:
            with transactions.for_call(call) as txn:
                attempt = 1
                while True:
                    t0 = call.start_attempt(attempt)
                    try:
                        value = await call.call_body_async()
                        break
                    except BaseException as exc:
                        if (delay := call.after_failure(attempt, exc)) is None:
                            await hooks.afailed(call, exc, attempt)
                            raise
                    await asyncio.sleep(delay)
                    attempt += 1
                duration = time.perf_counter() - t0
                if txn is not None:  # staged; the lock is kept until it is published
                    release = hand_off.keep() if lease is not None else None
                    call.commit(value, duration, attempt, lease, txn=txn, release=release)
                else:
                    await asyncio.to_thread(call.commit, value, duration, attempt, lease)
        finally:
            _current_run.reset(token)
    return await hooks.acompleted(call, value, attempt=attempt)
