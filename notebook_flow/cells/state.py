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
import random
import time
import types
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "OverBudget",
    "add_data_owner_refs",
    "kept_paths",
    "pack",
    "reference_map",
    "relink",
    "unpack",
    "update_in_place",
    "walk",
]

_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_MAX_REFERENCED = 20_000  # objects looked into per cell (a bound on the walk's cost)
_MAX_DEPTH = 8
_MAX_ITEMS = 5_000  # items of one container
_CHECK_EVERY = 255  # objects (mask) between two looks at the clock against a deadline


class OverBudget(Exception):
    """Storing a cell's state is taking longer than a cell of its duration is worth (under
    ``%flow auto``): it is not stored; the cell ran plain."""


def check_deadline(deadline: float | None) -> None:
    """Raise :class:`OverBudget` once ``time.perf_counter()`` is past ``deadline``."""
    if deadline is not None and time.perf_counter() > deadline:
        raise OverBudget


# --------------------------------------------------------------------------- references

# (root, ("i", index) | ("k", key) | ("a", attribute) | ("p", "index" | "columns"), ...)
Path = tuple[Any, ...]


def walk(roots: Iterable[tuple[Path, Any]], deadline: float | None = None) -> dict[Path, Any]:
    """``{path: object}`` for the objects reachable from ``roots`` (``(path, value)`` pairs)
    through lists, tuples, dicts with str/int keys, objects' ``__dict__`` and pandas axes
    (each object at the first path met; scalars left out). Bounded: a cell's inputs may be
    huge. Raises :class:`OverBudget` once past ``deadline`` (a ``perf_counter`` time)."""
    found: dict[Path, Any] = {}
    seen: set[int] = set()
    budget = _MAX_REFERENCED

    def visit(obj: Any, path: Path, depth: int) -> None:
        nonlocal budget
        if budget <= 0 or type(obj) in _SCALARS or id(obj) in seen:
            return
        seen.add(id(obj))
        found[path] = obj
        budget -= 1
        if not budget & _CHECK_EVERY:
            check_deadline(deadline)
        if depth < _MAX_DEPTH:
            for step, item in _children(obj):
                visit(item, (*path, step), depth + 1)

    for path, value in roots:
        visit(value, path, 0)
    return found


def reference_map(
    roots: Iterable[tuple[Path, Any]] | dict[Path, Any],
) -> dict[int, tuple[str, Path]]:
    """``{id(obj): reference}`` for the objects of :func:`walk` (they stay alive in the
    roots; ``roots`` may be what ``walk`` returned): ``("ref", path)``, and ``("typeof",
    path)`` for the class of such an object when the class would otherwise be pickled by
    value (a class defined in the notebook): an object restored in place must keep the very
    class the live one has."""
    refs: dict[int, tuple[str, Path]] = {}
    for path, obj in (roots if isinstance(roots, dict) else walk(roots)).items():
        refs[id(obj)] = ("ref", path)
        cls = type(obj)
        if cls.__module__ == "__main__" and id(cls) not in refs:
            refs[id(cls)] = ("typeof", path)
    return refs


def add_data_owner_refs(found: dict[Path, Any], refs: dict[int, tuple[str, Path]]) -> None:
    """Add to ``refs`` the arrays holding the data of the pandas objects in ``found``
    (:func:`walk`): an output array over that memory (the `np.asarray(frame)` a statsmodels
    model keeps next to the frame itself) is then stored as a view of the live input's
    array, as it was one in the run. Each reference carries the array's shape, dtype and
    content digest: a hit whose input is laid out otherwise (other blocks) cannot find it,
    and recomputes. (Hashes the inputs' bytes: called only when an output shares them.)"""
    for path, obj in found.items():
        if type(obj).__module__.partition(".")[0] == "pandas" and _pandas_object(obj):
            for i, owner in enumerate(_data_owners(obj)):
                if id(owner) not in refs and owner.nbytes <= _GUARDED_BYTES:
                    refs[id(owner)] = ("ref", (*path, ("o", (i, _guard(owner)))))


