"""The IPython extension: ``%load_ext notebook_flow`` gives ``%%task`` and ``%flow``.

This module only parses options and prints; the work is done by :mod:`notebook_flow.cells`
(``%%task``) and the public API (``%flow``). It is imported by ``%load_ext`` and nothing
heavy is imported until a magic is used, so loading takes a few milliseconds.

Load it in every kernel, without a ``%load_ext`` line, from an IPython profile
(``~/.ipython/profile_default/ipython_config.py``)::

    c.InteractiveShellApp.extensions = ["notebook_flow"]

or for one kernel: ``ipython kernel --ext=notebook_flow``. ``%reload_ext notebook_flow`` and
``%unload_ext notebook_flow`` work as usual.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import shlex
import threading
import time
from typing import TYPE_CHECKING, Any

# This module is imported only from inside IPython (by %load_ext), so IPython is loaded.
from IPython.core.error import UsageError  # noqa: TID253
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class  # noqa: TID253

from . import _identity
from .figures import format_size

if TYPE_CHECKING:
    from .cells import CellRunner

__all__ = ["FlowMagics", "load_ipython_extension", "unload_ipython_extension"]

_FLOW_COMMANDS = (
    "status",
    "history",
    "stats",
    "clear",
    "gc",
    "wait",
    "locks",
    "config",
    "dashboard",
    "explain",
    "auto",
    "help",
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as IPython usage errors instead of exiting."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message}")


def _task_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="%%task", add_help=False)
    p.add_argument("--name", "-n", help="a stable name for the cell (history, explain, clear)")
    p.add_argument("--expire", help="how long the result stays valid: 90s, 10m, 1h, 1d, 2w")
    p.add_argument("--refresh", action="store_true", help="recompute and overwrite the result")
    p.add_argument("--inputs", help="the only names to key on, comma-separated (no analysis)")
    p.add_argument("--outputs", help="the only names to store, comma-separated (no analysis)")
    p.add_argument("--lock", action="store_true", help="one kernel computes, the others wait")
    p.add_argument("--off", action="store_true", help="run this cell plain (with %%flow auto on)")
    p.add_argument("--pin", action="store_true", help="never evict or prune this cell's result")
    # Set by %flow auto on the cells it wraps: cheap cells then run plain (not in the help).
    p.add_argument("--auto", action="store_true", help=argparse.SUPPRESS)
    return p


_TASK_PARSER = _task_parser()


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.replace(" ", ",").split(",") if n.strip())
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"not variable names: {', '.join(bad)}")
    return names


@magics_class
class FlowMagics(Magics):
    """``%%task`` and ``%flow``; one instance per shell."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._runner: CellRunner | None = None
        self.await_transformer = functools.partial(_await_cell, shell)
        self.auto_transformer = functools.partial(_auto_cell, self)

    @property
    def runner(self) -> CellRunner:
        if self._runner is None:
            from .cells import CellRunner

            self._runner = CellRunner(self.shell)
        return self._runner

    def pre_run_cell(self, info: Any) -> None:
        """Remember the id of the cell about to run (metadata only, never part of a key)."""
        if self._runner is not None and self._runner.depth:
            return  # the body of a %%task cell: same cell
        _identity.set_current_cell(getattr(info, "cell_id", None))

    @cell_magic
    def task(self, line: str, cell: str) -> Any:
        """Cache a cell: restore its variables and outputs when nothing it reads changed.

        The key is the cell's code (comments and spacing don't count) and the values it
        reads, functions by their deep source; never the cell's position or number. On a
        hit the variables it defines or changes come back, its printed and displayed
        output is shown again, and one line says when it was computed.

        Example::

            %%task --expire 1d
            df = expensive_join(a, b)
            df.describe()
        """
        __tracebackhide__ = True
        from .cells import CellOptions, parse_duration

        args = _TASK_PARSER.parse_args(shlex.split(line))
        try:
            options = CellOptions(
                name=args.name,
                expire=parse_duration(args.expire) if args.expire else None,
                refresh=args.refresh,
                inputs=_names(args.inputs),
                outputs=_names(args.outputs),
                lock=args.lock,
                off=args.off,
                auto=args.auto,
                pin=args.pin,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return self.runner.run(options, cell)

    @line_magic
    def flow(self, line: str) -> Any:
        """Look at and manage notebook_flow from a notebook.

        %flow status                        running tasks, the store, the last cached cell
        %flow history [TASK] [-n N]         recent runs (a DataFrame, newest first)
        %flow stats                         hits, misses, failures, time saved, bytes stored
        %flow clear [TASK | --expired | --all] [-y]
                                            remove stored results (of a task or named cell)
        %flow gc [--unreachable] [--older-than 30d] [--unused-for 14d] [--max-size 10GB]
                 [--task NAME] [--yes]      expired results and leftovers; with rules, a
                                            table of what else would go (--yes: remove it)
        %flow wait [--timeout S]            wait for the tasks submitted from this kernel
        %flow locks                         locks held now
        %flow config [key=value ...]        show or change settings (store=..., workers=...)
        %flow dashboard [--server]          open the dashboard (--server: on 127.0.0.1)
        %flow explain [NAME]                why the last run of a cell (or task) missed
        %flow auto [on | off]               treat every code cell as %%task (%%task --off
                                            excludes one); without a word: show the mode

        ``%%task`` caches a cell: see ``%%task?``.
        """
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%flow: {exc}") from None
        command, rest = (words[0], words[1:]) if words else ("status", [])
        if command not in _FLOW_COMMANDS:
            raise UsageError(
                f"%flow: unknown command {command!r}; use one of {', '.join(_FLOW_COMMANDS)}"
            )
        handler = getattr(self, f"_flow_{command}")
        return handler(rest)

    task.__doc__ = (task.__doc__ or "") + "\n" + _TASK_PARSER.format_help()

    # -- %flow subcommands -----------------------------------------------------------------

    def _flow_help(self, rest: list[str]) -> None:
        print(inspect.getdoc(FlowMagics.flow))

    def _flow_status(self, rest: list[str]) -> None:
        from .config import get_store

        store = get_store()
        print(f"store: {store.url}")
        futures = _in_flight()
        if futures is None:
            print("background tasks: the worker is not available in this version")
        elif not futures:
            print("background tasks: none running")
        else:
            print(f"background tasks: {len(futures)} not finished")
            for fut in futures[:20]:
                print(f"  {_describe(fut)}")
        if self._runner is not None and self._runner.last is not None:
            print(f"last %%task: {self._runner.last}")

    def _flow_history(self, rest: list[str]) -> Any:
        from .api import history

        task, limit = None, 20
        args = list(rest)
        while args:
            word = args.pop(0)
            if word in ("-n", "--limit"):
                limit = _int_arg(word, args)
            elif task is None:
                task = word
            else:
                raise UsageError("usage: %flow history [TASK] [-n N]")
        runs = history(task=task, limit=limit)
        columns = ["created", "task", "state", "attempt", "duration", "saved", "error"]
        columns += ["explain", "cell"]  # attempt: 3 for a run that failed twice, then ran
        return runs[[c for c in columns if c in runs.columns]]

    def _flow_stats(self, rest: list[str]) -> None:
        from .api import stats
        from .figures import format_saved

        s = stats()
        rate = "n/a" if s.get("hit_rate") is None else f"{s['hit_rate']:.0%}"
        print(
            f"runs {s['runs']} · hits {s['hits']} · misses {s['misses']} · hit rate {rate} · "
            f"failed {s['failures']} · crashed {s['crashed']}\n"
            f"time saved {format_saved(s['time_saved'], s['hits'])} · "
            f"{s['entries']} stored results, "
            f"{format_size(s['bytes_stored'])}"
        )

    def _flow_clear(self, rest: list[str]) -> None:
        from .cli import clear_entries
        from .config import get_store

        yes = "-y" in rest or "--yes" in rest
        words = [w for w in rest if w not in ("-y", "--yes")]
        everything, expired = "--all" in words, "--expired" in words
        tasks = [w for w in words if not w.startswith("-")]
        if sum([everything, expired, bool(tasks)]) != 1 or len(tasks) > 1:
            raise UsageError("usage: %flow clear TASK | --expired | --all [-y]")
        if everything and not yes:
            print("%flow clear --all removes every stored result of this store; add -y to do it")
            return
        removed, size = clear_entries(
            get_store(), task=tasks[0] if tasks else None, expired=expired
        )
        print(f"removed {removed} stored results ({format_size(size)})")

    def _flow_gc(self, rest: list[str]) -> None:
        from .config import get_store
        from .lifecycle import gc

        parser = gc.build_parser("%flow gc")
        try:
            args = parser.parse_args(rest)
        except SystemExit:  # argparse printed the problem (or --help)
            return
        if gc.run(get_store(), args) != 0:
            raise UsageError("%flow gc: see the message above")

    def _flow_wait(self, rest: list[str]) -> None:
        timeout = _float_arg("--timeout", rest[1:]) if rest[:1] == ["--timeout"] else None
        futures = _in_flight()
        if futures is None:
            print("background tasks: the worker is not available in this version")
            return
        if not futures:
            print("nothing to wait for")
            return
        from .futures import wait

        done, not_done = wait(futures, timeout=timeout)
        failed = sum(1 for f in done if f.state.is_failed())
        print(f"{len(done)} finished ({failed} failed), {len(not_done)} still running")

    def _flow_locks(self, rest: list[str]) -> Any:
        from .config import get_metadata, get_store, wait_startup

        store = get_store()
        wait_startup(store)
        return get_metadata(store).locks()

    def _flow_config(self, rest: list[str]) -> None:
        from . import config

        changes: dict[str, Any] = {}
        for word in rest:
            key, sep, value = word.partition("=")
            if not sep:
                raise UsageError("usage: %flow config [key=value ...]")
            changes[key.strip()] = _config_value(key.strip(), value)
        if changes:
            try:
                config.configure(**changes)
            except ValueError as exc:  # ConfigurationError (also a TypeError for a bad type)
                raise UsageError(str(exc)) from None
            except TypeError:
                raise UsageError(f"unknown setting among {', '.join(changes)}") from None
        s = config.settings()
        for field in ("store", "workers", "lock_lease", "lock_timeout", "log_misses", "auto_cells"):
            print(f"{field} = {getattr(s, field)!r}")
        print("signing = on (always; key from configure)" if s.signing_key else "signing = on")

    def _flow_dashboard(self, rest: list[str]) -> Any:
        try:
            from .dashboard import show
        except ImportError:
            print("the dashboard is not available in this version")
            return None
        return show(server="--server" in rest)

    def _flow_auto(self, rest: list[str]) -> None:
        from . import config

        if rest:
            if len(rest) != 1 or rest[0].lower() not in ("on", "off"):
                raise UsageError("usage: %flow auto [on | off]")
            config.configure(auto_cells=rest[0].lower() == "on")
        state = "on" if config.settings().auto_cells else "off"
        print(
            f"auto caching is {state}: "
            + (
                "every code cell runs as %%task (%%task --off excludes one)"
                if state == "on"
                else "only cells that begin with %%task are cached"
            )
        )

    def _flow_explain(self, rest: list[str]) -> None:
        runner = self._runner
        name = rest[0] if rest else None
        if name is None:
            if runner is None or runner.last is None:
                print("no %%task cell has run in this kernel yet")
            else:
                print(runner.last)
            return
        if runner is not None and name in runner.reports:
            print(runner.reports[name])
            return
        from .api import history

        runs = history(task=name, limit=20)
        if runs.empty:
            print(f"no runs of {name!r} were recorded")
            return
        row = runs.iloc[0]
        reason = row.get("explain") if "explain" in runs.columns else None
        print(f"task `{name}`: last run {row.get('state')}" + (f"\n  - {reason}" if reason else ""))


# --------------------------------------------------------------------------- helpers


def _in_flight() -> list[Any] | None:
    """The background task futures of this process, or None without a worker."""
    try:
        from . import runners
    except ImportError:
        return None
    for name in ("running", "in_flight"):
        fn = getattr(runners, name, None)
        if callable(fn):
            return list(fn())
    return None


def _describe(fut: Any) -> str:
    try:
        from .futures import describe

        return describe(fut)
    except Exception:
        return repr(fut)


def _int_arg(flag: str, args: list[str]) -> int:
    if not args or not args[0].isdigit():
        raise UsageError(f"{flag} needs a number")
    return int(args.pop(0))


def _float_arg(flag: str, args: list[str]) -> float:
    try:
        return float(args[0])
    except (IndexError, ValueError):
        raise UsageError(f"{flag} needs a number of seconds") from None


def _config_value(key: str, text: str) -> Any:
    if key in ("workers",):
        return int(text)
    if key in ("lock_lease", "lock_timeout"):
        return float(text)
    if key in ("log_misses", "auto_cells"):
        return text.lower() in ("1", "true", "yes", "on")
    return text


# --------------------------------------------------------------------------- loading


class _Inner(threading.local):
    depth = 0


_inner = _Inner()


def _auto_cell(magics: FlowMagics, lines: list[str]) -> list[str]:
    """An input transformer: with ``%flow auto on``, every code cell runs as ``%%task``.

    Cells that start with a cell magic (``%%task``, ``%%bash``, ``%%time``, ...) are left as
    they are, and so is the body of a ``%%task`` cell being run (the runner's depth). The
    magic decides per cell whether caching pays off and is faithful (see
    :mod:`notebook_flow.cells.auto`); line magics and ``!`` lines are transformed by IPython
    inside the body as usual.
    """
    if not lines or _inner.depth or (magics._runner is not None and magics._runner.depth):
        return lines
    from .config import settings

    if not settings().auto_cells:
        return lines
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None or first.lstrip().startswith("%%"):
        return lines
    return ["%%task --auto\n", *lines]


def _await_cell(shell: Any, lines: list[str]) -> list[str]:
    """An input transformer: a ``%%task`` cell with top-level ``await`` runs uncached.

    Cell magics run synchronously, so such a cell cannot run inside ``%%task``; dropping
    the magic line lets IPython run it as the async cell it is, after a note.
    """
    if not lines or not lines[0].lstrip().startswith("%%task"):
        return lines
    body = "".join(lines[1:])
    if "await" not in body and "async" not in body:
        return lines
    from .cells import _parse, _top_level_await

    _inner.depth += 1  # transforming the body: not a new cell for the auto transformer
    try:
        if not _top_level_await(_parse(shell.transform_cell(body))):
            return lines
    except SyntaxError:
        return lines
    finally:
        _inner.depth -= 1
    note = (
        "__import__('notebook_flow.cells', fromlist=['_note'])._note("
        "'running uncached: this cell uses top-level `await`, which %%task cannot run; move "
        "the awaits into an async function to cache it.')\n"
    )
    return [note, *lines[1:]]


def load_ipython_extension(shell: Any) -> None:
    """Register ``%%task`` and ``%flow`` (``%load_ext notebook_flow``)."""
    unload_ipython_extension(shell)  # loading twice must not register twice
    magics = FlowMagics(shell)
    shell.register_magics(magics)
    shell.events.register("pre_run_cell", magics.pre_run_cell)
    # The auto transformer runs first: the await transformer then unwraps an async cell.
    shell.input_transformers_cleanup.append(magics.auto_transformer)
    shell.input_transformers_cleanup.append(magics.await_transformer)
    _loaded[id(shell)] = magics
    _OURS.addFilter(_QUIET)
    _preload_in_background(shell)


class _QuietInNotebooks(logging.Filter):
    """In a notebook, notebook_flow's INFO and DEBUG lines (a miss explained, an
    eviction) show only when its own logger asks for them
    (``logging.getLogger("notebook_flow").setLevel("INFO")``), not because the root
    logger does: ``logging.basicConfig(level=logging.INFO)`` is how a notebook turns on
    *its own* log lines, and ours would become part of its cells' outputs, which then
    differ from a plain run's. Warnings always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _OURS.level != logging.NOTSET


_OURS = logging.getLogger("notebook_flow")


_QUIET = _QuietInNotebooks()


def _preload_in_background(shell: Any) -> None:
    """Import what the first task run needs while the user reads or types, or while the
    next cell runs, instead of inside the first ``%%task`` or ``.map`` cell.

    DuckDB (~0.2 s in a kernel, where it also imports ipywidgets) and filelock import in a
    side thread: they never import this package, so the main thread importing them or us
    meanwhile only waits for a module to finish, never for a cycle. Our own modules do
    not: the package's ``__init__`` modules re-export their submodules, and two threads
    importing such a cycle in different orders make Python hand one of them a partially
    initialized module (CI saw ``cannot import name '_MISS' from partially initialized
    module 'notebook_flow.tasks.call'`` in the first ``%%task`` cell). They are imported
    in the main thread instead, from the kernel's event loop once it is idle (~0.1 s); a
    cell that arrives first waits for that, as it would have for its own imports.
    """

    kernel = getattr(shell, "kernel", None)

    def preload() -> None:
        try:
            import duckdb  # noqa: F401
            import filelock  # noqa: F401
        except Exception:  # the first real use reports it
            pass
        if kernel is None:
            return
        # The kernel's loop exists once the kernel has started (extensions load before).
        for _ in range(100):
            loop = getattr(kernel, "io_loop", None)
            if loop is not None:
                try:
                    loop.add_callback(_import_ours)  # thread-safe; runs in the main thread
                except Exception:  # a closed loop: the first real use imports them
                    pass
                return
            time.sleep(0.05)

    # Not a daemon: an interpreter that exits (a script that only loads the extension)
    # waits for it, where finalizing under a thread inside an extension import aborts.
    threading.Thread(target=preload, name="notebook_flow-preload", daemon=False).start()


def _import_ours() -> None:
    try:
        from . import cells, runners, storage, tasks  # noqa: F401
    except Exception:  # the first real use reports it
        pass


def unload_ipython_extension(shell: Any) -> None:
    """Remove what :func:`load_ipython_extension` registered (``%unload_ext notebook_flow``)."""
    magics = _loaded.pop(id(shell), None)
    if magics is None:
        return
    if not _loaded:
        _OURS.removeFilter(_QUIET)
    manager = shell.magics_manager
    manager.magics["cell"].pop("task", None)
    manager.magics["line"].pop("flow", None)
    manager.registry.pop(type(magics).__name__, None)
    try:
        shell.events.unregister("pre_run_cell", magics.pre_run_cell)
    except ValueError:
        pass
    for transformer in (magics.auto_transformer, magics.await_transformer):
        while transformer in shell.input_transformers_cleanup:
            shell.input_transformers_cleanup.remove(transformer)


_loaded: dict[int, FlowMagics] = {}
