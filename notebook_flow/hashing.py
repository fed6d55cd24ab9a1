"""Type-aware, stable fingerprints of Python values (xxh3-128, 32 hex chars).

``fingerprint(value)`` is what cache keys are made of: equal values of the same type give
the same digest in every process, Python run and ``PYTHONHASHSEED``; values of different
types never share one (``1``, ``1.0``, ``"1"``, ``True``, ``b"1"`` all differ)::

    >>> fingerprint((42, "abc")) == fingerprint((42, "abc"))
    True
    >>> fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    True

How it works. Every value is written to a byte stream as a one-byte type tag and a
self-delimiting body (fixed width, or length-prefixed), so the encoding is prefix-free and
a concatenation can be read back only one way. The stream goes through a streaming
xxh3-128 hasher; big buffers (numpy arrays, Arrow buffers) are handed to it as memoryviews,
never copied. Order-insensitive containers (dict, set) hash each item on its own and feed
the *sorted item digests* (a multiset), so keys of mixed types are never compared.
Arrow data is hashed as separate streams (validity, offsets, values) whose bytes do not
depend on how an array is sliced or chunked.

Decisions worth knowing (all err towards a cache *miss*, never a wrong hit):

* Floats are hashed bit for bit, except that every NaN is the same NaN; ``-0.0`` and
  ``0.0`` differ (``1 / x`` tells them apart), as they do inside arrays. ``Decimal("1.0")``
  and ``Decimal("1.00")`` differ too (their precision shows in later arithmetic).
* Arrays are hashed by their bytes: NaNs with different payloads, and garbage in the
  padding of aligned structured dtypes, make equal-looking arrays differ. A ``np.memmap``
  hashes like the ndarray it maps, so a result loaded from the cache keys like the original.
* An Arrow dictionary array is its dictionary plus its indices (chunks with different
  dictionaries are unified first): the same values encoded with another dictionary differ.
  pandas categoricals likewise hash categories (in order) plus codes.
* pydantic models hash their class and validated field values (``__dict__`` and extras,
  what their ``==`` compares), not ``model_dump()``, which flattens nested models and runs
  custom serializers.
* Objects of other classes: class identity (``notebook_flow.sourcehash.class_fingerprint``)
  plus the state pickle would save (``__reduce_ex__(4)``: ``__getstate__``, ``__dict__``,
  ``__slots__``), walked value by value -- never pickled bytes, never ``id()`` or ``repr()``.
  Objects with no visible state (open files, sockets, locks, generators, iterators,
  database connections, weakrefs, frames) raise :class:`~notebook_flow.errors.UnhashableError`
  naming where the bad part sits (``"['a'][2].conn"``).

Extend it with :func:`register_fingerprint` or a ``__notebook_flow_fingerprint__`` method.
"""

from __future__ import annotations

import collections
import copyreg
import dataclasses
import datetime
import decimal
import enum
import fractions
import logging
import math
import pathlib
import struct
import sys
import threading
import types
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import xxhash

from notebook_flow.errors import ConfigurationError, UnhashableError

__all__ = ["fingerprint", "register_fingerprint"]

logger = logging.getLogger("notebook_flow")

_pack_q = struct.Struct("<q").pack
_pack_u = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_NAN = _pack_d(math.nan)
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_DIRECT = 4096  # buffers at least this big skip the staging bytearray
_CHUNK = 8 << 20  # non-contiguous arrays are copied this many bytes at a time
_SMALL_OBJECT_ARRAY = 512  # longer object arrays hash their str elements through Arrow

Handler = Callable[[Any, "_Writer", "_Context"], None]


class _Writer:
    """Stages small writes in a bytearray; big buffers go straight to the hasher."""

    __slots__ = ("buf", "hasher")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.hasher: Any = None

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


class _Context:
    """Per top-level call: the mutable containers being walked, for cycle detection.

    ``id()`` is used only to recognise an object already on the stack; it never reaches
    the digest (a back-reference is written as its distance up the stack).
    """

    __slots__ = ("active", "depth")

    def __init__(self) -> None:
        self.active: dict[int, int] = {}
        self.depth = 0


class _Local(threading.local):
    # Nested fingerprint() calls (from reducers or sourcehash) share the outer context,
    # so a cycle through them is still detected.
    ctx: _Context | None = None


_local = _Local()
_NO_CONTEXT = _Context()  # for writers that only ever see scalars
_REGISTRY: dict[type, Callable[[Any], object]] = {}
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


def register_fingerprint(cls: type, reducer: Callable[[Any], object]) -> None:
    """Hash instances of ``cls`` (and its subclasses) as ``reducer(instance)``.

    The reducer returns something :func:`fingerprint` can hash (a tuple, bytes, str, ...).
    It takes precedence over every built-in rule, except for the core built-in types.

    >>> class Conn:
    ...     def __init__(self, url): self.url, self.socket = url, object()
    >>> register_fingerprint(Conn, lambda c: c.url)
    """
    if not isinstance(cls, type):
        raise ConfigurationError(f"register_fingerprint() needs a class, got {cls!r}.")
    if not callable(reducer):
        raise ConfigurationError(
            f"register_fingerprint() needs a callable reducer, got {reducer!r}."
        )
    if cls in _EXACT:
        raise ConfigurationError(
            f"{cls.__qualname__} has a built-in fingerprint that cannot be replaced; "
            "register a subclass instead."
        )
    _REGISTRY[cls] = reducer
    _RESOLVED.clear()


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
    handler(value, w, ctx)


