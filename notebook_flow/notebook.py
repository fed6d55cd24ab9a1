"""Live status of submitted runs in Jupyter, through display handles.

A future shown in a cell (``fut`` as the last expression) displays one line that moves
pending → running with elapsed time → completed / cached with time saved / failed with
the error; ``task.map(...)`` shows one progress bar with done, cached, failed and running
counts and an ETA. The futures reach this module only through the ``show`` hook
(``_hooks.py``; the package root imports this module on first use), so outside IPython
nothing here (nor IPython itself) is imported.

Updates never ``print``: one daemon thread re-renders the shown objects a few times a
second and sends ``update_display_data`` through the display handle, in the context of
the cell that showed them, and stops when they are all final. Cell execution does not
block it (periodic callbacks of a busy kernel would not run; a thread does).
"""

from __future__ import annotations

import contextvars
import html
import threading
import time
from typing import TYPE_CHECKING, Any

from .futures import FutureList, TaskFuture, describe
from .states import RunState
from .states import format_seconds as _seconds

if TYPE_CHECKING:
    from IPython.display import DisplayHandle

__all__ = ["render_future", "render_futures", "show", "show_future", "show_futures"]

#: Seconds between refreshes of the live displays.
REFRESH = 0.25

_ICONS = {
    RunState.PENDING: "⏳",
    RunState.RUNNING: "▶",
    RunState.RETRYING: "↻",
    RunState.COMPLETED: "✔",
    RunState.CACHED: "⚡",
    RunState.FAILED: "✘",
    RunState.CRASHED: "✘",
    RunState.CANCELLED: "⊘",
}
_COLORS = {
    RunState.COMPLETED: "#2e7d32",
    RunState.CACHED: "#1565c0",
    RunState.FAILED: "#c62828",
    RunState.CRASHED: "#c62828",
    RunState.CANCELLED: "#6d4c41",
}


def render_future(fut: TaskFuture[Any]) -> dict[str, str]:
    """The mime bundle of one future's status line."""
    state = fut.run_state
    text = f"{_ICONS.get(state, '')} {describe(fut)}"
    color = _COLORS.get(state, "#555")
    body = html.escape(describe(fut))
    return {
        "text/plain": text,
        "text/html": (
            f'<div class="notebook-flow-run" style="font-family:monospace;color:{color}">'
            f"{_ICONS.get(state, '')} {body}</div>"
        ),
    }


def render_futures(futs: FutureList) -> dict[str, str]:
    """The mime bundle of a map's progress bar."""
    total = len(futs)
    c = futs.counts()
    finished = c["completed"] + c["cached"] + c["failed"]
    started = [f.submitted_at for f in futs[:1]]
    elapsed = time.time() - started[0] if started else 0.0
    eta = ""
    if 0 < finished < total:
        eta = f", ETA {_seconds(elapsed / finished * (total - finished))}"
    elif finished == total and total:
        eta = f", took {_seconds(elapsed)}" if c["failed"] < total else ""
    names = sorted({f.task.name for f in futs})
    what = ", ".join(names[:2]) + ("…" if len(names) > 2 else "")
    counts = (
        f"{finished}/{total} done ({c['completed']} ran, {c['cached']} cached, "
        f"{c['failed']} failed), {c['running']} running{eta}"
    )
    width = 30
    filled = int(width * finished / total) if total else width
    bar = "█" * filled + "░" * (width - filled)
    first_error = next((f for f in futs if f.done() and f._exc is not None), None)
    error = ""
    if first_error is not None:
        error = f"\nfirst failure: {describe(first_error)}"
    text = f"{what} [{bar}] {counts}{error}"
    error_html = f"<div style='color:#c62828'>{html.escape(error.strip())}</div>" if error else ""
    return {
        "text/plain": text,
        "text/html": (
            f'<div class="notebook-flow-map" style="font-family:monospace">'
            f"<b>{html.escape(what)}</b> "
            f'<progress value="{finished}" max="{total or 1}" style="width:16em"></progress> '
            f"{html.escape(counts)}{error_html}</div>"
        ),
    }


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def show(obj: TaskFuture[Any] | FutureList) -> None:
    """Display a live status line (a future) or progress bar (a list of futures)."""
    if isinstance(obj, TaskFuture):
        show_future(obj)
    else:
        show_futures(obj)


def show_future(fut: TaskFuture[Any]) -> None:
    """Display a live status line for ``fut`` (plain text outside a kernel)."""
    _show(fut, render_future)


def show_futures(futs: FutureList) -> None:
    """Display a live progress bar for ``futs`` (plain text outside a kernel)."""
    _show(futs, render_futures)


def _show(obj: Any, render: Any) -> None:
    from IPython.display import display

    final = _final(obj)  # read before rendering: a run finishing meanwhile gets an update
    bundle = render(obj)
    if not _in_kernel():
        display(bundle, raw=True)  # type: ignore[no-untyped-call]
        return
    handle = display(bundle, raw=True, display_id=True)  # type: ignore[no-untyped-call]
    if handle is not None and not final:
        _ticker.watch(handle, obj, render, bundle)


def _final(obj: Any) -> bool:
    if isinstance(obj, TaskFuture):
        return obj.done()
    return all(f.done() for f in obj)


class _Ticker:
    """One daemon thread that refreshes every live display until its object is final."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: list[list[Any]] = []
        self._thread: threading.Thread | None = None

    def watch(self, handle: DisplayHandle, obj: Any, render: Any, bundle: dict[str, str]) -> None:
        # Updates are sent in the context of the cell that displayed the object.
        entry = [handle, obj, render, bundle, contextvars.copy_context()]
        with self._lock:
            self._watched.append(entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="notebook_flow-display", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(REFRESH)
            with self._lock:
                entries = list(self._watched)
            finished = []
            for entry in entries:
                handle, obj, render, last, context = entry
                final = _final(obj)  # read before rendering: the last update shows it
                bundle = render(obj)
                if bundle != last:
                    entry[3] = bundle
                    try:
                        context.run(handle.update, bundle, raw=True)
                    except Exception:  # the kernel is shutting down, or the frontend left
                        final = True
                if final:
                    finished.append(entry)
            with self._lock:
                for entry in finished:
                    self._watched.remove(entry)
                if not self._watched:
                    self._thread = None
                    return


_ticker = _Ticker()
