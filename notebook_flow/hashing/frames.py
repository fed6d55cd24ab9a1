"""Handlers for pandas and polars: index, columns and values, never a loop over rows.

Column values go through the same buffer hashing as arrays (``arrays._walk_ndarray_body``
for numpy-backed data, ``arrays._arrow_digest`` for Arrow-backed data); pandas
categoricals hash their categories (in order) plus codes. Float columns hash every NaN as
the same NaN (pandas' missing-value marker; see ``_canonical_nans``).
"""

from __future__ import annotations

from typing import Any

from notebook_flow.errors import UnhashableError
from notebook_flow.hashing.arrays import (
    _arrow_digest,
    _chunks_of,
    _walk_ndarray_body,
    _walk_object_values,
)
from notebook_flow.hashing.builtins import _h_str, _walk_tz
from notebook_flow.hashing.core import (
    _at,
    _call,
    _Context,
    _key_segment,
    _pack_u,
    _walk,
    _Writer,
)


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
        _walk_ndarray_body(_canonical_nans(np.asarray(arr)), w, ctx)
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
    else:  # numpy-backed extension arrays, sparse and third-party ones
        w.buf += b"o"
        _h_str(str(dtype), w, ctx)
        _walk_ndarray_body(_canonical_nans(np.asarray(arr)), w, ctx)


def _canonical_nans(values: Any) -> Any:
    """Every NaN as the one NaN. In pandas a NaN is the missing-value marker, whose sign
    and payload never show, and a Parquet round trip rewrites them (NaN -> null -> NaN):
    without this a loaded frame would not fingerprint like the stored one."""
    import numpy as np

    if values.dtype.kind != "f":
        return values
    mask = np.isnan(values)
    if not mask.any():
        return values
    out = values.copy()
    out[mask] = np.nan
    return out


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
