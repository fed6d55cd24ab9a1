"""ResultStore: one StorageContract, run against a local folder, memory:// and S3 (moto)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import xxhash
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401 (fixture)
from fsspec.implementations.memory import MemoryFileSystem

from notebook_flow import _localfs
from notebook_flow import storage as storage_mod
from notebook_flow.errors import (
    CommitError,
    ConfigurationError,
    PayloadCorruptError,
    SerializationError,
    SignatureError,
)
from notebook_flow.serializers import SIGNING_KEY_ENV
from notebook_flow.storage import (
    CACHE_DIR_ENV,
    FORMAT_VERSION,
    Manifest,
    ResultStore,
    StorageWarning,
    validate_key,
)
from notebook_flow.storage import payload as payload_mod
from notebook_flow.storage import store as store_mod

REPO = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
SECRET = b"secret-key-0123456789"


def key(i: int) -> str:
    return f"{i:032x}"


def commit(store: ResultStore, k: str, value: object, **kw: Any) -> Manifest:
    args: dict[str, Any] = {
        "task": "mod.f",
        "components": {"source of task `f`": "a" * 32},
        "run_id": "run-1",
        "duration": 0.25,
        "expires_at": None,
    }
    args.update(kw)
    return store.commit(k, value, **args)


def files(store: ResultStore, top: str = "") -> list[str]:
    """Every file below the store root (relative paths), hidden temp files included."""
    root = store._path(top).rstrip("/") if top else store._root
    store.fs.invalidate_cache()
    try:
        found = store.fs.find(root)
    except FileNotFoundError:
        return []
    base = store._root.rstrip("/") + "/"
    return sorted(p.split(base, 1)[1] if base in p else p for p in found)


def raw_read(store: ResultStore, rel: str) -> bytes:
    return bytes(store.fs.cat_file(store._path(rel)))


def raw_write(store: ResultStore, rel: str, data: bytes) -> None:
    path = store._path(rel)
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, data)


def manifest_rel(k: str) -> str:
    return f"manifests/{k[:2]}/{k}.json"


def rewrite_manifest(store: ResultStore, k: str, **changes: Any) -> None:
    raw = json.loads(raw_read(store, manifest_rel(k)))
    raw.update(changes)
    raw_write(store, manifest_rel(k), json.dumps(raw).encode())


def assert_same(a: object, b: object) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True)  # type: ignore[arg-type]
    elif isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, check_exact=True)  # type: ignore[arg-type]
    elif isinstance(a, pa.Table):
        assert isinstance(b, pa.Table) and a.equals(b, check_metadata=True)
    else:
        assert type(a) is type(b) and a == b


def _point(x: float) -> tuple[float, float]:
    return (x, -x)


SAMPLES: dict[str, tuple[str, Callable[[], object]]] = {
    "npy": ("npy", lambda: np.arange(12, dtype=np.float64).reshape(3, 4)),
    "npy-fortran": ("npy", lambda: np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))),
    "npy-empty": ("npy", lambda: np.zeros((0, 3), dtype=np.float32)),
    "parquet": (
        "parquet",
        lambda: pd.DataFrame(
            {"a": [1, 2, 3], "s": ["x", None, "z"], "c": pd.Categorical(["u", "v", "u"])},
            index=pd.Index([10, 20, 30], name="id"),
        ),
    ),
    "parquet-series": ("parquet", lambda: pd.Series([1.5, 2.5], name="v")),
    "arrow": ("arrow", lambda: pa.table({"a": [1, 2], "b": ["x", "y"]})),
    "json": ("json", lambda: {"a": [1, 2.5, None, "é", True], "b": {}}),
    "pickle": ("pickle", lambda: (1, "tuple", frozenset({3}))),
    "pickle-fn": ("pickle", lambda: _point),
    "pickle-frame-fallback": (
        "pickle",
        lambda: pd.DataFrame({"m": pd.Series([1, "x"], dtype=object)}),
    ),
}


class StorageContract:
    """Behaviour every ResultStore backend must have. Subclasses provide ``make_store``."""

    cross_process: ClassVar[bool] = True

    @pytest.fixture
    def make_store(self) -> Callable[..., ResultStore]:
        raise NotImplementedError

    @pytest.fixture
    def store(self, make_store: Callable[..., ResultStore]) -> ResultStore:
        return make_store()

    @pytest.fixture(autouse=True)
    def _payload_files(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The contract exercises the payload-file protocol; inline payloads are tested
        on their own below (TestInlinePayloads)."""
        monkeypatch.setattr(store_mod, "INLINE_LIMIT", 0)  # read by ResultStore()

    # -- roundtrips -----------------------------------------------------------------------

    @pytest.mark.parametrize("name", sorted(SAMPLES))
    def test_roundtrip(self, store: ResultStore, name: str) -> None:
        expected_format, make = SAMPLES[name]
        value = make()
        m = commit(store, KEY, value)
        assert m.serializer == expected_format
        found = store.lookup(KEY)
        assert found == m
        assert_same(value, store.load(found))

    def test_manifest_records_everything(self, store: ResultStore) -> None:
        before = time.time()
        m = commit(store, KEY, np.arange(5), expires_at=before + 60, fence=7, run_id="r-9")
        assert m.format_version == FORMAT_VERSION == 2
        assert m.provenance is not None and m.provenance["source"] == "mod.f"
        assert (m.key, m.task, m.run_id, m.fence, m.duration) == (KEY, "mod.f", "r-9", 7, 0.25)
        assert m.components == {"source of task `f`": "a" * 32}
        assert before <= m.created_at <= time.time() and m.expires_at == before + 60
        assert m.payload.startswith(f"results/{KEY[:2]}/{KEY}-") and m.payload.endswith(".npy")
        payload = raw_read(store, m.payload)
        assert m.size == len(payload) and m.checksum == xxhash.xxh3_128_hexdigest(payload)
        on_disk = json.loads(raw_read(store, manifest_rel(KEY)))
        assert on_disk["checksum"] == m.checksum and on_disk["signature"] == m.signature
        assert on_disk["mac"] == m.mac and len(m.mac or "") == 64
        optional = {"inline", "txn"} | ({"seal"} if m.seal is None else set())
        assert set(on_disk) == {f.name for f in Manifest.__dataclass_fields__.values()} - optional
        # Only a local payload file is sealed (see test_sealed_payload_loads_without_rehash...)
        sealable = store.is_local and _localfs.seal_of(os.stat(".")) is not None
        assert (m.seal is not None) == sealable
        assert files(store) == [manifest_rel(KEY), m.payload]

    def test_lookup_missing_is_none(self, store: ResultStore) -> None:
        assert store.lookup(KEY) is None
        assert list(store.iter_manifests()) == []

    def test_overwrite_replaces_payload(self, store: ResultStore) -> None:
        first = commit(store, KEY, [1])
        second = commit(store, KEY, [2], run_id="run-2")
        assert first.payload != second.payload  # a unique name per commit
        assert store.lookup(KEY) == second
        assert store.load(second) == [2]
        assert files(store, "results") == [second.payload]  # the old payload was deleted

    def test_reader_of_old_manifest_sees_a_miss_not_a_torn_value(self, store: ResultStore) -> None:
        first = commit(store, KEY, [1])
        commit(store, KEY, [2])
        with pytest.raises(PayloadCorruptError, match="missing"):
            store.load(first)

    def test_delete(self, store: ResultStore) -> None:
        m = commit(store, KEY, {"x": 1})
        assert store.delete(KEY) is True
        assert store.lookup(KEY) is None
        assert m.payload not in files(store)
        assert store.delete(KEY) is False

    def test_iter_manifests_and_clear(self, store: ResultStore) -> None:
        for i in range(3):
            commit(store, key(i), i, task="a")
        commit(store, key(10), "b", task="b")
        assert sorted(m.key for m in store.iter_manifests()) == [key(0), key(1), key(2), key(10)]
        assert store.clear(task="a") == 3
        assert [m.task for m in store.iter_manifests()] == ["b"]
        assert store.clear() == 1
        # Local stores keep the generation file other processes' caches watch.
        assert files(store) == (["manifests/GENERATION"] if store.is_local else [])

    def test_expired(self, store: ResultStore) -> None:
        now = time.time()
        fresh = commit(store, KEY, 1, expires_at=now + 3600)
        stale = commit(store, OTHER, 2, expires_at=now - 1)
        assert not fresh.expired() and stale.expired()
        assert store.lookup(OTHER) == stale  # returned; the caller decides it is a miss
        assert fresh.expired(now=now + 3600)

    # -- keys and bad files ---------------------------------------------------------------

    @pytest.mark.parametrize(
        "bad", ["../" * 8 + "etc/passwd", KEY.upper(), KEY[:-1], KEY + "0", "", None, b"0" * 32]
    )
    def test_bad_key_rejected(self, store: ResultStore, bad: Any) -> None:
        for call in (store.lookup, store.delete, lambda k: commit(store, k, 1)):
            with pytest.raises(ConfigurationError, match="32 lowercase hex"):
                call(bad)
        assert files(store) == []

    @pytest.mark.parametrize(
        "content",
        [
            b"{not json",
            b"\xff\xfe",
            b"[1, 2]",
            b"{}",
            json.dumps({"format_version": 99}).encode(),
        ],
        ids=["syntax", "binary", "not-object", "empty", "future-version"],
    )
    def test_invalid_manifest_is_a_miss_with_warning(
        self, store: ResultStore, content: bytes
    ) -> None:
        commit(store, KEY, 1)
        raw_write(store, manifest_rel(KEY), content)
        with pytest.warns(StorageWarning, match="manifest"):
            assert store.lookup(KEY) is None
        with pytest.warns(StorageWarning):
            assert list(store.iter_manifests()) == []

    @pytest.mark.parametrize(
        "changes",
        [
            {"payload": "../../../../etc/passwd"},
            {"payload": f"results/ff/{'f' * 32}-{'0' * 16}.npy"},  # another key's payload
            {"key": OTHER},
            {"size": -1},
            {"checksum": "zz"},
            {"serializer": "no-such-format"},
            {"components": {"a": 1}},
        ],
        ids=["path-escape", "other-payload", "other-key", "size", "checksum", "format", "comp"],
    )
    def test_manifest_fields_are_validated(
        self, store: ResultStore, changes: dict[str, Any]
    ) -> None:
        commit(store, KEY, 1)
        rewrite_manifest(store, KEY, **changes)
        with pytest.warns(StorageWarning):
            assert store.lookup(KEY) is None

    def test_truncated_payload_is_corrupt(self, store: ResultStore) -> None:
        m = commit(store, KEY, np.arange(1000))
        raw_write(store, m.payload, raw_read(store, m.payload)[:-8])
        with pytest.raises(PayloadCorruptError, match="bytes"):
            store.load(m)

    @pytest.mark.parametrize("name", ["npy", "parquet", "json", "pickle"])
    def test_bit_flip_is_corrupt(self, store: ResultStore, name: str) -> None:
        m = commit(store, KEY, SAMPLES[name][1]())
        data = bytearray(raw_read(store, m.payload))
        data[len(data) // 2] ^= 0x01
        raw_write(store, m.payload, bytes(data))
        with pytest.raises(PayloadCorruptError, match="checksum"):
            store.load(m)

    def test_missing_payload_is_corrupt(self, store: ResultStore) -> None:
        m = commit(store, KEY, 1)
        store.fs.rm_file(store._path(m.payload))
        with pytest.raises(PayloadCorruptError, match="missing"):
            store.load(m)

    # -- commit protocol --------------------------------------------------------------------

    def test_before_manifest_runs_between_payload_and_manifest(self, store: ResultStore) -> None:
        seen: list[list[str]] = []
        commit(store, KEY, 1, before_manifest=lambda: seen.append(files(store)))
        (between,) = seen
        assert [f for f in between if f.startswith("manifests/")] == []
        assert len([f for f in between if f.startswith("results/")]) == 1

    def test_before_manifest_raising_commits_nothing(self, store: ResultStore) -> None:
        old = commit(store, KEY, "old")

        class Fenced(Exception):
            pass

        def refuse() -> None:
            raise Fenced("lease lost")

        with pytest.raises(Fenced):
            commit(store, KEY, "new", before_manifest=refuse)
        assert store.lookup(KEY) == old
        assert store.load(old) == "old"
        assert files(store) == [manifest_rel(KEY), old.payload]  # no orphan payload

        with pytest.raises(Fenced):
            commit(store, OTHER, "new", before_manifest=refuse)
        assert store.lookup(OTHER) is None

    def test_unserializable_value_commits_nothing(self, store: ResultStore) -> None:
        with pytest.raises(SerializationError, match="lock"):
            commit(store, KEY, {"lock": threading.Lock()})
        with pytest.raises(SerializationError, match="parquet"):
            commit(store, KEY, SAMPLES["pickle-frame-fallback"][1](), serializer="parquet")
        assert files(store) == []

    def test_concurrent_commits_leave_one_valid_result(self, store: ResultStore) -> None:
        def worker(t: int) -> None:
            for i in range(4):
                commit(store, KEY, {"t": t, "i": i})

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = store.lookup(KEY)
        assert m is not None
        assert store.load(m)["i"] == 3  # type: ignore[index]
        store.remove_orphans(older_than=0)
        generation = ["manifests/GENERATION"] if store.is_local else []  # replaced: rewritten
        assert files(store) == sorted([manifest_rel(KEY), m.payload, *generation])

    def test_remove_orphans(self, store: ResultStore) -> None:
        kept = commit(store, KEY, 1)
        orphan = f"results/{OTHER[:2]}/{OTHER}-{'0' * 16}.pkl"
        temp = f"results/{KEY[:2]}/.{KEY}-{'1' * 16}.npy.abcd1234.tmp"
        raw_write(store, orphan, b"x")
        raw_write(store, temp, b"y")
        assert store.lookup(OTHER) is None  # readers ignore both
        assert store.remove_orphans(older_than=3600) == []  # too young to be orphans
        assert sorted(store.remove_orphans(older_than=0)) == sorted([orphan, temp])
        assert files(store) == [manifest_rel(KEY), kept.payload]

    # -- signing ----------------------------------------------------------------------------

    def test_signed_roundtrip(self, make_store: Callable[..., ResultStore]) -> None:
        store = make_store(signing_key=SECRET)
        m = commit(store, KEY, (1, 2))
        assert m.signature is not None and len(m.signature) == 64 and m.mac is not None
        assert store.load(m) == (1, 2)
        other = commit(store, OTHER, [1, 2])
        assert other.signature is not None and other.mac is not None  # every format
        assert store.load(store.lookup(OTHER)) == [1, 2]
        secret_hits = [f for f in files(store) if SECRET in raw_read(store, f)]
        assert secret_hits == []  # the key is never written to the store

    def test_store_with_another_key_believes_nothing(
        self, make_store: Callable[..., ResultStore]
    ) -> None:
        m = commit(make_store(signing_key=SECRET), KEY, (1, 2))
        other = make_store(signing_key=b"another-key-0123456789")
        with pytest.warns(StorageWarning, match="key import"):
            assert other.lookup(KEY) is None
        with pytest.raises(SignatureError, match="not signed with this process's key"):
            other.load(m)

    def test_wrong_payload_signature_refused(self, make_store: Callable[..., ResultStore]) -> None:
        store = make_store(signing_key=SECRET)
        m = commit(store, KEY, (1, 2))
        bad = dataclasses.replace(m, signature="0" * 64, seal=None, mac=None)
        bad = store_mod.trust.sign(store, bad)  # (only the key's holder could do this)
        _localfs.forget_verified()  # the file as a fresh process sees it: read and verified
        with pytest.raises(SignatureError, match="does not match"):
            store.load(bad)

    def test_signature_binds_the_key(self, make_store: Callable[..., ResultStore]) -> None:
        store = make_store(signing_key=SECRET)
        a = commit(store, KEY, ("a",))
        commit(store, OTHER, ("b",))
        # Replay: point OTHER's manifest at KEY's validly signed payload (same size/checksum).
        forged = {**json.loads(a.to_json()), "key": OTHER}
        forged["payload"] = f"results/{OTHER[:2]}/{OTHER}-{'2' * 16}.pkl"
        raw_write(store, forged["payload"], raw_read(store, a.payload))
        raw_write(store, manifest_rel(OTHER), json.dumps(forged).encode())
        with pytest.warns(StorageWarning, match="signature does not match"):
            assert store.lookup(OTHER) is None
        m = Manifest.from_json(json.dumps(forged).encode())
        with pytest.raises(SignatureError):
            store.load(m)

    def test_tampered_pickle_never_unpickled(
        self, make_store: Callable[..., ResultStore], tmp_path: Path
    ) -> None:
        signed = make_store(signing_key=SECRET)
        m = commit(signed, KEY, (1, 2))
        marker = tmp_path / "unpickled"
        evil = pickle.dumps(_Evil(str(marker)))
        raw_write(signed, m.payload, evil)
        # An attacker who can write the store can fix size and checksum, not the HMAC.
        rewrite_manifest(signed, KEY, size=len(evil), checksum=xxhash.xxh3_128_hexdigest(evil))
        with pytest.warns(StorageWarning):
            assert signed.lookup(KEY) is None
        tampered = Manifest.from_json(raw_read(signed, manifest_rel(KEY)))
        with pytest.raises(SignatureError):
            signed.load(tampered)
        # Even re-signed (a leaked manifest key would allow that), the payload HMAC holds.
        resigned = store_mod.trust.sign(signed, tampered)
        _localfs.forget_verified()
        with pytest.raises(SignatureError, match="does not match"):
            signed.load(resigned)
        assert not marker.exists()

    # -- pickling and other processes -----------------------------------------------------

    def test_pickle_carries_configuration_only(
        self, make_store: Callable[..., ResultStore]
    ) -> None:
        store = make_store(signing_key=SECRET)
        commit(store, KEY, (1,))
        copy = pickle.loads(pickle.dumps(store))
        assert copy._fs is None  # reconnects lazily
        assert copy.url == store.url and copy.signing
        assert copy.load(copy.lookup(KEY)) == (1,)

    def test_pickled_store_in_subprocess(
        self, make_store: Callable[..., ResultStore], tmp_path: Path
    ) -> None:
        store = make_store(signing_key=SECRET)
        if not self.cross_process:
            # memory:// lives inside one process: a copy elsewhere sees an empty store and
            # says "miss" (None), it never crashes or invents a value.
            commit(store, KEY, (1,))
            blob = tmp_path / "store.pkl"
            blob.write_bytes(pickle.dumps(store))
            probe = (
                f"import pickle; s = pickle.loads(open({str(blob)!r}, 'rb').read()); "
                f"assert s.lookup({KEY!r}) is None; print('miss')"
            )
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            env.pop(SIGNING_KEY_ENV, None)
            out = subprocess.run(
                [sys.executable, "-c", probe], env=env, timeout=120, capture_output=True, text=True
            )
            assert out.returncode == 0 and out.stdout.strip() == "miss", out.stderr
            return
        commit(store, KEY, ("from parent", np.arange(3)))
        blob = tmp_path / "store.pkl"
        blob.write_bytes(pickle.dumps(store))
        child = textwrap.dedent(
            f"""
            import pickle, sys
            store = pickle.loads(open({str(blob)!r}, "rb").read())
            value = store.load(store.lookup({KEY!r}))
            store.commit({OTHER!r}, {{"child saw": value[0]}}, task="child", components={{}},
                         run_id="c", duration=0.0, expires_at=None)
            """
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop(SIGNING_KEY_ENV, None)
        subprocess.run([sys.executable, "-c", child], check=True, env=env, timeout=120)
        assert store.load(store.lookup(OTHER)) == {"child saw": "from parent"}


class _Evil:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


# ------------------------------------------------------------------------------ backends


class TestLocalStore(StorageContract):
    @pytest.fixture
    def make_store(self, tmp_path: Path) -> Callable[..., ResultStore]:
        return lambda **kw: ResultStore(str(tmp_path / "store"), **kw)


class TestMemoryStore(StorageContract):
    cross_process = False

    @pytest.fixture
    def make_store(self) -> Iterator[Callable[..., ResultStore]]:
        url = f"memory://nbf-{uuid.uuid4().hex[:12]}"
        yield lambda **kw: ResultStore(url, **kw)
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)


class TestS3Store(StorageContract):
    @pytest.fixture
    def make_store(self, s3_server: str) -> Callable[..., ResultStore]:  # noqa: F811
        url = unique_s3_url()
        return lambda **kw: ResultStore(url, storage_options=s3_options(s3_server), **kw)


# ------------------------------------------------------------------------- local-only


def test_default_url_is_relative_folder_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = ResultStore()
    assert store.is_local and store.url == store.local_root == str(tmp_path / ".notebook_flow")
    commit(store, KEY, 1)
    assert (tmp_path / ".notebook_flow" / manifest_rel(KEY)).is_file()
    assert store.metadata_path() == str(tmp_path / ".notebook_flow" / "metadata.duckdb")
    assert store.local_dir("locks") == str(tmp_path / ".notebook_flow" / "locks")


def test_local_dirs_of_remote_store_go_to_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    a = ResultStore("memory://nbf-a")
    b = ResultStore("memory://nbf-b")
    assert a.metadata_path().startswith(str(tmp_path / "cache") + os.sep)
    assert a.metadata_path().endswith("metadata.duckdb") and os.path.isdir(a.local_dir("locks"))
    assert a.metadata_path() != b.metadata_path()
    assert a.metadata_path() == ResultStore("memory://nbf-a/").metadata_path()
    for bad in ["../x", "a/b", "", "results", "manifests", ".hidden"]:
        with pytest.raises(ConfigurationError):
            a.local_dir(bad)


def test_npy_is_memory_mapped_and_verified_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ResultStore(str(tmp_path / "s"))
    m = commit(store, KEY, np.arange(100_000, dtype=np.float64))
    calls: list[int] = []
    real = xxhash.xxh3_128_hexdigest
    monkeypatch.setattr(
        payload_mod.xxhash, "xxh3_128_hexdigest", lambda b: calls.append(1) or real(b)
    )
    store.load(m)
    assert calls == []  # hashed while committing: this process knows the file is good
    # A manifest from another boot (or machine): the first load verifies, then the memo.
    foreign = dataclasses.replace(m, seal="another-boot" + m.seal[m.seal.index(":") :])
    foreign = store_mod.trust.sign(store, foreign)  # an authentic manifest of elsewhere
    _localfs.forget_verified()  # as in a fresh process
    first = store.load(foreign)
    assert isinstance(first, np.memmap) and not first.flags.writeable
    assert store.load(foreign)[-1] == 99_999.0
    assert len(calls) == 1  # the second load trusted the per-process memo
    # Any change to the file (new ctime/mtime) invalidates the memo.
    path = Path(store._path(m.payload))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    with pytest.raises(PayloadCorruptError):
        store.load(foreign)


@pytest.mark.skipif(_localfs.seal_of(os.stat(".")) is None, reason="no boot id on this OS")
def test_sealed_payload_loads_without_rehash_in_a_fresh_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest seals the payload file as committed: a later process on this machine
    and boot maps it without reading every byte, unless the file changed since."""
    store = ResultStore(str(tmp_path / "s"))
    m = commit(store, KEY, np.arange(100_000, dtype=np.float64))
    assert m.seal is not None and store.lookup(KEY) == m
    calls: list[int] = []
    real = xxhash.xxh3_128_hexdigest
    monkeypatch.setattr(
        payload_mod.xxhash, "xxh3_128_hexdigest", lambda b: calls.append(1) or real(b)
    )
    _localfs.forget_verified()  # as in a fresh process
    assert store.load(m)[-1] == 99_999.0
    assert calls == []
    # Rewriting the same bytes in place moves ctime: the seal no longer matches, the bytes
    # are verified (and found good); an altered byte is caught.
    path = Path(store._path(m.payload))
    good = path.read_bytes()
    time.sleep(0.01)
    with open(path, "r+b") as f:
        f.write(good[:1])
    _localfs.forget_verified()
    assert store.load(m)[-1] == 99_999.0
    assert calls == [1]
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(bytes(bad))
    _localfs.forget_verified()
    with pytest.raises(PayloadCorruptError, match="checksum"):
        store.load(m)


def test_commit_to_unwritable_location_raises_commit_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = ResultStore(str(blocker / "store"))
    with pytest.raises(CommitError, match="writable") as info:
        commit(store, KEY, np.arange(3))
    assert isinstance(info.value.__cause__, OSError)
    assert blocker.read_text() == "not a folder"


class _ReadOnlyMemoryFS(MemoryFileSystem):  # type: ignore[misc]
    protocol = ("nbf-readonly",)
    root_marker = "/"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        raise PermissionError(f"read-only filesystem: {path}")


def test_commit_to_read_only_filesystem_raises_commit_error() -> None:
    fsspec.register_implementation("nbf-readonly", _ReadOnlyMemoryFS, clobber=True)
    store = ResultStore("nbf-readonly://store")
    with pytest.raises(CommitError, match="nothing was committed"):
        commit(store, KEY, {"a": 1})
    assert store.lookup(KEY) is None


def test_signing_key_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(SIGNING_KEY_ENV, "env-secret-0123456789")
    store = ResultStore(str(tmp_path / "s"))
    m = commit(store, KEY, (1,))
    state = pickle.dumps(store)
    assert b"env-secret" not in state  # resolved again on the other side
    copy = pickle.loads(state)
    assert copy.load(m) == (1,)
    monkeypatch.setenv(SIGNING_KEY_ENV, "another-secret-0123456789")
    with pytest.raises(SignatureError):
        copy.load(m)  # fails closed rather than loading unverified
    monkeypatch.setenv(SIGNING_KEY_ENV, "short")
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        commit(copy, OTHER, (2,))


def test_bad_configuration() -> None:
    with pytest.raises(ConfigurationError):
        ResultStore("")
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        ResultStore("memory://x", signing_key=b"")
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        ResultStore("memory://x", signing_key="x" * 15)
    with pytest.raises(ConfigurationError, match="cannot open result store"):
        ResultStore("no-such-protocol-xyz://bucket")
    assert validate_key(KEY) == KEY


GOLDEN_V1 = """{
 "checksum": "8a6d96f13073656bdb70ceb74b853fbb",
 "components": {
  "source of task `f`": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
 },
 "created_at": 1700000000.5,
 "duration": 0.25,
 "expires_at": null,
 "fence": 3,
 "format_version": 1,
 "key": "0123456789abcdef0123456789abcdef",
 "payload": "results/01/0123456789abcdef0123456789abcdef-00112233aabbccdd.npy",
 "run_id": "run-1",
 "serializer": "npy",
 "signature": null,
 "size": 208,
 "task": "mod.f"
}"""


def test_manifest_format_v1_golden() -> None:
    """Manifests written by format 1 stay readable, and we still write exactly that."""
    m = Manifest.from_json(GOLDEN_V1.encode(), key=KEY)
    assert (m.size, m.fence, m.created_at, m.serializer) == (208, 3, 1700000000.5, "npy")
    assert m.to_json().decode() == GOLDEN_V1
    old = json.loads(GOLDEN_V1)
    del old["fence"]  # fence is optional on read
    assert Manifest.from_json(json.dumps(old).encode()).fence is None
    # An inline manifest (format 1 plus the optional "inline" field) round-trips too.
    inline = dict(old, payload="", inline=base64.b64encode(b"[1]").decode(), size=3)
    m2 = Manifest.from_json(json.dumps(inline).encode(), key=KEY)
    assert m2.inline == "WzFd" and json.loads(m2.to_json())["inline"] == "WzFd"


# ------------------------------------------------------------------------- inline payloads


class TestInlinePayloads:
    """Small results live inside their manifest: one atomic write, one read."""

    @pytest.fixture(params=["local", "s3"])
    def store(self, request: pytest.FixtureRequest, tmp_path: Path) -> ResultStore:
        if request.param == "local":
            return ResultStore(str(tmp_path / "store"))
        server = request.getfixturevalue("s3_server")
        return ResultStore(unique_s3_url(), storage_options=s3_options(server))

    def test_small_value_is_inline_and_round_trips(self, store: ResultStore) -> None:
        m = commit(store, KEY, {"a": [1, 2, 3]})
        assert m.payload == "" and m.inline is not None
        assert store.lookup(KEY) == m
        assert store.load(m) == {"a": [1, 2, 3]}
        if store.is_local:
            assert store.local_root is not None
            assert not (Path(store.local_root) / "results").exists()

    def test_value_over_the_limit_goes_to_a_file(self, store: ResultStore) -> None:
        big = list(range(storage_mod.INLINE_LIMIT))  # JSON is several bytes per item
        m = commit(store, KEY, big)
        assert m.inline is None and m.payload.startswith("results/")
        assert store.load(m) == big

    def test_overwrite_inline_by_file_and_back(self, store: ResultStore) -> None:
        commit(store, KEY, [1])
        big = list(range(storage_mod.INLINE_LIMIT))
        second = commit(store, KEY, big, run_id="run-2")
        assert store.load(store.lookup(KEY)) == big
        third = commit(store, KEY, [3], run_id="run-3")
        assert store.load(store.lookup(KEY)) == [3]
        assert third.inline is not None and second.payload  # the file was replaced...
        assert store.remove_orphans(older_than=0) == []  # ...and removed, not orphaned

    def test_corrupt_inline_payload_is_refused(self, store: ResultStore) -> None:
        m = commit(store, KEY, ["payload"])
        raw = base64.b64decode(m.inline or "")
        bad = dataclasses.replace(m, inline=base64.b64encode(raw[:-1] + b"!").decode())
        bad = store_mod.trust.sign(store, bad)  # authentic manifest, corrupt bytes
        with pytest.raises(PayloadCorruptError):
            store.load(bad)

    def test_signed_inline_pickle_tamper_refused(self, tmp_path: Path) -> None:
        store = ResultStore(str(tmp_path / "signed"), signing_key=b"k" * 32)
        m = commit(store, KEY, (1, 2))  # a tuple is pickled
        assert m.serializer == "pickle" and m.inline is not None and m.signature
        assert store.load(m) == (1, 2)
        forged = pickle.dumps((9, 9))
        bad = dataclasses.replace(
            m,
            inline=base64.b64encode(forged).decode(),
            size=len(forged),
            checksum=xxhash.xxh3_128_hexdigest(forged),
        )
        with pytest.raises(SignatureError):
            store.load(bad)
