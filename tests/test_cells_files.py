"""Files a cached cell writes (``cells/files.py``): a hit leaves them as a plain run does.

The kernel tests run the cells in kernel A, change the folder or the notebook, then run
again in a fresh kernel B over the same store, and compare with what a plain run prints.
The in-process tests check the reasons, the size limit, the threads that count and that a
tampered stored file is never written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_cells_kernel import badges, run_cells, stderr

# --------------------------------------------------------------------------- real kernels


@pytest.fixture
def env(python_env: dict[str, str]) -> dict[str, str]:
    return dict(python_env, MPLBACKEND="agg")


LOG = "os.path.join('data', 'log.txt')"  # built at run time: not a name in the code


@pytest.mark.kernel
def test_an_edited_cell_appending_to_a_file_another_cell_wrote(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Scenario 1: A writes 'a', B appends 'b'; B edited to append 'c' gives 'ac' as a plain
    run does (was 'abc': A hit and left the file of the earlier run)."""
    a = (
        "%%task\nimport os\nos.makedirs('data', exist_ok=True)\n"
        f"with open({LOG}, 'w') as f:\n    f.write('a')"
    )
    b = "%%task\nwith open({log}, 'a') as f:\n    f.write('{text}')"
    c = f"print(open({LOG}).read())"
    first = run_cells(env, tmp_path, [a, b.format(log=LOG, text="b"), c])
    assert first[2][0] == "ab\n"
    edited = run_cells(env, tmp_path, [a, b.format(log=LOG, text="c"), c])
    assert edited[2][0] == "ac\n"
    assert badges(edited[0][1]) == ["cached"]
    assert "appends to" in stderr(first[1][1]) and "log.txt" in stderr(first[1][1])


@pytest.mark.kernel
def test_files_a_hit_skips_writing_are_written_back(env: dict[str, str], tmp_path: Path) -> None:
    """Scenario 2: the cell's files (pandas, numpy, matplotlib, an atomic rename) are gone
    before the second run, then their folders too; each hit writes them back (was: the
    next cell failed)."""
    # (the libraries imported and warmed up before: an import in the cell lists the folder)
    imports = (
        "import io, os\nimport numpy as np\nimport pandas as pd\nimport matplotlib.pyplot as plt\n"
        "pd.DataFrame({'x': [1]}).to_csv(io.StringIO())\nnp.save(io.BytesIO(), np.arange(1))\n"
        "plt.figure().savefig(io.BytesIO())"
    )
    write = (
        "%%task\n"
        "os.makedirs(os.path.join('out', 'sub'), exist_ok=True)\n"
        "pd.DataFrame({'x': [1, 2]}).to_csv(os.path.join('out', 'table.csv'), index=False)\n"
        "np.save(os.path.join('out', 'sub', 'arr.npy'), np.arange(3))\n"
        "fig = plt.figure()\nplt.plot([1, 2])\nfig.savefig(os.path.join('out', 'fig.png'))\n"
        "with open(os.path.join('out', 'r.tmp'), 'w') as f:\n    f.write('done')\n"
        "os.replace(os.path.join('out', 'r.tmp'), os.path.join('out', 'result.txt'))"
    )
    read = (
        "print(open(os.path.join('out', 'table.csv')).read(), np.load(os.path.join('out', "
        "'sub', 'arr.npy')), open(os.path.join('out', 'result.txt')).read(), "
        "sorted(os.listdir('out')))"
    )
    first = run_cells(env, tmp_path, [imports, write, read])
    out = tmp_path / "out"
    made = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(made) == 4
    for path in made:
        (out / path).unlink()  # (the folders stay: the folder the notebook is in lists the same)
    again = run_cells(env, tmp_path, [imports, write, read])
    assert again[2][0] == first[2][0]
    assert badges(again[1][1]) == ["cached"]
    assert "r.tmp" not in again[2][0]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == made
    shutil.rmtree(out)  # the folders too: made again
    third = run_cells(env, tmp_path, [imports, write, read])
    assert badges(third[1][1]) == ["cached"] and third[2][0] == first[2][0]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == made


