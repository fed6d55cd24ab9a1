"""Exactly once through crashes, pauses and lost connections, with real processes and servers.

* Crash matrix: a holder is SIGKILLed at each named point of the miss path; its lock comes
  back (when its lease runs out on another host; at once on this host or with PostgreSQL),
  a rerun in a new process succeeds, the body ran at most twice, and the stored result
  loads (its checksum verifies).

Leases: a holder that must live through its work gets the default 30 s (a loaded machine
stalls a process for seconds, and a lease lost that way is a failed commit, not a flake to
retry). Only a holder the test stops (SIGSTOP) to let its lease run out gets a short one,
and nothing then depends on it surviving; a crashed holder on "another host" keeps 30 s and
the test waits for that to run out.
* Fencing: a holder stopped (SIGSTOP) past its lease resumes after a successor committed;
  its commit is refused with LeaseLostError and recorded FAILED; one result stays visible.
* Redis: connections killed, or the server restarted empty, during a hold: never two
  committed results.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_exactly_once import (
    Outcome,
    Worker,
    executions,
    lock_managers,  # noqa: F401 (fixture)
    manager_of,
    states,
    wait_until,
)

import notebook_flow as nf
from notebook_flow import _identity, config
from notebook_flow.locks import RedisLockManager

POINTS = ["after_lock", "mid_body", "after_payload", "after_manifest", "before_release"]
#: Executions of the body, crashed run and rerun together: a crash before the manifest means
#: the rerun runs the body again; once the manifest is written the rerun loads it.
EXECUTIONS = {
    "after_lock": 1,
    "mid_body": 2,
    "after_payload": 2,
    "after_manifest": 1,
    "before_release": 1,
}
#: The lease of holders that must survive their work (the library's default).
LEASE = 30.0
#: The lease of a holder whose renewals a test watches: they come every lease / 3.
RENEWING_LEASE = 9.0


def finish_all(workers: dict[str, Worker], timeout: float = 400) -> dict[str, Outcome]:
    """Wait for every worker, noting when each one ended (they run at the same time).

    The deadline is generous: five interpreters starting at once on a machine with a load
    average of 40 took more than two minutes to reach their crash points."""
    deadline = time.monotonic() + timeout
    while any(w.proc.poll() is None for w in workers.values()):
        running = [name for name, w in workers.items() if w.proc.poll() is None]
        assert time.monotonic() < deadline, f"workers {running} did not end in {timeout} s"
        for w in workers.values():
            if w.reaped_at is None and w.proc.poll() is not None:
                w.reaped_at = time.monotonic()
        time.sleep(0.01)
    return {name: w.finish() for name, w in workers.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "host"),
    [
        ("file", ""),  # same host: the dead pid is seen at once
        # As if on another machine: the TTL runs out. The holder must live up to its crash
        # point first, and a 6 s lease was lost on the way at a load average of 65.
        ("redis", "elsewhere"),
        ("postgres", ""),  # the session ends with the process: at once
    ],
    ids=["file", "redis-other-host", "postgres"],
)
def test_holder_killed_at_each_crash_point_is_recovered(
    kind,
    host,
    tmp_path,
    python_env,
    lock_managers,  # noqa: F811 (the fixture imported above)
):
    manager = lock_managers(kind)
    crashed = {
        point: Worker(
            python_env, tmp_path, [point], manager=manager, crash_at=point, lease=LEASE, host=host
        )
        for point in POINTS
    }
    try:
        outcomes = finish_all(crashed)
    finally:
        for w in crashed.values():
            w.kill()
    keys = {point: outcomes[point].keys[point] for point in POINTS}
    for point, o in outcomes.items():
        assert o.returncode == -signal.SIGKILL, (point, o.stderr[-3000:])
        assert not o.results, point

    # The lock comes back: taken here, timed from the moment the holder was gone.
    observer = manager_of(manager)
    me = _identity.holder_id("observer")
    # No wall-clock bound is asserted (shared machines stall for seconds): the lock must be
    # taken over at all, before a generous timeout (a same-host or PostgreSQL recovery does
    # not wait for the 30 s lease: the timeout is shorter than it).
    for point in POINTS:
        reaped_at = crashed[point].reaped_at
        assert reaped_at is not None
        timeout = LEASE + 60 if host else LEASE - 5
        taken = observer.acquire(keys[point], me, timeout=timeout, lease=30)
        recovered_after = time.monotonic() - reaped_at
        assert taken, f"{point}: lock still held {recovered_after:.1f} s after its holder died"
        observer.release(keys[point], me)

    # A rerun in a new process succeeds; the body ran at most twice; the result loads.
    rerun = Worker(python_env, tmp_path, POINTS, manager=manager, lease=LEASE).finish()
    assert rerun.returncode == 0, (rerun.errors, rerun.stderr[-3000:])
    store = config.get_store()
    for point in POINTS:
        assert executions(tmp_path, point) == EXECUTIONS[point], point
        manifest = store.lookup(keys[point])
        assert manifest is not None, point
        assert store.load(manifest) == rerun.results[point][0], point  # size + checksum checked
        assert not observer.is_locked(keys[point]), point
    assert len(list(store.iter_manifests())) == len(POINTS)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "redis", "postgres"])
def test_holder_paused_past_its_lease_cannot_overwrite_its_successor(
    kind,
    tmp_path,
    python_env,
    lock_managers,  # noqa: F811 (the fixture imported above)
):
    manager = lock_managers(kind)
    pause = tmp_path / "pause"
    pause.mkdir()
    first = Worker(python_env, tmp_path, ["pay"], manager=manager, lease=1.0, pause=str(pause))
    try:
        wait_until((pause / "in-body").exists, "the first worker to run the body")
        os.kill(first.proc.pid, signal.SIGSTOP)
        # The successor waits for the lease to run out (PostgreSQL: then ends the stuck
        # session), takes the lock over, runs the body and commits. (Had the first lost its
        # short lease before it was stopped, all the same would follow.)
        second = Worker(python_env, tmp_path, ["pay"], manager=manager, lease=LEASE).finish()
        assert second.returncode == 0, (second.errors, second.stderr[-3000:])
    finally:
        (pause / "proceed").touch()
        if first.proc.poll() is None:
            os.kill(first.proc.pid, signal.SIGCONT)
    resumed = first.finish()

    assert resumed.returncode == 1
    (error,) = resumed.errors["pay"]
    assert error.startswith("LeaseLostError: "), error
    assert executions(tmp_path, "pay") == 2
    store = config.get_store()
    (manifest,) = store.iter_manifests()  # one result: the successor's
    (winner,) = second.results["pay"]
    assert manifest.run_id == winner["run_id"]
    assert store.load(manifest) == winner
    assert states() == {"COMPLETED": 1, "FAILED": 1}
    history = nf.history(task="charge")
    failed = history[history["state"].astype(str) == "FAILED"].iloc[0]
    assert failed["error"].startswith("LeaseLostError: ")
    assert failed["run_id"] != winner["run_id"]


# -- Redis connections ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of this test alone on a free loopback port, without persistence."""

    def __init__(self, folder: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed; run scripts/services.sh")
        self.exe = exe
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, "the private redis-server to answer", timeout=120)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again: every key is gone (nothing is saved)."""
        self.stop()
        self.start()


def wait_for_renewals(admin: Any, prefix: str, count: int, timeout: float = 60) -> None:
    """Wait until the one lock under ``prefix`` had its TTL renewed ``count`` times."""
    (name,) = admin.scan_iter(match=f"{prefix}:lock:*")
    seen, last = 0, admin.pttl(name)
    deadline = time.monotonic() + timeout
    while seen < count:
        assert time.monotonic() < deadline, f"{seen} of {count} renewals of {name!r} seen"
        time.sleep(0.05)
        ttl = admin.pttl(name)
        assert ttl > 0, f"the lock {name!r} expired or vanished (pttl {ttl})"
        seen += ttl > last
        last = ttl


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("disruption", ["kill-connections", "restart-server"])
def test_redis_disrupted_during_a_hold_never_commits_twice(
    disruption, tmp_path, python_env, private_redis
):
    import redis

    prefix = f"nftest-{uuid.uuid4().hex[:8]}"
    manager = RedisLockManager(url=private_redis.url, prefix=prefix)
    pause = tmp_path / "pause"
    pause.mkdir()
    first = Worker(
        python_env, tmp_path, ["pay"], manager=manager, lease=RENEWING_LEASE, pause=str(pause)
    )
    try:
        wait_until((pause / "in-body").exists, "the first worker to run the body")
        if disruption == "kill-connections":
            admin = redis.Redis.from_url(private_redis.url)
            try:
                assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
                wait_for_renewals(admin, prefix, 2)  # they reconnect: the key is still ours
            finally:
                admin.close()
            (pause / "proceed").touch()  # the holder finishes; a newcomer loads its result
            second = Worker(python_env, tmp_path, ["pay"], manager=manager, lease=LEASE).finish()
        else:
            private_redis.restart()  # the lock is gone: a newcomer takes it and runs
            second = Worker(python_env, tmp_path, ["pay"], manager=manager, lease=LEASE).finish()
            (pause / "proceed").touch()
    finally:
        (pause / "proceed").touch()
    resumed = first.finish()
    assert second.returncode == 0, (second.errors, second.stderr[-3000:])

    counts = states()
    assert counts.get("COMPLETED") == 1, counts  # never two committed results
    store = config.get_store()
    (manifest,) = store.iter_manifests()
    history = nf.history(task="charge")
    completed = history[history["state"].astype(str) == "COMPLETED"].iloc[0]
    assert manifest.run_id == completed["run_id"]
    if disruption == "kill-connections":  # the holder survived: one execution, one hit
        assert resumed.returncode == 0, (resumed.errors, resumed.stderr[-3000:])
        assert counts == {"COMPLETED": 1, "CACHED": 1}
        assert executions(tmp_path, "pay") == 1
        assert resumed.results["pay"] == second.results["pay"]
    else:  # the holder lost its lock with the server's memory: its commit is refused
        assert resumed.returncode == 1
        assert resumed.errors["pay"][0].startswith("LeaseLostError: ")
        assert counts == {"COMPLETED": 1, "FAILED": 1}
        assert executions(tmp_path, "pay") == 2
        assert store.load(manifest) == second.results["pay"][0]
