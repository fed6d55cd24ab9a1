"""Handlers for classes, functions, modules and the objects of other classes.

A class is its module, qualname and source hash (``sourcehash.class_fingerprint``); a
function is its source hash (``sourcehash.function_fingerprint``). Dataclasses, named
tuples, enums and pydantic models hash their fields; any other object its class plus the
state pickle would save (``__reduce_ex__(4)``), walked value by value.
"""

from __future__ import annotations

import collections
import copyreg
import dataclasses
import logging
import types
from collections.abc import Callable
from typing import Any

from notebook_flow._imports import loaded
from notebook_flow.errors import UnhashableError
from notebook_flow.hashing.builtins import _h_str, _h_tuple, _item_digests, _set_digests
from notebook_flow.hashing.core import (
    Handler,
    _at,
    _call,
    _Context,
    _enter,
    _leave,
    _pack_u,
    _unhashable,
    _walk,
    _Writer,
)

logger = logging.getLogger("notebook_flow")


def _package_version(module: str) -> str | None:
    top = loaded(module.partition(".")[0])
    version = getattr(top, "__version__", None)
    return version if isinstance(version, str) else None


def _class_source(cls: type) -> str | None:
    """The class's source hash from sourcehash; module version if sourcehash is absent."""
    try:
        from notebook_flow.sourcehash import class_fingerprint
    except ImportError:  # being written concurrently; module + qualname still identify it
        return _package_version(cls.__module__)
    try:
        return str(class_fingerprint(cls))
    except UnhashableError:
        raise
    except Exception as exc:  # e.g. a C-implemented class with no source to read
        logger.debug("class_fingerprint(%s) failed (%r); using its name", cls.__qualname__, exc)
        return _package_version(cls.__module__)


def _walk_class(cls: type, w: _Writer, ctx: _Context) -> None:
    w.buf += b"y"
    _h_str(cls.__module__, w, ctx)
    _h_str(cls.__qualname__, w, ctx)
    if cls.__module__ == "builtins":
        w.buf += b"N"
    else:
        _walk(_class_source(cls), w, ctx)


def _h_type(v: Any, w: _Writer, ctx: _Context) -> None:
    _walk_class(v, w, ctx)


