"""Lineage fingerprints: a value is known by the cache key that produced it.

Some results have no stable content fingerprint: statsmodels state-space results hold
Cython filter objects, fitted models may hold open handles or C structures. Without
lineage, every cell (or task) that reads such a value runs uncached, forever. With it, a
value that a cached cell or task produced (computed or restored) and that has not changed
since is fingerprinted by *the key that produced it plus its name* (``"res"`` of a cell,
``"return[0]"`` of a task) -- the same in every process and after every restart, because
keys are.

How it can never serve a wrong value:

* Content first. :func:`~notebook_flow.hashing.fingerprint` uses lineage only for a part
  whose content hashing failed (or a class registered with :func:`register_lineage_only`).
  A value that content-hashes always does, wherever it came from.
* No aliasing through ``id()``. The registry is keyed by ``id()``, but each entry holds a
  weak reference to its object (a strong one where weak references are not supported),
  and a lookup checks that the entry's object *is* the value. A collected object's entry
  is dropped by the weak reference's callback, so a recycled id finds nothing.
* "Unchanged since" is checked on every use. When the entry is recorded, the object is
  walked *leniently*: everything with a content fingerprint is hashed, and each part
  without one is noted as a leaf. Leaves are kept alive by the entry (their ids cannot be
  reused) and are summarised by their pickled bytes where they pickle. On every lookup the
  walk is repeated; any difference (a rebound attribute, an array changed in place, a leaf
  whose pickled state changed) drops the entry, and the value is unhashable again: the
  cell runs uncached and says why. The same check makes a cell that mutates such an object
  see the change (the object becomes the cell's output, with the new lineage).
* :func:`forget` drops an entry explicitly (for code that knows it mutated an object in a
  way the check cannot see, such as a C structure with no pickled state).

Tokens never reach disk as values: they are only hashed into keys, under their own tag.

>>> from notebook_flow.hashing import fingerprint
>>> class Handle:  # no content fingerprint: holds a lock
...     def __init__(self): import threading; self.lock = threading.Lock()
>>> h = Handle()
>>> record("0" * 32, "h", h)
True
>>> fingerprint(h) == fingerprint(h)
True
"""

from __future__ import annotations

import functools
import logging
import pickle
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import xxhash

from notebook_flow.errors import ConfigurationError, UnhashableError

__all__ = [
    "forget",
    "is_lineage_only",
    "lineage_of",
    "produced_by",
    "record",
    "record_outputs",
    "register_lineage_only",
]

logger = logging.getLogger("notebook_flow")

#: A snapshot visits at most this many values. Unlike a fingerprint, which stops at the
#: first part with no content hash, it walks everything: an object graph like a matplotlib
#: figure's would take minutes. Bigger values get no lineage (a miss, never a wrong hit).
MAX_VALUES = 20_000


class TooBig(Exception):
    """A snapshot walk ran out of its budget of values (:data:`MAX_VALUES`)."""


#: At most this many objects without weak-reference support are held strongly; the oldest
#: entries go first (they only cost a cache miss).
MAX_STRONG = 4096


class _Entry:
    __slots__ = ("leaves", "ref", "snapshot", "strong", "token")

    def __init__(
        self, ref: Any, strong: object, token: bytes, snapshot: str, leaves: list[object]
    ) -> None:
        self.ref = ref  # weakref.ref or None
        self.strong = strong  # the object itself when it takes no weak reference
        self.token = token
        self.snapshot = snapshot
        self.leaves = leaves  # kept alive: their ids are part of the snapshot

    def target(self) -> object:
        return self.ref() if self.ref is not None else self.strong


_lock = threading.RLock()
_entries: dict[int, _Entry] = {}
_strong_order: list[int] = []
_lineage_only: set[type] = set()
_in_check = threading.local()


def active() -> bool:
    """Whether any entry exists (only then does the walk look for lineage)."""
    return bool(_entries)


def register_lineage_only(cls: type) -> None:
    """Fingerprint instances of ``cls`` only by their lineage, never by their content.

    For classes whose content hash would succeed but is not stable (it includes
    process-specific state): their instances are then hashable only when a cached cell or
    task produced them, and a cell reading one otherwise runs uncached.
    """
    if not isinstance(cls, type):
        raise ConfigurationError(f"register_lineage_only() needs a class, got {cls!r}.")
    from notebook_flow.hashing.core import _RESOLVED

    _lineage_only.add(cls)
    _RESOLVED.clear()


def is_lineage_only(cls: type) -> bool:
    """Whether ``cls`` (or a base) was given to :func:`register_lineage_only`."""
    return bool(_lineage_only) and any(base in _lineage_only for base in cls.__mro__)


def produced_by(manifest: Any) -> str:
    """What a stored result is known by: its key *and* the run that stored it.

    The run matters: if the entry is deleted or expires and the producer runs again with
    the same key, a nondeterministic producer may make another value, which must not
    inherit the fingerprint (and with it the cached dependants) of the first.
    """
    return f"{manifest.key}/{manifest.run_id}"


def _token(key: str, name: str) -> bytes:
    return f"{key}\x00{name}".encode("utf-8", "surrogatepass")


