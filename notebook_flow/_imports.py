"""Look up an imported library without ever seeing it half-imported.

``sys.modules`` holds a module from the moment its import *starts*. While another thread
is still running ``import pandas`` (the metadata recorder does, on the first cache hit of a
process), ``sys.modules["pandas"]`` exists but has no ``DataFrame`` yet: a type check that
trusts ``sys.modules.get`` then fails with ``AttributeError: partially initialized module``.
``imported(name)`` returns a module only once its import has finished: if another thread
is importing it, it waits for that import (through the import system's own per-module
lock, which detects deadlocks); in the importing thread itself it returns None.

It never starts an import: a library nobody imported is None, so checking the type of a
plain value costs no import.

>>> import json
>>> imported("json") is json, imported("surely_not_imported_module_xyz")
(True, None)
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

__all__ = ["imported"]


def imported(name: str) -> ModuleType | None:
    """The module ``name`` if it is fully imported (waiting for an import in progress)."""
    module = sys.modules.get(name)
    if module is None or not _initializing(module):
        return module
    try:
        # The import system sees the module initializing, takes its lock (so waits for
        # the importing thread to finish) and hands back the finished module.
        module = importlib.import_module(name)
    except Exception:  # the other thread's import failed: the library is not there
        return None
    return None if _initializing(module) else module


def _initializing(module: ModuleType) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))
