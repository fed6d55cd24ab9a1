"""JSON read from a store, a lock record or an event file: untrusted input.

``json.loads`` fails on malformed text with ``ValueError``, but on a document nested past
the interpreter's recursion limit (``[[[[…``, a hundred kilobytes) with ``RecursionError``,
which the ``except ValueError`` of every reader lets through: one forged manifest then
crashed the task call that looked it up instead of making it a miss.

>>> loads(b'{"a": 1}')
{'a': 1}
>>> loads(b"[" * 100_000)
Traceback (most recent call last):
ValueError: JSON nested deeper than this interpreter can read
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads"]


def loads(data: bytes | str) -> Any:
    """``json.loads`` that fails only with ``ValueError`` (``UnicodeDecodeError`` is one)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested deeper than this interpreter can read") from None
