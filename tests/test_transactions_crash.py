"""A SIGKILL at every point of a transaction's commit leaves none of its entries visible, or
all of them (after the commit record): on a local folder and on S3 (moto's server).

The child process (``_CHILD``) runs three tasks in one transaction; the environment's
``NOTEBOOK_FLOW_CRASH_AT`` kills it at one named point (``notebook_flow/_crash.py``). This
process then reads the store as any other process would, recovers it
(``remove_orphans``), and reruns the child unkilled: the bodies run again exactly when
the transaction had not committed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401 (fixture)

from notebook_flow.storage import ResultStore

_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import notebook_flow as nf
    from notebook_flow import task
    from notebook_flow.transactions import transaction

    nf.configure(store=os.environ["TXN_STORE"],
                 storage_options=json.loads(os.environ["TXN_OPTIONS"]))

    @task(name="crash_small")
    def small(x):
        print("ran small", x, flush=True)
        return [x, x]

    @task(name="crash_big")
    def big(n):
        print("ran big", n, flush=True)
        return bytes(range(256)) * n   # a payload file of its own

    with transaction():
        small(1)
        big(200)
        small(2)
    print("committed", flush=True)
    """
)

EXPECTED = [[1, 1], bytes(range(256)) * 200, [2, 2]]
BEFORE_RECORD = [
    "after_stage",
    "transaction_commit",
    "group_manifest_1",
    "group_manifest_2",
    "group_manifest_3",
    "group_before_record",
]
AFTER_RECORD = [
    "group_after_record",
    "group_final_1",
    "group_final_2",
    "group_final_3",
    "group_before_forget",
]


def _run(env: dict[str, str], crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in env.items() if k != "NOTEBOOK_FLOW_CRASH_AT"}
    if crash_at is not None:
        env["NOTEBOOK_FLOW_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=180
    )


def _killed_at(env: dict[str, str], point: str) -> None:
    done = _run(env, point)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "committed" not in done.stdout


def _values(store: ResultStore) -> list[Any]:
    """What a reader sees: every visible entry's value, looked up by its key."""
    out = []
    for manifest in store.iter_manifests():
        found = store.lookup(manifest.key)
        assert found is not None
        out.append(store.load(found))
    return sorted(out, key=repr)


def _files(store: ResultStore, top: str) -> list[str]:
    from notebook_flow.storage import files

    return [rel for rel, _ in files.list_files(store, top) if not rel.endswith("GENERATION")]


@pytest.fixture(params=["local", "s3"])
def target(
    request: pytest.FixtureRequest, python_env: dict[str, str], isolated_store: Path, tmp_path: Path
) -> tuple[ResultStore, dict[str, str]]:
    """(a reader's store, the child's environment) for a local folder or an S3 prefix."""
    env = dict(python_env)
    if request.param == "local":
        url, options = str(isolated_store), {}
    else:
        endpoint = request.getfixturevalue("s3_server")
        url, options = unique_s3_url(), s3_options(endpoint)
        env["NOTEBOOK_FLOW_CACHE_DIR"] = str(tmp_path / "cache")
    env["TXN_STORE"] = url
    env["TXN_OPTIONS"] = json.dumps(options)
    return ResultStore(url, storage_options=options), env


@pytest.mark.parametrize("point", BEFORE_RECORD)
def test_killed_before_the_commit_record_none_is_visible(
    target: tuple[ResultStore, dict[str, str]], point: str
) -> None:
    store, env = target
    _killed_at(env, point)
    assert _values(store) == []
    # No manifest the child wrote is believed, not even by a direct lookup.
    for rel in _files(store, "manifests"):
        key = rel.rsplit("/", 1)[-1][:-5]
        assert store.lookup(key) is None

    # Recovery takes back what the dead committer wrote: no manifest, no payload is left.
    store.remove_orphans(older_than=0)
    assert _files(store, "manifests") == []
    assert _files(store, "results") == []
    assert _files(store, "transactions") == []

    # Rerun: every body runs again (nothing was served), and all three commit.
    rerun = _run(env, None)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.count("ran ") == 3
    assert _values(store) == sorted(EXPECTED, key=repr)


