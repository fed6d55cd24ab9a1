"""notebook_flow.hashing: type-aware, stable fingerprints."""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import io
import json
import math
import os
import pathlib
import random
import re
import runpy
import socket
import sqlite3
import subprocess
import sys
import threading
import tracemalloc
import types
import typing
import uuid
import weakref
import zoneinfo

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notebook_flow.errors import ConfigurationError, UnhashableError
from notebook_flow.hashing import arrays, core, dispatch, fingerprint, register_fingerprint

fp = fingerprint


def distinct(*values: object) -> bool:
    digests = [fp(v) for v in values]
    return len(set(digests)) == len(digests)


# --- scalars and containers -------------------------------------------------------------


def test_digest_shape() -> None:
    digest = fp((42, "abc"))
    assert re.fullmatch(r"[0-9a-f]{32}", digest)
    assert digest == fp((42, "abc"))


def test_type_tags_separate_equal_looking_values() -> None:
    assert distinct(1, 1.0, "1", True, b"1", bytearray(b"1"), memoryview(b"1"), 1 + 0j)
    assert distinct(0, False, None, 0.0, "", b"", (), [], {}, set(), frozenset())
    assert distinct((1, 2), [1, 2], {1, 2}, frozenset({1, 2}), range(1, 3))


def test_encoding_is_unambiguous() -> None:
    assert distinct(("ab", "c"), ("a", "bc"), ("abc",), ("a", "b", "c"))
    assert distinct([[1], 2], [1, [2]], [[1, 2]], [[[1, 2]]])
    assert distinct({"a": "bc"}, {"ab": "c"}, {"a": ("b", "c")})
    assert distinct(b"\x00", b"\x00\x00", b"")


def test_ints_of_any_size() -> None:
    values = [0, 1, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64, 10**100, -(10**100)]
    assert distinct(*values)
    assert fp(10**100) == fp(int("1" + "0" * 100))


def test_floats() -> None:
    assert fp(float("nan")) == fp(math.nan) == fp(-math.nan) == fp(float("inf") - float("inf"))
    assert fp(1.5) == fp(3.0 / 2)
    # -0.0 and 0.0 are told apart (1/x differs), consistently with arrays.
    assert fp(-0.0) == fp(-0.0) != fp(0.0)
    assert distinct(math.inf, -math.inf, math.nan, 1e-300, 5e-324)
    assert fp(complex(math.nan, 1)) == fp(complex(-math.nan, 1))
    assert distinct(1j, 1 + 0j, complex(0, -0.0))


def test_strings_and_bytes() -> None:
    assert fp("héllo") == fp("hé" + "llo")
    assert distinct("a", "A", "a ", "\ud800")  # a lone surrogate is hashable too
    assert fp(b"abc") == fp(bytes([97, 98, 99]))
    assert fp(bytearray(b"abc")) == fp(bytearray(b"abc"))
    big = bytes(range(256)) * 100  # goes straight to the hasher
    assert fp(big) == fp(bytes(big)) != fp(big[:-1])


def test_memoryview() -> None:
    data = np.arange(12, dtype=np.int32)
    assert fp(memoryview(data)) == fp(memoryview(data.copy()))
    assert fp(memoryview(data)[::2]) == fp(memoryview(data[::2].copy()))
    assert fp(memoryview(data)) != fp(memoryview(data.astype(np.int64)))


def test_dict_order_does_not_matter() -> None:
    a = {"x": 1, 2: "y", (3, 4): [5], None: {"z": {1, 2}}}
    b = dict(reversed(list(a.items())))
    assert fp(a) == fp(b)
    assert distinct({"a": 1}, {"a": 2}, {"b": 1}, {"a": 1, "b": 1})
    # Keys of mixed, mutually unorderable types are fine.
    assert fp({1: "a", "1": "b", b"1": "c", None: 0}) == fp({None: 0, b"1": "c", "1": "b", 1: "a"})


def test_set_order_does_not_matter() -> None:
    words = [f"w{i}" for i in range(200)]
    shuffled = words[:]
    random.Random(7).shuffle(shuffled)
    assert fp(set(words)) == fp(set(shuffled))
    assert fp(frozenset(words)) == fp(frozenset(shuffled)) != fp(set(words))
    assert fp({1, "1", (1,)}) == fp({(1,), "1", 1})


def test_multiset_items_are_not_confused() -> None:
    # Per-item digests are combined as a sorted list, not xor-ed: duplicates count.
    assert distinct({"a": 1, "b": 1}, {"a": 2, "b": 2}, {"a": 1, "b": 2})
    assert fp({"a": (1, 2)}) != fp({("a", 1): 2})


def test_mapping_and_sequence_subclasses() -> None:
    od1 = collections.OrderedDict([("a", 1), ("b", 2)])
    od2 = collections.OrderedDict([("b", 2), ("a", 1)])
    assert fp(od1) != fp(od2)  # OrderedDict equality depends on order
    assert fp(od1) == fp(collections.OrderedDict([("a", 1), ("b", 2)]))
    assert fp(od1) != fp(dict(od1))
    dd = collections.defaultdict(list, {"a": [1], "b": [2]})
    dd2 = collections.defaultdict(list, {"b": [2], "a": [1]})
    assert fp(dd) == fp(dd2) != fp(collections.defaultdict(set, {"a": [1], "b": [2]}))
    assert fp(collections.Counter("abca")) == fp(collections.Counter("acab"))
    assert fp(collections.deque([1, 2])) != fp(collections.deque([2, 1]))
    assert fp(types.MappingProxyType({"a": 1})) == fp(types.MappingProxyType({"a": 1}))


