"""Class fingerprints: one hash of a class's definition, for classes in notebook cells too.

:func:`class_fingerprint` is built from the class's own attributes (methods by normalized
source, class-level data by value, annotations, dataclass fields, enum members, bases), not
from ``inspect.getsource``, and is cached per class while those attributes stay the same
objects. The dependency walk (:mod:`.walk`) follows what the methods call.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import operator
import re
import threading
import types
import weakref
from typing import Any, Final

from notebook_flow._codehash import (
    IdMap,
    code_hash,
    definition_value,
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

logger = logging.getLogger("notebook_flow")

_FunctionType = types.FunctionType

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


# Per thread, what is being hashed right now: "classes" here, "roots" in .components.
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
