"""Per-type payload formats, chosen by the type of a result, and the payload HMAC.

A ``Serializer`` turns one value into the bytes of a payload and back; *where* those bytes
live is ``storage.py``'s business (format apart from location). The built-in formats, tried
in this order by ``choose_serializer``:

=========  ==========================================  ======================================
name       accepts                                     notes
=========  ==========================================  ======================================
npy        ``numpy.ndarray`` without object dtype      header + raw buffer in one write;
                                                       memory-mapped (read-only) when local
parquet    ``pandas.DataFrame`` / ``Series``           index, categoricals, extension and
                                                       pyarrow dtypes, ``attrs``, index freq;
                                                       a frame that would not round-trip
                                                       exactly falls back to pickle
arrow      ``pyarrow.Table``                           Arrow IPC file; memory-mapped when local
json       None/bool/int/float/str, lists and          only values that come back *equal and
           str-keyed dicts of them                     of the same types* (no tuples, no
                                                       subclasses)
pickle     anything cloudpickle can pickle             ``pickles=True``: loaded only from an
                                                       authenticated entry, as every format
=========  ==========================================  ======================================

>>> choose_serializer({"rows": [1, 2.5, None]}).name
'json'
>>> choose_serializer((1, 2)).name     # a tuple would come back from JSON as a list
'pickle'

Type checks look for libraries already imported (``_imports.loaded``: never a half-imported
one), so choosing a format for a plain value never imports numpy, pandas or pyarrow.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import pickle
import re
import sys
import threading
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable

from notebook_flow._imports import loaded

from .errors import ConfigurationError, SerializationError, SignatureError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "SIGNING_KEY_ENV",
    "ArrowSerializer",
    "JsonSerializer",
    "NpySerializer",
    "ParquetSerializer",
    "PickleSerializer",
    "Serializer",
    "SerializerDeclined",
    "choose_serializer",
    "get_serializer",
    "new_signer",
    "register_serializer",
    "registered_serializers",
    "signing_key_from_env",
    "unregister_serializer",
    "verify_signature",
]

logger = logging.getLogger("notebook_flow")

#: Environment variable read for the signing key when a store is given none.
SIGNING_KEY_ENV = "NOTEBOOK_FLOW_SIGNING_KEY"  # (the same as notebook_flow.signing's)


@runtime_checkable
class Serializer(Protocol):
    """A payload format. ``name`` is stored in manifests, so never rename one.

    ``dump`` writes the whole payload to ``file`` (a write-only stream that hashes what
    passes through it: never seek or read it). ``load`` gets the payload back; when the
    payload is a local file ``local_path`` names it, so a format can memory-map it instead
    of reading ``file``. ``pickles`` is True when ``load`` can run arbitrary code (pickle).
    Every payload, of every format, is HMAC-signed, and its manifest authenticated, before
    ``load`` sees a byte of it (see :mod:`notebook_flow.storage.trust`).

    >>> class Text:
    ...     name, extension, pickles = "text", ".txt", False
    ...     def accepts(self, value): return type(value) is str
    ...     def dump(self, value, file): file.write(value.encode())
    ...     def load(self, file, *, local_path): return file.read().decode()
    >>> isinstance(Text(), Serializer)
    True
    """

    name: str
    extension: str
    pickles: bool

    def accepts(self, value: object) -> bool: ...

    def dump(self, value: object, file: BinaryIO) -> None: ...

    def load(self, file: BinaryIO, *, local_path: str | None) -> object: ...


class SerializerDeclined(SerializationError):
    """A serializer accepted a value's type but cannot store this value exactly.

    Raised by ``dump`` before it writes anything; the store then falls back to pickle
    (only when the serializer was chosen automatically).
    """


# --------------------------------------------------------------------------------- npy


class NpySerializer:
    """NumPy arrays as ``.npy``: the header, then the raw buffer in a single write.

    Loaded memory-mapped read-only (``np.load(mmap_mode="r")``) when the payload is a local
    file, so a hit on a 1 GB array costs microseconds; copy it (``np.array(x)``) to mutate.
    """

    name = "npy"
    extension = ".npy"
    pickles = False

    def accepts(self, value: object) -> bool:
        np = loaded("numpy")
        if np is None or type(value) not in (np.ndarray, np.memmap):
            return False
        return not value.dtype.hasobject  # type: ignore[attr-defined]

    def dump(self, value: object, file: BinaryIO) -> None:
        import numpy as np

        arr = np.asanyarray(value)
        if arr.dtype.hasobject:
            raise SerializerDeclined("npy cannot store object arrays")
        if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
            arr = np.ascontiguousarray(arr)
        header = np.lib.format.header_data_from_array_1_0(arr)
        try:
            np.lib.format.write_array_header_1_0(file, header)
        except ValueError:  # header > 64 KiB (huge structured dtypes): format 2.0
            np.lib.format.write_array_header_2_0(file, header)
        # A Fortran-ordered array is written as the C-ordered bytes of its transpose, which
        # is what the header's fortran_order=True tells readers.
        flat = arr if arr.flags.c_contiguous else arr.T
        file.write(flat.reshape(-1).view(np.uint8).data)

    def load(self, file: BinaryIO, *, local_path: str | None) -> object:
        import numpy as np

        if local_path is not None:
            return np.load(local_path, mmap_mode="r", allow_pickle=False)
        return np.lib.format.read_array(file, allow_pickle=False)


# ----------------------------------------------------------------------------- parquet

_FRAME_META = b"notebook_flow"


class ParquetSerializer:
    """pandas DataFrames and Series as Parquet (via pyarrow), exactly or not at all.

    Index (named, multi, range), column labels, categoricals, nullable/extension and
    pyarrow dtypes, ``attrs`` and a DatetimeIndex ``freq`` round-trip. Before writing, the
    dtypes the file will load as are predicted from the Arrow schema alone (no data pass);
    if they differ from the frame's (object columns of strings, ints or lists, Python-backed
    strings, categoricals of non-strings, duplicate labels, ...) ``dump`` raises
    ``SerializerDeclined`` and the store pickles the frame instead.
    """

    name = "parquet"
    extension = ".parquet"
    pickles = False

    def accepts(self, value: object) -> bool:
        pd = loaded("pandas")
        return pd is not None and type(value) in (pd.DataFrame, pd.Series)

    def dump(self, value: object, file: BinaryIO) -> None:
        import pyarrow.parquet as pq

        table = _frame_to_table(value)
        pq.write_table(table, file, compression="snappy")

    def load(self, file: BinaryIO, *, local_path: str | None) -> object:
        import pyarrow as pa
        import pyarrow.parquet as pq

        source: Any = local_path if local_path is not None else _buffer_reader(file, pa)
        parquet = pq.ParquetFile(source, memory_map=local_path is not None)
        meta = parquet.metadata
        if meta.num_rows * meta.num_columns > _SMALL_FRAME_CELLS:
            # Large: the dataset reader's parallel column reads are ~25% faster.
            if local_path is None:
                source.seek(0)
            table = pq.read_table(source, memory_map=local_path is not None)
            return _table_to_frame(table)
        # Small (most task results): one thread, no dataset layer, ~3x faster (0.3 vs 0.9
        # ms for 720 rows); pyarrow.dataset is not even imported.
        return _table_to_frame(parquet.read(use_threads=False), use_threads=False)


# Above this many values (rows x columns) a Parquet payload is read with pyarrow's threads.
# Measured: 300k values load alike either way; 30k load ~3x faster on one thread.
_SMALL_FRAME_CELLS = 250_000


def _frame_to_table(value: object) -> pa.Table:
    """Convert a DataFrame/Series to an Arrow table, or decline if it would not round-trip."""
    import pandas as pd
    import pyarrow as pa

    extra: dict[str, Any] = {}
    if isinstance(value, pd.Series):
        name = value.name
        if not (name is None or type(name) in (str, int, float)):
            raise SerializerDeclined(f"Series name of type {type(name).__name__}")
        extra["series"] = {"name": name}
        frame = value.to_frame(name="__series__")
        frame.attrs = dict(value.attrs)
    elif isinstance(value, pd.DataFrame):
        frame = value
    else:  # pragma: no cover - accepts() guards this
        raise SerializerDeclined(f"not a pandas object: {type(value).__name__}")

    if isinstance(frame.index, (pd.DatetimeIndex, pd.TimedeltaIndex)) and frame.index.freq:
        extra["index_freq"] = frame.index.freqstr
    for dtype in [*frame.dtypes, *_index_dtypes(frame.index)]:
        # Parquet keeps the dictionary (and so the categories) only for string categories,
        # and not at all for an empty one (it comes back as an object column).
        if isinstance(dtype, pd.CategoricalDtype) and (
            not pd.api.types.is_string_dtype(dtype.categories.dtype) or not len(dtype.categories)
        ):
            raise SerializerDeclined("categorical with non-string or no categories")
    # pyarrow stringifies other labels (with a warning) and they come back changed.
    if not _labels_round_trip(frame):
        raise SerializerDeclined("column labels or index names that are not all str (or int)")
    try:
        table = pa.Table.from_pandas(frame, preserve_index=None)
    except (pa.ArrowException, ValueError, TypeError, Warning) as exc:
        # Warning: under `-W error` a conversion warning arrives as an exception.
        raise SerializerDeclined(f"pyarrow cannot convert this frame: {exc}") from exc
    metadata = dict(table.schema.metadata or {})
    metadata[_FRAME_META] = json.dumps(extra).encode()
    table = table.replace_schema_metadata(metadata)

    # Predict the loaded dtypes from the schema alone (an empty table) and compare.
    predicted = _table_to_frame(table.schema.empty_table())
    expected = value.to_frame() if isinstance(value, pd.Series) else frame
    if isinstance(predicted, pd.Series):
        predicted = predicted.to_frame()
    assert isinstance(predicted, pd.DataFrame)
    if not _same_layout(expected, predicted):
        raise SerializerDeclined("the frame's dtypes or labels would not round-trip")
    for field, dtype in zip(table.schema, [*frame.dtypes], strict=False):
        if pd.api.types.is_object_dtype(dtype) and pa.types.is_nested(field.type):
            raise SerializerDeclined("object column of lists/dicts")
    return table


def _index_dtypes(index: pd.Index) -> list[Any]:
    levels = getattr(index, "levels", None)
    return [lvl.dtype for lvl in levels] if levels is not None else [index.dtype]


def _labels_round_trip(frame: pd.DataFrame) -> bool:
    names = [*frame.columns.names, *frame.index.names]
    if not all(n is None or type(n) is str for n in names):
        return False
    labels: list[Any] = list(frame.columns)
    if frame.columns.nlevels > 1:
        return all(type(part) is str for label in labels for part in label)
    return all(type(x) is str for x in labels) or all(type(x) is int for x in labels)


def _dtype_signature(dtype: Any) -> object:
    """A dtype, with categoricals reduced to what an empty (schema-only) table can tell."""
    import pandas as pd

    if isinstance(dtype, pd.CategoricalDtype):
        return ("category", dtype.ordered)
    return dtype


def _same_layout(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """True when two frames agree on labels, dtypes and index types (not values).

    ``b`` is predicted from an empty table, which cannot show a RangeIndex's name or a
    categorical's categories; those are carried by pyarrow's metadata and checked by tests.
    """
    import pandas as pd

    range_index = isinstance(a.index, pd.RangeIndex)
    return (
        list(a.columns) == list(b.columns)
        and a.columns.dtype == b.columns.dtype
        and list(a.columns.names) == list(b.columns.names)
        and [_dtype_signature(d) for d in a.dtypes] == [_dtype_signature(d) for d in b.dtypes]
        and type(a.index) is type(b.index)
        and (range_index or list(a.index.names) == list(b.index.names))
        and [_dtype_signature(d) for d in _index_dtypes(a.index)]
        == [_dtype_signature(d) for d in _index_dtypes(b.index)]
    )


def _table_to_frame(table: pa.Table, *, use_threads: bool = True) -> object:
    import pandas as pd

    raw = (table.schema.metadata or {}).get(_FRAME_META)
    extra: dict[str, Any] = json.loads(raw) if raw else {}
    frame = table.to_pandas(use_threads=use_threads)
    freq = extra.get("index_freq")
    if freq is not None and isinstance(frame.index, (pd.DatetimeIndex, pd.TimedeltaIndex)):
        frame.index = type(frame.index)(frame.index, freq=freq)
    if "series" in extra:
        series = frame["__series__"]
        series.name = extra["series"]["name"]
        series.attrs = dict(frame.attrs)
        return series
    return frame


def _buffer_reader(file: BinaryIO, pa: Any) -> Any:
    """A zero-copy pyarrow reader over an in-memory payload."""
    if isinstance(file, io.BytesIO):
        return pa.BufferReader(pa.py_buffer(file.getbuffer()))
    return pa.BufferReader(file.read())


# ------------------------------------------------------------------------------- arrow


class ArrowSerializer:
    """``pyarrow.Table`` as an Arrow IPC file; memory-mapped (zero-copy) when local."""

    name = "arrow"
    extension = ".arrow"
    pickles = False

    def accepts(self, value: object) -> bool:
        pa = loaded("pyarrow")
        return pa is not None and type(value) is pa.Table

    def dump(self, value: object, file: BinaryIO) -> None:
        import pyarrow as pa

        assert isinstance(value, pa.Table)
        with pa.ipc.new_file(file, value.schema) as writer:
            writer.write_table(value)

    def load(self, file: BinaryIO, *, local_path: str | None) -> object:
        import pyarrow as pa

        source = pa.memory_map(local_path, "r") if local_path else _buffer_reader(file, pa)
        return pa.ipc.open_file(source).read_all()


# -------------------------------------------------------------------------------- json

_JSON_MAX_DEPTH = 100


class JsonSerializer:
    """Values that come back from JSON equal and of the same types.

    That is ``None``, ``bool``, ``int``, ``float`` (NaN and infinities included) and
    ``str``, in ``list`` and ``dict`` with ``str`` keys, nested up to 100 levels. Tuples,
    sets, subclasses (``OrderedDict``, enums) and cycles go to pickle instead.
    """

    name = "json"
    extension = ".json"
    pickles = False

    def accepts(self, value: object) -> bool:
        return _json_exact(value, 0)

    def dump(self, value: object, file: BinaryIO) -> None:
        # ensure_ascii keeps lone surrogates representable; allow_nan matches Python's parser.
        text = json.dumps(value, ensure_ascii=True, allow_nan=True, separators=(",", ":"))
        file.write(text.encode("ascii"))

    def load(self, file: BinaryIO, *, local_path: str | None) -> object:
        return json.loads(file.read())


def _json_exact(value: object, depth: int) -> bool:
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return True
    if depth >= _JSON_MAX_DEPTH:  # also ends cycles
        return False
    if kind is list:
        return all(_json_exact(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    if kind is dict:
        return all(
            type(k) is str and _json_exact(v, depth + 1)
            for k, v in value.items()  # type: ignore[attr-defined]
        )
    return False


# ------------------------------------------------------------------------------ pickle


class PickleSerializer:
    """Anything else, with cloudpickle (so lambdas and classes from notebook cells work)."""

    name = "pickle"
    extension = ".pkl"
    pickles = True

    def accepts(self, value: object) -> bool:
        return True

    def dump(self, value: object, file: BinaryIO) -> None:

        try:
            cloudpickler()(file, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
            raise SerializationError(
                f"cannot pickle a value of type {type(value).__qualname__}: {exc}. "
                "Return plain data from the task, or pass cache_policy=NONE to skip caching."
            ) from exc

    def load(self, file: BinaryIO, *, local_path: str | None) -> object:
        return pickle.load(file)


def _numpy_global_random_state() -> object:
    """numpy's global ``RandomState`` (what ``np.random.rand`` draws from), when loading."""
    import numpy.random.mtrand

    return numpy.random.mtrand._rand