#: Input arrays at most this big are referenced by their place in a frame (a digest of
#: their bytes is computed when storing and on a hit: xxh3, a few ms for this size).
_GUARDED_BYTES = 64 << 20


def _data_owners(obj: Any) -> list[Any]:
    """The numpy arrays owning the memory of a pandas object's data, in block order."""
    out: list[Any] = []
    try:
        arrays = list(obj._mgr.arrays)
    except Exception:
        return out
    for array in arrays:
        if not _array(array) or array.dtype.hasobject:
            continue
        while _array(array.base):
            array = array.base
        if not any(array is seen for seen in out):
            out.append(array)
    return out


def _guard(array: Any) -> tuple[Any, ...]:
    import numpy as np  # (an array: imported already)
    import xxhash

    raw: Any = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return (array.shape, array.dtype.str, xxhash.xxh3_128_hexdigest(raw))


def _children(obj: Any) -> Iterable[tuple[tuple[str, Any], Any]]:
    t = type(obj)
    if t is list or t is tuple:
        return ((("i", i), v) for i, v in enumerate(itertools.islice(obj, _MAX_ITEMS)))
    if t is dict:
        items = itertools.islice(obj.items(), _MAX_ITEMS)
        return ((("k", k), v) for k, v in items if type(k) in (str, int))
    axes: Iterable[tuple[tuple[str, Any], Any]] = ()
    skip: frozenset[str] = frozenset()
    if t.__module__.partition(".")[0] == "pandas" and _pandas_object(obj):
        # A frame built from a series shares its index object: `pop.index.names = [...]`
        # renames both. Its axes are parts, so an output sharing them points at them.
        axes = [(("p", axis), getattr(obj, axis)) for axis in _AXES if hasattr(obj, axis)]
        skip = _PANDAS_CACHES
    if _state_object(obj):
        items = itertools.islice(vars(obj).items(), _MAX_ITEMS)
        return itertools.chain(
            axes, ((("a", k), v) for k, v in items if type(k) is str and k not in skip)
        )
    return axes


_AXES = ("index", "columns")
#: What pandas (before 3) keeps on a frame or series besides its data: the columns handed
#: out (`_item_cache`, views of the frame's blocks), and links back to the frame a series
#: came from. Never pickled, rebuilt on use, reset by unpickling: not state, and a view
#: held only there is no second object a restore could split from the frame.
_PANDAS_CACHES = frozenset({"_item_cache", "_cacher", "_is_copy"})


def kept_paths(before: dict[Path, Any], root: Path, value: Any) -> set[Path]:
    """The paths under ``root`` whose object in ``value`` now is the object ``before`` had
    there: the parts a cell changed in place rather than replaced."""
    after = walk([(root, value)])
    return {path for path, obj in after.items() if before.get(path) is obj}


def _state_object(obj: Any) -> bool:
    """An instance of a Python class whose state is its ``__dict__``: no ``__slots__``, no
    custom ``__reduce__`` (a custom ``__getstate__``/``__setstate__`` is fine: restoring
    copies the ``__dict__`` of the unpickled object)."""
    t: Any = type(obj)
    if isinstance(obj, (type, types.ModuleType, types.FunctionType)) or t.__module__ == "builtins":
        return False
    base: Any = object
    if not isinstance(getattr(obj, "__dict__", None), dict):
        return False
    if t.__reduce_ex__ is not base.__reduce_ex__ or t.__reduce__ is not base.__reduce__:
        return False
    return not any("__slots__" in vars(c) for c in t.__mro__[:-1])