@pytest.mark.kernel
def test_a_hit_deletes_and_truncates_as_the_cell_did(env: dict[str, str], tmp_path: Path) -> None:
    """Scenario 3: the cell deletes one file, truncates another and rewrites a third, which
    a plain cell before it creates each run; the hit does it again (was: left them)."""
    setup = (
        "import os\nos.makedirs('work', exist_ok=True)\n"
        "for n in ('stale.txt', 'big.txt', 'old.txt'):\n"
        "    with open(os.path.join('work', n), 'w') as f:\n        f.write(n * 3)"
    )
    cell = (
        "%%task\nos.remove(os.path.join('work', 'stale.txt'))\n"
        "os.truncate(os.path.join('work', 'big.txt'), 0)\n"
        "with open(os.path.join('work', 'old.txt'), 'w') as f:\n    f.write('new')"
    )
    show = (
        "print(sorted(os.listdir('work')), os.path.getsize(os.path.join('work', 'big.txt')), "
        "open(os.path.join('work', 'old.txt')).read())"
    )
    first = run_cells(env, tmp_path, [setup, cell, show])
    assert first[2][0] == "['big.txt', 'old.txt'] 0 new\n"
    again = run_cells(env, tmp_path, [setup, cell, show])
    assert badges(again[1][1]) == ["cached"]
    assert again[2][0] == first[2][0]


@pytest.mark.kernel
def test_a_file_pyarrow_writes_is_restored(env: dict[str, str], tmp_path: Path) -> None:
    """pyarrow writes in C++, unseen by the audit hook: the names in the code are compared
    before and after the run."""
    imports = (
        "import io\nimport pandas as pd\nimport pyarrow as pa\nimport pyarrow.parquet as pq\n"
        "pd.DataFrame({'a': [1]}).to_parquet(io.BytesIO())"
    )
    write = (
        "%%task\n"
        "pd.DataFrame({'a': [1, 2]}).to_parquet('t.parquet')\n"
        "pq.write_table(pa.table({'b': [3]}), 'u.parquet')"
    )
    read = (
        "print(pd.read_parquet('t.parquet')['a'].tolist(), "
        "pd.read_parquet('u.parquet')['b'].tolist())"
    )
    first = run_cells(env, tmp_path, [imports, write, read])
    assert first[2][0] == "[1, 2] [3]\n"
    (tmp_path / "t.parquet").unlink()
    (tmp_path / "u.parquet").unlink()
    again = run_cells(env, tmp_path, [imports, write, read])
    assert badges(again[1][1]) == ["cached"]
    assert again[2][0] == first[2][0]


