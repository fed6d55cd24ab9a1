"""What a ``%%task`` cell reads and writes, from its code (``ast`` + ``symtable``).

Step 1 of :mod:`notebook_flow.cells`: :func:`analyze_cell` and the walker behind it.
:func:`normalized_code_hash` is the ``cell code`` part of every cell's key.
"""

from __future__ import annotations

import ast
import dataclasses
import symtable
import sys
from collections.abc import Iterator

import xxhash

__all__ = ["CellAnalysis", "analyze_cell", "normalized_code_hash"]

# Calls that read or write the namespace behind the analysis' back.
_OPAQUE_CALLS = {
    "exec": "calls `exec`",
    "eval": "calls `eval`",
    "globals": "calls `globals()`",
    "locals": "calls `locals()`",
    "vars": "calls `vars()`",
}


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
    #: Dotted attribute chains the cell assigns or deletes at the top level
    #: (``("torch", "backends", "cudnn", "deterministic")`` for
    #: ``torch.backends.cudnn.deterministic = True``): where they end on a module, that
    #: module attribute is state the cell changes.
    attribute_stores: tuple[tuple[str, ...], ...] = ()


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


def _attribute_chain(node: ast.AST) -> tuple[str, ...] | None:
    """``("a", "b", "c")`` for the target ``a.b.c``; None for anything else (``a[0].b``)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or not parts:
        return None
    return (node.id, *reversed(parts))


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
        self.attribute_stores: dict[tuple[str, ...], None] = {}  # ordered set

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

    def store_target(self, target: ast.AST, defined: set[str]) -> None:
        """An assignment target: names are bound, subscripts/attributes mutate their base."""
        if isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self.store_target(elt, defined)
        elif isinstance(target, ast.Starred):
            self.store_target(target.value, defined)
        elif isinstance(target, ast.Name):
            # Bound from here on in this block (``defined`` is the block's own copy when
            # the block may not run, so a later read outside it still counts).
            defined.add(target.id)
        else:
            # a[i] = …, a.b = …: evaluates `a` (a read unless bound before) and mutates it.
            self.loads(target, defined)
            chain = _attribute_chain(target)
            if chain is not None:
                self.attribute_stores.setdefault(chain)
            base = _base_name(target)
            if base is not None:
                self.mutated.add(base)

    # -- statements -----------------------------------------------------------------------

    def block(self, body: list[ast.stmt], defined: set[str]) -> None:
        for stmt in body:
            self.stmt(stmt, defined)

    def stmt(self, node: ast.stmt, defined: set[str]) -> None:
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
            defined.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for part in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
                self.loads(part, defined)
            # The class body runs now, in its own namespace.
            self.block(node.body, set(defined))
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    self.opaque.setdefault("uses `import *`")
                else:
                    defined.add(_bound_by_import(alias))
        elif isinstance(node, ast.Assign):
            self.loads(node.value, defined)
            for target in node.targets:
                self.store_target(target, defined)
        elif isinstance(node, ast.AnnAssign):
            self.loads(node.value, defined)
            if node.value is not None:
                self.store_target(node.target, defined)
        elif isinstance(node, ast.AugAssign):
            # x += 1 reads x first.
            if isinstance(node.target, ast.Name) and node.target.id not in defined:
                self.reads.setdefault(node.target.id)
            self.loads(node.value, defined)
            self.store_target(node.target, defined)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.deletes.add(target.id)
                    defined.discard(target.id)
                else:
                    self.store_target(target, defined)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self.loads(node.iter, defined)
            inner = set(defined)
            self.store_target(node.target, inner)
            self.block(node.body, inner)
            self.block(node.orelse, set(defined))
        elif isinstance(node, (ast.While, ast.If)):
            self.loads(node.test, defined)
            self.block(node.body, set(defined))
            self.block(node.orelse, set(defined))
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                self.loads(item.context_expr, defined)
                if item.optional_vars is not None:
                    self.store_target(item.optional_vars, defined)
                    self.context_names.update(_target_names(item.optional_vars))
            self.block(node.body, defined)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            self.block(node.body, set(defined))  # type: ignore[attr-defined]
            for handler in node.handlers:  # type: ignore[attr-defined]
                self.loads(handler.type, defined)
                self.block(handler.body, set(defined))
            self.block(node.orelse, set(defined))  # type: ignore[attr-defined]
            self.block(node.finalbody, set(defined))  # type: ignore[attr-defined]
        elif isinstance(node, ast.Match):
            self.loads(node.subject, defined)
            for case in node.cases:
                self.loads(case.guard, defined)
                self.block(case.body, set(defined))
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
    if sys.version_info >= (3, 12):
        # PEP 709 inlines comprehensions: their loop variables show up in the top-level
        # table as assigned, though a run of the cell leaves no such variable behind.
        bound -= _comprehension_only_targets(code)
    nested: set[str] = set()
    todo = list(table.get_children())
    while todo:
        child = todo.pop()
        todo.extend(child.get_children())
        nested.update(
            s.get_name() for s in child.get_symbols() if s.is_global() and s.is_referenced()
        )
    return bound, nested


def _comprehension_only_targets(code: str) -> set[str]:
    """Names bound as a comprehension's loop variable and stored nowhere else in ``code``."""
    tree = ast.parse(code)
    in_targets: set[int] = set()
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.comprehension):
            for name in ast.walk(node.target):
                if isinstance(name, ast.Name):
                    in_targets.add(id(name))
                    targets.add(name.id)
    elsewhere = {
        n.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and id(n) not in in_targets
    }
    return targets - elsewhere


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


def normalized_code_hash(tree: ast.AST, quiet: bool = False) -> str:
    """A hash of the code's syntax tree: comments, blank lines and spacing don't count.

    ``quiet`` (a trailing ``;``, which the tree does not show) counts: it decides whether
    the last value is displayed.
    """
    text = ast.dump(tree, annotate_fields=False) + (";" if quiet else "")
    return xxhash.xxh3_128_hexdigest(text.encode())


def ends_with_semicolon(code: str) -> bool:
    """True when the code's last token is ``;``: IPython then hides the last value (the
    same test as IPython's ``DisplayHook.semicolon_at_end_of_expression``)."""
    import io
    import tokenize

    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):
        return False
    skip = (tokenize.ENDMARKER, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)
    for token in reversed(tokens):
        if token.type in skip:
            continue
        return token.type == tokenize.OP and token.string == ";"
    return False


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
        code_hash=normalized_code_hash(tree, ends_with_semicolon(code)),
        reads=tuple(reads),
        writes=frozenset(writes),
        definitions=definitions,
        deletes=frozenset(walker.deletes),
        context_names=frozenset(walker.context_names),
        attributes={k: frozenset(v) for k, v in walker.attributes.items()},
        opaque=tuple(opaque),
        tree=tree,
        attribute_stores=tuple(walker.attribute_stores),
    )
