"""One contract for every lock manager (memory, file, Redis, PostgreSQL).

Servers come from scripts/services.sh; their addresses from NOTEBOOK_FLOW_TEST_REDIS_URL and
NOTEBOOK_FLOW_TEST_PG_DSN. An unreachable server skips its managers' tests locally and fails
them under CI. Every test uses fresh random keys (and Redis a fresh key prefix in db 15),
and removes what it created.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from notebook_flow import _identity
from notebook_flow.errors import LeaseLostError, LockError, LockTimeout
from notebook_flow.locks import (
    FileLockManager,
    LockManager,
    MemoryLockManager,
    PostgresLockManager,
    RedisLockManager,
    default_lock_manager_for,
    hold,
)

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("NOTEBOOK_FLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_DSN = os.environ.get("NOTEBOOK_FLOW_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PG_TABLE = "notebook_flow_test_locks"


# -- helpers shared with test_locks_recovery.py ------------------------------------------------


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable ({exc}); run scripts/services.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_server(kind: str) -> None:
    """Skip (fail under CI) when the server behind ``kind`` does not answer."""
    if kind == "redis":
        import redis

        try:
            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        except redis.RedisError as exc:
            _unavailable(f"Redis at {REDIS_URL}", exc)
    elif kind == "postgres":
        import psycopg

        try:
            psycopg.connect(PG_DSN, connect_timeout=3).close()
        except psycopg.Error as exc:
            _unavailable(f"PostgreSQL at {PG_DSN}", exc)


def new_manager(kind: str, tmp_path: Path) -> tuple[LockManager, Callable[[], None]]:
    """A fresh manager of ``kind`` and a function that removes what tests left in it."""
    require_server(kind)
    if kind == "memory":
        return MemoryLockManager(), lambda: None
    if kind == "file":
        return FileLockManager(tmp_path / "locks"), lambda: None
    if kind == "redis":
        import redis

        prefix = f"nftest-{uuid.uuid4().hex[:10]}"
        manager = RedisLockManager(url=REDIS_URL, prefix=prefix)

        def cleanup() -> None:
            client = redis.Redis.from_url(REDIS_URL)
            names = list(client.scan_iter(match=f"{prefix}:*"))
            if names:
                client.delete(*names)
            client.close()

        return manager, cleanup
    if kind == "postgres":
        pg = PostgresLockManager(PG_DSN, table=PG_TABLE)
        first = len(_keys_made)

        def cleanup_pg() -> None:
            # Only this test's keys: others (other xdist workers) share the table.
            for key in _keys_made[first:]:
                pg.break_lock(key)

        return pg, cleanup_pg
    raise ValueError(kind)


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_child(code: str, payload: dict[str, object], timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter with ``payload`` as JSON in argv[1]; its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(payload)],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def pickled(manager: LockManager) -> str:
    return base64.b64encode(pickle.dumps(manager)).decode()


_keys_made: list[str] = []


def new_key() -> str:
    """A fresh random key (32 hex digits, like a cache key), remembered for clean-up."""
    key = uuid.uuid4().hex
    _keys_made.append(key)
    return key


# -- the contract ------------------------------------------------------------------------------

CHILD_USES_PICKLED_MANAGER = """
import base64, json, pickle, sys
cfg = json.loads(sys.argv[1])
m = pickle.loads(base64.b64decode(cfg["manager"]))
info = m.holder_of(cfg["held"])
got = m.acquire(cfg["free"], "nftest-child", timeout=0, lease=600)
m.release(cfg["free"], "nftest-child")
print(json.dumps({"locked": m.is_locked(cfg["held"]),
                  "holder": info.holder if info else None, "got": got}))
