"""``%flow auto``: which wrapped cells are worth caching, and which must run plain.

With auto caching on (``%flow auto on``, ``configure(auto_cells=True)``,
``NOTEBOOK_FLOW_AUTO_CELLS=1`` or ``notebook-flow run --cache-all``) every code cell runs
as ``%%task --auto``. Two questions are asked of such a cell:

* before it runs, :func:`auto_plain_reason`: is there anything to cache, and can it be
  cached faithfully? A cell of only ``def``/``class``/``import`` statements runs plain (a
  hit re-runs those statements anyway); a cell with line magics or ``!`` commands runs
  plain with a one-line reason (their effects, a changed backend or an installed package,
  are not values that can be stored).
* after it ran, :func:`worth_storing`: was it dearer than storing and restoring it? A cell
  that took less than :data:`MIN_SECONDS`, or less than :data:`STORE_FACTOR` times what
  serializing its state took on this run (writing and later reading it back cost about as
  much again), is not stored: the next run computes it again, which is faster than a hit
  would be. Keying and the lookup are not weighed: they are paid either way. Such a cell
  still runs between restored cells in order, so it sees the state a plain run gives it.
  ``NOTEBOOK_FLOW_AUTO_MIN_SECONDS`` sets that minimum (``0``: store every cell whatever it
  costs, as the corpus tests do, so that what a second run restores does not depend on how
  busy the machine was on the first).

>>> from notebook_flow.cells import analyze_cell
>>> auto_plain_reason(analyze_cell("import numpy as np\\ndef f(x):\\n    return x"))
''
>>> worth_storing(0.001, store_seconds=0.0)
False
>>> worth_storing(2.0, store_seconds=0.1)
True
"""

from __future__ import annotations

import ast
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .analysis import CellAnalysis

__all__ = ["MIN_SECONDS", "STORE_FACTOR", "auto_plain_reason", "store_deadline", "worth_storing"]

#: A cell faster than this is never stored in auto mode: a hit (a manifest read, a payload
#: load, the outputs replayed) costs a few milliseconds on a local store.
MIN_SECONDS = 0.05

#: A cell is stored only when it took this many times longer than serializing its state:
#: a hit costs reading and deserializing that state (about the same again, and more on a
#: remote store), so below that it saves too little.
STORE_FACTOR = 3.0

_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def auto_plain_reason(analysis: CellAnalysis) -> str | None:
    """Why an auto-wrapped cell runs plain: ``None`` to cache it, ``""`` to run it plain
    without a note (nothing worth caching), or a one-line reason to show."""
    body = analysis.tree.body
    if all(isinstance(node, (*_DEFINITIONS, ast.Pass)) for node in body):
        return ""
    if "get_ipython" in analysis.reads:
        if all(_is_ipython_command(node) for node in body):
            return ""  # `%matplotlib inline`, `!pip list`: IPython commands, not Python code
        return (
            "it runs IPython magics or shell commands (`%…`, `!…`), whose effects are not "
            "values that can be stored; start the cell with %%task to cache it anyway"
        )
    return None


def _is_ipython_command(node: ast.stmt) -> bool:
    """``get_ipython().run_line_magic(...)`` / ``.system(...)``: a line IPython rewrote."""
    value = node.value if isinstance(node, (ast.Expr, ast.Assign)) else None
    if not isinstance(value, ast.Call) or not isinstance(value.func, ast.Attribute):
        return False
    owner = value.func.value
    return (
        isinstance(owner, ast.Call)
        and isinstance(owner.func, ast.Name)
        and owner.func.id == "get_ipython"
    )


def worth_storing(duration: float, store_seconds: float) -> bool:
    """True when a cell that ran for ``duration`` s is worth storing, given the
    ``store_seconds`` it took to serialize its state."""
    minimum = _min_seconds()
    if minimum == 0:
        return True
    return duration >= minimum and duration >= STORE_FACTOR * store_seconds


def store_deadline(duration: float, commit_seconds: float) -> float | None:
    """The ``time.perf_counter()`` by which serializing the state of a cell that ran for
    ``duration`` s must be done for :func:`worth_storing` to say yes (a commit's fixed cost
    ``commit_seconds`` on top), or None when every cell is stored. Work past it is wasted:
    the cell runs plain either way (a figure's object graph took 0.15-0.5 s to walk, pickle
    and check after plot cells of 0.2 s, which were then not stored)."""
    if _min_seconds() == 0:
        return None
    return time.perf_counter() + max(0.0, duration / STORE_FACTOR - commit_seconds)


def _min_seconds() -> float:
    from notebook_flow.options import env_seconds

    return env_seconds("NOTEBOOK_FLOW_AUTO_MIN_SECONDS", MIN_SECONDS, zero=True)
