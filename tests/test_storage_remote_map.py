"""Large array results in an object store (moto's S3 server) load memory-mapped: streamed
once to a local copy, verified, mapped; a damaged copy is fetched again, an altered
object is refused."""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np
import pytest
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401 (fixture)

from notebook_flow import _localfs
from notebook_flow.errors import PayloadCorruptError
from notebook_flow.storage import ResultStore, payload


@pytest.fixture
def store(s3_server: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> ResultStore:  # noqa: F811
    monkeypatch.setenv("NOTEBOOK_FLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(payload, "MAP_REMOTE_MIN", 1 << 20)
    return ResultStore(unique_s3_url(), storage_options=s3_options(s3_server))


def _commit(store: ResultStore, value: Any) -> Any:
    return store.commit(
        uuid.uuid4().hex, value, task="t", components={}, run_id="r" * 32, duration=1.0,
        expires_at=None,
    )  # fmt: skip


class _Downloads:
    def __init__(self, store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = store.fs.get_file

        def get_file(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(store.fs, "get_file", get_file)


def _copy_of(store: ResultStore, manifest: Any) -> str:
    return os.path.join(store.local_dir("payloads"), manifest.payload.rsplit("/", 1)[-1])


def test_a_large_array_is_downloaded_once_and_mapped(store, monkeypatch) -> None:
    value = np.arange(3 << 18, dtype="float64")  # 6 MiB
    manifest = _commit(store, value)
    downloads = _Downloads(store, monkeypatch)
    first = store.load(manifest)
    assert isinstance(first, np.memmap) and not first.flags.writeable
    assert np.array_equal(first, value)
    again = store.load(manifest)
    assert isinstance(again, np.memmap) and np.array_equal(again, value)
    assert downloads.count == 1, "the local copy is reused"
    small = _commit(store, np.arange(10))  # below MAP_REMOTE_MIN: read into memory
    assert not isinstance(store.load(small), np.memmap)


def test_a_damaged_local_copy_is_fetched_again(store, monkeypatch) -> None:
    value = np.arange(3 << 18, dtype="float64")
    manifest = _commit(store, value)
    store.load(manifest)
    path = _copy_of(store, manifest)
    with open(path, "r+b") as f:  # same size, other bytes
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)
    monkeypatch.setattr(_localfs, "_verified", type(_localfs._verified)())  # a new process
    downloads = _Downloads(store, monkeypatch)
    loaded = store.load(manifest)
    assert np.array_equal(loaded, value) and downloads.count == 1


def test_an_altered_object_is_refused(store) -> None:
    value = np.arange(3 << 18, dtype="float64")
    manifest = _commit(store, value)
    forged = value.copy()
    forged[-1] = -1.0
    import io

    buf = io.BytesIO()
    np.save(buf, forged, allow_pickle=False)
    store.fs.pipe_file(store._path(manifest.payload), buf.getvalue())
    with pytest.raises(PayloadCorruptError, match="checksum"):
        store.load(manifest)
    assert not os.path.exists(_copy_of(store, manifest)), "a copy that does not verify goes"