"""


class LockManagerContract:
    """What every LockManager guarantees; subclasses set ``kind``."""

    kind = ""
    shared_across_processes = True

    @pytest.fixture
    def manager(self, tmp_path: Path) -> Iterator[LockManager]:
        manager, cleanup = new_manager(self.kind, tmp_path)
        yield manager
        cleanup()

    def test_acquire_and_release(self, manager: LockManager) -> None:
        key = new_key()
        assert not manager.is_locked(key)
        assert manager.holder_of(key) is None
        before = time.time()
        assert manager.acquire(key, "nftest-a", timeout=0, lease=10)
        assert manager.is_locked(key)
        info = manager.holder_of(key)
        after = time.time()
        assert info is not None
        assert (info.key, info.holder) == (key, "nftest-a")
        assert info.fence > 0
        # Bracketed by clock readings around the calls, so a stall between them is no failure.
        assert before - 1 <= info.acquired_at <= after + 1
        assert before + 10 - 1 <= info.lease_expires <= after + 10 + 1
        assert info.manager
        manager.release(key, "nftest-a")
        assert not manager.is_locked(key)
        assert manager.holder_of(key) is None

    def test_try_once_when_held(self, manager: LockManager) -> None:
        key = new_key()
        assert manager.acquire(key, "nftest-a", timeout=0)
        assert manager.acquire(key, "nftest-b", timeout=0) is False
        assert manager.acquire_info(key, "nftest-b", timeout=0) is None
        manager.release(key, "nftest-a")

    def test_same_holder_acquires_again(self, manager: LockManager) -> None:
        key = new_key()
        first = manager.acquire_info(key, "nftest-a", timeout=0, lease=5)
        before = time.time()
        again = manager.acquire_info(key, "nftest-a", timeout=0, lease=600)
        assert first is not None and again is not None
        assert again.info.fence == first.info.fence
        info = manager.holder_of(key)
        assert info is not None and info.lease_expires >= before + 600 - 1  # the new lease
        manager.release(key, "nftest-a")

    def test_second_holder_waits_for_release(self, manager: LockManager) -> None:
        key = new_key()
        assert manager.acquire(key, "nftest-a", timeout=0)
        got: list[object] = []
        waiter = threading.Thread(
            target=lambda: got.append(manager.acquire_info(key, "nftest-b", timeout=120))
        )
        waiter.start()
        time.sleep(0.3)
        assert not got, "the second holder must wait"
        manager.release(key, "nftest-a")
        waiter.join(120)
        assert len(got) == 1 and got[0] is not None
        acquisition = got[0]
        assert acquisition.info.holder == "nftest-b"  # type: ignore[attr-defined]
        assert acquisition.waited > 0  # type: ignore[attr-defined]
        manager.release(key, "nftest-b")

    def test_timeout_names_the_holder(self, manager: LockManager) -> None:
        key = new_key()
        holder = _identity.holder_id("run-1234")
        assert manager.acquire(key, holder, timeout=0)
        with pytest.raises(LockTimeout) as caught:
            manager.acquire(key, "nftest-b", timeout=0.2)
        assert isinstance(caught.value, TimeoutError)
        message = str(caught.value)
        me = _identity.process()
        for part in (key, me.host, f"pid {me.pid}", "run-1234", "since", "break_lock", "--break"):
            assert part in message, (part, message)
        manager.release(key, holder)

    def test_renew_extends_the_lease(self, manager: LockManager) -> None:
        # The record's expiry is what every manager judges liveness by, so reading it tells
        # the lease was extended without sleeping past the first one (a loaded machine's
        # stall between acquire and renew must not be what the test measures).
        key = new_key()
        assert manager.acquire(key, "nftest-a", timeout=0, lease=30)
        first = manager.holder_of(key)
        assert manager.renew(key, "nftest-a", 600)
        assert not manager.renew(key, "nftest-b", 600)
        info = manager.holder_of(key)
        assert info is not None and first is not None
        assert info.holder == "nftest-a"
        assert info.lease_expires > first.lease_expires + 500
        assert manager.acquire(key, "nftest-b", timeout=0) is False
        manager.release(key, "nftest-a")

    def test_expired_lease_lets_another_holder_in(self, manager: LockManager) -> None:
        key = new_key()
        first = manager.acquire_info(key, "nftest-a", timeout=0, lease=0.5)
        assert first is not None
        # Only the lease frees it (the holder lives): taken at all, before a generous timeout.
        second = manager.acquire_info(key, "nftest-b", timeout=60, lease=30)
        assert second is not None
        assert second.info.fence > first.info.fence
        assert manager.holder_of(key).holder == "nftest-b"  # type: ignore[union-attr]
        assert not manager.renew(key, "nftest-a", 10)
        with pytest.raises(LockError):
            manager.release(key, "nftest-a")
        manager.release(key, "nftest-b")

    def test_release_by_non_holder_is_refused(self, manager: LockManager) -> None:
        key = new_key()
        with pytest.raises(LockError):
            manager.release(key, "nftest-a")  # not locked at all
        assert manager.acquire(key, "nftest-a", timeout=0)
        with pytest.raises(LockError, match="nftest-a"):
            manager.release(key, "nftest-b")
        assert manager.holder_of(key).holder == "nftest-a"  # type: ignore[union-attr]
        manager.release(key, "nftest-a")
        with pytest.raises(LockError):
            manager.release(key, "nftest-a")  # twice

    def test_list_and_break(self, manager: LockManager) -> None:
        k1, k2 = new_key(), new_key()
        assert manager.acquire(k1, "nftest-a", timeout=0)
        assert manager.acquire(k2, "nftest-b", timeout=0)
        listed = {i.key: i.holder for i in manager.list_locks() if i.key in (k1, k2)}
        assert listed == {k1: "nftest-a", k2: "nftest-b"}
        assert manager.break_lock(k1)
        assert not manager.is_locked(k1)
        assert not manager.break_lock(k1)
        assert not manager.renew(k1, "nftest-a", 10)
        assert [i.key for i in manager.list_locks() if i.key in (k1, k2)] == [k2]
        assert manager.acquire(k1, "nftest-c", timeout=0)
        manager.release(k1, "nftest-c")
        manager.release(k2, "nftest-b")

    def test_fence_increases_with_each_acquisition(self, manager: LockManager) -> None:
        key = new_key()
        fences = []
        for i in range(4):
            acquisition = manager.acquire_info(key, f"nftest-{i}", timeout=0)
            assert acquisition is not None
            fences.append(acquisition.info.fence)
            manager.release(key, f"nftest-{i}")
        assert fences == sorted(set(fences)), fences

    def test_wait_for_release(self, manager: LockManager) -> None:
        key = new_key()
        assert manager.wait_for_release(key, 0)
        assert manager.acquire(key, "nftest-a", timeout=0)
        assert not manager.wait_for_release(key, 0.1)
        timer = threading.Timer(0.3, manager.release, (key, "nftest-a"))
        timer.start()
        assert manager.wait_for_release(key, 10)
        timer.join()

    def test_different_keys_do_not_block_each_other(self, manager: LockManager) -> None:
        k1, k2 = new_key(), new_key()
        assert manager.acquire(k1, "nftest-a", timeout=0)
        assert manager.acquire(k2, "nftest-b", timeout=0)
        manager.release(k1, "nftest-a")
        manager.release(k2, "nftest-b")

    def test_pickled_manager_works_in_a_subprocess(self, manager: LockManager) -> None:
        held, free = new_key(), new_key()
        # A long lease: the child interpreter outlived the default 30 s at a load average of 70.
        assert manager.acquire(held, "nftest-parent", timeout=0, lease=600)
        copy = pickle.loads(pickle.dumps(manager))
        assert copy.is_locked(held)  # same process: same locks
        out = run_child(
            CHILD_USES_PICKLED_MANAGER, {"manager": pickled(manager), "held": held, "free": free}
        )
        seen = json.loads(out)
        assert seen["got"] is True
        if self.shared_across_processes:
            assert seen == {"locked": True, "holder": "nftest-parent", "got": True}
        else:
            assert seen["locked"] is False
        manager.release(held, "nftest-parent")

    def test_threads_are_mutually_exclusive(self, manager: LockManager) -> None:
        key = new_key()
        state = {"inside": 0, "counter": 0, "overlaps": 0}
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            holder = f"nftest-worker-{n}"
            try:
                for _ in range(12):
                    assert manager.acquire(key, holder, timeout=60, lease=30)
                    state["inside"] += 1
                    if state["inside"] != 1:
                        state["overlaps"] += 1
                    value = state["counter"]
                    time.sleep(0.0005)  # let others run inside the critical section if they can
                    state["counter"] = value + 1
                    state["inside"] -= 1
                    manager.release(key, holder)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert state == {"inside": 0, "counter": 8 * 12, "overlaps": 0}

    def test_hold_reports_events_and_fences(self, manager: LockManager) -> None:
        key = new_key()
        events: list[tuple[str, dict[str, object]]] = []
        # A 30 s lease: no heartbeat renewal (every 10 s) comes between, however slow we are.
        with hold(
            manager, key, "nftest-a", lease=30, on_event=lambda e, i: events.append((e, i))
        ) as lease:
            lease.check()
            assert lease.fence == manager.holder_of(key).fence  # type: ignore[union-attr]
            assert 0 < lease.remaining() <= 30
        assert [e for e, _ in events] == ["acquired", "renewed", "released"]  # check renewed
        assert events[0][1]["key"] == key and events[0][1]["holder"] == "nftest-a"
        assert not manager.is_locked(key)
        with pytest.raises(LockError):
            lease.check()  # released: no longer ours

        # Released once the waiter's first try failed (it backs off: ``_sleep``), however
        # late a loaded machine lets it start.
        assert manager.acquire(key, "nftest-b", timeout=0)
        backing_off = threading.Event()
        sleep = manager._sleep  # type: ignore[attr-defined]

        def first_backoff(seconds: float) -> None:
            backing_off.set()
            sleep(seconds)

        manager._sleep = first_backoff  # type: ignore[attr-defined]
        releaser = threading.Thread(
            target=lambda: backing_off.wait(60) and manager.release(key, "nftest-b")
        )
        releaser.start()
        events.clear()
        with hold(
            manager, key, "nftest-c", timeout=60, on_event=lambda e, i: events.append((e, i))
        ):
            pass
        releaser.join()
        assert [e for e, _ in events] == ["waited", "acquired", "released"]
        assert events[0][1]["waited"] > 0  # type: ignore[operator]

    def test_check_confirms_with_the_manager(self, manager: LockManager) -> None:
        key = new_key()
        events: list[str] = []
        with hold(
            manager, key, "nftest-a", lease=30, on_event=lambda e, i: events.append(e)
        ) as lease:
            lease.check()
            assert events[-1] == "renewed"  # confirmed by a renewal, not by the heartbeat
            assert manager.break_lock(key)
            lease.check(confirm=False)  # the heartbeat (every 10 s) has not noticed yet
            with pytest.raises(LeaseLostError, match="another holder"):
                lease.check()
        assert events[-1] == "lost" and "released" not in events

    def test_hold_times_out_with_lock_timeout(self, manager: LockManager) -> None:
        key = new_key()
        assert manager.acquire(key, "nftest-a", timeout=0)
        for timeout in (0, 0.1):
            with pytest.raises(LockTimeout, match="nftest-a"):
                with hold(manager, key, "nftest-b", timeout=timeout):
                    pass
        manager.release(key, "nftest-a")


class TestMemoryLockManager(LockManagerContract):
    kind = "memory"
    shared_across_processes = False


class TestFileLockManager(LockManagerContract):
    kind = "file"


class TestRedisLockManager(LockManagerContract):
    kind = "redis"


class TestPostgresLockManager(LockManagerContract):
    kind = "postgres"

    def test_a_broken_lock_is_free_when_break_lock_returns(
        self, manager: LockManager, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A session ends a moment after its connection closes or its backend is
        terminated, not at once: ``break_lock`` waits until the sessions it ended let go of
        the advisory lock (an ``acquire`` right after a break once found it still held, on a
        loaded machine: 1 round of 20). Here another session holds it and lets go 0.5 s
        later; sessions that are not waited for are not."""
        import psycopg

        from notebook_flow.locks import postgres

        # (no give-up time to speak of: waiting for the wrong session would hang the test)
        monkeypatch.setattr(postgres, "_BREAK_WAIT", 3600.0)
        assert isinstance(manager, PostgresLockManager)
        key = new_key()
        params = manager._params(key)
        other = psycopg.connect(PG_DSN, autocommit=True)
        assert other.execute("select pg_try_advisory_lock(%(id)s)", params).fetchone() == (True,)
        pid = other.info.backend_pid
        timer = threading.Timer(0.5, other.close)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            manager._wait_ended(conn, key, [pid + 1_000_000])  # not a holder: returns at once
            assert not manager.acquire(key, "nftest-a", timeout=0)
            timer.start()
            manager._wait_ended(conn, key, [pid])
            assert manager.acquire(key, "nftest-a", timeout=0)
        # And through break_lock itself: free when it returns.
        assert manager.break_lock(key)
        assert manager.acquire(key, "nftest-b", timeout=0)
        holder = manager.holder_of(key)
        assert holder is not None and holder.holder == "nftest-b"


