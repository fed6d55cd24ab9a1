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

Two caches keep repeated calls cheap: the parse of each code object (done once), and the
whole result per root function, kept with *guards* that re-check, on every call, exactly
what the result was built from: each function's ``__code__``, each global lookup and
closure cell by identity, and the fingerprint of each mutable value (a dict or array
changed in place must change the key, so those are re-hashed on every call).
"""

from __future__ import annotations

import ast
import datetime
import dis
import enum
import functools
import importlib.metadata
import importlib.util
import inspect
import linecache
import logging
import operator
import os
import re
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

import xxhash

from .errors import UnhashableError

__all__ = ["class_fingerprint", "function_fingerprint", "source_components"]

logger = logging.getLogger("notebook_flow")

_Kind = Literal["user", "library", "stdlib"]
_MISSING: Final = object()
_FunctionType = types.FunctionType

# --------------------------------------------------------------------------- hashing


def _hash(*parts: str) -> str:
    """xxh3-128 of ``parts``, length-prefixed so ("ab", "c") and ("a", "bc") differ."""
    h = xxhash.xxh3_128()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _type_name(obj: object) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _canon(value: object, depth: int = 0) -> str:
    """A canonical, process-independent text for simple values (sets sorted, typed).

    Used for code constants and as the fallback of :func:`_fingerprint` while
    ``notebook_flow.hashing`` is unavailable. Raises UnhashableError for other types.
    """
    if depth > 50:
        raise UnhashableError("value nested too deeply to fingerprint", type_name=_type_name(value))
    t = type(value)
    if value is None or value is Ellipsis or t is bool:
        return repr(value)
    if t is int:
        return f"i{value}"
    if t is float:
        return f"f{value.hex()}"  # type: ignore[attr-defined]
    if t is complex:
        return f"c{value.real.hex()},{value.imag.hex()}"  # type: ignore[attr-defined]
    if t is str:
        return f"s{len(value)}:{value}"  # type: ignore[arg-type]
    if t is bytes:
        return f"b{value.hex()}"  # type: ignore[attr-defined]
    if t is range:
        return f"r{value.start},{value.stop},{value.step}"  # type: ignore[attr-defined]
    if t is tuple or t is list:
        items = ",".join(_canon(v, depth + 1) for v in value)  # type: ignore[attr-defined]
        return f"{'t' if t is tuple else 'l'}({items})"
    if t is frozenset or t is set:
        items = ",".join(sorted(_canon(v, depth + 1) for v in value))  # type: ignore[attr-defined]
        return f"{'F' if t is frozenset else 'S'}({items})"
    if t is dict:
        pairs = sorted(
            f"{_canon(k, depth + 1)}:{_canon(v, depth + 1)}"
            for k, v in value.items()  # type: ignore[attr-defined]
        )
        return f"d({','.join(pairs)})"
    if isinstance(value, enum.Enum):
        return f"e{t.__module__}.{t.__qualname__}.{value.name}"
    if isinstance(value, types.CodeType):
        return f"code:{_code_hash(value)}"
    if t.__module__ == "numpy" and t.__name__ == "ndarray":
        arr: Any = value
        if arr.dtype.hasobject:
            raise UnhashableError(
                "object arrays have no stable fingerprint", type_name=_type_name(value)
            )
        data = xxhash.xxh3_128_hexdigest(arr.tobytes(order="C"))
        return f"a{arr.dtype.str}{arr.shape}{data}"
    raise UnhashableError(
        f"no stable fingerprint for a {_type_name(value)}", type_name=_type_name(value)
    )


_fingerprint_impl: Callable[[object], str] | None = None


def _fingerprint(value: object) -> str:
    """``notebook_flow.hashing.fingerprint`` (imported lazily), else a local fallback."""
    global _fingerprint_impl
    if _fingerprint_impl is None:
        try:
            from .hashing import fingerprint
        except ImportError:  # hashing.py not available: simple types only

            def fingerprint(value: object) -> str:
                return _hash("value", _canon(value))

        _fingerprint_impl = fingerprint
    return _fingerprint_impl(value)


_IMMUTABLE_TYPES: Final = frozenset(
    {
        type(None),
        type(Ellipsis),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        range,
        datetime.date,
        datetime.datetime,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
    }
)
_IMMUTABLE_NAMES: Final = frozenset(
    {
        "decimal.Decimal",
        "fractions.Fraction",
        "uuid.UUID",
        "pathlib.PurePosixPath",
        "pathlib.PosixPath",
        "pathlib.PureWindowsPath",
        "pathlib.WindowsPath",
    }
)


def _is_immutable(value: object, depth: int = 0) -> bool:
    """True for values that cannot change in place (so identity is enough to re-check)."""
    t = type(value)
    if t in _IMMUTABLE_TYPES or isinstance(value, enum.Enum):
        return True
    if t is tuple or t is frozenset:
        return depth < 20 and all(_is_immutable(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    if f"{t.__module__}.{t.__qualname__}" in _IMMUTABLE_NAMES:
        return True
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.generic)


def _definition_value(value: object) -> str:
    """Part of a *definition* (a default, a class attribute): constants by value.

    Mutable objects count by type only: a class-level registry or a memo-dict default
    that fills up at run time is state, not definition, and must not move the hash.
    """
    if _is_immutable(value):
        try:
            return "v:" + _fingerprint(value)
        except Exception:
            return "t:" + _type_name(value)
    if isinstance(value, type) or callable(value):
        module = getattr(value, "__module__", None) or type(value).__module__
        name = getattr(value, "__qualname__", None) or _type_name(value)
        return f"f:{module}.{name}"
    return "t:" + _type_name(value)


_warned: set[tuple[str, str]] = set()


def _warn_unhashable(label: str, value: object, exc: BaseException) -> None:
    key = (label, _type_name(value))
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


# --------------------------------------------------------------------------- where code lives

_NOTEBOOK_FILE: Final = re.compile(r"^<ipython-input-|ipykernel_\d+[/\\]\d+\.py$")


@functools.cache
def _dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(library roots, stdlib roots), normalized, each ending in a separator."""

    def norm(p: str) -> str:
        return os.path.join(os.path.normcase(os.path.realpath(p)), "")

    paths = sysconfig.get_paths()
    # notebook_flow itself is pinned by its version like any other package.
    lib = {norm(paths["purelib"]), norm(paths["platlib"]), norm(os.path.dirname(__file__))}
    std = {norm(paths["stdlib"]), norm(paths["platstdlib"])}
    return tuple(sorted(lib)), tuple(sorted(std))


