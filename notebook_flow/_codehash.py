"""What one function's code is, for sourcehash: hashes, the names it reads, where it lives.

* :func:`code_info` — per code object, computed once: the hash of the *normalized source*
  (``ast.dump`` of the definition without docstrings and outer decorators; checked against
  the running bytecode, so a file edited since import is not trusted) or, without source,
  of the code object; plus the global, attribute and import names the bytecode reads.
* :func:`path_kind` / :func:`module_kind` / :func:`function_kind` — user code (notebook
  cells, ``__main__``, files outside site-packages and the stdlib), a library, or the stdlib.
* :func:`package_component` — ``("package `numpy`", hash of "numpy==2.1.0")``.
* :func:`fingerprint_value` — ``notebook_flow.hashing.fingerprint``, imported lazily.
"""

from __future__ import annotations

import ast
import datetime
import dis
import enum
import functools
import importlib.metadata
import inspect
import linecache
import logging
import os
import re
import sys
import sysconfig
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

import xxhash

from notebook_flow._imports import loaded

from .errors import UnhashableError

logger = logging.getLogger("notebook_flow")

Kind = Literal["user", "library", "stdlib"]

# --------------------------------------------------------------------------- hashing


def hash_parts(*parts: str) -> str:
    """xxh3-128 of ``parts``, length-prefixed so ("ab", "c") and ("a", "bc") differ."""
    h = xxhash.xxh3_128()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def type_name(obj: object) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def canon(value: object, depth: int = 0) -> str:
    """A canonical, process-independent text for simple values (sets sorted, typed).

    Used for code constants and as the fallback of :func:`fingerprint_value` while
    ``notebook_flow.hashing`` is unavailable. Raises UnhashableError for other types.
    """
    if depth > 50:
        raise UnhashableError("value nested too deeply to fingerprint", type_name=type_name(value))
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
        items = ",".join(canon(v, depth + 1) for v in value)  # type: ignore[attr-defined]
        return f"{'t' if t is tuple else 'l'}({items})"
    if t is frozenset or t is set:
        items = ",".join(sorted(canon(v, depth + 1) for v in value))  # type: ignore[attr-defined]
        return f"{'F' if t is frozenset else 'S'}({items})"
    if t is dict:
        pairs = sorted(
            f"{canon(k, depth + 1)}:{canon(v, depth + 1)}"
            for k, v in value.items()  # type: ignore[attr-defined]
        )
        return f"d({','.join(pairs)})"
    if isinstance(value, enum.Enum):
        return f"e{t.__module__}.{t.__qualname__}.{value.name}"
    if isinstance(value, types.CodeType):
        return f"code:{code_hash(value)}"
    if t.__module__ == "numpy" and t.__name__ == "ndarray":
        arr: Any = value
        if arr.dtype.hasobject:
            raise UnhashableError(
                "object arrays have no stable fingerprint", type_name=type_name(value)
            )
        data = xxhash.xxh3_128_hexdigest(arr.tobytes(order="C"))
        return f"a{arr.dtype.str}{arr.shape}{data}"
    raise UnhashableError(
        f"no stable fingerprint for a {type_name(value)}", type_name=type_name(value)
    )


_fingerprint_impl: Callable[[object], str] | None = None


def fingerprint_value(value: object) -> str:
    """``notebook_flow.hashing.fingerprint`` (imported lazily), else a local fallback."""
    global _fingerprint_impl
    if _fingerprint_impl is None:
        try:
            from .hashing import fingerprint
        except ImportError:  # hashing.py not available: simple types only

            def fingerprint(value: object) -> str:
                return hash_parts("value", canon(value))

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


def is_immutable(value: object, depth: int = 0) -> bool:
    """True for values that cannot change in place (so identity is enough to re-check)."""
    t = type(value)
    if t in _IMMUTABLE_TYPES or isinstance(value, enum.Enum):
        return True
    if t is tuple or t is frozenset:
        return depth < 20 and all(is_immutable(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    if f"{t.__module__}.{t.__qualname__}" in _IMMUTABLE_NAMES:
        return True
    numpy = loaded("numpy")
    return numpy is not None and isinstance(value, numpy.generic)


def definition_value(value: object) -> str:
    """A default value as part of a function's definition: constants by value.

    Mutable defaults count by type only: a memo-dict default that fills up at run time is
    state, not definition, and must not move the hash (a literal default's text is in the
    source already).
    """
    if is_immutable(value):
        try:
            return "v:" + fingerprint_value(value)
        except Exception:
            return "t:" + type_name(value)
    if isinstance(value, type) or callable(value):
        module = getattr(value, "__module__", None) or type(value).__module__
        name = getattr(value, "__qualname__", None) or type_name(value)
        return f"f:{module}.{name}"
    return "t:" + type_name(value)


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
def path_kind(filename: str) -> Kind | None:
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


def module_kind(module_name: str | None) -> Kind:
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
    return path_kind(file) or "user"


def function_kind(fn: types.FunctionType) -> Kind:
    # The file first: functools.wraps copies __module__, so a library's wrapper around a
    # user function claims the user's module.
    return path_kind(fn.__code__.co_filename) or module_kind(fn.__module__)


@functools.cache
def package_component(top: str) -> tuple[str, str]:
    """("package `numpy`", hash of "numpy==2.1.0") for a top-level import name.

    The version of the *loaded* module (``__version__``) wins over the installed metadata:
    after a ``pip install -U`` in a running kernel the old code still runs.
    """
    module = loaded(top)
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


def package_of(module_name: str | None) -> tuple[str, str] | None:
    if not module_name:
        return None
    return package_component(module_name.partition(".")[0])


# --------------------------------------------------------------------------- code objects


class IdMap:
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


class CodeInfo:
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


_CODE_INFO = IdMap()
_GLOBAL_OPS: Final = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})
_ATTR_OPS: Final = frozenset({"LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR", "IMPORT_FROM"})
_CONST_OPS: Final = frozenset({"LOAD_CONST", "LOAD_SMALL_INT"})


def code_info(fn: types.FunctionType) -> CodeInfo:
    code = fn.__code__
    info: CodeInfo | None = _CODE_INFO.get(code)
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
        info = CodeInfo(
            hash_parts("source", source)
            if source is not None
            else hash_parts("code", code_hash(code)),
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


def code_hash(code: types.CodeType) -> str:
    """The code object without positions: bytecode, constants (recursively), names.

    Insensitive to comments and whitespace, stable across processes; specific to one
    Python version (as bytecode is).
    """
    return hash_parts(
        code.co_name,
        f"{code.co_argcount},{code.co_posonlyargcount},{code.co_kwonlyargcount}",
        str(code.co_flags & _CODE_FLAGS),
        code.co_code.hex(),
        ",".join(canon(c) for c in code.co_consts),
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
        return canon(value)
    except UnhashableError:
        return type_name(value)


def function_source(fn: types.FunctionType) -> str:
    """Hash of one function as defined: normalized source (or code) plus its defaults."""
    source = code_info(fn).source
    defaults, kwdefaults = fn.__defaults__, fn.__kwdefaults__
    if not defaults and not kwdefaults:
        return source
    parts = [definition_value(v) for v in defaults or ()]
    parts += [f"{k}={definition_value(v)}" for k, v in sorted((kwdefaults or {}).items())]
    return hash_parts(source, "defaults", *parts)


def display_name(obj: object) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type_name(obj)
    return str(name).replace(".<locals>.", ".")
