"""``%%task`` cell caching: analyse a cell, key it, then run it or restore it.

The magic in :mod:`notebook_flow.magics` only parses options; everything a cached cell
does lives here, top to bottom:

1. :func:`analyze_cell` reads the cell (after IPython's ``transform_cell``) with ``ast`` and
   ``symtable``: the names it reads from the namespace before binding them, the names it
   binds or mutates (``x = …``, ``x += …``, ``x[…] = …``, ``x.attr = …``, ``def``,
   ``class``, ``import``), and what makes it *opaque* (``global``, ``exec``, ``eval``,
   ``import *``, top-level ``await``).
2. :func:`cell_components` keys it: the normalized code (comments and whitespace don't
   count) plus a fingerprint of every value it reads, functions by their deep source.
   Never the cell's position, id or execution count.
3. :class:`CellRunner` looks the key up. A hit restores the stored variables, re-runs the
   cell's ``def``/``class``/``import`` statements (so functions stay bound to the live
   namespace), replays the outputs and shows one quiet badge. A miss runs the cell through
   the shell on the main thread (tracebacks, display, events as usual) while recording its
   streams and rich outputs, then commits variables + outputs as one result.

>>> a = analyze_cell("y = f(x)\\nx += 1\\nz[0] = y")
>>> a.reads, sorted(a.writes)
(('f', 'x', 'z'), ['x', 'y', 'z'])
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import re
import symtable
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import xxhash

from . import _identity
from .cache_policies import combine_components
from .errors import (
    ConfigurationError,
    PayloadCorruptError,
    SerializationError,
    StorageError,
    UnhashableError,
)
from .states import RunState

if TYPE_CHECKING:
    from .storage import Manifest, ResultStore

__all__ = [
    "CellAnalysis",
    "CellOptions",
    "CellRunner",
    "analyze_cell",
    "cell_components",
    "parse_duration",
]

logger = logging.getLogger("notebook_flow")

#: Bumped when the stored layout of a cell result changes; older results then miss.
CELL_FORMAT = 1

# Calls that read or write the namespace behind the analysis' back.
_OPAQUE_CALLS = {
    "exec": "calls `exec`",
    "eval": "calls `eval`",
    "globals": "calls `globals()`",
    "locals": "calls `locals()`",
    "vars": "calls `vars()`",
}
# IPython's output history changes on every execution: keying on it would never hit.
_HISTORY_NAME = re.compile(r"^(_+|_i+|_\d+|_i\d+|_oh|_ih|_dh|In|Out)$")


# --------------------------------------------------------------------------- analysis


@dataclasses.dataclass(frozen=True)
class CellAnalysis:
    """What a cell reads and writes, as far as the code shows.

    ``reads`` are in order of first use; ``definitions`` are names bound only by top-level
    ``def``/``class``/``import`` statements (re-executed on a hit instead of stored);
    ``context_names`` are ``with … as name`` targets (a closed file is not a result);
    ``opaque`` lists the reasons the analysis cannot be trusted (empty when it can).
    """

    code: str
    code_hash: str
    reads: tuple[str, ...]
    writes: frozenset[str]
    definitions: frozenset[str]
    deletes: frozenset[str]
    context_names: frozenset[str]
    attributes: dict[str, frozenset[str]]
    opaque: tuple[str, ...]
    tree: ast.Module = dataclasses.field(repr=False, compare=False)


def _parse(code: str) -> ast.Module:
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = compile(code, "<cell>", "exec", flags=flags, dont_inherit=True)
    assert isinstance(tree, ast.Module)
    return tree


def _top_level_await(tree: ast.Module) -> bool:
    """True when ``await``/``async for``/``async with`` appear outside any function."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
            return True
        if isinstance(node, ast.comprehension) and node.is_async:
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            # Decorators and defaults run now; the body runs later.
            todo.extend(node.decorator_list if not isinstance(node, ast.Lambda) else [])
            todo.extend(node.args.defaults)
            todo.extend(d for d in node.args.kw_defaults if d is not None)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return False


def _target_names(target: ast.AST) -> Iterator[str]:
    """Names bound by an assignment target (``a``, ``a, (b, *c)``)."""
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for elt in target.elts:
            yield from _target_names(elt)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)


