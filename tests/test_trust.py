"""The store is untrusted input (issue 13): every entry is authenticated by default, only
regular files inside the store are opened or removed, and unsigned entries of older stores
are upgraded only where nobody else could have written them.

Each attack runs on a local folder others can write (a shared team folder) and on S3 (moto
server): the attacker can write any file of the store, but does not have the key.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401 (fixture)

import notebook_flow as nf
from notebook_flow import _localfs, cli, signing
from notebook_flow.cache_policies import INPUTS
from notebook_flow.errors import ConfigurationError, PayloadCorruptError, SignatureError
from notebook_flow.storage import ResultStore, StorageWarning

KEY = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
REPO = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def commit(store: ResultStore, key: str, value: object, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        task="mod:f", components={}, run_id="r1", duration=0.5, expires_at=None
    )
    args.update(kw)
    return store.commit(key, value, **args)


def rel(key: str) -> str:
    return f"manifests/{key[:2]}/{key}.json"


def read_raw(store: ResultStore, path: str) -> bytes:
    store.fs.invalidate_cache()
    return bytes(store.fs.cat_file(store._path(path)))


def write_raw(store: ResultStore, path: str, data: bytes) -> None:
    full = store._path(path)
    store.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(full, data)
    store.fs.invalidate_cache()


def forge(store: ResultStore, key: str, **changes: Any) -> None:
    """Rewrite a manifest as an attacker would: any field, without the key."""
    raw = json.loads(read_raw(store, rel(key)))
    raw.update(changes)
    write_raw(store, rel(key), json.dumps(raw).encode())


def inline_fields(data: bytes) -> dict[str, Any]:
    """size, checksum and inline bytes recomputed for ``data`` (xxh3 has no secret)."""
    return {
        "payload": "",
        "inline": base64.b64encode(data).decode(),
        "size": len(data),
        "checksum": xxhash.xxh3_128_hexdigest(data),
    }


@pytest.fixture(params=["shared-local", "s3"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., ResultStore]:
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_server")
        url = unique_s3_url()
        return lambda **kw: ResultStore(url, storage_options=s3_options(endpoint), **kw)
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)  # a team folder: others can write it

    def local(**kw: Any) -> ResultStore:
        return ResultStore(str(root), **kw)

    return local


def refused(store: ResultStore, key: str) -> None:
    """The entry is a miss, with the warning naming the fix, and nothing is loaded."""
    with pytest.warns(StorageWarning, match="notebook-flow key import"):
        assert store.lookup(key) is None


# -- forged, downgraded, replayed, revived --------------------------------------------------


def test_entries_are_signed_by_default(make_store: Callable[..., ResultStore]) -> None:
    store = make_store()
    m = commit(store, KEY, {"x": 1})
    assert m.mac is not None and m.signature is not None
    assert store.load(store.lookup(KEY)) == {"x": 1}
    key_path = Path(signing.key_file_path())
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600  # created outside the store
    assert key_path.read_text().strip().encode() not in b"".join(
        read_raw(store, p[len(store._root) + 1 :]) for p in store.fs.find(store._root)
    )


def test_forged_pickle_manifest_never_runs_code(
    make_store: Callable[..., ResultStore], tmp_path: Path
) -> None:
    store = make_store()
    commit(store, KEY, {"x": 1})
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(str(marker)))
    forge(store, KEY, serializer="pickle", signature=None, **inline_fields(evil))
    refused(store, KEY)
    forge(store, KEY, mac="0" * 64)  # a made-up mac does not help
    with pytest.raises(SignatureError):
        store.load(_parse(store))
    assert not marker.exists()


def _parse(store: ResultStore) -> Any:
    from notebook_flow.storage import Manifest

    return Manifest.from_json(read_raw(store, rel(KEY)))


def test_forged_json_downgrade_is_refused(make_store: Callable[..., ResultStore]) -> None:
    store = make_store()
    commit(store, KEY, (1, 2))  # a pickled, signed entry
    data = json.dumps({"x": 999}).encode()
    forge(store, KEY, serializer="json", signature=None, mac=None, **inline_fields(data))
    refused(store, KEY)
    with pytest.raises(SignatureError):
        store.load(_parse(store))


def test_replayed_entry_under_another_key_or_task_is_refused(
    make_store: Callable[..., ResultStore],
) -> None:
    store = make_store()
    commit(store, KEY, {"value": "of KEY"})
    commit(store, OTHER, {"value": "of OTHER"})
    valid = json.loads(read_raw(store, rel(KEY)))
    write_raw(store, rel(OTHER), json.dumps({**valid, "key": OTHER}).encode())
    refused(store, OTHER)
    write_raw(store, rel(OTHER), json.dumps(valid).encode())  # as is: names another key
    with pytest.warns(StorageWarning, match="names another key"):
        assert store.lookup(OTHER) is None
    forge(store, KEY, task="mod:other_task")  # the same entry claimed by another task
    assert store.lookup(KEY) is None  # (warned once per store; later refusals are logged)


def test_revived_expired_entry_stays_expired(make_store: Callable[..., ResultStore]) -> None:
    store = make_store()
    commit(store, KEY, {"x": 1}, expires_at=time.time() - 10)
    m = store.lookup(KEY)
    assert m is not None and m.expired()
    forge(store, KEY, expires_at=None)
    refused(store, KEY)


def test_another_key_sees_misses_and_a_shared_key_hits(
    make_store: Callable[..., ResultStore],
) -> None:
    writer = make_store(signing_key=b"team-key-0123456789")
    commit(writer, KEY, [1, 2, 3])
    refused(make_store(signing_key=b"someone-else-0123456789"), KEY)
    teammate = make_store(signing_key="team-key-0123456789")
    assert teammate.load(teammate.lookup(KEY)) == [1, 2, 3]


def test_a_task_recomputes_instead_of_serving_a_forged_result(tmp_path: Path) -> None:
    root = tmp_path / "team"
    root.mkdir()
    root.chmod(0o777)
    nf.configure(store=str(root))
    calls: list[int] = []

    @nf.task(name="double", cache_policy=INPUTS)  # (TASK_SOURCE would hash `calls`)
    def double(x: int) -> dict[str, int]:
        calls.append(x)
        return {"x": 2 * x}

    assert double(4) == {"x": 8}
    nf.wait_for_commits()
    store = nf.config.get_store()
    key = double.cache_key(4)
    assert key is not None
    forge(store, key, signature=None, mac=None, **inline_fields(b'{"x": 999}'))
    from notebook_flow.tasks.hot import _hot

    _hot.clear()
    with pytest.warns(StorageWarning):
        assert double(4) == {"x": 8}
    assert calls == [4, 4]


def test_json_nested_past_the_recursion_limit_is_a_bad_entry_not_a_crash(
    tmp_path: Path,
) -> None:
    """`json.loads` raises RecursionError, not ValueError, on `[[[[…` (100 kB): a manifest,
    touch file or lock record forged that way crashed the reader (a task call raised
    RecursionError). Each is now refused like any other malformed file."""
    from notebook_flow.lifecycle import check, usage
    from notebook_flow.locks import FileLockManager

    nested = b"[" * 100_000
    nf.configure(store=str(tmp_path / "store"))
    calls: list[int] = []

    @nf.task(name="triple", cache_policy=INPUTS)
    def triple(x: int) -> int:
        calls.append(x)
        return 3 * x

    assert triple(2) == 6
    nf.wait_for_commits()
    store = nf.config.get_store()
    key = triple.cache_key(2)
    assert key is not None
    write_raw(store, rel(key), nested)
    from notebook_flow.tasks.hot import _hot

    _hot.clear()
    with pytest.warns(StorageWarning, match="nested deeper"):
        assert triple(2) == 6  # a miss, recomputed
    assert calls == [2, 2]
    write_raw(store, rel(key), nested)
    report = check.check_store(store)
    assert not report.ok and [p.kind for p in report.problems] == ["invalid"]
    # A touch file and a lock record of the same kind are skipped.
    (tmp_path / "store" / "usage").mkdir(exist_ok=True)
    (tmp_path / "store" / "usage" / "forged.json").write_bytes(nested)
    assert usage.last_used(store) == {}
    locks = FileLockManager(str(tmp_path / "locks"))
    (tmp_path / "locks").mkdir(exist_ok=True)
    (tmp_path / "locks" / "forged.lock").write_bytes(nested)
    assert locks.list_locks() == []


# -- upgrade of entries written before every entry was signed ---------------------------------


def _strip_signatures(store: ResultStore, key: str) -> None:
    raw = json.loads(read_raw(store, rel(key)))
    raw.pop("mac", None)
    raw["signature"] = None
    write_raw(store, rel(key), json.dumps(raw).encode())


def test_legacy_entry_in_a_private_store_is_resigned_once(tmp_path: Path) -> None:
    root = tmp_path / "private"
    store = ResultStore(str(root))
    commit(store, KEY, np.arange(10))  # a payload file
    commit(store, OTHER, (1, 2))  # an inline pickle
    for key in (KEY, OTHER):
        _strip_signatures(store, key)
        Path(store._path(rel(key))).chmod(0o644)
    _localfs.forget_verified()
    m = store.lookup(KEY)
    assert m is not None and m.mac is not None and m.signature is not None
    assert json.loads(read_raw(store, rel(KEY)))["mac"] == m.mac  # rewritten, signed
    assert list(store.load(m)) == list(range(10))
    assert store.load(store.lookup(OTHER)) == (1, 2)


def test_legacy_entry_in_a_shared_store_is_a_miss(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    store = ResultStore(str(root))
    commit(store, KEY, {"x": 1})
    _strip_signatures(store, KEY)
    root.chmod(0o775)  # group-writable: someone else could have written it
    refused(store, KEY)
    assert "mac" not in json.loads(read_raw(store, rel(KEY)))  # left as it was


def test_legacy_entry_with_a_wrong_checksum_is_not_resigned(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "private"))
    commit(store, KEY, {"x": 1})
    _strip_signatures(store, KEY)
    forge(store, KEY, inline=base64.b64encode(b'{"x":2}').decode())
    refused(store, KEY)


# -- only regular files inside the store ----------------------------------------------------


def _in_thread(fn: Callable[[], object], timeout: float = 30.0) -> object:
    """Run ``fn``; fail (instead of hanging the suite) if it blocks."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(_catch(fn)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked on a FIFO"
    return out[0]