def resolve(path: tuple[Any, ...], roots: dict[str, Any]) -> Any:
    """The live object at ``path`` (``KeyError``/``IndexError``/``AttributeError`` if gone)."""
    obj = roots[path[0]]
    for kind, step in path[1:]:
        if kind == "p":  # a pandas axis
            if step not in _AXES or not _pandas_object(obj):
                raise KeyError(f"no axis {step!r} to point at")
            obj = getattr(obj, step)
        elif kind == "o":  # the array owning the memory of a pandas object's data
            index, guard = step
            owners = _data_owners(obj) if _pandas_object(obj) else []
            if index >= len(owners) or _guard(owners[index]) != tuple(guard):
                raise KeyError("the input's data is laid out otherwise than when stored")
            obj = owners[index]
        else:
            obj = obj[step] if kind in ("i", "k") else vars(obj)[step]
    return obj


# --------------------------------------------------------------------------- pickling


#: Arrays and DataFrames at least this big are stored in their own format (npy, Parquet:
#: memory-mapped on a hit from a local store), not inside the cell's pickle.
LARGE_BYTES = 1 << 20


def pack(
    value: Any,
    refs: dict[int, tuple[str, Path]],
    large: list[Any] | None = None,
    bases: Iterable[Any] = (),
    deadline: float | None = None,
) -> bytes:
    """Pickle ``value`` (cloudpickle: functions and classes of the notebook by value), with
    the objects in ``refs`` stored as their paths and, when ``large`` is a list, big arrays
    and DataFrames appended to it and stored as their index there.

    An array that is a view of another (``b = a[1:]``) is stored as a view of it when that
    array is stored too or referenced (in ``bases`` or ``refs``), or small: after a load,
    a write to ``a`` shows in ``b`` as it did before.

    Raises :class:`OverBudget` once past ``deadline`` (a ``perf_counter`` time).
    """
    from notebook_flow.serializers import cloudpickler

    keep = {id(b) for b in bases} | set(refs)
    counter = itertools.count(1)

    # (numpy's global RandomState by reference: see serializers.cloudpickler)
    class Pickler(cloudpickler()):  # type: ignore[misc]
        def persistent_id(self, obj: Any) -> Any:
            if deadline is not None and not next(counter) & _CHECK_EVERY:
                check_deadline(deadline)  # (scalars counted: a list of 10**7 ints is slow too)
            if type(obj) in _SCALARS:
                return None
            ref = refs.get(id(obj))
            if ref is not None:
                return ref
            if large is not None and _view_of(obj, keep) is None and _large(obj):
                for i, seen in enumerate(large):
                    if seen is obj:
                        return ("large", i)
                large.append(obj)
                return ("large", len(large) - 1)
            return None

        def reducer_override(self, obj: Any) -> Any:
            if _array(obj):
                reduced = _view_of(obj, keep) or _owner(obj)
                if reduced is not None:
                    return reduced
            return super().reducer_override(obj)

    buffer = io.BytesIO()
    Pickler(buffer, protocol=5).dump(value)
    return buffer.getvalue()


#: A view of an array stored nowhere else is stored with that array when the array is at
#: most this much bigger than the view (beyond it, a copy of the view is cheaper to keep).
_VIEW_SLACK = 1 << 16


def _view_of(obj: Any, keep: set[int]) -> tuple[Any, tuple[Any, ...]] | None:
    """The reduction of ``obj`` as a view of the array that owns its memory, or None (not
    an array view, or one to store as a copy)."""
    if not _array(obj):
        return None
    base = obj.base
    if not _array(base) or obj.dtype.hasobject:
        return None
    while _array(base.base):  # the array owning the memory (numpy mostly points there)
        base = base.base
    if id(base) not in keep and base.nbytes > 2 * obj.nbytes + _VIEW_SLACK:
        return None
    offset = obj.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    args = (base, (obj.shape, obj.dtype, offset, obj.strides, bool(obj.flags.writeable)))
    try:
        view_from(*args)  # checked now: a view that cannot be rebuilt is stored as a copy
    except (TypeError, ValueError):
        return None
    return view_from, args


