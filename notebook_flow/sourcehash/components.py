"""The public entry points: ``source_components`` and ``function_fingerprint``.

Each root function's result is kept (:data:`_RESULTS`) with the guards of its
:class:`~.walk._Entry`; a call re-checks them and walks again (:func:`_compute`) only when
one fails.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

from notebook_flow._codehash import (
    IdMap,
    display_name,
    function_kind,
    function_source,
    hash_parts,
    module_kind,
    type_name,
)

from .classes import _busy, _FunctionType, class_fingerprint
from .walk import _Entry, _getattr, _is_task, _safe_fingerprint, _Walk

_RESULTS = IdMap()


def _root(fn: Any) -> Any:
    """The plain function behind a Task, partial, bound method or wrapper."""
    for _ in range(50):
        if type(fn) is _FunctionType:
            return fn
        if _is_task(fn):
            fn = fn.fn
        elif isinstance(fn, (types.MethodType, staticmethod, classmethod)):
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            fn = fn.func
        elif _getattr(fn, "__wrapped__") is not None:
            fn = fn.__wrapped__
        else:
            break
    return fn


_RESULT_DATA = _RESULTS.data


def _entry(fn: Any) -> _Entry:
    root = fn if type(fn) is _FunctionType else _root(fn)
    cached = _RESULT_DATA.get(id(root))
    if cached is not None and cached[0]() is root:
        entry: _Entry = cached[1]
        if not entry.rehashes:
            if entry.valid():
                return entry
        else:
            active: set[int] = _busy.__dict__.setdefault("roots", set())
            if id(root) not in active:  # see _compute
                active.add(id(root))
                try:
                    if entry.valid():
                        return entry
                finally:
                    active.discard(id(root))
    return _compute(root)


def _compute(root: Any) -> _Entry:
    entry = _Entry()
    entry.name = f"source of task `{display_name(root)}`"
    active: set[int] = _busy.__dict__.setdefault("roots", set())
    if type(root) is not _FunctionType or function_kind(root) != "user":
        _compute_other(entry, root)  # not cached: cheap, and rare as a task
        return entry
    if id(root) in active:
        # Re-entered while hashing one of our own globals (a dict holding this very
        # function, say): the shallow source breaks the cycle, deterministically.
        entry.root = function_source(root)
        return entry
    active.add(id(root))
    try:
        _Walk(entry, root.__globals__).function(root, root=True)
    finally:
        active.discard(id(root))
    entry.seal()
    _RESULTS.set(root, entry)
    return entry


def _compute_other(entry: _Entry, root: Any) -> None:
    """Roots that are not user functions: classes, callable instances, library callables."""
    walk = _Walk(entry, {})
    if isinstance(root, type):
        entry.root = class_fingerprint(root)
        walk.klass(root)
        return
    kind = module_kind(getattr(root, "__module__", None) or type(root).__module__)
    if kind == "user":
        entry.root = _safe_fingerprint(root) or hash_parts("unhashable", type_name(root))
        walk.klass(type(root))
    else:
        entry.root = hash_parts("callable", type_name(root), display_name(root))
        walk.code(root, "", ())


def source_components(fn: Callable[..., Any], *, label: str | None = None) -> dict[str, str]:
    """The deep TASK_SOURCE of ``fn`` as ``{human label: 32-hex hash}``.

    ``label`` names the root component: a name (``"load"`` gives "source of task
    `load`") or a full label (anything containing a backtick is used verbatim).
    Deterministic across processes; a repeated call for an unchanged function costs a few
    microseconds (plus re-hashing any mutable globals it reads).

    >>> THRESHOLD = 3
    >>> def f(x):
    ...     return x > THRESHOLD
    >>> sorted(source_components(f))  # doctest: +SKIP
    ['global `THRESHOLD`', 'source of task `f`']
    """
    entry = _entry(fn)
    last = entry.output
    if last is not None and last[0] == label:
        return last[1].copy()
    if label is None:
        root_label = entry.name
    else:
        root_label = label if "`" in label else f"source of task `{label}`"
    out = {root_label: entry.root}
    out.update(entry.result)
    entry.output = (label, out)
    return out.copy()


def function_fingerprint(fn: Callable[..., Any]) -> str:
    """One hash over :func:`source_components` of ``fn`` (labels included).

    >>> def f(x):
    ...     return x + 1
    >>> len(function_fingerprint(f))
    32
    """
    entry = _entry(fn)
    if entry.fingerprint is None:
        parts = sorted(entry.result.items())
        entry.fingerprint = hash_parts(entry.name, entry.root, *(f"{k}={v}" for k, v in parts))
    return entry.fingerprint
