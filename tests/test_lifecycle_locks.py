"""Eviction respects the locks a task holds in its own lock manager (issue 17): a key locked
in Redis or PostgreSQL is not evicted while it is locked and is once released; a lock
manager that cannot be asked stops eviction instead of being ignored. Real servers
(scripts/services.sh): Redis 127.0.0.1:6379, PostgreSQL 127.0.0.1:5432 db ``test``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from notebook_flow import cli
from notebook_flow.lifecycle import evict, inventory, quota
from notebook_flow.locks import PostgresLockManager, RedisLockManager
from notebook_flow.storage import ResultStore

REDIS_URL = os.environ.get("NOTEBOOK_FLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_DSN = os.environ.get("NOTEBOOK_FLOW_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _commit(store: ResultStore, key: str) -> None:
    store.commit(
        key, np.zeros(20_000), task="t", components={}, run_id="r", duration=0.1,
        expires_at=None,
    )  # fmt: skip


def test_a_key_locked_in_the_tasks_redis_manager_is_not_evicted() -> None:
    from notebook_flow import config, task
    from notebook_flow.cache_policies import INPUTS

    prefix = f"nf-gc-{secrets.token_hex(4)}"
    policy = INPUTS.configure(
        lock_manager=RedisLockManager(url=REDIS_URL, prefix=prefix),
        isolation_level="SERIALIZABLE",
    )

    @task(cache_policy=policy)
    def square(i: int) -> Any:
        return np.full(20_000, float(i * i))

    for i in range(3):  # the call path locks each key in Redis, and notes the manager
        square(i)
    store = config.get_store()
    keys = [square.cache_key(i) for i in range(3)]
    assert set(inventory.scan(store).entries) == set(keys)
    other = RedisLockManager(url=REDIS_URL, prefix=prefix)  # another process's run of it
    assert other.acquire(keys[1], "another-kernel", timeout=5, lease=60)
    try:
        quota.enforce(store, max_size=1)  # everything would go...
        assert set(inventory.scan(store).entries) == {keys[1]}  # ...but the locked key
    finally:
        other.release(keys[1], "another-kernel")
    quota.enforce(store, max_size=1)
    assert inventory.scan(store).entries == {}


def test_gc_skips_a_key_locked_in_postgres_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    store = ResultStore(str(tmp_path / "lc"))
    keys = [secrets.token_hex(16) for _ in range(3)]
    for key in keys:
        _commit(store, key)
    holder = PostgresLockManager(PG_DSN)
    assert holder.acquire(keys[0], "a-run-elsewhere", timeout=10, lease=60)
    monkeypatch.setenv(evict.LOCK_URLS_ENV, PG_DSN)
    argv = ["gc", "--max-size", "1", "--yes", "--store", store.url]
    try:
        assert cli.main(argv) == 0
        assert set(inventory.scan(store).entries) == {keys[0]}, capsys.readouterr().out
    finally:
        holder.release(keys[0], "a-run-elsewhere")
    assert cli.main(argv) == 0
    assert inventory.scan(store).entries == {}
    monkeypatch.delenv(evict.LOCK_URLS_ENV)


def test_a_lock_manager_that_cannot_be_asked_stops_eviction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ResultStore(str(tmp_path / "lc"))
    keys = [secrets.token_hex(16) for _ in range(2)]
    for key in keys:
        _commit(store, key)
    monkeypatch.setenv(evict.LOCK_URLS_ENV, "redis://127.0.0.1:1/0")  # nothing listens
    assert quota.enforce(store, max_size=1).removed == 0
    assert set(inventory.scan(store).entries) == set(keys)
    monkeypatch.setenv(evict.LOCK_URLS_ENV, "ftp://example.org/locks")  # not a lock manager
    assert quota.enforce(store, max_size=1).removed == 0
    monkeypatch.delenv(evict.LOCK_URLS_ENV)
    assert quota.enforce(store, max_size=1).removed == 2
