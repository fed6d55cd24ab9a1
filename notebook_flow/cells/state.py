"""Storing a cell's results so that identities survive, and restoring them in place.

A plain run leaves more than values behind: ``b = {"x": a}`` makes ``b["x"]`` *be* ``a``,
and ``a.append(2)`` changes the list every alias of ``a`` sees. A restored cell must leave
the same relations, so:

* :func:`pack` pickles all of a cell's outputs together (shared objects stay shared), and
  an object that existed before the cell ran and that it did not change (an input, or
  something inside one) is stored as a *reference* to where it lives (``("ns", "a")``,
  ``("ns", "data", ("k", "train"))``) rather than as a copy. The key fingerprints those
  inputs, so on a hit the same objects are there to point at again.
* :func:`unpack` resolves those references to the live objects.
* :func:`update_in_place` puts a stored value into the live object a cell changed (lists,
  dicts, sets, arrays of the same shape and dtype, plain objects' ``__dict__``, numpy
  generators), recursively, so aliases of it and of its parts stay aliases. Where that is
  not possible it returns the stored value to rebind.
"""

from __future__ import annotations

import io
import itertools
import pickle
import types
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["pack", "reference_map", "unpack", "update_in_place"]

_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_MAX_REFERENCED = 20_000  # objects looked into per cell (a bound on the walk's cost)
_MAX_DEPTH = 8
_MAX_ITEMS = 5_000  # items of one container


# --------------------------------------------------------------------------- references


def reference_map(roots: Iterable[tuple[tuple[Any, ...], Any]]) -> dict[int, tuple[Any, ...]]:
    """``{id(obj): path}`` for the objects reachable from ``roots`` (``(path, value)``
    pairs) through lists, tuples, dicts with str/int keys and plain objects' attributes."""
    refs: dict[int, tuple[Any, ...]] = {}
    budget = [_MAX_REFERENCED]
    for path, value in roots:
        _walk(value, path, refs, budget, 0)
    return refs


def _walk(
    obj: Any, path: tuple[Any, ...], refs: dict[int, tuple[Any, ...]], budget: list[int], depth: int
) -> None:
    if budget[0] <= 0 or type(obj) in _SCALARS or id(obj) in refs:
        return
    refs[id(obj)] = path
    budget[0] -= 1
    if depth >= _MAX_DEPTH:
        return
    t = type(obj)
    if t is list or t is tuple:
        for i, item in enumerate(itertools.islice(obj, _MAX_ITEMS)):
            _walk(item, (*path, ("i", i)), refs, budget, depth + 1)
    elif t is dict:
        for k, item in itertools.islice(obj.items(), _MAX_ITEMS):
            if type(k) in (str, int):
                _walk(item, (*path, ("k", k)), refs, budget, depth + 1)
    elif _plain_object(obj):
        for k, item in itertools.islice(vars(obj).items(), _MAX_ITEMS):
            if type(k) is str:
                _walk(item, (*path, ("a", k)), refs, budget, depth + 1)


def _plain_object(obj: Any) -> bool:
    """An instance of a Python class whose state is its ``__dict__`` (no custom pickling)."""
    t: Any = type(obj)
    if isinstance(obj, (type, types.ModuleType, types.FunctionType)) or t.__module__ == "builtins":
        return False
    base: Any = object
    d = getattr(obj, "__dict__", None)
    return (
        isinstance(d, dict)
        and t.__reduce_ex__ is base.__reduce_ex__
        and t.__reduce__ is base.__reduce__
        and getattr(t, "__getstate__", None) is getattr(base, "__getstate__", None)
        and getattr(t, "__setstate__", None) is None
    )


def resolve(path: tuple[Any, ...], roots: dict[str, Any]) -> Any:
    """The live object at ``path`` (``KeyError``/``IndexError``/``AttributeError`` if gone)."""
    obj = roots[path[0]]
    for kind, step in path[1:]:
        obj = obj[step] if kind in ("i", "k") else vars(obj)[step]
    return obj


# --------------------------------------------------------------------------- pickling


#: Arrays and DataFrames at least this big are stored in their own format (npy, Parquet:
#: memory-mapped on a hit from a local store), not inside the cell's pickle.
LARGE_BYTES = 1 << 20


