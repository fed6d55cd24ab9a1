"""Running a ``%%task`` cell: look its key up, restore a hit or compute and commit a miss.

Step 3 of :mod:`notebook_flow.cells`: :class:`CellRunner` and the helpers it uses to
explain, record and report each run.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import logging
import re
import sys
import time
import types
from typing import TYPE_CHECKING, Any

from notebook_flow import _identity
from notebook_flow._codehash import module_kind
from notebook_flow.cache_policies import combine_components
from notebook_flow.errors import (
    MetadataError,
    PayloadCorruptError,
    SerializationError,
    StorageError,
    UnhashableError,
)
from notebook_flow.figures import cached_summary, time_saved
from notebook_flow.hashing import fingerprint, lineage
from notebook_flow.lifecycle import quota, usage
from notebook_flow.states import RunState
from notebook_flow.storage.pins import pin

from . import ambient, effects, files
from .ambient import Snapshot
from .analysis import CellAnalysis, analyze_cell
from .auto import auto_plain_reason, store_deadline, worth_storing
from .capture import _Capture, replay
from .effects import Watches
from .execute import raise_as_plain, run_definitions, run_nested, syntax_error
from .imports import ImportedModules, imported_modules
from .key import CellOptions, cell_components, imported_components, input_names, rng_keys
from .result import DISK_SPEED, Restored, nbytes, pack_result, part_key, writable
from .sharing import SplitMemory
from .state import OverBudget, walk
from .storable import handle_reason, unstorable

if TYPE_CHECKING:
    from notebook_flow.storage import Manifest, ResultStore

__all__ = ["CELL_FORMAT", "CellReport", "CellRunner"]

logger = logging.getLogger("notebook_flow")

#: Bumped when the stored layout of a cell result changes; older results then miss.
CELL_FORMAT = 3

# IPython's output history changes on every execution: keying on it would never hit.
_HISTORY_NAME = re.compile(r"^(_+|_i+|_\d+|_i\d+|_oh|_ih|_dh|In|Out)$")


_CHEAP_REASON = "ran plain: cheaper to run than to store and restore (%flow auto)"

# A commit's fixed cost before any was measured (a local store on a quiet disk), and the
# weight of each new measurement in the running average.
_FIRST_COMMIT_SECONDS = 0.01
#: Modules of values whose serializing cost follows their size, not their type.
_SIZED_MODULES = frozenset({"builtins", "numpy", "pandas", "pyarrow", "collections"})
_COMMIT_WEIGHT = 0.3

# --------------------------------------------------------------------------- the runner

_MISS: Any = object()


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
    # Ambient state before the run; the key when the cell draws from a global generator
    # (the generators' states added to the components); what functions it calls reach.
    ambient: Snapshot | None = None
    rng_components: dict[str, str] = dataclasses.field(default_factory=dict)
    rng_keys: list[tuple[str, dict[str, str]]] = dataclasses.field(default_factory=list)
    reseeded: set[str] = dataclasses.field(default_factory=set)  # seeded first: not keyed
    watches: Watches | None = None
    imported: ImportedModules = dataclasses.field(default_factory=ImportedModules)
    code_states: dict[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)


class CellRunner:
    """Runs the ``%%task`` cells of one IPython shell (see the module docstring)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.last: CellReport | None = None
        self.reports: dict[str, CellReport] = {}
        self.busy = False
        self.depth = 0  # > 0 while a %%task cell runs (its body is not a new cell)
        self._seen: dict[str, dict[str, str]] = {}  # components last used, by cell id / name
        # What committing a result costs on this store beyond writing its bytes (manifest,
        # signing, fsyncs), averaged over the last commits: %flow auto stores a cell only
        # when it took a few times longer (auto.worth_storing).
        self.commit_seconds = _FIRST_COMMIT_SECONDS
        # Under %flow auto: for a type of value whose serializing ran out of time, the most
        # time it had (a lower bound on what storing it costs). A later cell holding a value
        # of that type with no more time than that is not worth trying (plot cells: each
        # spent its whole budget on its figure). Only ever makes a cell run plain.
        self._pack_floor: dict[type, float] = {}

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
            raise syntax_error(self.shell, exc, code) from None
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
        cell.imported = imported_modules(analysis.tree)
        if cell.imported.why is not None and not explicit:
            return self._uncached(cell, cell.imported.why)
        try:
            cell.components = cell_components(analysis, ns, cell.inputs, options.outputs)
            cell.components.update(imported_components(analysis, cell.imported))
        except UnhashableError as exc:
            return self._uncached(
                cell,
                f"{exc} Pass the names to key on with --inputs, or register a fingerprint "
                "with notebook_flow.hashing.register_fingerprint",
            )
        why = self._watch(cell, explicit)
        if why is not None:
            return self._uncached(cell, why)
        cell.key = combine_components(identity, cell.components)
        cell.rng_keys = rng_keys(identity, cell.components, cell.rng_components)
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

    def _watch(self, cell: _Cell, explicit: bool) -> str | None:
        """Add ambient state to the key and watch what called functions reach; returns why
        the cell cannot be cached faithfully (None: it can)."""
        ns = self.shell.user_ns
        before = ambient.snapshot()
        if before.failed:
            name, error = next(iter(before.failed.items()))
            return f"the ambient state `{name}` cannot be read or fingerprinted ({error})"
        cell.ambient = before
        cell.components.update(ambient.key_components(before, keyed="always"))
        cell.reseeded = ambient.reseeded(cell.analysis.tree, ns)
        cell.rng_components = {
            lab: digest
            for lab, digest in ambient.key_components(before, keyed="when-changed").items()
            if lab not in {ambient.label(n) for n in cell.reseeded}
        }
        reaching = [n for n in cell.inputs if n in ns and effects.reaches(ns[n])]
        data: list[tuple[str, str]] = []
        # Local modules the cell imports itself (imported before): what it reaches in them.
        for bound, (module, attr) in cell.imported.watched.items():
            if attr is not None:
                path = effects.module_path(module, attr)
                if effects.reaches(effects.lookup(ns, path)):
                    reaching.append(path)
                else:
                    data.append((module, attr))
                continue
            for attr in sorted(cell.analysis.attributes.get(bound, ())):
                if effects.reaches(getattr(sys.modules[module], attr, None)):
                    reaching.append(effects.module_path(module, attr))
                else:
                    data.append((module, attr))
        for name in cell.inputs:
            module = ns.get(name)
            if isinstance(module, types.ModuleType) and module_kind(module.__name__) == "user":
                for attr in sorted(cell.analysis.attributes.get(name, ())):
                    if effects.reaches(getattr(module, attr, None)):
                        reaching.append(f"{name}.{attr}")
                    else:
                        data.append((module.__name__, attr))
        why = _module_attribute_stores(cell.analysis, ns, data, cell.components)
        if why is not None and not explicit:
            return why
        # Functions held in containers (`fns["draw"]()`, `handlers[0]()`) run as the named
        # ones do: the containers the cell reads, and those its functions reach, are looked
        # through for them until no new one turns up.
        # A local module's containers count too (`helpers.REG["draw"]()`), named by a path
        # that finds them again on a hit (:func:`effects.module_path`).
        looked: set[str] = set()
        pending = [n for n in cell.inputs if n in ns and effects.holds_code(ns[n])]
        pending += [effects.module_path(m, a) for m, a in data]
        while True:
            for path in pending:
                looked.add(path)
                value = effects.lookup(ns, path)
                if not effects.holds_code(value):
                    continue
                paths, why = effects.held_functions(path, value, effects.reaches)
                if why is not None and not explicit:
                    return why
                reaching += paths
            cell.watches = effects.watch(ns, reaching, data)
            pending = sorted(
                {
                    path
                    for w in cell.watches.items
                    if w.target[0] in ("ns", "module") and effects.holds_code(w.before)
                    for path in [effects.target_path(w.target)]
                    if path not in looked
                }
            )
            if not pending:
                break
        if cell.watches.opaque and not explicit:
            return cell.watches.opaque[0]
        # The state notebook functions and classes carry besides their code (defaults,
        # attributes): keyed, and checked after the run (a hit cannot restore a change).
        code = [(f"`{n}`", ns[n]) for n in cell.inputs if n in ns]
        code += [(_label(w.target), w.before) for w in cell.watches.items]
        for label, obj in code:
            digest = effects.code_state(obj)
            if digest is not None and label not in cell.code_states:
                cell.code_states[label] = (obj, digest)
                if digest != effects.NO_STATE:
                    cell.components[f"state of {label}"] = digest
        return None

    # -- hit -------------------------------------------------------------------------------

    def _restore(self, cell: _Cell) -> Any:
        """Restore the cell from the store: keyed without, then with, the generators."""
        assert cell.store is not None and cell.key is not None
        t0 = time.perf_counter()
        # Keyed on the global generators it drew from, if any: which ones is known only
        # after a run, so each combination is looked up (a few local manifest reads).
        for key, _ in [(cell.key, None), *cell.rng_keys]:
            manifest = cell.store.lookup(key)
            if manifest is not None:
                break
        else:
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
        path = files.changed(value["files"])
        if path is not None:
            cell.reasons = [f"the file or folder {path} it read changed since"]
            return _MISS
        ns = self.shell.user_ns
        load_part = functools.partial(self._load_part, cell, manifest.key)
        try:
            # The files it wrote, each checked against the size and hash the result names
            # (the result is verified; a part alone could be another run's): nothing is
            # written before all of them are.
            written = files.check(value["writes"], load_part)
            restored = Restored.prepare(value, ns, load_part)
        except Exception as exc:  # a reference or target the hit cannot find: recompute
            logger.info("%%%%task `%s`: cannot restore the stored result: %r", cell.name, exc)
            cell.reasons = [f"the stored result cannot be restored here: {exc}"]
            return _MISS
        try:
            files.restore(written)
        except OSError as exc:  # the run would do it otherwise (or fail as it fails)
            logger.info("%%%%task `%s`: cannot write its files back: %r", cell.name, exc)
            cell.reasons = [f"the files it wrote cannot be written back here: {exc}"]
            return _MISS
        usage.touch(cell.store, manifest.key)  # last use, for LRU eviction: no I/O
        restored.apply_variables(ns)
        run_definitions(self.shell, cell.analysis, restored.variables)
        restored.apply_rest(ns)
        # (from the namespace: a variable may have been updated in place, not rebound)
        outputs = [(n, ns[n]) for n in restored.variables if n in ns]
        lineage.record_outputs(lineage.produced_by(manifest), outputs)
        replay(value["outputs"], self.shell)
        elapsed = time.perf_counter() - t0
        saved = time_saved(manifest.duration, elapsed)
        self._badge(manifest, saved)
        self._record(cell, RunState.CACHED, duration=elapsed, saved=saved, size=manifest.size)
        self._report(
            cell, "cached", [cached_summary(manifest.created_at, manifest.duration, saved)]
        )
        return None

    def _badge(self, manifest: Manifest, saved: float) -> None:
        text = f"✓ cached · {cached_summary(manifest.created_at, manifest.duration, saved)}"
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
        # The objects names held before the run: a name that still holds the same object
        # was changed in place, and is restored in place (aliases of it see the change).
        assert cell.watches is not None
        reached = {w.target[1] for w in cell.watches.items if w.target[0] == "ns"}
        names = {*cell.analysis.writes, *cell.inputs, *reached}
        before = {n: ns[n] for n in names if n in ns}
        # ... and their parts: which of those the cell changed in place, which it replaced.
        before_paths = walk(((n,), v) for n, v in before.items())
        # The paths its code names, existing or not: compared before and after the run.
        named = files.named_paths(
            cell.analysis.tree, [ns.get(n) for n in cell.inputs], existing=False
        )
        self._record(cell, RunState.RUNNING, explain="; ".join(cell.reasons) or None)
        t0 = time.perf_counter()
        with _Capture(self.shell) as capture, files.recording(named) as found:
            error = run_nested(self.shell, cell.body, cell.analysis.code)
        duration = time.perf_counter() - t0
        if error is not None:
            self._failed(cell, error, duration)
            raise raise_as_plain(self.shell, error)
        if cell.options.auto and not worth_storing(duration, self.commit_seconds):
            # Cheaper than any store: nothing after the run (outputs, ambient state, pickling)
            # is worth looking at.
            return self._cheap(cell, duration)
        for label, (obj, digest) in cell.code_states.items():
            if effects.code_state(obj) != digest:
                return self._unfaithful(
                    cell,
                    f"the cell changed the state {label} carries besides its code (a default "
                    "argument, a function or class attribute), which a hit cannot restore. "
                    "Keep such state in a variable to cache this cell",
                    duration,
                )
        variables = self._collect(cell)
        handles = [
            (n, type(v).__name__, why) for n, v in variables.items() if (why := handle_reason(v))
        ]
        if handles:
            return self._not_stored(cell, handles, duration)
        assert cell.ambient is not None and cell.watches is not None
        after = ambient.snapshot()
        if after.failed:  # a state the cell may have changed cannot be captured
            name, why = next(iter(after.failed.items()))
            return self._not_stored(cell, [(name, "ambient state", why)], duration)
        store_dir = (cell.store.local_root,) if cell.store.local_root else ()
        written = found.written(exclude=store_dir)
        if isinstance(written, str):
            return self._unfaithful(cell, written, duration)
        consumed = set(ambient.consumed(cell.ambient, after)) - cell.reseeded
        drawn = {ambient.label(n) for n in consumed}
        for key, components in cell.rng_keys:
            if drawn and drawn == components.keys() - cell.components.keys():
                cell.key, cell.components = key, components
        t_pack = time.perf_counter()
        deadline = store_deadline(duration, self.commit_seconds) if cell.options.auto else None
        kinds = {type(v) for v in variables.values()}
        if deadline is not None and any(
            self._pack_floor.get(k, -1.0) >= deadline - t_pack for k in kinds
        ):
            return self._cheap(cell, duration)
        try:
            state, parts = pack_result(
                ns,
                variables,
                before=before,
                before_paths=before_paths,
                # What the cell reads, and the names its functions reach (keyed too).
                inputs=[*cell.inputs, *sorted(reached - set(cell.inputs))],
                deleted=[n for n in existed if n not in ns],
                effects=cell.watches.changed(ns),
                ambient_changed=ambient.changed(cell.ambient, after),
                deadline=deadline,
            )
        except OverBudget:  # (the cheaper plain run it was is all it is worth)
            assert deadline is not None
            for kind in kinds:  # (not builtins, arrays or frames: their cost follows size)
                if kind.__module__.partition(".")[0] not in _SIZED_MODULES:
                    floor = max(self._pack_floor.get(kind, 0.0), deadline - t_pack)
                    self._pack_floor[kind] = floor
            return self._cheap(cell, duration)
        except SplitMemory as exc:
            return self._unfaithful(cell, str(exc), duration)
        except Exception as exc:
            bad = unstorable(variables) or [("the outputs", type(exc).__name__, str(exc))]
            return self._not_stored(cell, bad, duration)
        # The files it wrote are stored after its large values, as parts of their own.
        writes = written.stored(first_part=len(parts))
        parts = [*parts, *written.contents]
        # Writing the large parts is not timed here: count them at disk speed; a commit's
        # own cost (manifest, fsyncs) as measured on this store lately.
        store_seconds = time.perf_counter() - t_pack + sum(map(nbytes, parts)) / DISK_SPEED
        if cell.options.auto and not worth_storing(duration, store_seconds + self.commit_seconds):
            return self._cheap(cell, duration)
        payload = {
            "format": CELL_FORMAT,
            **state,
            "outputs": capture.outputs,
            "files": found.inputs(written, exclude=store_dir),
            "writes": writes,
        }
        expires_at = time.time() + cell.options.expire if cell.options.expire else None
        t_commit = time.perf_counter()
        try:
            self._commit_parts(cell, parts, duration, expires_at)
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
        # (the parts at disk speed are counted apart: what is left is the fixed cost)
        spent = time.perf_counter() - t_commit - sum(map(nbytes, parts)) / DISK_SPEED
        self.commit_seconds += _COMMIT_WEIGHT * (max(spent, 0.0) - self.commit_seconds)
        lineage.record_outputs(lineage.produced_by(manifest), variables.items())
        self._record(cell, RunState.COMPLETED, duration=duration, size=manifest.size)
        self._index(cell, manifest)
        pinned = cell.options.pin
        if pinned:  # its large values too: a pinned cell is never left without its parts
            pin(cell.store, [part_key(cell.key, i) for i in range(len(parts))])
        quota.committed(cell.store, manifest, pinned=pinned)
        self._report(cell, "computed", cell.reasons, duration)
        return None

    def _cheap(self, cell: _Cell, duration: float) -> None:
        self._record(cell, RunState.COMPLETED, duration=duration)
        self._report(cell, "not stored", [_CHEAP_REASON], duration)

    def _commit_parts(
        self, cell: _Cell, parts: list[Any], duration: float, expires_at: float | None
    ) -> None:
        """Store the large values of a result on their own (npy, Parquet), before the result
        that points at them: a committed result never names a part that is not there."""
        assert cell.store is not None and cell.key is not None
        for i, value in enumerate(parts):
            cell.store.commit(
                part_key(cell.key, i),
                value,
                task=cell.identity,
                components={"part of": cell.key, "part": str(i)},
                run_id=cell.run_id,
                duration=duration,
                expires_at=expires_at,
            )

    def _load_part(self, cell: _Cell, key: str, i: int) -> Any:
        """The i-th large value of the result stored under ``key`` (LookupError: gone)."""
        assert cell.store is not None
        manifest = cell.store.lookup(part_key(key, i))
        if manifest is None:
            raise LookupError(f"part {i} of the stored result is missing")
        value = cell.store.load(manifest)
        usage.touch(cell.store, manifest.key)  # a part is used with its cell
        return writable(value)

    def _unfaithful(self, cell: _Cell, why: str, duration: float) -> None:
        """The cell ran, but a hit could not give back what it did (``why``): nothing is
        stored, and the next run runs it again."""
        _note(f"not cached: {why}")
        self._record(cell, RunState.COMPLETED, duration=duration, error=f"not stored: {why}")
        self._report(cell, "not stored", [why], duration)

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
        error = run_nested(self.shell, body)
        if error is not None:
            raise raise_as_plain(self.shell, error)
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
        # Under %flow auto most cells are new or cheap: opening the run history to explain
        # each miss would cost tens of ms per cell (`%flow explain` still has this run's).
        if reference is None and not cell.options.auto:
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
            cell.reasons = [
                "no stored result of this cell's code and inputs"
                if cell.options.auto
                else "no earlier result of this cell's code was found"
            ]
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