def _catch(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as exc:
        return exc


def test_fifo_payload_or_manifest_never_blocks(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "s"))
    store.inline_limit = 0
    m = commit(store, KEY, np.arange(5))
    payload = Path(store._path(m.payload))
    payload.unlink()
    os.mkfifo(payload)
    _localfs.forget_verified()
    got = _in_thread(lambda: store.load(store.lookup(KEY)))
    assert isinstance(got, PayloadCorruptError)
    commit(store, OTHER, {"x": 1})
    manifest = Path(store._path(rel(OTHER)))
    manifest.unlink()
    os.mkfifo(manifest)
    with pytest.warns(StorageWarning, match="not a regular file"):
        assert _in_thread(lambda: store.lookup(OTHER)) is None
    assert _in_thread(lambda: store.clear()) == 1  # the FIFO manifest is left, not read
    assert stat.S_ISFIFO(os.lstat(manifest).st_mode)


def test_symlinked_shard_folder_is_never_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    store = ResultStore(str(root))
    outside = tmp_path / "outside"
    outside.mkdir()
    victim_manifest = outside / f"{KEY}.json"
    victim_payload = outside / f"{KEY}-0011223344556677.npy"
    victim_manifest.write_text("{}")
    victim_payload.write_bytes(b"precious")
    commit(store, OTHER, {"x": 1})
    for top in ("manifests", "results"):
        (root / top).mkdir(exist_ok=True)
        (root / top / KEY[:2]).symlink_to(outside, target_is_directory=True)
    # A valid signed manifest placed outside, reached through the link: still not read.
    elsewhere = ResultStore(str(tmp_path / "elsewhere"))
    commit(elsewhere, KEY, {"x": 2})
    victim_manifest.write_bytes(Path(elsewhere._path(rel(KEY))).read_bytes())
    with pytest.warns(StorageWarning, match="symlink"):
        assert store.lookup(KEY) is None
    monkeypatch.setenv("NOTEBOOK_FLOW_STORE", str(root))
    assert cli.main(["clear", "--all", "-y", "--store", str(root)]) == 0
    assert store.lookup(OTHER) is None  # the real entry was cleared
    store.remove_orphans(older_than=0)
    assert nf.rebuild_index(store=store) == 0
    assert victim_manifest.exists() and victim_payload.read_bytes() == b"precious"
    with pytest.raises(Exception, match="symlink"):
        commit(store, KEY, {"x": 3})  # never writes through the link either
    assert sorted(p.name for p in outside.iterdir()) == sorted(
        [victim_manifest.name, victim_payload.name]
    )