def _base_name(node: ast.AST) -> str | None:
    """``a`` for ``a.b[c].d``: the variable a subscript/attribute store mutates."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _bound_by_import(alias: ast.alias) -> str:
    return alias.asname or alias.name.split(".")[0]


class _Walker:
    """Walks the top level in execution order, telling reads-before-binding from the rest."""

    def __init__(self) -> None:
        self.reads: dict[str, None] = {}  # ordered set
        self.mutated: set[str] = set()
        self.deletes: set[str] = set()
        self.opaque: dict[str, None] = {}
        self.attributes: dict[str, set[str]] = {}
        self.deferred: set[str] = set()  # loads inside function bodies (run later)
        self.context_names: set[str] = set()  # `with … as f`: closed handles, not results

    # -- expressions ----------------------------------------------------------------------

    def loads(
        self, node: ast.AST | None, defined: set[str], local: frozenset[str] = frozenset()
    ) -> None:
        """Record the loads of an expression (or statement part) evaluated now."""
        if node is None:
            return
        for sub in self._iter_now(node, local):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                if sub.id in _OPAQUE_CALLS:
                    self.opaque.setdefault(_OPAQUE_CALLS[sub.id])
                if sub.id not in defined:
                    self.reads.setdefault(sub.id)
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                self.attributes.setdefault(sub.value.id, set()).add(sub.attr)

    def _iter_now(self, node: ast.AST, local: frozenset[str]) -> Iterator[ast.AST]:
        """The nodes evaluated now; function bodies are deferred, comprehension targets local."""
        if isinstance(node, ast.Lambda):
            for d in [*node.args.defaults, *[k for k in node.args.kw_defaults if k]]:
                yield from self._iter_now(d, local)
            self._defer(node.body)
            return
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            bound = set(local)
            for gen in node.generators:
                bound.update(_target_names(gen.target))
            inner = frozenset(bound)
            for i, gen in enumerate(node.generators):
                # The first iterable is evaluated in the enclosing scope.
                yield from self._iter_now(gen.iter, local if i == 0 else inner)
                for cond in gen.ifs:
                    yield from self._iter_now(cond, inner)
            parts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            for part in parts:
                yield from self._iter_now(part, inner)
            return
        if isinstance(node, ast.Name) and node.id in local:
            return
        yield node
        for child in ast.iter_child_nodes(node):
            yield from self._iter_now(child, local)

    def _defer(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                if sub.id in _OPAQUE_CALLS:
                    self.opaque.setdefault(_OPAQUE_CALLS[sub.id])
                self.deferred.add(sub.id)
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                self.attributes.setdefault(sub.value.id, set()).add(sub.attr)
            elif isinstance(sub, ast.Global):
                self.opaque.setdefault("uses `global` " + ", ".join(sub.names))

    def store_target(self, target: ast.AST, defined: set[str], definite: bool) -> None:
        """An assignment target: names are bound, subscripts/attributes mutate their base."""
        if isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self.store_target(elt, defined, definite)
        elif isinstance(target, ast.Starred):
            self.store_target(target.value, defined, definite)
        elif isinstance(target, ast.Name):
            if definite:
                defined.add(target.id)
        else:
            # a[i] = …, a.b = …: evaluates `a` (a read unless bound before) and mutates it.
            self.loads(target, defined)
            base = _base_name(target)
            if base is not None:
                self.mutated.add(base)

    # -- statements -----------------------------------------------------------------------

    def block(self, body: list[ast.stmt], defined: set[str], definite: bool = True) -> None:
        for stmt in body:
            self.stmt(stmt, defined, definite)

    def stmt(self, node: ast.stmt, defined: set[str], definite: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                self.loads(dec, defined)
            args = node.args
            for d in [*args.defaults, *[k for k in args.kw_defaults if k]]:
                self.loads(d, defined)
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    self.loads(a.annotation, defined)
            self.loads(node.returns, defined)
            for s in node.body:
                self._defer(s)
            if definite:
                defined.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for part in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
                self.loads(part, defined)
            # The class body runs now, in its own namespace.
            self.block(node.body, set(defined), definite=True)
            if definite:
                defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    self.opaque.setdefault("uses `import *`")
                elif definite:
                    defined.add(_bound_by_import(alias))
        elif isinstance(node, ast.Assign):
            self.loads(node.value, defined)
            for target in node.targets:
                self.store_target(target, defined, definite)
        elif isinstance(node, ast.AnnAssign):
            self.loads(node.value, defined)
            if node.value is not None:
                self.store_target(node.target, defined, definite)
        elif isinstance(node, ast.AugAssign):
            # x += 1 reads x first.
            if isinstance(node.target, ast.Name) and node.target.id not in defined:
                self.reads.setdefault(node.target.id)
            self.loads(node.value, defined)
            self.store_target(node.target, defined, definite)
            if isinstance(node.target, ast.Name) and definite:
                defined.add(node.target.id)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.deletes.add(target.id)
                    defined.discard(target.id)
                else:
                    self.store_target(target, defined, definite)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self.loads(node.iter, defined)
            inner = set(defined)
            self.store_target(node.target, inner, True)
            self.block(node.body, inner, definite=False)
            self.block(node.orelse, set(defined), definite=False)
        elif isinstance(node, (ast.While, ast.If)):
            self.loads(node.test, defined)
            self.block(node.body, set(defined), definite=False)
            self.block(node.orelse, set(defined), definite=False)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                self.loads(item.context_expr, defined)
                if item.optional_vars is not None:
                    self.store_target(item.optional_vars, defined, definite)
                    self.context_names.update(_target_names(item.optional_vars))
            self.block(node.body, defined, definite)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            self.block(node.body, set(defined), definite=False)  # type: ignore[attr-defined]
            for handler in node.handlers:  # type: ignore[attr-defined]
                self.loads(handler.type, defined)
                self.block(handler.body, set(defined), definite=False)
            self.block(node.orelse, set(defined), definite=False)  # type: ignore[attr-defined]
            self.block(node.finalbody, set(defined), definite=False)  # type: ignore[attr-defined]
        elif isinstance(node, ast.Match):
            self.loads(node.subject, defined)
            for case in node.cases:
                self.loads(case.guard, defined)
                self.block(case.body, set(defined), definite=False)
        elif isinstance(node, ast.Global):
            self.opaque.setdefault("uses `global` " + ", ".join(node.names))
        else:  # Expr, Return, Raise, Assert, Pass, ...
            self.loads(node, defined)


def _symbols(code: str) -> tuple[set[str], set[str]]:
    """(names bound at top level, globals read inside nested scopes), from ``symtable``.

    symtable knows which names in a function body are its parameters and locals, and which
    refer to the namespace when the function is called.
    """
    table = symtable.symtable(code, "<cell>", "exec")
    bound = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    nested: set[str] = set()
    todo = list(table.get_children())
    while todo:
        child = todo.pop()
        todo.extend(child.get_children())
        nested.update(
            s.get_name() for s in child.get_symbols() if s.is_global() and s.is_referenced()
        )
    return bound, nested


def _definition_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(names bound by top-level def/class/import statements, names bound by anything else)."""
    defs: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defs.update(_bound_by_import(a) for a in node.names if a.name != "*")
    other: set[str] = set()
    for node in tree.body:
        if isinstance(
            node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        ):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                other.add(sub.id)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                other.update(_bound_by_import(a) for a in sub.names if a.name != "*")
            elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                other.add(sub.name)
    return defs, other