@pytest.mark.parametrize("point", AFTER_RECORD)
def test_killed_after_the_commit_record_all_are_visible(
    target: tuple[ResultStore, dict[str, str]], point: str
) -> None:
    store, env = target
    _killed_at(env, point)
    assert _values(store) == sorted(EXPECTED, key=repr)

    # Recovery rolls the transaction forward: plain manifests, no record left.
    store.remove_orphans(older_than=0)
    assert _files(store, "transactions") == []
    manifests = list(store.iter_manifests(verified=False))
    assert len(manifests) == 3
    assert all(m.txn is None for m in manifests)
    assert _values(store) == sorted(EXPECTED, key=repr)

    # Rerun: all three are hits (no body runs).
    rerun = _run(env, None)
    assert rerun.returncode == 0, rerun.stderr
    assert "ran " not in rerun.stdout


def test_a_committed_transaction_leaves_plain_manifests_and_no_record(
    target: tuple[ResultStore, dict[str, str]],
) -> None:
    store, env = target
    done = _run(env, None)
    assert done.returncode == 0, done.stderr
    assert _files(store, "transactions") == []
    assert all(m.txn is None for m in store.iter_manifests(verified=False))
    assert _values(store) == sorted(EXPECTED, key=repr)


def test_a_forged_commit_record_does_not_make_entries_visible(
    target: tuple[ResultStore, dict[str, str]],
) -> None:
    """A record written without the signing key (or changed) is not believed."""
    from notebook_flow.storage import files, group

    store, env = target
    _killed_at(env, "group_before_record")
    pending = list(store.iter_manifests(verified=False))
    assert pending and all(m.txn is not None for m in pending)
    txn = pending[0].txn
    assert txn is not None
    body = json.dumps(
        {
            "format_version": 1,
            "txn": txn,
            "keys": sorted(m.key for m in pending),
            "created_at": 0.0,
            "mac": "0" * 64,
        }
    ).encode()
    with pytest.warns(Warning, match="not signed"):
        files.write_atomic(store, group.record_rel(txn), lambda write: write(memoryview(body)))
        assert _values(store) == []
    # Recovery leaves a record it cannot verify alone (another key's?), and so its entries.
    store.remove_orphans(older_than=0)
    assert _values(store) == []


# -- a failed group commit takes back what it wrote ------------------------------------------

_OPTS: dict[str, Any] = {
    "task": "mod.f",
    "components": {},
    "run_id": "r",
    "duration": 0.1,
    "expires_at": None,
}
K1, K2 = "1" * 32, "2" * 32


class LeaseLost(Exception):
    pass


def test_a_lost_lease_before_the_record_restores_the_previous_entries(
    isolated_store: Path,
) -> None:
    from notebook_flow.storage import group

    store = ResultStore(str(isolated_store))
    store.commit(K1, "old", **_OPTS)
    staged = [store.stage(K1, "new" * 10_000, **_OPTS), store.stage(K2, [2], **_OPTS)]
    calls = []

    def check() -> None:  # the fencing check: the lease is lost by the second time
        calls.append(1)
        if len(calls) == 2:
            raise LeaseLost

    with pytest.raises(LeaseLost):
        group.publish_group(store, staged, check=check)
    found = store.lookup(K1)
    assert found is not None and store.load(found) == "old"
    assert store.lookup(K2) is None
    assert _files(store, "transactions") == []


def test_an_unwritable_record_is_a_commit_error_and_nothing_changes(
    isolated_store: Path,
) -> None:
    from notebook_flow.errors import CommitError
    from notebook_flow.storage import group

    store = ResultStore(str(isolated_store))
    store.commit(K1, "old", **_OPTS)
    (isolated_store / "transactions").write_text("a file where the folder goes")
    staged = [store.stage(K1, "new", **_OPTS), store.stage(K2, [2], **_OPTS)]
    with pytest.raises(CommitError, match="nothing was committed"):
        group.publish_group(store, staged)
    found = store.lookup(K1)
    assert found is not None and store.load(found) == "old"
    assert store.lookup(K2) is None


