"""Task prints reach their cell whole lines at a time, never mid-line with another task's.

In a kernel, a task's ``print`` goes to the cell that submitted it (ipykernel keys its
stream buffers by the parent header the run's context carries). One ``print`` is several
writes (each argument, the separators, the end), and the kernel's stream sends whatever
its buffer holds when its flush timer fires. Two tasks printing at once therefore used to
give ``'working onworking on 10\\n'`` then ``' 7\\n'``.

While a task runs in a worker, :func:`task_output` holds back what it writes to
``sys.stdout`` / ``sys.stderr`` after the last line break (``\\n`` or ``\\r``, so progress
bars still move) and passes complete lines on in one write; whatever is left when the run
ends is written then, in one piece. Each run has its own buffer (a context variable, so
the coroutines of an async task share their task's).

The kernel's stream objects get this by a subclass of their own class (``__class__`` is
swapped once, so ``isinstance`` checks still hold) whose ``write`` is a data descriptor:
IPython's history tee and the ``%%task`` capture, which both set ``write`` on the
instance for the length of a cell, become what the routing writes *to*, so they too see
whole lines. A cell's own output and code outside tasks go through unchanged. Only
ipykernel's streams are touched; elsewhere (a terminal, a web app) nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["task_output"]

#: Text held back per stream at most: past it, a line without a break is passed on anyway.
MAX_HELD = 64 * 1024

_held: contextvars.ContextVar[_Lines | None] = contextvars.ContextVar(
    "notebook_flow_task_lines", default=None
)
_routed: dict[type, type] = {}  # a stream class → its line-atomic subclass
_subclasses: set[type] = set()  # those subclasses
_routed_lock = threading.Lock()
_local = threading.local()  # .emitting: this thread is passing a run's lines on


class _Lines:
    """The partial lines one run has written, per stream."""

    __slots__ = ("_lock", "_text")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # an async task's executor threads share the run's
        self._text: dict[int, tuple[Any, str]] = {}  # id(stream) → (stream, held text)

    def write(self, stream: Any, text: str, write: Callable[[str], Any]) -> int:
        """Pass the complete lines of what is held plus ``text`` on to ``write``."""
        with self._lock:
            key = id(stream)
            held = self._text.pop(key, None)
            whole = held[1] + text if held is not None else text
            cut = max(whole.rfind("\n"), whole.rfind("\r")) + 1
            if len(whole) - cut > MAX_HELD:
                cut = len(whole)
            if cut < len(whole):
                self._text[key] = (stream, whole[cut:])
            if cut:
                # Under the lock, so this run's lines stay in order. What ``write`` reaches
                # (a tee that itself calls the stream's ``write``) passes them straight on.
                _local.emitting = True
                try:
                    write(whole[:cut])
                finally:
                    _local.emitting = False
        return len(text)

    def flush(self) -> None:
        """Write what is held back (the run is over), one write per stream."""
        with self._lock:
            rest, self._text = list(self._text.values()), {}
        for stream, text in rest:
            with contextlib.suppress(Exception):  # a closed stream must not fail the run
                stream.write(text)


class _RoutedWrite:
    """``stream.write`` as callers get it: a running task's text goes through its lines,
    anything else straight to ``downstream`` (the class's write, or a tee put on top)."""

    __slots__ = ("downstream", "stream")

    def __init__(self, stream: Any, downstream: Callable[[str], Any]) -> None:
        self.stream = stream
        self.downstream = downstream

    def __call__(self, text: str) -> Any:
        lines = _held.get()
        if lines is None or getattr(_local, "emitting", False) or not isinstance(text, str):
            return self.downstream(text)
        return lines.write(self.stream, text, self.downstream)


class _WriteSlot:
    """The ``write`` of a routed stream class: a data descriptor, so it comes before the
    instance's ``__dict__``.

    IPython (9.x) tees every cell's output into its history by setting ``stream.write`` on
    the instance and setting the previous value back after the cell; the ``%%task`` capture
    does the same. With a plain method, the bound method IPython saved before the stream
    was routed would shadow the routing for good. Here whatever is set on the instance
    becomes the *downstream* of the routing, so a task's lines are whole before any tee
    sees them, and setting back a routed write stores its downstream (no stacking).
    """

    __slots__ = ("base",)

    def __init__(self, base: Callable[..., Any]) -> None:
        self.base = base

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self.base
        downstream = obj.__dict__.get("write")
        if downstream is None:
            downstream = self.base.__get__(obj, owner)  # type: ignore[attr-defined]
        return _RoutedWrite(obj, downstream)

    def __set__(self, obj: Any, value: Any) -> None:
        if type(value) is _RoutedWrite and value.stream is obj:
            value = value.downstream
        obj.__dict__["write"] = value

    def __delete__(self, obj: Any) -> None:
        try:
            del obj.__dict__["write"]
        except KeyError:
            raise AttributeError("write") from None


def _line_atomic(cls: type) -> type:
    """A subclass of the stream class ``cls`` whose ``write`` routes a task's lines.

    Same instance layout (``__slots__ = ()``), so an existing stream can take it on.
    """
    namespace = {
        "__module__": cls.__module__,
        "__doc__": cls.__doc__,
        "__slots__": (),
        "write": _WriteSlot(cls.write),  # type: ignore[attr-defined]
    }
    return type(cls.__name__, (cls,), namespace)


def _routable(stream: Any) -> bool:
    """Whether ``stream`` is a kernel's stream (ipykernel's OutStream or a subclass)."""
    cls = type(stream)
    return cls in _subclasses or any(
        c.__module__.startswith("ipykernel.") for c in cls.__mro__[:-1]
    )


def _route(stream: Any) -> bool:
    """Give ``stream`` line-atomic task writes (once); False if it cannot take them."""
    cls = type(stream)
    if cls in _subclasses:
        return True
    sub = _routed.get(cls)
    if sub is None:
        with _routed_lock:
            sub = _routed.get(cls)
            if sub is None:
                try:
                    sub = _line_atomic(cls)
                except (TypeError, AttributeError):  # cannot be subclassed, or no write
                    return False
                _routed[cls] = sub
                _subclasses.add(sub)
    try:
        stream.__class__ = sub
    except TypeError:  # a C-level stream (a terminal's TextIOWrapper)
        return False
    return True


@contextlib.contextmanager
def task_output() -> Iterator[None]:
    """While a task runs in a worker thread: its printed lines are passed on whole.

    >>> with task_output():                       # doctest: +SKIP
    ...     print("working on", 7)                # reaches the cell as one line
    """
    routed = False
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name, None)
        if stream is not None and _routable(stream):
            routed = _route(stream) or routed
    if not routed:
        yield
        return
    lines = _Lines()
    token = _held.set(lines)
    try:
        yield
    finally:
        _held.reset(token)
        lines.flush()
