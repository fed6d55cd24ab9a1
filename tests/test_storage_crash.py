"""Crash safety of the commit protocol: SIGKILL a committing process at named points.

Each test commits an "old" result, lets a child process start committing a "new" one for
the same key, kills it with SIGKILL at one point of the protocol, and checks what a reader
sees afterwards: the old result or (only once the manifest landed) the new one, never a torn
value; leftovers are invisible to readers and ``remove_orphans`` cleans them up; the next
commit works.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from notebook_flow.storage import Manifest, ResultStore

REPO = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef0123456789abcdef"
BIG = 200 * 2**20  # bytes


@pytest.fixture(autouse=True)
def _payload_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """These crash points are about payload files: keep even small values out of the
    manifest (inline payloads commit in a single write and have no such window)."""
    from notebook_flow.storage import store

    monkeypatch.setattr(store, "INLINE_LIMIT", 0)  # read by ResultStore()


def commit(store: ResultStore, value: object) -> Manifest:
    return store.commit(
        KEY, value, task="crash", components={}, run_id="parent", duration=0.0, expires_at=None
    )


def child(root: Path, body: str) -> subprocess.Popen[str]:
    """Start a process that opens the store at ``root`` and runs ``body`` (which commits)."""
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        import numpy as np
        from notebook_flow.storage import ResultStore
        store = ResultStore({str(root)!r})
        def commit(value, **kw):
            store.commit({KEY!r}, value, task="crash", components={{}}, run_id="child",
                         duration=0.0, expires_at=None, **kw)
        """
    ) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )


def killed_child(root: Path, body: str) -> None:
    """Run ``body`` in a child (see ``child``) and check that it died of SIGKILL."""
    proc = child(root, body)
    assert proc.wait(timeout=120) == -signal.SIGKILL


def store_with_old(tmp_path: Path) -> tuple[Path, ResultStore, Manifest]:
    """A store in ``tmp_path`` whose result for ``KEY`` is the committed value "old"."""
    root = tmp_path / "store"
    store = ResultStore(str(root))
    return root, store, commit(store, "old")


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp"))


def payloads(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "results").rglob("*") if p.is_file())


def assert_nothing_torn(store: ResultStore) -> None:
    """Every committed manifest loads and passes its checksum."""
    for manifest in store.iter_manifests():
        store.load(manifest)


def assert_recovers(store: ResultStore, root: Path) -> None:
    """Orphans are removed, and a fresh commit works and loads."""
    store.remove_orphans(older_than=0)
    assert leftovers(root) == []
    current = store.lookup(KEY)
    assert current is not None and payloads(root) == [current.payload]
    fresh = commit(store, np.arange(1000.0))
    np.testing.assert_array_equal(store.load(fresh), np.arange(1000.0))
    assert payloads(root) == [fresh.payload]


@pytest.mark.slow
def test_sigkill_while_writing_a_200mb_payload(tmp_path: Path) -> None:
    root, store, old = store_with_old(tmp_path)
    proc = child(
        root,
        f"""
        arr = np.ones({BIG // 8})
        print("ready", flush=True)
        commit(arr)
        print("committed", flush=True)
        """,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    # Synchronize on the temp payload growing, then kill mid-write.
    shard = root / "results" / KEY[:2]
    sizes: list[int] = []
    deadline = time.monotonic() + 120  # a hang guard, not a timing assertion
    while time.monotonic() < deadline and proc.poll() is None:
        temps = list(shard.glob(f".{KEY}-*.npy.*.tmp")) if shard.exists() else []
        size = temps[0].stat().st_size if temps else 0
        if size and (not sizes or size > sizes[-1]):
            sizes.append(size)
        if len(sizes) >= 2:
            break
        time.sleep(0.0002)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the child ended before it was killed"
    assert len(sizes) >= 2 and sizes[-1] < BIG + 128, sizes
    assert "committed" not in out

    current = store.lookup(KEY)
    assert current == old  # the manifest comes last, so the kill left the old state
    assert store.load(current) == "old"
    assert_nothing_torn(store)
    assert leftovers(root), "expected the torn temp payload to be left behind"
    assert [m.key for m in store.iter_manifests()] == [KEY]  # readers ignore temp files
    assert_recovers(store, root)


def test_sigkill_before_manifest(tmp_path: Path) -> None:
    """Killed after the payload is durable, before the manifest: an orphan payload."""
    root, store, old = store_with_old(tmp_path)
    killed_child(root, "commit(np.arange(10), before_manifest=lambda: os.kill(os.getpid(), 9))")
    assert store.lookup(KEY) == old and store.load(old) == "old"
    assert len(payloads(root)) == 2  # old + orphan
    assert store.remove_orphans(older_than=3600) == []  # might be a commit in flight
    assert_recovers(store, root)


def test_sigkill_before_manifest_rename(tmp_path: Path) -> None:
    """Killed with the new manifest written to its temp file but not renamed into place."""
    root, store, old = store_with_old(tmp_path)
    killed_child(
        root,
        """
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith(".json"):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        os.replace = replace
        commit(np.arange(10))
        """,
    )
    assert any(p.startswith("manifests/") for p in leftovers(root))
    assert store.lookup(KEY) == old
    assert list(store.iter_manifests()) == [old]
    assert_nothing_torn(store)
    assert_recovers(store, root)


def test_sigkill_before_old_payload_removed(tmp_path: Path) -> None:
    """Killed after the new manifest landed, before the old payload was deleted."""
    root, store, old = store_with_old(tmp_path)
    killed_child(
        root,
        f"""
        real_unlink = os.unlink
        def unlink(path, *a, **kw):
            if str(path).endswith({old.payload.rsplit("/", 1)[1]!r}):
                os.kill(os.getpid(), signal.SIGKILL)
            real_unlink(path, *a, **kw)
        os.unlink = unlink
        commit(np.arange(10))
        """,
    )
    current = store.lookup(KEY)
    assert current is not None and current.run_id == "child"
    np.testing.assert_array_equal(store.load(current), np.arange(10))
    assert old.payload in payloads(root)  # now an orphan
    assert_recovers(store, root)