def test_symlinked_payload_file_is_not_followed(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "s"))
    store.inline_limit = 0
    m = commit(store, KEY, np.arange(5))
    secret = tmp_path / "secret.npy"
    payload = Path(store._path(m.payload))
    secret.write_bytes(payload.read_bytes())
    payload.unlink()
    payload.symlink_to(secret)
    _localfs.forget_verified()
    with pytest.raises(PayloadCorruptError):
        store.load(store.lookup(KEY))
    store.delete(KEY)
    assert secret.exists()


# -- the key ------------------------------------------------------------------------------


def test_key_file_must_be_private_and_strong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(signing.CONFIG_DIR_ENV, str(tmp_path / "cfg"))
    key = signing.default_signing_key()
    path = Path(signing.key_file_path())
    assert len(key) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing.default_signing_key() == key  # created once
    path.chmod(0o644)
    signing._cached = None
    with pytest.raises(ConfigurationError, match="chmod 600"):
        signing.default_signing_key()
    path.chmod(0o600)
    path.write_text("short\n")
    signing._cached = None
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        signing.default_signing_key()
    signing._cached = None


def test_key_show_and_import_share_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store_dir = tmp_path / "team"
    store_dir.mkdir()
    store_dir.chmod(0o777)
    monkeypatch.setenv(signing.CONFIG_DIR_ENV, str(tmp_path / "alice"))
    assert cli.main(["key", "show"]) == 0
    alice_key = capsys.readouterr().out.strip()
    commit(ResultStore(str(store_dir)), KEY, {"from": "alice"})
    # Bob, in another process with his own key file, imports Alice's key.
    bob = {**os.environ, signing.CONFIG_DIR_ENV: str(tmp_path / "bob"), "PYTHONPATH": str(REPO)}
    probe = (
        "import warnings; warnings.simplefilter('ignore');"
        "from notebook_flow.storage import ResultStore;"
        f"s = ResultStore({str(store_dir)!r}); m = s.lookup({KEY!r});"
        "print(None if m is None else s.load(m))"
    )
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, *a], env=bob, capture_output=True, text=True, timeout=120
    )
    assert run("-c", probe).stdout.strip() == "None"  # his own key: a miss
    out = run("-m", "notebook_flow.cli", "key", "import", alice_key, "--yes")
    assert out.returncode == 0, out.stderr
    assert run("-c", probe).stdout.strip() == "{'from': 'alice'}"
    bad = run("-m", "notebook_flow.cli", "key", "import", "short", "--yes")
    assert bad.returncode == 2 and "at least 16 bytes" in bad.stderr


