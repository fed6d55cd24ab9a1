"""Ambient state: process-wide state a cell reads and changes without naming it.

The global random generators, matplotlib's rcParams (and with them the style), pandas'
options, the working directory and ``sys.path`` are not variables, yet a cell's results
depend on them (``np.random.rand()`` after ``np.random.seed(0)``) and a cell changes them
(``plt.rc("figure", figsize=(2, 1))``). A cached cell treats each such state as an input
(its fingerprint is part of the key) and as an output (when the cell changes it, the new
state is stored and set again on a hit), so the cells after a hit see what they would have
seen after a plain run.

Each state is an :class:`Ambient`: a name, a ``get`` returning a picklable snapshot, a
``set`` putting a snapshot back, and the module it belongs to. A library's state is
consulted only when the library is already imported: nothing is imported to look at it.
``keyed`` says when the state counts as an input:

``"always"``
    whenever it exists (rcParams, options, cwd, ``sys.path``: read without being changed).
``"when-changed"``
    only by cells that change it. Drawing from a global generator changes its state, so
    such a cell keys on it; a cell that draws nothing is keyed without it. The generators
    of a fresh process are seeded from the OS, so keying every cell on them would make
    every cell miss in every new kernel.
``"never"``
    never: only what the cell changes is stored, as a change (``delta``) applied to the
    state a hit finds. The warning filters: libraries add theirs when imported (some from
    background threads), so a cell importing one changes them, and keying it on the
    filters before would make it miss whenever anything was imported earlier.

Add your own with :func:`register_ambient`::

    import notebook_flow
    notebook_flow.register_ambient(
        "mylib.settings", get=lambda: dict(mylib.SETTINGS), set=mylib.SETTINGS.update,
        module="mylib",
    )
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import logging
import os
import sys
import types
from collections.abc import Callable
from typing import Any, Literal

from notebook_flow.errors import ConfigurationError

__all__ = ["Ambient", "Snapshot", "register_ambient", "registered", "unregister_ambient"]

logger = logging.getLogger("notebook_flow")

Keyed = Literal["always", "when-changed", "never"]


@dataclasses.dataclass(frozen=True)
class Ambient:
    """One piece of ambient state (see the module docstring)."""

    name: str
    get: Callable[[], Any]
    set: Callable[[Any], None]
    module: str | None = None
    keyed: Keyed = "always"
    default: Callable[[], Any] | None = None
    #: ``delta(before, after)``: what to store of a change (``set`` then gets that, and
    #: applies it to the state it finds); None stores the state after the cell.
    delta: Callable[[Any, Any], Any] | None = None


_REGISTRY: dict[str, Ambient] = {}


def register_ambient(
    name: str,
    get: Callable[[], Any],
    set: Callable[[Any], None],
    *,
    module: str | None = None,
    keyed: Keyed = "always",
    default: Callable[[], Any] | None = None,
    delta: Callable[[Any, Any], Any] | None = None,
) -> None:
    """Make a piece of process-wide state an input and an output of every cached cell.

    ``get()`` returns a snapshot (picklable, with a stable fingerprint: plain data, arrays);
    ``set(snapshot)`` restores one. With ``module``, the state is consulted only while
    that module is imported. ``default()``, if given, is the state as the library starts
    with it: a state equal to it counts as absent, and of a dict state only the entries
    that differ from it count (so whether the library was imported yet, by the cell or by
    anything else, does not change a key). Registering a name again replaces it.

    >>> import decimal
    >>> register_ambient(
    ...     "decimal.context",
    ...     get=lambda: decimal.getcontext().prec,
    ...     set=lambda prec: setattr(decimal.getcontext(), "prec", prec),
    ... )
    >>> unregister_ambient("decimal.context")
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError("register_ambient needs a non-empty name")
    if not callable(get) or not callable(set):
        raise ConfigurationError(
            f"register_ambient({name!r}, get, set): get and set must be callables"
        )
    if keyed not in ("always", "when-changed", "never"):
        raise ConfigurationError(
            f"register_ambient({name!r}): keyed must be 'always', 'when-changed' or 'never', "
            f"got {keyed!r}"
        )
    _REGISTRY[name] = Ambient(name, get, set, module, keyed, default, delta)


