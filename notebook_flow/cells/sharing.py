"""Memory that a cell's outputs share, checked before they are stored.

Two objects can share memory without being the same object: ``b = a[1:]``, two slices of an
array nobody names any more, a DataFrame built over an array with ``copy=False``, the array
``df["x"].to_numpy()`` returns. In a plain run a write through one shows in the other. A
restore gives back what :func:`.state.pack` stored, so it keeps that relation only where
``pack`` stores an array as a *view* of an array that is restored as one object: an array
stored or referenced too.

:func:`plan_sharing` looks at every array and pandas object of the outputs and the inputs,
groups them by the memory they use, and for each group where a write could show:

* plain arrays sharing memory with nothing but each other: the array owning the memory is
  stored with them (once), so they come back as views of it;
* everything else (a pandas object sharing memory with an array, an array sharing memory
  with an input object whose memory is not itself an input, an object array, a view
  ``pack`` cannot rebuild): :class:`SplitMemory`, and the cell runs uncached, saying which
  two objects and why in one line.

Groups where no object can be written to (read-only arrays) are left alone: splitting them
cannot show. So are pandas objects sharing memory only among themselves under pandas'
copy-on-write (always on from pandas 3): pandas copies before a write to shared memory.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from .state import Path, _pandas_object, _view_of

__all__ = ["SplitMemory", "Unverified", "plan_sharing", "verify"]


class SplitMemory(Exception):
    """A cell's outputs share memory in a way a restore cannot rebuild (the message says
    which objects, and how to cache the cell)."""


class Unverified:
    """Objects sharing memory in a way :func:`.state.pack` may keep (a pandas object and a
    numpy view of its data, as a statsmodels result holds: pickled together, the view is
    rebuilt over the restored frame's array): ``paths`` (``(path, side)``) must still share
    one memory after a round trip (:func:`verify`), else ``error`` is raised."""

    def __init__(self, paths: list[tuple[Path, str]], error: SplitMemory) -> None:
        self.paths, self.error = paths, error


def plan_sharing(
    outputs: dict[Path, Any],
    inputs: dict[Path, Any],
    refs: Iterable[int],
    existed: set[int],
    unverified: list[Unverified] | None = None,
) -> list[Any]:
    """The arrays to store with a cell's outputs so that views of them stay views (their
    owners), given the objects reachable from the outputs and from the inputs (``{path:
    object}``, :func:`.state.walk`), the ids of the objects stored as references, and the
    ids of every object that existed before the cell ran. Raises :class:`SplitMemory`;
    with ``unverified``, a pandas object sharing memory with an array is appended to it
    instead, to be checked on a real round trip after packing (:func:`verify`)."""
    np = sys.modules.get("numpy")
    if np is None:  # no array exists
        return []
    groups: dict[int, list[_Holder]] = {}
    seen: set[int] = set()
    for side, found in (("out", outputs), ("in", inputs)):
        for path, obj in found.items():
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            for holder in _holders(np, path, obj, side):
                groups.setdefault(id(holder.memory), []).append(holder)
    refs = set(refs)
    owners: list[Any] = []
    checked: list[list[_Holder]] = []
    for group in groups.values():
        if len({id(h.obj) for h in group}) < 2 or all(h.side == "in" for h in group):
            continue
        if not any(h.writable for h in group):
            continue  # nothing can write to the shared memory: a split cannot show
        pandas = [h for h in group if h.kind == "pandas"]
        if pandas and len(pandas) == len(group) and _copy_on_write():
            continue  # pandas copies before writing to memory another pandas object uses
        old = [h for h in group if id(h.obj) in existed]
        if len(old) == len(group) and not pandas:
            # All of them existed before the run: on a hit they are the live arrays again
            # (references, or updated in place: values copied into their memory).
            continue
        if pandas and len(pandas) < len(group):
            other = next(h for h in group if h.kind != "pandas" and h is not pandas[0])
            error = _split(pandas[0], other, "a pandas object over an array's memory")
            if unverified is None:
                raise error
            unverified.append(Unverified(_paths(group), error))
            continue
        if pandas:
            raise _split(
                pandas[0], pandas[1], "pandas objects sharing memory without copy-on-write"
            )
        objects = [h for h in group if h.kind == "object"]
        if objects:
            raise _split(objects[0], _other(group, objects[0]), "an array of Python objects")
        owner = group[0].owner
        if any(h.owner is not owner for h in group):  # arrays over one buffer (frombuffer)
            other = next(h for h in group if h.owner is not owner)
            raise _split(group[0], other, "arrays over one buffer")
        if old and id(owner) not in refs:
            # A new object over the memory of one of before the run that is not restored
            # as a reference (changed in place, or not named): it would view a copy.
            new = next(h for h in group if id(h.obj) not in existed)
            raise _split(new, old[0], "memory of an earlier object")
        if id(owner) not in refs:  # (an input is stored as a reference to the live one)
            owners.append(owner)
        checked.append(group)
    keep = {id(o) for o in owners} | refs
    for group in checked:
        for holder in group:
            if holder.obj is not holder.owner and _view_of(holder.obj, keep) is None:
                raise _split(holder, _other(group, holder), "a view numpy cannot rebuild")
    return owners


def verify(unverified: list[Unverified], outputs: dict[Path, Any], inputs: dict[Path, Any]) -> None:
    """Raise the error of the first :class:`Unverified` group whose objects no longer share
    a memory, given the objects reachable from the *restored* outputs and from the live
    inputs (``{path: object}``, as :func:`plan_sharing` was given them)."""
    np = sys.modules.get("numpy")
    for group in unverified:
        common: set[int] | None = None  # the memories every object of the group uses
        for path, side in group.paths:
            obj = (outputs if side == "out" else inputs).get(path)
            holders = [] if obj is None or np is None else list(_holders(np, path, obj, side))
            memories = {id(h.memory) for h in holders}
            common = memories if common is None else common & memories
            if not common:
                raise group.error


def _paths(group: list[_Holder]) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    for holder in group:
        if (holder.path, holder.side) not in out:
            out.append((holder.path, holder.side))
    return out


class _Holder:
    """An array or pandas object of a cell's outputs or inputs, and the memory it uses."""

    __slots__ = ("kind", "memory", "obj", "owner", "path", "side", "writable")

    def __init__(self, np: Any, where: tuple[Path, str], obj: Any, array: Any, kind: str) -> None:
        (self.path, self.side), self.obj, self.kind = where, obj, kind
        self.owner = owner = _owner(np, array)
        # What finally holds the memory: the owner, or the buffer it is over (the bytes
        # of `np.frombuffer`, a memory map).
        memory = owner.base if owner.base is not None else owner
        # (numpy keeps a memoryview of another buffer: the object under it)
        if type(memory) is memoryview and memory.obj is not None:
            memory = memory.obj
        self.memory = memory
        self.writable = bool(array.flags.writeable) or kind == "pandas"


