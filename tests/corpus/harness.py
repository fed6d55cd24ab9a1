"""Run the corpus notebooks plain (nbclient, no extension) and with ``notebook-flow run
--cache-all``; normalise their outputs and final namespaces for comparison.

Shared by ``tests/test_corpus.py`` and ``benchmarks/bench_corpus.py``. Each run ends with
one extra cell that prints the fingerprint of every variable in the namespace (and which
names are aliases of one object), so a cached run is compared with a plain run on the
values it leaves behind as well as on what it shows.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MARKER = "NBFLOW-NAMESPACE "

#: The last cell of every run: the namespace's fingerprints, printed as one JSON line.
#: Content fingerprints where values have one; a portable lenient digest otherwise (the
#: parts with no content fingerprint by type and pickled state), never a lineage token,
#: so a cached run and a plain run are compared on content.
NAMESPACE_CELL = """\
def _nbflow_namespace():
    import json, types
    from notebook_flow.hashing import lineage
    ip = get_ipython()
    hidden = ip.user_ns_hidden
    skip = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)
    values, groups = {}, {}
    for name, value in list(ip.user_ns.items()):
        if name.startswith("_") or (name in hidden and hidden[name] is value):
            continue
        if isinstance(value, skip):
            continue
        if type(value).__module__.startswith("matplotlib"):
            values[name] = "matplotlib " + type(value).__qualname__  # shown as images
        else:
            try:
                values[name] = lineage.snapshot(value, portable=True)[0]
            except Exception as exc:
                values[name] = "unhashable " + type(exc).__name__
        if not isinstance(value, (int, float, complex, str, bytes, bool, tuple, type(None))):
            groups.setdefault(id(value), []).append(name)
    aliases = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    print("NBFLOW-NAMESPACE " + json.dumps({"values": values, "aliases": aliases}))
_nbflow_namespace()
del _nbflow_namespace
"""


@dataclasses.dataclass(frozen=True)
class Notebook:
    """One corpus entry (see corpus.toml)."""

    name: str
    path: Path
    source: str
    licence: str
    nondeterministic: frozenset[int]  # code-cell numbers, from 1
    names: frozenset[str]  # variables whose values are not compared
    masks: tuple[str, ...]  # regexes blanked out of text outputs
    edit_cell: int
    edit_old: str
    edit_new: str


def load_corpus() -> list[Notebook]:
    """The notebooks declared in corpus.toml, in file order."""
    with open(HERE / "corpus.toml", "rb") as f:
        data = tomllib.load(f)
    masks = tuple(data.get("masks", []))
    out = []
    for name, spec in data["notebook"].items():
        edit = spec["edit"]
        out.append(
            Notebook(
                name=name,
                path=HERE / f"{name}.ipynb",
                source=spec["source"],
                licence=spec["licence"],
                nondeterministic=frozenset(spec.get("nondeterministic", [])),
                names=frozenset(spec.get("names", [])),
                masks=masks + tuple(spec.get("masks", [])),
                edit_cell=edit["cell"],
                edit_old=edit["old"],
                edit_new=edit["new"],
            )
        )
    return out


def prepare(nb: Notebook, dest: Path, *, edited: bool, cached: bool) -> Path:
    """A copy of the notebook with the namespace cell appended (and the edit applied)."""
    import nbformat

    notebook = nbformat.read(nb.path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    if edited:
        cell = code[nb.edit_cell - 1]
        if nb.edit_old not in cell.source:
            raise ValueError(f"{nb.name}: cell {nb.edit_cell} has no {nb.edit_old!r} to edit")
        cell.source = cell.source.replace(nb.edit_old, nb.edit_new, 1)
    final = ("%%task --off\n" if cached else "") + NAMESPACE_CELL
    notebook.cells.append(nbformat.v4.new_code_cell(final))
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{nb.name}{'.edited' if edited else ''}.ipynb"
    nbformat.write(notebook, path)
    return path


def kernel_env(home: Path) -> dict[str, str]:
    """The environment of every run: this checkout importable, no auto caching by default
    (and every cell stored when it is on), matplotlib's cache in a private folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTEBOOK_FLOW_AUTO_CELLS", None)
    env["MPLCONFIGDIR"] = str(home / "mpl")
    env["PYTHONHASHSEED"] = "0"  # plain runs of set-ordering code agree with each other
    # Every cell of a --cache-all run is stored, however short: what a second run restores
    # must not depend on how busy the machine was on the first (CI stored the short cells
    # of pdsh_hierarchical_indexing, a quiet machine did not, and only CI saw a wrong value).
    env["NOTEBOOK_FLOW_AUTO_MIN_SECONDS"] = "0"
    return env


