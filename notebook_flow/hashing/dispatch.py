"""Which handler hashes which type, in a fixed order of precedence.

``_EXACT`` maps the core built-in types straight to their handlers. Any other type is
resolved once (and cached in ``core._RESOLVED``) by :func:`_resolve`, in this order:
a :func:`register_fingerprint` reducer for the class or a base; a
``__notebook_flow_fingerprint__`` method; numpy random generators and scipy
distributions (:mod:`.libraries`); numpy / pandas / pyarrow / polars / pydantic, if
loaded; enums, classes, dataclasses, named tuples, set subclasses, paths, functions,
methods, mapping proxies, modules; a refusal for objects with no value to hash (files,
locks, iterators, connections, ...); else the object's class and pickle state.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import pathlib
import threading
import types
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from notebook_flow._imports import loaded
from notebook_flow.errors import ConfigurationError
from notebook_flow.hashing import libraries, lineage
from notebook_flow.hashing.arrays import (
    _h_masked,
    _h_ndarray,
    _h_np_dtype,
    _h_np_scalar,
    _h_pa_array,
    _h_pa_schema,
    _h_pa_table,
    _h_pa_type,
)
from notebook_flow.hashing.builtins import (
    _h_bool,
    _h_bytearray,
    _h_bytes,
    _h_complex,
    _h_date,
    _h_datetime,
    _h_decimal,
    _h_dict,
    _h_float,
    _h_fraction,
    _h_int,
    _h_list,
    _h_memoryview,
    _h_none,
    _h_path,
    _h_range,
    _h_set,
    _h_singleton,
    _h_slice,
    _h_str,
    _h_time,
    _h_timedelta,
    _h_tuple,
    _h_uuid,
)
from notebook_flow.hashing.core import (
    _EXACT,
    _RESOLVED,
    Handler,
    _Context,
    _unhashable,
    _Writer,
)
from notebook_flow.hashing.frames import (
    _h_pd_array,
    _h_pd_dtype,
    _h_pd_frame,
    _h_pd_index,
    _h_pd_series,
    _h_pd_timestamp,
    _h_polars,
)
from notebook_flow.hashing.objects import (
    _h_builtin,
    _h_code,
    _h_dataclass,
    _h_enum,
    _h_function,
    _h_mappingproxy,
    _h_method,
    _h_module,
    _h_namedtuple,
    _h_object,
    _h_pydantic,
    _h_set_subclass,
    _h_type,
    _reduced,
)

_REGISTRY: dict[type, Callable[[Any], object]] = {}


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
    socket = loaded("socket")
    if socket is not None and issubclass(cls, socket.socket):
        return "it is a network socket, whose state lives in the operating system"
    sqlite3 = loaded("sqlite3")
    if sqlite3 is not None and issubclass(cls, (sqlite3.Connection, sqlite3.Cursor)):
        return _CONN
    if cls.__module__.partition(".")[0] in ("psycopg", "psycopg2", "duckdb", "pymysql"):
        return _CONN
    return None


def _resolve(cls: type) -> Handler:
    """Choose a handler for a type outside the exact built-ins (cached per type)."""
    if lineage.is_lineage_only(cls):
        return _refuse(
            "its class is registered lineage-only: it is fingerprinted only as the output of "
            "a cached cell or task, unchanged since"
        )
    for base in cls.__mro__:
        reducer = _REGISTRY.get(base)
        if reducer is not None:
            return _reduced(reducer, b"g", f"the reducer registered for {base.__qualname__}")
    hook = getattr(cls, "__notebook_flow_fingerprint__", None)
    if callable(hook):
        return _reduced(
            lambda v: v.__notebook_flow_fingerprint__(), b"h", "__notebook_flow_fingerprint__()"
        )
    handler = libraries.resolve(cls) or _resolve_library(cls)
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
    np = loaded("numpy")
    if np is not None:
        ma = loaded("numpy.ma")
        if ma is not None and issubclass(cls, ma.MaskedArray):
            return _h_masked
        if issubclass(cls, np.ndarray):
            return _h_ndarray
        if issubclass(cls, np.generic):
            return _h_np_scalar
        if issubclass(cls, np.dtype):
            return _h_np_dtype
    pd = loaded("pandas")
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
    pa = loaded("pyarrow")
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
    pl = loaded("polars")
    if pl is not None and issubclass(cls, (pl.DataFrame, pl.Series)):
        return _h_polars
    pydantic = loaded("pydantic")
    if pydantic is not None and issubclass(cls, pydantic.BaseModel):
        return _h_pydantic
    return None


# Exact types dispatched without any isinstance check: the hot path for small arguments.
# (core._EXACT is filled in place: builtins._walk_items and core._walk hold that dict.)
_EXACT.update(
    {
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
)
