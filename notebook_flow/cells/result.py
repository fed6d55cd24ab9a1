"""A cached cell's stored result: what :class:`~.runner.CellRunner` commits on a miss and
puts back on a hit.

The result holds one pickle (:func:`~.state.pack`) of everything the cell changed:

* ``variables``: the names it bound or changed, also those changed by functions it called;
* ``effects``: objects outside the namespace it changed through functions it called
  (a local module's global, a closure variable, an object bound to a method);
* ``ambient``: the ambient states it changed (:mod:`.ambient`);

next to it, which of those were changed *in place* (same object before and after: restored
in place, :func:`~.state.update_in_place`) and which names it deleted. Objects it read and
left alone are stored as references to where they live (:func:`~.state.reference_map`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import types
from collections.abc import Callable
from typing import Any

from . import ambient
from .effects import Target, find_target, missing
from .sharing import Unverified, plan_sharing, verify
from .state import (
    Path,
    add_data_owner_refs,
    check_deadline,
    kept_paths,
    pack,
    reference_map,
    relink,
    unpack,
    update_in_place,
    walk,
)

__all__ = ["DISK_SPEED", "Restored", "nbytes", "pack_result", "part_key", "writable"]

logger = logging.getLogger("notebook_flow")


def pack_result(
    ns: dict[str, Any],
    variables: dict[str, Any],
    *,
    before: dict[str, Any],
    before_paths: dict[Path, Any],
    inputs: list[str],
    deleted: list[str],
    effects: list[tuple[Target, Any, bool]],
    ambient_changed: dict[str, Any],
    deadline: float | None = None,
) -> tuple[dict[str, Any], list[Any]]:
    """The stored form of a cell's result (``state``, ``inplace``, ``deleted``, ``parts``:
    the number of large values) and the large values, to be stored on their own.

    ``before`` maps names to the objects they held before the run and ``before_paths`` the
    parts of those objects (:func:`.state.walk`); ``effects`` is
    :meth:`.effects.Watches.changed`. Raises what pickling raises for an unstorable value,
    and :class:`.state.OverBudget` once past ``deadline`` (a ``perf_counter`` time: under
    ``%flow auto``, when storing would cost more than the cell is worth).
    """
    variables = dict(variables)
    inplace = {n for n, v in variables.items() if n in before and before[n] is v}
    gone = set(deleted)
    outside: list[tuple[Target, Any, bool, bool]] = []
    for target, value, same in effects:
        if target[0] == "ns":  # a notebook variable a called function changed
            name = target[1]
            if name in variables or name in gone:
                continue
            if missing(value):
                gone.add(name)
                continue
            variables[name] = value
            if same:
                inplace.add(name)
        else:
            outside.append((target, None if missing(value) else value, same, missing(value)))
    # An input whose content is unchanged may still have had parts replaced by equal
    # copies (`d["rows"] = list(d["rows"])`): an alias of the old part would tell. Store it.
    for name in inputs:
        if name not in ns or name in variables or name in gone:
            continue
        if _parts_replaced(before_paths, name, ns[name]):
            variables[name] = ns[name]
            if before.get(name) is ns[name]:
                inplace.add(name)
    changed = set(variables) | gone
    unchanged = walk([((n,), ns[n]) for n in inputs if n in ns and n not in changed], deadline)
    refs = reference_map(unchanged)
    # Functions and classes inside inputs the cell changed (`fns = {"draw": draw}`, whose
    # fingerprint follows what `draw` reaches) are code, not data: stored where they were
    # (the key fingerprints them), never as copies bound to copied globals.
    keyed = set(inputs)
    for path, obj in before_paths.items():
        if path[0] in keyed and isinstance(obj, (types.FunctionType, type)):
            refs.setdefault(id(obj), ("ref", path))
    for name in sorted(inplace):  # restored in place: the class stays the live one's
        cls = type(variables[name])
        if cls.__module__ == "__main__":
            refs.setdefault(id(cls), ("typeof", (name,)))
    # Arrays owning memory that several outputs share are stored too: views stay views.
    produced = walk(
        [*(((n,), v) for n, v in variables.items()), *(((_label(t),), v) for t, v, *_ in outside)],
        deadline,
    )
    existed = {id(v) for v in before.values()} | {id(v) for v in before_paths.values()}
    unverified: list[Unverified] = []
    check_deadline(deadline)
    owners = plan_sharing(produced, unchanged, refs, existed, unverified)
    if unverified:  # an output array may be over an input frame's data: point into it
        add_data_owner_refs(unchanged, refs)
    large: list[Any] = []
    blob = pack(
        {"variables": variables, "effects": outside, "ambient": ambient_changed},
        refs,
        large,
        bases=[*variables.values(), *owners],
        deadline=deadline,
    )
    if unverified:
        # A pandas object and an array over its memory: pickled together, the array comes
        # back as a view of the frame's restored data (of the live input's, for an input
        # frame: state.add_data_owner_refs). Checked on a real round trip.
        if large:  # (stored apart, as Parquet and npy: they could not share)
            raise unverified[0].error
        check_deadline(deadline)
        back = unpack(blob, ns)
        restored = [
            *(((n,), v) for n, v in back["variables"].items()),
            *(((_label(t),), v) for t, v, *_ in back["effects"]),
        ]
        verify(unverified, walk(restored, deadline), unchanged)
    # Of what changed in place, which parts stayed the same objects (updated in place on a
    # hit) and which were replaced (replaced on a hit too).
    kept = {n: sorted(kept_paths(before_paths, (n,), variables[n]), key=repr) for n in inplace}
    stored = {"state": blob, "inplace": kept, "deleted": sorted(gone)}
    return {**stored, "parts": len(large)}, large


def _label(target: Target) -> str:
    """How a user names the object at ``target`` (``("module", "m", "x")``: ``m.x``)."""
    if target[0] == "module":
        return f"{target[1]}.{target[2]}"
    return f"{getattr(target[1], '__qualname__', target[1])}'s {target[0]} {target[2]}"


def _parts_replaced(before_paths: dict[Path, Any], name: str, value: Any) -> bool:
    """True when an object met at some path under ``name`` before the run is not the one
    there now."""
    now = walk([((name,), value)])
    missing = object()
    return any(
        now.get(path, missing) is not obj for path, obj in before_paths.items() if path[0] == name
    )


@dataclasses.dataclass
class Restored:
    """A stored result, unpacked and checked against the live namespace, ready to apply.

    :meth:`prepare` does everything that can fail (unpickling, finding the objects to update)
    before anything is changed, so a result that cannot be restored is a clean miss.
    """

    variables: dict[str, Any]
    inplace: dict[str, set[Path]]  # name -> the paths of its parts changed in place
    deleted: list[str]
    effects: list[tuple[Any, Any, Any, Any, bool, bool]]  # live, set, delete, value, same, gone
    ambient: dict[str, Any]
    memo: dict[int, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def prepare(
        cls, payload: dict[str, Any], ns: dict[str, Any], load_part: Callable[[int], Any]
    ) -> Restored:
        """Unpack ``payload`` against ``ns``; ``load_part(i)`` loads the i-th large value."""
        if not 0 <= payload["parts"] < 10_000:
            raise ValueError("the stored result names an impossible number of parts")
        state = unpack(payload["state"], ns, load_part)
        effects = []
        for target, value, same, gone in state["effects"]:
            live, setter, deleter = find_target(target, ns)
            if setter is None and (gone or not same or not _can_update(live, value)):
                raise LookupError(f"cannot update the object {target} in place")
            effects.append((live, setter, deleter, value, same, gone))
        return cls(
            variables=state["variables"],
            inplace={n: {tuple(p) for p in paths} for n, paths in payload["inplace"].items()},
            deleted=list(payload["deleted"]),
            effects=effects,
            ambient=state["ambient"],
        )

    def apply_variables(self, ns: dict[str, Any]) -> None:
        """Bind or update the variables and delete the deleted names."""
        for name, value in self.variables.items():
            if name in self.inplace and name in ns:
                kept = self.inplace[name] | {(name,)}
                ns[name] = update_in_place(ns[name], value, self.memo, kept, (name,))
        for name, value in self.variables.items():
            if name not in self.inplace or name not in ns:
                ns[name] = relink(value, self.memo)
        for name in self.deleted:
            ns.pop(name, None)

    def apply_rest(self, ns: dict[str, Any]) -> None:
        """Set the ambient states and the objects changed through calls (after the cell's
        definitions ran again: a cell that imports matplotlib and sets a style needs the
        import first)."""
        for name in ambient.restore(self.ambient):
            logger.warning("%%%%task: the ambient state %s could not be restored", name)
        for live, setter, deleter, value, same, gone in self.effects:
            if gone:
                if deleter is not None:
                    deleter()
                continue
            new = update_in_place(live, value, self.memo, set(), ()) if same else value
            if new is not live and setter is not None:
                setter(new)


def _can_update(live: Any, stored: Any) -> bool:
    """True when :func:`update_in_place` keeps ``live`` (checked before changing anything)."""
    from .state import (
        _array,
        _generator,
        _is_numpy,
        _pandas_object,
        _random_state,
        _state_object,
    )

    if type(live) is not type(stored):
        return False
    if _array(live):
        return bool(
            live.shape == stored.shape and live.dtype == stored.dtype and live.flags.writeable
        )
    return (
        isinstance(live, (list, dict, set, random.Random))
        or _is_numpy(live, "BitGenerator")
        or _generator(live)
        or _random_state(live)
        or _pandas_object(live)
        or _state_object(live)
    )


# --------------------------------------------------------------------------- large parts

#: Bytes per second assumed for writing a result's large parts (npy, Parquet, fsync'd) and
#: reading them back, in auto mode's "worth storing?" (measured: a 32 MB array written and
#: synced in 0.3-2 s on a busy 2-core machine; a cell cheaper than that runs again instead).
DISK_SPEED = 100e6


def nbytes(value: Any) -> int:
    if isinstance(value, bytes):  # a file the cell wrote
        return len(value)
    try:
        return int(getattr(value, "nbytes", None) or value.memory_usage(deep=False).sum())
    except Exception:
        return 0


def part_key(key: str, i: int) -> str:
    """The store key of the i-th large value of the result stored under ``key``."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(f"{key}:part:{i}".encode())


def writable(value: Any) -> Any:
    """A loaded array as a plain run has it: writable. A read-only memory map of a local
    store file is mapped again copy-on-write (pages are read lazily; writes stay private),
    with the offset, shape and dtype of the verified map."""
    t = type(value)
    if t.__name__ != "memmap" or t.__module__ != "numpy" or value.flags.writeable:
        return value
    import numpy as np  # made the value: imported already

    if value.filename is None:
        return np.array(value)
    order: Any = "F" if value.flags.f_contiguous and not value.flags.c_contiguous else "C"
    return np.memmap(
        value.filename,
        mode="c",
        dtype=value.dtype,
        shape=value.shape,
        offset=value.offset,
        order=order,
    ).view(np.ndarray)