def test_signing_key_env_shares_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, "shared-team-key-" + uuid.uuid4().hex)
    store = ResultStore(str(tmp_path / "s"))
    commit(store, KEY, {"x": 1})
    monkeypatch.setenv(signing.CONFIG_DIR_ENV, str(tmp_path / "other-user"))
    assert ResultStore(str(tmp_path / "s")).lookup(KEY) is not None  # the variable wins


def test_symlinked_metadata_file_is_not_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    root.mkdir()
    victim = tmp_path / "victim.db"
    victim.write_bytes(b"precious")
    (root / "metadata.duckdb").symlink_to(victim)
    monkeypatch.setenv("NOTEBOOK_FLOW_CACHE_DIR", str(tmp_path / "cache"))
    store = ResultStore(str(root))
    path = store.metadata_path()
    assert path.startswith(str(tmp_path / "cache"))
    (root / "locks").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(OSError, match="symlink"):
        store.local_dir("locks")
    assert victim.read_bytes() == b"precious"


def test_a_loaded_memmap_names_the_store_file_not_a_descriptor(tmp_path: Path) -> None:
    """The payload is mapped through the descriptor just verified; the array still names
    the store's file (a descriptor path would die, and its number be reused)."""
    store = ResultStore(str(tmp_path / "s"))
    m = commit(store, KEY, np.arange(100_000, dtype=float))
    _localfs.forget_verified()
    loaded = store.load(store.lookup(KEY))
    assert isinstance(loaded, np.memmap)
    assert loaded.filename == store._path(m.payload)
