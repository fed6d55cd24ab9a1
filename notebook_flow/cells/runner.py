"""Running a ``%%task`` cell: look its key up, restore a hit or compute and commit a miss.

Step 3 of :mod:`notebook_flow.cells`: :class:`CellRunner` and the helpers it uses to
explain, record and report each run.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import re
import sys
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from notebook_flow import _identity
from notebook_flow.cache_policies import combine_components
from notebook_flow.errors import (
    MetadataError,
    PayloadCorruptError,
    SerializationError,
    StorageError,
    UnhashableError,
)
from notebook_flow.hashing import lineage
from notebook_flow.states import RunState
from notebook_flow.states import format_seconds as _seconds

from .analysis import CellAnalysis, _bound_by_import, analyze_cell
from .auto import auto_plain_reason, worth_storing
from .capture import _Capture, _patch_instance, replay
from .key import CellOptions, cell_components, input_names

if TYPE_CHECKING:
    from notebook_flow.storage import Manifest, ResultStore

__all__ = ["CELL_FORMAT", "CellReport", "CellRunner", "unstorable"]

logger = logging.getLogger("notebook_flow")

#: Bumped when the stored layout of a cell result changes; older results then miss.
CELL_FORMAT = 1

# IPython's output history changes on every execution: keying on it would never hit.
_HISTORY_NAME = re.compile(r"^(_+|_i+|_\d+|_i\d+|_oh|_ih|_dh|In|Out)$")


_CHEAP_REASON = "ran plain: cheaper to run than to store and restore (%flow auto)"

# --------------------------------------------------------------------------- the runner

_MISS: Any = object()
_DEFINITION_TYPES = (
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
)


@dataclasses.dataclass(frozen=True)
class CellReport:
    """What the last run of a cell did: ``%flow explain`` prints it."""

    name: str
    status: str  # "cached" | "computed" | "failed" | "uncached" | "not stored"
    reasons: tuple[str, ...]
    key: str | None = None
    duration: float | None = None

    def __str__(self) -> str:
        return f"cell `{self.name}`: {self.status}" + "".join(f"\n  - {r}" for r in self.reasons)


@dataclasses.dataclass
class _Cell:
    """One ``%%task`` execution on its way through :class:`CellRunner`."""

    options: CellOptions
    body: str
    analysis: CellAnalysis
    name: str
    identity: str
    inputs: list[str] = dataclasses.field(default_factory=list)
    components: dict[str, str] = dataclasses.field(default_factory=dict)
    key: str | None = None
    store: ResultStore | None = None
    reasons: list[str] = dataclasses.field(default_factory=list)
    run_id: str = dataclasses.field(default_factory=_identity.new_run_id)


class CellRunner:
    """Runs the ``%%task`` cells of one IPython shell (see the module docstring)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.last: CellReport | None = None
        self.reports: dict[str, CellReport] = {}
        self.busy = False
        self.depth = 0  # > 0 while a %%task cell runs (its body is not a new cell)
        self._seen: dict[str, dict[str, str]] = {}  # components last used, by cell id / name

    # -- entry point -----------------------------------------------------------------------

    def run(self, options: CellOptions, body: str) -> Any:
        """Run one ``%%task`` cell: restore it from the store or compute and commit it."""
        __tracebackhide__ = True
        self.depth += 1
        try:
            return self._run(options, body)
        finally:
            self.depth -= 1

    def _run(self, options: CellOptions, body: str) -> Any:
        __tracebackhide__ = True
        if options.off:
            return self._plain(body)
        code = self.shell.transform_cell(body)
        try:
            analysis = analyze_cell(code)
        except SyntaxError as exc:
            raise self._syntax_error(exc, code) from None
        name = options.name or f"cell {analysis.code_hash[:8]}"
        identity = f"cell:{options.name}" if options.name else f"cell:{analysis.code_hash[:16]}"
        cell = _Cell(options, body, analysis, name, identity)
        explicit = options.inputs is not None or options.outputs is not None
        if options.auto:
            why = auto_plain_reason(analysis)
            if why is not None:
                return self._uncached(cell, why) if why else self._plain(body)
        if analysis.opaque and not explicit:
            return self._uncached(
                cell,
                f"this cell {' and '.join(analysis.opaque)}, so the names it reads and writes "
                "cannot be known from its code. Give them with --inputs a,b --outputs x,y to "
                "cache it",
            )
        ns = self.shell.user_ns
        if options.inputs is not None:
            cell.inputs = list(options.inputs)
        else:
            history = [n for n in analysis.reads if _HISTORY_NAME.match(n) and n in ns]
            if history:
                used = ", ".join(f"`{n}`" for n in history)
                return self._uncached(
                    cell, f"it reads IPython's output history ({used}), which changes every run"
                )
            cell.inputs = input_names(analysis, ns, self.shell.user_ns_hidden)
        try:
            cell.components = cell_components(analysis, ns, cell.inputs, options.outputs)
        except UnhashableError as exc:
            return self._uncached(
                cell,
                f"{exc} Pass the names to key on with --inputs, or register a fingerprint "
                "with notebook_flow.hashing.register_fingerprint",
            )
        cell.key = combine_components(identity, cell.components)
        from notebook_flow.config import get_store

        cell.store = get_store()
        self.busy = True
        try:
            if not options.refresh:
                restored = self._restore(cell)
                if restored is not _MISS:
                    return restored
            self._explain_miss(cell)
            with self._locked(cell) as lease:
                if lease is not None and not options.refresh:
                    restored = self._restore(cell)  # the holder before us may have stored it
                    if restored is not _MISS:
                        return restored
                return self._compute(cell, lease)
        finally:
            self.busy = False
            for ref in self._refs(cell):
                self._seen[ref] = cell.components

    def _syntax_error(self, exc: SyntaxError, code: str) -> SyntaxError:
        """Show a syntax error in the body like IPython shows one in a cell: no frames."""
        shell = self.shell
        exc.filename = shell.compile.cache(code, shell.execution_count)
        show = shell.showsyntaxerror
        undo: list[Callable[[], None]] = []

        def once(filename: str | None = None, running_compiled_code: bool = False) -> None:
            for step in undo:
                step()
            show(filename)

        _patch_instance(shell, "showsyntaxerror", once, undo)
        return exc

    # -- hit -------------------------------------------------------------------------------

    def _restore(self, cell: _Cell) -> Any:
        assert cell.store is not None and cell.key is not None
        t0 = time.perf_counter()
        manifest = cell.store.lookup(cell.key)
        if manifest is None:
            return _MISS
        if manifest.expired():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(manifest.expires_at or 0))
            cell.reasons = [f"the stored result expired at {when}"]
            return _MISS
        try:
            value = cell.store.load(manifest)
        except (PayloadCorruptError, SerializationError, StorageError) as exc:
            logger.warning(
                "%%%%task `%s`: the stored result cannot be used (%s); recomputing", cell.name, exc
            )
            cell.reasons = [f"the stored result could not be loaded: {exc}"]
            return _MISS
        if not isinstance(value, dict) or value.get("format") != CELL_FORMAT:
            cell.reasons = ["the stored result has an older layout"]
            return _MISS
        ns = self.shell.user_ns
        variables: dict[str, Any] = value["variables"]
        ns.update(variables)
        for gone in value["deleted"]:
            ns.pop(gone, None)
        lineage.record_outputs(cell.key, variables.items())
        self._run_definitions(cell.analysis, variables)
        replay(value["outputs"], self.shell)
        elapsed = time.perf_counter() - t0
        saved = max(manifest.duration - elapsed, 0.0)
        self._badge(manifest, saved)
        self._record(cell, RunState.CACHED, duration=elapsed, saved=saved, size=manifest.size)
        self._report(
            cell, "cached", [f"computed {_when(manifest.created_at)} in {manifest.duration:.3g} s"]
        )
        return None

    def _run_definitions(self, analysis: CellAnalysis, restored: dict[str, Any]) -> None:
        """Re-run the cell's def/class/import statements, so functions use the live namespace.

        Compiled under a name IPython's line cache knows, so ``inspect.getsource`` (and with
        it the keys of tasks defined here) sees the same source as on a miss.
        """
        stmts: list[ast.stmt] = [
            node
            for node in analysis.tree.body
            if isinstance(node, _DEFINITION_TYPES) and _bound_by(node) <= analysis.definitions
        ]
        if not stmts:
            return
        shell = self.shell
        filename = shell.compile.cache(analysis.code, shell.execution_count)
        module = ast.Module(body=stmts, type_ignores=[])
        code = compile(module, filename, "exec", shell.compile.flags, dont_inherit=True)
        exec(code, shell.user_global_ns, shell.user_ns)
        # Restored instances of a class the cell defines get the class just defined.
        classes = {n.name for n in stmts if isinstance(n, ast.ClassDef)}
        for value in restored.values():
            cls = type(value)
            if cls.__name__ in classes and shell.user_ns.get(cls.__name__) is not cls:
                try:
                    value.__class__ = shell.user_ns[cls.__name__]
                except TypeError:
                    pass

    def _badge(self, manifest: Manifest, saved: float) -> None:
        text = f"✓ cached · computed {_when(manifest.created_at)} · saved {_seconds(saved)}"
        html = f'<small style="color:#6b7280">{text}</small>'
        self.shell.display_pub.publish(
            data={"text/plain": text, "text/html": html},
            metadata={"notebook_flow": {"badge": "cached", "key": manifest.key}},
        )

    # -- miss ------------------------------------------------------------------------------

    def _compute(self, cell: _Cell, lease: Any) -> Any:
        __tracebackhide__ = True
        assert cell.store is not None and cell.key is not None
        ns = self.shell.user_ns
        existed = {n for n in cell.analysis.writes | cell.analysis.deletes if n in ns}
        self._record(cell, RunState.RUNNING, explain="; ".join(cell.reasons) or None)
        t0 = time.perf_counter()
        with _Capture(self.shell) as capture:
            error = self._run_nested(cell.body)
        duration = time.perf_counter() - t0
        if error is not None:
            self._failed(cell, error, duration)
            raise error.with_traceback(_user_frames(error.__traceback__))
        if cell.options.auto and not worth_storing(duration, 0.0):
            self._record(cell, RunState.COMPLETED, duration=duration, error=None)
            self._report(cell, "not stored", [_CHEAP_REASON], duration)
            return None
        variables = self._collect(cell)
        deleted = sorted(n for n in existed if n not in ns)
        payload = {
            "format": CELL_FORMAT,
            "variables": variables,
            "deleted": deleted,
            "outputs": capture.outputs,
        }
        expires_at = time.time() + cell.options.expire if cell.options.expire else None
        handles = [
            (n, type(v).__name__, why) for n, v in variables.items() if (why := _handle_reason(v))
        ]
        if handles:
            return self._not_stored(cell, handles, duration)
        try:
            manifest = cell.store.commit(
                cell.key,
                payload,
                task=cell.identity,
                components=cell.components,
                run_id=cell.run_id,
                duration=duration,
                expires_at=expires_at,
                serializer="pickle",
                before_manifest=getattr(lease, "check", None),
                fence=getattr(lease, "fence", None),
            )
        except SerializationError as exc:
            bad = unstorable(variables) or [("the outputs", type(exc).__name__, str(exc))]
            return self._not_stored(cell, bad, duration)
        except StorageError as exc:
            self._failed(cell, exc, duration)
            _note(
                "the cell ran and its variables are in the namespace, but its result could not "
                "be stored"
            )
            raise
        lineage.record_outputs(cell.key, variables.items())
        self._record(cell, RunState.COMPLETED, duration=duration, size=manifest.size)
        self._index(cell, manifest)
        self._report(cell, "computed", cell.reasons, duration)
        return None

    def _not_stored(self, cell: _Cell, bad: list[tuple[str, str, str]], duration: float) -> None:
        names = "; ".join(f"`{n}` ({t}: {why})" for n, t, why in bad)
        _note(
            f"not cached: {names} cannot be stored. The cell ran and its variables are in "
            "the namespace; nothing was written. Create such objects in a cell without "
            "%%task, or list the variables to keep with --outputs x,y"
        )
        self._record(cell, RunState.COMPLETED, duration=duration, error=f"not stored: {names}")
        self._report(cell, "not stored", [f"cannot store {names}"], duration)

    def _collect(self, cell: _Cell) -> dict[str, Any]:
        """The variables to store: what the cell binds or mutates (or ``--outputs``)."""
        ns, a = self.shell.user_ns, cell.analysis
        if cell.options.outputs is not None:
            missing = [n for n in cell.options.outputs if n not in ns]
            if missing:
                _note(f"--outputs names {', '.join(missing)}, which the cell did not define")
            return {n: ns[n] for n in cell.options.outputs if n in ns}
        names = set(a.writes - a.definitions - a.context_names)
        # A value read and changed in place (`items.append(x)`, `df.drop(..., inplace=True)`)
        # is a result too: its fingerprint after the run tells.
        from notebook_flow.hashing import fingerprint

        for name in cell.inputs:
            label = f"variable `{name}`"
            if name in names or label not in cell.components or name not in ns:
                continue
            try:
                if fingerprint(ns[name]) != cell.components[label]:
                    names.add(name)
            except UnhashableError:
                names.add(name)
        return {n: ns[n] for n in sorted(names) if n in ns}

    def _run_nested(self, body: str) -> BaseException | None:
        """Run the cell body through the shell, as if it were a cell of its own.

        The body's traceback is not shown here: the magic re-raises the exception so the
        cell is reported failed with the user's exception (shown once, by IPython).
        """
        shell = self.shell
        show = shell.showtraceback

        def quiet(*args: Any, **kwargs: Any) -> None:
            if not kwargs.get("running_compiled_code"):
                show(*args, **kwargs)

        undo: list[Callable[[], None]] = []
        _patch_instance(shell, "showtraceback", quiet, undo)
        try:
            result = shell.run_cell(body, store_history=False, cell_id=_identity.current_cell())
        finally:
            for step in undo:
                step()
        error: BaseException | None = result.error_before_exec or result.error_in_exec
        return error

    def _failed(self, cell: _Cell, error: BaseException, duration: float) -> None:
        import traceback

        state = RunState.FAILED if isinstance(error, Exception) else RunState.CANCELLED
        self._record(
            cell,
            state,
            duration=duration,
            error=f"{type(error).__name__}: {error}",
            traceback="".join(traceback.format_exception(type(error), error, error.__traceback__)),
        )
        self._report(cell, state.value.lower(), [f"{type(error).__name__}: {error}"], duration)

    def _uncached(self, cell: _Cell, why: str) -> Any:
        __tracebackhide__ = True
        _note(f"running uncached: {why}.")
        self._report(cell, "uncached", [why])
        return self._plain(cell.body)

    def _plain(self, body: str) -> Any:
        """Run the body as a plain cell would run (errors raised the same way)."""
        __tracebackhide__ = True
        error = self._run_nested(body)
        if error is not None:
            raise error.with_traceback(_user_frames(error.__traceback__))
        return None

    def _locked(self, cell: _Cell) -> Any:
        import contextlib

        if not cell.options.lock:
            return contextlib.nullcontext()
        from notebook_flow.config import settings
        from notebook_flow.locks import default_lock_manager_for, hold

        assert cell.store is not None and cell.key is not None
        s = settings()
        return hold(
            default_lock_manager_for(cell.store),
            cell.key,
            _identity.holder_id(cell.run_id),
            lease=s.lock_lease,
            timeout=s.lock_timeout,
        )

    # -- explaining and recording ----------------------------------------------------------

    def _refs(self, cell: _Cell) -> list[str]:
        refs = [f"name:{cell.options.name}"] if cell.options.name else []
        cell_id = _identity.current_cell()
        if cell_id:
            refs.append(f"id:{cell_id}")
        return refs or [f"identity:{cell.identity}"]

    def _explain_miss(self, cell: _Cell) -> None:
        from notebook_flow.tasks.explain import BUSY_REASON, EXPLAIN_WAIT, diff_components

        if cell.options.refresh:
            cell.reasons = ["--refresh was given"]
            return
        if cell.reasons:  # expired or unreadable: already said
            return
        reference = next((self._seen[r] for r in self._refs(cell) if r in self._seen), None)
        busy = False
        if reference is None:
            try:
                from notebook_flow.config import get_metadata

                entry = get_metadata(cell.store).latest_entry(cell.identity, timeout=EXPLAIN_WAIT)
                reference = entry["components"] if entry else None
            except MetadataError:  # another process holds the index: don't wait for it
                busy = True
            except Exception:  # the index is a convenience here; never fail the cell
                logger.debug("no metadata for explaining a miss", exc_info=True)
        if busy:
            cell.reasons = [BUSY_REASON]
        elif reference is None:
            cell.reasons = ["no earlier result of this cell's code was found"]
        else:
            cell.reasons = diff_components(reference, cell.components)
        logger.info("%%%%task `%s`: cache miss: %s", cell.name, "; ".join(cell.reasons))

    def _report(
        self, cell: _Cell, status: str, reasons: list[str], duration: float | None = None
    ) -> None:
        report = CellReport(cell.name, status, tuple(reasons), cell.key, duration)
        self.last = report
        self.reports[cell.name] = report

    def _record(self, cell: _Cell, state: RunState, **fields: Any) -> None:
        if cell.store is None:
            return
        from notebook_flow.tasks.call import _record_run

        inputs = ", ".join(cell.inputs) or None
        _record_run(
            cell.store,
            cell.run_id,
            cell.name,
            cell.identity,
            cell.key,
            state=state,
            tags=("cell",),
            inputs=inputs,
            **fields,
        )

    def _index(self, cell: _Cell, manifest: Manifest) -> None:
        from notebook_flow.metadata import CacheEntry
        from notebook_flow.tasks import _metadata_for

        entry = CacheEntry.from_manifest(manifest, task=cell.name, task_identity=cell.identity)
        assert cell.store is not None
        _metadata_for(cell.store, lambda m: m.record_cache_entry(entry))