@pytest.mark.kernel
def test_temp_files_and_library_caches_are_not_the_cells_files(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A fresh home: matplotlib writes its font cache there while the cell imports it; the
    cell appends to a file in the temp folder (an append to an existing data file would run
    it uncached). Neither is stored, and the cell is cached."""
    home = tmp_path / "home"
    home.mkdir()
    kernel_env = dict(env, HOME=str(home))
    kernel_env.pop("MPLCONFIGDIR", None)
    scratch = os.path.join(tempfile.gettempdir(), f"nf-files-{uuid.uuid4().hex}.log")
    Path(scratch).write_text("x")
    cell = (
        "%%task\nimport io, os, tempfile\nimport matplotlib.pyplot as plt\n"
        "fig = plt.figure()\nplt.plot([1, 2])\nbuf = io.BytesIO()\nfig.savefig(buf, format='png')\n"
        f"with open(os.path.join(tempfile.gettempdir(), '{os.path.basename(scratch)}'), 'a')"
        " as f:\n"
        "    f.write('y')\n"
        "with tempfile.NamedTemporaryFile('w', suffix='.txt') as t:\n    t.write('z')\n"
        "ok = len(buf.getvalue()) > 0"
    )
    try:
        first = run_cells(env=kernel_env, cwd=tmp_path, cells=[cell])
        assert "not cached" not in stderr(first[0][1])
        assert (home / ".cache" / "matplotlib").is_dir()  # the library did write there
        again = run_cells(env=kernel_env, cwd=tmp_path, cells=[cell])
        assert badges(again[0][1]) == ["cached"]
        for path in _stored_file_names(Path(env["NOTEBOOK_FLOW_STORE"])):
            assert not path.startswith((str(home), tempfile.gettempdir() + os.sep + "tmp"))
            assert os.path.basename(scratch) not in path
    finally:
        os.unlink(scratch)


def _stored_file_names(store_path: Path) -> list[str]:
    """The names of the files every stored cell result writes back."""
    from notebook_flow.storage import ResultStore

    store = ResultStore(str(store_path))
    names = []
    for manifest in store.iter_manifests():
        value = store.load(manifest)
        if isinstance(value, dict) and "writes" in value:
            names += [entry[1] for entry in value["writes"]]
    return names


# --------------------------------------------------------------------------- in process


def run(shell: Any, code: str) -> None:
    result = shell.run_cell(code)
    assert result.error_in_exec is None and result.error_before_exec is None


def report(shell: Any) -> Any:
    return shell.magics_manager.registry["FlowMagics"].runner.last


def test_a_file_over_the_size_limit_runs_the_cell_uncached(
    shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from notebook_flow.cells import files

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(files, "WRITE_LIMIT", 100)
    code = (
        "%%task\nimport os\nwith open(os.path.join('.', 'big.bin'), 'wb') as f:\n"
        "    f.write(b'x' * 1000)"
    )
    run(shell, code)
    assert report(shell).status == "not stored"
    assert "big.bin" in report(shell).reasons[0] and "100 bytes" in report(shell).reasons[0]
    assert "big.bin" in capsys.readouterr().err
    run(shell, code)
    assert report(shell).status == "not stored"  # nothing was stored: runs again


def test_reasons_name_the_file_and_the_fix(shell: Any, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("old")
    cases = {
        "with open(os.path.join('.', 'keep.txt'), 'a') as f:\n    f.write('x')": "appends to",
        "s = open(os.path.join('.', 'keep.txt')).read()\n"
        "with open(os.path.join('.', 'keep.txt'), 'w') as f:\n    f.write(s + 'x')": "reads",
        "os.rename(os.path.join('.', 'keep.txt'), os.path.join('.', 'moved.txt'))\n"
        "os.rename(os.path.join('.', 'moved.txt'), os.path.join('.', 'keep.txt'))": "renames",
    }
    for body, words in cases.items():
        (tmp_path / "keep.txt").write_text("old")
        run(shell, f"%%task\nimport os\n{body}")
        last = report(shell)
        assert last.status == "not stored", body
        assert words in last.reasons[0] and "keep.txt" in last.reasons[0], last.reasons


def test_only_the_cells_threads_count(shell: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """A thread that existed before the cell (a recorder, a worker) appending to a data file
    while the cell runs does not make the cell uncached; a thread the cell starts does."""
    import threading

    monkeypatch.chdir(tmp_path)
    (tmp_path / "side.log").write_text("")
    go, done = threading.Event(), threading.Event()

    def background() -> None:
        go.wait()
        with open(os.path.join(str(tmp_path), "side.log"), "a") as f:
            f.write("x")
        done.set()

    worker = threading.Thread(target=background, daemon=True)
    worker.start()
    shell.user_ns.update(go=go, done=done, n0=0)
    run(shell, "%%task --inputs n0 --outputs n\ngo.set()\ndone.wait(10)\nn = n0 + 1")
    assert report(shell).status == "computed"
    body = (
        "import os, threading\n"
        "def w():\n    with open(os.path.join('.', 'side.log'), 'a') as f:\n        f.write('y')\n"
        "t = threading.Thread(target=w)\nt.start()\nt.join()\ndel t"
    )
    run(shell, f"%%task\n{body}")
    assert report(shell).status == "not stored" and "side.log" in report(shell).reasons[0]


def _file_part(shell: Any, store: Any) -> tuple[str, Any]:
    """The key of the stored part holding the one file the last cell wrote, and the cell's
    payload."""
    from notebook_flow.cells.result import part_key

    key = report(shell).key
    payload = store.load(store.lookup(key))
    [(kind, _name, index)] = [entry[:3] for entry in payload["writes"]]
    assert kind == "file"
    return part_key(key, index), payload


@pytest.mark.parametrize("attack", ["forged", "replayed"])
def test_a_tampered_stored_file_is_never_written(
    shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attack: str
) -> None:
    """forged: the part's bytes are replaced without the key (its signature fails);
    replayed: a validly signed entry with other bytes sits under the part's key (the
    content hash in the signed result fails). Either way the hit is a miss that recomputes,
    and the bad bytes never reach the disk."""
    import json

    from notebook_flow.cells import files
    from notebook_flow.config import get_store

    monkeypatch.chdir(tmp_path)
    code = (
        "%%task\nimport os\nwith open(os.path.join('.', 'out.txt'), 'w') as f:\n    f.write('good')"
    )
    run(shell, code)
    assert report(shell).status == "computed"
    store = get_store()
    part, _ = _file_part(shell, store)
    if attack == "forged":
        import base64

        import xxhash

        path = store._path(f"manifests/{part[:2]}/{part}.json")
        raw = json.loads(store.fs.cat_file(path))
        bad = __import__("pickle").dumps(b"evil")
        raw.update(
            payload="",
            inline=base64.b64encode(bad).decode(),
            size=len(bad),
            checksum=xxhash.xxh3_128_hexdigest(bad),
        )
        store.fs.pipe_file(path, json.dumps(raw).encode())
        store.fs.invalidate_cache()
    else:
        store.commit(
            part, b"evil", task="x", components={}, run_id="r", duration=0.1, expires_at=None
        )
    written: list[bytes] = []
    real = files._write_file

    def spy(path: str, data: bytes) -> None:
        written.append(bytes(data))
        real(path, data)

    monkeypatch.setattr(files, "_write_file", spy)
    (tmp_path / "out.txt").unlink()
    with pytest.warns(Warning) if attack == "forged" else _nothing():
        run(shell, code)
    assert report(shell).status == "computed"
    assert b"evil" not in written
    assert (tmp_path / "out.txt").read_text() == "good"


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_file_the_cell_creates_by_appending_is_restored_only_where_absent(
    shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = "%%task\nimport os\nwith open(os.path.join('.', 'new.log'), 'a') as f:\n    f.write('x')"
    run(shell, code)
    assert report(shell).status == "computed"
    (tmp_path / "new.log").unlink()
    run(shell, code)
    assert report(shell).status == "cached" and (tmp_path / "new.log").read_text() == "x"
    run(shell, code)  # a plain run appends to the file that is there now
    assert report(shell).status == "not stored" and "appends to" in report(shell).reasons[0]
    assert (tmp_path / "new.log").read_text() == "xx"


def test_a_folder_the_cell_empties_and_fills_is_emptied_and_filled_on_a_hit(
    shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "old.txt").write_text("old")
    code = (
        "%%task\nimport os, shutil\nshutil.rmtree(os.path.join('.', 'res'), ignore_errors=True)\n"
        "os.makedirs(os.path.join('.', 'res', 'sub'))\n"
        "with open(os.path.join('.', 'res', 'sub', 'new.txt'), 'w') as f:\n    f.write('new')"
    )
    run(shell, code)
    assert report(shell).status == "computed"
    (tmp_path / "res" / "stray.txt").write_text("stray")  # a plain run would delete it
    (tmp_path / "res" / "sub" / "new.txt").write_text("edited")
    run(shell, code)
    assert report(shell).status == "cached"
    found = {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*.txt")}
    assert found == {"res/sub/new.txt": "new"}


def test_a_file_the_cell_writes_and_reads_back_is_an_output_not_an_input(
    shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = (
        "%%task\nimport os\nwith open(os.path.join('.', 'own.txt'), 'w') as f:\n    f.write('1')\n"
        "back = open(os.path.join('.', 'own.txt')).read()"
    )
    run(shell, code)
    (tmp_path / "own.txt").write_text("2")
    run(shell, code)
    assert report(shell).status == "cached"
    assert (tmp_path / "own.txt").read_text() == "1" and shell.user_ns["back"] == "1"


def test_listing_a_folder_then_adding_to_it_runs_uncached(
    shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = (
        "%%task\nimport os\nnames = sorted(os.listdir('.'))\n"
        "with open(os.path.join('.', 'made.txt'), 'w') as f:\n    f.write('x')"
    )
    run(shell, code)
    assert report(shell).status == "not stored" and "lists the folder" in report(shell).reasons[0]


def test_a_named_file_rewritten_outside_python_is_an_input_as_it_was(
    shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow may have read the file before rewriting it, unseen: the content before the
    run is an input of the result (so an edit costs one more run), and the file an output."""
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"a": [0]}).to_parquet("t.parquet")
    shell.user_ns["pd"] = pd
    code = "%%task\npd.DataFrame({'a': [1, 2]}).to_parquet('t.parquet')"
    run(shell, code)
    assert report(shell).status == "computed"
    run(shell, code)  # the file is not what it was before the stored run
    assert report(shell).status == "computed"
    written = (tmp_path / "t.parquet").read_bytes()
    run(shell, code)
    assert report(shell).status == "cached"
    (tmp_path / "t.parquet").unlink()  # not as it was: a miss, never a guess
    run(shell, code)
    assert report(shell).status == "computed" and (tmp_path / "t.parquet").read_bytes() == written