def _label(target: effects.Target) -> str:
    if target[0] == "ns":
        return f"`{target[1]}`"
    if target[0] == "module":
        return f"`{target[1]}.{target[2]}`"
    return f"an object `{target[1]}` reaches"


def _note(text: str) -> None:
    """A short message to the user, under the cell (stderr), and to the log."""
    logger.info("%%%%task: %s", text)
    # One write: print() writes the line and its newline apart, and the kernel may send
    # them as two outputs (the newline alone under the note).
    sys.stderr.write(f"%%task: {text}\n")


def _module_attribute_stores(
    analysis: CellAnalysis,
    ns: dict[str, Any],
    data: list[tuple[str, str]],
    components: dict[str, str],
) -> str | None:
    """Add to ``data`` the module attributes the cell assigns (``json.my_flag = 5``,
    ``torch.backends.cudnn.deterministic = True``): process state every later cell sees,
    watched like a local module's data (stored when changed, set again on a hit), and
    their values before the cell to ``components`` (the cell's result may depend on them).
    Returns why the cell cannot be cached when such a module is not imported before it, or
    a value there has no fingerprint."""
    if not analysis.attribute_stores:
        return None
    names = dict(ns)
    for node in analysis.tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            ambient._bind_imports(node, names)
    for chain in analysis.attribute_stores:
        owner: Any = names.get(chain[0])
        if chain[0] in names and owner is None:
            return (
                f"it sets `{'.'.join(chain)}` on a module it imports for the first time; "
                "a module's state before its first import cannot be compared with. Import "
                "it in an earlier cell to cache this one"
            )
        for step in chain[1:-1]:
            if not isinstance(owner, types.ModuleType):
                break
            owner = getattr(owner, step, None)
        if not isinstance(owner, types.ModuleType):
            continue  # an attribute of an object: the object is a value the cell changes
        module = getattr(owner, "__name__", None)
        if not isinstance(module, str) or sys.modules.get(module) is not owner:
            return (
                f"it sets `{'.'.join(chain)}` on a module that is not importable by its name "
                f"({module!r}), so a hit could not set it again"
            )
        pair = (module, chain[-1])
        if pair in data:
            continue
        data.append(pair)
        before = vars(owner).get(chain[-1], _ABSENT)
        try:
            digest = "absent" if before is _ABSENT else fingerprint(before)
        except UnhashableError as exc:
            return (
                f"it sets `{module}.{chain[-1]}`, whose value before the cell has no "
                f"fingerprint ({exc})"
            )
        components[f"module attribute `{module}.{chain[-1]}`"] = digest
    return None


_ABSENT: Any = object()