# --------------------------------------------------------------------------- helpers


def _bound_by(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {_bound_by_import(a) for a in node.names}
    return (
        {node.name}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        else set()
    )


def _user_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Drop IPython's own ``run_code`` frame from the top of a cell's traceback."""
    while tb is not None and tb.tb_frame.f_code.co_name == "run_code":
        tb = tb.tb_next
    return tb


def _handle_reason(value: Any, nested: bool = False) -> str | None:
    """Why ``value`` is a handle on something outside the process (None: it is data).

    Pickle would "succeed" on some of these (cloudpickle reads an open file's contents into
    a StringIO), but what comes back is not what the cell made. Containers are looked into
    one level deep (a list of futures, a dict of connections).
    """
    import io
    import itertools

    if not nested and isinstance(value, (list, tuple, set, frozenset, dict)):
        items = value.values() if isinstance(value, dict) else value
        for item in itertools.islice(items, 1000):
            why = _handle_reason(item, nested=True)
            if why:
                return f"it holds {why}"

    if isinstance(value, io.IOBase) and not isinstance(value, (io.BytesIO, io.StringIO)):
        return "an open file or stream"
    if isinstance(value, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return "a generator or coroutine, which cannot be saved mid-way"
    checks = (
        ("socket", "socket", "a network socket"),
        ("sqlite3", "Connection", "a database connection"),
        ("sqlite3", "Cursor", "a database cursor"),
        ("threading", "Thread", "a thread"),
        ("subprocess", "Popen", "a running process"),
        ("notebook_flow.futures", "TaskFuture", "a future of background work; store `.result()`"),
    )
    for module_name, attr, why in checks:
        cls = getattr(sys.modules.get(module_name), attr, None)
        if isinstance(cls, type) and isinstance(value, cls):
            return why
    lock_types = (type(_thread_lock()), type(_thread_rlock()))
    if isinstance(value, lock_types):
        return "a lock"
    return None


def _thread_lock() -> Any:
    import threading

    return threading.Lock()


def _thread_rlock() -> Any:
    import threading

    return threading.RLock()


def unstorable(variables: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(name, type, reason)`` for each variable that cannot be pickled."""
    import cloudpickle

    bad = []
    for name, value in variables.items():
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            bad.append((name, type(value).__name__, f"{type(exc).__name__}: {exc}"))
    return bad


def _note(text: str) -> None:
    """A short message to the user, under the cell (stderr), and to the log."""
    logger.info("%%%%task: %s", text)
    print(f"%%task: {text}", file=sys.stderr)


def _when(epoch: float) -> str:
    if time.strftime("%Y-%m-%d", time.localtime(epoch)) == time.strftime("%Y-%m-%d"):
        return "today " + time.strftime("%H:%M:%S", time.localtime(epoch))
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))