_PICKLER: list[type] = []


def cloudpickler() -> Any:
    """cloudpickle's Pickler class, except that numpy's global ``RandomState`` is pickled
    by reference: an object holding it (a scipy.stats distribution) must draw from the
    live global generator after a load, as it did before, not from a private copy. Every
    pickle of a stored value is made by it (or a subclass)."""
    if _PICKLER:
        return _PICKLER[0]
    import cloudpickle

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: object) -> Any:
            mtrand = sys.modules.get("numpy.random.mtrand")
            if mtrand is not None and obj is getattr(mtrand, "_rand", None):
                return _numpy_global_random_state, ()
            return super().reducer_override(obj)

    _PICKLER.append(Pickler)
    return Pickler


# ---------------------------------------------------------------------------- registry

_BUILTINS: tuple[Serializer, ...] = (
    NpySerializer(),
    ParquetSerializer(),
    ArrowSerializer(),
    JsonSerializer(),
    PickleSerializer(),
)
_registry: dict[str, Serializer] = {s.name: s for s in _BUILTINS}
_custom: list[Serializer] = []  # tried before the built-ins, newest first
_registry_lock = threading.Lock()
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_EXT_RE = re.compile(r"^\.[a-z0-9]{1,16}$")


def register_serializer(serializer: Serializer, *, replace: bool = False) -> None:
    """Add a format; ``choose_serializer`` tries it before the built-ins.

    The name is stored in manifests, so register the same serializer in every process that
    reads the store. Names are ``[a-z][a-z0-9_-]*``, extensions ``.[a-z0-9]+``.

    >>> class Text:
    ...     name, extension, pickles = "text-example", ".txt", False
    ...     def accepts(self, value): return type(value) is str
    ...     def dump(self, value, file): file.write(value.encode())
    ...     def load(self, file, *, local_path): return file.read().decode()
    >>> register_serializer(Text(), replace=True)
    >>> choose_serializer("hi").name
    'text-example'
    >>> unregister_serializer("text-example")
    """
    if not isinstance(serializer, Serializer):
        raise ConfigurationError(
            f"{serializer!r} is not a Serializer: it needs name, extension, pickles, "
            "accepts(), dump() and load()"
        )
    if not _NAME_RE.match(serializer.name) or not _EXT_RE.match(serializer.extension):
        raise ConfigurationError(
            f"serializer name {serializer.name!r} / extension {serializer.extension!r} is "
            "invalid: use a name like 'my-format' and an extension like '.myf'"
        )
    with _registry_lock:
        if any(s.name == serializer.name for s in _BUILTINS):
            raise ConfigurationError(f"the built-in serializer {serializer.name!r} is fixed")
        if serializer.name in _registry and not replace:
            raise ConfigurationError(
                f"a serializer named {serializer.name!r} is already registered; "
                "pass replace=True to replace it"
            )
        _custom[:] = [s for s in _custom if s.name != serializer.name]
        _custom.insert(0, serializer)
        _registry[serializer.name] = serializer