def test_a_group_commit_replaces_previous_entries_and_removes_their_payloads(
    isolated_store: Path,
) -> None:
    from notebook_flow.storage import group

    store = ResultStore(str(isolated_store))
    old = store.commit(K1, "old" * 10_000, **_OPTS)  # a payload file of its own
    staged = [store.stage(K1, "new" * 10_000, **_OPTS), store.stage(K2, [2], **_OPTS)]
    final = group.publish_group(store, staged)
    assert [m.txn for m in final] == [None, None]
    assert [store.lookup(k) for k in (K1, K2)] == final
    assert store.load(final[0]) == "new" * 10_000
    assert not (isolated_store / old.payload).exists()


def test_a_reader_racing_the_roll_forward_gets_the_plain_manifest(isolated_store: Path) -> None:
    """The reader read a manifest naming the transaction; the committer then rewrote it and
    removed the record: the reader finds the record gone, and reads the key again."""
    import dataclasses

    from notebook_flow.storage import group, trust

    store = ResultStore(str(isolated_store))
    plain = store.commit(K1, [1], **_OPTS)
    seen = trust.sign(store, dataclasses.replace(plain, txn="a" * 32, mac=None))
    assert group.believe(store, seen) == plain
    store.delete(K1)
    assert group.believe(store, seen) is None


def test_stripping_the_transaction_from_a_manifest_does_not_make_it_visible(
    isolated_store: Path,
) -> None:
    """``txn`` is covered by the manifest's mac: a writer without the key cannot turn an
    uncommitted entry into a plain one."""
    import dataclasses

    from notebook_flow.storage import files, trust

    store = ResultStore(str(isolated_store))
    staged = store.stage(K1, [1], **_OPTS)
    pending = trust.sign(store, dataclasses.replace(staged, txn="b" * 32, mac=None))
    raw = json.loads(pending.to_json())
    assert raw["txn"] == "b" * 32
    del raw["txn"]
    body = json.dumps(raw).encode()
    files.write_atomic(store, store._manifest_rel(K1), lambda write: write(memoryview(body)))
    with pytest.warns(Warning, match="signature does not match"):
        assert store.lookup(K1) is None


def test_a_failed_rewrite_after_the_record_keeps_the_group_committed(
    isolated_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the record the group is committed: a rewrite that fails (a full disk) leaves
    the record in place, both entries visible, and ``remove_orphans`` finishes it."""
    from notebook_flow.storage import group

    store = ResultStore(str(isolated_store))
    staged = [store.stage(K1, [1], **_OPTS), store.stage(K2, [2], **_OPTS)]
    real = group._put

    def full_disk(store: ResultStore, manifest: Any) -> None:
        if manifest.txn is None and manifest.key == K2:
            raise OSError("No space left on device")
        real(store, manifest)

    monkeypatch.setattr(group, "_put", full_disk)
    group.publish_group(store, staged)
    assert [store.load(store.lookup(k)) for k in (K1, K2)] == [[1], [2]]  # type: ignore[arg-type]
    assert len(_files(store, "transactions")) == 1
    monkeypatch.undo()
    store.remove_orphans(older_than=0)
    assert _files(store, "transactions") == []
    assert all(m.txn is None for m in store.iter_manifests(verified=False))
    assert [store.load(store.lookup(k)) for k in (K1, K2)] == [[1], [2]]  # type: ignore[arg-type]


def test_a_key_staged_twice_in_a_transaction_publishes_the_later_result(
    isolated_store: Path,
) -> None:
    from notebook_flow import task
    from notebook_flow.transactions import transaction

    class Runs(list):  # opts out of the key
        def __notebook_flow_fingerprint__(self) -> str:
            return "runs"

    runs = Runs()

    @task(refresh_cache=True)
    def count(x: int) -> int:
        runs.append(x)
        return len(runs)

    @task
    def other(x: int) -> int:
        return -x

    with transaction():
        assert count(1) == 1
        assert count(1) == 2  # refresh: staged again under the same key
        other(1)
    store = ResultStore(str(isolated_store))
    assert sorted(_values(store)) == [-1, 2]
    assert len(_files(store, "results")) == 0  # small results: inline; nothing left over