def normalized_code_hash(tree: ast.AST) -> str:
    """A hash of the code's syntax tree: comments, blank lines and spacing don't count."""
    return xxhash.xxh3_128_hexdigest(ast.dump(tree, annotate_fields=False).encode())


def analyze_cell(code: str) -> CellAnalysis:
    """Analyse a cell's (transformed) code. Raises ``SyntaxError`` for invalid code.

    >>> analyze_cell("import numpy as np\\nm = np.mean(data)").reads
    ('data',)
    """
    tree = _parse(code)
    walker = _Walker()
    opaque: dict[str, None] = {}
    if _top_level_await(tree):
        opaque["uses top-level `await`"] = None
    walker.block(tree.body, set())
    try:
        bound, nested = _symbols(code)
    except SyntaxError:  # symtable rejects top-level await: fall back to the AST
        bound = {
            n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
        }
        nested = walker.deferred
    opaque.update(walker.opaque)
    # Globals read in function bodies are read when the function is called: a read of the
    # namespace unless the cell binds the name itself (then it is the cell's own definition).
    reads = dict(walker.reads)
    for name in sorted(nested - bound):
        reads.setdefault(name)
    defs, other = _definition_names(tree)
    writes = bound | walker.mutated
    definitions = frozenset(n for n in defs if n not in other and n not in walker.mutated)
    return CellAnalysis(
        code=code,
        code_hash=normalized_code_hash(tree),
        reads=tuple(reads),
        writes=frozenset(writes),
        definitions=definitions,
        deletes=frozenset(walker.deletes),
        context_names=frozenset(walker.context_names),
        attributes={k: frozenset(v) for k, v in walker.attributes.items()},
        opaque=tuple(opaque),
        tree=tree,
    )


