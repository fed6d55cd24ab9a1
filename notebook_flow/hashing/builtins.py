"""Handlers for the built-in and standard-library value types.

Scalars (None, bool, int, float, complex, str, bytes), containers (tuple, list, dict, set,
frozenset), and range, slice, datetime, decimal, fraction, uuid and path values. Each
writes a one-byte tag and a self-delimiting body; dict and set hash each item on its own
and feed the *sorted item digests*, so the order of items never shows.
"""

from __future__ import annotations

import datetime
import math
import pathlib
import struct
from typing import Any

from notebook_flow.errors import UnhashableError
from notebook_flow.hashing.core import (
    _EXACT,
    Handler,
    _at,
    _Context,
    _enter,
    _key_segment,
    _leave,
    _pack_u,
    _walk,
    _Writer,
)

_pack_q = struct.Struct("<q").pack
_pack_d = struct.Struct("<d").pack
_NAN = _pack_d(math.nan)
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


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