def unregister_serializer(name: str) -> None:
    """Remove a custom serializer (stored payloads in its format can no longer be loaded)."""
    with _registry_lock:
        if any(s.name == name for s in _BUILTINS):
            raise ConfigurationError(f"the built-in serializer {name!r} cannot be removed")
        _custom[:] = [s for s in _custom if s.name != name]
        _registry.pop(name, None)


def registered_serializers() -> list[Serializer]:
    """All formats in the order ``choose_serializer`` tries them."""
    with _registry_lock:
        return [*_custom, *_BUILTINS]


def get_serializer(name: str) -> Serializer:
    """The serializer registered under ``name``.

    >>> get_serializer("npy").extension
    '.npy'
    """
    try:
        return _registry[name]
    except KeyError:
        known = ", ".join(sorted(_registry))
        raise ConfigurationError(
            f"no serializer named {name!r} (known: {known}); register_serializer() it first"
        ) from None


def choose_serializer(value: object, preferred: str | Serializer | None = None) -> Serializer:
    """The format for ``value``: ``preferred`` if given, else the first that accepts it.

    A ``preferred`` format that does not accept the value is an error, not a silent
    fallback: the caller asked for it.

    >>> choose_serializer([1, "a"]).name
    'json'
    >>> choose_serializer([1, "a"], "pickle").name
    'pickle'
    """
    if preferred is not None:
        ser = get_serializer(preferred) if isinstance(preferred, str) else preferred
        if not ser.accepts(value):
            raise SerializationError(
                f"serializer {ser.name!r} does not accept a value of type "
                f"{type(value).__qualname__}; pass serializer=None to choose by type"
            )
        return ser
    for ser in registered_serializers():
        if ser.accepts(value):
            return ser
    raise SerializationError(f"no serializer accepts {type(value).__qualname__}")  # unreachable