@dataclasses.dataclass
class Run:
    """What a run left: its executed notebook and how long it took."""

    notebook: Any
    seconds: float
    returncode: int = 0
    log: str = ""


def run_plain(path: Path, env: dict[str, str], timeout: float = 600) -> Run:
    """Execute the notebook in a fresh kernel with nbclient, without notebook_flow."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    t0 = time.perf_counter()
    with _env(env):
        client.execute()
    return Run(notebook, time.perf_counter() - t0)


def run_plain_cli(path: Path, env: dict[str, str], timeout: float = 600) -> Run:
    """``jupyter execute --inplace`` (nbclient's own command) in a subprocess: the plain
    headless run a user would otherwise type, paying an interpreter's start and reading and
    writing the notebook as ``notebook-flow run`` does. With the one import
    ``notebook-flow run`` also skips (``cli._skip_iri_grammar``: jsonschema building an
    RFC 3987 grammar, ~1.7 s here), so that the two differ only in what caching costs."""
    import nbformat

    cmd = [
        sys.executable,
        "-c",
        "import sys; sys.modules['rfc3987_syntax'] = None; "
        "from nbclient.cli import main; sys.exit(main())",
        "--inplace",
        f"--timeout={int(timeout)}",
        str(path),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, env=env, cwd=str(path.parent), capture_output=True, text=True, timeout=timeout
    )
    seconds = time.perf_counter() - t0
    notebook = nbformat.read(path, as_version=4) if proc.returncode == 0 else None
    return Run(notebook, seconds, proc.returncode, proc.stdout + proc.stderr)


class _env:
    """nbclient starts its kernel with this process's environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.saved: dict[str, str] = {}

    def __enter__(self) -> None:
        self.saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)

    def __exit__(self, *exc: object) -> None:
        os.environ.clear()
        os.environ.update(self.saved)


