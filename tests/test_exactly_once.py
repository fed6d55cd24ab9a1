"""Exactly once at the task level: SERIALIZABLE tasks under races, long bodies, retries.

The lock managers themselves are tested in test_locks_contract.py / test_locks_recovery.py;
here a whole task call (key → lookup → lock → re-check → run → commit → release) runs in
many threads and processes at once. A task body marks each execution with an O_EXCL file,
so "exactly once" is counted on disk, not inferred. Crashes and pauses are in
test_exactly_once_crash.py; the child process is exactly_once_worker.py.
"""

from __future__ import annotations

import asyncio
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401 (fixture)
from test_locks_contract import PG_DSN, PG_TABLE, REDIS_URL, require_server

import notebook_flow as nf
from notebook_flow import config, current_run, task
from notebook_flow.cache_policies import INPUTS, CachePolicy
from notebook_flow.errors import ConfigurationError, LeaseLostError, LockTimeout
from notebook_flow.locks import (
    LockManager,
    MemoryLockManager,
    PostgresLockManager,
    RedisLockManager,
    default_lock_manager_for,
)

WORKER = Path(__file__).with_name("exactly_once_worker.py")

# -- helpers shared with test_exactly_once_crash.py ----------------------------------------------


@pytest.fixture
def lock_managers() -> Iterator[Callable[[str], LockManager | None]]:
    """``make(kind)``: None for "file" (the store's default manager), else a fresh manager
    on the test servers (its own Redis key prefix); removes what the test left behind."""
    cleanups: list[Callable[[], None]] = []

    def make(kind: str) -> LockManager | None:
        if kind == "file":
            return None
        require_server(kind)
        if kind == "redis":
            prefix = f"nftest-eo-{uuid.uuid4().hex[:10]}"

            def drop_prefix() -> None:
                import redis

                client = redis.Redis.from_url(REDIS_URL)
                names = list(client.scan_iter(match=f"{prefix}:*"))
                if names:
                    client.delete(*names)
                client.close()

            cleanups.append(drop_prefix)
            return RedisLockManager(url=REDIS_URL, prefix=prefix)
        if kind == "postgres":
            manager = PostgresLockManager(PG_DSN, table=PG_TABLE)
            # Only what this test's task keys left; other tests share the table.
            cleanups.append(lambda: [manager.break_lock(k) for k in observed_keys()])
            return manager
        raise ValueError(kind)

    yield make
    for cleanup in cleanups:
        cleanup()


def observed_keys() -> list[str]:
    """The keys of the runs in this test's store (its index)."""
    config.get_metadata().flush(30)
    history = nf.history()
    return sorted({k for k in history["key"] if isinstance(k, str)})


def manager_of(manager: LockManager | None) -> LockManager:
    """The manager the worker uses: the given one, or the store's default (file locks)."""
    return manager if manager is not None else default_lock_manager_for(config.get_store())


@dataclass
class Outcome:
    """What one worker process printed, by task argument."""

    returncode: int
    keys: dict[str, str] = field(default_factory=dict)
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    stderr: str = ""


