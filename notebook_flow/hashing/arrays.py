"""Handlers for numpy arrays and Arrow arrays, hashed by their buffers.

numpy is imported only inside these functions, and only ever reached once the value's
library is loaded (``dispatch._resolve_library`` looks in ``sys.modules``). Contiguous
arrays go to the hasher as memoryviews, never copied; non-contiguous ones a slab at a time.
Arrow columns are hashed as separate streams (validity, offsets, values) whose bytes do
not depend on how an array is sliced or chunked.
"""

from __future__ import annotations

from typing import Any

from notebook_flow.errors import UnhashableError
from notebook_flow.hashing.builtins import _h_str
from notebook_flow.hashing.core import (
    _NO_CONTEXT,
    _at,
    _Context,
    _pack_u,
    _walk,
    _Writer,
)
from notebook_flow.hashing.objects import _walk_class, _walk_state

_CHUNK = 8 << 20  # non-contiguous arrays are copied this many bytes at a time
_SMALL_OBJECT_ARRAY = 512  # longer object arrays hash their str elements through Arrow


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
