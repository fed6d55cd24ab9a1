"""Cache policies: how a task's cache key is computed.

A policy turns a call into named *components* (``"argument `df`"``, ``"source of helper
`clean`"`` …), each a 32-hex hash. The key is one hash over the components, the task's
namespace and :data:`KEY_FORMAT_VERSION`; the components are stored with the result so a
miss can be explained.

>>> from notebook_flow.cache_policies import INPUTS, TASK_SOURCE
>>> policy = INPUTS + TASK_SOURCE          # the default
>>> policy = INPUTS - "verbose"            # ignore one argument
>>> policy = INPUTS.configure(isolation_level="SERIALIZABLE")

Policies are small frozen objects; ``+`` composes, ``-`` drops arguments.
``NONE`` (alias ``NO_CACHE``) computes no key: the task runs every time. It is the
identity of ``+`` (``NONE + INPUTS == INPUTS``), as in Prefect.
"""

from __future__ import annotations

import dataclasses
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
    from .locks.base import LockManager
    from .storage import ResultStore

__all__ = [
    "DEFAULT",
    "FILES",
    "INPUTS",
    "KEY_FORMAT_VERSION",
    "NONE",
    "NO_CACHE",
    "TASK_SOURCE",
    "CacheKeyFnPolicy",
    "CachePolicy",
    "CompoundPolicy",
    "Files",
    "Inputs",
    "IsolationLevel",
    "KeyContext",
    "TaskSource",
    "combine_components",
]

#: Bumped on any change that alters keys for the same inputs; old entries then simply miss.
KEY_FORMAT_VERSION = 1

IsolationLevel = Literal["READ_COMMITTED", "SERIALIZABLE"]
_ISOLATION_LEVELS = ("READ_COMMITTED", "SERIALIZABLE")


