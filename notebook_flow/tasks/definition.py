"""``Task`` and ``@task``: a task's options (checked once, at definition), how it pickles,
and its public methods. Calling a task hands over to the call path in :mod:`.call`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from notebook_flow import _hooks, config
from notebook_flow.cache_policies import DEFAULT, NONE, CachePolicy
from notebook_flow.errors import ConfigurationError, MetadataError
from notebook_flow.options import byte_size, tag_tuple, validate_task
from notebook_flow.states import RunState, State

from . import hooks
from .call import _Call, _metadata_for, _run_async, _run_sync, _store_for
from .explain import Explanation, _expired_reason, diff_components
from .hot import _hot
from .keys import _ResultStorageKey
from .retries import RetryDelay, _delays

if TYPE_CHECKING:
    from notebook_flow.locks.base import LockManager
    from notebook_flow.serializers import Serializer
    from notebook_flow.storage import ResultStore

    from .context import RunContext

logger = logging.getLogger("notebook_flow")

P = ParamSpec("P")
R = TypeVar("R")

_NOT_SET: Any = object()

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
        cache_key_fn: Callable[[Any, dict[str, Any]], str | None] | None = None,
        cache_expiration: timedelta | float | None = None,
        refresh_cache: bool | None = None,
        persist_result: bool | None = True,
        retries: int = 0,
        retry_delay_seconds: RetryDelay | None = 0,
        retry_jitter_factor: float | None = None,
        retry_condition_fn: Callable[[Task[Any, Any], RunContext, State[Any]], bool] | None = None,
        timeout_seconds: float | None = None,
        result_serializer: str | Serializer | None = None,
        result_storage: str | os.PathLike[str] | ResultStore | None = None,
        result_storage_key: str | None = None,
        tags: Iterable[str] | None = None,
        cache_namespace: str | None = None,
        lock_manager: LockManager | None = None,
        isolation_level: str | None = None,
        lock_timeout: float | None = None,
        max_concurrency: int | None = None,
        on_completion: Iterable[Callable[..., Any]] | None = None,
        on_failure: Iterable[Callable[..., Any]] | None = None,
        on_commit: Iterable[Callable[..., Any]] | None = None,
        on_rollback: Iterable[Callable[..., Any]] | None = None,
        cache_result_in_memory: bool = True,
        max_size: int | str | None = None,
        pin: bool = False,
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"@task needs a function, got {type(fn).__name__}")
        if isinstance(fn, Task):
            fn = fn.fn
        validate_task(  # type, range, NaN/inf of every option, here at definition
            name=name, cache_expiration=cache_expiration, refresh_cache=refresh_cache,
            persist_result=persist_result, retries=retries,
            retry_delay_seconds=retry_delay_seconds, retry_jitter_factor=retry_jitter_factor,
            retry_condition_fn=retry_condition_fn, timeout_seconds=timeout_seconds,
            result_serializer=result_serializer, result_storage=result_storage, tags=tags,
            cache_namespace=cache_namespace, lock_timeout=lock_timeout,
            max_concurrency=max_concurrency, cache_key_fn=cache_key_fn,
            result_storage_key=result_storage_key, cache_result_in_memory=cache_result_in_memory,
            max_size=max_size, pin=pin,
        )  # fmt: skip
        self.fn: Callable[P, R] = fn
        self.is_async = inspect.iscoroutinefunction(fn)
        qualname = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
        self.name: str = name or qualname
        module = getattr(fn, "__module__", None) or "__main__"
        # Identity namespaces keys: stable across restarts (module + qualified name, or the
        # explicit name), never id() or a cell number.
        self.identity: str = f"{module}:{name or qualname}"
        # As given, for with_options() and pickling (the policy below is derived).
        self._given: dict[str, Any] = {
            "cache_key_fn": cache_key_fn,
            "persist_result": persist_result,
            "result_storage_key": result_storage_key,
            "lock_manager": lock_manager,
            "isolation_level": isolation_level,
        }
        if cache_policy is not _NOT_SET:  # (the sentinel does not survive pickling)
            self._given["cache_policy"] = cache_policy
        self.cache_key_fn = cache_key_fn
        self.result_storage_key = result_storage_key
        self.persist_result = persist_result is not False  # results persist by default
        self.cache_policy: CachePolicy | None = _cache_policy_of(
            self.name, cache_policy, cache_key_fn, persist_result, result_storage_key
        )
        policy = self.cache_policy
        if policy is None and result_storage_key is not None and self.persist_result:
            policy = _ResultStorageKey(template=result_storage_key)
        policy = policy if policy is not None else NONE
        if lock_manager is not None or isolation_level is not None:
            policy = policy.configure(
                lock_manager=lock_manager,
                isolation_level=isolation_level,  # type: ignore[arg-type]
            )
            if self.cache_policy is not None:
                self.cache_policy = policy
        #: The policy the call path keys with (``cache_policy=None`` keys like NONE).
        self._policy: CachePolicy = policy
        self.cache_expiration = _as_timedelta(cache_expiration)
        if refresh_cache is not None and not isinstance(refresh_cache, bool):
            raise ConfigurationError(
                f"refresh_cache must be True, False or None, got {refresh_cache!r}"
            )
        self.refresh_cache = refresh_cache
        if not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be an int >= 0, got {retries!r}")
        self.retries = retries
        self.retry_delay_seconds = retry_delay_seconds
        _delays(retries, retry_delay_seconds)  # validate now, not on the first failure
        if retry_jitter_factor is not None and retry_jitter_factor < 0:
            raise ConfigurationError("retry_jitter_factor must be >= 0")
        self.retry_jitter_factor = retry_jitter_factor
        if retry_condition_fn is not None and not callable(retry_condition_fn):
            raise ConfigurationError(
                "retry_condition_fn must be a function (task, task_run, state) -> bool, "
                f"got {type(retry_condition_fn).__name__}"
            )
        self.retry_condition_fn = retry_condition_fn
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ConfigurationError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
        self.timeout_seconds = timeout_seconds
        if result_serializer is not None and isinstance(result_serializer, str):
            from notebook_flow.serializers import get_serializer

            get_serializer(result_serializer)  # raises a clear error for unknown names
        self.result_serializer = result_serializer
        if isinstance(result_storage, os.PathLike):  # pathlib.Path, as Prefect accepts
            result_storage = os.fspath(result_storage)
        self.result_storage = result_storage
        self.tags: set[str] = set(tag_tuple(tags))  # a set, as in Prefect
        self.on_completion_hooks = hooks.check_hooks("on_completion", on_completion)
        self.on_failure_hooks = hooks.check_hooks("on_failure", on_failure)
        self.on_commit_hooks = hooks.check_hooks("on_commit", on_commit)
        self.on_rollback_hooks = hooks.check_hooks("on_rollback", on_rollback)
        if not isinstance(cache_result_in_memory, bool):
            raise ConfigurationError(
                f"cache_result_in_memory must be True or False, got {cache_result_in_memory!r}"
            )
        # Prefect's option: False keeps this task's results out of the in-process hot cache.
        self.cache_result_in_memory = cache_result_in_memory
        # Cache lifecycle (notebook_flow.lifecycle): this task's own quota, in bytes, over
        # which its least recently used results are evicted; pinned results never are.
        self.max_size: int | None = byte_size("max_size", max_size, optional=True)
        self.pin: bool = pin
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
        # Prefect's call keywords, unless the function declares a parameter of that name.
        self._reserved_taken = {"wait_for", "return_state"} & set(self._signature.parameters)
        self._last_components: dict[str, str] | None = None
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

    def _refreshing(self) -> bool:
        """``refresh_cache``, or the global setting when it is None (as Prefect)."""
        if self.refresh_cache is not None:
            return self.refresh_cache
        return config.settings().refresh_cache

    # -- hooks (Prefect's decorators) ----------------------------------------------------------

    def on_completion(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Add a completion hook ``fn(task, task_run, state)``; usable as a decorator."""
        self.on_completion_hooks.extend(hooks.check_hooks("on_completion", [fn]))
        return fn

    def on_failure(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Add a failure hook ``fn(task, task_run, state)``; usable as a decorator."""
        self.on_failure_hooks.extend(hooks.check_hooks("on_failure", [fn]))
        return fn

    def on_commit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Add a commit hook ``fn(transaction)``; usable as a decorator."""
        self.on_commit_hooks.extend(hooks.check_hooks("on_commit", [fn]))
        return fn

    def on_rollback(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Add a rollback hook ``fn(transaction)``; usable as a decorator."""
        self.on_rollback_hooks.extend(hooks.check_hooks("on_rollback", [fn]))
        return fn

    # -- options ---------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        return {
            "name": self.name if self.identity.endswith(":" + self.name) else None,
            **self._given,
            "cache_expiration": self.cache_expiration,
            "refresh_cache": self.refresh_cache,
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
            "on_completion": list(self.on_completion_hooks),
            "on_failure": list(self.on_failure_hooks),
            "on_commit": list(self.on_commit_hooks),
            "on_rollback": list(self.on_rollback_hooks),
            "cache_result_in_memory": self.cache_result_in_memory,
            "max_size": self.max_size,
            "pin": self.pin,
        }

    def with_options(self, **changes: Any) -> Task[P, R]:
        """A copy with some options changed: ``load.with_options(refresh_cache=True)``."""
        options = self._options()
        options["name"] = self.name
        unknown = set(changes) - _OPTION_NAMES
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
        return f"<Task {self.name!r} policy={self._policy!r}>"

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
        """Run the task inline with caching (for an async task: a coroutine to await).

        As in Prefect, futures among the arguments (also inside lists, tuples, sets and
        dicts) are waited for and replaced by their results, ``allow_failure(fut)`` passes
        a failed upstream's exception, ``wait_for=[...]`` waits for runs without passing
        their data, and ``return_state=True`` returns the run's ``State`` instead of its
        value (a failure then does not raise). A function with its own parameter of one of
        these names receives it instead.
        """
        wait_for = None
        return_state = False
        if kwargs and ("wait_for" in kwargs or "return_state" in kwargs):
            kwargs = dict(kwargs)
            if "wait_for" in kwargs and "wait_for" not in self._reserved_taken:
                wait_for = kwargs.pop("wait_for")
            if "return_state" in kwargs and "return_state" not in self._reserved_taken:
                return_state = bool(kwargs.pop("return_state"))
        if return_state:
            if self.is_async:
                return _state_of_async(self, args, kwargs, wait_for)
            return _state_of(self, args, kwargs, wait_for)
        resolver = _hooks.resolver  # None until the futures layer is imported: none exist
        if resolver is not None and resolver.needs(args, kwargs, wait_for):
            if self.is_async:
                return _resolved_then_async(self, resolver, args, kwargs, wait_for)
            args, kwargs = resolver.resolve(args, kwargs, wait_for)
        call = _Call(self, args, kwargs)
        if self.is_async:
            return _run_async(call)
        return _run_sync(call)

    def submit(self, *args: Any, wait_for: Sequence[Any] | None = None, **kwargs: Any) -> Any:
        """Run the task on the embedded background worker; returns a ``TaskFuture`` at once.

        Futures among the arguments (also inside lists and dicts) are resolved first;
        ``wait_for=[...]`` orders without passing data.
        """
        return _hook(_hooks.submit_run)(self, args, kwargs, wait_for)

    def map(self, *args: Any, wait_for: Sequence[Any] | None = None, **kwargs: Any) -> Any:
        """Submit one run per element of the iterables (zipped); ``unmapped(x)`` is constant.

        A future as an argument is waited for and its result mapped over (a list of
        futures in ``allow_failure(...)``: each run gets one of them, failures allowed).
        """
        return _hook(_hooks.map_runs)(self, args, kwargs, wait_for)

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

    def _reference_components(
        self, store: ResultStore, *, timeout: float | None = None
    ) -> dict[str, str] | None:
        """The components of this task's latest result: this process's memory, else DuckDB.

        With ``timeout`` (the miss log line), a MetadataError says the index was busy."""
        if self._last_components is not None:
            return self._last_components
        try:
            from notebook_flow.config import get_metadata

            entry = get_metadata(store).latest_entry(self.identity, timeout=timeout)
        except MetadataError:
            if timeout is not None:
                raise
            logger.debug("no metadata for explain()", exc_info=True)
            return None
        except Exception:
            logger.debug("no metadata for explain()", exc_info=True)
            return None
        if entry is None:
            return None
        comps = entry.get("components")
        if isinstance(comps, str):
            comps = json.loads(comps)
        return dict(comps) if comps else None


_OPTION_NAMES = frozenset(inspect.signature(Task.__init__).parameters) - {"self", "fn"}


def _hook(fn: Callable[..., Any] | None) -> Callable[..., Any]:
    if fn is None:  # the package root sets every hook: this would be a bug of ours
        raise RuntimeError("notebook_flow's runners are not wired (see notebook_flow/_hooks.py)")
    return fn


async def _resolved_then_async(
    t: Task[Any, Any],
    resolver: _hooks.Resolver,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    wait_for: Any,
) -> Any:
    # Waiting for futures blocks: in a thread, so the event loop keeps running meanwhile.
    args, kwargs = await asyncio.to_thread(resolver.resolve, args, kwargs, wait_for)
    return await _run_async(_Call(t, args, kwargs))


def _state_of(
    t: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any], wait_for: Any
) -> Any:
    """``task(..., return_state=True)``: the run's ``State`` (its exception inside, if any)."""
    try:
        resolver = _hooks.resolver
        if resolver is not None and resolver.needs(args, kwargs, wait_for):
            args, kwargs = resolver.resolve(args, kwargs, wait_for)
        call = _Call(t, args, kwargs)
        value = _run_sync(call)
    except Exception as exc:
        return State(RunState.FAILED, exception=exc)
    cached = call.ctx is None and call.key is not None
    return State(RunState.CACHED if cached else RunState.COMPLETED, value)


async def _state_of_async(
    t: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any], wait_for: Any
) -> Any:
    try:
        resolver = _hooks.resolver
        if resolver is not None and resolver.needs(args, kwargs, wait_for):
            args, kwargs = await asyncio.to_thread(resolver.resolve, args, kwargs, wait_for)
        call = _Call(t, args, kwargs)
        value = await _run_async(call)
    except Exception as exc:
        return State(RunState.FAILED, exception=exc)
    cached = call.ctx is None and call.key is not None
    return State(RunState.CACHED if cached else RunState.COMPLETED, value)


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


def _cache_policy_of(
    name: str,
    cache_policy: Any,
    cache_key_fn: Any,
    persist_result: bool | None,
    result_storage_key: str | None,
) -> CachePolicy | None:
    """The task's ``cache_policy`` from its options, as Prefect 3 derives it.

    ``cache_key_fn`` wins over ``cache_policy`` (with a warning when both are given);
    ``persist_result=False`` means no caching (NO_CACHE; None stays None); a
    ``result_storage_key`` replaces the policy (None); ``cache_policy=None`` stays None
    and computes no key; the default is DEFAULT, or NONE when the
    ``default_no_cache`` setting is on."""
    if cache_policy not in (_NOT_SET, None) and not isinstance(cache_policy, CachePolicy):
        raise ConfigurationError(
            f"cache_policy must be a CachePolicy (INPUTS, TASK_SOURCE, …), got {cache_policy!r}"
        )
    if cache_key_fn is not None:
        if cache_policy is not _NOT_SET:
            logger.warning(
                "task `%s`: both cache_policy and cache_key_fn are set; cache_key_fn is used",
                name,
            )
        cache_policy = CachePolicy.from_cache_key_fn(cache_key_fn)
    elif cache_policy is _NOT_SET:
        from notebook_flow.config import settings

        if settings().default_no_cache:
            cache_policy = NONE
    if persist_result is False:
        if isinstance(cache_policy, CachePolicy) and cache_policy != NONE:
            logger.warning("task `%s`: ignoring cache_policy because persist_result is False", name)
        return None if cache_policy is None else NONE
    if cache_policy is _NOT_SET and result_storage_key is None:
        return DEFAULT
    if result_storage_key is not None and cache_policy != NONE:
        return None
    return None if cache_policy is _NOT_SET else cache_policy


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


# --------------------------------------------------------------------------- the decorator


@overload
def task(__fn: Callable[P, R]) -> Task[P, R]: ...
@overload
def task(
    *,
    name: str | None = None,
    cache_policy: CachePolicy | None = ...,
    cache_key_fn: Callable[[Any, dict[str, Any]], str | None] | None = None,
    cache_expiration: timedelta | float | None = None,
    refresh_cache: bool | None = None,
    persist_result: bool | None = True,
    retries: int = 0,
    retry_delay_seconds: RetryDelay | None = 0,
    retry_jitter_factor: float | None = None,
    retry_condition_fn: Callable[[Task[Any, Any], RunContext, State[Any]], bool] | None = None,
    timeout_seconds: float | None = None,
    result_serializer: str | Serializer | None = None,
    result_storage: str | os.PathLike[str] | ResultStore | None = None,
    result_storage_key: str | None = None,
    tags: Iterable[str] | None = None,
    cache_namespace: str | None = None,
    lock_manager: LockManager | None = None,
    isolation_level: str | None = None,
    lock_timeout: float | None = None,
    max_concurrency: int | None = None,
    on_completion: Iterable[Callable[..., Any]] | None = None,
    on_failure: Iterable[Callable[..., Any]] | None = None,
    on_commit: Iterable[Callable[..., Any]] | None = None,
    on_rollback: Iterable[Callable[..., Any]] | None = None,
    cache_result_in_memory: bool = True,
    max_size: int | str | None = None,
    pin: bool = False,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...
def task(__fn: Callable[P, R] | None = None, **options: Any) -> Any:
    """Turn a function into a cached, durable :class:`Task`.

    >>> from datetime import timedelta
    >>> from notebook_flow import task
    >>> from notebook_flow.cache_policies import INPUTS
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
