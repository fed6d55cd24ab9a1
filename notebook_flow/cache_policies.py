"""Cache policies: how a task's cache key is computed.

A policy turns a call into named *components* (``"argument `df`"``, ``"source of helper
`clean`"`` …), each a 32-hex hash. The key is one hash over the components, the task's
namespace and :data:`KEY_FORMAT_VERSION`; the components are stored with the result so a
miss can be explained.

>>> from notebook_flow.cache_policies import INPUTS, TASK_SOURCE
>>> policy = INPUTS + TASK_SOURCE          # the default
>>> policy = INPUTS - "verbose"            # ignore one argument
>>> policy = INPUTS.configure(isolation_level="SERIALIZABLE")

The algebra is Prefect 3's: ``+`` builds a flat :class:`CompoundCachePolicy` whose
``INPUTS`` parts merge into one (their exclusions add up, so ``INPUTS + (INPUTS - "x")``
ignores ``x``); ``-`` drops an argument from a policy that reads inputs and is a no-op on
one that does not (``TASK_SOURCE - "x" is TASK_SOURCE``). ``NONE`` (alias ``NO_CACHE``)
computes no key and is the identity of ``+``.

A policy written for Prefect plugs in unchanged: subclass :class:`CachePolicy` (a
dataclass) and implement ``compute_key(self, task_ctx, inputs, flow_parameters,
**kwargs)``. ``task_ctx.task`` is the task, ``task_ctx.parameters`` (= ``inputs``) the
bound arguments; the string it returns becomes one component of the key (None: the call
runs uncached). Built-in policies implement :meth:`CachePolicy.compute_components`
instead, which names each part so a miss can be explained.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import glob
import inspect
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

import xxhash

from .errors import CacheKeyError, ConfigurationError, UnhashableError, UnhashableInputError
from .hashing import fingerprint
from .sourcehash import source_components

if TYPE_CHECKING:
    from .storage import ResultStore

__all__ = [
    "DEFAULT",
    "FILES",
    "FLOW_PARAMETERS",
    "INPUTS",
    "KEY_FORMAT_VERSION",
    "NONE",
    "NO_CACHE",
    "RUN_ID",
    "TASK_SOURCE",
    "CacheKeyFnPolicy",
    "CachePolicy",
    "CompoundCachePolicy",
    "CompoundPolicy",
    "Files",
    "FlowParameters",
    "Inputs",
    "IsolationLevel",
    "KeyContext",
    "RunId",
    "TaskSource",
    "combine_components",
]

#: Bumped on any change that alters keys for the same inputs; old entries then simply miss.
KEY_FORMAT_VERSION = 1


class IsolationLevel(str, enum.Enum):
    """How concurrent runs of one key are isolated (Prefect's ``IsolationLevel``).

    ``READ_COMMITTED``: runs do not wait for each other; ``SERIALIZABLE``: one runs, the
    others wait for its result (a lock per key). Plain strings work too.
    """

    READ_COMMITTED = "READ_COMMITTED"
    SERIALIZABLE = "SERIALIZABLE"

    def __str__(self) -> str:
        return self.value


IsolationLevelName = Literal["READ_COMMITTED", "SERIALIZABLE"]
_ISOLATION_LEVELS = ("READ_COMMITTED", "SERIALIZABLE")
_LOCK_METHODS = ("acquire", "release", "renew", "holder_of")
_PREFECT_LOCK_METHODS = ("acquire_lock", "release_lock", "is_locked")


def isolation_level_name(value: object) -> IsolationLevelName:
    """``"READ_COMMITTED"`` or ``"SERIALIZABLE"`` from a string or :class:`IsolationLevel`."""
    name = value.value if isinstance(value, IsolationLevel) else value
    if name not in _ISOLATION_LEVELS:
        raise ConfigurationError(
            f"isolation_level must be one of {_ISOLATION_LEVELS} (or IsolationLevel.…), "
            f"got {value!r}"
        )
    return name  # type: ignore[return-value]


class _TaskLike(Protocol):
    @property
    def fn(self) -> Callable[..., Any]: ...
    @property
    def name(self) -> str: ...
    @property
    def identity(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class _FunctionAsTask:
    """A plain function seen as a task (a Prefect-style ``task_ctx.task`` may be one)."""

    fn: Callable[..., Any]

    @property
    def name(self) -> str:
        return str(getattr(self.fn, "__qualname__", getattr(self.fn, "__name__", "function")))

    @property
    def identity(self) -> str:
        return f"{getattr(self.fn, '__module__', None) or '__main__'}:{self.name}"


@dataclasses.dataclass(frozen=True)
class KeyContext:
    """What a policy sees when it computes a key: the task and its bound arguments.

    It is also the ``task_ctx`` a Prefect-style ``compute_key`` and a ``cache_key_fn``
    receive: ``.task`` and ``.parameters`` are there under Prefect's names.
    """

    task: _TaskLike | None
    arguments: Mapping[str, Any]
    run_id: str | None = None

    @property
    def parameters(self) -> dict[str, Any]:
        """The bound arguments (Prefect's ``TaskRunContext.parameters``)."""
        return dict(self.arguments)


def _key_context(task_ctx: Any, inputs: Mapping[str, Any] | None) -> KeyContext:
    """A :class:`KeyContext` from what a Prefect-style caller passes to ``compute_key``."""
    arguments = dict(inputs or {})
    if isinstance(task_ctx, KeyContext):
        return dataclasses.replace(task_ctx, arguments=arguments)
    task = getattr(task_ctx, "task", None) if task_ctx is not None else None
    if task is not None and not hasattr(task, "identity") and callable(task):
        task = _FunctionAsTask(getattr(task, "fn", task))
    run = getattr(task_ctx, "task_run", None)
    run_id = getattr(run, "id", None)
    return KeyContext(task, arguments, str(run_id) if run_id is not None else None)


def combine_components(namespace: str, components: Mapping[str, str]) -> str:
    """One key over the format version, the namespace and the sorted components."""
    h = xxhash.xxh3_128()
    h.update(f"notebook_flow-key-v{KEY_FORMAT_VERSION}\0{namespace}\0".encode())
    for label in sorted(components):
        h.update(label.encode())
        h.update(b"\0")
        h.update(components[label].encode())
        h.update(b"\0")
    return h.hexdigest()


def _hash_text(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode())


def _namespace_of(task: Any) -> str:
    if task is None:
        return ""
    return str(getattr(task, "cache_namespace", None) or getattr(task, "identity", ""))


def _storage_path(value: Any) -> Any:
    """``key_storage``/``result_storage`` given as a ``pathlib.Path`` means its path."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def check_lock_manager(lock_manager: object) -> None:
    """Raise ``ConfigurationError`` unless ``lock_manager`` speaks our protocol or Prefect's."""
    ours = all(hasattr(lock_manager, m) for m in _LOCK_METHODS)
    prefects = all(callable(getattr(lock_manager, m, None)) for m in _PREFECT_LOCK_METHODS)
    if not (ours or prefects):
        raise ConfigurationError(
            f"lock_manager {lock_manager!r} implements neither the LockManager protocol "
            "(acquire, release, renew, holder_of) nor Prefect's (acquire_lock, release_lock, "
            "is_locked); use MemoryLockManager, FileLockManager, RedisLockManager or "
            "PostgresLockManager"
        )


@dataclasses.dataclass
class CachePolicy:
    """Base of every policy (a dataclass, as in Prefect).

    Subclasses implement :meth:`compute_components` (named parts, for explanations) or,
    written for Prefect, :meth:`compute_key`. ``key_storage`` (a store URL, path or
    :class:`~notebook_flow.storage.ResultStore`) says where this policy's cache records
    live; ``lock_manager`` and ``isolation_level`` control exactly-once execution (setting
    a lock manager implies ``"SERIALIZABLE"``).

    >>> @dataclasses.dataclass
    ... class ByUser(CachePolicy):
    ...     def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
    ...         return str(inputs["user"])
    """

    key_storage: str | os.PathLike[str] | ResultStore | None = dataclasses.field(
        default=None, kw_only=True
    )
    isolation_level: IsolationLevelName | IsolationLevel | None = dataclasses.field(
        default=None, kw_only=True
    )
    lock_manager: Any = dataclasses.field(default=None, kw_only=True)

    @classmethod
    def from_cache_key_fn(
        cls, cache_key_fn: Callable[[KeyContext, dict[str, Any]], str | None]
    ) -> CacheKeyFnPolicy:
        """A policy from a Prefect-style ``cache_key_fn(context, parameters) -> str | None``.

        >>> by_user = CachePolicy.from_cache_key_fn(lambda ctx, args: str(args["user"]))
        """
        if not callable(cache_key_fn):
            raise ConfigurationError(f"from_cache_key_fn needs a callable, got {cache_key_fn!r}")
        try:
            inspect.signature(cache_key_fn).bind(None, {})
        except TypeError:
            raise ConfigurationError(
                f"cache key function {getattr(cache_key_fn, '__name__', cache_key_fn)!r} must "
                "accept two arguments (context, parameters)"
            ) from None
        except ValueError:  # builtins without a signature: trust the caller
            pass
        return CacheKeyFnPolicy(cache_key_fn=cache_key_fn)

    # -- computing keys ----------------------------------------------------------------------

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        """Named hashes of what the key depends on, or None to run uncached.

        A Prefect-style subclass that implements only :meth:`compute_key` gets one
        component, ``policy `<class>```, holding a hash of the string it returns.
        """
        if type(self).compute_key is CachePolicy.compute_key:
            raise NotImplementedError(
                f"{type(self).__name__} implements neither compute_components nor compute_key"
            )
        key = self.compute_key(task_ctx=ctx, inputs=dict(ctx.arguments), flow_parameters={})
        if key is None:
            return None
        if not isinstance(key, str):
            raise CacheKeyError(
                f"{type(self).__name__}.compute_key returned {type(key).__name__}; it must "
                "return a str (or None to run uncached)"
            )
        return {f"policy `{type(self).__qualname__}`": _hash_text(key)}

    def compute_key(
        self,
        task_ctx: Any,
        inputs: Mapping[str, Any] | None,
        flow_parameters: Mapping[str, Any] | None,
        **kwargs: Any,
    ) -> str | None:
        """The cache key for a call, or None when this policy does not cache (Prefect's
        signature; ``task_ctx`` may be None or anything with a ``.task``).

        >>> INPUTS.compute_key(task_ctx=None, inputs={"x": 1}, flow_parameters={})  # doctest: +SKIP
        '3f0c…'
        """
        if type(self).compute_components is CachePolicy.compute_components:
            raise NotImplementedError(
                f"{type(self).__name__} implements neither compute_components nor compute_key"
            )
        ctx = _key_context(task_ctx, inputs)
        components = self.compute_components(ctx)
        if components is None:
            return None
        return combine_components(_namespace_of(ctx.task), components)

    # -- configuration -----------------------------------------------------------------------

    def configure(
        self,
        key_storage: str | os.PathLike[str] | ResultStore | None = None,
        lock_manager: Any = None,
        isolation_level: IsolationLevelName | IsolationLevel | None = None,
    ) -> Any:
        """A copy with storage, lock manager or isolation level set (None keeps each).

        >>> INPUTS.configure(lock_manager=RedisLockManager(host="localhost"))  # doctest: +SKIP
        >>> INPUTS.configure(key_storage=Path("cache"))                       # doctest: +SKIP
        """
        changes: dict[str, Any] = {}
        if isolation_level is not None:
            changes["isolation_level"] = isolation_level_name(isolation_level)
        if lock_manager is not None:
            check_lock_manager(lock_manager)
            changes["lock_manager"] = lock_manager
            if isolation_level is None and self.isolation_level is None:
                changes["isolation_level"] = "SERIALIZABLE"
        if key_storage is not None:
            changes["key_storage"] = _storage_path(key_storage)
        new = copy.copy(self)
        for name, value in changes.items():
            object.__setattr__(new, name, value)
        return new

    # -- algebra -----------------------------------------------------------------------------

    def __add__(self, other: CachePolicy) -> CachePolicy:
        if not isinstance(other, CachePolicy):
            return NotImplemented
        if isinstance(other, _None):
            return self
        return CompoundCachePolicy(policies=[self, other], **_merge_settings(self, other))

    def __sub__(self, other: str) -> CachePolicy:
        """Drop an argument: a no-op for a policy that does not read inputs (as Prefect)."""
        if not isinstance(other, str):
            raise TypeError("Can only subtract strings (argument names) from cache policies.")
        return self


def _merge_settings(a: CachePolicy, b: CachePolicy) -> dict[str, Any]:
    """The settings of ``a + b``; Prefect's ValueError when both set one differently."""
    out: dict[str, Any] = {}
    for field, what in (
        ("key_storage", "storage locations"),
        ("isolation_level", "isolation levels"),
        ("lock_manager", "lock implementations"),
    ):
        va, vb = getattr(a, field), getattr(b, field)
        if va is not None and vb is not None and va != vb:
            raise ConfigurationError(
                f"Cannot add CachePolicies with different {what}. ({va!r} and {vb!r}): "
                f"configure {field} once, on the combined policy"
            )
        out[field] = va if va is not None else vb
    return out


@dataclasses.dataclass
class _None(CachePolicy):
    """Never caches: the task runs on every call (``NONE``, ``NO_CACHE``)."""

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        return None

    def __add__(self, other: CachePolicy) -> CachePolicy:
        if not isinstance(other, CachePolicy):
            return NotImplemented
        return other

    def __repr__(self) -> str:
        return "NONE"


_NoCache = _None  # the earlier name


@dataclasses.dataclass
class Inputs(CachePolicy):
    """Keys on the task's arguments (defaults applied), minus ``exclude`` (a list, as in
    Prefect).

    A call without arguments is keyed too (on no arguments): ``@task(cache_policy=INPUTS,
    cache_expiration=...)`` on a function without parameters reuses its result until it
    expires, as Prefect's "Don't replay. Resume." page describes (Prefect's ``Inputs``
    itself computes no key then, so the task would run every time).

    >>> (INPUTS - "verbose").exclude
    ['verbose']
    """

    exclude: list[str] = dataclasses.field(default_factory=list)

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        out: dict[str, str] = {}
        for name, value in ctx.arguments.items():
            if name in self.exclude:
                continue
            try:
                out[f"argument `{name}`"] = fingerprint(value)
            except UnhashableError as exc:
                task_name = ctx.task.name if ctx.task is not None else "?"
                where = f" (at `{name}{exc.path}`)" if exc.path else ""
                raise UnhashableInputError(
                    f"task `{task_name}`: argument `{name}`{where} of type "
                    f"{exc.type_name or type(value).__name__} has no stable fingerprint "
                    f"({getattr(exc, 'reason', None) or exc}). "
                    f"Fixes: leave it out of the key with `cache_policy=INPUTS - {name!r}` "
                    "(+ TASK_SOURCE), give the task a key function with "
                    "`CachePolicy.from_cache_key_fn(fn)`, or register a fingerprint for the "
                    "type with `notebook_flow.hashing.register_fingerprint(type, reducer)`",
                    argument=name,
                    path=exc.path,
                    type_name=exc.type_name,
                ) from exc
        return out

    def __sub__(self, other: str) -> CachePolicy:
        if not isinstance(other, str):
            raise TypeError("Can only subtract strings (argument names) from cache policies.")
        new = copy.copy(self)
        new.exclude = [*self.exclude, other] if other not in self.exclude else list(self.exclude)
        return new

    def __repr__(self) -> str:
        return "INPUTS" + "".join(f" - {n!r}" for n in sorted(self.exclude))


@dataclasses.dataclass
class TaskSource(CachePolicy):
    """Keys on the normalized source of the task and of the user code it calls, deeply.

    Comments, whitespace and docstrings don't count; a change to a helper two calls deep,
    a referenced global constant or a closure value does. Third-party packages count by
    version. (Prefect hashes the task's own lines only.)
    """

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        if ctx.task is None:
            return None
        return source_components(ctx.task.fn, label=f"source of task `{ctx.task.name}`")

    def __repr__(self) -> str:
        return "TASK_SOURCE"


@dataclasses.dataclass
class Files(CachePolicy):
    """Keys on the contents of files (paths or globs, relative to the working directory).

    >>> FILES("data/*.csv", "config.yaml")  # doctest: +SKIP
    """

    patterns: tuple[str, ...] = ()

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        out: dict[str, str] = {}
        for pattern in self.patterns:
            matches = (
                sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
            )
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                # Absence is a state too: the key changes when a file appears.
                out[f"files `{pattern}`"] = _hash_text("<no files>")
                continue
            for path in matches:
                out[f"file `{path}`"] = _file_digest(path)
        return out

    def __repr__(self) -> str:
        return f"FILES({', '.join(map(repr, self.patterns))})"


_file_digests: dict[str, tuple[tuple[int, int, int], str]] = {}


def _file_digest(path: str) -> str:
    """xxh3-128 of a file's bytes, memoized on (size, mtime_ns, inode)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CacheKeyError(f"FILES policy: cannot read {path!r}: {exc}") from exc
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    absolute = os.path.abspath(path)
    known = _file_digests.get(absolute)
    if known is not None and known[0] == stamp:
        return known[1]
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    _file_digests[absolute] = (stamp, digest)
    return digest


def FILES(*paths_or_globs: str | os.PathLike[str]) -> Files:
    """A policy keyed on the contents of the given files or glob patterns."""
    if not paths_or_globs:
        raise ConfigurationError("FILES() needs at least one path or glob pattern")
    return Files(patterns=tuple(os.fspath(p) for p in paths_or_globs))


@dataclasses.dataclass
class CacheKeyFnPolicy(CachePolicy):
    """Keys on whatever string a user function returns (None: run uncached).

    The function takes ``(context, parameters)`` as in Prefect: ``context.task`` is the
    task, ``parameters`` the bound arguments. The string is hashed into the key together
    with the task's namespace (see the README's "Coming from Prefect").
    """

    cache_key_fn: Callable[[KeyContext, dict[str, Any]], str | None] | None = None

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        if self.cache_key_fn is None:
            return None
        value = self.cache_key_fn(ctx, dict(ctx.arguments))
        if value is None:
            return None
        if not isinstance(value, str):
            raise CacheKeyError(
                f"cache key function {getattr(self.cache_key_fn, '__name__', '?')} returned "
                f"{type(value).__name__}; it must return a str (or None to skip caching)"
            )
        name = getattr(self.cache_key_fn, "__qualname__", "key_fn")
        return {f"key function `{name}`": _hash_text(value)}

    def __repr__(self) -> str:
        return f"CachePolicy.from_cache_key_fn({getattr(self.cache_key_fn, '__name__', '?')})"


@dataclasses.dataclass
class CompoundCachePolicy(CachePolicy):
    """Several policies at once; the key changes when any component does.

    Built by ``+`` or directly, it is flat (nested compounds are unpacked) and holds at
    most one :class:`Inputs`, whose exclusions are those of every ``Inputs`` given (as in
    Prefect). Settings (storage, lock manager, isolation level) left unset on the compound
    come from its parts; parts that disagree are an error.
    """

    policies: list[CachePolicy] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        flat: list[CachePolicy] = []
        for policy in self.policies:
            if not isinstance(policy, CachePolicy):
                raise ConfigurationError(
                    f"CompoundCachePolicy holds cache policies, got {policy!r}"
                )
            flat.extend(policy.policies if isinstance(policy, CompoundCachePolicy) else [policy])
        inputs = [p for p in flat if isinstance(p, Inputs)]
        if inputs:  # one Inputs, where the first was, excluding what any of them did
            excluded = sorted({name for p in inputs for name in p.exclude})
            merged = Inputs(exclude=excluded)
            for p in inputs:
                merged = _with_settings(merged, _merge_settings(merged, p))
            first = flat.index(inputs[0])
            flat = [p for p in flat if not isinstance(p, Inputs)]
            flat.insert(first, merged)
        self.policies = flat
        for part in flat:
            for field, value in _merge_settings(self, part).items():
                if getattr(self, field) is None and value is not None:
                    object.__setattr__(self, field, value)

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        out: dict[str, str] = {}
        any_key = False
        for policy in self.policies:
            part = policy.compute_components(ctx)
            if part is None:
                continue
            any_key = True
            for label, value in part.items():
                n = 2
                unique = label
                while unique in out:  # two custom policies of one class
                    unique = f"{label} #{n}"
                    n += 1
                out[unique] = value
        return out if any_key else None

    def __add__(self, other: CachePolicy) -> CachePolicy:
        if not isinstance(other, CachePolicy):
            return NotImplemented
        if isinstance(other, _None):
            return self
        settings = _merge_settings(self, other)
        return CompoundCachePolicy(policies=[*self.policies, other], **settings)

    def __sub__(self, other: str) -> CachePolicy:
        if not isinstance(other, str):
            raise TypeError("Can only subtract strings (argument names) from cache policies.")
        if not any(isinstance(p, Inputs) for p in self.policies):
            return self  # no dependency on inputs (as Prefect)
        policies = [p - other if isinstance(p, Inputs) else p for p in self.policies]
        new = copy.copy(self)
        new.policies = policies
        return new

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.policies)) or "CompoundCachePolicy()"


CompoundPolicy = CompoundCachePolicy  # the earlier name


def _with_settings(policy: Inputs, settings: Mapping[str, Any]) -> Inputs:
    new = copy.copy(policy)
    for name, value in settings.items():
        object.__setattr__(new, name, value)
    return new


@dataclasses.dataclass
class RunId(CachePolicy):
    """Keys on the run id of the call: a result is never reused by another call.

    Prefect's ``RUN_ID`` is the flow run's id (tasks of one flow run share it); without
    flows, each call is its own run here. Part of Prefect's ``DEFAULT``, not of ours.
    """

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        if ctx.run_id is None:
            return None
        return {"run id": _hash_text(ctx.run_id)}

    def __repr__(self) -> str:
        return "RUN_ID"


@dataclasses.dataclass
class FlowParameters(CachePolicy):
    """Prefect's ``FLOW_PARAMETERS``: there are no flows here, so it adds nothing."""

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        return None

    def __repr__(self) -> str:
        return "FLOW_PARAMETERS"


NONE: CachePolicy = _None()
NO_CACHE: CachePolicy = NONE
INPUTS = Inputs()
TASK_SOURCE = TaskSource()
RUN_ID = RunId()
FLOW_PARAMETERS = FlowParameters()
#: INPUTS + TASK_SOURCE: unlike Prefect's DEFAULT it has no RUN_ID, so it hits across
#: processes and kernel restarts.
DEFAULT: CachePolicy = INPUTS + TASK_SOURCE
