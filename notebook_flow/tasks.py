"""``@task``: a function whose results are cached durably, and the call path that runs it.

>>> from notebook_flow import task
>>> @task
... def add(x, y):
...     return x + y
>>> add(1, 2)            # computed, committed to the store      # doctest: +SKIP
3
>>> add(1, 2)            # loaded from the store, also after a kernel restart  # doctest: +SKIP
3

The call path, top to bottom (:func:`_run_sync`):

1. bind the arguments (defaults applied);
2. ``key = policy.compute_key(...)`` — None means "run uncached";
3. look the key up in the store; a valid, unexpired manifest is a hit: load, record CACHED;
4. on a miss (SERIALIZABLE: under a lock with a lease, then look again) run the body with
   retries and timeout, commit payload then manifest, record COMPLETED, release.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import itertools
import json
import logging
import os
import random
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast, overload

from . import _identity, config
from .cache_policies import DEFAULT, CachePolicy, KeyContext, combine_components
from .errors import (
    CommitError,
    ConfigurationError,
    PayloadCorruptError,
    SerializationError,
    StorageError,
    TaskTimeoutError,
)
from .metadata import CacheEntry, LockEvent, RunEvent
from .states import RunState

if TYPE_CHECKING:
    from .locks.base import LockManager
    from .metadata import MetadataStore
    from .serializers import Serializer
    from .storage import Manifest, ResultStore

__all__ = [
    "Explanation",
    "RunContext",
    "Task",
    "current_run",
    "exponential_backoff",
    "task",
]

logger = logging.getLogger("notebook_flow")

P = ParamSpec("P")
R = TypeVar("R")

_MISS: Any = object()  # sentinel: "no usable cached result"

# Run ids: a random per-process prefix plus a counter. os.urandom per call cost ~10-50 µs
# on our VMs (getrandom syscall), a quarter of the whole cache-hit budget.
_run_prefix: tuple[int, str] = (0, "")
_run_counter = itertools.count()


def new_run_id() -> str:
    """A run id, unique across processes and hosts (64 random bits + a counter)."""
    global _run_prefix
    if not _run_prefix[1]:
        _run_prefix = (0, os.urandom(8).hex())
    return f"{_run_prefix[1]}{next(_run_counter):016x}"


def _reseed_run_ids() -> None:  # a forked child must not repeat its parent's ids
    global _run_prefix
    _run_prefix = (0, "")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_run_ids)


_NOT_SET: Any = object()

RetryDelay = float | int | Sequence[float | int] | Callable[[int], Sequence[float | int]]


# --------------------------------------------------------------------------- crash points

# Fault injection for the crash-matrix tests: NOTEBOOK_FLOW_CRASH_AT=<point> SIGKILLs this
# process at that point of the miss path (after_lock, after_payload, after_manifest,
# before_release). Read once at import; one string comparison per point when unset.
_CRASH_AT = os.environ.get("NOTEBOOK_FLOW_CRASH_AT") or None


def _crash_point(name: str) -> None:
    if name == _CRASH_AT:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- hot cache

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, range)


def _immutable(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _IMMUTABLE):
        return True
    if isinstance(value, (tuple, frozenset)) and depth < 4 and len(value) <= 64:
        return all(_immutable(v, depth + 1) for v in value)
    return False


class _HotCache:
    """Small results this process loaded recently, so a repeated hit costs microseconds.

    Only local stores and only payloads up to ``max_size`` bytes. Immutable values are
    returned as they are; anything else is kept pickled and unpickled on every hit, so
    mutating a returned value never changes what the next hit returns, and is kept only
    from the second time it is stored or loaded here.

    An entry is trusted while its store's generation (``ResultStore.changes_here``, and
    ``generation_stamp``: the file every process rewrites after it deletes or replaces a
    manifest) is the one it was last checked against; the file is read at most every
    ``recheck_after`` seconds per store. When the generation moved, each entry re-checks its
    own manifest's stat stamp once. A commit of a new key leaves entries alone (a key is
    content-addressed). One stat per store and period, instead of one per hit: a system
    call on the hit path let other threads take the GIL, which cost the embedded worker
    more than half its throughput.
    """

    def __init__(
        self,
        max_entries: int = 65_536,
        max_size: int = 64 * 1024,
        max_bytes: int = 64 * 2**20,
        recheck_after: float = 0.5,
    ) -> None:
        self.max_entries = max_entries
        self.max_size = max_size
        self.max_bytes = max_bytes  # budget for the payloads kept (by their stored size)
        self.recheck_after = recheck_after
        self._bytes = 0
        # (store url, key) → (manifest stamp, generation checked, manifest, pickled, payload)
        self._entries: collections.OrderedDict[
            tuple[str, str], tuple[Any, Any, Manifest, bool, Any]
        ] = collections.OrderedDict()
        self._seen: collections.OrderedDict[tuple[str, str], bool] = collections.OrderedDict()
        # store url → (when its generation was read, that generation)
        self._generations: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def _generation(self, store: ResultStore) -> Any:
        """(changes here, generation file stamp) of ``store``; the stamp read at most every
        ``recheck_after`` seconds, and at once after a change made in this process."""
        now = time.monotonic()
        here = store.changes_here()
        seen = self._generations.get(store.url)
        if seen is None or seen[1][0] != here or now - seen[0] > self.recheck_after:
            seen = self._generations[store.url] = (now, (here, store.generation_stamp()))
        return seen[1]

    def get(self, store: ResultStore, key: str) -> tuple[Manifest, Any] | None:
        slot = (store.url, key)  # the same key may live in several stores
        entry = self._entries.get(slot)
        if entry is None:
            return None
        stamp, checked, manifest, pickled, payload = entry
        generation = self._generation(store)
        if checked != generation:
            if stamp != store.manifest_stamp(key):
                self.discard(slot)
                return None
            self._entries[slot] = (stamp, generation, manifest, pickled, payload)
        if pickled:
            import pickle

            return manifest, pickle.loads(payload)
        return manifest, payload

    def put(self, store: ResultStore, manifest: Manifest, value: Any) -> None:
        if manifest.size > self.max_size or not store.is_local:
            return
        pickled = not _immutable(value)
        payload = value
        slot = (store.url, manifest.key)
        if pickled and slot not in self._entries:
            # Admit a value that must be copied (pickled) only the second time this process
            # stores or loads it: a resumed notebook loads most results once, and pickling
            # each (~1 ms for a small DataFrame under a busy GIL) would buy nothing.
            with self._lock:
                if self._seen.pop(slot, None) is None:
                    self._seen[slot] = True
                    while len(self._seen) > self.max_entries:
                        self._seen.popitem(last=False)
                    return
        generation = self._generation(store)
        stamp = store.manifest_stamp(manifest.key)
        if stamp is None:
            return
        if pickled:
            import pickle

            try:
                payload = pickle.dumps(value, protocol=5)
            except Exception:  # not picklable by reference in this process: don't keep it
                return
        with self._lock:
            old = self._entries.pop(slot, None)
            if old is not None:
                self._bytes -= old[2].size
            self._entries[slot] = (stamp, generation, manifest, pickled, payload)
            self._bytes += manifest.size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted[2].size

    def discard(self, slot: tuple[str, str]) -> None:
        with self._lock:
            old = self._entries.pop(slot, None)
            if old is not None:
                self._bytes -= old[2].size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._seen.clear()
            self._generations.clear()
            self._bytes = 0


_hot = _HotCache()


# --------------------------------------------------------------------------- run context


@dataclasses.dataclass
class RunContext:
    """What a running task body can see: ``notebook_flow.current_run()``.

    ``cancel_requested`` is set when the run is cancelled or timed out; long bodies may
    poll :meth:`cancelled` to stop early (cancellation of running threads is cooperative).
    """

    run_id: str
    task: Task[Any, Any]
    key: str | None
    attempt: int = 1
    # Made on first use: a threading.Event costs ~4 µs to create, on every run.
    _cancel: threading.Event | None = dataclasses.field(default=None, repr=False)

    @property
    def cancel_requested(self) -> threading.Event:
        """The cancel flag (a ``threading.Event``): set, wait on or poll it."""
        event = self._cancel
        if event is None:
            with _cancel_lock:  # one Event per run, whichever thread asks first
                event = self._cancel
                if event is None:
                    event = self._cancel = threading.Event()
        return event

    def cancelled(self) -> bool:
        event = self._cancel
        return event is not None and event.is_set()


_cancel_lock = threading.Lock()


_current_run: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "notebook_flow_run", default=None
)


def current_run() -> RunContext | None:
    """The run whose body is executing in this context, or None outside a task."""
    return _current_run.get()


# --------------------------------------------------------------------------- retries


def exponential_backoff(backoff_factor: float) -> Callable[[int], list[float]]:
    """Retry delays ``factor * 2**n`` for ``retry_delay_seconds`` (as in Prefect).

    >>> exponential_backoff(10)(3)
    [10.0, 20.0, 40.0]
    """
    if backoff_factor < 0:
        raise ConfigurationError("backoff_factor must be >= 0")
    return lambda retries: [float(backoff_factor) * 2**n for n in range(retries)]


def _delays(retries: int, spec: RetryDelay) -> list[float]:
    if callable(spec):
        spec = spec(retries)
    if isinstance(spec, (int, float)):
        values = [float(spec)] * retries
    else:
        values = [float(v) for v in spec]
        if not values:
            values = [0.0]
        values += [values[-1]] * (retries - len(values))  # last delay repeats
    if any(v < 0 for v in values):
        raise ConfigurationError(f"retry delays must be >= 0, got {values!r}")
    return values


# --------------------------------------------------------------------------- explain


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Why a call would hit or miss: ``task.explain(*args, **kwargs)``."""

    task: str
    key: str | None
    status: str  # "hit" | "miss" | "expired" | "uncached" | "corrupt"
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        head = f"task `{self.task}`: {self.status}"
        return head + "".join(f"\n  - {r}" for r in self.reasons)

    def _repr_markdown_(self) -> str:
        return f"**task `{self.task}`: {self.status}**\n\n" + "\n".join(
            f"- {r}" for r in self.reasons
        )