class Tags(frozenset):  # type: ignore[type-arg]
    pass


def test_set_subclass_is_order_insensitive() -> None:
    words = [f"t{i}" for i in range(50)]
    assert fp(Tags(words)) == fp(Tags(reversed(words))) != fp(frozenset(words))


def test_misc_builtins() -> None:
    assert fp(range(0, 10, 2)) == fp(range(0, 10, 2)) != fp(range(0, 10, 3))
    assert fp(slice(1, None, 2)) != fp(slice(1, 2, None))
    assert distinct(Ellipsis, NotImplemented, None)


def test_dates_and_times() -> None:
    utc = datetime.timezone.utc
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    naive = datetime.datetime(2026, 11, 1, 12, 30)
    assert fp(naive) == fp(datetime.datetime(2026, 11, 1, 12, 30))
    assert distinct(
        naive,
        naive.replace(tzinfo=utc),
        naive.replace(tzinfo=paris),
        naive.replace(tzinfo=zoneinfo.ZoneInfo("Europe/Berlin")),
        naive.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
        naive.replace(microsecond=1),
        naive.date(),
        naive.time(),
    )
    ambiguous = datetime.datetime(2026, 10, 25, 2, 30, tzinfo=paris)
    assert fp(ambiguous) != fp(ambiguous.replace(fold=1))
    assert fp(datetime.timedelta(days=1)) == fp(datetime.timedelta(hours=24))
    assert fp(datetime.time(1, tzinfo=utc)) != fp(datetime.time(1))


def test_numbers_ids_paths() -> None:
    assert fp(decimal.Decimal("1.10")) == fp(decimal.Decimal("1.10"))
    assert fp(decimal.Decimal("1.1")) != fp(decimal.Decimal("1.10"))  # precision shows later
    assert fp(decimal.Decimal("NaN")) != fp(decimal.Decimal("sNaN"))
    assert fp(fractions.Fraction(2, 4)) == fp(fractions.Fraction(1, 2)) != fp(0.5)
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert fp(u) == fp(uuid.UUID(str(u))) != fp(str(u))
    assert fp(pathlib.Path("a/b")) == fp(pathlib.PurePosixPath("a/b")) != fp("a/b")
    assert fp(pathlib.PurePosixPath("a/b")) != fp(pathlib.PureWindowsPath("a/b"))


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Level(enum.IntEnum):
    LOW = 1


def test_enums_and_types() -> None:
    assert fp(Color.RED) == fp(Color(1)) != fp(Color.GREEN)
    assert distinct(Color.RED, 1, Level.LOW, "RED")
    assert distinct(int, float, str, Color, Level, type)
    assert fp(int) == fp(int)


# --- functions, modules, objects --------------------------------------------------------


def test_functions_and_methods() -> None:
    def f(x: int) -> int:
        return x + 1

    def g(x: int) -> int:
        return x + 2

    assert fp(f) == fp(f)
    assert fp(f) != fp(g)
    assert distinct(len, max, str.upper, "a".upper, "b".upper, [].append, dict.fromkeys)
    assert fp(functools.partial(max, 1)) == fp(functools.partial(max, 1))
    assert fp(functools.partial(max, 1)) != fp(functools.partial(max, 2))


class Point:
    def __init__(self, x: object, y: object) -> None:
        self.x = x
        self.y = y

    def norm(self) -> float:
        return 0.0


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a: object) -> None:
        self.a = a


def test_bound_methods_include_their_object() -> None:
    assert fp(Point(1, 2).norm) == fp(Point(1, 2).norm) != fp(Point(1, 3).norm)


def test_modules() -> None:
    assert fp(math) == fp(sys.modules["math"]) != fp(json)
    assert fp(np) != fp(pd)


def test_plain_objects_by_class_and_state() -> None:
    assert fp(Point(1, [2])) == fp(Point(1, [2]))
    assert distinct(Point(1, 2), Point(2, 1), Point(1, 2.0), (1, 2))
    p, q = Point(1, 2), Point(1, 2)
    q.__dict__ = {"y": 2, "x": 1}  # attribute order is irrelevant
    assert fp(p) == fp(q)
    assert fp(Slotted(1)) == fp(Slotted(1)) != fp(Slotted(2))
    assert fp(re.compile("a+")) == fp(re.compile("a+")) != fp(re.compile("a+", re.I))
    assert fp(random.Random(3)) == fp(random.Random(3)) != fp(random.Random(4))


