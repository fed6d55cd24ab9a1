"""The dependency walk: from one function to every piece its behaviour depends on.

A :class:`_Walk` follows a root function's globals, closures, ``mod.attr`` references,
local imports, classes and wrapped callables, adding one component per piece to an
:class:`_Entry`, together with the guards (identities, and fingerprints of mutable values)
that :meth:`_Entry.valid` re-checks on every later call.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import operator
import sys
import types
from typing import Any, Final, Literal

from notebook_flow._codehash import (
    code_info,
    fingerprint_value,
    function_kind,
    function_source,
    hash_parts,
    is_immutable,
    module_kind,
    package_of,
    type_name,
)

from .classes import _functions_in, _FunctionType, _is_generated, class_fingerprint

logger = logging.getLogger("notebook_flow")

_MISSING: Final = object()

_warned: set[tuple[str, str]] = set()


def _warn_unhashable(label: str, value: object, exc: BaseException) -> None:
    key = (label, type_name(value))
    if key not in _warned:
        _warned.add(key)
        logger.warning(
            "TASK_SOURCE cannot see changes in %s: a %s has no stable fingerprint, so the "
            "cache key counts only its type. Pass it to the task as an argument, or "
            "register_fingerprint() for its class, to key on its content.",
            label,
            key[1],
        )
        logger.debug("fingerprint of %s failed: %r", label, exc)


class _Entry:
    """A computed result and the guards that say whether it still holds.

    Plain loops with identity checks: on a 2-core machine they beat building tuples with
    ``map`` (about 1.5 µs for a task with five helpers, five globals and a class).
    """

    __slots__ = (
        "cells_same",
        "cells_value",
        "fingerprint",
        "functions",
        "mappings",
        "name",
        "ns_same",
        "ns_value",
        "objects",
        "output",
        "rehashes",
        "result",
        "root",
    )

    def __init__(self) -> None:
        self.name = ""  # the default root label
        self.root = ""  # the root function's own component; its label is chosen per call
        self.result: dict[str, str] = {}  # every other component
        self.fingerprint: str | None = None
        self.output: tuple[str | None, dict[str, str]] | None = None  # last label and result
        # What the walk read, re-checked by identity on every call:
        self.functions: list[tuple[Any, Any, Any, Any]] = []  # fn, __code__, defaults, kwdefaults
        self.ns_same: list[tuple[dict[str, Any], str, object]] = []  # namespace, name, value
        self.cells_same: list[tuple[Any, object]] = []  # closure cell, value
        # Live mappings (a class's __dict__, a singledispatch registry) and their values:
        self.mappings: list[tuple[types.MappingProxyType[Any, Any], tuple[object, ...]]] = []
        # Mutable values, re-hashed on every call:
        self.ns_value: list[tuple[dict[str, Any], str, str]] = []
        self.cells_value: list[tuple[Any, str]] = []
        self.objects: list[tuple[object, str]] = []  # bound instances, partial arguments
        self.rehashes = False

    def seal(self) -> None:
        self.rehashes = bool(self.ns_value or self.cells_value or self.objects)

    def valid(self) -> bool:
        missing = _MISSING
        for fn, code, defaults, kwdefaults in self.functions:
            if (
                fn.__code__ is not code
                or fn.__defaults__ is not defaults
                or fn.__kwdefaults__ is not kwdefaults
            ):
                return False
        for ns, name, value in self.ns_same:
            if ns.get(name, missing) is not value:
                return False
        for cell, value in self.cells_same:
            if _cell_value(cell) is not value:
                return False
        for mapping, values in self.mappings:
            now = tuple(mapping.values())
            if len(now) != len(values) or not all(map(operator.is_, now, values)):
                return False
        if not self.rehashes:
            return True
        # Mutable values: re-hash (a dict or array changed in place must change the key).
        for ns, name, fp in self.ns_value:
            value = ns.get(name, missing)
            if value is missing or _safe_fingerprint(value) != fp:
                return False
        for cell, fp in self.cells_value:
            value = _cell_value(cell)
            if value is missing or _safe_fingerprint(value) != fp:
                return False
        return all(_safe_fingerprint(obj) == fp for obj, fp in self.objects)


def _cell_value(cell: Any) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell: the variable is not assigned yet
        return _MISSING


def _safe_fingerprint(value: object) -> str | None:
    try:
        return fingerprint_value(value)
    except Exception:
        return None


_Where = (
    tuple[Literal["ns"], dict[str, Any], str] | tuple[Literal["cell"], Any] | tuple[Literal["obj"]]
)


class _Walk:
    """One traversal from a root function; fills an _Entry with components and guards."""

    def __init__(self, entry: _Entry, root_ns: dict[str, Any]) -> None:
        self.entry = entry
        self.out = entry.result
        self.root_ns = root_ns
        self.root_module = root_ns.get("__name__")
        self.seen: set[int] = set()
        self.seen_names: set[tuple[int, str]] = set()
        self.keep: list[object] = []  # keeps visited objects alive, so ids stay unique

    # --- labels and output

    def add(self, label: str, digest: str) -> None:
        out, n, unique = self.out, 2, label
        while unique in out and out[unique] != digest:
            unique, n = f"{label} #{n}", n + 1
        out[unique] = digest

    def name(self, module: str | None, qualname: str) -> str:
        name = qualname.replace(".<locals>.", ".")
        return name if not module or module == self.root_module else f"{module}.{name}"

    def once(self, obj: object) -> bool:
        if id(obj) in self.seen:
            return False
        self.seen.add(id(obj))
        self.keep.append(obj)
        return True

    # --- functions

    def function(
        self, fn: types.FunctionType, *, emit: bool = True, root: bool = False, via: str = ""
    ) -> None:
        if not self.once(fn):
            return
        code = fn.__code__
        self.entry.functions.append((fn, code, fn.__defaults__, fn.__kwdefaults__))
        info = code_info(fn)
        name = self.name(fn.__module__, fn.__qualname__)
        if root:
            self.entry.root = function_source(fn)
        elif emit:
            if code.co_name == "<lambda>" and via:  # name a lambda by what refers to it
                name = via
            self.add(f"source of helper `{name}`", function_source(fn))
        for var, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
            if var == "__class__":
                continue
            value = _cell_value(cell)
            if value is _MISSING:
                self.entry.cells_same.append((cell, _MISSING))
                continue
            label_ = f"closure `{var}`" if root else f"closure `{var}` of `{name}`"
            self.value(value, label_, info.attrs, ("cell", cell))
        ns = fn.__globals__
        for gname in info.globals:
            self.global_name(ns, gname, info.attrs)
        for module_name, level in info.imports:
            self.local_import(ns, module_name, level, info.attrs)

    def global_name(self, ns: dict[str, Any], name: str, attrs: tuple[str, ...]) -> None:
        key = (id(ns), name)
        if key in self.seen_names:
            return
        self.seen_names.add(key)
        value = ns.get(name, _MISSING)
        if value is _MISSING:  # a builtin, or not defined (yet): re-check it stays so
            self.entry.ns_same.append((ns, name, _MISSING))
            return
        qualified = name if ns is self.root_ns else f"{ns.get('__name__', '?')}.{name}"
        self.value(value, f"global `{qualified}`", attrs, ("ns", ns, name))

    def local_import(
        self, ns: dict[str, Any], name: str, level: int, attrs: tuple[str, ...]
    ) -> None:
        if level:
            try:
                name = importlib.util.resolve_name("." * level + name, ns.get("__package__"))
            except (ImportError, ValueError):
                return
        module = sys.modules.get(name, _MISSING)
        self.entry.ns_same.append((sys.modules, name, module))
        if isinstance(module, types.ModuleType):
            self.module(module, attrs)

    def module(self, module: types.ModuleType, attrs: tuple[str, ...]) -> None:
        kind = module_kind(module.__name__)
        if kind == "library":
            self.package(module.__name__)
        elif kind == "user":
            ns = vars(module)
            for name in attrs:  # `utils.clean`, `pkg.sub.f`: the attributes the code reads
                if name in ns:
                    self.global_name(ns, name, attrs)

    def package(self, module_name: str | None) -> None:
        component = package_of(module_name)
        if component is not None:
            self.add(*component)

    def watch(self, mapping: types.MappingProxyType[Any, Any]) -> None:
        self.entry.mappings.append((mapping, tuple(mapping.values())))

    # --- classes

    def klass(self, cls: type) -> None:
        if not self.once(cls):
            return
        kind = module_kind(cls.__module__)
        if kind != "user":
            if kind == "library":
                self.package(cls.__module__)
            return
        self.add(f"class `{self.name(cls.__module__, cls.__qualname__)}`", class_fingerprint(cls))
        self.watch(cls.__dict__)
        for base in (*cls.__bases__, type(cls)):
            if base is not object and base is not type:
                self.klass(base)
        for attr in vars(cls).values():
            if isinstance(attr, type):
                self.klass(attr)
            for fn in _functions_in(attr):
                if function_kind(fn) == "user" and not _is_generated(fn):
                    self.function(fn, emit=False)  # source is in the class; follow its calls

    # --- any value

    def value(self, value: object, label: str, attrs: tuple[str, ...], where: _Where) -> None:
        if self.code(value, label, attrs):
            self.same(where, value)
            return
        try:
            digest = fingerprint_value(value)
        except Exception as exc:
            _warn_unhashable(label, value, exc)
            digest = hash_parts("unhashable", type_name(value))
            self.same(where, value)
        else:
            if is_immutable(value):
                self.same(where, value)
            elif where[0] == "ns":
                self.entry.ns_value.append((where[1], where[2], digest))
            elif where[0] == "cell":
                self.entry.cells_value.append((where[1], digest))
            else:
                self.entry.objects.append((value, digest))
        self.add(label, digest)
        kind = module_kind(type(value).__module__)
        if kind == "user":
            self.klass(type(value))  # an instance: follow what its methods call
        elif kind == "library":
            self.package(type(value).__module__)

    def same(self, where: _Where, value: object) -> None:
        if where[0] == "ns":
            self.entry.ns_same.append((where[1], where[2], value))
        elif where[0] == "cell":
            self.entry.cells_same.append((where[1], value))

    def code(self, value: object, label: str, attrs: tuple[str, ...]) -> bool:
        """Follow ``value`` if it is code (function, class, module, ...); False for data."""
        t = type(value)
        if t is _FunctionType:
            fn: types.FunctionType = value  # type: ignore[assignment]
            kind = function_kind(fn)
            if kind == "user":
                self.function(fn, via=label.partition("`")[2].partition("`")[0])
                return True
            if not self.once(fn):
                return True
            if kind == "library":
                self.package(fn.__module__)
            # A library decorator's wrapper (functools.wraps, singledispatch) around user code.
            wrapped = _getattr(fn, "__wrapped__")
            if wrapped is not None:
                self.code(wrapped, label, attrs)
            registry = _getattr(fn, "registry")
            if isinstance(registry, types.MappingProxyType) and _getattr(fn, "dispatch"):
                self.watch(registry)
                for impl in list(registry.values()):
                    self.code(impl, label, attrs)
            return True
        if t is types.ModuleType:
            self.module(value, attrs)  # type: ignore[arg-type]
            return True
        if isinstance(value, type):
            self.klass(value)
            return True
        if isinstance(value, types.GenericAlias) or t.__module__ == "typing":
            return True  # type aliases: list[int], Optional[X]
        if t is types.MethodType:
            func, owner = value.__func__, value.__self__  # type: ignore[attr-defined]
            self.code(func, label, attrs)
            if (
                type(func) is _FunctionType
                and function_kind(func) == "user"
                and not self.code(owner, label, attrs)
            ):
                self.value(owner, label, attrs, ("obj",))  # the bound instance's state
            return True
        if isinstance(value, functools.partial):
            self.code(value.func, label, attrs)
            self.value((value.args, value.keywords), label, attrs, ("obj",))
            return True
        if isinstance(value, (staticmethod, classmethod)):
            self.code(value.__func__, label, attrs)
            return True
        if t is types.BuiltinFunctionType:
            owner = value.__self__  # type: ignore[attr-defined]
            module = getattr(value, "__module__", None)
            if module is None and isinstance(owner, types.ModuleType):
                module = owner.__name__
            if module is not None and module_kind(module) == "library":
                self.package(module)
            return True
        if is_immutable(value):
            return False
        if _is_task(value):
            self.code(value.fn, label, attrs)  # type: ignore[attr-defined]
            return True
        if not callable(value):
            return False
        wrapped = _getattr(value, "__wrapped__")
        if wrapped is not None:  # functools.lru_cache, wraps-style decorators
            if self.once(value):
                self.code(wrapped, label, attrs)
            if module_kind(t.__module__) == "library":
                self.package(t.__module__)
            return True
        if isinstance(_getattr(value, "__name__"), str):  # a named library object (np.add)
            home = _getattr(value, "__module__") or t.__module__
            kind = module_kind(home) if isinstance(home, str) else "user"
            if kind != "user":
                if kind == "library":
                    self.package(home)
                return True
        return False


def _getattr(obj: object, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:  # proxies and lazy objects may raise anything
        return None


def _is_task(value: object) -> bool:
    return _getattr(value, "__notebook_flow_task__") is True and _getattr(value, "fn") is not None
