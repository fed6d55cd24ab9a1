"""Provenance: recorded with every entry, authenticated by the manifest's mac, indexed,
and format-1 manifests (written before provenance existed) keep verifying and hitting."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from notebook_flow import provenance
from notebook_flow.metadata import CacheEntry, MetadataStore
from notebook_flow.signing import manifest_mac
from notebook_flow.storage import Manifest, ResultStore, StorageWarning

KEY = "0123456789abcdef0123456789abcdef"
SIGNING_KEY = b"k" * 32


def commit(store: ResultStore, value: object, task: str = "mod:f") -> Manifest:
    return store.commit(
        KEY, value, task=task, components={}, run_id="r", duration=0.1, expires_at=None
    )


def test_every_entry_records_who_where_and_with_what(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "s"), signing_key=SIGNING_KEY)
    m = commit(store, np.arange(3))
    p = m.provenance
    assert p is not None
    assert p["user"] and p["host"] and p["python"].startswith(f"{sys.version_info.major}.")
    assert p["packages"].startswith("notebook_flow=")
    assert f"numpy={np.__version__}" in p["packages"].split()
    assert p["source"] == "mod:f"
    found = store.lookup(KEY)
    assert found is not None and found.provenance == p  # stored, read back, verified


def test_provenance_is_covered_by_the_mac(tmp_path: Path) -> None:
    """Rewriting who made an entry (a forged origin) makes the entry a miss."""
    store = ResultStore(str(tmp_path / "s"), signing_key=SIGNING_KEY)
    m = commit(store, {"a": 1})
    assert m.provenance is not None
    path = tmp_path / "s" / "manifests" / KEY[:2] / f"{KEY}.json"
    raw = json.loads(path.read_bytes())
    raw["provenance"]["user"] = "mallory"
    path.write_text(json.dumps(raw))
    with pytest.warns(StorageWarning, match="signature does not match"):
        assert store.lookup(KEY) is None
    raw["provenance"] = None  # stripping it is a change too
    del raw["provenance"]
    path.write_text(json.dumps(raw))
    assert store.lookup(KEY) is None


def test_format_1_manifests_keep_verifying_and_loading(tmp_path: Path) -> None:
    """An entry signed before provenance existed (format 1, no field) is still a hit."""
    store = ResultStore(str(tmp_path / "s"), signing_key=SIGNING_KEY)
    m = commit(store, {"a": 1})
    old = dataclasses.replace(m, format_version=1, provenance=None, mac=None)
    old = dataclasses.replace(old, mac=manifest_mac(SIGNING_KEY, old.fields()))
    body = old.to_json()
    assert b"provenance" not in body and b'"format_version": 1' in body
    # The mac of a format-1 manifest is computed over exactly the format-1 fields.
    v1_names = [f.name for f in dataclasses.fields(Manifest) if f.name not in ("provenance", "txn")]
    v1_fields = {name: getattr(old, name) for name in v1_names}
    assert manifest_mac(SIGNING_KEY, v1_fields) == old.mac
    (tmp_path / "s" / "manifests" / KEY[:2] / f"{KEY}.json").write_bytes(body)
    found = store.lookup(KEY)
    assert found is not None and found.provenance is None and found.format_version == 1
    assert store.load(found) == {"a": 1}
    # ...but a format-1 manifest cannot carry provenance (it never did).
    with pytest.raises(ValueError, match="provenance"):
        Manifest.from_json(json.dumps(dict(json.loads(body), provenance={"a": "b"})).encode())


def test_invalid_provenance_is_refused() -> None:
    good = json.loads(
        Manifest(
            2,
            KEY,
            "t",
            "json",
            "",
            2,
            "f" * 32,
            None,
            0.0,
            None,
            0.1,
            {},
            "r",
            inline="e30=",
            provenance={"user": "a"},
        ).to_json()  # fmt: skip
    )
    assert Manifest.from_json(json.dumps(good).encode()).provenance == {"user": "a"}
    for bad in ({"user": 3}, ["user"], "user"):
        with pytest.raises(ValueError, match="provenance"):
            Manifest.from_json(json.dumps(dict(good, provenance=bad)).encode())


def test_index_keeps_provenance(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "s"), signing_key=SIGNING_KEY)
    m = commit(store, {"a": 1})
    with MetadataStore(tmp_path / "m.duckdb", auto_mark_crashed=False) as meta:
        meta.record_cache_entry(CacheEntry.from_manifest(m))
        meta.flush(timeout=30)
        row = meta.cache_entries().iloc[0]
        assert json.loads(row["provenance"]) == m.provenance


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="a", GIT_AUTHOR_EMAIL="a@b", GIT_COMMITTER_NAME="a",
               GIT_COMMITTER_EMAIL="a@b")  # fmt: skip
    out = subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)
    return out.stdout.decode().strip()


def test_git_commit_follows_new_commits_and_packed_refs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provenance, "GIT_RECHECK", 0.0)  # look at the files every time
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    assert provenance.git_commit(str(repo / "pkg")) is None  # no commit yet
    (repo / "a.txt").write_text("1")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "one")
    first = _git(repo, "rev-parse", "HEAD")
    assert provenance.git_commit(str(repo / "pkg")) == first
    _git(repo, "pack-refs", "--all")  # the branch now lives in packed-refs only
    assert provenance.git_commit(str(repo / "pkg")) == first
    (repo / "a.txt").write_text("2")
    _git(repo, "commit", "-q", "-am", "two")  # a loose ref appears beside packed-refs
    assert provenance.git_commit(str(repo / "pkg")) == _git(repo, "rev-parse", "HEAD") != first
    _git(repo, "checkout", "-q", "--detach", first)
    assert provenance.git_commit(str(repo)) == first
    # A linked worktree (.git is a file) names its own HEAD.
    _git(repo, "worktree", "add", "-q", str(tmp_path / "wt"), "main")
    assert provenance.git_commit(str(tmp_path / "wt")) == _git(repo, "rev-parse", "main")


def test_task_module_commit_is_recorded_in_a_fresh_process(tmp_path: Path) -> None:
    """A task defined in a module inside a git repository records that repo's commit
    (not the working folder's)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "mytasks.py").write_text(
        textwrap.dedent(
            """
            from notebook_flow import task

            @task
            def double(x):
                return x * 2
            """
        )
    )
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "mytasks.py")
    _git(repo, "commit", "-q", "-m", "tasks")
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(repo)!r})
        import notebook_flow as nf
        from notebook_flow.storage import ResultStore
        nf.configure(store={str(tmp_path / "store")!r})
        import mytasks
        assert mytasks.double(21) == 42
        nf.wait_for_commits()
        [m] = ResultStore({str(tmp_path / "store")!r}).iter_manifests()
        print(json.dumps(m.provenance))
        """
    )
    env = dict(os.environ, NOTEBOOK_FLOW_SIGNING_KEY=SIGNING_KEY.decode())
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, check=False
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    recorded = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert recorded["source"] == "mytasks:double"
    assert recorded["git"] == _git(repo, "rev-parse", "HEAD")


def test_a_cell_records_its_name_and_notebook(shell, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``%%task`` cell's entry names the cell and the notebook the kernel runs."""
    from notebook_flow import config

    monkeypatch.setenv("JPY_SESSION_NAME", "/home/ada/analysis.ipynb")
    # The notebook path is cached for a second per __main__ (a kernel's is set once): a
    # test that ran just before in this process must not lend it its answer.
    monkeypatch.setattr(provenance._identity, "_notebook", (None, 0.0, None))
    result = shell.run_cell("%%task --name joined\nx = 40 + 2\n")
    assert result.success and shell.user_ns["x"] == 42
    made = [m.provenance for m in config.get_store().iter_manifests()]
    assert made and all(p is not None for p in made)
    cell = [p for p in made if p and p["source"] == "cell:joined"]
    assert cell and cell[0]["notebook"] == "/home/ada/analysis.ipynb"


def test_format_provenance_is_one_line() -> None:
    line = provenance.format_provenance(
        {"user": "ada", "host": "lab", "notebook": "x/a.ipynb", "git": "abcdef1234", "python": "3"}
    )
    assert line == "x/a.ipynb · ada@lab · git abcdef1 · Python 3"
    task = provenance.format_provenance({"source": "mod:f", "cell": "c1"})
    assert task == "mod:f · cell c1"
