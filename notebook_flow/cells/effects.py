"""Effects through calls: what a cell changes without naming it.

``def draw(): return rs.normal()`` then ``print(draw())``: the cell's code never mentions
``rs``, yet running it advances that generator, and the next cell sees the difference. The
functions a cell reads were already walked for its key
(:mod:`notebook_flow.sourcehash.walk`): the walk lists every global, closure variable and
bound object they reach, with a fingerprint of each mutable one. :func:`watch` takes that
list before the cell runs; :meth:`Watches.changed` compares after it ran. What changed is an
output of the cell (stored, and restored on a hit: in place where the live object can take
it, so aliases stay aliases).

A reachable mutable object with no stable fingerprint cannot be compared, so a cell that
calls a function reaching one is run uncached with that reason.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from notebook_flow._codehash import module_kind
from notebook_flow.sourcehash.walk import _MISSING as _WALK_MISSING
from notebook_flow.sourcehash.walk import _cell_value, _safe_fingerprint

__all__ = [
    "NO_STATE",
    "Target",
    "Watches",
    "code_state",
    "find_target",
    "held_functions",
    "holds_code",
    "lookup",
    "module_path",
    "reaches",
    "target_path",
    "watch",
]

_MISSING: Any = object()

#: Where a reached object lives: ``("ns", name)`` in the notebook's namespace,
#: ``("module", module, name)`` in a local module, ``("cell", function, i)`` the i-th closure
#: variable and ``("obj", function, i)`` the i-th bound object its walk meets (the walk's
#: order is fixed by the function's code and the values the key fingerprints).
Target = tuple[Any, ...]


@dataclasses.dataclass
class _Watch:
    target: Target
    before: Any  # the object (or _MISSING) the name or cell held before the run
    digest: str | None  # its fingerprint before, None for immutable values (identity only)
    # The closure cell or bound object itself: after the run it is compared directly (a
    # new walk of a function whose globals the cell changed may meet things in another
    # order; on a hit the state is the one before, so the order is the one recorded).
    ref: Any = None


@dataclasses.dataclass
class Watches:
    """The objects reachable through the functions a cell reads, as they were before it ran."""

    items: list[_Watch] = dataclasses.field(default_factory=list)
    opaque: list[str] = dataclasses.field(default_factory=list)  # reasons to run uncached

    def changed(self, user_ns: dict[str, Any]) -> list[tuple[Target, Any, bool]]:
        """``(target, value now, same object as before)`` for every watched object the cell
        changed (rebound or mutated); a target deleted has a value :func:`missing` accepts."""
        out = []
        for w in self.items:
            now = _current(w, user_ns)
            if now is not w.before:
                out.append((w.target, now, False))
            elif w.digest is not None and _safe_fingerprint(now) != w.digest:
                out.append((w.target, now, True))
        return out


def _code_like(value: Any) -> bool:
    from notebook_flow._codehash import is_immutable
    from notebook_flow.sourcehash.walk import _is_task

    return (
        value is _MISSING
        or is_immutable(value)
        or isinstance(
            value,
            (
                types.FunctionType,
                types.BuiltinFunctionType,
                types.MethodType,
                types.ModuleType,
                type,
                functools.partial,
                staticmethod,
                classmethod,
            ),
        )
        or _is_task(value)
    )


def _entry_lists(fn: Any) -> tuple[list[Any], list[Any], list[Any]] | None:
    """(namespace entries, closure cells, bound objects) the walk of ``fn`` reached."""
    from notebook_flow.sourcehash.components import _entry

    try:
        entry = _entry(fn)
    except Exception:  # the key already fingerprinted it; a failure here means nothing new
        return None
    names: list[tuple[dict[str, Any], str, Any, str | None]]
    names = [(ns, name, value, None) for ns, name, value in entry.ns_same]
    names += [(ns, name, ns.get(name, _MISSING), fp) for ns, name, fp in entry.ns_value]
    cells: list[tuple[Any, Any, str | None]]
    cells = [(cell, value, None) for cell, value in entry.cells_same]
    cells += [(cell, _cell_value(cell), fp) for cell, fp in entry.cells_value]
    objects = [(obj, fp) for obj, fp in entry.objects]
    return names, cells, objects


def watch(
    user_ns: dict[str, Any],
    function_names: list[str],
    module_attributes: Sequence[tuple[str, str]] = (),
) -> Watches:
    """Watches over what the functions ``function_names`` (read by the cell; dotted for a
    local module's function, ``helpers.clean``) reach, and over the data attributes
    ``(module, name)`` of local modules the cell reads itself."""
    from notebook_flow._codehash import module_kind, type_name

    out = Watches()
    seen: set[Target] = set()

    def add(
        fn: str, target: Target, value: Any, digest: str | None, label: str, *, ref: Any = None
    ) -> None:
        if value is _WALK_MISSING:
            value = _MISSING
        if target in seen:
            return
        seen.add(target)
        if digest is None and not _code_like(value) and _safe_fingerprint(value) is None:
            out.opaque.append(
                f"it uses `{fn}`, which reaches {label}, a {type_name(value)} with no "
                "stable fingerprint: whether the cell changes it cannot be told"
            )
        out.items.append(_Watch(target, value, digest, ref=ref))

    for module, name in module_attributes:
        value = vars(sys.modules[module]).get(name, _MISSING) if module in sys.modules else None
        digest = None if _code_like(value) else _safe_fingerprint(value)
        add(module, ("module", module, name), value, digest, f"`{module}.{name}`")
    for fn in function_names:
        lists = _entry_lists(lookup(user_ns, fn))
        if lists is None:
            continue
        names, cells, objects = lists
        for ns, name, value, digest in names:
            if ns is user_ns:
                add(fn, ("ns", name), value, digest, f"`{name}`")
            else:
                module = ns.get("__name__")
                if isinstance(module, str) and module_kind(module) == "user":
                    add(fn, ("module", module, name), value, digest, f"`{module}.{name}`")
        for i, (cell, value, digest) in enumerate(cells):
            add(fn, ("cell", fn, i), value, digest, f"a closure variable of `{fn}`", ref=cell)
        for i, (obj, digest) in enumerate(objects):
            add(fn, ("obj", fn, i), obj, digest, f"an object bound to `{fn}`", ref=obj)
    return out


def _current(w: _Watch, user_ns: dict[str, Any]) -> Any:
    """What a watched name, cell or object holds now."""
    kind = w.target[0]
    if kind == "ns":
        return user_ns.get(w.target[1], _MISSING)
    if kind == "module":
        module = sys.modules.get(w.target[1])
        return _MISSING if module is None else vars(module).get(w.target[2], _MISSING)
    if kind == "cell":
        value = _cell_value(w.ref)
        return _MISSING if value is _WALK_MISSING else value
    return w.ref


def find_target(target: Target, user_ns: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(live object, setter, deleter)`` for a target on a hit: ``setter(value)`` rebinds
    it and ``deleter()`` unbinds it (both None for a bound object, which can only be
    updated in place). Raises ``LookupError`` when the target is not there."""
    kind = target[0]
    if kind in ("ns", "module"):
        if kind == "ns":
            ns, name = user_ns, target[1]
        else:
            module = sys.modules.get(target[1])
            if module is None:
                raise LookupError(f"module {target[1]} is not imported")
            ns, name = vars(module), target[2]
        return (
            ns.get(name, _MISSING),
            functools.partial(ns.__setitem__, name),
            functools.partial(ns.pop, name, None),
        )
    lists = _entry_lists(lookup(user_ns, target[1]))
    if lists is None:
        raise LookupError(f"`{target[1]}` is not a function any more")
    if kind == "cell":
        cell = lists[1][target[2]][0]
        return (
            _cell_value(cell),
            functools.partial(setattr, cell, "cell_contents"),
            functools.partial(delattr, cell, "cell_contents"),
        )
    return lists[2][target[2]][0], None, None


def lookup(user_ns: dict[str, Any], path: str) -> Any:
    """The object a path of :func:`held_functions` or a dotted name names:
    ``user_ns["helpers"].clean`` for ``"helpers.clean"``, ``user_ns["fns"]["draw"]`` for
    ``'fns["draw"]'`` (None when not there). Only names, attributes and constant keys."""
    if path.isidentifier():  # the common case: a plain name
        return user_ns.get(path)
    try:
        node = ast.parse(path, mode="eval").body
    except SyntaxError:
        return None
    return _follow(node, user_ns)


#: :func:`code_state` of a function or class that carries no state besides its code.
NO_STATE = "-"


def code_state(value: Any) -> str | None:
    """A fingerprint of the state a notebook's function or class carries besides its code:
    a function's default arguments and attributes (``def f(x, acc=[])``, ``f.calls = 1``),
    a class's data attributes (``Counter.count``). :data:`NO_STATE` when it carries none,
    None when ``value`` is neither or its state has no stable fingerprint."""
    from notebook_flow._codehash import function_kind, module_kind
    from notebook_flow.hashing import fingerprint

    if isinstance(value, types.FunctionType):
        if function_kind(value) != "user":
            return None
        attrs = {k: v for k, v in vars(value).items() if not _dunder(k)}
        state: Any = (value.__defaults__, value.__kwdefaults__, attrs)
        if not attrs and value.__defaults__ is None and value.__kwdefaults__ is None:
            return NO_STATE
    elif isinstance(value, type):
        if module_kind(value.__module__) != "user":
            return None
        state = {
            k: v
            for k, v in vars(value).items()
            if not _dunder(k)
            and not callable(v)
            and not isinstance(v, (staticmethod, classmethod, property))
        }
        if not state:
            return NO_STATE
    else:
        return None
    try:
        return fingerprint(state)
    except Exception:  # no stable fingerprint: whether it changed cannot be told
        return None


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def module_path(module: str, name: str) -> str:
    """The path :func:`lookup` follows to a local module's global ``name``, whatever the
    notebook calls the module (``sys.modules['helpers'].REG``)."""
    return f"sys.modules[{module!r}].{name}"


def target_path(target: Target) -> str:
    """The path of a watched name (``("ns", name)``) or module global."""
    return target[1] if target[0] == "ns" else module_path(target[1], target[2])


def _follow(node: ast.expr, user_ns: dict[str, Any]) -> Any:
    if (  # sys.modules['name']: the module itself, whatever the notebook binds to `sys`
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and isinstance(node.value.value, ast.Name)
        and (node.value.value.id, node.value.attr) == ("sys", "modules")
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, str)
    ):
        return sys.modules.get(node.slice.value)
    if isinstance(node, ast.Name):
        return user_ns.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _follow(node.value, user_ns)
        return None if owner is None else getattr(owner, node.attr, None)
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        owner, key = _follow(node.value, user_ns), node.slice.value
        if type(owner) is dict:
            return owner.get(key)
        if type(owner) in (list, tuple) and type(key) is int and -len(owner) <= key < len(owner):
            return owner[key]
    return None


