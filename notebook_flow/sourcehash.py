"""Deep, stable hashes of the code a task runs: the ``TASK_SOURCE`` cache policy.

``source_components(fn)`` walks from a function to everything its behaviour depends on and
hashes each piece separately, so a cache miss can say *what* changed::

    >>> source_components(train)                                   # doctest: +SKIP
    {'source of task `train`': '9c1e…', 'source of helper `clean`': '03ab…',
     'global `THRESHOLD`': '5d7f…', 'closure `n`': 'e210…', 'class `Model`': '77c4…',
     'package `numpy`': 'a1f0…'}

What is followed, and how each piece is hashed:

* user functions (notebook cells, ``__main__``, modules outside site-packages and the
  stdlib) by their *normalized source*: ``ast.dump`` of the parsed definition with
  docstrings and the outermost decorators removed, so comments, whitespace and docstrings
  don't count. Without source (``exec``'d code, lambdas) the code object is hashed instead.
  Their globals, closures, ``mod.attr`` references and local imports are followed in turn;
* user classes by :func:`class_fingerprint` (their methods are followed too);
* third-party functions, classes and modules by the version of their package;
* the stdlib and builtins not at all;
* anything else (constants, arrays, configuration dicts, instances) by
  ``notebook_flow.hashing.fingerprint`` of its value.

How one function's code is hashed, and where code lives (user, library, stdlib), is in
``_codehash``; this module follows references and keeps the results.

Two caches keep repeated calls cheap: the parse of each code object (done once), and the
whole result per root function, kept with *guards* that re-check, on every call, exactly
what the result was built from: each function's ``__code__``, each global lookup and
closure cell by identity, and the fingerprint of each mutable value (a dict or array
changed in place must change the key, so those are re-hashed on every call).
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import inspect
import logging
import operator
import re
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any, Final, Literal

from ._codehash import (
    IdMap,
    code_hash,
    code_info,
    definition_value,
    display_name,
    fingerprint_value,
    function_kind,
    function_source,
    hash_parts,
    is_immutable,
    module_kind,
    package_of,
    path_kind,
    type_name,
)

__all__ = ["class_fingerprint", "function_fingerprint", "source_components"]

logger = logging.getLogger("notebook_flow")

_MISSING: Final = object()
_FunctionType = types.FunctionType

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


# --------------------------------------------------------------------------- classes

_CLASS_SKIP: Final = frozenset(
    {
        "__dict__",
        "__weakref__",
        "__module__",
        "__doc__",
        "__qualname__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
        "__annotations__",
        "__annotate__",
        "__annotate_func__",
        "__annotations_cache__",
        "__dataclass_fields__",
        "__dataclass_params__",
        "__match_args__",
        "__slotnames__",
        "__abstractmethods__",
        "_abc_impl",
        "__protocol_attrs__",
        "__non_callable_proto_members__",
        # pydantic's compiled schema, validator and serializer: derived from the fields,
        # annotations, config and validators hashed above, but they embed per-process ids,
        # so hashing them gave a pydantic class a new fingerprint in every process.
        "__pydantic_core_schema__",
        "__pydantic_validator__",
        "__pydantic_serializer__",
    }
)
_DATACLASS_PARAMS: Final = (
    "init",
    "repr",
    "eq",
    "order",
    "unsafe_hash",
    "frozen",
    "match_args",
    "kw_only",
    "slots",
)


def _functions_in(attr: object) -> list[types.FunctionType]:
    """The plain functions behind a class attribute (methods, properties, ...)."""
    if type(attr) is _FunctionType:
        return [attr]
    if isinstance(attr, (staticmethod, classmethod)):
        inner = attr.__func__
        return [inner] if type(inner) is _FunctionType else []
    if isinstance(attr, property):
        return [f for f in (attr.fget, attr.fset, attr.fdel) if type(f) is _FunctionType]
    if isinstance(attr, functools.cached_property):
        return [attr.func] if type(attr.func) is _FunctionType else []
    return []


def _is_generated(fn: types.FunctionType) -> bool:
    """Methods that dataclasses, namedtuple, attrs, ... wrote with exec: hash, don't walk."""
    return path_kind(fn.__code__.co_filename) is None


