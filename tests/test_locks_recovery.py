"""Crash recovery, pauses, lost connections and long holds, with real processes and servers.

A child process holds a lock through ``hold()`` and prints what happens to it; the test
kills, stops or disconnects it and checks that the lock comes back (never "locked forever")
and that a holder that lost its lease cannot pass its fencing check.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_locks_contract import PG_DSN, PG_TABLE, new_key, new_manager, pickled, python_env

from notebook_flow import _identity
from notebook_flow.errors import LeaseLostError
from notebook_flow.locks import LockManager, MemoryLockManager, PostgresLockManager, hold

HOLDER = """
import base64, json, pickle, sys, time
from notebook_flow import _identity
from notebook_flow.errors import LeaseLostError
from notebook_flow.locks import hold

cfg = json.loads(sys.argv[1])
if cfg.get("host"):
    _identity.process().host = cfg["host"]  # pretend to run on another machine
manager = pickle.loads(base64.b64decode(cfg["manager"]))
holder = _identity.holder_id("child-run")
def say(*words):  # one write per line: the heartbeat thread reports events concurrently
    sys.stdout.write(" ".join(map(str, words)) + "\\n")
    sys.stdout.flush()
on_event = lambda event, info: say("EVENT", event)
with hold(manager, cfg["key"], holder, lease=cfg["lease"], on_event=on_event) as lease:
    say("ACQUIRED", lease.fence)
    if cfg["mode"] == "sleep":
        time.sleep(3600)
    while True:  # "watch": what the task layer does before committing
        time.sleep(0.02)
        try:
            lease.check()
        except LeaseLostError:
            say("LOST")
            renewed = manager.renew(cfg["key"], holder, cfg["lease"])
            say("RENEW", renewed, repr(time.time()))
            break
say("EXIT")
"""


class Child:
    """A holder process whose stdout lines can be awaited."""

    def __init__(
        self, manager: LockManager, key: str, lease: float, mode: str, host: str = ""
    ) -> None:
        import json

        payload = {
            "manager": pickled(manager),
            "key": key,
            "lease": lease,
            "mode": mode,
            "host": host,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, json.dumps(payload)],
            env=python_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str, timeout: float = 180) -> str:
        """The next line starting with ``prefix``; the deadline is generous: a child
        interpreter and its imports can take tens of seconds at a load average of 60."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                stderr = ""
                if self.proc.poll() is not None and self.proc.stderr is not None:
                    stderr = self.proc.stderr.read()
                raise AssertionError(
                    f"no {prefix!r} from the child; saw {self.seen}; {stderr}"
                ) from None
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.signal(signal.SIGCONT)
        child.close()


def _events() -> tuple[list[str], Callable[[str, dict[str, Any]], None]]:
    events: list[str] = []
    return events, lambda event, info: events.append(event)


ME = _identity.holder_id("parent-run")


@pytest.mark.parametrize(
    ("kind", "lease", "host"),
    [
        ("file", 600.0, ""),  # same host: the dead pid is seen at once
        ("file", 1.5, "elsewhere"),  # another host: the lease runs out
        ("redis", 600.0, ""),  # same host: dead pid seen, value swapped
        ("redis", 1.5, "elsewhere"),  # another host: the TTL runs out
        ("postgres", 600.0, ""),  # the session ends with the process
    ],
    ids=["file-same-host", "file-other-host", "redis-same-host", "redis-other-host", "postgres"],
)
def test_sigkilled_holder_is_recovered(
    kind: str, lease: float, host: str, tmp_path: Path, children: list[Child]
) -> None:
    manager, cleanup = new_manager(kind, tmp_path)
    key = new_key()
    child = Child(manager, key, lease, "sleep", host)
    children.append(child)
    child_fence = int(child.expect("ACQUIRED").split()[1])
    info = manager.holder_of(key)
    assert info is not None
    child.signal(signal.SIGKILL)  # not reaped yet: a zombie must count as dead too
    events, on_event = _events()
    timeout = 60 if host == "" else lease + 60  # liveness must not wait for the lease
    with hold(manager, key, ME, lease=30, timeout=timeout, on_event=on_event) as held:
        taken_at = time.time()
        assert held.fence is not None and held.fence > child_fence
    if host == "":
        # Taken over by liveness: long before the dead holder's 10-minute lease ran out
        # (no timing target: only what tells liveness from expiry).
        assert taken_at < info.lease_expires, "recovered by lease expiry, not liveness"
        assert "recovered" in events  # the dead holder's record was taken over
    cleanup()