def diff_components(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """Human reasons for the difference between two component maps."""
    if old is None:
        return ["no earlier result of this task was found"]
    reasons = [
        f"{label} changed" for label in sorted(new) if label in old and old[label] != new[label]
    ]
    reasons += [f"{label} is new" for label in sorted(new) if label not in old]
    reasons += [f"{label} is no longer used" for label in sorted(old) if label not in new]
    return reasons or ["the cache key format or the task's namespace changed"]


# --------------------------------------------------------------------------- the Task


class Task(Generic[P, R]):
    """A function with durable, cached results. Create one with :func:`task`.

    Calling the task runs it inline with caching; ``.fn`` is the raw function,
    ``.cache_key(...)`` shows the key of a call, ``.explain(...)`` why it would miss,
    ``.clear_cache()`` removes its results.
    """

    __notebook_flow_task__ = True

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        cache_policy: CachePolicy | None = _NOT_SET,
        cache_expiration: timedelta | float | None = None,
        refresh_cache: bool = False,
        persist_result: bool = True,
        retries: int = 0,
        retry_delay_seconds: RetryDelay = 0,
        retry_jitter_factor: float | None = None,
        retry_condition_fn: Callable[[Task[Any, Any], RunContext, BaseException], bool]
        | None = None,
        timeout_seconds: float | None = None,
        result_serializer: str | Serializer | None = None,
        result_storage: str | ResultStore | None = None,
        tags: Sequence[str] | None = None,
        cache_namespace: str | None = None,
        lock_manager: LockManager | None = None,
        isolation_level: str | None = None,
        lock_timeout: float | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"@task needs a function, got {type(fn).__name__}")
        if isinstance(fn, Task):
            fn = fn.fn
        self.fn: Callable[P, R] = fn
        self.is_async = inspect.iscoroutinefunction(fn)
        qualname = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
        self.name: str = name or qualname
        module = getattr(fn, "__module__", None) or "__main__"
        # Identity namespaces keys: stable across restarts (module + qualified name, or the
        # explicit name), never id() or a cell number.
        self.identity: str = f"{module}:{name or qualname}"
        if cache_policy is _NOT_SET:
            cache_policy = DEFAULT
        elif cache_policy is None:
            from .cache_policies import NONE

            cache_policy = NONE
        if not isinstance(cache_policy, CachePolicy):
            raise ConfigurationError(
                f"cache_policy must be a CachePolicy (INPUTS, TASK_SOURCE, …), got {cache_policy!r}"
            )
        if lock_manager is not None or isolation_level is not None:
            cache_policy = cache_policy.configure(
                lock_manager=lock_manager,
                isolation_level=isolation_level,  # type: ignore[arg-type]
            )
        self.cache_policy: CachePolicy = cache_policy
        self.cache_expiration = _as_timedelta(cache_expiration)
        self.refresh_cache = bool(refresh_cache)
        self.persist_result = bool(persist_result)
        if not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be an int >= 0, got {retries!r}")
        self.retries = retries
        self.retry_delay_seconds = retry_delay_seconds
        _delays(retries, retry_delay_seconds)  # validate now, not on the first failure
        if retry_jitter_factor is not None and retry_jitter_factor < 0:
            raise ConfigurationError("retry_jitter_factor must be >= 0")
        self.retry_jitter_factor = retry_jitter_factor
        self.retry_condition_fn = retry_condition_fn
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ConfigurationError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
        self.timeout_seconds = timeout_seconds
        if result_serializer is not None and isinstance(result_serializer, str):
            from .serializers import get_serializer

            get_serializer(result_serializer)  # raises a clear error for unknown names
        self.result_serializer = result_serializer
        self.result_storage = result_storage
        self.tags: tuple[str, ...] = tuple(tags or ())
        self.cache_namespace = cache_namespace
        self.lock_timeout = lock_timeout
        if max_concurrency is not None and max_concurrency < 1:
            raise ConfigurationError("max_concurrency must be >= 1")
        self.max_concurrency = max_concurrency
        self._signature = inspect.signature(fn)
        # Plain positional-or-keyword parameters (the common case) bind without
        # inspect.Signature.bind, which costs ~5 µs of the cache-hit budget.
        params = list(self._signature.parameters.values())
        self._simple_names: tuple[str, ...] | None = None
        self._simple_defaults: dict[str, Any] = {}
        if all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            self._simple_names = tuple(p.name for p in params)
            self._simple_defaults = {
                p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            }
        self._last_components: dict[str, str] | None = None
        self._memory: dict[str, Any] = {}  # results of persist_result=False tasks
        self._store_cache: tuple[int, ResultStore] | None = None
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Bound arguments with defaults applied, in signature order."""
        names = self._simple_names
        if names is not None and len(args) <= len(names):
            arguments = dict(zip(names, args, strict=False))
            rest = names[len(args) :]
            for name in rest:
                if name in kwargs:
                    arguments[name] = kwargs[name]
                elif name in self._simple_defaults:
                    arguments[name] = self._simple_defaults[name]
                else:
                    break  # a missing argument: inspect says so below
            else:
                if all(k in rest for k in kwargs):  # no unknown or duplicated keywords
                    return arguments
        try:  # the general case, and every error message, come from inspect
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task `{self.name}`: {exc}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    # -- options ---------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        return {
            "name": self.name if self.identity.endswith(":" + self.name) else None,
            "cache_policy": self.cache_policy,
            "cache_expiration": self.cache_expiration,
            "refresh_cache": self.refresh_cache,
            "persist_result": self.persist_result,
            "retries": self.retries,
            "retry_delay_seconds": self.retry_delay_seconds,
            "retry_jitter_factor": self.retry_jitter_factor,
            "retry_condition_fn": self.retry_condition_fn,
            "timeout_seconds": self.timeout_seconds,
            "result_serializer": self.result_serializer,
            "result_storage": self.result_storage,
            "tags": self.tags,
            "cache_namespace": self.cache_namespace,
            "lock_timeout": self.lock_timeout,
            "max_concurrency": self.max_concurrency,
        }

    def with_options(self, **changes: Any) -> Task[P, R]:
        """A copy with some options changed: ``load.with_options(refresh_cache=True)``."""
        options = self._options()
        options["name"] = self.name
        unknown = set(changes) - set(options) - {"lock_manager", "isolation_level"}
        if unknown:
            raise ConfigurationError(f"unknown task option(s): {', '.join(sorted(unknown))}")
        options.update(changes)
        return Task(self.fn, **options)

    def __reduce__(self) -> tuple[Any, ...]:
        # A module-level task is found again by name; anything else (cells, closures)
        # travels by value with its function (cloudpickle pickles __main__ by value).
        module = getattr(self.fn, "__module__", None)
        qualname = getattr(self.fn, "__qualname__", "")
        if (
            module
            and module != "__main__"
            and "<locals>" not in qualname
            and _resolve(module, qualname) is self
        ):
            return (_task_by_reference, (module, qualname))
        return (_task_from_options, (self.fn, self._options()))

    def __repr__(self) -> str:
        return f"<Task {self.name!r} policy={self.cache_policy!r}>"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # Decorating a method: bind like a function would.
        if instance is None:
            return self
        return functools.partial(self, instance)

    # -- public API ------------------------------------------------------------------------

    @overload
    def __call__(
        self: Task[P, Coroutine[Any, Any, R]], *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, R]: ...
    @overload
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task inline with caching (for an async task: a coroutine to await)."""
        call = _Call(self, args, kwargs)
        if self.is_async:
            return _run_async(call)
        return _run_sync(call)

    def submit(self, *args: Any, wait_for: Sequence[Any] | None = None, **kwargs: Any) -> Any:
        """Run the task on the embedded background worker; returns a ``TaskFuture`` at once.

        Futures among the arguments (also inside lists and dicts) are resolved first;
        ``wait_for=[...]`` orders without passing data.
        """
        from .runners import submit_task

        return submit_task(self, args, kwargs, wait_for=wait_for)

    def map(self, *args: Any, wait_for: Sequence[Any] | None = None, **kwargs: Any) -> Any:
        """Submit one run per element of the iterables (zipped); ``unmapped(x)`` is constant."""
        from .runners import map_task

        return map_task(self, args, kwargs, wait_for=wait_for)

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str | None:
        """The cache key this call would use (None: the task runs uncached).

        >>> add.cache_key(1, 2)  # doctest: +SKIP
        '5b1e0a…'
        """
        return _Call(self, args, kwargs).compute_key()

    def explain(self, *args: P.args, **kwargs: P.kwargs) -> Explanation:
        """Why this call would hit or miss, against the task's latest stored result.

        >>> print(clean.explain(df))  # doctest: +SKIP
        task `clean`: miss
          - source of helper `normalize` changed
        """
        call = _Call(self, args, kwargs)
        key = call.compute_key()
        if key is None:
            return Explanation(self.name, None, "uncached", ("the cache policy computes no key",))
        assert call.components is not None
        if not self.persist_result:
            status = "hit" if key in self._memory else "miss"
            return Explanation(self.name, key, status, ("results are kept in memory only",))
        manifest = call.store.lookup(key)
        if manifest is not None:
            if manifest.expired():
                return Explanation(self.name, key, "expired", (_expired_reason(manifest),))
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.created_at))
            return Explanation(
                self.name, key, "hit", (f"result computed {when} in {manifest.duration:.3g} s",)
            )
        reference = self._reference_components(call.store)
        return Explanation(
            self.name, key, "miss", tuple(diff_components(reference, call.components))
        )

    def clear_cache(self) -> int:
        """Remove every stored result of this task; returns how many were removed."""
        self._memory.clear()
        _hot.clear()
        store = _store_for(self)
        removed = 0
        keys: list[str] = []
        for manifest in store.iter_manifests():
            if manifest.task == self.identity and store.delete(manifest.key):
                removed += 1
                keys.append(manifest.key)
        if keys:
            _metadata_for(store, lambda m: m.remove_cache_entries(keys))
        self._last_components = None
        return removed

    # -- helpers -----------------------------------------------------------------------------

    def _reference_components(self, store: ResultStore) -> dict[str, str] | None:
        """The components of this task's latest result: this process's memory, else DuckDB."""
        if self._last_components is not None:
            return self._last_components
        try:
            from .config import get_metadata

            entry = get_metadata(store).latest_entry(self.identity)
        except Exception:
            logger.debug("no metadata for explain()", exc_info=True)
            return None
        if entry is None:
            return None
        comps = entry.get("components")
        if isinstance(comps, str):
            comps = json.loads(comps)
        return dict(comps) if comps else None