def unregister_ambient(name: str) -> None:
    """Forget an ambient state registered with :func:`register_ambient` (no error if absent)."""
    _REGISTRY.pop(name, None)


def registered() -> list[Ambient]:
    """Every registered ambient state, built-ins first."""
    return list(_REGISTRY.values())


def _imported(name: str) -> bool:
    """True when ``name`` is imported; waits for an import another thread has under way
    (never look at a half-initialized module)."""
    module = sys.modules.get(name)
    if module is None:
        return False
    if getattr(getattr(module, "__spec__", None), "_initializing", False):
        importlib.import_module(name)  # blocks on the module's import lock until it is done
    return True


# --------------------------------------------------------------------------- snapshots


@dataclasses.dataclass
class Snapshot:
    """The values and fingerprints of the ambient states present at one moment.

    ``failed`` names states whose ``get`` or fingerprint raised: a cell that may depend on
    them cannot be cached faithfully.
    """

    values: dict[str, Any]
    digests: dict[str, str]
    failed: dict[str, str]


def snapshot() -> Snapshot:
    """The current value of every ambient state whose module is imported."""
    from notebook_flow.hashing import fingerprint

    values: dict[str, Any] = {}
    digests: dict[str, str] = {}
    failed: dict[str, str] = {}
    for ambient in registered():
        if ambient.module is not None and not _imported(ambient.module):
            continue
        try:
            value = ambient.get()
            memo = _memo.get(ambient.name) if ambient.get is _MEMO_SAFE.get(ambient.name) else None
            if memo is not None and _equal(memo[0], value):
                digest = memo[1]  # as at the last snapshot: not fingerprinted again
            else:
                keyed = (
                    value if ambient.default is None else _from_default(value, ambient.default())
                )
                digest = None if keyed is _DEFAULT else fingerprint(keyed)
                if ambient.get is _MEMO_SAFE.get(ambient.name):
                    _memo[ambient.name] = (value, digest)
            if digest is not None:
                digests[ambient.name] = digest
        except Exception as exc:
            failed[ambient.name] = f"{type(exc).__name__}: {exc}"
            continue
        values[ambient.name] = value
    return Snapshot(values, digests, failed)


_DEFAULT: Any = object()

# The last value and digest of the built-in states whose ``get`` returns a fresh value of
# immutable parts (a tuple of ints, a copied array, a new dict of option scalars): a value
# equal to the last one has its digest (two snapshots a cell, mostly unchanged; equality
# costs microseconds, a fingerprint of a generator state a millisecond). Only the built-in
# getters: a registered ``get`` may return a live object, which always equals itself.
_MEMO_SAFE: dict[str, Callable[[], Any]] = {}
_memo: dict[str, tuple[Any, str | None]] = {}


def _equal(a: Any, b: Any) -> bool:
    """Deep equality of ambient values (tuples, dicts, lists, arrays, scalars) that also
    tells -0.0 from 0.0; False when unsure (NaN, another type)."""
    t = type(a)
    if t is not type(b):
        return False
    if t in (tuple, list, dict):
        if len(a) != len(b) or (t is dict and a.keys() != b.keys()):
            return False
        try:
            same = a == b  # C speed; raises on arrays inside (numpy's state tuple)
        except (ValueError, TypeError):
            same = None
        if same is False:
            return False
        pairs = ((v, b[k]) for k, v in a.items()) if t is dict else zip(a, b, strict=True)
        # Equal by ==: only floats and nested containers need a closer look.
        return all(
            _equal(x, y) for x, y in pairs if same is None or type(x) in (float, tuple, list, dict)
        )
    if t.__name__ == "ndarray":
        return bool(a.shape == b.shape and a.dtype == b.dtype and (a == b).all())
    if t is float:
        return a == b and repr(a) == repr(b)  # -0.0 is not 0.0; NaN: recomputed
    if t in (str, int, bool, bytes, type(None)):
        return bool(a == b)
    return False