def _enter(value: object, w: _Writer, ctx: _Context) -> bool:
    """Push a mutable container; if it is already being walked, write a back-reference."""
    seen = ctx.active.get(id(value))
    if seen is not None:
        w.buf += b"R"
        w.buf += _pack_u(ctx.depth - seen)
        return False
    ctx.depth += 1
    ctx.active[id(value)] = ctx.depth
    return True


def _leave(value: object, ctx: _Context) -> None:
    del ctx.active[id(value)]
    ctx.depth -= 1


def _h_none(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"N"


def _h_bool(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"T" if v else b"F"


def _h_int(v: Any, w: _Writer, ctx: _Context) -> None:
    if _I64_MIN <= v <= _I64_MAX:
        w.buf += b"i"
        w.buf += _pack_q(v)
    else:
        w.buf += b"I"
        w.blob(v.to_bytes(v.bit_length() // 8 + 1, "little", signed=True))


def _h_float(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"f"
    w.buf += _NAN if math.isnan(v) else _pack_d(v)


def _h_complex(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"c"
    w.buf += _NAN if math.isnan(v.real) else _pack_d(v.real)
    w.buf += _NAN if math.isnan(v.imag) else _pack_d(v.imag)


def _h_str(v: Any, w: _Writer, ctx: _Context) -> None:
    data = v.encode("utf-8", "surrogatepass")
    w.buf += b"s"
    w.buf += _pack_u(len(data))
    w.buf += data


def _h_bytes(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"b"
    w.blob(v)


def _h_bytearray(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"B"
    w.blob(v)


def _h_memoryview(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"m"
    _walk((v.format, v.shape), w, ctx)
    w.blob(v.cast("B") if v.c_contiguous else v.tobytes())


def _h_tuple(v: Any, w: _Writer, ctx: _Context) -> None:
    # Tuples are not tracked for cycles: a cycle needs a mutable container, which is.
    w.buf += b"t"
    w.buf += _pack_u(len(v))
    _walk_items(v, w, ctx)


def _walk_items(v: Any, w: _Writer, ctx: _Context) -> None:
    """The items of a sequence, in order (the hot loop: exact types skip ``_walk``)."""
    exact = _EXACT
    for i, item in enumerate(v):
        try:
            handler = exact.get(type(item))
            if handler is None:
                _walk(item, w, ctx)
            else:
                handler(item, w, ctx)
        except UnhashableError as exc:
            raise _at(exc, f"[{i}]") from exc.__cause__


def _h_list(v: Any, w: _Writer, ctx: _Context) -> None:
    if not _enter(v, w, ctx):
        return
    try:
        w.buf += b"l"
        w.buf += _pack_u(len(v))
        _walk_items(v, w, ctx)
    finally:
        _leave(v, ctx)


def _item_digests(items: Any, ctx: _Context, attrs: bool = False) -> bytes:
    """Sorted digests of (key, value) pairs: an order-insensitive multiset."""
    digests = []
    sub = _Writer()
    for key, item in items:
        try:
            _walk(key, sub, ctx)
            _walk(item, sub, ctx)
        except UnhashableError as exc:
            segment = f".{key}" if attrs and isinstance(key, str) else _key_segment(key)
            raise _at(exc, segment) from exc.__cause__
        digests.append(sub.take())
    digests.sort()
    return _pack_u(len(digests)) + b"".join(digests)


def _h_dict(v: Any, w: _Writer, ctx: _Context) -> None:
    if not _enter(v, w, ctx):
        return
    try:
        w.buf += b"d"
        w.buf += _item_digests(list(v.items()), ctx)
    finally:
        _leave(v, ctx)


def _set_digests(v: Any, ctx: _Context) -> bytes:
    digests = []
    sub = _Writer()
    for item in v:
        try:
            _walk(item, sub, ctx)
        except UnhashableError as exc:
            raise _at(exc, f"{{<{type(item).__qualname__} element>}}") from exc.__cause__
        digests.append(sub.take())
    digests.sort()
    return _pack_u(len(digests)) + b"".join(digests)


def _h_set(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"S" if isinstance(v, set) else b"Z"
    w.buf += _set_digests(v, ctx)


def _h_range(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"r"
    _walk((v.start, v.stop, v.step), w, ctx)


def _h_slice(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"L"
    _walk((v.start, v.stop, v.step), w, ctx)


def _h_singleton(tag: bytes) -> Handler:
    def handler(v: Any, w: _Writer, ctx: _Context) -> None:
        w.buf += tag

    return handler


def _walk_tz(tz: Any, w: _Writer, ctx: _Context) -> None:
    # Markers below 0x20 never start a value, so they cannot be confused with one.
    if isinstance(tz, datetime.timezone):
        w.buf += b"\x01"
        _walk((tz.utcoffset(None), tz.tzname(None)), w, ctx)
    elif isinstance(getattr(tz, "key", None), str):  # zoneinfo.ZoneInfo
        w.buf += b"\x02"
        _h_str(tz.key, w, ctx)
    elif isinstance(getattr(tz, "zone", None), str):  # pytz
        w.buf += b"\x03"
        _h_str(tz.zone, w, ctx)
    else:  # None, or another tzinfo: by value
        _walk(tz, w, ctx)


def _h_datetime(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"W"
    _walk((v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, v.fold), w, ctx)
    _walk_tz(v.tzinfo, w, ctx)


def _h_date(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"Y"
    _h_int(v.toordinal(), w, ctx)


def _h_time(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"H"
    _walk((v.hour, v.minute, v.second, v.microsecond, v.fold), w, ctx)
    _walk_tz(v.tzinfo, w, ctx)


def _h_timedelta(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"V"
    _walk((v.days, v.seconds, v.microseconds), w, ctx)


def _h_decimal(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"M"
    _h_str(str(v), w, ctx)


def _h_fraction(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"Q"
    _walk((v.numerator, v.denominator), w, ctx)


def _h_uuid(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"U"
    w.buf += v.bytes


def _h_path(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"P"
    _walk(("windows" if isinstance(v, pathlib.PureWindowsPath) else "posix", str(v)), w, ctx)


# --- classes, functions, modules --------------------------------------------------------


def _package_version(module: str) -> str | None:
    top = sys.modules.get(module.partition(".")[0])
    version = getattr(top, "__version__", None)
    return version if isinstance(version, str) else None


def _class_source(cls: type) -> str | None:
    """The class's source hash from sourcehash; module version if sourcehash is absent."""
    try:
        from notebook_flow.sourcehash import class_fingerprint
    except ImportError:  # being written concurrently; module + qualname still identify it
        return _package_version(cls.__module__)
    try:
        return str(class_fingerprint(cls))
    except UnhashableError:
        raise
    except Exception as exc:  # e.g. a C-implemented class with no source to read
        logger.debug("class_fingerprint(%s) failed (%r); using its name", cls.__qualname__, exc)
        return _package_version(cls.__module__)


def _walk_class(cls: type, w: _Writer, ctx: _Context) -> None:
    w.buf += b"y"
    _h_str(cls.__module__, w, ctx)
    _h_str(cls.__qualname__, w, ctx)
    if cls.__module__ == "builtins":
        w.buf += b"N"
    else:
        _walk(_class_source(cls), w, ctx)


def _h_type(v: Any, w: _Writer, ctx: _Context) -> None:
    _walk_class(v, w, ctx)


def _code_token(code: types.CodeType) -> tuple[object, ...]:
    consts = tuple(_code_token(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return (
        code.co_name,
        code.co_code,
        consts,
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
    )


def _h_code(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"o"
    _walk(_code_token(v), w, ctx)


def _h_function(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"x"
    _walk((v.__module__, v.__qualname__), w, ctx)
    if not _enter(v, w, ctx):  # entered first: sourcehash may meet v again in a closure
        return
    try:
        try:
            from notebook_flow.sourcehash import function_fingerprint
        except ImportError:  # being written concurrently: hash the code object instead
            _walk_code_fallback(v, w, ctx)
        else:
            digest = _call(v, lambda: function_fingerprint(v), "sourcehash.function_fingerprint()")
            _h_str(str(digest), w, ctx)
    finally:
        _leave(v, ctx)


def _walk_code_fallback(v: Any, w: _Writer, ctx: _Context) -> None:
    """Bytecode, constants, names, defaults and closure values (no transitive globals)."""
    _walk(_code_token(v.__code__), w, ctx)
    for name, value in (("__defaults__", v.__defaults__), ("__kwdefaults__", v.__kwdefaults__)):
        try:
            _walk(value, w, ctx)
        except UnhashableError as exc:
            raise _at(exc, f".{name}") from exc.__cause__
    for name, cell in zip(v.__code__.co_freevars, v.__closure__ or (), strict=False):
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            w.buf += b"\x00"
            continue
        try:
            _walk(contents, w, ctx)
        except UnhashableError as exc:
            raise _at(exc, f".<closure {name}>") from exc.__cause__


def _h_method(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"X"
    try:
        _walk(v.__self__, w, ctx)
    except UnhashableError as exc:
        raise _at(exc, ".__self__") from exc.__cause__
    _walk(v.__func__, w, ctx)


def _h_builtin(v: Any, w: _Writer, ctx: _Context) -> None:
    """Built-in functions and method descriptors: by name, plus the bound object if any."""
    w.buf += b"k"
    owner = getattr(v, "__objclass__", None)
    _walk((getattr(v, "__module__", None), owner.__qualname__ if owner else None), w, ctx)
    _h_str(getattr(v, "__qualname__", v.__name__), w, ctx)
    bound = getattr(v, "__self__", None)
    if bound is None or isinstance(bound, types.ModuleType):
        w.buf += b"N"
        return
    try:
        _walk(bound, w, ctx)
    except UnhashableError as exc:
        raise _at(exc, ".__self__") from exc.__cause__


def _h_module(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"u"
    _walk((v.__name__, _package_version(v.__name__)), w, ctx)


def _h_enum(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"e"
    _walk_class(type(v), w, ctx)
    _walk((v.name, v.value), w, ctx)


def _h_dataclass(v: Any, w: _Writer, ctx: _Context) -> None:
    if not _enter(v, w, ctx):
        return
    try:
        w.buf += b"a"
        _walk_class(type(v), w, ctx)
        fields = dataclasses.fields(v)
        w.buf += _pack_u(len(fields))
        for field in fields:
            _h_str(field.name, w, ctx)
            try:
                _walk(getattr(v, field.name), w, ctx)
            except UnhashableError as exc:
                raise _at(exc, f".{field.name}") from exc.__cause__
    finally:
        _leave(v, ctx)


def _h_namedtuple(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"q"
    _walk_class(type(v), w, ctx)
    _walk(tuple(v._fields), w, ctx)
    _h_tuple(tuple(v), w, ctx)


def _h_pydantic(v: Any, w: _Writer, ctx: _Context) -> None:
    # The validated field values, like pydantic's own __eq__ (model_dump would turn nested
    # models into plain dicts and run custom serializers, which may be lossy).
    if not _enter(v, w, ctx):
        return
    try:
        w.buf += b"p"
        _walk_class(type(v), w, ctx)
        w.buf += _item_digests(list(vars(v).items()), ctx, attrs=True)
        extra = getattr(v, "__pydantic_extra__", None) or {}
        w.buf += _item_digests(list(extra.items()), ctx, attrs=True)
    finally:
        _leave(v, ctx)


def _h_mappingproxy(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"D"
    w.buf += _item_digests(list(v.items()), ctx)


def _reduced(reducer: Callable[[Any], object], tag: bytes, what: str) -> Handler:
    def handler(v: Any, w: _Writer, ctx: _Context) -> None:
        if not _enter(v, w, ctx):
            return
        try:
            w.buf += tag
            cls = type(v)
            _walk((cls.__module__, cls.__qualname__), w, ctx)
            _walk(_call(v, lambda: reducer(v), what), w, ctx)
        finally:
            _leave(v, ctx)

    return handler


def _walk_reference(obj: Any, w: _Writer, ctx: _Context) -> None:
    """A reconstructor named by a reduce tuple: by reference, as pickle would."""
    if isinstance(obj, type):
        _walk_class(obj, w, ctx)
    else:
        w.buf += b"*"
        _walk((getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)), w, ctx)


def _h_object(v: Any, w: _Writer, ctx: _Context) -> None:
    """Any other object: its class and the state ``__reduce_ex__(4)`` exposes."""
    cls = type(v)
    reducer = copyreg.dispatch_table.get(cls)
    rv = _call(
        v,
        (lambda: reducer(v)) if reducer else (lambda: v.__reduce_ex__(4)),
        "it has no state that can be read: __reduce_ex__(4)",
    )
    if not _enter(v, w, ctx):
        return
    try:
        w.buf += b"O"
        _walk_class(cls, w, ctx)
        if isinstance(rv, str):  # a global singleton, pickled by name
            w.buf += b"&"
            _h_str(rv, w, ctx)
            return
        if not isinstance(rv, tuple) or len(rv) < 2:
            raise _unhashable(v, f"its __reduce__ returned an unusable {type(rv).__name__}")
        rv = rv + (None,) * (5 - len(rv))
        func, args, state, listitems, dictitems = rv[:5]
        if func is copyreg.__newobj__ and args and args[0] is cls:  # type: ignore[attr-defined]
            args = args[1:]
        else:
            _walk_reference(func, w, ctx)
        try:
            _walk(tuple(args), w, ctx)
        except UnhashableError as exc:
            raise _at(exc, ".__reduce__()[1]") from exc.__cause__
        _walk_state(state, w, ctx)
        w.buf += b"l" if listitems is not None else b"N"
        if listitems is not None:
            for i, item in enumerate(listitems):
                try:
                    _walk(item, w, ctx)
                except UnhashableError as exc:
                    raise _at(exc, f"[{i}]") from exc.__cause__
            w.buf += b"."  # end of items (their count is not known in advance)
        if dictitems is None:
            w.buf += b"N"
        elif isinstance(v, collections.OrderedDict):  # order is part of its equality
            w.buf += b"D"
            _walk(list(dictitems), w, ctx)
        else:
            w.buf += b"d"
            w.buf += _item_digests(list(dictitems), ctx)
    finally:
        _leave(v, ctx)


def _walk_state(state: Any, w: _Writer, ctx: _Context) -> None:
    # Markers below 0x20 never start a value, so they cannot be confused with one.
    if isinstance(state, dict):  # __dict__
        w.buf += b"\x01"
        w.buf += _item_digests(list(state.items()), ctx, attrs=True)
    elif (
        isinstance(state, tuple)
        and len(state) == 2
        and isinstance(state[1], dict)
        and (state[0] is None or isinstance(state[0], dict))
    ):  # (__dict__, __slots__)
        w.buf += b"\x02"
        w.buf += _item_digests(list((state[0] or {}).items()), ctx, attrs=True)
        w.buf += _item_digests(list(state[1].items()), ctx, attrs=True)
    else:
        try:
            _walk(state, w, ctx)
        except UnhashableError as exc:
            raise _at(exc, ".__getstate__()") from exc.__cause__


def _h_set_subclass(v: Any, w: _Writer, ctx: _Context) -> None:
    # Not via __reduce__: it lists the elements in hash order, which depends on the seed.
    if not _enter(v, w, ctx):
        return
    try:
        w.buf += b"{"
        _walk_class(type(v), w, ctx)
        w.buf += _set_digests(v, ctx)
        _walk_state(getattr(v, "__dict__", None), w, ctx)
    finally:
        _leave(v, ctx)


def _refuse(reason: str) -> Handler:
    def handler(v: Any, w: _Writer, ctx: _Context) -> None:
        raise _unhashable(v, reason)

    return handler


_FILE = "it is an open file or stream, whose contents and position live outside the value"
_SYNC = "it is a lock, thread or other synchronisation object, which has no value to hash"
_ITER = "it is an iterator or generator, and hashing it would consume it"
_CONN = "it is a database connection or cursor, whose state lives in the database"


def _unhashable_reason(cls: type) -> str | None:
    import io

    if issubclass(cls, io.IOBase):
        return _FILE
    if issubclass(cls, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return _ITER
    if issubclass(cls, Iterator):
        return _ITER
    sync: tuple[type, ...] = (
        type(threading.Lock()),
        type(threading.RLock()),
        threading.Event,
        threading.Condition,
        threading.Semaphore,
        threading.Barrier,
        threading.Thread,
    )
    if issubclass(cls, sync):
        return _SYNC
    if issubclass(cls, (weakref.ref, weakref.ProxyType, weakref.CallableProxyType)):
        return "it is a weak reference, which may die at any moment"
    if issubclass(cls, (types.FrameType, types.TracebackType)):
        return "it is an interpreter frame or traceback"
    socket = sys.modules.get("socket")
    if socket is not None and issubclass(cls, socket.socket):
        return "it is a network socket, whose state lives in the operating system"
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is not None and issubclass(cls, (sqlite3.Connection, sqlite3.Cursor)):
        return _CONN
    if cls.__module__.partition(".")[0] in ("psycopg", "psycopg2", "duckdb", "pymysql"):
        return _CONN
    return None


def _resolve(cls: type) -> Handler:
    """Choose a handler for a type outside the exact built-ins (cached per type)."""
    for base in cls.__mro__:
        reducer = _REGISTRY.get(base)
        if reducer is not None:
            return _reduced(reducer, b"g", f"the reducer registered for {base.__qualname__}")
    hook = getattr(cls, "__notebook_flow_fingerprint__", None)
    if callable(hook):
        return _reduced(
            lambda v: v.__notebook_flow_fingerprint__(), b"h", "__notebook_flow_fingerprint__()"
        )
    handler = _resolve_library(cls)
    if handler is not None:
        return handler
    if issubclass(cls, enum.Enum):
        return _h_enum
    if issubclass(cls, type):
        return _h_type
    if dataclasses.is_dataclass(cls):
        return _h_dataclass
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return _h_namedtuple
    if issubclass(cls, (set, frozenset)):
        return _h_set_subclass
    if issubclass(cls, pathlib.PurePath):
        return _h_path
    if issubclass(cls, types.FunctionType):
        return _h_function
    if issubclass(cls, types.MethodType):
        return _h_method
    if issubclass(cls, types.MappingProxyType):
        return _h_mappingproxy
    if issubclass(cls, types.ModuleType):
        return _h_module
    reason = _unhashable_reason(cls)
    if reason is not None:
        return _refuse(reason)
    return _h_object


def _resolve_library(cls: type) -> Handler | None:
    """Handlers for numpy / pandas / pyarrow / polars / pydantic, if they are loaded."""
    np = sys.modules.get("numpy")
    if np is not None:
        ma = sys.modules.get("numpy.ma")
        if ma is not None and issubclass(cls, ma.MaskedArray):
            return _h_masked
        if issubclass(cls, np.ndarray):
            return _h_ndarray
        if issubclass(cls, np.generic):
            return _h_np_scalar
        if issubclass(cls, np.dtype):
            return _h_np_dtype
    pd = sys.modules.get("pandas")
    if pd is not None:
        pairs: list[tuple[type, Handler]] = [
            (pd.DataFrame, _h_pd_frame),
            (pd.Series, _h_pd_series),
            (pd.Index, _h_pd_index),
            (pd.api.extensions.ExtensionArray, _h_pd_array),
            (pd.Timestamp, _h_pd_timestamp),
            (pd.Timedelta, _h_pd_timestamp),
            (type(pd.NaT), _h_singleton(b"8")),
            (type(pd.NA), _h_singleton(b"9")),
            (pd.api.extensions.ExtensionDtype, _h_pd_dtype),
        ]
        for base, handler in pairs:
            if issubclass(cls, base):
                return handler
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        pa_pairs: list[tuple[type, Handler]] = [
            (pa.Table, _h_pa_table),
            (pa.RecordBatch, _h_pa_table),
            (pa.ChunkedArray, _h_pa_array),
            (pa.Array, _h_pa_array),
            (pa.DataType, _h_pa_type),
            (pa.Schema, _h_pa_schema),
        ]
        for base, handler in pa_pairs:
            if issubclass(cls, base):
                return handler
    pl = sys.modules.get("polars")
    if pl is not None and issubclass(cls, (pl.DataFrame, pl.Series)):
        return _h_polars
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and issubclass(cls, pydantic.BaseModel):
        return _h_pydantic
    return None


# --- numpy ------------------------------------------------------------------------------


def _np_dtype_token(dt: Any) -> object:
    if dt.fields is None and dt.subdtype is None:
        if dt.kind == "T":  # StringDType: its .str is not descriptive
            has_na = hasattr(dt, "na_object")
            return ("T", has_na, getattr(dt, "na_object", None), dt.coerce)
        return dt.str
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return ("sub", _np_dtype_token(base), shape)
    fields = tuple(
        (name, _np_dtype_token(dt.fields[name][0]), dt.fields[name][1:]) for name in dt.names
    )
    return ("struct", dt.itemsize, dt.isalignedstruct, fields)


def _feed_ndarray(a: Any, w: _Writer) -> None:
    """The array's bytes in C order, without copying when it is C-contiguous."""
    import numpy as np

    if a.size == 0 or a.itemsize == 0:
        return
    if a.flags.c_contiguous:
        w.chunk(a.reshape(-1).view(np.uint8))
    elif a.nbytes <= _CHUNK:
        w.chunk(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    else:  # copy a bounded slab at a time
        row = a.nbytes // a.shape[0]
        if row > _CHUNK and a.ndim > 1:
            for i in range(a.shape[0]):
                _feed_ndarray(a[i], w)
            return
        step = max(1, _CHUNK // row)
        for start in range(0, a.shape[0], step):
            slab = np.ascontiguousarray(a[start : start + step])
            w.chunk(slab.reshape(-1).view(np.uint8))


def _walk_object_values(
    values: list[Any], w: _Writer, ctx: _Context, shape: tuple[int, ...]
) -> None:
    """Element by element; long runs of str go through one Arrow string array."""

    def segment(i: int) -> str:
        if len(shape) == 1:
            return f"[{i}]"
        idx = []
        for dim in reversed(shape):
            idx.append(i % dim)
            i //= dim
        return "[" + ", ".join(map(str, reversed(idx))) + "]"

    if len(values) >= _SMALL_OBJECT_ARRAY:
        import numpy as np
        import pyarrow as pa

        if set(map(type, values)) == {str}:  # the common case, checked at C speed
            others = np.zeros(len(values), dtype=bool)
        else:
            others = np.fromiter((type(x) is not str for x in values), bool, count=len(values))
        try:
            strings = pa.array(values, type=pa.large_string(), mask=others)
        except (UnicodeEncodeError, pa.ArrowException):
            pass  # e.g. lone surrogates: fall through to the element-wise walk
        else:
            w.buf += b"["
            w.buf += _arrow_digest(strings.type, [strings])
            positions = np.flatnonzero(others)
            w.buf += _pack_u(len(positions))
            for i in positions.tolist():
                w.buf += _pack_u(i)
                try:
                    _walk(values[i], w, ctx)
                except UnhashableError as exc:
                    raise _at(exc, segment(i)) from exc.__cause__
            return
    w.buf += b"]"
    for i, item in enumerate(values):
        try:
            _walk(item, w, ctx)
        except UnhashableError as exc:
            raise _at(exc, segment(i)) from exc.__cause__


def _walk_ndarray_body(a: Any, w: _Writer, ctx: _Context) -> None:
    dt = a.dtype
    _walk((_np_dtype_token(dt), a.shape), w, ctx)
    if dt.hasobject or dt.kind == "T":
        flat = a.reshape(-1)
        values = flat.astype(object).tolist() if dt.kind == "T" else flat.tolist()
        _walk_object_values(values, w, ctx, a.shape)
    else:
        w.buf += _pack_u(a.nbytes)
        _feed_ndarray(a, w)


def _h_ndarray(v: Any, w: _Writer, ctx: _Context) -> None:
    import numpy as np

    w.buf += b"A"
    cls = type(v)
    # np.memmap is the same data: a result loaded from the cache must key like the original.
    if cls is not np.ndarray and cls is not np.memmap:
        _walk_class(cls, w, ctx)
        _walk_state(dict(getattr(v, "__dict__", {})), w, ctx)
        v = v.view(np.ndarray)
    _walk_ndarray_body(v, w, ctx)


def _h_masked(v: Any, w: _Writer, ctx: _Context) -> None:
    import numpy as np

    w.buf += b"K"
    _walk_class(type(v), w, ctx)
    _walk_ndarray_body(np.ma.getdata(v), w, ctx)
    _walk_ndarray_body(np.ma.getmaskarray(v), w, ctx)
    _walk(v.fill_value, w, ctx)


def _h_np_scalar(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"G"
    _walk(_np_dtype_token(v.dtype), w, ctx)
    if v.dtype.hasobject:
        _walk(v.item(), w, ctx)
    else:
        w.blob(v.tobytes())


def _h_np_dtype(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"J"
    _walk(_np_dtype_token(v), w, ctx)


# --- pyarrow ----------------------------------------------------------------------------


def _arrow_digest(typ: Any, chunks: list[Any]) -> bytes:
    """Digest of a logical Arrow column given as chunks; chunking and slicing never show."""
    import pyarrow as pa

    w = _Writer()
    _h_str(str(typ), w, _NO_CONTEXT)
    total = sum(len(c) for c in chunks)
    nulls = sum(c.null_count for c in chunks)
    w.buf += _pack_u(total) + _pack_u(nulls)
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        return w.digest()
    if isinstance(typ, pa.BaseExtensionType):
        _h_str(typ.extension_name, w, _NO_CONTEXT)
        serialize = getattr(typ, "__arrow_ext_serialize__", None)
        w.blob(serialize() if serialize is not None else b"")
        w.buf += _arrow_digest(typ.storage_type, [c.storage for c in chunks])
        return w.digest()
    if nulls and not pa.types.is_dictionary(typ):
        validity = _Writer()
        for c in chunks:
            validity.chunk(_valid_mask(c).view("uint8"))
        w.buf += validity.digest()
    _arrow_values(typ, chunks, w)
    return w.digest()


def _valid_mask(chunk: Any) -> Any:
    import numpy as np

    if chunk.null_count == 0:
        return np.ones(len(chunk), dtype=bool)
    return np.asarray(chunk.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _arrow_values(typ: Any, chunks: list[Any], w: _Writer) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t = pa.types
    if t.is_dictionary(typ):
        dictionary = chunks[0].dictionary
        if any(not c.dictionary.equals(dictionary) for c in chunks[1:]):
            chunks = pa.chunked_array(chunks, type=typ).unify_dictionaries().chunks
            dictionary = chunks[0].dictionary
        w.buf += _arrow_digest(typ.value_type, [dictionary])
        w.buf += _arrow_digest(typ.index_type, [c.indices for c in chunks])
    elif t.is_null(typ):
        pass
    elif t.is_boolean(typ):
        data = _Writer()
        for c in chunks:
            raw = np.frombuffer(c.buffers()[1], dtype=np.uint8)
            bits = np.unpackbits(raw, bitorder="little")[c.offset : c.offset + len(c)]
            if c.null_count:
                bits[~_valid_mask(c)] = 0
            data.chunk(bits)
        w.buf += data.digest()
    elif t.is_string(typ) or t.is_binary(typ) or t.is_large_string(typ) or t.is_large_binary(typ):
        _arrow_binary(typ, chunks, w)
    elif t.is_string_view(typ) or t.is_binary_view(typ):
        large = pa.large_string() if t.is_string_view(typ) else pa.large_binary()
        _arrow_binary(large, [c.cast(large) for c in chunks], w)
    elif t.is_list(typ) or t.is_large_list(typ):
        lengths = _Writer()
        for c in chunks:
            n = pc.list_value_length(c).fill_null(0).cast(pa.int64())
            lengths.chunk(np.asarray(n.to_numpy()))
        w.buf += lengths.digest()
        children = [c.flatten() for c in chunks]
        w.buf += _arrow_digest(typ.value_type, children)
    elif t.is_fixed_size_list(typ):
        w.buf += _arrow_digest(typ.value_type, [c.flatten() for c in chunks])
    elif t.is_struct(typ):
        flat = [c.flatten() for c in chunks]  # folds the struct's nulls into each field
        for i in range(typ.num_fields):
            w.buf += _arrow_digest(typ.field(i).type, [f[i] for f in flat])
    else:
        try:
            width = typ.byte_width
        except ValueError:  # unions, maps, run-end encoded, ...: exact but slow
            values = _Writer()
            for c in chunks:
                for item in c.to_pylist():
                    _walk(item, values, _Context())
            w.buf += values.digest()
            return
        data = _Writer()
        for c in chunks:
            raw = np.frombuffer(c.buffers()[1], dtype=np.uint8)
            raw = raw[c.offset * width : (c.offset + len(c)) * width]
            if c.null_count:  # bytes under a null slot are undefined: zero them
                raw = raw.reshape(-1, width).copy()
                raw[~_valid_mask(c)] = 0
            data.chunk(raw)
        w.buf += data.digest()


def _arrow_binary(typ: Any, chunks: list[Any], w: _Writer) -> None:
    """Offsets rebased to a running total (as int64) and the referenced bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    large = pa.types.is_large_string(typ) or pa.types.is_large_binary(typ)
    empty = pa.scalar("" if pa.types.is_string(typ) or pa.types.is_large_string(typ) else b"", typ)
    offsets, data = _Writer(), _Writer()
    base = 0
    for c in chunks:
        if c.null_count:  # a null slot may span bytes: make it empty
            c = pc.fill_null(c, empty)
        buffers = c.buffers()
        offs = np.frombuffer(buffers[1], dtype=np.int64 if large else np.int32)
        offs = offs[c.offset : c.offset + len(c) + 1]
        start, end = int(offs[0]), int(offs[-1])
        if large and start == base:
            offsets.chunk(offs[1:])
        else:
            offsets.chunk(offs[1:].astype(np.int64) + (base - start))
        base += end - start
        if end > start:
            data.chunk(memoryview(buffers[2])[start:end])
    w.buf += offsets.digest()
    w.buf += data.digest()


def _chunks_of(column: Any) -> list[Any]:
    return list(column.chunks) if hasattr(column, "chunks") else [column]


def _h_pa_array(v: Any, w: _Writer, ctx: _Context) -> None:
    import pyarrow as pa

    w.buf += b"(" if isinstance(v, pa.ChunkedArray) else b")"
    w.buf += _arrow_digest(v.type, _chunks_of(v))


def _schema_token(schema: Any) -> tuple[object, ...]:
    return tuple((f.name, str(f.type), f.nullable) for f in schema)


def _walk_arrow_table(table: Any, w: _Writer, ctx: _Context) -> None:
    _walk((_schema_token(table.schema), table.num_rows), w, ctx)
    for i in range(table.num_columns):
        column = table.column(i)
        w.buf += _arrow_digest(column.type, _chunks_of(column))


def _h_pa_table(v: Any, w: _Writer, ctx: _Context) -> None:
    import pyarrow as pa

    w.buf += b"!" if isinstance(v, pa.Table) else b"@"
    _walk_arrow_table(v, w, ctx)


def _h_pa_type(v: Any, w: _Writer, ctx: _Context) -> None:
    import pyarrow as pa

    w.buf += b"%"
    _h_str(str(v), w, ctx)
    serialize = getattr(v, "__arrow_ext_serialize__", None)
    w.blob(serialize() if isinstance(v, pa.BaseExtensionType) and serialize else b"")


def _h_pa_schema(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"^"
    metadata = {bytes(k): bytes(val) for k, val in (v.metadata or {}).items()}
    _walk((_schema_token(v), metadata), w, ctx)


def _h_polars(v: Any, w: _Writer, ctx: _Context) -> None:
    import polars as pl

    if isinstance(v, pl.DataFrame):
        w.buf += b"#"
        _walk((tuple(v.columns), v.height), w, ctx)
        for name in v.columns:
            try:
                _walk_polars_series(v.get_column(name), w, ctx)
            except UnhashableError as exc:
                raise _at(exc, _key_segment(name)) from exc.__cause__
    else:
        w.buf += b"$"
        _walk(v.name, w, ctx)
        _walk_polars_series(v, w, ctx)


def _walk_polars_series(v: Any, w: _Writer, ctx: _Context) -> None:
    import polars as pl

    _h_str(str(v.dtype), w, ctx)
    if v.dtype == pl.Object:  # to_arrow() would expose raw pointers: walk the objects
        _walk_object_values(v.to_list(), w, ctx, (len(v),))
        return
    arrow = _call(v, v.to_arrow, "converting it to Arrow")
    w.buf += _arrow_digest(arrow.type, _chunks_of(arrow))


# --- pandas -----------------------------------------------------------------------------


def _walk_pd_values(arr: Any, w: _Writer, ctx: _Context) -> None:
    """An ExtensionArray (or ndarray) with its dtype, hashed by buffers, never by rows."""
    import numpy as np
    import pandas as pd

    dtype = arr.dtype
    if isinstance(dtype, np.dtype):
        w.buf += b"n"
        _walk_ndarray_body(np.asarray(arr), w, ctx)
    elif isinstance(dtype, pd.CategoricalDtype):
        w.buf += b"c"
        _walk(dtype.ordered, w, ctx)
        _h_pd_index(dtype.categories, w, ctx)
        _walk_ndarray_body(np.asarray(arr.codes), w, ctx)
    elif isinstance(dtype, pd.DatetimeTZDtype):
        w.buf += b"t"
        _h_str(str(dtype), w, ctx)
        _walk_ndarray_body(np.asarray(arr.asi8), w, ctx)
    elif hasattr(arr, "__arrow_array__"):
        w.buf += b"a"
        _h_str(str(dtype), w, ctx)
        arrow = arr.__arrow_array__()
        w.buf += _arrow_digest(arrow.type, _chunks_of(arrow))
    else:  # sparse and third-party extension arrays
        w.buf += b"o"
        _h_str(str(dtype), w, ctx)
        _walk_ndarray_body(np.asarray(arr), w, ctx)


def _h_pd_index(v: Any, w: _Writer, ctx: _Context) -> None:
    import pandas as pd

    w.buf += b"3"
    cls = type(v)
    _walk((cls.__module__, cls.__qualname__, tuple(v.names)), w, ctx)
    if isinstance(v, pd.RangeIndex):
        _walk((v.start, v.stop, v.step), w, ctx)
    elif isinstance(v, pd.MultiIndex):  # level values, so unused levels never show
        w.buf += _pack_u(v.nlevels)
        for i in range(v.nlevels):
            _walk_pd_values(v.get_level_values(i).array, w, ctx)
    else:
        _walk_pd_values(v.array, w, ctx)


def _h_pd_series(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"2"
    cls = type(v)
    _walk((cls.__module__, cls.__qualname__, v.name, v.attrs), w, ctx)
    try:
        _h_pd_index(v.index, w, ctx)
    except UnhashableError as exc:
        raise _at(exc, ".index") from exc.__cause__
    try:
        _walk_pd_values(v.array, w, ctx)
    except UnhashableError as exc:
        raise _at(exc, ".values") from exc.__cause__


def _h_pd_frame(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"1"
    cls = type(v)
    _walk((cls.__module__, cls.__qualname__, v.shape, v.attrs), w, ctx)
    try:
        _h_pd_index(v.columns, w, ctx)
    except UnhashableError as exc:
        raise _at(exc, ".columns") from exc.__cause__
    try:
        _h_pd_index(v.index, w, ctx)
    except UnhashableError as exc:
        raise _at(exc, ".index") from exc.__cause__
    for i in range(v.shape[1]):
        try:
            _walk_pd_values(v.iloc[:, i].array, w, ctx)
        except UnhashableError as exc:
            raise _at(exc, _key_segment(v.columns[i])) from exc.__cause__


def _h_pd_array(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"5"
    _walk((type(v).__module__, type(v).__qualname__), w, ctx)
    _walk_pd_values(v, w, ctx)


def _h_pd_timestamp(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"6"
    _walk(v.asm8, w, ctx)  # numpy datetime64/timedelta64 in the value's own unit
    _walk_tz(getattr(v, "tzinfo", None), w, ctx)


def _h_pd_dtype(v: Any, w: _Writer, ctx: _Context) -> None:
    import pandas as pd

    w.buf += b"7"
    _walk((type(v).__module__, type(v).__qualname__, str(v)), w, ctx)
    if isinstance(v, pd.CategoricalDtype):
        _walk((v.ordered, v.categories), w, ctx)


# Exact types dispatched without any isinstance check: the hot path for small arguments.
_EXACT: dict[type, Handler] = {
    type(None): _h_none,
    bool: _h_bool,
    int: _h_int,
    float: _h_float,
    complex: _h_complex,
    str: _h_str,
    bytes: _h_bytes,
    bytearray: _h_bytearray,
    memoryview: _h_memoryview,
    tuple: _h_tuple,
    list: _h_list,
    dict: _h_dict,
    set: _h_set,
    frozenset: _h_set,
    range: _h_range,
    slice: _h_slice,
    type(Ellipsis): _h_singleton(b"E"),
    type(NotImplemented): _h_singleton(b"n"),
    datetime.datetime: _h_datetime,
    datetime.date: _h_date,
    datetime.time: _h_time,
    datetime.timedelta: _h_timedelta,
    decimal.Decimal: _h_decimal,
    fractions.Fraction: _h_fraction,
    uuid.UUID: _h_uuid,
    type: _h_type,
    types.FunctionType: _h_function,
    types.MethodType: _h_method,
    types.BuiltinFunctionType: _h_builtin,
    types.MethodDescriptorType: _h_builtin,
    types.WrapperDescriptorType: _h_builtin,
    types.MethodWrapperType: _h_builtin,
    types.ClassMethodDescriptorType: _h_builtin,
    types.CodeType: _h_code,
    types.ModuleType: _h_module,
    pathlib.PosixPath: _h_path,
    pathlib.WindowsPath: _h_path,
    pathlib.PurePosixPath: _h_path,
    pathlib.PureWindowsPath: _h_path,
}
