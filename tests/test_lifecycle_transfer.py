"""``notebook-flow export`` / ``import`` between a local store and S3 (moto's server):
entries are verified with the source's key, re-signed with the destination's, keep their
provenance, and a fresh process on the importing side hits without running anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest_s3 import s3_server, unique_s3_url  # noqa: F401  (fixture)

import notebook_flow as nf
from notebook_flow import cli, config
from notebook_flow.lifecycle.transfer import transfer
from notebook_flow.storage import ResultStore, files

ROOT = Path(__file__).resolve().parent.parent
KEY_A, KEY_B, KEY_SHARE = "a" * 40, "b" * 40, "c" * 40

TASKS = """
import os
import numpy as np
from notebook_flow import task

def _ran(tag):
    with open(os.environ["NF_RUNS"], "a") as f:
        f.write(tag)

@task
def make(n):
    _ran("m")
    return np.arange(n) * 2

@task
def small(x):
    _ran("s")
    return {"x": x}
"""

CALLER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import notebook_flow as nf
import mytasks
a, b = mytasks.make(200_000), mytasks.small(3)
nf.wait_for_commits()
print(json.dumps({"sum": int(a.sum()), "small": b}))
"""


def run_tasks(code: Path, store: Path, key: str, runs: Path) -> dict[str, object]:
    env = dict(os.environ, NOTEBOOK_FLOW_STORE=str(store), NOTEBOOK_FLOW_SIGNING_KEY=key)
    env["NF_RUNS"] = str(runs)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", CALLER, str(code)], env=env, capture_output=True, check=False
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    result: dict[str, object] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


def use_key(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """As a new CLI process would: settings read the environment once per process."""
    monkeypatch.setenv("NOTEBOOK_FLOW_SIGNING_KEY", key)
    config._reset_for_tests()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    """Object stores opened by URL alone (as the CLI's --to/--from) find moto's server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    return unique_s3_url()


def test_export_to_s3_then_import_hits_in_a_fresh_process(
    tmp_path: Path, s3_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "mytasks.py").write_text(TASKS)
    runs = tmp_path / "runs.txt"
    store_a, store_b = tmp_path / "alice", tmp_path / "bob"
    expected = run_tasks(code, store_a, KEY_A, runs)
    assert runs.read_text() == "ms"
    share_key = tmp_path / "share.key"
    share_key.write_text(KEY_SHARE)

    # Alice exports everything to the bucket, signed with the key she shares with Bob.
    use_key(monkeypatch, KEY_A)
    argv = ["export", "--all", "--store", str(store_a), "--to", s3_env]
    assert cli.main([*argv, "--to-key-file", str(share_key)]) == 0
    assert "copied 2 entries" in capsys.readouterr().out
    assert cli.main([*argv, "--to-key-file", str(share_key)]) == 0  # again: nothing to do
    assert "skipped 2: already there" in capsys.readouterr().out

    # Bob imports with his own key; a wrong source key refuses every entry.
    use_key(monkeypatch, KEY_B)
    argv = ["import", "--store", str(store_b), "--from", s3_env]
    assert cli.main(argv) == 1  # verified with Bob's key: not the one they are signed with
    assert "refused 2" in capsys.readouterr().out
    assert not list(ResultStore(str(store_b)).iter_manifests())
    assert cli.main([*argv, "--from-key-file", str(share_key)]) == 0
    assert "copied 2 entries" in capsys.readouterr().out

    # Provenance travelled unchanged, under Bob's signature.
    alice = {m.key: m for m in ResultStore(str(store_a), signing_key=KEY_A).iter_manifests()}
    bob = {m.key: m for m in ResultStore(str(store_b), signing_key=KEY_B).iter_manifests()}
    assert alice.keys() == bob.keys()
    for k, m in bob.items():
        assert m.provenance == alice[k].provenance and m.provenance is not None
        assert m.provenance["source"] in ("mytasks:make", "mytasks:small")
        assert m.checksum == alice[k].checksum and m.mac != alice[k].mac

    # Bob's index knows them, with their provenance.
    indexed = nf.cache_entries(store=str(store_b))
    assert sorted(indexed["key"]) == sorted(bob)
    assert all(json.loads(p)["user"] for p in indexed["provenance"])

    # A fresh process on Bob's side hits: nothing runs, the values are Alice's.
    assert run_tasks(code, store_b, KEY_B, runs) == expected
    assert runs.read_text() == "ms"


def test_one_task_and_forged_entries_are_refused(tmp_path: Path, s3_env: str) -> None:
    """Export of one task by name; a manifest forged in the bucket is refused on import,
    and a payload altered in the bucket too (nothing of either reaches the destination)."""
    local = ResultStore(str(tmp_path / "src"), signing_key=KEY_A)
    for i, task in enumerate(["mod:load", "mod:load", "mod:other"]):
        local.commit(f"{i:032x}", list(range(10_000 * (i + 1))), task=task, components={},
                     run_id="r", duration=0.1, expires_at=None, serializer="pickle")  # fmt: skip
    bucket = ResultStore(s3_env, signing_key=KEY_A)
    report = transfer(local, bucket, task="load")
    assert sorted(report.copied) == [f"{0:032x}", f"{1:032x}"] and report.ok
    assert report.bytes > 0
    # Tamper in the bucket: entry 0's manifest (task renamed), entry 1's payload.
    m0 = bucket.lookup(f"{0:032x}")
    m1 = bucket.lookup(f"{1:032x}")
    assert m0 is not None and m1 is not None
    forged = json.loads(m0.to_json())
    forged["task"] = "mod:other"
    bucket.fs.pipe_file(bucket._path(f"manifests/00/{0:032x}.json"), json.dumps(forged).encode())
    data = bytearray(files.read_bytes(bucket, m1.payload))
    data[100] ^= 1
    bucket.fs.pipe_file(bucket._path(m1.payload), bytes(data))
    target = ResultStore(str(tmp_path / "dst"), signing_key=KEY_B)
    back = transfer(bucket, target, index=False)
    assert {k for k, _ in back.refused} == {f"{0:032x}", f"{1:032x}"}
    reasons = dict(back.refused)
    assert "mac does not verify" in reasons[f"{0:032x}"]
    assert "checksum" in reasons[f"{1:032x}"]
    assert list(target.iter_manifests()) == []
    assert [rel for rel, _ in files.list_files(target, "results")] == []  # no leftovers


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["export", "--to", str(tmp_path / "x")]) == 2  # neither TASK nor --all
    assert "TASK or --all" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["import"])  # --from is required
    assert exc.value.code == 2
    same = str(tmp_path / "same")
    assert cli.main(["export", "--all", "--store", same, "--to", same]) == 2
    assert "same store" in capsys.readouterr().err
    key_file = tmp_path / "weak.key"
    key_file.write_text("short")
    argv = ["import", "--from", str(tmp_path / "y"), "--from-key-file", str(key_file)]
    assert cli.main(argv) == 2
    assert "at least 16 bytes" in capsys.readouterr().err


def test_cli_module_is_documented() -> None:
    assert "notebook-flow export" in textwrap.dedent(cli.__doc__ or "")