@dataclasses.dataclass
class Config:
    name: str
    values: list[int]
    extra: dict[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OtherConfig:
    name: str
    values: list[int]
    extra: dict[str, object] = dataclasses.field(default_factory=dict)


def test_dataclasses() -> None:
    assert fp(Config("a", [1])) == fp(Config("a", [1]))
    assert distinct(Config("a", [1]), Config("a", [2]), Config("b", [1]), OtherConfig("a", [1]))


class Model(pydantic.BaseModel):
    a: int
    tags: list[str] = []
    when: datetime.date | None = None


class Loose(pydantic.BaseModel, extra="allow"):
    a: int


def test_pydantic_models() -> None:
    assert fp(Model(a=1)) == fp(Model(a=1, tags=[])) == fp(Model.model_validate({"a": "1"}))
    assert distinct(Model(a=1), Model(a=2), Model(a=1, tags=["x"]), {"a": 1, "tags": []})
    assert fp(Loose(a=1, b=2)) != fp(Loose(a=1, b=3))


def test_pydantic_classes_are_hashed_by_their_definition_and_validators() -> None:
    from notebook_flow.sourcehash import class_fingerprint

    def define(field: str, body: str) -> type:
        ns: dict[str, object] = {"pydantic": pydantic, "__name__": "__main__"}
        code = (
            "class Order(pydantic.BaseModel):\n"
            "    a: int\n"
            "    b: int = 0\n"
            f"    @pydantic.field_validator({field!r})\n"
            "    @classmethod\n"
            "    def check(cls, v):\n"
            f"        return {body}\n"
        )
        exec(compile(code, "<cell>", "exec"), ns)  # a class defined in a notebook cell
        return ns["Order"]  # type: ignore[return-value]

    same = class_fingerprint(define("a", "v")), class_fingerprint(define("a", "v"))
    assert same[0] == same[1]  # pydantic's per-class schema objects (ids inside) are ignored
    assert class_fingerprint(define("b", "v")) != same[0]  # validates another field
    assert class_fingerprint(define("a", "abs(v)")) != same[0]  # validator body edited


class Pair(typing.NamedTuple):
    left: int
    right: str


def test_named_tuples() -> None:
    assert fp(Pair(1, "a")) == fp(Pair(1, "a"))
    assert distinct(Pair(1, "a"), (1, "a"), Pair(2, "a"))
    Legacy = collections.namedtuple("Legacy", "left right")
    assert fp(Legacy(1, "a")) != fp(Pair(1, "a"))


class WithHook:
    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.Lock()

    def __notebook_flow_fingerprint__(self) -> object:
        return self.url


class Connection:
    def __init__(self, url: str) -> None:
        self.url = url
        self.sock = threading.Lock()


def test_fingerprint_hook() -> None:
    assert fp(WithHook("db://a")) == fp(WithHook("db://a")) != fp(WithHook("db://b"))
    assert fp(WithHook("db://a")) != fp("db://a")


def test_register_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_REGISTRY", {})
    with pytest.raises(UnhashableError):
        fp(Connection("db://a"))
    register_fingerprint(Connection, lambda c: ("conn", c.url))
    assert fp(Connection("db://a")) == fp(Connection("db://a")) != fp(Connection("db://b"))

    class Sub(Connection):
        pass

    assert fp(Sub("db://a")) != fp(Connection("db://a"))  # class name is part of it
    with pytest.raises(ConfigurationError):
        register_fingerprint(dict, lambda d: 0)
    with pytest.raises(ConfigurationError):
        register_fingerprint("nope", lambda d: 0)  # type: ignore[arg-type]
    core._RESOLVED.clear()


def test_failing_reducer_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_REGISTRY", {})

    def broken(c: Connection) -> object:
        raise RuntimeError("boom")

    register_fingerprint(Connection, broken)
    with pytest.raises(UnhashableError, match="RuntimeError: boom") as info:
        fp({"c": Connection("x")})
    assert info.value.path == "['c']"
    assert isinstance(info.value.__cause__, RuntimeError)
    core._RESOLVED.clear()


def test_nested_calls_from_reducers_share_the_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_REGISTRY", {})
    # A reducer may call fingerprint() itself; cycles through it still terminate and
    # errors inside it still report the full path.
    register_fingerprint(Connection, lambda c: fingerprint(c.url))
    node = Connection("x")
    node.url = [node]  # type: ignore[assignment]
    assert fp(node) == fp(node)
    node.url = {"k": threading.Lock()}  # type: ignore[assignment]
    with pytest.raises(UnhashableError) as info:
        fp([node])
    assert info.value.path == "[0]['k']"
    assert core._local.ctx is None  # the walk state is reset after an error
    assert fp(1) == fp(1)
    core._RESOLVED.clear()


def test_threads_hash_independently() -> None:
    results: list[str] = []
    value = {"a": [1, 2, {"b": (3, "c")}], "d": Point(1, [2])}
    threads = [threading.Thread(target=lambda: results.append(fp(value))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {fp(value)}


# --- cycles -----------------------------------------------------------------------------


def test_cycles_terminate_and_are_stable() -> None:
    a: list[object] = [1]
    a.append(a)
    b: list[object] = [1]
    b.append(b)
    assert fp(a) == fp(b)
    d: dict[str, object] = {"k": 1}
    d["self"] = d
    assert fp(d) == fp(d)
    p = Point(1, None)
    p.y = p
    q = Point(1, None)
    q.y = q
    assert fp(p) == fp(q)
    # Where the back-reference points matters.
    outer: list[object] = [[]]
    outer[0].append(outer)  # type: ignore[attr-defined]
    inner: list[object] = [[]]
    inner[0].append(inner[0])  # type: ignore[index]
    assert fp(outer) != fp(inner)


def test_shared_references_are_not_cycles() -> None:
    shared = [1, 2]
    assert fp([shared, shared]) == fp([[1, 2], [1, 2]])


def test_too_deep_is_unhashable() -> None:
    value: list[object] = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(UnhashableError, match="nested too deeply"):
        fp(value)


# --- unhashable values ------------------------------------------------------------------


def _gen() -> typing.Iterator[int]:
    yield 1


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: io.StringIO("x"), "open file"),
        (lambda: open(os.devnull), "open file"),
        (threading.Lock, "lock"),
        (threading.RLock, "lock"),
        (threading.Event, "lock"),
        (lambda: threading.Thread(target=print), "thread"),
        (_gen, "generator"),
        (lambda: iter([1, 2]), "iterator"),
        (lambda: map(str, [1]), "iterator"),
        (lambda: sqlite3.connect(":memory:"), "database"),
        (lambda: weakref.ref(Point), "weak reference"),
        (sys._getframe, "frame"),
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "socket"),
    ],
)
def test_unhashable_values(make: typing.Callable[[], object], words: str) -> None:
    value = make()
    try:
        with pytest.raises(UnhashableError, match=words) as info:
            fp({"a": [0, 1, value]})
        assert info.value.path == "['a'][2]"
        assert info.value.type_name.rpartition(".")[2] == type(value).__qualname__
        assert "register_fingerprint" in str(info.value)
    finally:
        close = getattr(value, "close", None)
        if close is not None:
            close()