def _holders(np: Any, path: Path, obj: Any, side: str) -> Iterator[_Holder]:
    if isinstance(obj, np.ndarray):
        kind = "object" if obj.dtype.hasobject else "array"
        yield _Holder(np, (path, side), obj, obj, kind)
    elif _pandas_object(obj):
        for array in _pandas_arrays(np, obj):
            yield _Holder(np, (path, side), obj, array, "pandas")


def _pandas_arrays(np: Any, obj: Any) -> Iterator[Any]:
    """The numpy arrays holding a DataFrame's or Series' data (extension arrays: their
    numpy buffers; Arrow-backed ones are immutable and left out)."""
    try:
        arrays = obj._mgr.arrays
    except Exception:
        return
    for array in arrays:
        if isinstance(array, np.ndarray):
            yield array
            continue
        for name in ("_ndarray", "_data", "_mask", "_codes"):
            inner = getattr(array, name, None)
            if isinstance(inner, np.ndarray):
                yield inner


def _owner(np: Any, array: Any) -> Any:
    """The array owning ``array``'s memory (the last array of its ``base`` chain)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _copy_on_write() -> bool:
    pandas = sys.modules.get("pandas")
    if pandas is None:
        return True
    if int(str(pandas.__version__).partition(".")[0]) >= 3:
        return True
    try:
        return bool(pandas.options.mode.copy_on_write is True)
    except Exception:
        return False


def _other(group: list[_Holder], holder: _Holder) -> _Holder:
    return next((h for h in group if h.obj is not holder.obj), holder)


def _split(a: _Holder, b: _Holder, what: str) -> SplitMemory:
    return SplitMemory(
        f"{_name(a)} and {_name(b)} share memory ({what}); a restore would store them "
        f"apart, so a write through one would no longer show in the other. Make one a copy "
        f"(`.copy()`) to cache this cell"
    )


def _name(holder: _Holder) -> str:
    root, *steps = holder.path
    text = str(root)
    for kind, step in steps:
        text += f".{step}" if kind in ("a", "p") else f"[{step!r}]"
    return f"`{text}`"