@pytest.mark.parametrize("kind", ["file", "redis", "postgres"])
def test_paused_holder_loses_its_lease_and_cannot_commit(
    kind: str, tmp_path: Path, children: list[Child]
) -> None:
    manager, cleanup = new_manager(kind, tmp_path)
    key = new_key()
    child = Child(manager, key, 1.0, "watch")
    children.append(child)
    child_fence = int(child.expect("ACQUIRED").split()[1])
    child.signal(signal.SIGSTOP)
    try:
        stopped_at = time.time()
        with hold(manager, key, ME, lease=30, timeout=180) as held:
            assert held.fence is not None and held.fence > child_fence
            child.signal(signal.SIGCONT)
            child.expect("LOST")  # its Lease.check() raised LeaseLostError
            _, renewed, at = child.expect("RENEW").split()
            # Under heavy load the child's own clock may call the lease lost (and its renewal
            # still succeed) before it was stopped, i.e. before we took the lock over; any
            # renewal after that must be refused.
            assert renewed == "False" or float(at) < stopped_at, (renewed, at, stopped_at)
            child.expect("EXIT")
            assert child.proc.wait(180) == 0
            held.check()  # the successor still holds it: the child's exit released nothing
            info = manager.holder_of(key)
            assert info is not None and info.holder == ME
    finally:
        child.signal(signal.SIGCONT)
    cleanup()