def test_unhashable_path_inside_objects() -> None:
    with pytest.raises(UnhashableError) as info:
        fp({"a": [0, 1, Connection("x")]})
    err = info.value
    assert err.path == "['a'][2].sock"
    assert err.type_name == "_thread.lock"
    assert "['a'][2].sock" in str(err) and "lock" in str(err)
    with pytest.raises(UnhashableError) as info:
        fp(Config("a", [1], {"f": io.BytesIO()}))
    assert info.value.path == ".extra['f']"
    with pytest.raises(UnhashableError) as info:
        fp({frozenset({1}): threading.Lock()})
    assert info.value.path == "[<frozenset key>]"


def test_unpicklable_c_objects_are_unhashable() -> None:
    import mmap

    with pytest.raises(UnhashableError, match="no state that can be read"):
        fp(mmap.mmap(-1, 16))


# --- numpy ------------------------------------------------------------------------------


def test_numpy_arrays() -> None:
    a = np.arange(24, dtype=np.float64).reshape(4, 6)
    assert fp(a) == fp(a.copy())
    assert distinct(a, a.reshape(6, 4), a.astype(np.float32), a.astype(">f8"), a.T, a + 1)
    changed = a.copy()
    changed[3, 5] = -1
    assert fp(changed) != fp(a)
    assert distinct(np.zeros((0, 3)), np.zeros((3, 0)), np.zeros(0), np.float64(0), np.array(0.0))


def test_non_contiguous_arrays_equal_their_contiguous_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    a = np.arange(10_000, dtype=np.int64).reshape(100, 100)
    views = [a.T, a[::3, 1::2], a[:, 5], np.asfortranarray(a), np.broadcast_to(a[0], (7, 100))]
    for view in views:
        assert fp(view) == fp(np.ascontiguousarray(view))
    monkeypatch.setattr(arrays, "_CHUNK", 256)  # the slab-by-slab copy path
    for view in [*views, a[::2].T[::-1]]:
        assert fp(view) == fp(np.ascontiguousarray(view))


def test_contiguous_arrays_are_not_copied() -> None:
    a = np.random.default_rng(0).random(5_000_000)  # 40 MB
    tracemalloc.start()
    try:
        fp(a)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_numpy_dtypes() -> None:
    s1 = np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")])
    s2 = np.array([(1, 2.0), (3, 4.0)], dtype=[("x", "<i4"), ("b", "<f8")])
    assert fp(s1) == fp(s1.copy()) != fp(s2)
    assert fp(s1[::-1]) == fp(s1[::-1].copy())
    d1 = np.array(["2026-11-01"], dtype="datetime64[ns]")
    assert fp(d1) != fp(d1.astype("datetime64[s]")) and fp(d1) == fp(d1.copy())
    assert fp(np.array(["ab", "c"])) != fp(np.array([b"ab", b"c"]))
    sub = np.zeros(2, dtype=("i4", (3,)))
    assert fp(sub) == fp(sub.copy())
    strings = np.array(["a", "bb", "ccc"], dtype=np.dtypes.StringDType())
    assert fp(strings) == fp(strings.copy()) != fp(np.array(["a", "bb", "ccc"]))
    assert distinct(np.dtype("f8"), np.dtype("f4"), np.dtype([("a", "i4")]), "float64")


def test_numpy_object_arrays() -> None:
    small = np.array([1, "a", None, (1, 2)], dtype=object)
    assert fp(small) == fp(np.array([1, "a", None, (1, 2)], dtype=object))
    assert fp(small) != fp(np.array([1, "a", None, (1, 3)], dtype=object))
    big = np.array([f"s{i}" for i in range(2000)] + [None, 1.5, "x"], dtype=object)
    big2 = big.copy()
    assert fp(big) == fp(big2)
    big2[-2] = 2.5
    assert fp(big) != fp(big2)
    big2 = big.copy()
    big2[5] = "changed"
    assert fp(big) != fp(big2)
    assert fp(big[::2]) == fp(big[::2].copy())
    with pytest.raises(UnhashableError) as info:
        fp(np.array([[1, threading.Lock()]], dtype=object))
    assert info.value.path == "[0, 1]"
    structured = np.array([(1, "a")], dtype=[("n", "i4"), ("o", "O")])
    assert fp(structured) == fp(structured.copy())