def _resolve(module: str, qualname: str) -> Any:
    import importlib
    import sys

    obj: Any = sys.modules.get(module)
    try:
        if obj is None:
            obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj


def _task_by_reference(module: str, qualname: str) -> Task[Any, Any]:
    obj = _resolve(module, qualname)
    if not isinstance(obj, Task):
        raise ConfigurationError(
            f"cannot find task {module}.{qualname} in this process; make the module importable "
            "here (same code on every worker) or define the task in the notebook"
        )
    return obj


def _task_from_options(fn: Callable[..., Any], options: dict[str, Any]) -> Task[Any, Any]:
    return Task(fn, **options)


def _as_timedelta(value: timedelta | float | None) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        if value is not None and value.total_seconds() <= 0:
            raise ConfigurationError("cache_expiration must be positive")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return timedelta(seconds=value)
    raise ConfigurationError(
        f"cache_expiration must be a timedelta or positive seconds, got {value!r}"
    )


def _expired_reason(manifest: Manifest) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.expires_at or 0))
    return f"expired: the stored result expired at {when}"


def _store_for(t: Task[Any, Any]) -> ResultStore:
    """The task's store, cached on the task until the settings change."""
    cached = t._store_cache
    if cached is not None and cached[0] == config.generation:
        return cached[1]
    storage = t.cache_policy.key_storage or t.result_storage
    store = config.get_store(storage)  # type: ignore[arg-type]
    t._store_cache = (config.generation, store)
    return store