def _from_default(value: Any, default: Any) -> Any:
    """What of ``value`` differs from ``default``: the differing entries of a dict,
    :data:`_DEFAULT` when nothing differs."""
    if isinstance(value, dict) and isinstance(default, dict):
        missing = object()
        diff = {k: v for k, v in value.items() if not _same(default.get(k, missing), v)}
        return diff or _DEFAULT
    return _DEFAULT if _same(value, default) else value


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # arrays and other values without a plain ==
        return a is b


def key_components(before: Snapshot, *, keyed: Keyed) -> dict[str, str]:
    """``{label: digest}`` of the states in ``before`` that are keyed as ``keyed``
    (labels ``ambient `name```, in registration order)."""
    out = {}
    for name, digest in before.digests.items():
        ambient = _REGISTRY.get(name)
        if ambient is not None and ambient.keyed == keyed:
            out[label(name)] = digest
    return out


def label(name: str) -> str:
    """The key component label of an ambient state."""
    return f"ambient `{name}`"


def changed(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """The states the cell changed (a first import that set one up included): their values."""
    names = [n for n in after.values if before.digests.get(n) != after.digests.get(n)]
    out = {}
    for name in names:
        ambient = _REGISTRY.get(name)
        if ambient is not None and ambient.delta is not None and name in before.values:
            out[name] = ambient.delta(before.values[name], after.values[name])
        else:
            out[name] = after.values[name]
    return out


def consumed(before: Snapshot, after: Snapshot) -> list[str]:
    """The ``"when-changed"`` states that existed before the cell ran and that it changed
    (drew from): the states it is keyed on."""
    out = []
    for name in changed(before, after):
        ambient = _REGISTRY.get(name)
        if ambient is not None and ambient.keyed == "when-changed" and name in before.values:
            out.append(name)
    return out


def restore(values: dict[str, Any]) -> list[str]:
    """Set stored states again; returns the names that could not be set (no such state
    registered, its module not imported, or its ``set`` raised)."""
    missing = []
    for name, value in values.items():
        ambient = _REGISTRY.get(name)
        if ambient is None or (ambient.module is not None and not _imported(ambient.module)):
            missing.append(name)
            continue
        try:
            ambient.set(value)
        except Exception as exc:
            logger.warning("cannot restore the ambient state %s: %s", name, exc)
            missing.append(name)
    return missing


# --------------------------------------------------------------------------- reseeding


def _seed_functions() -> dict[int, str]:
    """``{id(function): ambient name}`` of the functions that overwrite a generator's
    state whatever it was (of the libraries already imported)."""
    found: dict[int, str] = {}
    for module, attr, name in (
        ("random", "seed", "random"),
        ("numpy.random", "seed", "numpy.random"),
        ("torch", "manual_seed", "torch.random"),
        ("torch.random", "manual_seed", "torch.random"),
    ):
        top, _, rest = module.partition(".")
        if not _imported(top):
            continue
        owner: Any = sys.modules[top]
        for part in [*rest.split("."), attr] if rest else [attr]:
            owner = getattr(owner, part, None)  # numpy imports numpy.random on first use
        if owner is not None:
            found[id(owner)] = name
    return found


def reseeded(tree: ast.Module, ns: dict[str, Any]) -> set[str]:
    """The generators a cell seeds before anything else it does (after imports):
    ``np.random.seed(0)`` as its first statement. Its results cannot depend on those
    generators' earlier states, so they are not part of its key (a seeding cell would
    otherwise miss in every new kernel, whose generators start from OS entropy)."""
    seeds = _seed_functions()
    out: set[str] = set()
    names = dict(ns)  # what the names mean when the seed call runs
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            _bind_imports(node, names)
            continue
        call = node.value if isinstance(node, ast.Expr) else None
        if not isinstance(call, ast.Call) or call.keywords:
            break
        if not all(isinstance(a, ast.Constant) for a in call.args):
            break  # an argument could itself draw from a generator
        name = seeds.get(id(_resolve(call.func, names)))
        if name is None:
            break
        out.add(name)
    return out


def _bind_imports(node: ast.Import | ast.ImportFrom, names: dict[str, Any]) -> None:
    """What ``import numpy as np`` / ``from numpy import random`` will bind, for modules
    already imported (None for the rest: never imported here)."""
    for alias in node.names:
        if isinstance(node, ast.Import):
            target = alias.name if alias.asname else alias.name.partition(".")[0]
            module = sys.modules.get(target) if _imported(target.partition(".")[0]) else None
            names[alias.asname or target] = module
        elif node.module and not node.level:
            source = (
                sys.modules.get(node.module) if _imported(node.module.partition(".")[0]) else None
            )
            names[alias.asname or alias.name] = getattr(source, alias.name, None)


def _resolve(node: ast.expr, ns: dict[str, Any]) -> Any:
    """The object ``np.random.seed`` names in ``ns``: only through modules (no attribute of
    an arbitrary object is read), before the cell's own imports ran (None then)."""
    if isinstance(node, ast.Name):
        return ns.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, ns)
        if isinstance(owner, types.ModuleType):
            return getattr(owner, node.attr, None)
    return None