def test_numpy_scalars_differ_from_python_scalars() -> None:
    assert distinct(np.float64(1.0), 1.0, np.float32(1.0), np.int64(1), 1, np.str_("a"), "a")
    assert fp(np.float64(1.5)) == fp(np.float64(1.5))
    assert fp(np.datetime64("2026-01-01", "D")) != fp(np.datetime64("2026-01-01", "s"))


def test_memmap_equals_ndarray(tmp_path: pathlib.Path) -> None:
    m = np.memmap(tmp_path / "a.dat", dtype="f8", mode="w+", shape=(10,))
    m[:] = np.arange(10)
    assert fp(m) == fp(np.arange(10, dtype="f8"))
    del m


class Tagged(np.ndarray):  # type: ignore[type-arg]
    def __new__(cls, data: np.ndarray) -> Tagged:  # type: ignore[type-arg]
        return np.asarray(data).view(cls)


def test_masked_and_subclassed_arrays() -> None:
    m1 = np.ma.masked_array([1, 2, 3], mask=[0, 1, 0])
    m2 = np.ma.masked_array([1, 2, 3], mask=[0, 0, 1])
    assert fp(m1) != fp(m2) and fp(m1) == fp(m1.copy())
    assert fp(m1) != fp(np.array([1, 2, 3]))
    assert fp(Tagged(np.eye(2))) != fp(np.eye(2))
    assert fp(Tagged(np.eye(2))) == fp(Tagged(np.eye(2)))


# --- pandas -----------------------------------------------------------------------------


def make_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "i": [1, 2, 3],
            "f": [1.0, np.nan, 3.0],
            "s": ["a", None, "c"],
            "c": pd.Categorical(["x", "y", "x"]),
            "t": pd.date_range("2026-01-01", periods=3, tz="Europe/Paris"),
            "n": pd.array([1, None, 3], dtype="Int64"),
            "b": pd.array([True, None, False], dtype="boolean"),
            "o": pd.Series(["a", 1, None], dtype=object),
        },
        index=pd.Index([10, 20, 30], name="id"),
    )


def test_dataframe_equal_and_different() -> None:
    base = make_frame()
    h = fp(base)
    assert fp(make_frame()) == h == fp(base.copy())
    changed = base.copy()
    changed.loc[20, "i"] = 9
    assert fp(changed) != h
    changed = base.copy()
    changed.loc[30, "s"] = "C"
    assert fp(changed) != h
    assert fp(base.rename(columns={"i": "j"})) != h
    assert fp(base.set_axis([1, 2, 3])) != h
    assert fp(base.rename_axis("other")) != h
    assert fp(base.astype({"i": "int32"})) != h
    assert fp(base.astype({"i": "float64"})) != h
    assert fp(base[list(reversed(base.columns))]) != h
    assert fp(base.iloc[::-1]) != h
    with_attrs = base.copy()
    with_attrs.attrs["unit"] = "m"
    assert fp(with_attrs) != h


def test_dataframe_layout_does_not_matter() -> None:
    data = np.arange(20, dtype=np.float64).reshape(5, 4)
    from_2d = pd.DataFrame(data, columns=list("abcd"))  # one strided 2-D block
    from_cols = pd.DataFrame({c: data[:, i].copy() for i, c in enumerate("abcd")})
    assert fp(from_2d) == fp(from_cols)
    big = pd.DataFrame({"s": [f"v{i}" for i in range(100)], "i": range(100)})
    sliced = big.iloc[10:20]  # arrow string slice with a non-zero offset
    rebuilt = pd.DataFrame(
        {"s": [f"v{i}" for i in range(10, 20)], "i": range(10, 20)}, index=range(10, 20)
    )
    assert fp(sliced) == fp(rebuilt)


def test_pandas_strings_nulls_and_dtypes() -> None:
    arrow_str = pd.Series(["a", None, "c"])
    assert str(arrow_str.dtype) == "str"
    assert distinct(
        arrow_str,
        pd.Series(["a", None, "c"], dtype=object),
        pd.Series(["a", None, "c"], dtype="string[python]"),
        pd.Series(["a", "", "c"]),
        pd.Series(["a", None, "c"], dtype="category"),
    )
    assert fp(pd.Series(["a", None, "c"], dtype="string[pyarrow]")) == fp(
        pd.Series(["a", None, "c"], dtype="string[pyarrow]")
    )
    ints = pd.Series([1, None, 3], dtype="Int64")
    assert fp(ints) != fp(pd.Series([1, 0, 3], dtype="Int64"))
    assert fp(ints) != fp(pd.Series([1.0, None, 3.0]))
    none_vs_nan = [
        pd.Series([None, "a"] * 300, dtype=object),
        pd.Series([np.nan, "a"] * 300, dtype=object),
    ]
    assert distinct(*none_vs_nan)
    assert fp(pd.Series(["a", "b"], name="x")) != fp(pd.Series(["a", "b"], name="y"))