def test_killed_redis_connection_is_survived_and_a_lost_key_noticed(tmp_path: Path) -> None:
    import redis
    from test_locks_contract import REDIS_URL, require_server

    require_server("redis")
    name = f"nftest-kill-{uuid.uuid4().hex[:8]}"
    prefix = f"nftest-{uuid.uuid4().hex[:10]}"
    from notebook_flow.locks import RedisLockManager

    manager = RedisLockManager(url=REDIS_URL, prefix=prefix, client_name=name)
    admin = redis.Redis.from_url(REDIS_URL)

    def kill_connections() -> int:
        killed = 0
        for client in admin.client_list():
            if client.get("name") == name:
                admin.client_kill_filter(_id=client["id"])
                killed += 1
        return killed

    key = new_key()
    events, on_event = _events()

    def wait_for(what: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, f"events so far: {events}"
            time.sleep(0.02)

    try:
        # Renewals every 3 s: a loaded machine's stalls of several seconds lose nothing.
        with hold(manager, key, ME, lease=9.0, on_event=on_event) as held:
            assert kill_connections() >= 1
            wait_for(lambda: events.count("renewed") >= 2)  # each reconnects: still ours
            held.check()
            assert "lost" not in events, events
            # As if Redis restarted without persistence: the key is gone.
            admin.delete(f"{prefix}:lock:{{{key}}}")
            kill_connections()
            wait_for(lambda: "lost" in events)  # the next heartbeat is refused
            with pytest.raises(LeaseLostError):
                held.check()
            assert not manager.renew(key, ME, 1.0)
            assert manager.acquire(key, "nftest-next", timeout=0)
        # The lost holder's exit must not release its successor's lock.
        assert manager.holder_of(key).holder == "nftest-next"  # type: ignore[union-attr]
        manager.release(key, "nftest-next")
    finally:
        names = list(admin.scan_iter(match=f"{prefix}:*"))
        if names:
            admin.delete(*names)
        admin.close()


@pytest.mark.parametrize("kind", ["memory", "file", "redis", "postgres"])
def test_hold_many_times_its_lease_stays_exclusive(kind: str, tmp_path: Path) -> None:
    """Held through renewals (every lease / 3) for two leases while a thief keeps trying.

    The lease is long enough for a loaded machine: a heartbeat stalled for 4 s still
    renews in time. The hold ends on events (renewals seen and leases outlived), not on a
    count of sleeps."""
    manager, cleanup = new_manager(kind, tmp_path)
    key = new_key()
    events, on_event = _events()
    lease = 6.0
    stolen: list[bool] = []
    stop = threading.Event()

    def contender() -> None:
        while not stop.is_set():
            if manager.acquire(key, "nftest-thief", timeout=0):
                stolen.append(True)
                manager.release(key, "nftest-thief")
            time.sleep(0.05)

    with hold(manager, key, ME, lease=lease, on_event=on_event) as held:
        thief = threading.Thread(target=contender)
        thief.start()
        outlived = time.monotonic() + 2 * lease
        deadline = time.monotonic() + 180
        while events.count("renewed") < 4 or time.monotonic() < outlived:
            held.check(confirm=False)  # only what the heartbeat achieved
            assert time.monotonic() < deadline, events
            time.sleep(0.05)
        stop.set()
        thief.join()
        held.check()
    assert not stolen
    assert "lost" not in events and events[-1] == "released"
    cleanup()


def test_memory_lock_of_a_finished_thread_is_recovered() -> None:
    manager = MemoryLockManager()
    worker = threading.Thread(
        target=manager.acquire, args=("k", "nftest-gone"), kwargs={"lease": 60}
    )
    worker.start()
    worker.join()
    assert not manager.is_locked("k")  # its thread is gone
    acquisition = manager.acquire_info("k", "nftest-next", timeout=0)
    assert acquisition is not None and acquisition.recovered is not None
    assert acquisition.recovered.holder == "nftest-gone"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_end_the_parents_postgres_sessions(tmp_path: Path) -> None:
    manager, cleanup = new_manager("postgres", tmp_path)
    key = new_key()
    assert manager.acquire(key, ME, timeout=0, lease=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: use the manager, drop every inherited connection, exit
        code = 1
        try:
            import gc

            other = new_key()
            code = 0 if manager.acquire(other, "nftest-child", timeout=0) else 2
            manager.release(other, "nftest-child")
            gc.collect()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    time.sleep(0.2)
    assert manager.renew(key, ME, 30)  # our session survived the child
    observer = PostgresLockManager(PG_DSN, table=PG_TABLE)
    assert observer.holder_of(key).holder == ME  # type: ignore[union-attr]
    manager.release(key, ME)
    cleanup()


CONTENDER = """
import base64, json, os, pickle, sys, time
from notebook_flow import _identity
cfg = json.loads(sys.argv[1])
manager = pickle.loads(base64.b64decode(cfg["manager"]))
holder = _identity.holder_id("contender")
marker = os.path.join(cfg["dir"], "inside")
while not os.path.exists(os.path.join(cfg["dir"], "go")):
    time.sleep(0.005)
for _ in range(cfg["rounds"]):
    assert manager.acquire(cfg["key"], holder, timeout=120, lease=30)
    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # fails if another is inside
    with open(os.path.join(cfg["dir"], "count"), "a") as f:
        f.write("x")
    time.sleep(0.001)
    os.unlink(marker)
    manager.release(cfg["key"], holder)
"""


@pytest.mark.parametrize("kind", ["file", "redis", "postgres"])
def test_processes_are_mutually_exclusive(kind: str, tmp_path: Path) -> None:
    import json

    manager, cleanup = new_manager(kind, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    payload = {"manager": pickled(manager), "key": new_key(), "dir": str(work), "rounds": 10}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, json.dumps(payload)],
            env=python_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    (work / "go").touch()
    failures = []
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        if proc.returncode != 0:
            failures.append(err)
    assert not failures, failures[0]
    assert (work / "count").read_text() == "x" * 60
    cleanup()