# --------------------------------------------------------------------------- built-ins


def _random_get() -> Any:
    import random

    return random.getstate()


def _random_set(state: Any) -> None:
    import random

    random.setstate(state)


def _numpy_get() -> Any:
    import numpy

    return numpy.random.get_state()


def _numpy_set(state: Any) -> None:
    import numpy

    numpy.random.set_state(state)


def _torch_get() -> Any:
    torch: Any = importlib.import_module("torch")  # imported already (module="torch")

    state: dict[str, Any] = {"cpu": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _torch_set(state: Any) -> None:
    torch: Any = importlib.import_module("torch")

    def tensor(raw: bytes) -> Any:
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


# rcParams["backend"] resolves (and may switch) the backend when read; it is not style.
_RC_SKIP = frozenset({"backend", "backend_fallback"})


def _rc_get() -> Any:
    import matplotlib

    # dict's own items: RcParams.__getitem__ would resolve the backend and warn for
    # deprecated keys.
    return {k: v for k, v in dict.items(matplotlib.rcParams) if k not in _RC_SKIP}


def _rc_default() -> Any:
    import matplotlib

    original = getattr(matplotlib, "rcParamsOrig", None) or matplotlib.rcParamsDefault
    return {k: v for k, v in dict.items(original) if k not in _RC_SKIP}


def _rc_set(values: Any) -> None:
    import matplotlib

    params = matplotlib.rcParams
    current = _rc_get()
    params.update({k: v for k, v in values.items() if k not in current or current[k] != v})


_PANDAS_KEYS: list[tuple[int, list[tuple[str, list[str]]]]] = []


def _pandas_get() -> Any:
    config: Any = importlib.import_module("pandas._config.config")

    # Read from pandas' own nested dict of option values: what get_option returns for a
    # registered, non-deprecated key, without its pattern matching (0.4 ms a snapshot).
    registered = config._registered_options
    if not _PANDAS_KEYS or _PANDAS_KEYS[0][0] != len(registered):
        deprecated = config._deprecated_options
        keys = [(k, k.split(".")) for k in sorted(registered) if k not in deprecated]
        _PANDAS_KEYS[:] = [(len(registered), keys)]
    root = config._global_config
    out = {}
    for key, parts in _PANDAS_KEYS[0][1]:
        node = root
        for part in parts:
            node = node[part]
        out[key] = node
    return out


def _pandas_default() -> Any:
    config: Any = importlib.import_module("pandas._config.config")
    options = config._registered_options
    return {key: options[key].defval for key in options if key not in config._deprecated_options}


def _pandas_set(values: Any) -> None:
    config: Any = importlib.import_module("pandas._config.config")

    current = _pandas_get()
    for key, value in values.items():
        if key in current and current[key] != value:
            config.set_option(key, value)


def _cwd_set(path: Any) -> None:
    os.chdir(path)


# sys.path as the process started: only what a notebook adds (or removes) is state.
_BASE_PATH = tuple(sys.path)


def _path_get() -> Any:
    base = set(_BASE_PATH)
    return {
        "added": [p for p in sys.path if p not in base],
        "front": [p for p in sys.path[: _first_base_index()] if p not in base],
        "removed": [p for p in _BASE_PATH if p not in sys.path],
    }


def _first_base_index() -> int:
    base = set(_BASE_PATH)
    return next((i for i, p in enumerate(sys.path) if p in base), len(sys.path))


def _path_set(state: Any) -> None:
    removed = set(state["removed"])
    kept = [p for p in _BASE_PATH if p not in removed]
    front = list(state["front"])
    back = [p for p in state["added"] if p not in front]
    # Entries the running process added that are in neither list go: the stored state is
    # what the cell left, and the cell started where this process is now (the key says so).
    sys.path[:] = front + kept + back


register_ambient("random", _random_get, _random_set, keyed="when-changed")
register_ambient("numpy.random", _numpy_get, _numpy_set, module="numpy", keyed="when-changed")
register_ambient("torch.random", _torch_get, _torch_set, module="torch", keyed="when-changed")
register_ambient("matplotlib.rcParams", _rc_get, _rc_set, module="matplotlib", default=_rc_default)
register_ambient(
    "pandas.options", _pandas_get, _pandas_set, module="pandas", default=_pandas_default
)
_MEMO_SAFE.update(random=_random_get, **{"numpy.random": _numpy_get, "pandas.options": _pandas_get})
register_ambient("cwd", os.getcwd, _cwd_set)
register_ambient(
    "sys.path", _path_get, _path_set, default=lambda: {"added": [], "front": [], "removed": []}
)


# os.environ as the process started: only what a notebook sets or unsets is state, apart
# from this package's own settings (where results go, not what they are), pytest's record
# of the test in progress, and private names (a leading `_`) that libraries set for
# themselves when imported (pyarrow's `_RJEM_MALLOC_CONF`: imported by a background thread,
# it would change keys at random).
_BASE_ENV = dict(os.environ)


def _env_state(name: str) -> bool:
    return not (name.startswith(("NOTEBOOK_FLOW_", "_")) or name == "PYTEST_CURRENT_TEST")


def _env_get() -> Any:
    env = os.environ
    return {
        "set": {k: v for k, v in env.items() if _BASE_ENV.get(k) != v and _env_state(k)},
        "removed": sorted(k for k in _BASE_ENV if k not in env and _env_state(k)),
    }


def _env_set(state: Any) -> None:
    target = dict(_BASE_ENV)
    target.update(state["set"])
    for name in state["removed"]:
        target.pop(name, None)
    for name in [k for k in os.environ if k not in target and _env_state(k)]:
        del os.environ[name]
    for name, value in target.items():
        if os.environ.get(name) != value and _env_state(name):
            os.environ[name] = value


# numpy's print options and floating-point error handling as numpy starts with them.
_NUMPY_PRINT_DEFAULT = {
    "edgeitems": 3,
    "threshold": 1000,
    "floatmode": "maxprec",
    "precision": 8,
    "suppress": False,
    "linewidth": 75,
    "nanstr": "nan",
    "infstr": "inf",
    "sign": "-",
    "formatter": None,
    "legacy": False,
    "override_repr": None,
}
_NUMPY_ERR_DEFAULT = {"divide": "warn", "over": "warn", "under": "ignore", "invalid": "warn"}


def _print_get() -> Any:
    import numpy as np  # (consulted only while numpy is imported)

    return dict(np.get_printoptions())


def _print_set(options: Any) -> None:
    import numpy as np

    np.set_printoptions(**options)


def _err_get() -> Any:
    import numpy as np

    return dict(np.geterr())


def _err_set(modes: Any) -> None:
    import numpy as np

    np.seterr(**modes)


register_ambient("os.environ", _env_get, _env_set, default=lambda: {"set": {}, "removed": []})
register_ambient(
    "numpy.printoptions",
    _print_get,
    _print_set,
    module="numpy",
    default=lambda: dict(_NUMPY_PRINT_DEFAULT),
)
register_ambient(
    "numpy.errstate", _err_get, _err_set, module="numpy", default=lambda: dict(_NUMPY_ERR_DEFAULT)
)


# The warning filters (`warnings.simplefilter("error")` makes a later cell raise where it
# printed a warning). Not keyed: libraries add their own filters when imported (pyarrow,
# panel, statsmodels), some of them from background threads, so keys would depend on
# import timing; what a cell changes is stored as a change and applied on a hit.
def _warnings_get() -> Any:
    import warnings

    out = []
    filters: list[Any] = list(warnings.filters)
    for action, message, category, module, lineno in filters:
        out.append(
            (
                action,
                getattr(message, "pattern", message),
                getattr(message, "flags", 0),
                f"{category.__module__}:{category.__qualname__}",
                getattr(module, "pattern", module),
                lineno,
            )
        )
    return tuple(out)


def _warnings_delta(before: Any, after: Any) -> Any:
    """What a cell did to the filters: entries it put in front, entries it appended,
    entries it removed (a filter added again moves to the front)."""
    old, new = set(before), list(after)
    back: list[Any] = []
    while new and new[-1] not in old:
        back.insert(0, new.pop())
    k = 0
    while k < len(new):
        tail = new[k:]
        kept = set(tail)
        if tail == [e for e in before if e in kept]:
            break
        k += 1
    removed = [e for e in before if e not in set(after)]
    return ("delta", tuple(new[:k]), tuple(back), tuple(removed))


def _warnings_set(entries: Any) -> None:
    import re
    import warnings

    if entries and entries[0] == "delta":  # applied to the filters there are now
        _, front, back, removed = entries
        drop = {*front, *back, *removed}
        entries = (*front, *(e for e in _warnings_get() if e not in drop), *back)
    rebuilt = []
    for action, message, flags, category, module, lineno in entries:
        owner, _, qualname = category.partition(":")
        cls: Any = importlib.import_module(owner)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        rebuilt.append(
            (
                action,
                None if message is None else re.compile(message, flags),
                cls,
                None if module is None else re.compile(module),
                lineno,
            )
        )
    live: Any = warnings.filters
    live[:] = rebuilt
    mutated = getattr(warnings, "_filters_mutated", None) or getattr(
        warnings, "_filters_mutated_lock_held", None
    )
    if mutated is not None:
        mutated()  # the `once`/`default` registries are checked against the new filters


# decimal's context of the kernel's thread (precision, rounding, limits, traps; not the
# flags, which every inexact operation sets).
_DECIMAL_FIELDS = ("prec", "rounding", "Emin", "Emax", "capitals", "clamp")


def _decimal_state(context: Any) -> Any:
    traps = sorted(s.__name__ for s, on in context.traps.items() if on)
    return (*(getattr(context, f) for f in _DECIMAL_FIELDS), tuple(traps))


def _decimal_get() -> Any:
    import decimal

    return _decimal_state(decimal.getcontext())


def _decimal_set(state: Any) -> None:
    import decimal

    context = decimal.getcontext()
    for field, value in zip(_DECIMAL_FIELDS, state, strict=False):
        setattr(context, field, value)
    on = set(state[-1])
    for signal in list(context.traps):
        context.traps[signal] = signal.__name__ in on


_BASE_RECURSION = sys.getrecursionlimit()


# scikit-learn's configuration (`set_config(display="text")`, `transform_output="pandas"`).
def _sklearn_get() -> Any:
    sklearn: Any = importlib.import_module("sklearn")
    return dict(sklearn.get_config())


def _sklearn_set(config: Any) -> None:
    import inspect

    sklearn: Any = importlib.import_module("sklearn")
    accepted = inspect.signature(sklearn.set_config).parameters
    sklearn.set_config(**{k: v for k, v in config.items() if k in accepted})


def _sklearn_default() -> Any:
    config: Any = importlib.import_module("sklearn._config")
    return dict(config._global_config)


# The root logger (`logging.basicConfig(level="INFO")` makes later cells print their log
# records): its level, `logging.disable`, and its handlers; those that can be made again
# (streams to stdout/stderr, files appended to) are set up again on a hit.
def _handler_state(handler: Any) -> Any:
    import logging

    formatter = handler.formatter
    fmt = None if formatter is None else (formatter._fmt, formatter.datefmt)
    if type(handler) is logging.FileHandler:
        target = ("file", handler.baseFilename)
    elif type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout):
        target = ("stream", "stdout" if handler.stream is sys.stdout else "stderr")
    else:
        # Another kind (a test runner's capture, a library's own): keyed by its kind, never
        # made again; a restore leaves such handlers as they are.
        target = ("other", f"{type(handler).__module__}.{type(handler).__qualname__}")
    return (target, handler.level, fmt)