@functools.lru_cache(maxsize=4096)
def _path_kind(filename: str) -> _Kind | None:
    """Classify a source file; None when the name says nothing (``<string>``)."""
    if filename.startswith("<"):
        if filename.startswith("<frozen "):
            return "stdlib"
        return "user" if filename.startswith("<ipython-input-") else None
    if _NOTEBOOK_FILE.search(filename):
        return "user"
    real = os.path.normcase(os.path.realpath(filename))
    parts = real.split(os.sep)
    lib, std = _dirs()
    if "site-packages" in parts or "dist-packages" in parts or real.startswith(lib):
        return "library"
    if real.startswith(std):
        return "stdlib"
    return "user"


def _module_kind(module_name: str | None) -> _Kind:
    """Classify a module by its top-level package: user code, a library, or the stdlib."""
    if not module_name:
        return "user"
    top = module_name.partition(".")[0]
    if top in ("__main__", "__mp_main__"):
        return "user"
    if top in sys.stdlib_module_names or top == "builtins":
        return "stdlib"
    module = sys.modules.get(top)
    if module is None:  # an exec'd namespace, a notebook's pseudo-module
        return "user"
    file = getattr(module, "__file__", None)
    if file is None:
        path = list(getattr(module, "__path__", None) or ())
        file = path[0] if path else None
    if file is None:
        return "library"  # a compiled-in module that is not in the stdlib list
    return _path_kind(file) or "user"


def _function_kind(fn: types.FunctionType) -> _Kind:
    # The file first: functools.wraps copies __module__, so a library's wrapper around a
    # user function claims the user's module.
    return _path_kind(fn.__code__.co_filename) or _module_kind(fn.__module__)