def _method_part(fn: types.FunctionType) -> str:
    kind = function_kind(fn)
    if kind == "user":
        if _is_generated(fn):
            return hash_parts("generated", code_hash(fn.__code__), _function_source_defaults(fn))
        return function_source(fn)
    return f"lib:{fn.__module__}.{fn.__qualname__}"


def _function_source_defaults(fn: types.FunctionType) -> str:
    parts = [definition_value(v) for v in fn.__defaults__ or ()]
    parts += [f"{k}={definition_value(v)}" for k, v in sorted((fn.__kwdefaults__ or {}).items())]
    return ",".join(parts)


def _class_ref(cls: type) -> str:
    kind = module_kind(cls.__module__)
    if kind == "user":
        return "user:" + class_fingerprint(cls)
    if kind == "library":
        package = package_of(cls.__module__)
        return f"lib:{package[1] if package else ''}:{cls.__module__}.{cls.__qualname__}"
    return f"std:{cls.__module__}.{cls.__qualname__}"


def _annotation_text(value: object) -> str:
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _attr_part(attr: object) -> str:
    functions = _functions_in(attr)
    if functions:
        parts = [_method_part(f) for f in functions]
        return f"{type(attr).__name__}({','.join(parts)})"
    if isinstance(attr, type):
        return _class_ref(attr) if module_kind(attr.__module__) != "user" else _nested_class(attr)
    if is_immutable(attr) or not callable(attr):
        # Class-level data by value, mutable or not: the class body's text is not hashed,
        # so `OPTIONS = {...}` edits show only here. (Mutable ones as they were when the
        # class was fingerprinted: guards re-check identities, not contents.)
        try:
            return "v:" + fingerprint_value(attr)
        except Exception as exc:
            logger.debug("class attribute of type %s hashed by type: %r", type_name(attr), exc)
            return "t:" + type_name(attr)
    return definition_value(attr)


_busy = threading.local()


def _nested_class(cls: type) -> str:
    active: set[int] = _busy.__dict__.setdefault("classes", set())
    if id(cls) in active:  # a class reachable from itself (A.me = A)
        return f"cycle:{cls.__qualname__}"
    return "user:" + class_fingerprint(cls)


class _ClassEntry:
    __slots__ = ("bases", "fingerprint", "functions", "ref", "user_bases", "values")

    def __init__(self, cls: type, fingerprint: str) -> None:
        self.ref = weakref.ref(cls)
        self.fingerprint = fingerprint
        self.values = tuple(vars(cls).values())
        self.bases = cls.__bases__
        self.functions = [
            (f, f.__code__, f.__defaults__, f.__kwdefaults__)
            for attr in self.values
            for f in _functions_in(attr)
        ]
        self.user_bases = [
            (b, class_fingerprint(b)) for b in self.bases if module_kind(b.__module__) == "user"
        ]

    def valid(self, cls: type) -> bool:
        values = tuple(vars(cls).values())
        if len(values) != len(self.values) or not all(map(operator.is_, values, self.values)):
            return False
        if cls.__bases__ is not self.bases:
            return False
        for f, code, defaults, kwdefaults in self.functions:
            if (
                f.__code__ is not code
                or f.__defaults__ is not defaults
                or f.__kwdefaults__ is not kwdefaults
            ):
                return False
        return all(class_fingerprint(b) == fp for b, fp in self.user_bases)


_CLASSES = IdMap()


