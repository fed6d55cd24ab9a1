"""Looking up a library that may be loaded, without ever seeing it half-imported.

Code that handles numpy arrays or DataFrames only when those libraries are in use asks
``sys.modules`` rather than importing them (``import notebook_flow`` must stay fast). But
``sys.modules`` holds a module from the moment its import *starts*: while another thread
imports pandas (the metadata recorder does, through DuckDB, on a cold process's first
``submit``), ``sys.modules.get("pandas")`` returns a module without ``DataFrame`` yet — an
``AttributeError``, or a wrong answer cached for good. :func:`loaded` waits for such an
import to finish instead (DESIGN §7: a cold process behaves like a warm one).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

__all__ = ["loaded"]


def loaded(name: str) -> ModuleType | None:
    """The module ``name`` if it is imported (or being imported by another thread: then
    once that import has finished), else None. Never imports a module that nobody asked for.

    >>> loaded("sys") is sys
    True
    >>> loaded("a_module_nobody_imported") is None
    True
    """
    module = sys.modules.get(name)
    if module is None:
        return None
    spec = getattr(module, "__spec__", None)
    if spec is not None and getattr(spec, "_initializing", False):
        # The import system sets _initializing while the module's code runs, and its
        # per-module lock makes a second import wait for the first (in the importing
        # thread itself, this returns the module as it stands: no deadlock).
        try:
            module = importlib.import_module(name)
        except ImportError:
            return None
    return module
