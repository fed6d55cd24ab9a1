"""Futures of submitted runs: :class:`TaskFuture`, :class:`FutureList`, :func:`wait`,
:func:`as_completed`, and the argument markers :class:`unmapped` and :class:`allow_failure`.

>>> fut = load.submit("a.csv")           # returns at once            # doctest: +SKIP
>>> fut.result(timeout=60)               # blocks; raises the task's own error  # doctest: +SKIP
>>> futs = clean.map(paths, unmapped(cfg))                            # doctest: +SKIP
>>> done, not_done = wait(futs, timeout=10)                           # doctest: +SKIP

The names follow :mod:`concurrent.futures` (``result``, ``exception``, ``done``,
``cancel``, ``add_done_callback``, ``wait``, ``as_completed``); a future is also awaitable
(``await fut`` in a notebook cell).

:mod:`.future` holds :class:`TaskFuture` (and the one lock every state change takes),
:mod:`.arguments` the markers and the resolution of futures passed as arguments,
:mod:`.many` what works on many futures at once. Import from ``notebook_flow.futures``.
"""

from __future__ import annotations

from notebook_flow import _hooks

from .arguments import (
    _DirectCallResolver,
    allow_failure,
    collect_futures,
    resolve_futures,
    unmapped,
)
from .future import TaskFuture, describe
from .many import DoneAndNotDone, FutureList, as_completed, wait

# A direct call ``task(fut)`` resolves futures through this hook (tasks/ sits below this
# layer and does not import it; see notebook_flow/_hooks.py).
_hooks.resolver = _DirectCallResolver()

__all__ = [
    "DoneAndNotDone",
    "FutureList",
    "TaskFuture",
    "allow_failure",
    "as_completed",
    "collect_futures",
    "describe",
    "resolve_futures",
    "unmapped",
    "wait",
]