def _logging_get() -> Any:
    import logging

    root = logging.getLogger()
    return (
        root.level,
        logging.root.manager.disable,
        tuple(_handler_state(h) for h in root.handlers),
    )


def _logging_set(state: Any) -> None:
    import logging

    level, disable, handlers = state
    root = logging.getLogger()
    root.setLevel(level)
    logging.disable(disable)
    _set_handlers(root, handlers)


def _set_handlers(target: Any, handlers: Any) -> None:
    """Give the logger ``target`` the ``handlers`` described: the makeable ones it has
    already are kept, others made (streams to stdout/stderr, files appended to); handlers
    of another kind are left as they are."""
    import logging

    live: dict[Any, Any] = {}
    for handler in list(target.handlers):
        described = _handler_state(handler)
        if described[0][0] != "other":
            live[described] = handler
            target.removeHandler(handler)
    for described in handlers:
        if described[0][0] == "other":
            continue
        handler = live.pop(described, None)
        if handler is None:
            (kind, where), handler_level, fmt = described
            if kind == "file":
                handler = logging.FileHandler(where, mode="a")
            else:
                handler = logging.StreamHandler(getattr(sys, where))
            handler.setLevel(handler_level)
            if fmt is not None:
                handler.setFormatter(logging.Formatter(fmt[0], fmt[1]))
        target.addHandler(handler)