def test_pandas_categoricals_and_times() -> None:
    c1 = pd.Categorical(["a", "b", "a"])
    assert fp(c1) == fp(pd.Categorical(["a", "b", "a"]))
    assert distinct(
        c1,
        pd.Categorical(["a", "b", "a"], categories=["b", "a"]),
        pd.Categorical(["a", "b", "a"], ordered=True),
        pd.Categorical(["a", "b", "b"]),
    )
    t = pd.Series(pd.date_range("2026-01-01", periods=4, freq="h", tz="UTC"))
    assert distinct(
        t, t.dt.tz_convert("Europe/Paris"), t.dt.tz_localize(None), t.astype("datetime64[ns, UTC]")
    )
    assert fp(pd.Timestamp("2026-01-01", tz="UTC")) == fp(
        pd.Timestamp("2026-01-01T00:00", tz="UTC")
    )
    assert distinct(
        pd.Timestamp("2026-01-01"),
        pd.Timestamp("2026-01-01", tz="UTC"),
        datetime.datetime(2026, 1, 1),
    )
    assert distinct(
        pd.NaT, pd.NA, None, np.nan, pd.Timedelta(1, "s"), datetime.timedelta(seconds=1)
    )
    periods = pd.Series(pd.period_range("2026-01", periods=3, freq="M"))
    assert fp(periods) == fp(pd.Series(pd.period_range("2026-01", periods=3, freq="M")))
    assert fp(periods) != fp(pd.Series(pd.period_range("2026-01", periods=3, freq="D")))
    assert fp(pd.Series(pd.interval_range(0, 3))) != fp(
        pd.Series(pd.interval_range(0, 3, closed="left"))
    )
    assert fp(pd.Series(pd.arrays.SparseArray([0, 1, 0]))) != fp(pd.Series([0, 1, 0]))


def test_pandas_indexes() -> None:
    assert distinct(
        pd.RangeIndex(3), pd.Index([0, 1, 2]), pd.RangeIndex(3, name="n"), pd.Index(["a"])
    )
    mi = pd.MultiIndex.from_product([["a", "b"], [1, 2]], names=["k", "n"])
    assert fp(mi) == fp(pd.MultiIndex.from_product([["a", "b"], [1, 2]], names=["k", "n"]))
    # Unused levels left behind by slicing do not matter; the values do.
    assert fp(mi[:2]) == fp(pd.MultiIndex.from_tuples([("a", 1), ("a", 2)], names=["k", "n"]))
    assert fp(mi) != fp(mi.set_names(["k", "m"]))
    s = pd.Series(range(4), index=mi)
    assert fp(s) != fp(s.reset_index(drop=True))
    assert fp(pd.CategoricalIndex(["a", "b"])) != fp(pd.Index(["a", "b"]))


def test_pandas_large_object_column_is_exact() -> None:
    values = [f"s{i}" for i in range(3000)]
    a = pd.DataFrame({"o": pd.Series(values, dtype=object)})
    b = pd.DataFrame({"o": pd.Series(values, dtype=object)})
    assert fp(a) == fp(b)
    b.iloc[1234, 0] = "x"
    assert fp(a) != fp(b)
    with pytest.raises(UnhashableError) as info:
        fp(pd.DataFrame({"col": pd.Series([1, threading.Lock()], dtype=object)}))
    assert info.value.path == "['col'][1]"


# --- pyarrow and polars -----------------------------------------------------------------


def arrow_table() -> pa.Table:
    n = 40
    return pa.table(
        {
            "i": pa.array([i if i % 7 else None for i in range(n)], pa.int64()),
            "f": [i / 3 for i in range(n)],
            "s": [f"v{i}" if i % 5 else None for i in range(n)],
            "ls": pa.array(["x" * (i % 4) for i in range(n)], pa.string()),
            "b": [i % 3 == 0 if i % 11 else None for i in range(n)],
            "l": [[i, i + 1] if i % 4 else None for i in range(n)],
            "st": [{"x": i, "y": str(i)} if i % 6 else None for i in range(n)],
            "d": pa.array([["a", "b", "c"][i % 3] for i in range(n)]).dictionary_encode(),
            "ts": pa.array(list(range(n)), pa.timestamp("us", tz="UTC")),
            "dec": pa.array([decimal.Decimal(i) for i in range(n)], pa.decimal128(10, 2)),
            "fsl": pa.array([[i, i] for i in range(n)], pa.list_(pa.int32(), 2)),
            "sv": pa.array([str(i) for i in range(n)], pa.string_view()),
        }
    )


def test_arrow_chunking_does_not_matter() -> None:
    t = arrow_table()
    rechunked = pa.concat_tables([t.slice(0, 3), t.slice(3, 0), t.slice(3, 13), t.slice(16)])
    assert rechunked.column("i").num_chunks == 4
    assert fp(t) == fp(rechunked) == fp(t.combine_chunks())
    for name in t.column_names:
        assert fp(t.column(name)) == fp(rechunked.column(name)), name
    sliced = t.slice(5, 20).drop_columns(["d"])
    assert fp(sliced) == fp(pa.Table.from_pylist(sliced.to_pylist(), schema=sliced.schema))


def test_arrow_dictionaries_hash_dictionary_and_indices() -> None:
    # A dictionary array is its dictionary plus indices: re-encoding it is a (safe) miss.
    a = pa.array(["b", "a", "b"]).dictionary_encode()
    b = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0], pa.int32()), pa.array(["b", "a"]))
    c = pa.DictionaryArray.from_arrays(pa.array([1, 0, 1], pa.int32()), pa.array(["a", "b"]))
    assert fp(a) == fp(b) != fp(c)
    # Chunks with different dictionaries are unified first.
    split = pa.chunked_array(
        [pa.array(["b"]).dictionary_encode(), pa.array(["a", "b"]).dictionary_encode()]
    )
    assert fp(split) == fp(pa.chunked_array([a]))