def pack(value: Any, refs: dict[int, tuple[Any, ...]], large: list[Any] | None = None) -> bytes:
    """Pickle ``value`` (cloudpickle: functions and classes of the notebook by value), with
    the objects in ``refs`` stored as their paths and, when ``large`` is a list, big arrays
    and DataFrames appended to it and stored as their index there."""
    import cloudpickle

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        def persistent_id(self, obj: Any) -> Any:
            if type(obj) in _SCALARS:
                return None
            path = refs.get(id(obj))
            if path is not None:
                return ("ref", path)
            if large is not None and _large(obj):
                for i, seen in enumerate(large):
                    if seen is obj:
                        return ("large", i)
                large.append(obj)
                return ("large", len(large) - 1)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=5).dump(value)
    return buffer.getvalue()


def _large(obj: Any) -> bool:
    t = type(obj)
    if t.__name__ == "ndarray" and t.__module__ == "numpy":
        return bool(obj.nbytes >= LARGE_BYTES and not obj.dtype.hasobject)
    if t.__name__ == "DataFrame" and t.__module__.partition(".")[0] == "pandas":
        try:
            return bool(obj.memory_usage(index=True, deep=False).sum() >= LARGE_BYTES)
        except Exception:
            return False
    return False


def unpack(
    data: bytes, roots: dict[str, Any], load_large: Callable[[int], Any] | None = None
) -> Any:
    """Unpickle what :func:`pack` made, references resolved against ``roots`` and large
    values loaded with ``load_large(index)``.

    ``data`` comes from a verified store payload (never call this on anything else).
    """

    loaded: dict[int, Any] = {}  # each large value once: shared references stay shared

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            tag, where = pid
            if tag == "ref":
                return resolve(tuple(where), roots)
            if tag == "large" and load_large is not None:
                if int(where) not in loaded:
                    loaded[int(where)] = load_large(int(where))
                return loaded[int(where)]
            raise pickle.UnpicklingError(f"unknown reference {tag!r}")

    return Unpickler(io.BytesIO(data)).load()


# --------------------------------------------------------------------------- in place


def update_in_place(live: Any, stored: Any, memo: dict[int, Any] | None = None) -> Any:
    """Make ``live`` equal to ``stored`` without replacing it where its type allows.

    Returns the object to bind: ``live`` (updated) or ``stored`` (when ``live`` cannot take
    it: another type, an array of another shape). Parts are updated the same way, so an
    alias of ``live[0]`` sees the change too. ``memo`` maps ids of stored objects already
    placed to the object that now stands for them (shared parts stay shared).
    """
    memo = {} if memo is None else memo
    if id(stored) in memo:
        return memo[id(stored)]
    if live is stored or type(live) is not type(stored) or type(live) in _SCALARS:
        return stored
    memo[id(stored)] = live
    t = type(live)
    if t is list:
        merged = [update_in_place(a, b, memo) for a, b in zip(live, stored, strict=False)] + stored[
            len(live) :
        ]
        live[:] = merged
        return live
    if t is dict:
        for k in [k for k in live if k not in stored]:
            del live[k]
        for k, v in stored.items():
            live[k] = update_in_place(live[k], v, memo) if k in live else v
        return live
    if t is set:
        live.clear()
        live.update(stored)
        return live
    if _generator(live):
        live.bit_generator.state = stored.bit_generator.state
        return live
    if _random_state(live):
        live.set_state(stored.get_state())
        return live
    if _array(live):
        if live.shape == stored.shape and live.dtype == stored.dtype and live.flags.writeable:
            live[...] = stored
            return live
        memo[id(stored)] = stored
        return stored
    if _plain_object(live):
        state = vars(live)
        for k in [k for k in state if k not in vars(stored)]:
            del state[k]
        for k, v in vars(stored).items():
            state[k] = update_in_place(state[k], v, memo) if k in state else v
        return live
    memo[id(stored)] = stored
    return stored


def _is_numpy(obj: Any, name: str) -> bool:
    """``obj`` is an instance of numpy's class ``name`` (by name: never touches a numpy
    another thread may be importing)."""
    return any(
        c.__name__ == name and c.__module__.partition(".")[0] == "numpy" for c in type(obj).__mro__
    )


def _generator(obj: Any) -> bool:
    return _is_numpy(obj, "Generator")


def _random_state(obj: Any) -> bool:
    return _is_numpy(obj, "RandomState")


def _array(obj: Any) -> bool:
    t = type(obj)
    return t.__name__ == "ndarray" and t.__module__ == "numpy"