# Named loggers (`logging.getLogger("prophet").setLevel("ERROR")`, `logging.config.
# dictConfig(...)` disabling the loggers it does not name): level, propagate, disabled and
# handlers of each logger not as a fresh one is. Not keyed, like the warning filters:
# libraries configure their loggers when imported, so keys would follow import order; what
# a cell changes is stored as a change and applied on a hit.
_FRESH_LOGGER = (logging.NOTSET, True, False, ())


def _loggers_get() -> Any:
    out = {}
    for name, item in list(logging.root.manager.loggerDict.items()):
        if isinstance(item, logging.Logger):
            state = (
                item.level,
                item.propagate,
                item.disabled,
                tuple(_handler_state(h) for h in item.handlers),
            )
            if state != _FRESH_LOGGER:
                out[name] = state
    return out


def _loggers_delta(before: Any, after: Any) -> Any:
    """The loggers a cell configured (their state after it) and those it set back to a
    fresh logger's state."""
    changed = {name: state for name, state in after.items() if before.get(name) != state}
    return ("delta", changed, tuple(sorted(name for name in before if name not in after)))


def _loggers_set(state: Any) -> None:
    if isinstance(state, tuple) and state and state[0] == "delta":
        _, changed, reset = state
    else:  # the whole state (a cell that ran while nothing was snapshot before it)
        changed, reset = state, ()
    for name, (level, propagate, disabled, handlers) in [
        *changed.items(),
        *((name, _FRESH_LOGGER) for name in reset),
    ]:
        target = logging.getLogger(name)
        target.setLevel(level)
        target.propagate = propagate
        target.disabled = disabled
        _set_handlers(target, handlers)


register_ambient(
    "warnings.filters", _warnings_get, _warnings_set, keyed="never", delta=_warnings_delta
)
register_ambient(
    "decimal.context",
    _decimal_get,
    _decimal_set,
    module="decimal",
    default=lambda: _decimal_state(importlib.import_module("decimal").DefaultContext),
)
register_ambient(
    "sys.recursionlimit",
    sys.getrecursionlimit,
    sys.setrecursionlimit,
    default=lambda: _BASE_RECURSION,
)
register_ambient(
    "sklearn.config", _sklearn_get, _sklearn_set, module="sklearn", default=_sklearn_default
)
register_ambient(
    "logging.root", _logging_get, _logging_set, default=lambda: (logging.WARNING, 0, ())
)
register_ambient("logging.loggers", _loggers_get, _loggers_set, keyed="never", delta=_loggers_delta)
_MEMO_SAFE.update(
    {
        "warnings.filters": _warnings_get,
        "decimal.context": _decimal_get,
        "sklearn.config": _sklearn_get,
        "logging.root": _logging_get,
        "logging.loggers": _loggers_get,
    }
)