def test_arrow_differences() -> None:
    t = arrow_table()
    assert distinct(
        t,
        t.slice(1),
        t.rename_columns([f"{c}_" for c in t.column_names]),
        t.set_column(0, "i", pa.array(range(40), pa.int64())),
        t.cast(t.schema.set(1, pa.field("f", pa.float32()))),
        pa.RecordBatch.from_pydict(t.to_pydict(), schema=t.schema),
    )
    assert distinct(
        pa.array([1, None]), pa.array([1, 0]), pa.array([None, 1]), pa.chunked_array([[1, None]])
    )
    assert distinct(pa.array(["ab", "c"]), pa.array(["a", "bc"]), pa.array(["abc", ""]))
    assert fp(pa.array([1, None])) == fp(pa.array([1, None]))


def test_arrow_values_under_nulls_are_ignored() -> None:
    validity = pa.py_buffer(bytes([0b101]))
    ints = [
        pa.Array.from_buffers(
            pa.int64(), 3, [validity, pa.py_buffer(np.array([1, v, 3]).tobytes())]
        )
        for v in (0, 999)
    ]
    assert fp(ints[0]) == fp(ints[1]) == fp(pa.array([1, None, 3]))
    offsets = [np.array([0, 1, 1, 2], np.int32), np.array([0, 1, 4, 5], np.int32)]
    strings = [
        pa.Array.from_buffers(
            pa.string(), 3, [validity, pa.py_buffer(o.tobytes()), pa.py_buffer(d)]
        )
        for o, d in zip(offsets, [b"ab", b"aXXXb"])
    ]
    assert fp(strings[0]) == fp(strings[1]) == fp(pa.array(["a", None, "b"]))


def test_arrow_types_and_schemas() -> None:
    assert distinct(
        pa.int64(), pa.int32(), pa.string(), pa.large_string(), pa.timestamp("s", tz="UTC")
    )
    s = pa.schema([("a", pa.int64())])
    assert fp(s) == fp(pa.schema([("a", pa.int64())])) != fp(s.with_metadata({"k": "v"}))
    assert fp(pa.array([b"0" * 16], pa.uuid())) == fp(pa.array([b"0" * 16], pa.uuid()))


def test_arrow_rare_layouts_are_exact() -> None:
    m = pa.array([{"a": 1}, None, {"b": 2}], type=pa.map_(pa.string(), pa.int64()))
    assert fp(pa.chunked_array([m])) == fp(pa.chunked_array([m.slice(0, 1), m.slice(1)]))
    assert fp(m) != fp(pa.array([{"a": 1}, None, {"b": 3}], type=m.type))
    ree = pa.RunEndEncodedArray.from_arrays([2, 4], ["a", "b"])
    assert fp(ree) != fp(pa.RunEndEncodedArray.from_arrays([1, 4], ["a", "b"]))


def test_polars() -> None:
    df = pl.DataFrame({"a": [1, 2, None], "s": ["x", None, "z"], "c": ["u", "v", "u"]})
    df = df.with_columns(pl.col("c").cast(pl.Categorical))
    assert fp(df) == fp(df.clone())
    assert fp(pl.concat([df[:1], df[1:]], rechunk=False)) == fp(df)
    assert distinct(df, df.rename({"a": "b"}), df.with_columns(pl.col("a") + 1), df.to_arrow())
    assert fp(pl.Series("a", [1, 2])) != fp(pl.Series("b", [1, 2]))
    objs = pl.Series([(1, 2)], dtype=pl.Object)
    assert fp(objs) == fp(pl.Series([(1, 2)], dtype=pl.Object))
    with pytest.raises(UnhashableError):
        fp(pl.Series([threading.Lock()], dtype=pl.Object))


# --- performance guard and fast path ----------------------------------------------------


def test_fast_path_types_need_no_resolution() -> None:
    for value in (None, True, 1, 1.0, "a", b"a", (1,), [1], {1: 2}, {1}, frozenset()):
        assert type(value) in core._EXACT


def test_heavy_libraries_are_not_imported() -> None:
    code = (
        "import sys; import notebook_flow.hashing as h; h.fingerprint({'a': (1, 2.5, 'x')});"
        "bad = {'numpy', 'pandas', 'pyarrow', 'polars', 'pydantic'} & set(sys.modules);"
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- properties -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=25,
)

hashable_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda children: st.tuples(children, children) | st.frozensets(children, max_size=3),
    max_leaves=10,
)

values = st.recursive(
    hashable_values,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children)
        | st.dictionaries(hashable_values, children, max_size=4)
        | st.sets(hashable_values, max_size=4)
    ),
    max_leaves=25,
)