def _code_token(code: types.CodeType) -> tuple[object, ...]:
    consts = tuple(_code_token(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return (
        code.co_name,
        code.co_code,
        consts,
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
    )


def _h_code(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"o"
    _walk(_code_token(v), w, ctx)


def _h_function(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"x"
    _walk((v.__module__, v.__qualname__), w, ctx)
    if not _enter(v, w, ctx):  # entered first: sourcehash may meet v again in a closure
        return
    try:
        try:
            from notebook_flow.sourcehash import function_fingerprint
        except ImportError:  # being written concurrently: hash the code object instead
            _walk_code_fallback(v, w, ctx)
        else:
            digest = _call(v, lambda: function_fingerprint(v), "sourcehash.function_fingerprint()")
            _h_str(str(digest), w, ctx)
    finally:
        _leave(v, ctx)


def _walk_code_fallback(v: Any, w: _Writer, ctx: _Context) -> None:
    """Bytecode, constants, names, defaults and closure values (no transitive globals)."""
    _walk(_code_token(v.__code__), w, ctx)
    for name, value in (("__defaults__", v.__defaults__), ("__kwdefaults__", v.__kwdefaults__)):
        try:
            _walk(value, w, ctx)
        except UnhashableError as exc:
            raise _at(exc, f".{name}") from exc.__cause__
    for name, cell in zip(v.__code__.co_freevars, v.__closure__ or (), strict=False):
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            w.buf += b"\x00"
            continue
        try:
            _walk(contents, w, ctx)
        except UnhashableError as exc:
            raise _at(exc, f".<closure {name}>") from exc.__cause__


def _h_method(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"X"
    try:
        _walk(v.__self__, w, ctx)
    except UnhashableError as exc:
        raise _at(exc, ".__self__") from exc.__cause__
    _walk(v.__func__, w, ctx)


def _h_builtin(v: Any, w: _Writer, ctx: _Context) -> None:
    """Built-in functions and method descriptors: by name, plus the bound object if any."""
    w.buf += b"k"
    owner = getattr(v, "__objclass__", None)
    _walk((getattr(v, "__module__", None), owner.__qualname__ if owner else None), w, ctx)
    _h_str(getattr(v, "__qualname__", v.__name__), w, ctx)
    bound = getattr(v, "__self__", None)
    if bound is None or isinstance(bound, types.ModuleType):
        w.buf += b"N"
        return
    try:
        _walk(bound, w, ctx)
    except UnhashableError as exc:
        raise _at(exc, ".__self__") from exc.__cause__


def _h_module(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"u"
    _walk((v.__name__, _package_version(v.__name__)), w, ctx)


def _h_enum(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"e"
    _walk_class(type(v), w, ctx)
    _walk((v.name, v.value), w, ctx)


def _h_dataclass(v: Any, w: _Writer, ctx: _Context) -> None:
    if not _enter(v, w, ctx):
        return
    try:
        w.buf += b"a"
        _walk_class(type(v), w, ctx)
        fields = dataclasses.fields(v)
        w.buf += _pack_u(len(fields))
        for field in fields:
            _h_str(field.name, w, ctx)
            try:
                _walk(getattr(v, field.name), w, ctx)
            except UnhashableError as exc:
                raise _at(exc, f".{field.name}") from exc.__cause__
    finally:
        _leave(v, ctx)


def _h_namedtuple(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"q"
    _walk_class(type(v), w, ctx)
    _walk(tuple(v._fields), w, ctx)
    _h_tuple(tuple(v), w, ctx)


def _h_pydantic(v: Any, w: _Writer, ctx: _Context) -> None:
    # The validated field values, like pydantic's own __eq__ (model_dump would turn nested
    # models into plain dicts and run custom serializers, which may be lossy).
    if not _enter(v, w, ctx):
        return
    try:
        w.buf += b"p"
        _walk_class(type(v), w, ctx)
        w.buf += _item_digests(list(vars(v).items()), ctx, attrs=True)
        extra = getattr(v, "__pydantic_extra__", None) or {}
        w.buf += _item_digests(list(extra.items()), ctx, attrs=True)
    finally:
        _leave(v, ctx)


def _h_mappingproxy(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"D"
    w.buf += _item_digests(list(v.items()), ctx)


def _reduced(reducer: Callable[[Any], object], tag: bytes, what: str) -> Handler:
    def handler(v: Any, w: _Writer, ctx: _Context) -> None:
        if not _enter(v, w, ctx):
            return
        try:
            w.buf += tag
            cls = type(v)
            _walk((cls.__module__, cls.__qualname__), w, ctx)
            _walk(_call(v, lambda: reducer(v), what), w, ctx)
        finally:
            _leave(v, ctx)

    return handler


def _walk_reference(obj: Any, w: _Writer, ctx: _Context) -> None:
    """A reconstructor named by a reduce tuple: by reference, as pickle would."""
    if isinstance(obj, type):
        _walk_class(obj, w, ctx)
    else:
        w.buf += b"*"
        _walk((getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)), w, ctx)


def _h_object(v: Any, w: _Writer, ctx: _Context) -> None:
    """Any other object: its class and the state ``__reduce_ex__(4)`` exposes."""
    cls = type(v)
    reducer = copyreg.dispatch_table.get(cls)
    rv = _call(
        v,
        (lambda: reducer(v)) if reducer else (lambda: v.__reduce_ex__(4)),
        "it has no state that can be read: __reduce_ex__(4)",
    )
    if not _enter(v, w, ctx):
        return
    try:
        w.buf += b"O"
        _walk_class(cls, w, ctx)
        if isinstance(rv, str):  # a global singleton, pickled by name
            w.buf += b"&"
            _h_str(rv, w, ctx)
            return
        if not isinstance(rv, tuple) or len(rv) < 2:
            raise _unhashable(v, f"its __reduce__ returned an unusable {type(rv).__name__}")
        rv = rv + (None,) * (5 - len(rv))
        func, args, state, listitems, dictitems = rv[:5]
        if func is copyreg.__newobj__ and args and args[0] is cls:  # type: ignore[attr-defined]
            args = args[1:]
        else:
            _walk_reference(func, w, ctx)
        try:
            _walk(tuple(args), w, ctx)
        except UnhashableError as exc:
            raise _at(exc, ".__reduce__()[1]") from exc.__cause__
        if isinstance(state, dict) and getattr(cls, "__setstate__", None) is not None:
            kept = _restorable_state(state)
            if kept is not state:  # emptied: None, as the loaded copy's __reduce_ex__ gives
                state = kept or None
        if isinstance(state, dict) and _scratch_attributes(cls):
            state = _without_scratch(state, _scratch_attributes(cls))
        _walk_state(state, w, ctx)
        w.buf += b"l" if listitems is not None else b"N"
        if listitems is not None:
            for i, item in enumerate(listitems):
                try:
                    _walk(item, w, ctx)
                except UnhashableError as exc:
                    raise _at(exc, f"[{i}]") from exc.__cause__
            w.buf += b"."  # end of items (their count is not known in advance)
        if dictitems is None:
            w.buf += b"N"
        elif isinstance(v, collections.OrderedDict):  # order is part of its equality
            w.buf += b"D"
            _walk(list(dictitems), w, ctx)
        else:
            w.buf += b"d"
            w.buf += _item_digests(list(dictitems), ctx)
    finally:
        _leave(v, ctx)


_EMPTY_CONTAINERS = (dict, list, set, frozenset, tuple)

#: Work buffers libraries allocate with ``np.empty`` and overwrite before every read: their
#: bytes are whatever memory held, different in every process, and never part of the
#: value. Only their shape and dtype are hashed. (module, class) → attribute names.
SCRATCH_ATTRIBUTES: dict[tuple[str, str], frozenset[str]] = {
    # GLM.__init__ and GLM.fit: `self._tmp_like_exog = np.empty_like(self.exog, ...)`,
    # filled by each score/hessian evaluation before use (statsmodels lists it among the
    # data attributes remove_data() drops).
    ("statsmodels.genmod.generalized_linear_model", "GLM"): frozenset({"_tmp_like_exog"}),
}
_SCRATCH_BY_CLASS: dict[type, frozenset[str]] = {}


def _scratch_attributes(cls: type) -> frozenset[str]:
    found = _SCRATCH_BY_CLASS.get(cls)
    if found is None:
        found = frozenset().union(
            *(SCRATCH_ATTRIBUTES.get((b.__module__, b.__qualname__), ()) for b in cls.__mro__)
        )
        _SCRATCH_BY_CLASS[cls] = found
    return found


def _without_scratch(state: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    out = dict(state)
    for name in names & out.keys():
        buf = out[name]
        shape, dtype = getattr(buf, "shape", None), getattr(buf, "dtype", None)
        out[name] = ("<scratch buffer>", shape, None if dtype is None else str(dtype))
    return out


def _restorable_state(state: dict[str, Any]) -> dict[str, Any]:
    """The ``__dict__`` state of a class with its own ``__setstate__``, without the empty
    private containers (``_cache = {}``, ``_deprecated_key_to_warnings = {}``).

    Such a class decides what survives a pickle round trip, and bookkeeping like this is
    what they drop or rebuild lazily: scikit-learn's ``Bunch`` has ``{'_deprecated_key_to_
    warnings': {}}`` in its ``__dict__`` when made and ``{}`` once loaded. An *empty*
    private container holds no data; anything in it (or any public or non-empty
    attribute) is still hashed, so values that differ in content still differ.
    """
    if not any(
        type(k) is str and k.startswith("_") and type(v) in _EMPTY_CONTAINERS and not v
        for k, v in state.items()
    ):
        return state
    return {
        k: v
        for k, v in state.items()
        if not (type(k) is str and k.startswith("_") and type(v) in _EMPTY_CONTAINERS and not v)
    }


def _walk_state(state: Any, w: _Writer, ctx: _Context) -> None:
    # Markers below 0x20 never start a value, so they cannot be confused with one.
    if isinstance(state, dict):  # __dict__
        w.buf += b"\x01"
        w.buf += _item_digests(list(state.items()), ctx, attrs=True)
    elif (
        isinstance(state, tuple)
        and len(state) == 2
        and isinstance(state[1], dict)
        and (state[0] is None or isinstance(state[0], dict))
    ):  # (__dict__, __slots__)
        w.buf += b"\x02"
        w.buf += _item_digests(list((state[0] or {}).items()), ctx, attrs=True)
        w.buf += _item_digests(list(state[1].items()), ctx, attrs=True)
    else:
        try:
            _walk(state, w, ctx)
        except UnhashableError as exc:
            raise _at(exc, ".__getstate__()") from exc.__cause__


def _h_set_subclass(v: Any, w: _Writer, ctx: _Context) -> None:
    # Not via __reduce__: it lists the elements in hash order, which depends on the seed.
    if not _enter(v, w, ctx):
        return
    try:
        w.buf += b"{"
        _walk_class(type(v), w, ctx)
        w.buf += _set_digests(v, ctx)
        _walk_state(getattr(v, "__dict__", None), w, ctx)
    finally:
        _leave(v, ctx)
