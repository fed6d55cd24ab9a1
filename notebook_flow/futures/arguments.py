"""Argument markers (:class:`unmapped`, :class:`allow_failure`) and the futures among a
run's arguments: found (``collect_futures``) and replaced by their results
(``resolve_futures``).

Futures are looked for where Prefect's ``visit_collection`` looks: in lists, tuples, sets,
dict values, and the fields of dataclass instances and pydantic models (nested up to
``MAX_DEPTH`` levels, which also stops a cycle). A dataclass or model holding a future is
passed on as a copy with the results in its fields (its ``__init__`` is not run again);
one holding none is passed on as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from notebook_flow.errors import UpstreamFailedError

from .future import TaskFuture

T = TypeVar("T")


class unmapped(Generic[T]):
    """Pass a value unchanged to every run of ``task.map``.

    >>> clean.map(paths, unmapped(config))                  # doctest: +SKIP
    """

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"unmapped({self.value!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (unmapped, (self.value,))


class allow_failure(Generic[T]):
    """Run the downstream task even if this upstream future fails or is cancelled.

    The downstream receives the upstream's result, or its exception object if it failed.

    >>> report.submit(allow_failure(fetch.submit(url)))      # doctest: +SKIP
    """

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"allow_failure({self.value!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (allow_failure, (self.value,))


_CONTAINERS = (list, tuple, dict, set, frozenset)
_SCALARS = frozenset({int, float, str, bytes, bool, type(None), complex})
#: How deep nested containers, dataclasses and models are searched for futures.
MAX_DEPTH = 64


#: class → "dataclass", "pydantic" or None: decided once per class (a hot path: every
#: argument of every direct call is asked). Stable: a class's bases never change, and no
#: pydantic model exists before pydantic is imported.
_kinds: dict[type, str | None] = {}


def _record_kind(cls: type) -> str | None:
    kind = _kinds.get(cls, "")
    if kind != "":
        return kind
    if dataclasses.is_dataclass(cls):
        kind = "dataclass"
    else:
        pydantic = sys.modules.get("pydantic")
        is_model = pydantic is not None and issubclass(cls, pydantic.BaseModel)
        kind = "pydantic" if is_model else None
    if len(_kinds) < 4096:  # (classes made on the fly are not remembered forever)
        _kinds[cls] = kind
    return kind


def _record_fields(obj: Any) -> dict[str, Any] | None:
    """The fields of a dataclass instance or pydantic model by name; None for anything
    else."""
    cls = type(obj)
    kind = _record_kind(cls)
    if kind == "dataclass":
        return {
            f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if hasattr(obj, f.name)
        }
    if kind == "pydantic":
        names = list(cls.model_fields)
        names += [n for n in obj.model_fields_set if n not in cls.model_fields]  # extra="allow"
        return {name: getattr(obj, name) for name in names}
    return None


def _children(obj: Any) -> Iterable[Any] | None:
    """What to search inside ``obj`` for futures, or None when nothing."""
    if isinstance(obj, _CONTAINERS):
        return obj.values() if isinstance(obj, dict) else obj
    fields = _record_fields(obj)
    return None if fields is None else fields.values()


def collect_futures(obj: Any, out: dict[int, TaskFuture[Any]], depth: int = 0) -> None:
    """Add the futures found in ``obj`` (also inside lists, tuples, sets, dicts,
    dataclasses and pydantic models) to ``out``."""
    cls = type(obj)
    if cls is TaskFuture:
        out[id(obj)] = obj
    elif cls is allow_failure or cls is unmapped:
        collect_futures(obj.value, out, depth)
    elif _kinds.get(cls, "") is None:  # a class known to hold nothing
        return
    elif depth < MAX_DEPTH and (items := _children(obj)) is not None:
        for item in items:
            if type(item) in _SCALARS:
                continue
            collect_futures(item, out, depth + 1)


def resolve_futures(obj: Any, allowed: bool = False, depth: int = 0) -> Any:
    """``obj`` with every future replaced by its result (containers, dataclasses and
    models rebuilt as needed).

    A failed or cancelled upstream raises :class:`UpstreamFailedError` naming it, unless
    it is wrapped in :class:`allow_failure` (then its exception object is passed on).
    """
    cls = type(obj)
    if cls is TaskFuture:
        exc = obj._exc
        if exc is None:
            return obj.result()  # (a result left in the store is loaded here)
        if allowed:
            return exc
        raise UpstreamFailedError(
            f"upstream run {obj.run_id[:8]} of task `{obj.task.name}` "
            f"{obj._state.value.lower()}: {type(exc).__name__}: {exc}; wrap the future in "
            "allow_failure(...) to run anyway"
        ) from exc
    if cls is allow_failure:
        return resolve_futures(obj.value, True, depth)
    if cls is unmapped:  # a marker for .map; any other call gets the value (as Prefect)
        return resolve_futures(obj.value, allowed, depth)
    if depth >= MAX_DEPTH or cls in _SCALARS:
        return obj
    if isinstance(obj, _CONTAINERS):
        if isinstance(obj, dict):
            values = {k: resolve_futures(v, allowed, depth + 1) for k, v in obj.items()}
            if all(values[k] is v for k, v in obj.items()):
                return obj
            return _rebuild(obj, values)
        items = [resolve_futures(v, allowed, depth + 1) for v in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return _rebuild(obj, items)
    fields = _record_fields(obj)
    if fields is None:
        return obj
    changed = {}
    for name, value in fields.items():
        new = resolve_futures(value, allowed, depth + 1)
        if new is not value:
            changed[name] = new
    return _with_fields(obj, changed) if changed else obj


def _holds_markers(obj: Any, depth: int = 0) -> bool:
    """True if ``obj`` is or contains (in lists, tuples, sets, dict values, dataclass or
    model fields) a future or an argument marker. Cheap for the common case: scalars are
    skipped by exact type."""
    cls = type(obj)
    if cls is TaskFuture or cls is allow_failure or cls is unmapped:
        return True
    if _kinds.get(cls, "") is None:  # a class known to hold nothing (the common case)
        return False
    if depth < MAX_DEPTH and (items := _children(obj)) is not None:
        for item in items:
            if type(item) in _SCALARS:
                continue
            if _holds_markers(item, depth + 1):
                return True
    return False


class _DirectCallResolver:
    """Futures among the arguments of a direct call ``task(...)``, resolved as Prefect's
    ``resolve_inputs`` does: wait, then pass each future's result; a failed upstream raises
    :class:`UpstreamFailedError` unless wrapped in :class:`allow_failure`. Installed in
    ``notebook_flow._hooks`` when this package is imported (see there)."""

    def needs(self, args: tuple[Any, ...], kwargs: dict[str, Any], wait_for: Any) -> bool:
        if wait_for:
            return True
        for value in args:
            if type(value) not in _SCALARS and _holds_markers(value):
                return True
        for value in kwargs.values():
            if type(value) not in _SCALARS and _holds_markers(value):
                return True
        return False

    def resolve(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], wait_for: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        found: dict[int, TaskFuture[Any]] = {}
        for value in args:
            collect_futures(value, found)
        for value in kwargs.values():
            collect_futures(value, found)
        waits = list(wait_for) if wait_for else []
        collect_futures(waits, found)
        for fut in found.values():
            fut.wait()  # in a worker thread, a run nobody started yet runs inline
        if waits:
            resolve_futures(waits)  # raises for a failed upstream; the values are unused
        return (
            tuple(resolve_futures(a) for a in args),
            {k: resolve_futures(v) for k, v in kwargs.items()},
        )


def _with_fields(obj: Any, changed: dict[str, Any]) -> Any:
    """A copy of a dataclass instance or model with ``changed`` fields (validators and
    ``__post_init__`` not run again: the values are the upstream results, as Prefect
    passes them)."""
    if _record_kind(type(obj)) == "pydantic":
        return obj.model_copy(update=changed)
    new = copy.copy(obj)
    for name, value in changed.items():
        object.__setattr__(new, name, value)  # (a frozen dataclass too)
    return new


def _rebuild(original: Any, items: Any) -> Any:
    cls = type(original)
    if hasattr(original, "_fields"):  # namedtuple
        return cls(*items)
    try:
        return cls(items)
    except TypeError:  # a container subclass with another constructor: plain type
        for base in _CONTAINERS:
            if isinstance(original, base):
                return base(items)
        raise


# Pickles and fingerprints name the classes where they were first defined.
unmapped.__module__ = allow_failure.__module__ = "notebook_flow.futures"
