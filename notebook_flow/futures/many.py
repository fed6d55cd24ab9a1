"""Many futures at once: :class:`FutureList` (what ``task.map`` returns), :func:`wait` and
:func:`as_completed`, with the names of :mod:`concurrent.futures`.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, NamedTuple

from notebook_flow import _hooks
from notebook_flow.states import RunState

from .future import _FAILED_STATES, _FINAL, _PENDING, _RUNNING, TaskFuture


class FutureList(list[TaskFuture[Any]]):
    """The futures of ``task.map(...)``: a list with ``result()``, ``wait()`` and a live
    progress bar when shown in a notebook cell.

    >>> futs = square.map(range(10))                        # doctest: +SKIP
    >>> futs.result()                                       # doctest: +SKIP
    [0, 1, 4, 9, ...]
    """

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> list[Any]:
        """Every result in order; raises the first failure (in list order), or with
        ``raise_on_failure=False`` puts each failed run's exception in its place."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for fut in self:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            out.append(fut.result(remaining, raise_on_failure=raise_on_failure))
        return out

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for all; False if ``timeout`` passed first."""
        return not wait(self, timeout).not_done

    def done(self) -> bool:
        return all(f.done() for f in self)

    def cancel(self) -> int:
        """Cancel every run that has not finished; returns how many were cancelled or flagged."""
        return sum(1 for f in self if f.cancel())

    def counts(self) -> dict[str, int]:
        """How many runs are pending, running, completed, cached, failed."""
        out = {"pending": 0, "running": 0, "completed": 0, "cached": 0, "failed": 0}
        for fut in self:
            state = fut._state
            if state is _PENDING:
                out["pending"] += 1
            elif state is _RUNNING:
                out["running"] += 1
            elif state is RunState.COMPLETED:
                out["completed"] += 1
            elif state is RunState.CACHED:
                out["cached"] += 1
            else:
                out["failed"] += 1
        return out

    def __repr__(self) -> str:
        c = self.counts()
        names = sorted({f.task.name for f in self})
        what = ", ".join(f"`{n}`" for n in names[:3]) + (", …" if len(names) > 3 else "")
        parts = ", ".join(f"{v} {k}" for k, v in c.items() if v) or "empty"
        return f"<FutureList of {len(self)} runs of {what or 'nothing'}: {parts}>"

    def _ipython_display_(self) -> None:
        show = _hooks.show  # the notebook layer (set by the package root; see _hooks.py)
        if show is None:
            raise NotImplementedError  # IPython then shows the repr
        show(self)


class DoneAndNotDone(NamedTuple):
    done: set[TaskFuture[Any]]
    not_done: set[TaskFuture[Any]]


ReturnWhen = Literal["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"]


def wait(
    futures: Iterable[TaskFuture[Any]],
    timeout: float | None = None,
    return_when: ReturnWhen = "ALL_COMPLETED",
) -> DoneAndNotDone:
    """Wait for futures like :func:`concurrent.futures.wait`; returns ``(done, not_done)``.

    >>> done, not_done = wait(futs, timeout=30)             # doctest: +SKIP
    """
    fs = list(dict.fromkeys(futures))
    deadline = None if timeout is None else time.monotonic() + timeout
    if return_when == "ALL_COMPLETED":
        for fut in fs:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            if not fut.wait(remaining):
                break
    else:
        if return_when not in ("FIRST_COMPLETED", "FIRST_EXCEPTION"):
            raise ValueError(f"return_when must be one of {ReturnWhen}, got {return_when!r}")
        for fut in as_completed(fs, timeout, _stop_on_timeout=True):
            if return_when == "FIRST_COMPLETED" or fut._state in _FAILED_STATES:
                break
    done = {f for f in fs if f._state in _FINAL}
    return DoneAndNotDone(done, set(fs) - done)


def as_completed(
    futures: Iterable[TaskFuture[Any]],
    timeout: float | None = None,
    *,
    _stop_on_timeout: bool = False,
) -> Iterator[TaskFuture[Any]]:
    """Yield futures as they finish (those already done first).

    Raises :class:`TimeoutError` if they are not all done within ``timeout`` seconds.

    >>> for fut in as_completed(futs):                      # doctest: +SKIP
    ...     print(fut.result())
    """
    fs = list(dict.fromkeys(futures))
    deadline = None if timeout is None else time.monotonic() + timeout
    finished: queue.SimpleQueue[TaskFuture[Any]] = queue.SimpleQueue()
    pending = 0
    for fut in fs:
        if fut._state in _FINAL:
            yield fut
        else:
            pending += 1
            fut.add_done_callback(finished.put)
    while pending:
        remaining = None if deadline is None else deadline - time.monotonic()
        try:
            if remaining is not None and remaining <= 0:
                raise queue.Empty
            fut = finished.get(timeout=remaining)
        except queue.Empty:
            if _stop_on_timeout:
                return
            raise TimeoutError(
                f"{pending} of {len(fs)} futures unfinished after {timeout} s"
            ) from None
        pending -= 1
        yield fut


# Pickles and fingerprints name the classes where they were first defined.
for _obj in (FutureList, DoneAndNotDone, wait, as_completed):
    _obj.__module__ = "notebook_flow.futures"
del _obj