# --------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class CellOptions:
    """The options of one ``%%task`` cell (parsed by the magic)."""

    name: str | None = None
    expire: float | None = None  # seconds
    refresh: bool = False
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None
    lock: bool = False


_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|w|d|h|m|s)?")
_UNITS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"10m"``, ``"1h30m"``, ``"1d"``, ``"2w"``.

    >>> parse_duration("1h30m")
    5400.0
    """
    compact = text.strip().lower().replace(" ", "")
    total, pos = 0.0, 0
    for match in _DURATION.finditer(compact):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not compact or pos != len(compact) or total <= 0:
        raise ConfigurationError(
            f"cannot read the duration {text!r}; write it like 90s, 10m, 1h, 1h30m, 1d or 2w"
        )
    return total


# --------------------------------------------------------------------------- the key


def _module_kind(module: types.ModuleType) -> str:
    """ "stdlib", "library" (installed: pinned by its version) or "user" (local code)."""
    top = module.__name__.partition(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        return "stdlib"
    file = getattr(sys.modules.get(top, module), "__file__", None)
    if file is None:
        return "library"
    parts = os.path.realpath(file).split(os.sep)
    return "library" if "site-packages" in parts or "dist-packages" in parts else "user"


def _package_version(top: str) -> str:
    version = getattr(sys.modules.get(top), "__version__", None)
    if isinstance(version, str):
        return version
    import importlib.metadata

    try:
        return importlib.metadata.version(top)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "unknown"


def _value_component(name: str, value: Any, attrs: frozenset[str]) -> tuple[str, str] | None:
    """The labelled hash of one value the cell reads (None: nothing to key on)."""
    from .hashing import fingerprint
    from .sourcehash import class_fingerprint, function_fingerprint

    if isinstance(value, types.ModuleType):
        kind = _module_kind(value)
        if kind == "stdlib":
            return None
        if kind == "library":
            top = value.__name__.partition(".")[0]
            return f"package `{top}`", xxhash.xxh3_128_hexdigest(
                f"{top}=={_package_version(top)}".encode()
            )
        # A local module: the attributes the cell uses, deeply (``%autoreload`` replaces
        # their code, which changes the key).
        h = xxhash.xxh3_128()
        for attr in sorted(attrs):
            part = getattr(value, attr, None)
            if isinstance(part, type):
                digest = class_fingerprint(part)
            elif callable(part):
                digest = function_fingerprint(part)
            else:
                digest = fingerprint(part)
            h.update(f"{attr}={digest}\0".encode())
        return f"module `{name}`", h.hexdigest()
    if isinstance(value, type):
        return f"class `{name}`", class_fingerprint(value)
    if getattr(value, "__notebook_flow_task__", False) or isinstance(
        value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)
    ):
        return f"function `{name}`", function_fingerprint(value)
    return f"variable `{name}`", fingerprint(value)


def input_names(analysis: CellAnalysis, ns: dict[str, Any], hidden: dict[str, Any]) -> list[str]:
    """The names the cell reads that exist in the user's namespace (builtins and IPython's
    own names left out)."""
    out = []
    for name in analysis.reads:
        if name not in ns:
            continue  # a builtin, or a NameError the cell will raise
        if name in hidden and hidden[name] is ns[name]:
            continue  # get_ipython, exit, quit, ... as IPython set them
        out.append(name)
    return out


def cell_components(
    analysis: CellAnalysis,
    ns: dict[str, Any],
    names: list[str],
    outputs: tuple[str, ...] | None = None,
) -> dict[str, str]:
    """``{label: hash}`` for the cell's code and every value in ``names``.

    Raises :class:`~notebook_flow.errors.UnhashableError` naming the variable when a value
    has no stable fingerprint.
    """
    components = {"cell code": analysis.code_hash}
    if outputs is not None:
        components["option --outputs"] = xxhash.xxh3_128_hexdigest(",".join(outputs).encode())
    for name in names:
        if name not in ns:
            components[f"variable `{name}`"] = xxhash.xxh3_128_hexdigest(b"<absent>")
            continue
        try:
            part = _value_component(name, ns[name], analysis.attributes.get(name, frozenset()))
        except UnhashableError as exc:
            where = f" (at `{name}{exc.path}`)" if exc.path else ""
            raise UnhashableError(
                f"the cell reads `{name}`{where}, a {exc.type_name or type(ns[name]).__name__} "
                f"with no stable fingerprint: {exc}",
                path=exc.path,
                type_name=exc.type_name,
            ) from exc
        if part is not None:
            components[part[0]] = part[1]
    return components


# --------------------------------------------------------------------------- capture


@dataclasses.dataclass
class _Capture:
    """Records what a running cell shows (streams, display data, the last expression) while
    letting it through unchanged. Installed per cell, removed right after."""

    shell: Any
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    _undo: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    _clear_pending: bool = False
    _in_result: bool = False  # a terminal displayhook prints the result to stdout

    def _add(self, output: dict[str, Any]) -> None:
        if self._clear_pending:
            self.outputs.clear()
            self._clear_pending = False
        last = self.outputs[-1] if self.outputs else None
        if (
            output["output_type"] == "stream"
            and last is not None
            and last["output_type"] == "stream"
            and last["name"] == output["name"]
        ):
            last["text"] += output["text"]
        else:
            self.outputs.append(output)

    def _patch(self, obj: Any, attr: str, new: Any) -> bool:
        return _patch_instance(obj, attr, new, self._undo)

    def _tee_stream(self, name: str) -> None:
        stream = getattr(sys, name)
        write = stream.write

        def tee(text: str) -> int:
            if isinstance(text, str) and text and not self._in_result:
                self._add({"output_type": "stream", "name": name, "text": text})
            return write(text)  # type: ignore[no-any-return]

        if not self._patch(stream, "write", tee):
            # A C-level stream (a terminal's TextIOWrapper): swap the object instead.
            setattr(sys, name, _Tee(stream, tee))
            self._undo.append(lambda: setattr(sys, name, stream))

    def __enter__(self) -> _Capture:
        shell = self.shell
        pub, hook = shell.display_pub, shell.displayhook
        publish, clear, write_data = pub.publish, pub.clear_output, hook.write_format_data

        def tee_publish(
            data: dict[str, Any], metadata: Any = None, *args: Any, **kwargs: Any
        ) -> Any:
            transient = kwargs.get("transient") or {}
            display_id = transient.get("display_id") if isinstance(transient, dict) else None
            if kwargs.get("update") and display_id:
                for out in self.outputs:
                    if out.get("display_id") == display_id:
                        out["data"], out["metadata"] = dict(data), dict(metadata or {})
            else:
                self._add({
                    "output_type": "display_data",
                    "data": dict(data),
                    "metadata": dict(metadata or {}),
                    "display_id": display_id,
                })  # fmt: skip
            return publish(data, metadata, *args, **kwargs)

        def tee_clear(wait: bool = False) -> Any:
            if wait:
                self._clear_pending = True
            else:
                self.outputs.clear()
            return clear(wait)

        def tee_result(format_dict: dict[str, Any], md_dict: Any = None) -> Any:
            self._add({
                "output_type": "execute_result",
                "data": dict(format_dict),
                "metadata": dict(md_dict or {}),
            })  # fmt: skip
            self._in_result = True
            try:
                return write_data(format_dict, md_dict)
            finally:
                self._in_result = False

        self._patch(pub, "publish", tee_publish)
        self._patch(pub, "clear_output", tee_clear)
        self._patch(hook, "write_format_data", tee_result)
        self._tee_stream("stdout")
        self._tee_stream("stderr")
        return self

    def __exit__(self, *exc: object) -> None:
        while self._undo:
            self._undo.pop()()
        for out in self.outputs:
            out.pop("display_id", None)


def _patch_instance(obj: Any, attr: str, new: Any, undo: list[Callable[[], None]]) -> bool:
    """Shadow ``obj.attr`` with an instance attribute; ``undo`` gets how to put it back."""
    own = getattr(obj, "__dict__", None)
    if own is None:
        return False
    missing = object()
    previous = own.get(attr, missing)
    try:
        setattr(obj, attr, new)
    except (AttributeError, TypeError):
        return False

    def restore() -> None:
        if previous is missing:
            own.pop(attr, None)
        else:
            own[attr] = previous

    undo.append(restore)
    return True


class _Tee:
    """A stand-in stream that records writes and delegates everything else."""

    def __init__(self, stream: Any, write: Callable[[str], int]) -> None:
        self._stream = stream
        self.write = write

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Replayed:
    """The last expression's output of a cached cell, displayed again as ``Out[n]``.

    On a hit ``_`` and ``Out[n]`` hold this stand-in (its display), not the value itself:
    the value is not stored unless the cell assigns it to a variable.
    """

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._data, self._metadata = data, metadata

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        return dict(self._data), dict(self._metadata)

    def __repr__(self) -> str:
        return str(self._data.get("text/plain", "<cached output>"))


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def replay(outputs: list[dict[str, Any]], shell: Any) -> None:
    """Show recorded outputs again, in their order: streams are written, display data
    published, and the last expression goes through the display hook (``Out[n]``)."""
    for out in outputs:
        kind = out["output_type"]
        if kind == "stream":
            stream = getattr(sys, out["name"], sys.stdout)
            stream.write(out["text"])
            stream.flush()
        else:
            # A widget's view points at a model of the kernel that made it: show its text.
            data = {k: v for k, v in out["data"].items() if k != _WIDGET_VIEW}
            if kind == "execute_result":
                shell.displayhook(Replayed(data, out["metadata"]))
            else:
                shell.display_pub.publish(data=data, metadata=dict(out["metadata"]))


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
        self._seen: dict[str, dict[str, str]] = {}  # components last used, by cell id / name

    # -- entry point -----------------------------------------------------------------------

    def run(self, options: CellOptions, body: str) -> Any:
        """Run one ``%%task`` cell: restore it from the store or compute and commit it."""
        __tracebackhide__ = True
        code = self.shell.transform_cell(body)
        try:
            analysis = analyze_cell(code)
        except SyntaxError as exc:
            raise self._syntax_error(exc, code) from None
        name = options.name or f"cell {analysis.code_hash[:8]}"
        identity = f"cell:{options.name}" if options.name else f"cell:{analysis.code_hash[:16]}"
        cell = _Cell(options, body, analysis, name, identity)
        explicit = options.inputs is not None or options.outputs is not None
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
        from .config import get_store

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
        from .hashing import fingerprint

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
        error = self._run_nested(cell.body)
        if error is not None:
            raise error.with_traceback(_user_frames(error.__traceback__))
        return None

    def _locked(self, cell: _Cell) -> Any:
        import contextlib

        if not cell.options.lock:
            return contextlib.nullcontext()
        from .config import settings
        from .locks import default_lock_manager_for, hold

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
        from .tasks import diff_components

        if cell.options.refresh:
            cell.reasons = ["--refresh was given"]
            return
        if cell.reasons:  # expired or unreadable: already said
            return
        reference = next((self._seen[r] for r in self._refs(cell) if r in self._seen), None)
        if reference is None:
            try:
                from .config import get_metadata

                entry = get_metadata(cell.store).latest_entry(cell.identity)
                reference = entry["components"] if entry else None
            except Exception:  # the index is a convenience here; never fail the cell
                logger.debug("no metadata for explaining a miss", exc_info=True)
        if reference is None:
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
        from .metadata import RunEvent
        from .tasks import _metadata_for

        event = RunEvent(
            run_id=cell.run_id,
            task=cell.name,
            task_identity=cell.identity,
            key=cell.key,
            state=state,
            at=time.time(),
            notebook=_identity.notebook_path(),
            cell=_identity.current_cell(),
            tags=("cell",),
            inputs=", ".join(cell.inputs) or None,
            **fields,
        )
        _metadata_for(cell.store, lambda m: m.record_run(event))

    def _index(self, cell: _Cell, manifest: Manifest) -> None:
        from .metadata import CacheEntry
        from .tasks import _metadata_for

        entry = CacheEntry.from_manifest(manifest, task_identity=cell.identity)
        entry = dataclasses.replace(entry, task=cell.name)
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


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"