def _owner(obj: Any) -> tuple[Any, tuple[Any, ...]] | None:
    """The reduction of an array that owns its memory as one that will own it again
    (numpy's own pickle loads a view of the pickle's buffer): ``a[1:].base is a`` and
    ``a.resize(...)`` behave after a load as before."""
    if obj.base is not None or obj.dtype.hasobject or obj.nbytes >= LARGE_BYTES:
        return None
    order = "F" if obj.flags.f_contiguous and not obj.flags.c_contiguous else "C"
    return owned_array, (obj.tobytes(order=order), obj.dtype, obj.shape, order)


def owned_array(data: bytes, dtype: Any, shape: Any, order: Any) -> Any:
    """An array that owns a copy of ``data`` (see :func:`_owner`)."""
    import numpy as np  # the dtype was unpickled: imported already

    out = np.empty(shape, dtype, order=order)
    out.reshape(-1, order="A")[...] = np.frombuffer(data, dtype)
    return out


def view_from(base: Any, layout: tuple[Any, Any, int, Any, bool]) -> Any:
    """The view ``_view_of`` stored: an array over ``base``'s memory with ``layout`` (shape,
    dtype, offset, strides: numpy checks the bounds), read-only when the original was."""
    import numpy as np  # the base is an array: imported already

    shape, dtype, offset, strides, writeable = layout

    view = np.ndarray(shape, dtype, buffer=base, offset=offset, strides=strides)
    if not writeable:
        view.flags.writeable = False
    return view


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
            if tag == "typeof":
                return type(resolve(tuple(where), roots))
            if tag == "large" and load_large is not None:
                if int(where) not in loaded:
                    loaded[int(where)] = load_large(int(where))
                return loaded[int(where)]
            raise pickle.UnpicklingError(f"unknown reference {tag!r}")

    return Unpickler(io.BytesIO(data)).load()


# --------------------------------------------------------------------------- in place


def update_in_place(
    live: Any,
    stored: Any,
    memo: dict[int, Any],
    kept: set[Path] | None = None,
    path: Path = (),
    *,
    kept_stored: set[int] | None = None,
) -> Any:
    """Make ``live`` equal to ``stored`` without replacing it where its type allows.

    Returns the object to bind: ``live`` (updated) or ``stored`` (when ``live`` cannot take
    it: another type, an array of another shape). A part is updated in place too when its
    path (under ``path``) is in ``kept`` (the cell changed that part in place: an alias of
    it must see the change), else replaced (the cell replaced it: an alias keeps the old
    one). ``kept=None`` updates every part in place. ``memo`` maps ids of stored objects
    already placed to the object now standing for them (shared parts stay shared).

    ``kept`` names each object by the first path a walk met it at; an object kept there is
    kept wherever else it is reached (``results.data`` is ``results.model.data``: a hit
    that replaced it at the second path split one object in two). ``kept_stored``, the ids
    of the stored objects at kept paths, is worked out on the first call.
    """
    if id(stored) in memo:
        return memo[id(stored)]
    if live is stored or type(live) is not type(stored) or type(live) in _SCALARS:
        return stored
    if kept is not None and kept_stored is None:
        found = walk([(path, stored)])
        kept_stored = {id(found[p]) for p in kept if p in found}
    memo[id(stored)] = live

    def part(live_part: Any, stored_part: Any, step: tuple[str, Any]) -> Any:
        sub = (*path, step)
        if kept is None or sub in kept or id(stored_part) in (kept_stored or ()):
            return update_in_place(live_part, stored_part, memo, kept, sub, kept_stored=kept_stored)
        return stored_part

    t = type(live)
    if t is list:
        merged = [part(a, b, ("i", i)) for i, (a, b) in enumerate(zip(live, stored, strict=False))]
        live[:] = merged + stored[len(live) :]
        return live
    if t is dict:
        _update_mapping(live, stored, part, "k")
        return live
    # A tuple is immutable: the live one stays only if each item came back as itself.
    if t is tuple and len(live) == len(stored):
        items = [part(a, b, ("i", i)) for i, (a, b) in enumerate(zip(live, stored, strict=True))]
        if all(a is b for a, b in zip(items, live, strict=True)):
            return live
        memo[id(stored)] = rebuilt = tuple(items)
        return rebuilt
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
    if _is_numpy(live, "BitGenerator"):
        live.state = stored.state
        return live
    if isinstance(live, random.Random):
        live.setstate(stored.getstate())
        return live
    if _array(live):
        if live.shape == stored.shape and live.dtype == stored.dtype and live.flags.writeable:
            live[...] = stored
            return live
    elif _pandas_object(live):
        try:
            for axis in _AXES:
                sub = (*path, ("p", axis))
                if hasattr(live, axis) and (kept is None or sub in kept):
                    # The cell renamed an axis in place (`pop.index.names = [...]`): other
                    # objects built on that index object (`DataFrame({"total": pop})`) see
                    # the new names in a plain run, so the live index takes them too, and
                    # stays the object the restored one stands on.
                    placed = _update_axis(getattr(live, axis), getattr(stored, axis), memo)
                    if placed is not getattr(stored, axis):
                        setattr(stored, axis, placed)
            live._update_inplace(stored)  # what pandas' own inplace=True operations do
            live.attrs = stored.attrs
            return live
        except Exception:  # another pandas version: rebind
            pass
    elif _state_object(live):
        _update_mapping(vars(live), vars(stored), part, "a")
        return live
    memo[id(stored)] = stored
    return stored