# --------------------------------------------------------------------------- containers

#: Containers looked into per value for functions (a bound on the cost; past it the cell
#: runs uncached, never with an unwatched function).
_MAX_CONTAINERS = 50_000
_MAX_DEPTH = 6
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_SCALAR_TYPES = frozenset(_SCALARS)


def held_functions(
    name: str, value: Any, reaches: Callable[[Any], bool]
) -> tuple[list[str], str | None]:
    """The paths of the functions (anything ``reaches`` accepts) held in the lists, tuples
    and dicts ``value`` is made of, and in the attributes of the notebook's own objects
    among them: ``['fns["draw"]', 'handlers[0]']`` for ``fns = {"draw": draw}``.

    A cell calling ``fns["draw"]()`` runs ``draw``: what ``draw`` reaches is watched like
    what a function the cell names reaches. The second item is why the cell cannot be
    cached faithfully (a function in a set or under a key no path can name, or too many
    containers to look through), None when it can.
    """
    found: list[str] = []
    seen: set[int] = set()
    budget = [_MAX_CONTAINERS]

    def visit(obj: Any, path: str | None, depth: int) -> str | None:
        t = type(obj)
        if t in _SCALARS or id(obj) in seen:
            return None
        if depth and reaches(obj):
            if path is None:
                return f"`{name}` holds a function where no name or key can reach it again"
            found.append(path)
            if not _user_object(obj):
                return None  # a function: what it reaches is its own walk's business
        seen.add(id(obj))
        items: Iterable[tuple[str | None, Any]]
        if t is list or t is tuple:
            if set(map(type, obj)) <= _SCALAR_TYPES:  # (at C speed: rows of numbers)
                return None
            items = ((_step(path, f"[{i}]"), v) for i, v in enumerate(obj))
        elif t is dict:
            items = (
                (_step(path, f"[{k!r}]") if type(k) in (str, int) else None, v)
                for k, v in obj.items()
            )
        elif t in (set, frozenset):
            items = ((None, v) for v in obj)
        elif _user_object(obj) and isinstance(getattr(obj, "__dict__", None), dict):
            items = ((_step(path, f".{k}"), v) for k, v in vars(obj).items())
        else:
            return None
        budget[0] -= 1
        if budget[0] < 0 or depth > _MAX_DEPTH:
            return (
                f"`{name}` nests too many containers to look for the functions it holds "
                "(whose effects are watched)"
            )
        for sub, item in items:
            why = visit(item, sub, depth + 1)
            if why is not None:
                return why
        return None

    why = visit(value, name, 0)
    return ([] if why else found), why


def _step(path: str | None, step: str) -> str | None:
    if path is None or (step.startswith(".") and not step[1:].isidentifier()):
        return None
    return path + step


def _user_object(obj: Any) -> bool:
    t = type(obj)
    return not isinstance(obj, type) and module_kind(t.__module__) == "user"


def missing(value: Any) -> bool:
    """True for the marker of a name or closure variable that holds nothing."""
    return value is _MISSING


def reaches(value: Any) -> bool:
    """True for values whose code can reach other objects: functions, callables, classes
    and instances of the notebook's own classes (their methods)."""
    if isinstance(value, types.ModuleType):
        return False
    return callable(value) or module_kind(type(value).__module__) == "user"


def holds_code(value: Any) -> bool:
    """Containers (and the notebook's own objects) that may hold functions to look for."""
    t = type(value)
    if t in (list, tuple, dict, set, frozenset):
        return True
    return not isinstance(value, type) and module_kind(t.__module__) == "user"
