"""storage/batch.py: many lookups at once against moto's S3 server — the same answers as
``ResultStore.lookup`` key by key, in few requests."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401 (fixture)

from notebook_flow.storage import ResultStore, batch
from notebook_flow.storage.store import StorageWarning, assumed_absent


def _key() -> str:
    return uuid.uuid4().hex


def _commit(store: ResultStore, key: str, value: Any) -> None:
    store.commit(
        key, value, task="t", components={}, run_id="r" * 32, duration=0.5, expires_at=None
    )


@pytest.fixture
def store(s3_server: str) -> ResultStore:  # noqa: F811
    return ResultStore(unique_s3_url(), storage_options=s3_options(s3_server))


class _Reads:
    """Counts the manifests a store reads through ``fs.cat`` (the batched reads)."""

    def __init__(self, store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        fs = store.fs
        real = fs.cat

        def cat(paths: Any, *args: Any, **kwargs: Any) -> Any:
            self.paths.extend([paths] if isinstance(paths, str) else paths)
            return real(paths, *args, **kwargs)

        monkeypatch.setattr(fs, "cat", cat)


def test_the_same_answers_as_lookup_key_by_key(store: ResultStore) -> None:
    present = [_key() for _ in range(10)]
    absent = [_key() for _ in range(10)]
    for i, key in enumerate(present):
        _commit(store, key, {"i": i})
    found = batch.lookup_many(store, present + absent)
    assert set(found) == set(present + absent)
    assert all(found[key] is None for key in absent)
    for i, key in enumerate(present):
        manifest = found[key]
        assert manifest is not None and manifest == store.lookup(key)
        assert store.load(manifest) == {"i": i}


def test_a_forged_manifest_is_a_miss(store: ResultStore) -> None:
    keys = [_key() for _ in range(10)]
    for key in keys:
        _commit(store, key, 1)
    other = ResultStore(store.url, storage_options=store._storage_options, signing_key=b"k" * 32)
    _commit(other, keys[3], 666)  # signed with a key this process does not have
    with pytest.warns(StorageWarning, match="not signed with this process's key"):
        found = batch.lookup_many(store, keys)
    assert found[keys[3]] is None
    assert all(found[k] is not None for k in keys if k != keys[3])


def test_known_manifests_are_not_read_again_until_they_change(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [_key() for _ in range(12)]
    for key in keys:
        _commit(store, key, 1)
    batch.lookup_many(store, keys)  # reads them all, and remembers their bytes
    reads = _Reads(store, monkeypatch)
    again = batch.lookup_many(store, keys)
    assert reads.paths == [], "unchanged manifests (same ETag) must not be read again"
    assert all(again[k] is not None and store.load(again[k]) == 1 for k in keys)
    _commit(store, keys[5], 2)  # replaced: new bytes, new ETag
    found = batch.lookup_many(store, keys)
    assert len(reads.paths) == 1 and keys[5] in reads.paths[0]
    assert store.load(found[keys[5]]) == 2


def test_a_store_beyond_the_listing_budget_reads_each_key(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [_key() for _ in range(10)]
    for key in keys[:5]:
        _commit(store, key, key)
    monkeypatch.setattr(batch, "LIST_BUDGET", 0)  # any listing is over budget
    monkeypatch.setattr(batch, "_recent", type(batch._recent)())
    reads = _Reads(store, monkeypatch)
    found = batch.lookup_many(store, keys)
    assert len(reads.paths) == 10
    assert [found[k] is not None for k in keys] == [True] * 5 + [False] * 5
    assert store.load(found[keys[0]]) == keys[0]


def test_a_wrong_absence_hint_leaves_an_orphan_never_a_wrong_entry(store: ResultStore) -> None:
    import numpy as np

    key = _key()
    store.inline_limit = 0  # payloads in files of their own
    _commit(store, key, np.arange(10))
    old = store.lookup(key)
    assert old is not None
    token = assumed_absent.set(frozenset({key}))
    try:
        _commit(store, key, np.arange(20))  # the hint is wrong: the key was there
    finally:
        assumed_absent.reset(token)
    new = store.lookup(key)
    assert new is not None and store.load(new).tolist() == list(range(20))
    assert store.remove_orphans(older_than=0) == [old.payload]
