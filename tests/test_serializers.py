"""Serializers: choice by type, exact round trips, fallbacks, the registry, signing helpers."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import io
import math
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notebook_flow.errors import ConfigurationError, SerializationError
from notebook_flow.serializers import (
    Serializer,
    SerializerDeclined,
    choose_serializer,
    get_serializer,
    new_signer,
    register_serializer,
    registered_serializers,
    unregister_serializer,
)

REPO = Path(__file__).resolve().parents[1]


def roundtrip(value: object, name: str | None = None, local: Path | None = None) -> object:
    """dump then load with the chosen (or named) serializer; via a file when ``local``."""
    ser = get_serializer(name) if name else choose_serializer(value)
    buf = io.BytesIO()
    ser.dump(value, buf)
    if local is None:
        buf.seek(0)
        return ser.load(buf, local_path=None)
    path = local / f"payload{ser.extension}"
    path.write_bytes(buf.getvalue())
    with open(path, "rb") as f:
        return ser.load(f, local_path=str(path))


def frame_roundtrip(value: pd.DataFrame | pd.Series) -> tuple[str, object]:
    """What the store does: parquet, or pickle when parquet declines."""
    try:
        return "parquet", roundtrip(value, "parquet")
    except SerializerDeclined:
        return "pickle", roundtrip(value, "pickle")


class Color(enum.IntEnum):
    RED = 1


# ------------------------------------------------------------------------------ choice


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.arange(3), "npy"),
        (np.zeros((2, 2), dtype=[("a", "i4"), ("b", "f8")]), "npy"),
        (np.array([1, "x"], dtype=object), "pickle"),
        (np.ma.masked_array([1, 2], mask=[0, 1]), "pickle"),
        (np.float64(1.5), "pickle"),
        (pd.DataFrame({"a": [1]}), "parquet"),
        (pd.Series([1]), "parquet"),
        (pa.table({"a": [1]}), "arrow"),
        (pa.record_batch({"a": [1]}), "pickle"),
        (None, "json"),
        (3, "json"),
        ("s", "json"),
        ({"a": [1, {"b": None}]}, "json"),
        ((1, 2), "pickle"),
        ({1: "int key"}, "pickle"),
        (collections.OrderedDict(a=1), "pickle"),
        ({"a", "b"}, "pickle"),
        (b"bytes", "pickle"),
        (Color.RED, "pickle"),
        (datetime.date(2020, 1, 1), "pickle"),
        (lambda x: x, "pickle"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
def test_choose_by_type(value: object, expected: str) -> None:
    assert choose_serializer(value).name == expected


def test_preferred_serializer() -> None:
    assert choose_serializer([1], "pickle").name == "pickle"
    assert choose_serializer([1], get_serializer("pickle")).name == "pickle"
    with pytest.raises(SerializationError, match="does not accept"):
        choose_serializer((1,), "json")
    with pytest.raises(ConfigurationError, match="no serializer named 'nope'"):
        choose_serializer(1, "nope")


def test_choosing_imports_nothing_heavy() -> None:
    code = (
        "import sys, notebook_flow.serializers as s\n"
        "assert s.choose_serializer({'a': [1, 2.0]}).name == 'json'\n"
        "assert s.choose_serializer((1,)).name == 'pickle'\n"
        "heavy = {'numpy', 'pandas', 'pyarrow', 'cloudpickle'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# -------------------------------------------------------------------------------- json

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(),  # includes lone surrogates
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@given(json_values)
@settings(max_examples=200, deadline=None)
def test_json_round_trips_exactly(value: object) -> None:
    assert choose_serializer(value).name == "json"
    out = roundtrip(value, "json")
    assert out == value
    assert _types(out) == _types(value)


def _types(value: object) -> object:
    if isinstance(value, list):
        return [_types(v) for v in value]
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    return type(value)


def test_json_special_floats() -> None:
    out = roundtrip([math.nan, math.inf, -math.inf, -0.0], "json")
    assert isinstance(out, list)
    assert math.isnan(out[0]) and out[1:3] == [math.inf, -math.inf]
    assert math.copysign(1, out[3]) == -1


def test_json_declines_cycles_and_deep_nesting() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    assert choose_serializer(cycle).name == "pickle"
    deep: list[object] = []
    for _ in range(150):
        deep = [deep]
    assert choose_serializer(deep).name == "pickle"
    assert roundtrip(deep) == deep


# --------------------------------------------------------------------------------- npy

ARRAYS = {
    "f8": np.linspace(0, 1, 12).reshape(3, 4),
    "i1": np.arange(-5, 5, dtype=np.int8),
    "bool": np.array([True, False]),
    "c16": np.array([1 + 2j, -3j]),
    "big-endian": np.arange(4, dtype=">i4"),
    "datetime": np.array(["2020-01-01", "NaT"], dtype="datetime64[ns]"),
    "unicode": np.array(["a", "éé"], dtype="U3"),
    "structured": np.array([(1, 2.5)], dtype=[("a", "i4"), ("b", "f8")]),
    "0-d": np.array(3.5),
    "empty": np.zeros((0, 4)),
    "fortran": np.asfortranarray(np.arange(12).reshape(3, 4)),
    "strided": np.arange(20)[::3],
    "float16": np.array([1, 2], dtype=np.float16),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
@pytest.mark.parametrize("local", [False, True], ids=["memory", "mmap"])
def test_npy_round_trips(name: str, local: bool, tmp_path: Path) -> None:
    arr = ARRAYS[name]
    out = roundtrip(arr, "npy", tmp_path if local else None)
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    if local and arr.size:
        assert isinstance(out, np.memmap) and not out.flags.writeable
    if name == "fortran":
        assert out.flags.f_contiguous


def test_npy_is_standard_npy(tmp_path: Path) -> None:
    buf = io.BytesIO()
    get_serializer("npy").dump(np.arange(5), buf)
    path = tmp_path / "x.npy"
    path.write_bytes(buf.getvalue())
    np.testing.assert_array_equal(np.load(path), np.arange(5))
    assert len(buf.getvalue()) == 128 + 5 * 8  # header padded to 64 bytes: mmap-aligned


def test_npy_declines_object_arrays() -> None:
    ser = get_serializer("npy")
    assert not ser.accepts(np.array([None]))
    with pytest.raises(SerializerDeclined):
        ser.dump(np.array([None]), io.BytesIO())


# ----------------------------------------------------------------------------- parquet


def _with_attrs(df: pd.DataFrame) -> pd.DataFrame:
    df.attrs["source"] = "test"
    return df


def _with_columns_name(df: pd.DataFrame) -> pd.DataFrame:
    df.columns.name = "cols"
    return df


FRAMES: dict[str, tuple[str, Any]] = {
    "basic": ("parquet", pd.DataFrame({"a": [1, 2], "b": ["x", None], "c": [1.5, np.nan]})),
    "pyarrow-strings": ("parquet", pd.DataFrame({"s": pd.array(["a", None], "string[pyarrow]")})),
    "arrow-ints": ("parquet", pd.DataFrame({"a": pd.array([1, None], dtype="int64[pyarrow]")})),
    "categorical": (
        "parquet",
        pd.DataFrame({"c": pd.Categorical(["a", "b", "a"], ["b", "a", "z"], ordered=True)}),
    ),
    "categorical-index": (
        "parquet",
        pd.DataFrame({"v": [1, 2]}, index=pd.CategoricalIndex(["x", "y"], name="c")),
    ),
    "nullable": (
        "parquet",
        pd.DataFrame(
            {
                "i": pd.array([1, None], dtype="Int64"),
                "b": pd.array([True, None], dtype="boolean"),
            }
        ),
    ),
    "tz": ("parquet", pd.DataFrame({"t": pd.date_range("2020", periods=3, tz="Europe/Paris")})),
    "period-interval": (
        "parquet",
        pd.DataFrame(
            {"p": pd.period_range("2020", periods=2, freq="M"), "i": pd.interval_range(0, 2)}
        ),
    ),
    "timedelta": ("parquet", pd.DataFrame({"d": pd.to_timedelta([1, 2], unit="s")})),
    "named-index": ("parquet", pd.DataFrame({"a": [1, 2]}, index=pd.Index(["p", "q"], name="k"))),
    "range-index": ("parquet", pd.DataFrame({"a": [1, 2]}, index=pd.RangeIndex(5, 7, name="r"))),
    "multi-index": (
        "parquet",
        pd.DataFrame(
            {"a": [1, 2]}, index=pd.MultiIndex.from_tuples([(1, "a"), (2, "b")], names=["x", "y"])
        ),
    ),
    "multi-columns": (
        "parquet",
        pd.DataFrame([[1, 2]], columns=pd.MultiIndex.from_tuples([("a", "b"), ("a", "c")])),
    ),
    "int-columns": ("parquet", pd.DataFrame(np.zeros((2, 3)))),
    "datetime-index-freq": (
        "parquet",
        pd.DataFrame({"a": [1, 2]}, index=pd.date_range("2020", periods=2, freq="D")),
    ),
    "empty-freq": (
        "parquet",
        pd.DataFrame(
            {"a": pd.Series([], dtype="int64")}, index=pd.date_range("2020", periods=0, freq="h")
        ),
    ),
    "attrs": ("parquet", _with_attrs(pd.DataFrame({"a": [1]}))),
    "columns-name": ("parquet", _with_columns_name(pd.DataFrame({"a": [1]}))),
    "decimal-date-bytes": (
        "parquet",
        pd.DataFrame(
            {"d": [decimal.Decimal("1.5")], "t": [datetime.date(2020, 1, 1)], "b": [b"x"]}
        ),
    ),
    "small-types": (
        "parquet",
        pd.DataFrame({"h": np.array([1], np.float16), "u": np.array([1], np.uint8)}),
    ),
    "empty": ("parquet", pd.DataFrame()),
    "series": ("parquet", pd.Series([1, 2], name="s")),
    "series-unnamed": ("parquet", pd.Series(["a", "b"])),
    "series-int-name": ("parquet", pd.Series([1.5], name=3, index=pd.Index(["x"], name="i"))),
    # Not exact through Parquet, so pickled:
    "object-strings": ("pickle", pd.DataFrame({"a": pd.Series(["x", None], dtype=object)})),
    "python-strings": ("pickle", pd.DataFrame({"s": pd.array(["a", None], "string[python]")})),
    "mixed-object": ("pickle", pd.DataFrame({"m": pd.Series([1, "x"], dtype=object)})),
    "mixed-numbers": ("pickle", pd.DataFrame({"m": pd.Series([1, 2.5], dtype=object)})),
    "lists": ("pickle", pd.DataFrame({"l": [[1, 2], [3]]})),
    "int-categories": ("pickle", pd.DataFrame({"c": pd.Categorical([1, 2, 1])})),
    "object-int-index": ("pickle", pd.DataFrame({"a": [1]}, index=pd.Index([1], dtype=object))),
    "duplicate-columns": ("pickle", pd.DataFrame([[1, 2]], columns=["a", "a"])),
    "mixed-labels": ("pickle", pd.DataFrame([[1, 2]], columns=["a", 1])),
    "int-index-name": ("pickle", pd.DataFrame({"a": [1]}, index=pd.Index([3], name=0))),
    "complex": ("pickle", pd.DataFrame({"z": [1 + 2j]})),
    "series-tuple-name": ("pickle", pd.Series([1], name=("a", "b"))),
}


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_frames_round_trip_exactly(name: str) -> None:
    expected_format, value = FRAMES[name]
    used, out = frame_roundtrip(value)
    # The format is pandas 3's choice; pandas 2 (Python 3.10) keeps some of these frames
    # exact through Parquet. Exactness is checked on every version.
    if int(pd.__version__.split(".")[0]) >= 3:
        assert used == expected_format
    if isinstance(value, pd.Series):
        pd.testing.assert_series_equal(out, value, check_exact=True)  # type: ignore[arg-type]
    else:
        pd.testing.assert_frame_equal(out, value, check_exact=True, check_freq=True)  # type: ignore[arg-type]
    assert out.attrs == value.attrs  # type: ignore[attr-defined]


def test_parquet_memory_maps_local_files(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": np.arange(1000), "s": [str(i) for i in range(1000)]})
    pd.testing.assert_frame_equal(roundtrip(df, "parquet", tmp_path), df)  # type: ignore[arg-type]


@pytest.mark.parametrize("rows", [10, 200_000])  # one thread / pyarrow's threaded reader
@pytest.mark.parametrize("local", [False, True])
def test_parquet_small_and_large_frames_load_alike(rows: int, local: bool, tmp_path: Path) -> None:
    from notebook_flow import serializers

    index = pd.date_range("2026-01-01", periods=rows, freq="min", name="t")
    df = pd.DataFrame(
        {"x": np.arange(rows, dtype="float64"), "s": pd.array(["a", "b"] * (rows // 2), "str")},
        index=index,
    )
    df.attrs = {"unit": "m"}
    assert (rows * 3 > serializers._SMALL_FRAME_CELLS) == (rows > 10)  # both paths are taken
    out = roundtrip(df, "parquet", tmp_path if local else None)
    pd.testing.assert_frame_equal(out, df, check_exact=True, check_freq=True)  # type: ignore[arg-type]
    assert out.attrs == df.attrs  # type: ignore[attr-defined]
    series = roundtrip(df["x"], "parquet", tmp_path if local else None)
    pd.testing.assert_series_equal(series, df["x"], check_exact=True, check_freq=True)  # type: ignore[arg-type]


def test_arrow_round_trips(tmp_path: Path) -> None:
    table = pa.table({"a": [1, 2], "d": pa.array(["x", "y"]).dictionary_encode()})
    table = table.replace_schema_metadata({"k": "v"})
    for local in (None, tmp_path):
        out = roundtrip(table, "arrow", local)
        assert isinstance(out, pa.Table) and out.equals(table, check_metadata=True)


# ------------------------------------------------------------------------------ pickle


class Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x

    __hash__ = None  # type: ignore[assignment]


def test_pickle_round_trips() -> None:
    value = {"p": Point(3), "t": (1, 2), "f": lambda x: x + 1}
    out = roundtrip(value)
    assert isinstance(out, dict) and out["p"] == Point(3) and out["t"] == (1, 2)
    assert out["f"](1) == 2


def test_unpicklable_value() -> None:
    with pytest.raises(SerializationError, match="cannot pickle"):
        get_serializer("pickle").dump(threading.Lock(), io.BytesIO())


# ---------------------------------------------------------------------------- registry


class UpperText:
    name = "upper-text"
    extension = ".txt"
    pickles = False

    def accepts(self, value: object) -> bool:
        return type(value) is str and value.isupper()

    def dump(self, value: object, file: Any) -> None:
        assert isinstance(value, str)
        file.write(value.encode())

    def load(self, file: Any, *, local_path: str | None) -> object:
        return file.read().decode()


def test_register_custom_serializer() -> None:
    ser = UpperText()
    assert isinstance(ser, Serializer)
    register_serializer(ser)
    try:
        assert choose_serializer("LOUD") is ser
        assert choose_serializer("quiet").name == "json"
        assert get_serializer("upper-text") is ser
        assert registered_serializers()[0] is ser
        with pytest.raises(ConfigurationError, match="already registered"):
            register_serializer(UpperText())
        register_serializer(UpperText(), replace=True)
    finally:
        unregister_serializer("upper-text")
    with pytest.raises(ConfigurationError):
        get_serializer("upper-text")


def test_registry_rejects_bad_serializers() -> None:
    class Named(UpperText):
        pass

    bad_name = Named()
    bad_name.name = "Bad Name"
    bad_ext = Named()
    bad_ext.extension = "txt"
    builtin = Named()
    builtin.name = "pickle"
    for ser in (bad_name, bad_ext, builtin):
        with pytest.raises(ConfigurationError):
            register_serializer(ser)
    with pytest.raises(ConfigurationError, match="not a Serializer"):
        register_serializer(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        unregister_serializer("npy")


# ----------------------------------------------------------------------------- signing


def test_signer_binds_key_and_format() -> None:
    def sig(signing_key: bytes, key: str, fmt: str) -> str:
        mac = new_signer(signing_key, key, fmt)
        mac.update(b"payload")
        return mac.hexdigest()

    base = sig(b"k", "0" * 32, "pickle")
    assert len(base) == 64 and base == sig(b"k", "0" * 32, "pickle")
    assert base != sig(b"k2", "0" * 32, "pickle")
    assert base != sig(b"k", "1" * 32, "pickle")
    assert base != sig(b"k", "0" * 32, "other")