def test_a_result_of_the_layout_before_files_were_stored_is_a_miss(
    shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results stored before the cell format held the files a cell writes (format 2) would
    give a hit that leaves the files out: they are recomputed."""
    from notebook_flow.cells import CELL_FORMAT
    from notebook_flow.config import get_store

    monkeypatch.chdir(tmp_path)
    code = "%%task\nimport os\nwith open(os.path.join('.', 'out.txt'), 'w') as f:\n    f.write('x')"
    run(shell, code)
    store = get_store()
    key = report(shell).key
    old = dict(store.load(store.lookup(key)), format=2)
    del old["writes"]
    assert CELL_FORMAT == 3
    store.commit(key, old, task="x", components={}, run_id="r", duration=0.1, expires_at=None)
    (tmp_path / "out.txt").unlink()
    run(shell, code)
    assert report(shell).status == "computed"
    assert report(shell).reasons == ("the stored result has an older layout",)
    assert (tmp_path / "out.txt").read_text() == "x"


def test_a_path_written_after_a_chdir_is_written_back_where_it_was_written(
    shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = (
        "%%task\nimport os\nos.makedirs(os.path.join('.', 'sub'), exist_ok=True)\n"
        "os.chdir(os.path.join('.', 'sub'))\nwith open(os.path.join('.', 'x.txt'), 'w') as f:\n"
        "    f.write('x')\nos.chdir('..')"
    )
    run(shell, code)
    assert report(shell).status == "computed"
    shutil.rmtree(tmp_path / "sub")
    run(shell, code)
    assert report(shell).status == "cached"
    assert (tmp_path / "sub" / "x.txt").read_text() == "x" and not (tmp_path / "x.txt").exists()
    assert os.getcwd() == str(tmp_path)


def test_the_audit_hook_returns_at_once_for_events_it_does_not_watch(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The hook sees every audited event of the process. It called `sys._getframe` (itself
    audited) for each, recursing to the recursion limit every time: `id()`, which deepcopy
    and imports call tens of thousands of times, cost 0.6 ms, and a cell importing
    statsmodels took 85 s instead of 2. One listing is one note, and `id()` none."""
    from notebook_flow.cells import files

    notes: list[str] = []
    real = files._note
    monkeypatch.setattr(files, "_note", lambda e, a, c: (notes.append(e), real(e, a, c))[1])
    with files.recording([]) as found:
        for i in range(100):
            id(i)
        os.listdir(tmp_path)
    assert notes == ["os.listdir"]
    assert str(tmp_path) in found.reads
