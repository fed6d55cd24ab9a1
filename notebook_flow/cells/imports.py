"""Local modules a cell imports itself, and uses in the same cell.

``import helpers as h`` in a cell binds ``h`` by a definition: it is re-executed on a hit,
not an input of the key. But the cell may then change the module's state (``h.ITEMS.append
(2)``, ``h.draw()`` advancing the module's generator), and a hit must leave that state as a
plain run does. So for each local (user) module a cell imports and then uses:

* imported already (by an earlier cell): it is keyed and watched like a module the cell
  reads, through a path that finds it whatever the cell binds it to
  (``sys.modules['helpers']``, :func:`.effects.module_path`);
* not imported yet: its state before the cell does not exist to compare with, so the cell
  runs uncached and says so (import the module in an earlier cell to cache this one).

Library and standard-library modules are keyed by their versions elsewhere and never
watched.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from typing import Any

from notebook_flow._codehash import module_kind, path_kind

__all__ = ["ImportedModules", "imported_modules"]


class ImportedModules:
    """The local modules a cell imports and uses: ``watched`` ``{bound name: (module name,
    attribute or None)}`` for those imported already, and ``why`` (a reason to run
    uncached) for the first one that is not."""

    def __init__(self) -> None:
        self.watched: dict[str, tuple[str, str | None]] = {}
        self.why: str | None = None


def imported_modules(tree: ast.Module) -> ImportedModules:
    """The local modules the top-level imports of ``tree`` bind and the cell uses after."""
    out = ImportedModules()
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                module = alias.name if alias.asname else alias.name.split(".")[0]
                _add(out, used, bound, module, None)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                if alias.name == "*":
                    continue
                bound = alias.asname or alias.name
                sub = f"{node.module}.{alias.name}"
                if _is_module(sub):
                    _add(out, used, bound, sub, None)
                else:
                    _add(out, used, bound, node.module, alias.name)
    return out


def _add(out: ImportedModules, used: set[str], bound: str, module: str, attr: str | None) -> None:
    if bound not in used or out.why is not None:
        return
    loaded = sys.modules.get(module)
    if loaded is not None:
        if isinstance(loaded, types.ModuleType) and module_kind(module) == "user":
            out.watched[bound] = (module, attr)
        return
    if _local(module):
        out.why = (
            f"it imports the local module `{module}` and uses it in the same cell: what the "
            "cell changes in the module cannot be watched before the module exists. Import "
            "it in an earlier cell to cache this one"
        )


def _is_module(name: str) -> bool:
    """True when ``name`` is an imported module (``from pkg import sub``); a submodule not
    imported yet counts as an attribute of its package (finding it would import the
    package)."""
    return isinstance(sys.modules.get(name), types.ModuleType)


def _local(module: str) -> bool:
    """True when ``module`` (not imported) would be loaded from the user's own files."""
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names:
        return False
    try:
        spec: Any = importlib.util.find_spec(top)  # a top-level name: imports nothing
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    origin = spec.origin or next(iter(spec.submodule_search_locations or ()), None)
    if origin is None or origin in ("built-in", "frozen"):
        return False
    return (path_kind(origin) or "user") == "user"