def _update_axis(live: Any, stored: Any, memo: dict[int, Any]) -> Any:
    """The live pandas index with the names of ``stored`` when it holds the same labels
    (an index's labels cannot change in place; its names can), else ``stored``."""
    if id(stored) in memo:
        return memo[id(stored)]
    if live is stored or type(live) is not type(stored):
        return stored
    try:
        same = live.dtype == stored.dtype and len(live) == len(stored) and live.equals(stored)
        levels = getattr(live, "levels", None)
        if same and levels is not None:  # a MultiIndex: equal tuples over other level types
            same = [x.dtype for x in levels] == [x.dtype for x in stored.levels]
        if not same:
            return stored
        if list(live.names) != list(stored.names):
            live.names = list(stored.names)
    except Exception:  # another pandas version, an index type that refuses: rebind
        return stored
    memo[id(stored)] = live
    return live


def _update_mapping(
    live: dict[Any, Any], stored: dict[Any, Any], part: Callable[..., Any], kind: str
) -> None:
    for k in [k for k in live if k not in stored]:
        del live[k]
    for k, v in stored.items():
        live[k] = part(live[k], v, (kind, k)) if k in live else v


def relink(value: Any, memo: dict[int, Any]) -> Any:
    """``value`` with every stored object that :func:`update_in_place` put into a live one
    replaced by that live one (``c = [a]`` after ``a`` was restored in place: ``c[0] is a``)."""
    swaps = {k: v for k, v in memo.items() if id(v) != k}
    if not swaps:
        return value
    return _relink(value, swaps, set(), [_MAX_REFERENCED])


def _relink(value: Any, swaps: dict[int, Any], seen: set[int], budget: list[int]) -> Any:
    live = swaps.get(id(value))
    if live is not None:
        return live
    if type(value) in _SCALARS or id(value) in seen or budget[0] <= 0:
        return value
    seen.add(id(value))
    budget[0] -= 1
    t = type(value)
    if t is list:
        value[:] = [_relink(v, swaps, seen, budget) for v in value]
    elif t is dict:
        for k, v in value.items():
            value[k] = _relink(v, swaps, seen, budget)
    elif t is tuple:
        items = tuple(_relink(v, swaps, seen, budget) for v in value)
        if any(a is not b for a, b in zip(items, value, strict=True)):
            return items
    elif _state_object(value):
        state = vars(value)
        for k, v in list(state.items()):
            state[k] = _relink(v, swaps, seen, budget)
    return value


def _pandas_object(obj: Any) -> bool:
    return any(
        c.__name__ == "NDFrame" and c.__module__.partition(".")[0] == "pandas"
        for c in type(obj).__mro__
    )


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