def snapshot(value: object, *, portable: bool = False) -> tuple[str, list[object]]:
    """The lenient digest of ``value`` and the parts with no content fingerprint.

    Meant for comparison with a later snapshot of the same live object in the same
    process: leaves are summarised by their identity (the caller keeps them alive) and
    their pickled bytes where they pickle. ``portable=True`` leaves the identity out, for
    comparing values across processes (a test's "same namespace as a plain run"); never
    use that as a cache key.
    """
    from notebook_flow.hashing.core import _Context, _walk, _Writer

    ctx = _Context()
    ctx.special = True
    ctx.leaves = []
    ctx.budget = MAX_VALUES
    w = _Writer()
    try:
        _walk(value, w, ctx)
    except RecursionError:
        raise UnhashableError("it is nested too deeply to walk") from None
    except TooBig:
        raise UnhashableError(f"it has more than {MAX_VALUES} parts to walk") from None
    for leaf in ctx.leaves:
        # Its identity (the entry keeps it alive, so the id cannot be reused) and state.
        where = "" if portable else f":{id(leaf)}"
        w.buf += f"{type(leaf).__qualname__}{where}".encode() + b"\x00"
        try:
            data = pickle.dumps(leaf, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # no pickled state: its identity (kept alive) is all we have
            data = b""
        w.buf += xxhash.xxh3_128_digest(data)
    return w.hexdigest(), ctx.leaves


_SKIPPED_MODULES = ("matplotlib.", "mpl_toolkits.", "PIL.")


def _skip(value: object) -> bool:
    """Values whose content always hashes: no entry needed (and no walk spent on it)."""
    from notebook_flow.hashing.core import _EXACT

    cls = type(value)
    if cls in _EXACT and cls not in (list, dict, tuple, set, frozenset):
        return True
    if cls.__module__ == "numpy" and cls.__name__ == "ndarray":
        return not value.dtype.hasobject  # type: ignore[attr-defined]
    # Figures, axes and artists: graphs of thousands of objects, which a snapshot would
    # walk (up to MAX_VALUES) after every cell that leaves one in a variable.
    if cls.__module__.startswith(_SKIPPED_MODULES):
        return True
    # pandas containers content-hash in practice; walking a large frame again on every
    # restore would cost more than the rare object column of handles it could help.
    return cls.__module__.startswith("pandas.") and cls.__name__ in (
        "DataFrame",
        "Series",
        "Index",
    )


def record(key: str, name: str, value: object) -> bool:
    """Remember that ``value`` was produced under ``key`` as ``name``; True if recorded.

    Values whose content has a stable fingerprint are not recorded (content wins); values
    of classes registered lineage-only always are.
    """
    if _skip(value):
        return False
    try:
        digest, leaves = snapshot(value)
    except UnhashableError:
        return False
    if not leaves and not is_lineage_only(type(value)):
        forget(value)  # its content hashes: a stale entry must not linger
        return False
    _put(value, _token(key, name), digest, leaves)
    return True


def record_outputs(key: str, outputs: Iterable[tuple[str, object]]) -> None:
    """:func:`record` for each ``(name, value)``; an object met twice keeps its first name.

    Tuples and lists among them also record their items (``name[0]``, ...), so a result
    unpacked into names keeps its lineage. Never raises: lineage is an optimisation.
    """
    seen: set[int] = set()
    for name, value in outputs:
        _record_once(key, name, value, seen)
        if type(value) in (tuple, list):
            for i, item in enumerate(value[:64]):  # type: ignore[index]
                _record_once(key, f"{name}[{i}]", item, seen)


def _record_once(key: str, name: str, value: object, seen: set[int]) -> None:
    if id(value) in seen:
        return
    seen.add(id(value))
    try:
        record(key, name, value)
    except Exception:  # never let lineage bookkeeping fail a run
        import logging

        logging.getLogger("notebook_flow").debug(
            "lineage of `%s` not recorded", name, exc_info=True
        )


def _put(value: object, token: bytes, digest: str, leaves: list[object]) -> None:
    ident = id(value)
    try:
        ref: Any = weakref.ref(value, functools.partial(_drop_dead, ident))
        strong: object = None
    except TypeError:
        ref, strong = None, value
    entry = _Entry(ref, strong, token, digest, leaves)
    with _lock:
        _entries[ident] = entry
        if strong is not None:
            if ident in _strong_order:
                _strong_order.remove(ident)
            _strong_order.append(ident)
            while len(_strong_order) > MAX_STRONG:
                old = _strong_order.pop(0)
                _entries.pop(old, None)


def _drop_dead(ident: int, ref: Any) -> None:
    with _lock:
        entry = _entries.get(ident)
        if entry is not None and entry.ref is ref:
            del _entries[ident]


def forget(value: object) -> None:
    """Drop the lineage of ``value`` (it was changed in a way the check cannot see)."""
    with _lock:
        entry = _entries.get(id(value))
        if entry is not None and entry.target() is value:
            del _entries[id(value)]
            if entry.strong is not None and id(value) in _strong_order:
                _strong_order.remove(id(value))


def _entry(value: object) -> _Entry | None:
    with _lock:
        entry = _entries.get(id(value))
    if entry is None or entry.target() is not value:
        return None
    return entry


def token_for(value: object) -> bytes | None:
    """The lineage token of ``value`` if it has one and is unchanged since it was recorded.

    A changed value loses its entry for good (it is no longer what the key produced).
    """
    entry = _entry(value)
    if entry is None:
        return None
    if getattr(_in_check, "busy", False):  # a snapshot walking into itself: no lineage
        return None
    _in_check.busy = True
    try:
        digest, _ = snapshot(value)
    except UnhashableError:
        digest = ""
    finally:
        _in_check.busy = False
    if digest != entry.snapshot:
        forget(value)
        return None
    return entry.token


def lineage_of(value: object) -> str | None:
    """``"<key>:<name>"`` of the cached run that produced ``value``, if still valid."""
    token = token_for(value)
    if token is None:
        return None
    key, _, name = token.decode("utf-8", "surrogatepass").partition("\x00")
    return f"{key}:{name}"


def _reset_for_tests() -> None:
    with _lock:
        _entries.clear()
        _strong_order.clear()