@functools.cache
def _package_component(top: str) -> tuple[str, str]:
    """("package `numpy`", hash of "numpy==2.1.0") for a top-level import name.

    The version of the *loaded* module (``__version__``) wins over the installed metadata:
    after a ``pip install -U`` in a running kernel the old code still runs.
    """
    module = sys.modules.get(top)
    version = getattr(module, "__version__", None)
    if not isinstance(version, str):
        version = _installed_version(top)
    return f"package `{top}`", xxhash.xxh3_128_hexdigest(f"{top}=={version}".encode())


def _installed_version(top: str) -> str:
    try:  # the common case: the distribution is named like the import
        dist = importlib.metadata.distribution(top)
        provided = (dist.read_text("top_level.txt") or "").split()
        if top in provided or any(f.parts[0] in (top, f"{top}.py") for f in dist.files or ()):
            return dist.version
    except (importlib.metadata.PackageNotFoundError, ValueError, OSError):
        pass
    names = sorted(set(_packages_distributions().get(top, ())))
    versions = []
    for name in names:
        try:
            versions.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ";".join(versions) or "unknown"


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    # Slow (~0.25 s: reads every installed distribution), so only a fallback, once.
    return dict(importlib.metadata.packages_distributions())


def _package_of(module_name: str | None) -> tuple[str, str] | None:
    if not module_name:
        return None
    return _package_component(module_name.partition(".")[0])


# --------------------------------------------------------------------------- code objects


class _IdMap:
    """A dict keyed by object identity whose entries die with their key object."""

    def __init__(self) -> None:
        self.data: dict[int, tuple[weakref.ref[Any], Any]] = {}

    def get(self, obj: object) -> Any:
        entry = self.data.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else None

    def set(self, obj: object, value: object) -> None:
        key, data = id(obj), self.data
        if len(data) > 50_000:  # a bound, against objects that live forever
            data.clear()

        def drop(ref: weakref.ref[Any], key: int = key) -> None:
            entry = data.get(key)
            if entry is not None and entry[0] is ref:
                data.pop(key, None)

        data[key] = (weakref.ref(obj, drop), value)


class _CodeInfo:
    """What one code object says, computed once: its hash and the names it reads."""

    __slots__ = ("attrs", "globals", "imports", "source")

    def __init__(
        self,
        source: str,
        globals_: tuple[str, ...],
        attrs: tuple[str, ...],
        imports: tuple[tuple[str, int], ...],
    ) -> None:
        self.source = source  # hash of the normalized source, or of the code object
        self.globals = globals_  # names read with LOAD_GLOBAL (in nested code too)
        self.attrs = attrs  # attribute names read (sorted): resolves `mod.attr` chains
        self.imports = imports  # (module, level) imported inside the body


_CODE_INFO = _IdMap()
_GLOBAL_OPS: Final = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
_ATTR_OPS: Final = frozenset({"LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR", "IMPORT_FROM"})
_CONST_OPS: Final = frozenset({"LOAD_CONST", "LOAD_SMALL_INT"})


def _code_info(fn: types.FunctionType) -> _CodeInfo:
    code = fn.__code__
    info: _CodeInfo | None = _CODE_INFO.get(code)
    if info is None:
        globals_: dict[str, None] = {}
        attrs: set[str] = set()
        imports: dict[tuple[str, int], None] = {}
        for sub in _walk_code(code):
            consts: list[object] = [None, None]
            for ins in dis.get_instructions(sub):
                op = ins.opname
                if op in _GLOBAL_OPS:
                    globals_[ins.argval] = None
                elif op in _ATTR_OPS:
                    attrs.add(ins.argval)
                elif op == "IMPORT_NAME":
                    level = consts[-2]
                    imports[(ins.argval, level if isinstance(level, int) else 0)] = None
                if op in _CONST_OPS:
                    consts.append(ins.argval)
        source = _normalized_source(fn)
        info = _CodeInfo(
            _hash("source", source) if source is not None else _hash("code", _code_hash(code)),
            tuple(globals_),
            tuple(sorted(attrs)),
            tuple(imports),
        )
        _CODE_INFO.set(code, info)
    return info


