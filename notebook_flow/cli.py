"""The ``notebook-flow`` command.

.. code-block:: text

    notebook-flow run NOTEBOOK.ipynb [-p name=value ...] [--store URL] [--output OUT.ipynb]
    notebook-flow history [TASK] [-n N]        recent runs, newest first, with attempts
    notebook-flow stats                        hits, misses, hit rate, time saved, bytes stored
    notebook-flow clear TASK | --expired | --all [-y]
    notebook-flow gc [--unreachable] [--older-than 30d] [--unused-for 14d] [--max-size 10GB]
                     [--task NAME] [--yes]      (notebook_flow.lifecycle.gc)
    notebook-flow pin | unpin KEY|TASK         (notebook_flow.lifecycle.pins_cli)
    notebook-flow dashboard ...                (added by notebook_flow.dashboard.cli)
    notebook-flow locks ...                    (added by notebook_flow.locks.cli)
    notebook-flow check [--fix]                verify every entry; quarantine bad ones
    notebook-flow export TASK|--all --to URL   copy entries (with provenance) to a store
    notebook-flow import [TASK] --from URL     copy entries from a store into this one

``run`` executes a notebook headless in a fresh kernel with the extension loaded, prints a
line per cell and writes the executed notebook. A ``%%task`` cell is *cached* (restored
from the store) or *computed*; another cell *ran*, or is *reused* when every task it ran
came from the store (with how many task results were reused and the time saved). The last
line sums up the cells and task results reused and the seconds saved. Run it again after a
crash or Ctrl-C and it resumes: finished ``%%task`` cells and tasks load from the store.

Every command takes ``--store URL``; the default is ``NOTEBOOK_FLOW_STORE`` or
``.notebook_flow`` in the *current* directory (also for the notebook's kernel, which runs
in the notebook's folder), so ``run`` and ``history`` see the same store.

Other modules add subcommands through :data:`EXTENSIONS` without this file importing them
up front (the CLI must start fast; the dashboard pulls in Panel).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .figures import format_saved, format_size
from .states import MIN_SAVING, RunState, format_seconds

if TYPE_CHECKING:
    from .storage import ResultStore

__all__ = ["EXTENSIONS", "clear_entries", "main", "run_notebook"]

#: Subcommands defined elsewhere: ``name -> "module:function"``. The function receives the
#: ``argparse`` subparsers object, adds its parser and sets ``func`` (``set_defaults(func=h)``
#: where ``h(args) -> int``). Only the module of the command being run is imported, and a
#: module that is missing leaves a placeholder saying so.
EXTENSIONS: dict[str, str] = {
    "dashboard": "notebook_flow.dashboard.cli:register",
    "locks": "notebook_flow.locks.cli:register",
    "key": "notebook_flow.keycli:register",
    "gc": "notebook_flow.lifecycle.gc:register",
    "pin": "notebook_flow.lifecycle.pins_cli:register_pin",
    "unpin": "notebook_flow.lifecycle.pins_cli:register_unpin",
    "check": "notebook_flow.lifecycle.cli:register_check",
    "export": "notebook_flow.lifecycle.cli:register_export",
    "import": "notebook_flow.lifecycle.cli:register_import",
}

#: What ``notebook-flow --help`` says of each command in :data:`EXTENSIONS` (its module is
#: not imported to list it).
EXTENSION_HELP: dict[str, str] = {
    "dashboard": "serve the dashboard on 127.0.0.1 (prints its URL, with a secret token)",
    "locks": "the locks held now; --break KEY removes a stuck holder's lock",
    "key": "show or import the signing key (share one with everyone using a store)",
    "gc": "remove expired results and leftovers; rules (--unreachable, --max-size, ...) "
    "show what else would go, --yes removes it",
    "pin": "never evict or prune entries (KEY or TASK); without one, list the pinned",
    "unpin": "let eviction and gc rules remove entries again (KEY or TASK)",
    "check": "verify every entry (mac, checksum); --fix quarantines bad ones",
    "export": "copy a task's entries (or --all) to another store, with their provenance",
    "import": "copy entries from another store into this one (verified, re-signed)",
}

Handler = Callable[[argparse.Namespace], int]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --------------------------------------------------------------------------- run


def _inject_parameters(nb: Any, parameters: dict[str, Any]) -> None:
    """Add a cell assigning ``parameters`` after the cell tagged ``parameters`` (papermill's
    convention), or first when there is none."""
    import nbformat

    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    tags = {"tags": ["injected-parameters"]}
    cell = nbformat.v4.new_code_cell(source, metadata=tags)  # type: ignore[no-untyped-call]
    cell.pop("id", None)
    index = next(
        (
            i + 1
            for i, c in enumerate(nb.cells)
            if "parameters" in c.get("metadata", {}).get("tags", [])
        ),
        0,
    )
    nb.cells = [
        c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])
    ]
    nb.cells.insert(index, cell)
    if nb.nbformat_minor >= 5:
        cell["id"] = f"injected-parameters-{index}"


def _parse_parameter(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise SystemExit(f"notebook-flow run: -p takes name=value, got {text!r}")
    try:
        value: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string
    return name, value


def _cell_status(cell: Any, tally: dict[str, Any]) -> str:
    """cached / computed for a ``%%task`` cell; reused / ran for another cell."""
    for out in cell.get("outputs", []):
        badge = out.get("metadata", {}).get("notebook_flow", {})
        if isinstance(badge, dict) and badge.get("badge") == "cached":
            return "cached"
    if cell.source.lstrip().startswith("%%task"):
        return "computed"
    runs, hits = tally.get("task_runs", 0), tally.get("task_hits", 0)
    return "reused" if runs and hits == runs else "ran"


def _first_line(source: str, width: int = 48) -> str:
    """The cell's first line of code: not a cell magic (``%%task --name x``), a comment or
    a blank line (the magic line itself when there is nothing else)."""
    lines = [ln.strip() for ln in source.splitlines() if ln.strip()]
    code = [ln for ln in lines if not ln.startswith(("%%", "#"))]
    line = (code or lines or [""])[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def run_tally(since: float) -> str:
    """In the notebook's kernel: what this process ran since ``since`` (epoch seconds), as
    JSON: task runs, task results reused (hits) and seconds they saved, and the seconds the
    ``%%task`` cells restored from the store saved. ``notebook-flow run`` asks after each
    cell (a silent user expression), so a plain cell that maps a task shows its hits too.

    >>> run_tally(time.time() - 60)  # doctest: +SKIP
    '{"task_runs": 14, "task_hits": 14, "task_saved": 20.1, "cell_saved": 0.0}'
    """
    import json

    from .metadata import registry

    tally: dict[str, Any] = {"task_runs": 0, "task_hits": 0, "task_saved": 0.0}
    tally["cell_saved"] = 0.0
    # From the process's own record of its runs, not the index: no DuckDB read per cell.
    for state, tags, saved in registry.runs_since(since):
        is_cell = _is_cell_run(tags)
        hit = state == RunState.CACHED
        tally["task_runs"] += not is_cell
        tally["task_hits"] += hit and not is_cell
        if hit:
            tally["cell_saved" if is_cell else "task_saved"] += saved or 0.0
    return json.dumps(tally)


def _is_cell_run(tags: Any) -> bool:
    """Whether a run's ``tags`` (a list, or NULL → NA) mark a ``%%task`` cell's run."""
    if isinstance(tags, str):
        return tags == "cell"
    try:
        return "cell" in list(tags)
    except TypeError:  # NA: a run without tags
        return False


class _Tally:
    """:func:`run_tally` asked with each cell's own execute request (a user expression,
    which the kernel evaluates right after the cell): no second round trip per cell, which
    cost 60 ms of wall-clock a cell on a busy machine."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.reply: Any = None

    def wrap(self, kc: Any) -> None:
        """Make ``kc.execute`` ask for the tally since :attr:`since`."""
        execute = kc.execute

        def with_tally(code: str, *args: Any, **kwargs: Any) -> Any:
            if self.since is not None and not kwargs.get("user_expressions"):
                expression = (
                    f"__import__('notebook_flow.cli', fromlist=['_']).run_tally({self.since!r})"
                )
                kwargs["user_expressions"] = {"nbflow_tally": expression}
            return execute(code, *args, **kwargs)

        kc.execute = with_tally

    def executed(self, cell: Any = None, cell_index: Any = None, execute_reply: Any = None) -> None:
        """nbclient's ``on_cell_executed`` hook: keep the reply."""
        self.reply = execute_reply

    def take(self) -> dict[str, Any]:
        """The tally of the cell that just ran ({} when the kernel cannot say)."""
        import json

        reply, self.reply = self.reply, None
        try:
            answer = reply["content"]["user_expressions"]["nbflow_tally"]
            if answer.get("status") != "ok":
                return {}
            tally: dict[str, Any] = json.loads(ast.literal_eval(answer["data"]["text/plain"]))
        except Exception:  # a kernel without notebook_flow, or one that died: no tally
            return {}
        return tally


