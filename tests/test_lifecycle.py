"""Issue 17 (cache lifecycle): pins, last use, quota eviction, gc rules — on real stores.

Local folders and S3 (moto's server, shared by subprocesses) alike: pins live in the
store; last use recorded on a hit reaches other processes through touch files; eviction
removes each entry once and a reader racing with it gets a miss; four processes
committing and hitting under a quota leave the store under it, with every value they got
exact and the pinned entries there; ``gc --unreachable`` prunes the results of a task's
two older code versions and keeps the current one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401 (fixture)

from notebook_flow import cli
from notebook_flow.errors import PayloadCorruptError
from notebook_flow.lifecycle import evict, gc, inventory, quota, rules, usage
from notebook_flow.storage import ResultStore
from notebook_flow.storage.pins import pin, pinned_keys, unpin

HERE = Path(__file__).resolve().parent
KEYS = [f"{i:02x}" * 16 for i in range(1, 9)]


def _commit(store: ResultStore, key: str, value: Any, task: str = "t", **kw: Any) -> Any:
    return store.commit(
        key, value, task=task, components=kw.pop("components", {}), run_id="r",
        duration=0.1, expires_at=None, **kw,
    )  # fmt: skip


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> ResultStore:
    if request.param == "local":
        return ResultStore(str(tmp_path / "lc"))
    endpoint = request.getfixturevalue("s3_server")
    return ResultStore(unique_s3_url(), storage_options=s3_options(endpoint))


def test_pins_live_in_the_store(any_store: ResultStore) -> None:
    assert pinned_keys(any_store) == frozenset()
    assert pin(any_store, KEYS[:3]) == 3
    assert pin(any_store, KEYS[:2]) == 0  # already pinned
    again = ResultStore(any_store.url, storage_options=any_store._storage_options)
    assert pinned_keys(again) == frozenset(KEYS[:3])  # another process/machine sees them
    assert unpin(again, [KEYS[0], KEYS[5]]) == 1
    assert pinned_keys(any_store) == frozenset(KEYS[1:3])
    with pytest.raises(Exception, match="invalid cache key"):
        pin(any_store, ["../../etc/passwd"])


def test_last_use_reaches_other_processes_through_the_store(any_store: ResultStore) -> None:
    for key in KEYS[:3]:
        _commit(any_store, key, list(range(5000)))
    usage.touch(any_store, KEYS[0])
    assert usage.flush(any_store) == 1
    code = (
        "import sys, json; from notebook_flow.storage import ResultStore;"
        "from notebook_flow.lifecycle import inventory;"
        f"s = ResultStore({any_store.url!r}, storage_options={any_store._storage_options!r});"
        "inv = inventory.scan(s);"
        "print(json.dumps({k: e.last_used for k, e in inv.entries.items()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )  # fmt: skip
    seen = json.loads(out.stdout)
    assert set(seen) == set(KEYS[:3])
    assert seen[KEYS[0]] > max(seen[KEYS[1]], seen[KEYS[2]])  # the touched one is newest
    # Touch files are folded into one, and nothing is lost doing it.
    for key in KEYS[1:3]:
        usage.touch(any_store, key)
        usage.flush(any_store)
    before = usage.last_used(any_store)
    assert usage.compact(any_store, at=1) == 3
    assert usage.last_used(any_store) == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_records_only_its_own_hits(tmp_path: Path) -> None:
    """The hit path checks no process id: a forked child starts with no notes (the parent's
    are the parent's to write) and a thread of its own that writes the child's."""
    store = ResultStore(str(tmp_path / "lc"))
    usage.touch(store, KEYS[0])  # noted in the parent, not written yet
    pid = os.fork()
    if pid == 0:  # the child: exits without pytest's clean-up
        code = 1
        try:
            usage.touch(store, KEYS[1])
            code = 0 if usage.flush(store) == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert set(usage.last_used(store)) == {KEYS[0], KEYS[1]}  # the child's from its file
    written = [json.loads(p.read_bytes()) for p in (tmp_path / "lc" / "usage").iterdir()]
    assert [set(w["used"]) for w in written] == [{KEYS[1]}]
    assert usage.flush(store) == 1  # the parent's own note, written by the parent


def test_bad_touch_files_are_skipped(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "lc"))
    _commit(store, KEYS[0], list(range(5000)))
    folder = tmp_path / "lc" / "usage"
    folder.mkdir()
    (folder / "garbage.json").write_bytes(b"\x00not json")
    future = time.time() + 10**6
    (folder / "forged.json").write_text(
        json.dumps({"v": 1, "used": {KEYS[0]: future, "../x": 1.0, KEYS[1]: "soon"}})
    )
    used = usage.last_used(store)
    assert set(used) == {KEYS[0]} and used[KEYS[0]] <= time.time()  # no time in the future


def test_eviction_is_least_recently_used_and_spares_pins(any_store: ResultStore) -> None:
    for key in KEYS[:5]:
        _commit(any_store, key, np.zeros(20_000))  # 160 KB files
        # Apart in time: a file's mtime moves in clock ticks of up to 10 ms, and two
        # entries written within one tick are equally old (either may go first).
        time.sleep(0.03)
    pin(any_store, [KEYS[0]])
    usage.touch(any_store, KEYS[1])  # KEYS[1] was just used: the others go first
    inv = inventory.scan(any_store)
    assert len(inv.entries) == 5 and inv.entries[KEYS[0]].pinned
    one = inv.entries[KEYS[2]].size
    result = quota.enforce(any_store, max_size=3 * one + one // 2)
    left = set(inventory.scan(any_store).entries)
    assert left == {KEYS[0], KEYS[1], KEYS[4]}, left  # pinned, recently used, newest
    assert result.removed == 2 and not result.over
    # Pinned entries alone over the quota: they stay.
    pin(any_store, [KEYS[1], KEYS[4]])
    assert quota.enforce(any_store, max_size=1).removed == 0
    assert set(inventory.scan(any_store).entries) == left


def test_an_entry_is_removed_once_and_a_racing_reader_misses(any_store: ResultStore) -> None:
    manifest = _commit(any_store, KEYS[0], np.arange(50_000))
    entry = inventory.scan(any_store).entries[KEYS[0]]
    read_first = any_store.lookup(KEYS[0])
    assert read_first is not None
    freed = evict.remove_entry(any_store, KEYS[0], committed=entry.committed)
    assert freed >= manifest.size
    assert evict.remove_entry(any_store, KEYS[0], committed=entry.committed) == 0  # not twice
    assert any_store.lookup(KEYS[0]) is None
    with pytest.raises(PayloadCorruptError):  # the reader that had the manifest: a miss
        any_store.load(read_first)


def test_an_entry_committed_again_after_the_decision_is_kept(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "lc"))
    _commit(store, KEYS[0], np.arange(50_000))
    chosen = inventory.scan(store).entries[KEYS[0]]
    time.sleep(0.01)
    _commit(store, KEYS[0], np.arange(50_000) * 2)  # a new result since the decision
    assert evict.remove_entry(store, KEYS[0], committed=chosen.committed) == 0
    m = store.lookup(KEYS[0])
    assert m is not None and (store.load(m) == np.arange(50_000) * 2).all()


def _workers(cfgs: list[dict[str, Any]], barrier: Path) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "lifecycle_worker.py"), json.dumps(c)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for c in cfgs
    ]
    deadline = time.monotonic() + 300
    while len(list(barrier.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    (barrier / "go").touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_four_processes_under_a_quota(
    kind: str, tmp_path: Path, request: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "local":
        url, options = str(tmp_path / "shared"), {}
    else:
        url, options = unique_s3_url(), s3_options(request.getfixturevalue("s3_server"))
    max_size = 2_000_000  # about 6 results of 320 KB
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    cfgs = [
        {
            "store": url,
            "storage_options": options,
            "max_size": max_size,
            "seed": n,
            "calls": 25,
            "keys": list(range(12)),
            "pinned": [n % 2],
            "barrier": str(barrier),
        }  # fmt: skip
        for n in range(4)
    ]
    results = _workers(cfgs, barrier)
    for r in results:
        assert r.returncode == 0 and "TORN" not in r.stdout, r.stdout + r.stderr[-3000:]
        assert r.stdout.strip().splitlines()[-1].startswith("DONE 25"), r.stdout
    store = ResultStore(url, storage_options=options)
    inv = inventory.scan(store)
    # Young files of no entry (a racing writer's lost payload) are not counted yet...
    assert inv.total <= max_size, (inv.total, inv.in_flight, len(inv.entries))
    # ...and once old enough, the next pass removes them: every byte fits.
    monkeypatch.setattr(inventory, "GRACE", 0.0)
    quota.enforce(store, max_size)
    on_disk = sum(size for top in ("manifests", "results") for _, size, _ in
                  inventory.listing(store, top))  # fmt: skip
    assert on_disk <= max_size, on_disk
    inv = inventory.scan(store)
    tasks = {m.key: m.task for m in store.iter_manifests()}
    kept = [k for k, t in tasks.items() if t.endswith("lifecycle-keep")]
    assert len(kept) == 2 and set(kept) <= inv.pinned  # pinned entries survived
    # Passes take turns (flock locally, a lease object on S3): none removes what another
    # freed. When they overlapped on S3, each with its own view of recent use, together
    # they once removed every unpinned entry (1 of 20 rounds of a loop).
    assert sum(t.endswith("lifecycle-blob") for t in tasks.values()) >= 1
    for key in tasks:  # whatever is left loads, verified
        manifest = store.lookup(key)
        assert manifest is not None and store.load(manifest).shape == (40_000,)


VERSIONS = [
    "from notebook_flow import task\n@task(name='shift')\ndef shift(x):\n    return x + {n}\n",
]


def _run_version(tmp_path: Path, n: int, args: list[int], env: dict[str, str]) -> None:
    (tmp_path / "mod_shift.py").write_text(VERSIONS[0].format(n=n))
    code = f"import mod_shift; print([mod_shift.shift(a) for a in {args!r}])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([a + n for a in args])


def test_unreachable_prunes_two_old_code_versions(
    tmp_path: Path, python_env: dict[str, str], isolated_store: Path, capsys: Any
) -> None:
    env = {**python_env, "PYTHONPATH": os.pathsep.join([str(tmp_path), python_env["PYTHONPATH"]])}
    _run_version(tmp_path, 1, [1, 2], env)
    store = ResultStore(str(isolated_store))
    first = {m.key for m in store.iter_manifests()}
    pin(store, [sorted(first)[0]])  # a pinned result of old code stays
    time.sleep(0.02)
    _run_version(tmp_path, 2, [1, 2, 3], env)  # the code changes...
    second = {m.key for m in store.iter_manifests()} - first
    time.sleep(0.02)
    _run_version(tmp_path, 3, [1, 2], env)  # ...twice
    current = {m.key for m in store.iter_manifests()} - first - second
    assert (len(first), len(second), len(current)) == (2, 3, 2)
    assert cli.main(["gc", "--unreachable"]) == 0  # a dry run: a table, nothing removed
    out = capsys.readouterr().out
    assert "would remove 4 entries" in out and "unreachable: code changed" in out, out
    assert "__main__" not in out and "mod_shift:shift" in out
    assert len(list(store.iter_manifests())) == 7
    assert cli.main(["gc", "--unreachable", "--yes"]) == 0
    assert "removed 4 entries" in capsys.readouterr().out
    left = {m.key for m in store.iter_manifests()}
    assert left == current | {sorted(first)[0]}
    _run_version(tmp_path, 3, [1, 2], env)  # the current code still hits
    assert {m.key for m in store.iter_manifests()} == left


def test_age_size_and_task_rules_combine(tmp_path: Path, capsys: Any) -> None:
    store = ResultStore(str(tmp_path / "lc"))
    day = 86400.0
    now = time.time()
    for n, key in enumerate(KEYS[:6]):
        _commit(store, key, np.zeros(10_000), task="m:old" if n < 4 else "m:new")
        path = tmp_path / "lc" / "manifests" / key[:2] / f"{key}.json"
        os.utime(path, (now - (40 - n) * day, now - (40 - n) * day))  # committed 40..35 days ago
    usage.touch(store, KEYS[1])  # used now
    inv = inventory.scan(store).with_manifests(store)
    old_unused = rules.decide(inv, rules.Rules(older_than=30 * day, unused_for=14 * day))
    assert {d.key for d in old_unused} == set(KEYS[:6]) - {KEYS[1]}
    only_old = rules.decide(inv, rules.Rules(task="old", older_than=30 * day, unused_for=14 * day))
    assert {d.key for d in only_old} == {KEYS[0], KEYS[2], KEYS[3]}
    # Room for all but one byte of the two new entries: exactly the less recently used goes.
    # (Not "the size of one": entries differ by a few bytes of manifest, e.g. the digits of
    # a time, so the other entry may be the larger.)
    new_total = inv.entries[KEYS[4]].size + inv.entries[KEYS[5]].size
    size = rules.decide(inv, rules.Rules(task="m:new", max_size=new_total - 1))
    assert [d.key for d in size] == [KEYS[4]] and "least recently used" in size[0].why
    plan = gc.plan(store, rules.Rules(task="old", unused_for=14 * day))
    assert "m:old" in plan.table() and "unused for 14d" in plan.table()
    assert gc.sweep(store, plan.doomed)[0] == 3
    assert set(inventory.scan(store).entries) == {KEYS[1], KEYS[4], KEYS[5]}


def test_gc_refuses_bad_rules(capsys: Any) -> None:
    assert cli.main(["gc", "--older-than", "soon"]) == 2
    assert "--older-than" in capsys.readouterr().err
    assert cli.main(["gc", "--max-size", "0"]) == 2
    assert "--max-size" in capsys.readouterr().err


def test_pin_command_and_flow_gc(shell: Any, capsys: Any) -> None:
    shell.run_cell(
        "from notebook_flow import task\n"
        "@task(name='sq')\n"
        "def sq(x):\n"
        "    return x * x\n"
        "[sq(i) for i in range(3)]\n"
    )
    capsys.readouterr()
    assert cli.main(["pin", "sq"]) == 0
    assert "pinned 3 entries" in capsys.readouterr().out
    assert cli.main(["pin", "nosuchtask"]) == 1
    assert cli.main(["pin"]) == 0
    assert "3 pinned entries" in capsys.readouterr().out
    shell.run_cell("%flow gc --max-size 1 --task sq")
    assert "the rules choose nothing" in capsys.readouterr().out  # all pinned
    assert cli.main(["unpin", "sq"]) == 0
    shell.run_cell("%flow gc --max-size 1 --task sq")
    out = capsys.readouterr().out
    assert "would remove 3 entries" in out, out
    shell.run_cell("%flow gc --max-size 1 --task sq --yes")
    assert "removed 3 entries" in capsys.readouterr().out


def test_a_tasks_own_quota_evicts_only_its_results() -> None:
    from notebook_flow import config, task

    @task(name="big", max_size=700_000)
    def big(i: int) -> Any:
        return np.full(40_000, float(i))  # 320 KB

    @task(name="small")
    def small(i: int) -> Any:
        return np.full(40_000, float(-i))

    for i in range(3):
        small(i)
    for i in range(4):
        big(i)
        assert quota.wait_idle(120)
    store = config.get_store()
    tasks = [m.task.rsplit(":", 1)[-1] for m in store.iter_manifests()]
    assert tasks.count("small") == 3  # another task's results are not this quota's business
    assert tasks.count("big") == 2  # 2 x 320 KB fit in 700 KB
    assert big.cache_key(3) in {m.key for m in store.iter_manifests()}  # the newest stays


def test_passes_on_s3_take_turns_through_a_lease(
    request: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ResultStore(
        unique_s3_url(), storage_options=s3_options(request.getfixturevalue("s3_server"))
    )
    events: list[tuple[str, int]] = []

    def one_pass(n: int) -> None:
        with quota._one_pass_at_a_time(store) as lease:
            assert lease is not None  # S3 takes conditional writes: a lease, not an overlap
            events.append(("in", n))
            time.sleep(0.2)
            events.append(("out", n))

    threads = [threading.Thread(target=one_pass, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(events) == 8
    assert all(events[i][0] == "in" and events[i + 1] == ("out", events[i][1])
               for i in range(0, 8, 2)), events  # fmt: skip
    assert not store.fs.exists(store._path(quota.LEASE_NAME))  # released

    # A holder that died (it never renews) loses its lease once it expired; the one that
    # took over holds it, and the old holder, back from a long pause, stops removing.
    monkeypatch.setattr(quota, "LEASE_TTL", 1.0)
    monkeypatch.setattr(quota, "LEASE_SKEW", 0.2)
    stale = quota._Lease(store)
    assert stale.acquire()
    with quota._one_pass_at_a_time(store) as lease:
        assert lease is not None and lease.renew()
        assert not stale.renew()
        assert list(quota._renewing(iter([1, 2]), stale)) == []
        stale.release()  # not its lease any more: it stays
        assert lease.renew()
    assert not store.fs.exists(store._path(quota.LEASE_NAME))

    # At exit, a pass waits for a holder that renews its lease (its own pass comes after
    # that one: the store ends under quota whoever committed last)...
    for key in KEYS[:3]:
        _commit(store, key, np.zeros(1000))
    monkeypatch.setattr(quota, "LEASE_TTL", 3600.0)
    monkeypatch.setattr(quota, "_exiting", threading.Event())
    quota._exiting.set()
    holder = quota._Lease(store)
    assert holder.acquire()
    threading.Timer(1.0, holder.release).start()
    assert quota.enforce(store, max_size=1).removed == 3
    # ...but not out for one that stopped renewing half a lease ago (likely dead).
    for key in KEYS[:3]:
        _commit(store, key, np.zeros(1000))
    assert holder.acquire()
    stopped = {"owner": "gone", "expires": time.time() + quota.LEASE_TTL / 2 - 60}
    store.fs.pipe_file(store._path(quota.LEASE_NAME), json.dumps(stopped).encode())
    assert quota.enforce(store, max_size=1).removed == 0
    quota._exiting.clear()
    store.fs.rm_file(store._path(quota.LEASE_NAME))

    # A damaged lease object counts as expired, not as a crash of every pass.
    store.fs.pipe_file(store._path(quota.LEASE_NAME), b"[[[[")
    with quota._one_pass_at_a_time(store) as lease:
        assert lease is not None


def test_a_locked_entry_is_not_evicted(tmp_path: Path) -> None:
    from notebook_flow.locks import default_lock_manager_for

    store = ResultStore(str(tmp_path / "lc"))
    for key in KEYS[:3]:
        _commit(store, key, np.zeros(20_000))
    manager = default_lock_manager_for(store)
    assert manager.acquire(KEYS[0], "holder-1", timeout=1, lease=60)
    try:
        quota.enforce(store, max_size=1)  # everything would go...
        assert set(inventory.scan(store).entries) == {KEYS[0]}  # ...but the locked key
    finally:
        manager.release(KEYS[0], "holder-1")
    quota.enforce(store, max_size=1)
    assert inventory.scan(store).entries == {}


def test_task_cell_pin_option(shell: Any) -> None:
    from notebook_flow.config import get_store

    shell.run_cell("%%task --pin --name pinned_cell\nimport numpy as np\nbig = np.ones(300_000)\n")
    shell.run_cell("%%task --name plain_cell\nsmall = 3\n")
    store = get_store()
    tasks = {m.key: m.task for m in store.iter_manifests()}
    pinned = pinned_keys(store)
    assert any("pinned_cell" in tasks[k] for k in pinned)  # the cell...
    assert len(pinned) >= 2  # ...and its large value, stored on its own
    assert not any("plain_cell" in tasks[k] for k in pinned)
    quota.enforce(store, max_size=1)
    left = {m.task for m in store.iter_manifests()}
    assert any("pinned_cell" in t for t in left) and not any("plain_cell" in t for t in left)
