"""Pins: entries that eviction and pruning never remove, kept as marker files in the store.

A pin of key ``k`` is the small file ``pins/<k[:2]>/<k>`` in the store itself, so it holds
for every process and machine sharing the store (local folders and object stores alike)
and survives a rebuilt index. A marker may exist before its entry (``@task(pin=True)``
pins as it commits) or after it was cleared: ``clear`` is an explicit removal, pins only
protect against the automatic ones (quota eviction, ``gc`` rules).

Markers are not signed: whoever can write the store can pin (which only keeps bytes) or
unpin (which only makes an entry evictable); no value is ever read from a marker.

>>> import tempfile
>>> from notebook_flow.storage import ResultStore
>>> store = ResultStore(tempfile.mkdtemp())
>>> pin(store, ["0123456789abcdef0123456789abcdef"])
1
>>> sorted(pinned_keys(store))
['0123456789abcdef0123456789abcdef']
>>> unpin(store, ["0123456789abcdef0123456789abcdef"]), pinned_keys(store)
(1, frozenset())
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from . import files
from .manifest import validate_key

if TYPE_CHECKING:
    from .store import ResultStore

__all__ = ["pin", "pinned_keys", "unpin"]

#: Folder of the pin markers, below the store's root.
PINS_DIR = "pins"
_MARKER_RE = re.compile(r"^pins/([0-9a-f]{2})/([0-9a-f]{32})$")


def _marker_rel(key: str) -> str:
    return f"{PINS_DIR}/{key[:2]}/{key}"


def _marker_body(write: Callable[[memoryview], None]) -> None:
    write(memoryview(json.dumps({"pinned_at": time.time()}).encode()))


def pin(store: ResultStore, keys: Iterable[str]) -> int:
    """Pin ``keys`` (validated cache keys); returns how many were not pinned before."""
    pinned = pinned_keys(store)
    added = 0
    for key in dict.fromkeys(validate_key(k) for k in keys):
        if key in pinned:
            continue
        files.write_atomic(store, _marker_rel(key), _marker_body)
        added += 1
    return added


def unpin(store: ResultStore, keys: Iterable[str]) -> int:
    """Remove the pins of ``keys``; returns how many were pinned."""
    pinned = pinned_keys(store)  # (object stores delete a missing object without error)
    removed = 0
    for key in dict.fromkeys(validate_key(k) for k in keys):
        if files.remove(store, _marker_rel(key)) and key in pinned:
            removed += 1
    return removed


def pinned_keys(store: ResultStore) -> frozenset[str]:
    """Every pinned key of ``store`` (one listing of ``pins/``; entries may be absent)."""
    found: set[str] = set()
    for rel, _mtime in files.list_files(store, PINS_DIR):
        match = _MARKER_RE.match(rel.replace("\\", "/"))
        if match is not None and match.group(2).startswith(match.group(1)):
            found.add(match.group(2))
    return frozenset(found)