# -- lease details that need no server ---------------------------------------------------------


def test_lease_check_fails_once_the_lease_runs_out_locally() -> None:
    manager = MemoryLockManager()
    with hold(manager, "k", "nftest-a", lease=0.3) as lease:
        lease._stop.set()  # a heartbeat that cannot get through
        time.sleep(0.5)
        with pytest.raises(LeaseLostError, match="ran out"):
            lease.check()
    assert lease.lost


def test_default_lock_manager_for_stores(tmp_path: Path) -> None:
    from notebook_flow.errors import ConfigurationError

    manager = default_lock_manager_for(str(tmp_path))
    assert isinstance(manager, FileLockManager)
    assert manager.directory == str(tmp_path / "locks")
    assert isinstance(default_lock_manager_for(f"file://{tmp_path}"), FileLockManager)
    memory = default_lock_manager_for("memory://shared")
    assert isinstance(memory, MemoryLockManager)
    assert memory.acquire("k", "a", timeout=0)
    assert default_lock_manager_for("memory://shared").is_locked("k")  # same URL, same table
    with pytest.raises(ConfigurationError, match="RedisLockManager"):
        default_lock_manager_for("s3://bucket/store")


def test_file_lock_names_are_safe(tmp_path: Path) -> None:
    manager = FileLockManager(tmp_path)
    for key in ("../../etc/passwd", "a/b", "", "x" * 500, ".hidden"):
        assert manager.acquire(key, "nftest-a", timeout=0)
        assert manager.holder_of(key).key == key  # type: ignore[union-attr]
        manager.release(key, "nftest-a")
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())


