"""``notebook-flow check [--fix]`` on a local store and on S3 (moto's server): corrupted,
truncated, forged and orphaned entries are found, quarantined with a reason, orphans
removed, the index rebuilt; good entries are untouched and still hit."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401  (fixture)

import notebook_flow as nf
from notebook_flow import cli
from notebook_flow.config import get_metadata, get_store
from notebook_flow.lifecycle import check as check_mod
from notebook_flow.lifecycle.progress import Progress
from notebook_flow.storage import Manifest, ResultStore, StorageWarning, files


def key(i: int) -> str:
    return f"{i:032x}"


def commit(store: ResultStore, i: int, value: object, task: str = "mod:f") -> Manifest:
    return store.commit(
        key(i), value, task=task, components={}, run_id=f"r{i}", duration=0.1, expires_at=None
    )


def manifest_rel(k: str) -> str:
    return f"manifests/{k[:2]}/{k}.json"


def write_raw(store: ResultStore, rel: str, data: bytes) -> None:
    if store.is_local:
        path = Path(store._path(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        store.fs.pipe_file(store._path(rel), data)


def exists(store: ResultStore, rel: str) -> bool:
    if store.is_local:
        return os.path.exists(store._path(rel))
    store.fs.invalidate_cache()
    return bool(store.fs.exists(store._path(rel)))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultStore]:
    if request.param == "local":
        nf.configure(store=str(tmp_path / "checked"))
    else:
        endpoint = request.getfixturevalue("s3_server")
        nf.configure(store=unique_s3_url(), storage_options=s3_options(endpoint))
    yield get_store()


def damaged_store(store: ResultStore) -> dict[str, Any]:
    """Two good entries, one corrupted, one truncated, one forged, one orphan payload."""
    good_file = commit(store, 1, np.arange(50_000))
    good_inline = commit(store, 2, {"small": 1})
    corrupt = commit(store, 3, np.arange(50_000) * 3)
    truncated = commit(store, 4, np.arange(50_000) * 4)
    forged = commit(store, 5, {"answer": 42})
    raw = bytearray(files.read_bytes(store, corrupt.payload))
    raw[-1] ^= 0xFF  # same size, one bit flipped
    write_raw(store, corrupt.payload, bytes(raw))
    write_raw(store, truncated.payload, files.read_bytes(store, truncated.payload)[:1000])
    # Valid JSON, valid fields, a well-formed mac that is not this key's: a forgery
    # (here, a revived entry whose expiry was pushed out).
    body = json.loads(forged.to_json())
    body["expires_at"] = time.time() + 10**6
    write_raw(store, manifest_rel(key(5)), json.dumps(body).encode())
    orphan = f"results/{key(6)[:2]}/{key(6)}-{'0' * 16}.npy"
    write_raw(store, orphan, b"left by a crash before its manifest")
    return {
        "good": [good_file, good_inline],
        "bad": {key(3): "corrupt", key(4): "truncated", key(5): "forged"},
        "payloads": {key(3): corrupt.payload, key(4): truncated.payload},
        "orphan": orphan,
    }


def test_check_reports_then_fix_quarantines(
    store: ResultStore, capsys: pytest.CaptureFixture[str]
) -> None:
    made = damaged_store(store)
    report = check_mod.check_store(store, older_than=0)
    assert not report.ok and report.entries == 5 and report.good == 2
    kinds = {p.key: p.kind for p in report.problems if p.kind != "orphan"}
    assert kinds == made["bad"]
    assert [p.rel for p in report.problems if p.kind == "orphan"] == [made["orphan"]]
    # Without --fix nothing changed.
    assert all(exists(store, manifest_rel(k)) for k in made["bad"])
    assert exists(store, made["orphan"])

    assert cli.main(["check", "--older-than", "0"]) == 1  # report only, through the CLI
    out = capsys.readouterr().out
    assert "3 bad, 1 orphan" in out and "forged" in out and "truncated" in out
    assert "--fix" in out

    assert cli.main(["check", "--fix", "--older-than", "0"]) == 1  # was wrong, now fixed
    out = capsys.readouterr().out
    assert "quarantined 3 entries" in out and "removed 1 orphans" in out
    assert "index rebuilt: 2 entries" in out
    for k, kind in made["bad"].items():
        assert not exists(store, manifest_rel(k))
    assert not exists(store, made["orphan"])
    # Each quarantined entry has its manifest, its payload file and the reason.
    folders = sorted({rel.split("/")[1] for rel, _ in files.list_files(store, "quarantine")})
    assert len(folders) == 3
    for folder in folders:
        k = folder.split("-")[1]
        reason = files.read_bytes(store, f"quarantine/{folder}/reason.txt").decode()
        assert reason.startswith(made["bad"][k] + ":")
        assert json.loads(files.read_bytes(store, f"quarantine/{folder}/manifest.json"))["key"] == k
        if k in made["payloads"]:
            name = made["payloads"][k].rsplit("/", 1)[-1]
            assert exists(store, f"quarantine/{folder}/{name}")
            assert not exists(store, made["payloads"][k])
    # The good entries still hit, and the index holds exactly them.
    for m in made["good"]:
        found = store.lookup(m.key)
        assert found is not None and found.checksum == m.checksum
        store.load(found)
    indexed = get_metadata(store).cache_entries()
    assert sorted(indexed["key"]) == [key(1), key(2)]
    # A second check finds nothing wrong.
    assert cli.main(["check", "--older-than", "0"]) == 0
    assert "all good" in capsys.readouterr().out


def test_recent_leftovers_are_not_orphans_yet(store: ResultStore) -> None:
    """A payload written a moment ago may be a commit in flight: not an orphan."""
    commit(store, 1, np.arange(10_000))
    write_raw(store, f"results/{key(7)[:2]}/{key(7)}-{'1' * 16}.npy", b"in flight")
    report = check_mod.check_store(store, fix=True)  # default: older than an hour
    assert report.ok and report.removed_orphans == []


def test_invalid_manifest_and_other_key(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "s"), signing_key=b"a" * 32)
    commit(store, 1, {"x": 1})
    write_raw(store, manifest_rel(key(2)), b"{not json")
    teammate = ResultStore(str(tmp_path / "s"), signing_key=b"b" * 32)
    commit(teammate, 3, {"y": 2})
    newer = json.loads(commit(store, 4, {"z": 3}).to_json())
    newer["format_version"] = 99  # a newer notebook_flow's entry: not ours to judge
    write_raw(store, manifest_rel(key(4)), json.dumps(newer).encode())
    report = check_mod.check_store(store)
    assert {p.key: p.kind for p in report.problems} == {key(2): "invalid", key(3): "forged"}
    assert "another key" in next(p.reason for p in report.problems if p.key == key(3))
    assert report.skipped == [manifest_rel(key(4))]
    with pytest.warns(StorageWarning, match="format_version 99"):  # the index skips it
        fixed = check_mod.check_store(store, fix=True)
    assert len(fixed.quarantined) == 2 and os.path.exists(store._path(manifest_rel(key(4))))


def test_manifest_changed_meanwhile_is_not_quarantined(tmp_path: Path) -> None:
    """An entry recommitted after it was checked is left alone (never a good one lost)."""
    store = ResultStore(str(tmp_path / "s"), signing_key=b"a" * 32)
    m = commit(store, 1, np.arange(10_000))
    write_raw(store, m.payload, b"garbage")
    verdict = check_mod._check_one(store, manifest_rel(key(1)), fix=True)
    assert verdict.problem is not None and verdict.problem.kind == "truncated"
    fresh = commit(store, 1, np.arange(10_000))  # recommitted
    assert check_mod._quarantine(store, verdict.problem, verdict.data) is None
    found = store.lookup(key(1))
    assert found is not None and found.checksum == fresh.checksum


def test_legacy_unsigned_entry_is_reported_then_resigned(tmp_path: Path) -> None:
    """An entry from before signing, in a private local store: reported, re-signed by
    --fix (as a lookup would), then a hit."""
    import dataclasses

    root = tmp_path / "private"
    store = ResultStore(str(root), signing_key=b"a" * 32)
    m = commit(store, 1, np.arange(10_000))
    legacy = dataclasses.replace(m, format_version=1, provenance=None, mac=None, signature=None)
    write_raw(store, manifest_rel(key(1)), legacy.to_json())
    for path in [root, *root.rglob("*")]:  # private: writable by nobody else
        path.chmod(0o700 if path.is_dir() else 0o600)
    report = check_mod.check_store(store)
    assert [(p.key, p.kind) for p in report.problems] == [(key(1), "unsigned")]
    assert "--fix re-signs it" in report.problems[0].reason
    fixed = check_mod.check_store(store, fix=True)
    assert fixed.ok and fixed.resigned == [manifest_rel(key(1))] and fixed.quarantined == []
    found = store.lookup(key(1))
    assert found is not None and found.mac is not None
    assert (store.load(found) == np.arange(10_000)).all()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--older-than", "soon"])
    assert exc.value.code == 2
    assert cli.main(["check", "--store", "no-such-protocol-xyz://b"]) == 2
    assert "cannot open result store" in capsys.readouterr().err


def test_progress_bar_only_when_asked() -> None:
    quiet = Progress("check", 3, enabled=False, stream=io.StringIO())
    quiet.advance(3, 10)
    quiet.close()
    assert quiet.stream.getvalue() == ""  # type: ignore[attr-defined]
    loud = Progress("check", 3, enabled=True, stream=io.StringIO())
    loud.advance(3, 2000)
    loud.close()
    assert loud.stream.getvalue().endswith("check: 3/3 entries · 2.0 kB\n")  # type: ignore[attr-defined]
