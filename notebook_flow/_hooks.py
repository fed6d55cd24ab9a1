"""The hooks by which a lower layer reaches a higher one without importing it.

The layers of the run path, bottom to top (each imports only the ones below it; a test,
``tests/test_layers.py``, fails on any import chain that goes up):

1. ``tasks/``    — the call path: key → lookup → lock → run → commit → record;
2. ``futures/``  — ``TaskFuture`` and the resolution of futures passed as arguments;
3. ``runners/``  — where submitted runs execute (embedded threads, processes, Dask);
4. ``notebook``  — live display of futures in Jupyter.

Three places need to go up: ``Task.submit`` / ``Task.map`` (tasks → runners), a direct
call that receives futures (tasks → futures), and a future shown in a cell (futures →
notebook). Each calls a slot of this module instead. The futures layer fills
:data:`resolver` when it is imported (no future can exist before that, so an empty slot
means "nothing to resolve"); the package root (``notebook_flow/__init__.py``, the one
module that knows every layer) fills :data:`submit_run`, :data:`map_runs` and :data:`show`
with functions that import their layer on first use.

This module imports nothing, so any layer can read it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["Resolver", "Submitter", "map_runs", "resolver", "show", "submit_run"]


class Resolver(Protocol):
    """What the futures layer offers a direct call (see ``futures/arguments.py``)."""

    def needs(self, args: tuple[Any, ...], kwargs: dict[str, Any], wait_for: Any) -> bool:
        """True if the arguments or ``wait_for`` hold futures or argument markers
        (cheap: no waiting)."""
        ...

    def resolve(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], wait_for: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Wait for the futures, then the arguments with each replaced by its result."""
        ...


#: ``(task, args, kwargs, wait_for) -> result``: how ``task.submit`` / ``task.map`` hand over.
Submitter = Callable[[Any, tuple[Any, ...], dict[str, Any], Sequence[Any] | None], Any]

#: ``task.submit(*args, wait_for=..., **kwargs)`` → ``submit_run(task, args, kwargs, wait_for)``.
submit_run: Submitter | None = None

#: ``task.map(*args, wait_for=..., **kwargs)`` → ``map_runs(task, args, kwargs, wait_for)``.
map_runs: Submitter | None = None

#: Show a ``TaskFuture`` or ``FutureList`` in the running IPython (``_ipython_display_``).
show: Callable[[Any], None] | None = None

#: The futures layer, once imported: resolves futures among a direct call's arguments.
resolver: Resolver | None = None