def _metadata_for(store: ResultStore, action: Callable[[MetadataStore], None]) -> None:
    """Hand an event to the metadata recorder; a metadata problem never fails a task."""
    try:
        action(config.get_metadata(store))
    except Exception:
        logger.warning("could not record metadata for %s", store.url, exc_info=True)


# --------------------------------------------------------------------------- one call


class _Call:
    """The state of one invocation: arguments, key, store, run id, timings."""

    __slots__ = (
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

    def compute_key(self) -> str | None:
        t = self.task
        components = t.cache_policy.compute_components(KeyContext(t, self.arguments))
        self.components = components
        if components is None:
            self.key = None
        else:
            self.key = combine_components(t.cache_namespace or t.identity, components)
        return self.key

    # -- events ------------------------------------------------------------------------------

    def record(self, state: RunState, **fields: Any) -> None:
        t = self.task
        event = RunEvent(
            run_id=self.run_id,
            task=t.name,
            task_identity=t.identity,
            key=self.key,
            state=state,
            at=time.time(),
            notebook=_identity.notebook_path(),
            cell=_identity.current_cell(),
            tags=t.tags,
            **fields,
        )
        _metadata_for(self.store, lambda m: m.record_run(event))

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
        if key is None or t.refresh_cache:
            return _MISS
        t0 = time.perf_counter()
        if not t.persist_result:
            value = t._memory.get(key, _MISS)
            if value is not _MISS:
                self.record(RunState.CACHED, duration=time.perf_counter() - t0)
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
            _hot.put(self.store, manifest, value)
        elapsed = time.perf_counter() - t0
        t._last_components = self.components
        self.record(
            RunState.CACHED,
            duration=elapsed,
            saved=max(manifest.duration - elapsed, 0.0),
            size=manifest.size,
        )
        return value

    def explain_miss(self, reasons: list[str] | None = None) -> str:
        if reasons is None:
            from .config import settings

            if not settings().log_misses or self.components is None:
                return ""
            reference = self.task._reference_components(self.store)
            reasons = diff_components(reference, self.components)
        text = "; ".join(reasons)
        logger.info("task `%s`: cache miss: %s", self.task.name, text)
        return text

    # -- locking -----------------------------------------------------------------------------

    def locked(self) -> contextlib.AbstractContextManager[Any]:
        """A lock on the key for SERIALIZABLE policies, else a no-op."""
        t = self.task
        policy = t.cache_policy
        if self.key is None or policy.isolation_level != "SERIALIZABLE":
            return contextlib.nullcontext()
        from .config import settings
        from .locks import default_lock_manager_for, hold

        manager = policy.lock_manager or default_lock_manager_for(self.store)
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
            try:
                return bool(t.retry_condition_fn(t, self.ctx, exc))
            except Exception:
                logger.warning(
                    "retry_condition_fn of `%s` raised; not retrying", t.name, exc_info=True
                )
                return False
        return True

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

    def commit(self, value: Any, duration: float, attempt: int, lease: Any) -> None:
        """Persist the result (payload first, manifest last), then record COMPLETED."""
        t = self.task
        size: int | None = None
        if self.key is not None and t.persist_result:
            expires_at = (
                time.time() + t.cache_expiration.total_seconds() if t.cache_expiration else None
            )
            lease_check = getattr(lease, "check", None)

            def check() -> None:  # the fencing point: refuse to commit after a lost lease
                if lease_check is not None:
                    lease_check()
                _crash_point("after_payload")

            try:
                manifest = self.store.commit(
                    self.key,
                    value,
                    task=t.identity,
                    components=self.components or {},
                    run_id=self.run_id,
                    duration=duration,
                    expires_at=expires_at,
                    serializer=t.result_serializer,
                    before_manifest=check,
                    fence=getattr(lease, "fence", None),
                )
            except Exception as exc:
                self.failed(attempt, exc)
                if isinstance(exc, CommitError):
                    exc.result = value  # type: ignore[attr-defined]
                raise
            _crash_point("after_manifest")
            _hot.put(self.store, manifest, value)  # the next hit in this process is in memory
            size = manifest.size
            entry = CacheEntry(
                key=manifest.key,
                task=t.name,
                task_identity=t.identity,
                size=manifest.size,
                created_at=manifest.created_at,
                expires_at=manifest.expires_at,
                duration=duration,
                serializer=manifest.serializer,
                payload=manifest.payload,
                components=dict(manifest.components),
                run_id=self.run_id,
            )
            _metadata_for(self.store, lambda m: m.record_cache_entry(entry))
        elif self.key is not None:
            t._memory[self.key] = value
        t._last_components = self.components
        self.record(RunState.COMPLETED, attempt=attempt, duration=duration, size=size)


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
    """Key → lookup → (lock → re-check) → run with retries → commit → record."""
    if call.compute_key() is not None:
        value = call.lookup()
        if value is not _MISS:
            return value
    why = call.explain_miss() if call.key is not None and not call.task.refresh_cache else ""
    with call.locked() as lease:
        if lease is not None:
            _crash_point("after_lock")
            value = call.lookup()  # the holder before us may have committed it
            if value is not _MISS:
                return value
        token = call.begin(why)
        try:
            attempt = 1
            while True:
                call.ctx.attempt = attempt  # type: ignore[union-attr]
                t0 = time.perf_counter()
                try:
                    value = call.call_body_sync()
                    break
                except BaseException as exc:
                    if not call.should_retry(attempt, exc):
                        call.failed(attempt, exc)
                        raise
                    delay = call.retry_delay(attempt)
                    call.retrying(attempt, exc, delay)
                    time.sleep(delay)
                    attempt += 1
            call.commit(value, time.perf_counter() - t0, attempt, lease)
            _crash_point("before_release")
        finally:
            _current_run.reset(token)
    return value


async def _run_async(call: _Call) -> Any:
    """The same path for ``async def`` tasks; blocking steps run in a thread."""
    if call.compute_key() is not None:
        value = await asyncio.to_thread(call.lookup)
        if value is not _MISS:
            return value
    why = call.explain_miss() if call.key is not None and not call.task.refresh_cache else ""
    from .locks.threaded import held_in_thread

    # Not on the loop's executor: waiters filled it while the holder needed it to commit.
    async with held_in_thread(call.locked()) as lease:
        if lease is not None:
            value = await asyncio.to_thread(call.lookup)
            if value is not _MISS:
                return value
        token = call.begin(why)
        try:
            attempt = 1
            while True:
                call.ctx.attempt = attempt  # type: ignore[union-attr]
                t0 = time.perf_counter()
                try:
                    value = await call.call_body_async()
                    break
                except BaseException as exc:
                    if not call.should_retry(attempt, exc):
                        call.failed(attempt, exc)
                        raise
                    delay = call.retry_delay(attempt)
                    call.retrying(attempt, exc, delay)
                    await asyncio.sleep(delay)
                    attempt += 1
            duration = time.perf_counter() - t0
            await asyncio.to_thread(call.commit, value, duration, attempt, lease)
        finally:
            _current_run.reset(token)
    return value


# --------------------------------------------------------------------------- the decorator


@overload
def task(__fn: Callable[P, R]) -> Task[P, R]: ...
@overload
def task(
    *,
    name: str | None = None,
    cache_policy: CachePolicy | None = ...,
    cache_expiration: timedelta | float | None = None,
    refresh_cache: bool = False,
    persist_result: bool = True,
    retries: int = 0,
    retry_delay_seconds: RetryDelay = 0,
    retry_jitter_factor: float | None = None,
    retry_condition_fn: Callable[[Task[Any, Any], RunContext, BaseException], bool] | None = None,
    timeout_seconds: float | None = None,
    result_serializer: str | Serializer | None = None,
    result_storage: str | ResultStore | None = None,
    tags: Sequence[str] | None = None,
    cache_namespace: str | None = None,
    lock_manager: LockManager | None = None,
    isolation_level: str | None = None,
    lock_timeout: float | None = None,
    max_concurrency: int | None = None,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...
def task(__fn: Callable[P, R] | None = None, **options: Any) -> Any:
    """Turn a function into a cached, durable :class:`Task`.

    >>> @task
    ... def load(path): ...
    >>> @task(cache_policy=INPUTS, cache_expiration=timedelta(hours=1), retries=3)
    ... def extract(day): ...

    By default results persist to the configured store and the key is ``INPUTS +
    TASK_SOURCE``, so a call hits across kernel restarts whenever the arguments and the
    code (including the helpers it calls) are unchanged.
    """
    if __fn is None:
        return lambda fn: Task(fn, **options)
    if options:
        raise ConfigurationError("use @task or @task(option=...), not task(fn, option=...)")
    return Task(__fn)