class _TaskLike(Protocol):
    @property
    def fn(self) -> Callable[..., Any]: ...
    @property
    def name(self) -> str: ...
    @property
    def identity(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class KeyContext:
    """What a policy sees when it computes a key: the task and its bound arguments."""

    task: _TaskLike
    arguments: Mapping[str, Any]


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


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """Base of every policy. Subclasses implement :meth:`compute_components`.

    ``key_storage`` (a store URL or :class:`~notebook_flow.storage.ResultStore`) says where
    this policy's cache records live; ``lock_manager`` and ``isolation_level`` control
    exactly-once execution (setting a lock manager implies ``"SERIALIZABLE"``).
    """

    key_storage: str | ResultStore | None = dataclasses.field(default=None, kw_only=True)
    lock_manager: LockManager | None = dataclasses.field(default=None, kw_only=True)
    isolation_level: IsolationLevel | None = dataclasses.field(default=None, kw_only=True)

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        """Named hashes of what the key depends on, or None to run uncached."""
        raise NotImplementedError

    def compute_key(self, ctx: KeyContext, namespace: str | None = None) -> str | None:
        """The cache key for a call, or None when this policy does not cache.

        >>> INPUTS.compute_key(KeyContext(task, {"x": 1}))  # doctest: +SKIP
        '3f0c…'
        """
        components = self.compute_components(ctx)
        if components is None:
            return None
        return combine_components(namespace or ctx.task.identity, components)

    def configure(
        self,
        *,
        key_storage: str | ResultStore | None = None,
        lock_manager: LockManager | None = None,
        isolation_level: IsolationLevel | None = None,
    ) -> CachePolicy:
        """A copy with storage, lock manager or isolation level set.

        >>> INPUTS.configure(lock_manager=RedisLockManager(host="localhost"))  # doctest: +SKIP
        """
        if isolation_level is not None and isolation_level not in _ISOLATION_LEVELS:
            raise ConfigurationError(
                f"isolation_level must be one of {_ISOLATION_LEVELS}, got {isolation_level!r}"
            )
        if lock_manager is not None and not all(
            hasattr(lock_manager, m) for m in ("acquire", "release", "renew", "holder_of")
        ):
            raise ConfigurationError(
                f"lock_manager {lock_manager!r} does not implement the LockManager protocol "
                "(acquire, release, renew, is_locked, holder_of); use MemoryLockManager, "
                "FileLockManager, RedisLockManager or PostgresLockManager"
            )
        changes: dict[str, Any] = {}
        if key_storage is not None:
            changes["key_storage"] = key_storage
        if lock_manager is not None:
            changes["lock_manager"] = lock_manager
            if isolation_level is None and self.isolation_level is None:
                changes["isolation_level"] = "SERIALIZABLE"
        if isolation_level is not None:
            changes["isolation_level"] = isolation_level
        return dataclasses.replace(self, **changes)

    def _settings_of(self) -> dict[str, Any]:
        return {
            "key_storage": self.key_storage,
            "lock_manager": self.lock_manager,
            "isolation_level": self.isolation_level,
        }

    def __add__(self, other: CachePolicy) -> CachePolicy:
        if not isinstance(other, CachePolicy):
            return NotImplemented
        if isinstance(other, _NoCache):
            return self
        if isinstance(self, _NoCache):
            return other
        left = self.policies if isinstance(self, CompoundPolicy) else (self,)
        right = other.policies if isinstance(other, CompoundPolicy) else (other,)
        merged = _merge_settings(self, other)
        return CompoundPolicy(tuple(left) + tuple(right), **merged)

    def __sub__(self, name: str) -> CachePolicy:
        if not isinstance(name, str):
            return NotImplemented
        raise ConfigurationError(
            f"`{type(self).__name__} - {name!r}`: only INPUTS (or a policy containing it) "
            "can drop arguments"
        )


def _merge_settings(a: CachePolicy, b: CachePolicy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in ("key_storage", "lock_manager", "isolation_level"):
        va, vb = getattr(a, field), getattr(b, field)
        if va is not None and vb is not None and va != vb:
            raise ConfigurationError(
                f"cannot combine policies with different {field} ({va!r} and {vb!r}); "
                "configure it once on the combined policy"
            )
        out[field] = va if va is not None else vb
    return out


@dataclasses.dataclass(frozen=True)
class _NoCache(CachePolicy):
    """Never caches: the task runs on every call."""

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        return None

    def __repr__(self) -> str:
        return "NONE"


@dataclasses.dataclass(frozen=True)
class Inputs(CachePolicy):
    """Keys on the task's arguments (defaults applied), minus ``exclude``.

    >>> (INPUTS - "verbose").exclude
    frozenset({'verbose'})
    """

    exclude: frozenset[str] = frozenset()

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        out: dict[str, str] = {}
        for name, value in ctx.arguments.items():
            if name in self.exclude:
                continue
            try:
                out[f"argument `{name}`"] = fingerprint(value)
            except UnhashableError as exc:
                where = f" (at `{name}{exc.path}`)" if exc.path else ""
                raise UnhashableInputError(
                    f"task `{ctx.task.name}`: argument `{name}`{where} of type "
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

    def __sub__(self, name: str) -> CachePolicy:
        if not isinstance(name, str):
            return NotImplemented
        return dataclasses.replace(self, exclude=self.exclude | {name})

    def __repr__(self) -> str:
        return "INPUTS" + "".join(f" - {n!r}" for n in sorted(self.exclude))


@dataclasses.dataclass(frozen=True)
class TaskSource(CachePolicy):
    """Keys on the normalized source of the task and of the user code it calls, deeply.

    Comments, whitespace and docstrings don't count; a change to a helper two calls deep,
    a referenced global constant or a closure value does. Third-party packages count by
    version.
    """

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        return source_components(ctx.task.fn, label=f"source of task `{ctx.task.name}`")

    def __repr__(self) -> str:
        return "TASK_SOURCE"


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
class CacheKeyFnPolicy(CachePolicy):
    """Keys on whatever string a user function returns (None: run uncached).

    The function takes ``(context, parameters)`` as in Prefect: ``context.task`` is the
    task, ``parameters`` the bound arguments.
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


def _from_cache_key_fn(
    fn: Callable[[KeyContext, dict[str, Any]], str | None],
) -> CacheKeyFnPolicy:
    """A policy from a Prefect-style ``cache_key_fn(context, parameters) -> str | None``."""
    if not callable(fn):
        raise ConfigurationError(f"from_cache_key_fn needs a callable, got {fn!r}")
    try:
        inspect.signature(fn).bind(None, {})
    except TypeError:
        raise ConfigurationError(
            f"cache key function {getattr(fn, '__name__', fn)!r} must accept two arguments "
            "(context, parameters)"
        ) from None
    except ValueError:  # builtins without a signature: trust the caller
        pass
    return CacheKeyFnPolicy(cache_key_fn=fn)


CachePolicy.from_cache_key_fn = staticmethod(_from_cache_key_fn)  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class CompoundPolicy(CachePolicy):
    """Several policies at once; the key changes when any component does."""

    policies: tuple[CachePolicy, ...] = ()

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        out: dict[str, str] = {}
        any_key = False
        for policy in self.policies:
            part = policy.compute_components(ctx)
            if part is None:
                continue
            any_key = True
            out.update(part)
        return out if any_key else None

    def __sub__(self, name: str) -> CachePolicy:
        if not isinstance(name, str):
            return NotImplemented
        if not any(isinstance(p, Inputs) for p in self.policies):
            return super().__sub__(name)
        policies = tuple(p - name if isinstance(p, Inputs) else p for p in self.policies)
        return dataclasses.replace(self, policies=policies)

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.policies))


NONE: CachePolicy = _NoCache()
NO_CACHE: CachePolicy = NONE
INPUTS = Inputs()
TASK_SOURCE = TaskSource()
DEFAULT: CachePolicy = INPUTS + TASK_SOURCE