def _walk_code(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _walk_code(const)


_CODE_FLAGS: Final = (
    inspect.CO_VARARGS
    | inspect.CO_VARKEYWORDS
    | inspect.CO_GENERATOR
    | inspect.CO_COROUTINE
    | inspect.CO_ASYNC_GENERATOR
    | inspect.CO_ITERABLE_COROUTINE
)


def _code_hash(code: types.CodeType) -> str:
    """The code object without positions: bytecode, constants (recursively), names.

    Insensitive to comments and whitespace, stable across processes; specific to one
    Python version (as bytecode is).
    """
    return _hash(
        code.co_name,
        f"{code.co_argcount},{code.co_posonlyargcount},{code.co_kwonlyargcount}",
        str(code.co_flags & _CODE_FLAGS),
        code.co_code.hex(),
        ",".join(_canon(c) for c in code.co_consts),
        ",".join(code.co_names),
        ",".join(code.co_varnames),
        ",".join(code.co_freevars),
        ",".join(code.co_cellvars),
    )


def _normalized_source(fn: types.FunctionType) -> str | None:
    """``ast.dump`` of the function's definition, or None when it can't be trusted."""
    code = fn.__code__
    if code.co_name.startswith("<"):  # lambdas: several may share a line; hash the code
        return None
    lines = linecache.getlines(code.co_filename, fn.__globals__)
    first = code.co_firstlineno
    if not lines or not 0 < first <= len(lines):
        return None
    try:
        source = "".join(inspect.getblock(lines[first - 1 :]))
        if source[:1] in (" ", "\t"):  # a method or nested def: parse it inside a block
            body = ast.parse("if 1:\n" + source).body[0].body  # type: ignore[attr-defined]
        else:
            body = ast.parse(source).body
    except (SyntaxError, ValueError, IndexError, AttributeError):
        return None
    node = body[0] if body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != code.co_name:
        return None
    if not _source_matches(node, code, fn.__qualname__):
        # The file changed since the module was imported (no reload): the *old* code runs,
        # so key on that, not on text that isn't running.
        logger.debug("source of %s no longer matches its code; hashing bytecode", fn.__qualname__)
        return None
    node.decorator_list = []
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first_stmt = sub.body[0] if sub.body else None
            if (
                isinstance(first_stmt, ast.Expr)
                and isinstance(first_stmt.value, ast.Constant)
                and isinstance(first_stmt.value.value, str)
            ):
                sub.body = sub.body[1:] or [ast.Pass()]
    return ast.dump(node)


def _source_matches(
    node: ast.FunctionDef | ast.AsyncFunctionDef, code: types.CodeType, qualname: str
) -> bool:
    """Compile the found source and compare its shape with the running code object.

    Shape = names (globals, locals, free variables alike: a nested function compiled
    alone turns its free variables into globals), constants and nested code. Methods are
    compiled inside a class of the same name, so private-name mangling agrees.
    """
    module = ast.Module(body=[node], type_ignores=[])
    owner = _enclosing_class(qualname)
    if owner is not None:
        module = ast.parse(f"class {owner}:\n    pass")
        module.body[0].body = [node]  # type: ignore[attr-defined]
    try:
        compiled = compile(module, code.co_filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, TypeError):
        return False
    for candidate in _walk_code(compiled):
        if candidate.co_name == code.co_name and candidate.co_flags & inspect.CO_NEWLOCALS:
            return _shape(candidate) == _shape(code)
    return False


def _enclosing_class(qualname: str) -> str | None:
    parts = qualname.split(".")[:-1]
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "<locals>" or (i + 1 < len(parts) and parts[i + 1] == "<locals>"):
            continue
        return parts[i] if parts[i].isidentifier() else None
    return None


def _shape(code: types.CodeType) -> tuple[object, ...]:
    names = {*code.co_names, *code.co_varnames, *code.co_freevars, *code.co_cellvars}
    names.discard("__class__")  # the implicit cell of zero-argument super()
    consts = [c for c in code.co_consts if not isinstance(c, types.CodeType)]
    nested = [_shape(c) for c in code.co_consts if isinstance(c, types.CodeType)]
    return (
        code.co_name,
        code.co_argcount,
        code.co_kwonlyargcount,
        tuple(sorted(names)),
        tuple(sorted(_canon_or_type(c) for c in consts)),
        tuple(sorted(nested, key=repr)),
    )


def _canon_or_type(value: object) -> str:
    try:
        return _canon(value)
    except UnhashableError:
        return _type_name(value)


def _function_source(fn: types.FunctionType) -> str:
    """Hash of one function as defined: normalized source (or code) plus its defaults."""
    source = _code_info(fn).source
    defaults, kwdefaults = fn.__defaults__, fn.__kwdefaults__
    if not defaults and not kwdefaults:
        return source
    parts = [_definition_value(v) for v in defaults or ()]
    parts += [f"{k}={_definition_value(v)}" for k, v in sorted((kwdefaults or {}).items())]
    return _hash(source, "defaults", *parts)


def _qualname(obj: object) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or _type_name(obj)
    return str(name).replace(".<locals>.", ".")


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
    return _path_kind(fn.__code__.co_filename) is None


def _method_part(fn: types.FunctionType) -> str:
    kind = _function_kind(fn)
    if kind == "user":
        if _is_generated(fn):
            return _hash("generated", _code_hash(fn.__code__), _function_source_defaults(fn))
        return _function_source(fn)
    return f"lib:{fn.__module__}.{fn.__qualname__}"


def _function_source_defaults(fn: types.FunctionType) -> str:
    parts = [_definition_value(v) for v in fn.__defaults__ or ()]
    parts += [f"{k}={_definition_value(v)}" for k, v in sorted((fn.__kwdefaults__ or {}).items())]
    return ",".join(parts)


def _class_ref(cls: type) -> str:
    kind = _module_kind(cls.__module__)
    if kind == "user":
        return "user:" + class_fingerprint(cls)
    if kind == "library":
        package = _package_of(cls.__module__)
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
        return _class_ref(attr) if _module_kind(attr.__module__) != "user" else _nested_class(attr)
    return _definition_value(attr)


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
            (b, class_fingerprint(b)) for b in self.bases if _module_kind(b.__module__) == "user"
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


_CLASSES = _IdMap()


def class_fingerprint(cls: type) -> str:
    """One hash of a class's definition; works for classes defined in notebook cells.

    Built from the class's own attributes rather than ``inspect.getsource`` (which fails
    for notebook classes): methods, properties, static/class methods by normalized source
    and defaults, class-level constants by value (mutable class attributes by type: they
    are state), annotations, dataclass fields, enum members, and bases (user bases
    recursively, library bases by package version). Methods' *dependencies* (helpers,
    globals) are not included; :func:`source_components` follows those.

    >>> class Point:
    ...     def norm(self): return (self.x ** 2 + self.y ** 2) ** 0.5
    >>> len(class_fingerprint(Point))
    32
    """
    entry: _ClassEntry | None = _CLASSES.get(cls)
    if entry is not None and entry.valid(cls):
        return entry.fingerprint
    if _module_kind(cls.__module__) != "user":
        return _hash("class", _class_ref(cls))
    active: set[int] = _busy.__dict__.setdefault("classes", set())
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
        parts.append(f"{name}={_attr_part(attr)}")
    for name, member in members.items():
        parts.append(f"member {name}={_definition_value(member.value)}")
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
    return _hash(*parts)


def _field_default(value: object) -> str:
    if type(value).__name__ == "_MISSING_TYPE":
        return "-"
    if type(value) is _FunctionType and _function_kind(value) == "user":
        return _function_source(value)
    return _definition_value(value)


# --------------------------------------------------------------------------- the walk


class _Entry:
    """A computed result and the guards that say whether it still holds.

    Plain loops with identity checks: on a 2-core machine they beat building tuples with
    ``map`` (about 1.5 µs for a task with five helpers, five globals and a class).
    """

    __slots__ = (
        "cells_same",
        "cells_value",
        "classes",
        "fingerprint",
        "functions",
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
        self.classes: list[tuple[type, tuple[object, ...]]] = []  # class, its __dict__ values
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
        for cls, values in self.classes:
            now = tuple(cls.__dict__.values())
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
        return _fingerprint(value)
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
        info = _code_info(fn)
        name = self.name(fn.__module__, fn.__qualname__)
        if root:
            self.entry.root = _function_source(fn)
        elif emit:
            if code.co_name == "<lambda>" and via:  # name a lambda by what refers to it
                name = via
            self.add(f"source of helper `{name}`", _function_source(fn))
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
        kind = _module_kind(module.__name__)
        if kind == "library":
            self.package(module.__name__)
        elif kind == "user":
            ns = vars(module)
            for name in attrs:  # `utils.clean`, `pkg.sub.f`: the attributes the code reads
                if name in ns:
                    self.global_name(ns, name, attrs)

    def package(self, module_name: str | None) -> None:
        component = _package_of(module_name)
        if component is not None:
            self.add(*component)

    # --- classes

    def klass(self, cls: type) -> None:
        if not self.once(cls):
            return
        kind = _module_kind(cls.__module__)
        if kind != "user":
            if kind == "library":
                self.package(cls.__module__)
            return
        self.add(f"class `{self.name(cls.__module__, cls.__qualname__)}`", class_fingerprint(cls))
        self.entry.classes.append((cls, tuple(vars(cls).values())))
        for base in (*cls.__bases__, type(cls)):
            if base is not object and base is not type:
                self.klass(base)
        for attr in vars(cls).values():
            if isinstance(attr, type):
                self.klass(attr)
            for fn in _functions_in(attr):
                if _function_kind(fn) == "user" and not _is_generated(fn):
                    self.function(fn, emit=False)  # source is in the class; follow its calls

    # --- any value

    def value(self, value: object, label: str, attrs: tuple[str, ...], where: _Where) -> None:
        if self.code(value, label, attrs):
            self.same(where, value)
            return
        try:
            digest = _fingerprint(value)
        except Exception as exc:
            _warn_unhashable(label, value, exc)
            digest = _hash("unhashable", _type_name(value))
            self.same(where, value)
        else:
            if _is_immutable(value):
                self.same(where, value)
            elif where[0] == "ns":
                self.entry.ns_value.append((where[1], where[2], digest))
            elif where[0] == "cell":
                self.entry.cells_value.append((where[1], digest))
            else:
                self.entry.objects.append((value, digest))
        self.add(label, digest)
        kind = _module_kind(type(value).__module__)
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
            kind = _function_kind(fn)
            if kind == "user":
                self.function(fn, via=label.partition("`")[2].partition("`")[0])
            elif kind == "library":
                self.package(fn.__module__)
            return True
        if t is types.ModuleType:
            self.module(value, attrs)  # type: ignore[arg-type]
            return True
        if isinstance(value, type):
            self.klass(value)
            return True
        if t is types.MethodType:
            func, owner = value.__func__, value.__self__  # type: ignore[attr-defined]
            self.code(func, label, attrs)
            if (
                type(func) is _FunctionType
                and _function_kind(func) == "user"
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
            if module is not None and _module_kind(module) == "library":
                self.package(module)
            return True
        if _is_immutable(value):
            return False
        if _is_task(value):
            self.code(value.fn, label, attrs)  # type: ignore[attr-defined]
            return True
        if not callable(value):
            return False
        wrapped = _getattr(value, "__wrapped__")
        if wrapped is not None:  # functools.lru_cache, wraps-style decorators
            self.code(wrapped, label, attrs)
            if _module_kind(t.__module__) == "library":
                self.package(t.__module__)
            return True
        if isinstance(_getattr(value, "__name__"), str):  # a named library object (np.add)
            home = _getattr(value, "__module__") or t.__module__
            kind = _module_kind(home) if isinstance(home, str) else "user"
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

_RESULTS = _IdMap()


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
    entry.name = f"source of task `{_qualname(root)}`"
    active: set[int] = _busy.__dict__.setdefault("roots", set())
    if type(root) is not _FunctionType:
        _compute_other(entry, root)
        return entry
    if id(root) in active:
        # Re-entered while hashing one of our own globals (a dict holding this very
        # function, say): the shallow source breaks the cycle, deterministically.
        entry.root = _function_source(root)
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
    """Roots that are not plain functions: classes, callable instances, library callables."""
    walk = _Walk(entry, {})
    if isinstance(root, type):
        entry.root = class_fingerprint(root)
        walk.klass(root)
        return
    kind = _module_kind(getattr(root, "__module__", None) or type(root).__module__)
    if kind == "user":
        entry.root = _safe_fingerprint(root) or _hash("unhashable", _type_name(root))
        walk.klass(type(root))
    else:
        entry.root = _hash("callable", _type_name(root), _qualname(root))
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
        entry.fingerprint = _hash(entry.name, entry.root, *(f"{k}={v}" for k, v in parts))
    return entry.fingerprint