def _tally_note(tally: dict[str, Any]) -> str | None:
    runs, hits = tally.get("task_runs", 0), tally.get("task_hits", 0)
    if not hits:
        return None
    note = f"{hits} of {runs} task results from the store"
    if tally.get("task_saved", 0.0) >= MIN_SAVING:
        # the runs' own durations added up: tasks that ran side by side count each
        note += f", {format_seconds(tally['task_saved'])} of computing saved"
    return note


def _summary(counts: dict[str, int], reused_cells: int, task_hits: int, saved: float) -> str:
    """``3 ran, 4 cached · from the store: 4 cells and 14 task results, 75.0 s of computing
    saved`` (the durations of the runs not repeated, added up)."""
    text = ", ".join(f"{v} {k}" for k, v in counts.items())
    if reused_cells or task_hits:
        parts = [f"{n} {what}{'' if n == 1 else 's'}" for n, what in (
            (reused_cells, "cell"), (task_hits, "task result")) if n]  # fmt: skip
        text += f" · from the store: {' and '.join(parts)}"
        if saved >= MIN_SAVING:
            text += f", {format_seconds(saved)} of computing saved"
    return text


def run_notebook(
    path: str,
    *,
    parameters: dict[str, Any] | None = None,
    store: str | None = None,
    output: str | None = None,
    timeout: float | None = None,
    kernel_name: str | None = None,
    cache_all: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """Execute a notebook in a fresh kernel with notebook_flow loaded; 0 when every cell ran.

    >>> run_notebook("notebooks/quickstart.ipynb", output="/tmp/out.ipynb")  # doctest: +SKIP
    0
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    from .config import _normalize_url, settings

    nb = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    if parameters:
        _inject_parameters(nb, parameters)
    store_url = _normalize_url(store or settings().store)
    folder = os.path.dirname(os.path.abspath(path))
    output = output or os.path.splitext(path)[0] + ".out.ipynb"
    env = dict(os.environ)
    env["NOTEBOOK_FLOW_STORE"] = store_url
    env["JPY_SESSION_NAME"] = os.path.abspath(path)  # notebook identity in the metadata
    if cache_all:  # every code cell runs as %%task (see notebook_flow.cells.auto)
        env["NOTEBOOK_FLOW_AUTO_CELLS"] = "1"
    kernel_name = kernel_name or nb.metadata.get("kernelspec", {}).get("name") or "python3"
    # Load the extension in the kernel unless the notebook does (IPython would then say
    # "already loaded" in the notebook's output).
    loads_itself = any(
        "%load_ext notebook_flow" in c.source for c in nb.cells if c.cell_type == "code"
    )
    tallies = _Tally()
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        resources={"metadata": {"path": folder}},
        extra_arguments=[] if loads_itself else ["--ext=notebook_flow"],
        on_cell_executed=tallies.executed,
    )
    code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]
    echo(f"notebook-flow run {path}  (kernel {kernel_name}, store {store_url})")
    counts: dict[str, int] = {}
    reused_cells, task_hits, saved = 0, 0, 0.0
    rc = 0
    t_start = time.perf_counter()
    # The kernel's own log (start-up chatter, a crash's last words) goes to a file, shown
    # only when the kernel dies.
    with tempfile.TemporaryFile(mode="w+", prefix="notebook-flow-kernel-") as kernel_log:
        try:
            client.reset_execution_trackers()
            with client.setup_kernel(env=env, stderr=kernel_log):
                kc = client.kc
                assert kc is not None
                tallies.wrap(kc)
                info = client.wait_for_reply(kc.kernel_info())
                if info is not None and "language_info" in info["content"]:
                    nb.metadata["language_info"] = info["content"]["language_info"]
                for n, index in enumerate(code_cells, 1):
                    cell = nb.cells[index]
                    t0, tallies.since = time.perf_counter(), time.time()
                    error: list[str] = []
                    tally: dict[str, Any] = {}
                    try:
                        count = client.code_cells_executed + 1
                        client.execute_cell(cell, index, execution_count=count)
                        elapsed = time.perf_counter() - t0
                        tally = tallies.take()
                        status = _cell_status(cell, tally)
                    except CellExecutionError as exc:
                        status, rc = "failed", 1
                        error = [_ANSI.sub("", str(exc)).strip().splitlines()[-1]]
                    except CellTimeoutError:
                        status, rc = "timed out", 1
                        error = [f"the cell ran longer than --timeout {timeout} s"]
                    except DeadKernelError:
                        status, rc = "kernel died", 1
                        error = ["the kernel process exited (crash, out of memory, or killed)"]
                        error += _tail(kernel_log)
                    if status in ("failed", "timed out", "kernel died"):
                        elapsed = time.perf_counter() - t0
                    counts[status] = counts.get(status, 0) + 1
                    reused_cells += status in ("cached", "reused")
                    task_hits += tally.get("task_hits", 0)
                    saved += tally.get("task_saved", 0.0) + tally.get("cell_saved", 0.0)
                    echo(
                        f"  [{n:>{len(str(len(code_cells)))}}/{len(code_cells)}] cell "
                        f"{index + 1:<3} {status:<11} {elapsed:7.2f} s  "
                        f"{_first_line(cell.source)}"
                    )
                    note = _tally_note(tally)
                    if note:
                        echo(f"{'':>{len(str(len(code_cells))) * 2 + 6}}↳ {note}")
                    if rc:
                        for line in error:
                            echo(f"    {line}")
                        break
                client.set_widgets_metadata()
        except KeyboardInterrupt:
            rc = 130
            echo("  interrupted: what finished is stored; run the same command again to resume")
        finally:
            nbformat.write(nb, output)  # type: ignore[no-untyped-call]
    summary = _summary(counts, reused_cells, task_hits, saved)
    verdict = "done" if rc == 0 else "stopped"
    echo(
        f"{verdict}: {sum(counts.values())}/{len(code_cells)} cells in "
        f"{time.perf_counter() - t_start:.1f} s ({summary}); wrote {output}"
    )
    if rc:
        echo("re-run the same command to resume: finished cells load from the store")
    return rc


def _tail(log: Any, lines: int = 5) -> list[str]:
    log.flush()
    log.seek(0)
    text = [ln.rstrip() for ln in log.read().splitlines() if ln.strip()]
    text = [ln for ln in text if "without encryption" not in ln]
    return ["kernel log: " + ln for ln in text[-lines:]]


def _skip_iri_grammar() -> None:
    """Keep jsonschema from building the RFC 3987 grammar in this process.

    ``nbformat`` imports ``jsonschema``, which imports ``rfc3987_syntax`` when it is
    installed (Jupyter's server extras pull it in) to check the "iri" string format; that
    module builds an Earley parser at import: 1.5 s of CPU, 7 s on a busy 2-core machine,
    paid by every ``notebook-flow run`` before its first cell. Notebook schemas use no
    "iri" format, so the command's own process goes without (jsonschema's documented
    behaviour when the package is absent). Only the CLI's process: never a user's.
    """
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


def _cmd_run(args: argparse.Namespace) -> int:
    _skip_iri_grammar()
    parameters = dict(_parse_parameter(p) for p in args.parameter or [])
    return run_notebook(
        args.notebook,
        parameters=parameters,
        store=args.store,
        output=args.output,
        timeout=args.timeout,
        kernel_name=args.kernel,
        cache_all=args.cache_all,
    )


# --------------------------------------------------------------------------- store commands


def clear_entries(
    store: ResultStore, *, task: str | None = None, expired: bool = False
) -> tuple[int, int]:
    """Delete stored results (all, one task's or named cell's, or the expired ones).

    Returns ``(count, bytes)``. ``task`` matches a task name (``load``), a task identity
    (``mymodule:load``) or a ``%%task --name`` (``cell:name`` or just ``name``).
    """
    now = time.time()
    chosen = []
    # Unverified entries too: deleting believes nothing they say (a miss either way).
    for manifest in store.iter_manifests(verified=False):
        if expired and not manifest.expired(now):
            continue
        if task is not None and task not in (manifest.task, manifest.task.rsplit(":", 1)[-1]):
            continue
        chosen.append(manifest)
    keys, size = [], 0
    for manifest in chosen:
        if store.delete(manifest.key):
            keys.append(manifest.key)
            size += manifest.size
    if keys:
        try:
            from .config import get_metadata

            get_metadata(store).remove_cache_entries(keys)
        except Exception:  # the index is rebuilt from manifests if it falls behind
            import logging

            logging.getLogger("notebook_flow").warning("could not update the index", exc_info=True)
    return len(keys), size


def _store(args: argparse.Namespace) -> ResultStore:
    from .config import configure, get_store

    if args.store:
        configure(store=args.store)
    return get_store()


def _cmd_history(args: argparse.Namespace) -> int:
    from .config import get_metadata, wait_startup

    store = _store(args)
    wait_startup(store)
    df = get_metadata(store).history(task=args.task, limit=args.limit)
    if df.empty:
        print("no runs recorded in", store.url)
        return 0
    print(format_history(df).to_string(index=False))
    return 0


def format_history(df: Any) -> Any:
    """The run history as people read it: local times, durations in ms / s / min, and how
    many attempts a run took (``2`` for a run that failed once and was retried).

    Shared by ``notebook-flow history`` and ``%flow history``.
    """
    out = df[[c for c in ("created", "task", "state") if c in df]].copy()
    if "created" in out:
        created = out["created"].dt.tz_convert(None) if out["created"].dt.tz else out["created"]
        out["created"] = created.dt.strftime("%Y-%m-%d %H:%M:%S")
    if "attempt" in df:
        out["attempts"] = df["attempt"].map(lambda n: "" if _missing(n) else str(int(n)))
    if "duration" in df:
        out["duration"] = df["duration"].map(lambda v: "" if _missing(v) else format_seconds(v))
    if "saved" in df:
        out["saved"] = df["saved"].map(
            lambda v: "" if _missing(v) or v < MIN_SAVING else format_seconds(v)
        )
    if "error" in df:
        out["error"] = df["error"].map(lambda e: "" if not isinstance(e, str) else _clip(e, 60))
    return out


def _missing(value: Any) -> bool:
    """None or NaN (a column of numbers from DuckDB has NaN where SQL had NULL)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_stats(stats: dict[str, Any], store_url: str) -> str:
    """``stats()`` as people read it: counts, a percentage, a duration and a size.

    >>> print(format_stats({"runs": 10, "hits": 7, "misses": 3, "failures": 0,
    ...     "crashed": 0, "in_flight": 0, "hit_rate": 0.7, "time_saved": 83.2,
    ...     "bytes_stored": 3_400_000, "entries": 12, "tasks": 4}, ".notebook_flow"))
    store       .notebook_flow
    runs        10 (7 hits, 3 misses, 0 failed, 0 crashed)
    hit rate    70.0%
    time saved  83.2 s
    stored      12 results of 4 tasks and cells, 3.4 MB
    """
    rate = stats.get("hit_rate")
    runs = (
        f"{stats['runs']} ({stats['hits']} hits, {stats['misses']} misses, "
        f"{stats['failures']} failed, {stats['crashed']} crashed"
    )
    if stats.get("in_flight"):
        runs += f", {stats['in_flight']} running"
    rows = [
        ("store", store_url),
        ("runs", runs + ")"),
        ("hit rate", "n/a (no cached task ran yet)" if rate is None else f"{rate:.1%}"),
        ("time saved", format_saved(stats["time_saved"], stats.get("hits"))),
        (
            "stored",
            f"{stats['entries']} results of {stats['tasks']} tasks and cells, "
            f"{format_size(stats['bytes_stored'])}",
        ),
    ]
    return "\n".join(f"{name:<11} {value}" for name, value in rows)


def _cmd_stats(args: argparse.Namespace) -> int:
    from .config import get_metadata, wait_startup

    store = _store(args)
    wait_startup(store)
    print(format_stats(get_metadata(store).stats(), store.url))
    return 0


def _cmd_clear(args: argparse.Namespace) -> int:
    chosen = [bool(args.task), args.expired, args.all]
    if sum(chosen) != 1:
        print("notebook-flow clear: give one of TASK, --expired or --all", file=sys.stderr)
        return 2
    store = _store(args)
    if args.all and not args.yes:
        answer = (
            input(f"remove every stored result in {store.url}? [y/N] ")
            if sys.stdin.isatty()
            else ""
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed (add -y to skip this question)")
            return 1
    count, size = clear_entries(store, task=args.task, expired=args.expired)
    print(f"removed {count} stored results ({size / 1e6:.1f} MB)")
    return 0


# --------------------------------------------------------------------------- parser


def _add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", help="result store URL (default: $NOTEBOOK_FLOW_STORE or ./.notebook_flow)"
    )


def _load_extension(name: str, subparsers: Any) -> None:
    target = EXTENSIONS[name]
    module_name, _, function = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        module = None
    register = getattr(module, function, None)
    if register is None:
        parser = subparsers.add_parser(
            name, help=f"(not available: {module_name} is not installed)"
        )
        parser.set_defaults(func=lambda args: _unavailable(name, module_name))
        return
    register(subparsers)


def _unavailable(name: str, module_name: str) -> int:
    print(
        f"notebook-flow {name}: not available in this installation ({module_name} is missing)",
        file=sys.stderr,
    )
    return 2


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the extension module of ``command`` is imported."""
    parser = argparse.ArgumentParser(
        prog="notebook-flow",
        description="Cached, durable notebooks: run, resume, inspect.",
        epilog=(
            "Every command takes --store URL (default: $NOTEBOOK_FLOW_STORE or "
            "./.notebook_flow). `notebook-flow COMMAND --help` lists a command's options."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="execute a notebook in a fresh kernel; running it again resumes from the store",
        description=(
            "Execute NOTEBOOK headless with notebook_flow loaded, one line per cell "
            "(cached / computed / reused / ran / failed, time, task results reused), and "
            "write the executed notebook. Run it again after a failure, a crash or Ctrl-C: "
            "finished %%%%task cells and task results load from the store."
        ),
    )
    p.add_argument("notebook", help="the .ipynb file")
    p.add_argument(
        "-p",
        "--parameter",
        action="append",
        metavar="NAME=VALUE",
        help="set a parameter (after the cell tagged 'parameters'); repeatable",
    )
    p.add_argument(
        "--output", "-o", help="where to write the executed notebook (default NOTEBOOK.out.ipynb)"
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds a cell may run (default: no limit)"
    )
    p.add_argument("--kernel", help="kernel name (default: the notebook's)")
    p.add_argument(
        "--cache-all",
        action="store_true",
        help="cache every code cell as if it began with %%%%task (%%%%task --off excludes one)",
    )
    _add_store_option(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "history", help="recent runs, newest first: state, attempts, duration, time saved"
    )
    p.add_argument("task", nargs="?", help="only this task or named cell")
    p.add_argument("-n", "--limit", type=int, default=30)
    _add_store_option(p)
    p.set_defaults(func=_cmd_history)

    p = sub.add_parser("stats", help="runs, hits, misses, hit rate, time saved, bytes stored")
    _add_store_option(p)
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("clear", help="remove stored results: one task's, the expired, or all")
    p.add_argument("task", nargs="?", help="a task or %%%%task --name")
    p.add_argument("--expired", action="store_true", help="only the expired results")
    p.add_argument("--all", action="store_true", help="every result in the store")
    p.add_argument("-y", "--yes", action="store_true", help="don't ask")
    _add_store_option(p)
    p.set_defaults(func=_cmd_clear)

    for name in EXTENSIONS:
        if name == command:
            _load_extension(name, sub)
        else:  # listed in --help without importing its module
            module = EXTENSIONS[name].partition(":")[0]
            placeholder = sub.add_parser(name, help=EXTENSION_HELP.get(name, f"(from {module})"))
            placeholder.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``notebook-flow`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(args_list)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
