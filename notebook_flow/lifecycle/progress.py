"""A one-line progress bar on stderr for long store walks (check, export, import).

Shown only when asked (``--progress``) or when stderr is a terminal; redrawn at most ten
times a second, so a walk over 100,000 small entries does not spend its time printing.

>>> import io
>>> bar = Progress("check", 2, enabled=True, stream=io.StringIO())
>>> bar.advance(1, 1000); bar.advance(1, 24); bar.close()
>>> bar.stream.getvalue().rsplit("\\r", 1)[-1]
'check: 2/2 entries · 1.0 kB\\n'
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from notebook_flow.figures import format_size

__all__ = ["Progress", "wanted"]


def wanted(flag: bool) -> bool:
    """Show a bar: asked for, or stderr is a terminal."""
    return flag or sys.stderr.isatty()


class Progress:
    """``label: done/total entries · bytes`` redrawn in place; thread-safe."""

    def __init__(
        self, label: str, total: int, *, enabled: bool, stream: TextIO | None = None
    ) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.done = 0
        self.bytes = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def advance(self, entries: int = 1, nbytes: int = 0) -> None:
        with self._lock:
            self.done += entries
            self.bytes += nbytes
            now = time.monotonic()
            if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
                self._last = now
                self._draw()

    def _draw(self) -> None:
        self.stream.write(
            f"\r{self.label}: {self.done}/{self.total} entries · {format_size(self.bytes)}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            with self._lock:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()
