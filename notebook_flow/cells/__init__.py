"""``%%task`` cell caching: analyse a cell, key it, then run it or restore it.

The magic in :mod:`notebook_flow.magics` only parses options; everything a cached cell
does lives here, top to bottom:

1. :func:`analyze_cell` reads the cell (after IPython's ``transform_cell``) with ``ast`` and
   ``symtable``: the names it reads from the namespace before binding them, the names it
   binds or mutates (``x = …``, ``x += …``, ``x[…] = …``, ``x.attr = …``, ``def``,
   ``class``, ``import``), and what makes it *opaque* (``global``, ``exec``, ``eval``,
   ``import *``, top-level ``await``).
2. :func:`cell_components` keys it: the normalized code (comments and whitespace don't
   count) plus a fingerprint of every value it reads, functions by their deep source.
   Never the cell's position, id or execution count.
3. :class:`CellRunner` looks the key up. A hit restores the stored variables, re-runs the
   cell's ``def``/``class``/``import`` statements (so functions stay bound to the live
   namespace), replays the outputs and shows one quiet badge. A miss runs the cell through
   the shell on the main thread (tracebacks, display, events as usual) while recording its
   streams and rich outputs, then commits variables, effects, ambient state, outputs and
   the files it wrote as one result (:mod:`.files`: a hit writes those back).

>>> a = analyze_cell("y = f(x)\\nx += 1\\nz[0] = y")
>>> a.reads, sorted(a.writes)
(('f', 'x', 'z'), ['x', 'y', 'z'])

A hit leaves the state a plain run leaves (see ``docs/cells.md``): ambient state (global
random generators, rcParams, pandas options, cwd, ``sys.path``) is part of the key when read
and stored when changed; objects changed through called functions are outputs; outputs are
restored in place where the cell changed them in place, so aliases stay aliases.

The package follows those steps: :mod:`.analysis` (1), :mod:`.key` (the options and 2),
:mod:`.ambient` (ambient state) and :mod:`.effects` (what called functions reach),
:mod:`.runner` (3) with :mod:`.execute` (running code as IPython does), :mod:`.capture`
(recording and replaying outputs), :mod:`.state` and :mod:`.result` (storing identities,
restoring in place), :mod:`.storable` (what cannot be stored) and :mod:`.auto` (``%flow
auto``). What other modules use is re-exported here: import it from ``notebook_flow.cells``.
"""

from __future__ import annotations

from .analysis import CellAnalysis, analyze_cell
from .analysis import _parse as _parse
from .analysis import _top_level_await as _top_level_await
from .analysis import normalized_code_hash as normalized_code_hash
from .capture import Replayed as Replayed
from .capture import replay as replay
from .key import CellOptions, cell_components, parse_duration
from .key import input_names as input_names
from .runner import CELL_FORMAT as CELL_FORMAT
from .runner import CellReport as CellReport
from .runner import CellRunner
from .runner import _note as _note
from .storable import unstorable as unstorable

__all__ = [
    "CellAnalysis",
    "CellOptions",
    "CellRunner",
    "analyze_cell",
    "cell_components",
    "parse_duration",
]