def run_cached(
    path: Path,
    store: Path,
    env: dict[str, str],
    *,
    kill_at: int | None = None,
    timeout: float = 600,
) -> Run:
    """``notebook-flow run --cache-all`` in a subprocess; with ``kill_at``, SIGKILL the
    kernel once that many code cells have finished (the run then stops)."""
    import nbformat

    output = path.with_suffix(".out.ipynb")
    output.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-c",
        "import sys; from notebook_flow.cli import main; sys.exit(main())",
        "run",
        "--cache-all",
        "--store",
        str(store),
        "--output",
        str(output),
        str(path),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env={**env, "PYTHONUNBUFFERED": "1"},  # each cell's line as it finishes
        cwd=str(path.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines = []
    killed = False
    deadline = time.monotonic() + timeout
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        lines.append(line)
        if kill_at is not None and not killed and re.match(rf"\s*\[\s*{kill_at}/", line):
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            killed = True
        if time.monotonic() > deadline:
            proc.kill()
            break
    rc = proc.wait(timeout=60)
    seconds = time.perf_counter() - t0
    notebook = nbformat.read(output, as_version=4) if output.exists() else None
    run = Run(notebook, seconds, rc, "".join(lines))
    if kill_at is not None and not killed:
        raise AssertionError(f"the run ended before cell {kill_at}:\n{run.log}")
    return run


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


# --------------------------------------------------------------------------- comparing


def _code_cells(notebook: Any) -> list[Any]:
    return [c for c in notebook.cells if c.cell_type == "code"]


def _masked(text: str, masks: tuple[str, ...]) -> str:
    for pattern in masks:
        text = re.sub(pattern, "<masked>", text, flags=re.MULTILINE)
    return text


def cell_outputs(cell: Any, masks: tuple[str, ...]) -> list[Any]:
    """The outputs a person sees, normalised: consecutive stream chunks joined, our own
    badges and ``%%task:`` notes left out, images by digest."""
    items: list[Any] = []
    for out in cell.get("outputs", []):
        kind = out["output_type"]
        if kind == "stream":
            # (joined before our notes are left out: the kernel may send one line in two
            # chunks, as a frontend shows them joined)
            if items and items[-1][0] == "stream" and items[-1][1] == out["name"]:
                items[-1] = ("stream", out["name"], items[-1][2] + out["text"])
            else:
                items.append(("stream", out["name"], out["text"]))
        elif kind in ("execute_result", "display_data"):
            if "notebook_flow" in out.get("metadata", {}):
                continue
            data = {}
            for mime, value in sorted(out["data"].items()):
                if mime.startswith("image/") and mime != "image/svg+xml":
                    raw = base64.b64decode(value)
                    data[mime] = f"{len(raw)} bytes sha1 {hashlib.sha1(raw).hexdigest()}"
                else:
                    text = value if isinstance(value, str) else json.dumps(value)
                    data[mime] = text
            items.append((kind, data))
        elif kind == "error":
            items.append(("error", out["ename"], out["evalue"]))
    for i, item in enumerate(items):
        if item[0] == "stream":
            lines = item[2].splitlines(True)
            items[i] = (*item[:2], "".join(ln for ln in lines if not ln.startswith("%%task")))
    items = [i for i in items if i[0] != "stream" or i[2]]
    return [
        (i[0], i[1], _masked(i[2], masks)) if i[0] == "stream" else _mask_data(i, masks)
        for i in items
    ]


def _mask_data(item: Any, masks: tuple[str, ...]) -> Any:
    if item[0] == "error":
        return item
    kind, data = item
    return (kind, {k: v if k.startswith("image/") else _masked(v, masks) for k, v in data.items()})


def namespace(notebook: Any) -> dict[str, Any]:
    """The namespace cell's report: ``{"values": {name: digest}, "aliases": [[names]]}``."""
    last = _code_cells(notebook)[-1]
    for out in last.get("outputs", []):
        if out["output_type"] == "stream":
            for line in out["text"].splitlines():
                if line.startswith(MARKER):
                    return dict(json.loads(line[len(MARKER) :]))
        if out["output_type"] == "error":
            raise AssertionError(f"the namespace cell failed: {out['ename']}: {out['evalue']}")
    raise AssertionError("the namespace cell printed nothing")


def differences(nb: Notebook, reference: Any, run: Any) -> list[str]:
    """Where ``run`` differs from ``reference``, except what the corpus file declares."""
    diffs = []
    ref_cells, run_cells = _code_cells(reference)[:-1], _code_cells(run)[:-1]
    if len(ref_cells) != len(run_cells):
        return [f"{len(run_cells)} code cells, the plain run has {len(ref_cells)}"]
    for number, (a, b) in enumerate(zip(ref_cells, run_cells, strict=True), 1):
        if number in nb.nondeterministic:
            continue
        want, got = cell_outputs(a, nb.masks), cell_outputs(b, nb.masks)
        if want != got:
            diffs.append(
                f"cell {number} ({a.source.strip().splitlines()[0][:50]!r}): "
                f"plain {_short(want)} != cached {_short(got)}"
            )
    want_ns, got_ns = namespace(reference), namespace(run)
    names = set(want_ns["values"]) | set(got_ns["values"])
    for name in sorted(names - nb.names):
        if want_ns["values"].get(name) != got_ns["values"].get(name):
            diffs.append(
                f"variable `{name}`: plain {want_ns['values'].get(name)} != "
                f"cached {got_ns['values'].get(name)}"
            )
    want_alias = [g for g in want_ns["aliases"] if not set(g) & nb.names]
    got_alias = [g for g in got_ns["aliases"] if not set(g) & nb.names]
    if want_alias != got_alias:
        diffs.append(f"aliases: plain {want_alias} != cached {got_alias}")
    return diffs


def _short(items: Any, width: int = 300) -> str:
    text = repr(items)
    return text if len(text) <= width else text[:width] + "…"


def cached_fraction(notebook: Any) -> tuple[int, int]:
    """``(cells served from the cache, code cells)`` of a cached run (the namespace cell
    not counted)."""
    cells = _code_cells(notebook)[:-1]
    hits = sum(
        any(
            isinstance(o.get("metadata", {}).get("notebook_flow"), dict)
            and o["metadata"]["notebook_flow"].get("badge") == "cached"
            for o in c.get("outputs", [])
        )
        for c in cells
    )
    return hits, len(cells)
