"""The options of a ``%%task`` cell and its key: the code plus a fingerprint of every
value it reads.

Step 2 of :mod:`notebook_flow.cells`. The labels and hashes made here, with the code hash
from :mod:`.analysis`, are the cell's cache key (through
:func:`~notebook_flow.cache_policies.combine_components`): stored results are found by
them, so any change here makes every stored cell miss.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
from typing import TYPE_CHECKING, Any

import xxhash

from notebook_flow.errors import ConfigurationError, UnhashableError

if TYPE_CHECKING:
    from .analysis import CellAnalysis
    from .imports import ImportedModules

__all__ = ["CellOptions", "cell_components", "input_names", "parse_duration", "rng_keys"]


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
    off: bool = False  # run plain (``%%task --off``: excluded from ``%flow auto``)
    auto: bool = False  # wrapped by ``%flow auto``: cheap or unsafe cells run plain
    pin: bool = False  # never evicted or pruned (notebook_flow.lifecycle)


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
    from notebook_flow.hashing import fingerprint
    from notebook_flow.sourcehash import class_fingerprint, function_fingerprint

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


def imported_components(analysis: CellAnalysis, imported: ImportedModules) -> dict[str, str]:
    """``{label: hash}`` of the local modules (or their functions and values) the cell
    imports itself and then uses, imported already by an earlier cell
    (:mod:`.imports`): their state is an input as a module the cell reads would be."""
    out = {}
    for bound, (module, attr) in imported.watched.items():
        value: Any = sys.modules[module]
        attrs = analysis.attributes.get(bound, frozenset())
        if attr is not None:
            value, attrs = getattr(value, attr, None), frozenset()
        part = _value_component(bound, value, attrs)
        if part is not None:
            out[f"imported {part[0]}"] = part[1]
    return out


def rng_keys(
    identity: str, components: dict[str, str], rng: dict[str, str]
) -> list[tuple[str, dict[str, str]]]:
    """``(key, components)`` for each non-empty combination of the global generators'
    states (fewest first): the keys of a cell that drew from those generators."""
    import itertools

    from notebook_flow.cache_policies import combine_components

    out = []
    for size in range(1, len(rng) + 1):
        for labels in itertools.combinations(sorted(rng), size):
            parts = {**components, **{lab: rng[lab] for lab in labels}}
            out.append((combine_components(identity, parts), parts))
    return out
