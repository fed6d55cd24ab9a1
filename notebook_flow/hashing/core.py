"""The walk: values as a tagged, prefix-free byte stream through xxh3-128.

:func:`fingerprint` writes a value to a :class:`_Writer`; :func:`_walk` dispatches each
part to a handler, by exact type through ``_EXACT`` (no isinstance check: the hot path) or
through a handler that :mod:`notebook_flow.hashing.dispatch` resolves once per type.
Handlers live in ``builtins``, ``objects``, ``arrays`` and ``frames``; they call back into
:func:`_walk` for their parts and use the error helpers here to say *where* an unhashable
part sits (``"['a'][2].conn"``).
"""

from __future__ import annotations

import struct
import threading
import weakref
from collections.abc import Callable
from typing import Any

import xxhash

from notebook_flow.errors import UnhashableError

_pack_u = struct.Struct("<Q").pack
_DIRECT = 4096  # buffers at least this big skip the staging bytearray

Handler = Callable[[Any, "_Writer", "_Context"], None]


class _Writer:
    """Stages small writes in a bytearray; big buffers go straight to the hasher.

    While a value that may fall back to its lineage is walked, ``held`` collects the big
    buffers (as views, not copies) instead of hashing them, so the walk can be undone.
    """

    __slots__ = ("buf", "hasher", "held")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.hasher: Any = None
        self.held: list[Any] | None = None

    def blob(self, data: Any) -> None:
        """A length-prefixed buffer (bytes, memoryview, contiguous ndarray)."""
        view = memoryview(data)
        self.buf += _pack_u(view.nbytes)
        self.chunk(view)

    def chunk(self, data: Any) -> None:
        """Raw bytes whose total length the caller has already written (or implies)."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.format != "B":
            view = view.cast("B")
        if view.nbytes < _DIRECT:
            self.buf += view
            return
        if self.held is not None:
            self.held.append(bytes(self.buf))
            self.buf.clear()
            self.held.append(view)
            return
        if self.hasher is None:
            self.hasher = xxhash.xxh3_128()
        self.hasher.update(self.buf)
        self.buf.clear()
        self.hasher.update(view)

    def digest(self) -> bytes:
        if self.hasher is None:
            return xxhash.xxh3_128_digest(self.buf)
        self.hasher.update(self.buf)
        self.buf.clear()
        return bytes(self.hasher.digest())

    def take(self) -> bytes:
        """The digest so far, leaving the writer empty for reuse."""
        digest = self.digest()
        self.buf.clear()
        self.hasher = None
        return digest

    def hexdigest(self) -> str:
        if self.hasher is None:
            return xxhash.xxh3_128_hexdigest(self.buf)
        self.hasher.update(self.buf)
        self.buf.clear()
        return str(self.hasher.hexdigest())


#: How many containers a walk may enter again inside parts it has walked already. A part
#: reached along two paths is walked along both (the digest does not depend on which
#: objects are shared); where parts share parts at every level, as a matplotlib ``Axes``
#: and its transforms do, that doubles at each level: 257 objects took 226,497 entries in
#: 10 s and would not have ended. Past this budget the value has no fingerprint (a cell
#: that reads it falls back to its lineage, or runs uncached and says why).
REWALK_LIMIT = 50_000


class _Context:
    """Per top-level call: the mutable containers being walked, for cycle detection, and
    those walked already, to bound walking shared parts again (:data:`REWALK_LIMIT`).

    ``id()`` is used only to recognise an object already on the stack or already walked;
    it never reaches the digest (a back-reference is written as its distance up the
    stack). Walked objects are held until the call ends, so their ids are not reused by
    the temporaries a reducer makes.
    """

    __slots__ = ("active", "budget", "depth", "done", "leaves", "rewalk", "rewalking", "special")

    def __init__(self) -> None:
        self.active: dict[int, int] = {}
        self.done: dict[int, object] = {}
        self.rewalk = 0  # containers entered again inside parts already walked
        self.rewalking = 0  # the depth of the part walked again (0: none)
        self.depth = 0
        # Set when lineage entries exist (a failed part may fall back to its lineage) or
        # for a lenient walk (lineage.snapshot): every value then goes through _walk_special.
        self.special = False
        # Lenient walks only: the parts with no stable fingerprint, in walk order, and how
        # many more values the walk may visit (it never fails early, so it is bounded).
        self.leaves: list[object] | None = None
        self.budget = 0


class _Local(threading.local):
    # Nested fingerprint() calls (from reducers or sourcehash) share the outer context,
    # so a cycle through them is still detected.
    ctx: _Context | None = None


_local = _Local()
_NO_CONTEXT = _Context()  # for writers that only ever see scalars
# Exact types dispatched without any isinstance check: the hot path for small arguments.
# One dict, filled in place by dispatch.py when it is imported (at the end of this module).
_EXACT: dict[type, Handler] = {}
_RESOLVED: weakref.WeakKeyDictionary[type, Handler] = weakref.WeakKeyDictionary()


def fingerprint(value: object) -> str:
    """Return a 32-character hex xxh3-128 digest of ``value``, stable across processes.

    Raises :class:`~notebook_flow.errors.UnhashableError` when some part of ``value`` has
    no stable fingerprint; ``exc.path`` says where (``"['a'][2].conn"``).

    >>> len(fingerprint({"day": "2026-11-01", "n": [1, 2, 3]}))
    32
    """
    ctx = _local.ctx
    writer = _Writer()
    if ctx is not None:  # nested call: the outermost call reports errors
        _walk(value, writer, ctx)
        return writer.hexdigest()
    ctx = _local.ctx = _Context()
    ctx.special = _lineage.active()
    try:
        _walk(value, writer, ctx)
    except UnhashableError as exc:
        exc.args = (_message(exc),)
        raise
    except RecursionError:
        raise UnhashableError(
            f"Cannot fingerprint a {_type_name(value)}: it is nested too deeply (or through "
            "too long a chain of objects) to walk. Pass a flatter value, or give its class "
            "a __notebook_flow_fingerprint__ method / register_fingerprint() reducer.",
            type_name=_type_name(value),
        ) from None
    finally:
        _local.ctx = None
    return writer.hexdigest()


# --- errors ---------------------------------------------------------------------------


def _type_name(value: object) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _unhashable(value: object, reason: str) -> UnhashableError:
    exc = UnhashableError(reason, type_name=_type_name(value))
    exc.reason = reason  # type: ignore[attr-defined]
    return exc


def _message(exc: UnhashableError) -> str:
    reason = getattr(exc, "reason", None) or str(exc)
    where = f"the value at {exc.path}" if exc.path else "the value"
    name = exc.type_name or "object"
    return (
        f"Cannot fingerprint {where} (a {name}): {reason}. Pass something that identifies it "
        "instead (a path, URL or id), leave that argument out of the cache key, or teach "
        f"notebook_flow how: register_fingerprint({name.rpartition('.')[2]}, reducer) or a "
        "__notebook_flow_fingerprint__ method."
    )


def _at(exc: UnhashableError, segment: str) -> UnhashableError:
    exc.path = segment + exc.path
    return exc


def _key_segment(key: object) -> str:
    if type(key) in (str, int, float, bool, type(None)):
        return f"[{key!r}]"
    return f"[<{type(key).__qualname__} key>]"


def _call(value: object, fn: Callable[[], Any], what: str) -> Any:
    """Run user code (a reducer, ``__reduce_ex__``); its errors become UnhashableError."""
    try:
        return fn()
    except UnhashableError:
        raise
    except Exception as exc:
        raise _unhashable(value, f"{what} raised {type(exc).__name__}: {exc}") from exc


# --- the walk -------------------------------------------------------------------------


def _walk(value: object, w: _Writer, ctx: _Context) -> None:
    cls = type(value)
    handler = _EXACT.get(cls)
    if handler is None:
        handler = _RESOLVED.get(cls)
        if handler is None:
            handler = _RESOLVED[cls] = _resolve(cls)
    if ctx.special and (ctx.leaves is not None or id(value) in _LINEAGE_IDS):
        _walk_special(value, handler, w, ctx)
    else:
        handler(value, w, ctx)


def _walk_special(value: object, handler: Handler, w: _Writer, ctx: _Context) -> None:
    """``handler`` with the fallbacks of :mod:`.lineage`.

    A lenient walk (``ctx.leaves`` set) writes a placeholder for a part with no stable
    fingerprint and goes on. Otherwise a value with a lineage entry is walked with its
    writes held back: if its content turns out to have no stable fingerprint, the writes
    are undone and its lineage token is written instead.
    """
    if ctx.leaves is not None:
        ctx.budget -= 1
        if ctx.budget < 0:
            raise _lineage.TooBig
        mark = len(ctx.leaves)
        start, outer = _checkpoint(w)
        try:
            handler(value, w, ctx)
        except UnhashableError:
            _rollback(w, start, outer)
            del ctx.leaves[mark:]
            w.buf += b"?"
            w.buf += _pack_u(len(ctx.leaves))
            ctx.leaves.append(value)
        else:
            _commit(w, outer)
        return
    start, outer = _checkpoint(w)
    try:
        handler(value, w, ctx)
    except UnhashableError:
        token = _lineage.token_for(value)
        if token is None:
            _commit(w, outer)
            raise
        _rollback(w, start, outer)
        w.buf += b"~"
        w.buf += _pack_u(len(token))
        w.buf += token
    else:
        _commit(w, outer)


def _checkpoint(w: _Writer) -> tuple[int, list[Any] | None]:
    outer = w.held
    w.held = []
    return len(w.buf), outer


def _rollback(w: _Writer, start: int, outer: list[Any] | None) -> None:
    held = w.held
    w.held = outer
    if held:  # the first held chunk begins with what the buffer held at the checkpoint
        w.buf = bytearray(held[0][:start])
    else:
        del w.buf[start:]


def _commit(w: _Writer, outer: list[Any] | None) -> None:
    held = w.held or []
    w.held = outer
    for part in held:
        if outer is not None:
            outer.append(part)
        elif len(part):
            if w.hasher is None:
                w.hasher = xxhash.xxh3_128()
            w.hasher.update(part)


def _enter(value: object, w: _Writer, ctx: _Context) -> bool:
    """Push a mutable container; if it is already being walked, write a back-reference."""
    key = id(value)
    seen = ctx.active.get(key)
    if seen is not None:
        w.buf += b"R"
        w.buf += _pack_u(ctx.depth - seen)
        return False
    if ctx.rewalking:
        ctx.rewalk += 1
        if ctx.rewalk > REWALK_LIMIT:
            raise _unhashable(
                value,
                f"its parts share parts so often that walking them did not end ({len(ctx.done):,} "
                f"objects entered {REWALK_LIMIT:,} more times along other paths)",
            )
    elif key in ctx.done:
        ctx.rewalking = ctx.depth + 1
    ctx.depth += 1
    ctx.active[key] = ctx.depth
    return True


def _leave(value: object, ctx: _Context) -> None:
    key = id(value)
    del ctx.active[key]
    if ctx.rewalking == ctx.depth:
        ctx.rewalking = 0
    ctx.depth -= 1
    ctx.done[key] = value


# Last: dispatch imports the handler modules, which import the names above.
from notebook_flow.hashing import lineage as _lineage  # noqa: E402

_LINEAGE_IDS = _lineage._entries  # the registry's dict itself (never rebound): a fast check
from notebook_flow.hashing.dispatch import _resolve  # noqa: E402