def class_fingerprint(cls: type) -> str:
    """One hash of a class's definition; works for classes defined in notebook cells.

    Built from the class's own attributes rather than ``inspect.getsource`` (which fails
    for notebook classes): methods, properties, static/class methods by normalized source
    and defaults, class-level data by value, annotations, dataclass fields, enum members,
    and bases (user bases recursively, library bases by package version). Methods'
    *dependencies* (helpers, globals) are not included; :func:`source_components` follows
    those. The result is cached while the class's attributes and its methods' code stay
    the same objects, so a class-level dict filled in place keeps its first hash.

    >>> class Point:
    ...     def norm(self): return (self.x ** 2 + self.y ** 2) ** 0.5
    >>> len(class_fingerprint(Point))
    32
    """
    entry: _ClassEntry | None = _CLASSES.get(cls)
    if entry is not None and entry.valid(cls):
        return entry.fingerprint
    if module_kind(cls.__module__) != "user":
        return hash_parts("class", _class_ref(cls))
    active: set[int] = _busy.__dict__.setdefault("classes", set())
    if id(cls) in active:  # reached from itself (a class attribute holding an instance)
        return hash_parts("cycle", cls.__qualname__)
    active.add(id(cls))
    try:
        fingerprint = _compute_class_fingerprint(cls)
    finally:
        active.discard(id(cls))
    _CLASSES.set(cls, _ClassEntry(cls, fingerprint))
    return fingerprint


def _compute_class_fingerprint(cls: type) -> str:
    parts = ["class", cls.__qualname__, "bases:" + ",".join(_class_ref(b) for b in cls.__bases__)]
    if type(cls) is not type:
        parts.append("meta:" + _class_ref(type(cls)))
    members: dict[str, Any] = (
        dict(getattr(cls, "__members__", {})) if issubclass(cls, enum.Enum) else {}
    )
    for name, attr in sorted(vars(cls).items()):
        if name in _CLASS_SKIP or name in members:
            continue
        if members and name.startswith("_") and name.endswith("_") and not name.startswith("__"):
            continue  # enum machinery (_member_map_, _value2member_map_, ...)
        if name == "__pydantic_decorators__":
            parts.append(f"{name}={_pydantic_decorators_part(attr)}")
            continue
        parts.append(f"{name}={_attr_part(attr)}")
    for name, member in members.items():
        parts.append(f"member {name}={definition_value(member.value)}")
    try:
        annotations = inspect.get_annotations(cls)
    except Exception:  # unresolvable forward references on newer Pythons
        annotations = {}
    for name, annotation in sorted(annotations.items()):
        parts.append(f"annotation {name}: {_annotation_text(annotation)}")
    fields = vars(cls).get("__dataclass_fields__")
    if isinstance(fields, dict):
        params = vars(cls).get("__dataclass_params__")
        parts.append(
            "dataclass("
            + ",".join(f"{p}={getattr(params, p, None)!r}" for p in _DATACLASS_PARAMS)
            + ")"
        )
        for name, field in fields.items():
            default = getattr(field, "default", None)
            factory = getattr(field, "default_factory", None)
            parts.append(
                f"field {name}: {_annotation_text(getattr(field, 'type', None))}"
                f" default={_field_default(default)} factory={_field_default(factory)}"
                f" {getattr(field, 'init', None)}{getattr(field, 'repr', None)}"
                f"{getattr(field, 'compare', None)}{getattr(field, 'kw_only', None)}"
            )
    return hash_parts(*parts)


_ADDRESS: Final = re.compile(r" at 0x[0-9a-fA-F]+")


def _pydantic_decorators_part(infos: object) -> str:
    """pydantic's validators/serializers by what they apply to (fields, mode); their
    functions are hashed as class members. Not by value: each entry names its class by id."""
    parts = []
    kinds = getattr(type(infos), "__dataclass_fields__", None) or getattr(infos, "__dict__", {})
    for kind in sorted(kinds):
        entries = getattr(infos, kind, None)
        if not isinstance(entries, dict):
            continue
        for name, decorator in sorted(entries.items()):
            # e.g. FieldValidatorDecoratorInfo(fields=('a',), mode='after', ...); any
            # object address in it is dropped.
            info = _ADDRESS.sub("", repr(getattr(decorator, "info", None)))
            parts.append(f"{kind}.{name}:{info}")
    return ";".join(parts)


def _field_default(value: object) -> str:
    if type(value).__name__ == "_MISSING_TYPE":
        return "-"
    if type(value) is _FunctionType and function_kind(value) == "user":
        return function_source(value)
    return definition_value(value)


# --------------------------------------------------------------------------- the walk


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