def same(a: object, b: object) -> bool:
    """Equality as fingerprints see it: same types all the way down, floats bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or repr(a) == repr(b)  # type: ignore[arg-type]
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return len(a) == len(b) and all(  # type: ignore[arg-type]
            any(same(k, k2) and same(v, v2) for k2, v2 in b.items())  # type: ignore[attr-defined]
            for k, v in a.items()
        )
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)  # type: ignore[arg-type]
    return a == b


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_json_roundtrip_keeps_fingerprint(value: object) -> None:
    assert fp(value) == fp(json.loads(json.dumps(value))) == fp(copy.deepcopy(value))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=4) | st.integers(), json_values, max_size=8), st.randoms())
def test_permuted_dicts_are_equal(value: dict[object, object], rnd: random.Random) -> None:
    items = list(value.items())
    rnd.shuffle(items)
    assert fp(dict(items)) == fp(value)
    assert fp(set(value)) == fp(set(reversed(list(value))))


@settings(max_examples=300, deadline=None)
@given(values, values)
def test_equal_fingerprints_iff_same_value(a: object, b: object) -> None:
    assert (fp(a) == fp(b)) == same(a, b)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.text(max_size=6)), max_size=60),
    st.lists(st.integers(0, 60), max_size=5),
)
def test_arrow_chunking_property(items: list[str | None], cuts: list[int]) -> None:
    arr = pa.array(items, pa.string())
    bounds = sorted({0, len(items), *(c for c in cuts if c <= len(items))})
    chunked = pa.chunked_array(
        [arr.slice(a, b - a) for a, b in zip(bounds, bounds[1:])], pa.string()
    )
    assert fp(chunked) == fp(pa.chunked_array([arr]))
    assert fp(pd.Series(items, dtype="str")) == fp(pd.Series(list(items), dtype="str"))


# --- across processes -------------------------------------------------------------------

CORPUS = r"""
import dataclasses, datetime, decimal, json, sys, uuid
import numpy as np, pandas as pd, pyarrow as pa, polars as pl, pydantic
from notebook_flow.hashing import fingerprint

@dataclasses.dataclass
class Item:
    name: str
    tags: frozenset
    qty: int = 1

class Order(pydantic.BaseModel):  # pydantic builds per-process schema objects for it
    item: str
    qty: int = 1

    @pydantic.field_validator("qty")
    @classmethod
    def positive(cls, v: int) -> int:
        return max(v, 1)

words = [f"w{i}" for i in range(40)]
corpus = {
    "int": 42, "bigint": 3**200, "neg": -7, "float": 0.1, "nan": float("nan"),
    "str": "héllo", "bytes": b"\x00\xff", "tuple": (1, "a", None, True),
    "dict": {"b": [1, 2], "a": {"x": None}, 3: "three", ("k",): 1.5},
    "set": set(words), "frozenset": frozenset(words[:10]),
    "nested_sets": {frozenset({"a", "b"}), frozenset({"c"})},
    "when": datetime.datetime(2026, 11, 1, 8, 30, tzinfo=datetime.timezone.utc),
    "decimal": decimal.Decimal("3.14"), "uuid": uuid.UUID(int=12345),
    "array": np.arange(1000, dtype=np.float64).reshape(10, 100)[:, ::3],
    "structured": np.zeros(3, dtype=[("a", "<i4"), ("b", "<U3")]),
    "datetime64": np.array(["2026-01-01", "NaT"], dtype="datetime64[ns]"),
    "objects": np.array(["a", 1, None, (2, 3)] * 200, dtype=object),
    "frame": pd.DataFrame({
        "i": np.arange(50), "s": [f"s{i}" for i in range(50)],
        "c": pd.Categorical(["x", "y"] * 25), "o": pd.Series(["a", None] * 25, dtype=object),
        "t": pd.date_range("2026-01-01", periods=50, tz="Europe/Paris"),
        "n": pd.array([1, None] * 25, dtype="Int64"),
    }).set_index("i"),
    "series": pd.Series(words, name="words"),
    "arrow": pa.table({"a": [1, None, 3], "s": ["x", None, "z"], "l": [[1], [], None]}),
    "polars": pl.DataFrame({"a": [1, 2], "s": ["x", None]}),
    "dataclass": Item("bolt", frozenset(words[:5])),
    "pydantic": Order(item="nut", qty=3),
    "pydantic-class": Order,
    "types": (int, str, np.float64, pd.DataFrame),
}
result = {name: fingerprint(value) for name, value in corpus.items()}
"""


def corpus_in_process(script: pathlib.Path) -> dict[str, str]:
    # run_path installs the script as __main__ while it runs, as `python script.py` does.
    namespace = runpy.run_path(str(script), run_name="__main__")
    return namespace["result"]  # type: ignore[no-any-return]


def corpus_in_subprocess(script: pathlib.Path, seed: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_fingerprints_are_stable_across_processes_and_hash_seeds(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "corpus.py"
    script.write_text(CORPUS + "\nif __name__ == '__main__':\n    print(json.dumps(result))\n")
    first = corpus_in_subprocess(script, "0")
    second = corpus_in_subprocess(script, "4242")
    assert first == second
    assert first == corpus_in_process(script)
    assert len(set(first.values())) == len(first)


class _Node:
    def __init__(self, below: object) -> None:
        self.left = below
        self.right = below  # both paths lead to the same part


def _shared_at_every_level(levels: int, leaf: int = 3) -> object:
    node: object = {"leaf": [1, 2, leaf]}
    for _ in range(levels):
        node = _Node(node)
    return node


def test_parts_shared_at_every_level_have_no_fingerprint_instead_of_a_walk_that_never_ends() -> (
    None
):
    # 60 levels: 2**60 paths to the leaf, as in a matplotlib Axes and its transforms.
    with pytest.raises(UnhashableError, match="share parts so often"):
        fingerprint(_shared_at_every_level(60))


def test_parts_shared_a_few_times_still_fingerprint_by_content() -> None:
    a, b = _shared_at_every_level(8), _shared_at_every_level(8)
    assert fingerprint(a) == fingerprint(b) == fingerprint(copy.deepcopy(a))
    twin = _shared_at_every_level(8)
    twin.left.left.left = _shared_at_every_level(5, leaf=4)  # type: ignore[attr-defined]
    assert fingerprint(twin) != fingerprint(a)
    assert fingerprint([[0] * 10] * 100_000)  # many references to one small part: fine