class Worker:
    """A child process calling ``charge(name)`` (exactly_once_worker.py) for some names."""

    def __init__(
        self,
        env: dict[str, str],
        tmp_path: Path,
        names: list[str],
        *,
        manager: LockManager | None = None,
        crash_at: str | None = None,
        **options: Any,
    ) -> None:
        cfg = {
            "manager": base64.b64encode(pickle.dumps(manager)).decode() if manager else None,
            "markers": str(tmp_path / "markers"),
            "names": names,
            **options,
        }
        env = dict(env)
        env.pop("NOTEBOOK_FLOW_CRASH_AT", None)
        if crash_at is not None and crash_at != "mid_body":
            env["NOTEBOOK_FLOW_CRASH_AT"] = crash_at
        if crash_at == "mid_body":
            cfg["kill_in_body"] = True
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(cfg)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reaped_at: float | None = None

    def finish(self, timeout: float = 400) -> Outcome:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"worker hung; stdout {out!r}; stderr {err[-3000:]}") from None
        if self.reaped_at is None:  # finish_all() may have seen it end earlier
            self.reaped_at = time.monotonic()
        outcome = Outcome(self.proc.returncode, stderr=err)
        for line in out.splitlines():
            kind, _, rest = line.partition(" ")
            name, _, text = rest.partition(" ")
            if kind == "KEY":
                outcome.keys[name] = text
            elif kind == "RESULT":
                outcome.results.setdefault(name, []).append(json.loads(text))
            elif kind == "ERROR":
                outcome.errors.setdefault(name, []).append(text)
        return outcome

    def kill(self) -> None:
        """Clean-up: end the process if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.communicate()


def executions(tmp_path: Path, name: str) -> int:
    """How many times the body ran for ``name`` (its O_EXCL marker files)."""
    folder = tmp_path / "markers" / name
    return len(list(folder.iterdir())) if folder.exists() else 0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Poll ``predicate``; the default deadline is generous (a worker interpreter took more
    than 60 s to reach its task body at a load average of 70)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def states(name: str = "charge") -> dict[str, int]:
    """Run states of a task in this test's store, counted.

    The flush may wait for the metadata file lock while worker processes still exit (their
    exit hook writes their last events under it): generous, as at a load average of 70."""
    config.get_metadata().flush(300)
    counts = nf.history(task=name)["state"].astype(str).value_counts()
    return {str(k): int(v) for k, v in counts.items()}


def start_together(workers: list[Worker], barrier: Path) -> None:
    """Release workers waiting at the file barrier once every one of them is ready."""
    wait_until(
        lambda: (
            len(list(barrier.glob("ready-*"))) == len(workers)
            or any(w.proc.poll() is not None for w in workers)
        ),
        "the workers to reach the start barrier",
    )
    (barrier / "go").touch()


# -- races ---------------------------------------------------------------------------------------


def run_race(
    kind: str,
    processes: int,
    threads: int,
    tmp_path: Path,
    env: dict[str, str],
    make: Callable[[str], LockManager | None],
) -> None:
    manager = make(kind)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    workers = [
        Worker(env, tmp_path, ["race"], manager=manager, barrier=str(barrier), threads=threads)
        for _ in range(processes)
    ]
    try:
        start_together(workers, barrier)
        outcomes = [w.finish() for w in workers]
    finally:
        for w in workers:
            w.kill()
    for o in outcomes:
        assert o.returncode == 0, (o.errors, o.stderr[-3000:])
    results = [r for o in outcomes for r in o.results["race"]]
    calls = processes * threads
    assert len(results) == calls
    assert executions(tmp_path, "race") == 1
    assert all(r == results[0] for r in results), "every caller gets the winner's result"
    assert states() == {"COMPLETED": 1, "CACHED": calls - 1}
    assert not manager_of(manager).is_locked(outcomes[0].keys["race"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "redis", "postgres"])
def test_sixteen_processes_execute_once(kind, tmp_path, python_env, lock_managers):
    run_race(kind, 16, 1, tmp_path, python_env, lock_managers)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "redis"])
def test_four_processes_of_sixteen_threads_execute_once(kind, tmp_path, python_env, lock_managers):
    run_race(kind, 4, 16, tmp_path, python_env, lock_managers)


def test_sixteen_threads_with_a_memory_lock_manager_execute_once(tmp_path):
    runs: list[str] = []

    @task(name="charge", cache_policy=INPUTS.configure(lock_manager=MemoryLockManager()))
    def charge(user: str) -> dict[str, str]:
        os.close(os.open(tmp_path / "charged", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        time.sleep(0.05)  # keep the lock a while: the others must wait, not miss it
        run = current_run()
        assert run is not None
        runs.append(run.run_id)
        return {"user": user, "run": run.run_id}

    start = threading.Barrier(16)

    def call() -> dict[str, str]:
        start.wait()
        return charge("ada")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: call(), range(16)))
    assert len(runs) == 1
    assert results == [{"user": "ada", "run": runs[0]}] * 16
    assert states("charge") == {"COMPLETED": 1, "CACHED": 15}


def test_async_callers_execute_once_without_exhausting_the_default_executor():
    # Regression: waiters blocked in asyncio.to_thread filled the loop's default executor
    # (min(32, cpus + 4) threads), so the holder could never commit: a deadlock.
    calls: list[int] = []

    @task(
        name="fetch",
        cache_policy=INPUTS.configure(lock_manager=MemoryLockManager()),
        lock_timeout=300,  # generous: 40 waiters at a load average of 70 outlived 30 s
    )
    async def fetch(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0.1)
        return x * 2

    async def main() -> list[int]:
        return list(await asyncio.gather(*(fetch(21) for _ in range(40))))

    assert asyncio.run(main()) == [42] * 40
    assert calls == [21]
    assert states("fetch") == {"COMPLETED": 1, "CACHED": 39}


def test_async_caller_cancelled_while_waiting_leaves_no_lock():
    manager = MemoryLockManager()
    entered = threading.Event()

    @task(cache_policy=INPUTS.configure(lock_manager=manager))
    async def slow(x: int) -> int:
        entered.set()
        await asyncio.sleep(0.2)
        return x

    def lock_threads() -> int:
        return sum(t.name == "notebook_flow-lock-holder" for t in threading.enumerate())

    async def main() -> int:
        holder = asyncio.ensure_future(slow(1))
        await asyncio.to_thread(entered.wait, 10)
        waiter = asyncio.ensure_future(slow(1))
        while lock_threads() < 2:  # the waiter's thread is blocked on the lock
            await asyncio.sleep(0.005)
        waiter.cancel()
        value = await holder
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return value

    assert asyncio.run(main()) == 1
    # The waiter's thread gets the lock once the holder is done, and gives it straight back.
    wait_until(lambda: lock_threads() == 0, "the lock threads to end")
    assert manager.list_locks() == []


# -- leases --------------------------------------------------------------------------------------


def test_body_running_many_leases_executes_once_and_renewals_are_recorded(tmp_path):
    # Long enough for a loaded machine (a heartbeat stalled 4 s still renews in time); the
    # body ends once it saw its lock renewed several times and outlived two leases.
    lease = 6.0
    nf.configure(lock_lease=lease, lock_timeout=180)
    started = threading.Event()
    manager = default_lock_manager_for(config.get_store())

    @task(name="report", cache_policy=INPUTS.configure(isolation_level="SERIALIZABLE"))
    def report(day: str) -> dict[str, str]:
        os.close(os.open(tmp_path / "ran", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        started.set()
        run = current_run()
        assert run is not None and run.key is not None
        expiries: set[float] = set()
        outlived, deadline = time.monotonic() + 2 * lease, time.monotonic() + 180
        while len(expiries) < 5 or time.monotonic() < outlived:  # acquired + 4 renewals
            info = manager.holder_of(run.key)
            assert info is not None and time.monotonic() < deadline, (info, expiries)
            expiries.add(info.lease_expires)
            time.sleep(0.05)
        return {"day": day, "run": run.run_id}

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(report, "monday")
        assert started.wait(30)
        second = pool.submit(report, "monday")  # waits for the lock, then loads the result
        results = [first.result(), second.result()]
    assert results[0] == results[1]
    assert states("report") == {"COMPLETED": 1, "CACHED": 1}

    key = report.cache_key("monday")
    events = config.get_metadata().lock_events(limit=None)
    events = events[events["key"] == key]
    counts = events["event"].value_counts().to_dict()
    assert counts.get("renewed", 0) >= 4, counts
    assert counts.get("acquired") == 2 and counts.get("released") == 2, counts
    assert counts.get("waited") == 1, counts
    assert "lost" not in counts and "renew_failed" not in counts, counts
    assert set(events["task"]) == {"report"}
    assert config.get_metadata().locks().empty  # released: nothing left in the lock table


def test_waiter_that_times_out_is_told_who_holds_the_key_and_since_when(tmp_path):
    inside, leave = threading.Event(), threading.Event()
    holder_run: list[str] = []

    @task(cache_policy=INPUTS.configure(isolation_level="SERIALIZABLE"))
    def export(x: int) -> int:
        run = current_run()
        assert run is not None
        holder_run.append(run.run_id)
        inside.set()
        leave.wait(30)
        return x

    holder = threading.Thread(target=export, args=(1,))
    holder.start()
    try:
        assert inside.wait(30)
        impatient = export.with_options(lock_timeout=0.2)
        with pytest.raises(LockTimeout) as info:
            impatient(1)
    finally:
        leave.set()
        holder.join()
    message = str(info.value)
    assert isinstance(info.value, TimeoutError)
    assert f"run {holder_run[0]}" in message
    assert f"pid {os.getpid()}" in message
    assert "since 20" in message and "s ago" in message  # "since 2026-… (0 s ago)"
    assert "break_lock" in message and "notebook-flow locks --break" in message
    assert export(1) == 1  # the holder committed meanwhile: a hit


def test_body_that_raises_releases_the_lock_at_once():
    nf.configure(lock_lease=60)  # a leaked lock would block the next call for a minute
    attempts: list[int] = []

    @task(
        name="flaky", cache_policy=INPUTS.configure(isolation_level="SERIALIZABLE"), lock_timeout=5
    )
    def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            raise ValueError("card declined")
        return x

    with pytest.raises(ValueError, match="card declined"):
        flaky(7)
    manager = default_lock_manager_for(config.get_store())
    assert not manager.is_locked(flaky.cache_key(7))
    assert flaky(7) == 7
    assert attempts == [7, 7]
    history = nf.history(task="flaky")
    assert sorted(history["state"].astype(str)) == ["COMPLETED", "FAILED"]


def test_lost_lease_refuses_the_commit_and_records_the_failure():
    manager = MemoryLockManager()

    @task(name="pay", cache_policy=INPUTS.configure(lock_manager=manager))
    def pay(amount: int) -> int:
        run = current_run()
        assert run is not None and run.key is not None
        manager.break_lock(run.key)  # as an operator would, or a successor after our lease
        return amount

    with pytest.raises(LeaseLostError, match="was lost"):
        pay(10)
    store = config.get_store()
    assert store.lookup(pay.cache_key(10)) is None  # nothing committed
    history = nf.history(task="pay")
    assert list(history["state"].astype(str)) == ["FAILED"]
    assert history["error"][0].startswith("LeaseLostError: ")
    events = config.get_metadata().lock_events(limit=None)["event"].tolist()
    assert "lost" in events and "released" not in events


# -- idempotency keys ----------------------------------------------------------------------------


def test_idempotency_key_charges_once_however_often_retried_or_submitted():
    charged: list[tuple[str, int]] = []
    by_request_id = CachePolicy.from_cache_key_fn(lambda ctx, args: args["request_id"])

    @task(cache_policy=by_request_id.configure(lock_manager=MemoryLockManager()))
    def charge(user: str, amount: int, request_id: str) -> dict[str, Any]:
        charged.append((user, amount))
        time.sleep(0.01)
        return {"user": user, "amount": amount, "receipt": uuid.uuid4().hex}

    receipts = [charge("ada", 100, request_id="req-1") for _ in range(100)]  # client retries
    with ThreadPoolExecutor(8) as pool:  # the same request submitted from several threads
        receipts += list(pool.map(lambda _: charge("ada", 100, "req-1"), range(100)))
    assert charged == [("ada", 100)]
    assert all(r == receipts[0] for r in receipts)
    # The key is the idempotency key alone: a retry with changed arguments is the same charge.
    assert charge("ada", 999, request_id="req-1") == receipts[0]
    assert charge("ada", 100, request_id="req-2") != receipts[0]
    assert charged == [("ada", 100), ("ada", 100)]


# -- configuration -------------------------------------------------------------------------------


def test_remote_store_without_a_lock_manager_is_a_clear_error(
    s3_server: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("NOTEBOOK_FLOW_CACHE_DIR", str(tmp_path / "cache"))
    nf.configure(store=unique_s3_url(), storage_options=s3_options(s3_server))

    @task(cache_policy=INPUTS.configure(isolation_level="SERIALIZABLE"))
    def transfer(amount: int) -> int:
        raise AssertionError("must not run without a lock that reaches every machine")

    with pytest.raises(ConfigurationError) as info:
        transfer(5)
    message = str(info.value)
    for option in ("is not local", "RedisLockManager", "PostgresLockManager", "READ_COMMITTED"):
        assert option in message

    # With a manager that every process using the store reaches, the same task runs.
    @task(name="transfer_locked", cache_policy=INPUTS.configure(lock_manager=MemoryLockManager()))
    def transfer_locked(amount: int) -> int:
        return amount

    assert transfer_locked(5) == 5
    assert transfer_locked(5) == 5
    assert states("transfer_locked") == {"COMPLETED": 1, "CACHED": 1}