# --------------------------------------------------------------------------- public API

_RESULTS = IdMap()


def _root(fn: Any) -> Any:
    """The plain function behind a Task, partial, bound method or wrapper."""
    for _ in range(50):
        if type(fn) is _FunctionType:
            return fn
        if _is_task(fn):
            fn = fn.fn
        elif isinstance(fn, (types.MethodType, staticmethod, classmethod)):
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            fn = fn.func
        elif _getattr(fn, "__wrapped__") is not None:
            fn = fn.__wrapped__
        else:
            break
    return fn


_RESULT_DATA = _RESULTS.data


def _entry(fn: Any) -> _Entry:
    root = fn if type(fn) is _FunctionType else _root(fn)
    cached = _RESULT_DATA.get(id(root))
    if cached is not None and cached[0]() is root:
        entry: _Entry = cached[1]
        if not entry.rehashes:
            if entry.valid():
                return entry
        else:
            active: set[int] = _busy.__dict__.setdefault("roots", set())
            if id(root) not in active:  # see _compute
                active.add(id(root))
                try:
                    if entry.valid():
                        return entry
                finally:
                    active.discard(id(root))
    return _compute(root)


def _compute(root: Any) -> _Entry:
    entry = _Entry()
    entry.name = f"source of task `{display_name(root)}`"
    active: set[int] = _busy.__dict__.setdefault("roots", set())
    if type(root) is not _FunctionType or function_kind(root) != "user":
        _compute_other(entry, root)  # not cached: cheap, and rare as a task
        return entry
    if id(root) in active:
        # Re-entered while hashing one of our own globals (a dict holding this very
        # function, say): the shallow source breaks the cycle, deterministically.
        entry.root = function_source(root)
        return entry
    active.add(id(root))
    try:
        _Walk(entry, root.__globals__).function(root, root=True)
    finally:
        active.discard(id(root))
    entry.seal()
    _RESULTS.set(root, entry)
    return entry


def _compute_other(entry: _Entry, root: Any) -> None:
    """Roots that are not user functions: classes, callable instances, library callables."""
    walk = _Walk(entry, {})
    if isinstance(root, type):
        entry.root = class_fingerprint(root)
        walk.klass(root)
        return
    kind = module_kind(getattr(root, "__module__", None) or type(root).__module__)
    if kind == "user":
        entry.root = _safe_fingerprint(root) or hash_parts("unhashable", type_name(root))
        walk.klass(type(root))
    else:
        entry.root = hash_parts("callable", type_name(root), display_name(root))
        walk.code(root, "", ())


def source_components(fn: Callable[..., Any], *, label: str | None = None) -> dict[str, str]:
    """The deep TASK_SOURCE of ``fn`` as ``{human label: 32-hex hash}``.

    ``label`` names the root component: a name (``"load"`` gives "source of task
    `load`") or a full label (anything containing a backtick is used verbatim).
    Deterministic across processes; a repeated call for an unchanged function costs a few
    microseconds (plus re-hashing any mutable globals it reads).

    >>> THRESHOLD = 3
    >>> def f(x):
    ...     return x > THRESHOLD
    >>> sorted(source_components(f))  # doctest: +SKIP
    ['global `THRESHOLD`', 'source of task `f`']
    """
    entry = _entry(fn)
    last = entry.output
    if last is not None and last[0] == label:
        return last[1].copy()
    if label is None:
        root_label = entry.name
    else:
        root_label = label if "`" in label else f"source of task `{label}`"
    out = {root_label: entry.root}
    out.update(entry.result)
    entry.output = (label, out)
    return out.copy()


def function_fingerprint(fn: Callable[..., Any]) -> str:
    """One hash over :func:`source_components` of ``fn`` (labels included).

    >>> def f(x):
    ...     return x + 1
    >>> len(function_fingerprint(f))
    32
    """
    entry = _entry(fn)
    if entry.fingerprint is None:
        parts = sorted(entry.result.items())
        entry.fingerprint = hash_parts(entry.name, entry.root, *(f"{k}={v}" for k, v in parts))
    return entry.fingerprint