# ----------------------------------------------------------------------------- signing

_SIGN_DOMAIN = b"notebook_flow payload v1\0"


def signing_key_from_env() -> bytes | None:
    """The signing key from ``$NOTEBOOK_FLOW_SIGNING_KEY`` (UTF-8), or None if unset/empty.

    A key shorter than 16 bytes raises ``ConfigurationError``.
    """
    from .signing import env_signing_key

    return env_signing_key()


def new_signer(signing_key: bytes, key: str, serializer: str) -> hmac.HMAC:
    """An HMAC-SHA256 to feed the payload bytes (of any format) into.

    The cache key and format are mixed in, so a signed payload cannot be replayed as the
    result of another key or read with another format.
    """
    mac = hmac.new(signing_key, _SIGN_DOMAIN, hashlib.sha256)
    mac.update(f"{key}\0{serializer}\0".encode())
    return mac


def verify_signature(mac: hmac.HMAC, signature: str | None, *, what: str) -> None:
    """Compare a finished ``new_signer`` with the manifest's signature; raise if refused."""
    if signature is None:
        raise SignatureError(
            f"{what} is an unsigned pickle and this store requires signatures; it was not "
            "loaded. Recompute it (a signed result replaces it), or open the store without "
            "a signing key if you trust its contents."
        )
    if not hmac.compare_digest(mac.hexdigest(), signature):
        raise SignatureError(
            f"{what}: the signature does not match (tampered, or signed with another key); "
            "it was not unpickled. Check NOTEBOOK_FLOW_SIGNING_KEY, or delete the entry."
        )