def test_unreachable_servers_raise_lock_error() -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    managers: list[LockManager] = [
        RedisLockManager(port=1, retry=Retry(NoBackoff(), 0)),  # redis-py retries by default
        PostgresLockManager("postgresql://postgres@127.0.0.1:1/test?connect_timeout=1"),
    ]
    for manager in managers:
        with pytest.raises(LockError, match="failed to"):
            manager.acquire("k", "nftest-a", timeout=0)
        with pytest.raises(LockError):
            manager.holder_of("k")


def test_holder_liveness_is_judged_only_within_our_scope() -> None:
    from notebook_flow.locks.base import holder_process_dead, pid_scope

    me = _identity.process()
    ours = {"host": me.host, "scope": pid_scope(), "pid": me.pid, "start_time": me.start_time}
    assert not holder_process_dead(ours)
    assert holder_process_dead({**ours, "pid": 2**22 + 12345})  # no such process
    assert holder_process_dead({**ours, "start_time": 1})  # our pid, recycled: not the holder
    # Same host name but another boot or pid namespace (a container): we cannot tell.
    assert not holder_process_dead({**ours, "pid": 2**22 + 12345, "scope": "other-boot/1"})
    assert not holder_process_dead({**ours, "pid": 2**22 + 12345, "host": "elsewhere"})
