"""Last use of each entry: recorded on the hit path for the price of a dict write.

``touch(store, key)`` notes the time in this process's memory; nothing waits for a file,
a lock or DuckDB. A daemon thread writes what was noted at most every
:data:`FLUSH_SECONDS` (and at exit) as one small "touch" file per flush in the store::

    usage/<writer>-<time_ns>.json      {"v": 1, "used": {"<key>": <unix seconds>, ...}}

so every process and machine sharing the store (a folder or a bucket) sees one another's
hits when it decides what to evict. ``last_used(store)`` merges every touch file and this
process's unwritten notes by taking the latest time per key; merging is idempotent and
order-free, so ``compact`` can fold many files into one and delete them while writers
keep adding new ones. A key never touched was last used when it was committed (its
manifest's modification time, see :mod:`.inventory`).

Touch files are untrusted like everything read from a store: a malformed file or entry is
skipped and a time in the future is taken as "now". A forged one can only change the
order of eviction, never a value: results are verified when they are loaded.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from notebook_flow import _json
from notebook_flow.storage import files

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["FLUSH_SECONDS", "compact", "flush", "last_used", "touch"]

logger = logging.getLogger("notebook_flow")

#: Seconds between two writes of touch files by one process (a rate limit on object stores).
FLUSH_SECONDS = 30.0
#: Folder of the touch files, below the store's root.
USAGE_DIR = "usage"
#: ``compact`` folds the touch files once there are more than this many.
COMPACT_AT = 64

_FILE_RE = re.compile(r"^usage/[A-Za-z0-9_.-]{1,120}\.json$")

_lock = threading.Lock()
#: url → key → last use noted by this process and not yet written.
_pending: dict[str, dict[str, float]] = {}
_stores: dict[str, ResultStore] = {}
_wake = threading.Event()
_thread: threading.Thread | None = None
_thread_pid = 0


def touch(store: ResultStore, key: str) -> None:
    """Note that ``key`` was used now (a cache hit). No I/O, no system call but the clock:
    see the module docstring (a forked child starts empty, see :func:`_after_fork`)."""
    pending = _pending.get(store.url)
    if pending is None:
        pending = _register(store)
    pending[key] = time.time()


def _register(store: ResultStore) -> dict[str, float]:
    global _thread, _thread_pid
    with _lock:
        pending = _pending.setdefault(store.url, {})
        _stores.setdefault(store.url, store)
        if _thread is None:
            _thread = threading.Thread(target=_run, name="notebook_flow-usage", daemon=True)
            _thread_pid = os.getpid()
            _thread.start()
        return pending


def _run() -> None:
    while True:
        _wake.wait(FLUSH_SECONDS)
        _wake.clear()
        try:
            flush()
        except Exception:  # never let the thread die: the next round retries
            logger.warning("could not record last use of cached results", exc_info=True)


def _take(url: str) -> dict[str, float]:
    with _lock:
        pending = _pending.get(url)
        if not pending:
            return {}
        _pending[url] = {}
    # A copy (atomic under the GIL): a touch that still writes into the old dict must not
    # change it while it is serialized. Such a late touch is lost; the next one counts.
    return pending.copy()


def flush(store: ResultStore | None = None) -> int:
    """Write the noted uses (of ``store``, or of every store) now; returns how many."""
    written = 0
    targets = [store] if store is not None else list(_stores.values())
    for target in targets:
        used = _take(target.url)
        if not used:
            continue
        try:
            _write(target, used)
        except Exception:
            with _lock:  # put them back (newer notes win) and retry on the next round
                pending = _pending.setdefault(target.url, {})
                for key, when in used.items():
                    pending[key] = max(when, pending.get(key, 0.0))
            raise
        written += len(used)
    return written


def _writer_id() -> str:
    import secrets
    import socket

    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _write(store: ResultStore, used: dict[str, float]) -> None:
    data = json.dumps({"v": 1, "used": used}, separators=(",", ":")).encode()
    rel = f"{USAGE_DIR}/{_writer_id()}-{time.time_ns()}.json"
    files.write_atomic(store, rel, lambda write: write(memoryview(data)))


def _parse(data: bytes, now: float, into: dict[str, float]) -> bool:
    try:
        raw = _json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    used = raw.get("used") if isinstance(raw, dict) and raw.get("v") == 1 else None
    if not isinstance(used, dict):
        return False
    # Once per recorded key (a compacted file holds every key ever hit): plain tests only.
    hexdigits, get, isfinite = _HEX.issuperset, into.get, math.isfinite
    for key, when in used.items():
        kind = type(when)
        if kind is not float and kind is not int:
            continue
        if type(key) is not str or len(key) != 32 or not hexdigits(key) or not isfinite(when):
            continue
        when = min(when, now)
        if when > get(key, 0.0):
            into[key] = float(when)
    return True


_HEX = frozenset("0123456789abcdef")


def _read_all(store: ResultStore) -> tuple[dict[str, float], list[str]]:
    """Merged last use from every touch file, and the files read."""
    rels = [rel for rel, _ in files.list_files(store, USAGE_DIR) if _FILE_RE.match(rel)]
    merged: dict[str, float] = {}
    read: list[str] = []
    now = time.time()
    if store.is_local:
        for rel in rels:
            with contextlib.suppress(OSError):
                if _parse(files.read_bytes(store, rel), now, merged):
                    read.append(rel)
    elif rels:
        root = store._root
        found = store.fs.cat([store._path(rel) for rel in rels], on_error="return")
        for path, data in found.items():
            if isinstance(data, bytes) and _parse(data, now, merged):
                read.append(path[len(root) + 1 :])
    return merged, read


def last_used(store: ResultStore) -> dict[str, float]:
    """key → the latest recorded use, from every process that shares ``store``."""
    merged, _read = _read_all(store)
    for key, when in list(_pending.get(store.url, {}).items()):
        if when > merged.get(key, 0.0):
            merged[key] = when
    return merged


#: Seconds a decision waits for the DuckDB index (another process may be writing it).
INDEX_WAIT = 5.0
_HITS_SQL = (
    "SELECT key, max(coalesce(ended, updated, created)) FROM runs"
    " WHERE state = 'CACHED' AND key IS NOT NULL GROUP BY key"
)


def indexed_hits(store: ResultStore) -> dict[str, float]:
    """key → the latest hit the local DuckDB index recorded (runs in state CACHED).

    The touch files are the record every process and machine shares, but a process that
    died before its flush, or a touch file removed or lost, leaves them behind the index
    (which hits reach through the run events). Best effort: no index yet, or one busy
    for :data:`INDEX_WAIT` seconds, adds nothing (and is logged at debug level)."""
    if not os.path.exists(store.metadata_path()):
        return {}  # no run was ever recorded here: do not create an index to read it
    from notebook_flow.config import get_metadata

    now = time.time()
    out: dict[str, float] = {}
    try:
        rows = get_metadata(store)._read(_HITS_SQL, fetch=_fetchall, wait=INDEX_WAIT)
    except Exception:
        logger.debug("could not read the hits the index of %s recorded", store.url, exc_info=True)
        return out
    for key, when in rows:
        good_key = isinstance(key, str) and len(key) == 32 and _HEX.issuperset(key)
        if good_key and type(when) is float and math.isfinite(when):
            out[key] = min(when, now)
    return out


def _fetchall(cur: Any) -> list[tuple[Any, ...]]:
    return list(cur.fetchall())


def compact(store: ResultStore, *, at: int = COMPACT_AT) -> int:
    """Fold the touch files into one when there are more than ``at``; returns how many
    were removed. The merged file is written before any input is deleted, so a crash (or a
    second process compacting at once) loses nothing."""
    merged, read = _read_all(store)
    if len(read) <= at:
        return 0
    _write(store, merged)
    for rel in read:
        files.remove_quietly(store, rel)
    return len(read)


def _at_exit() -> None:
    if _thread_pid == os.getpid():
        with contextlib.suppress(Exception):
            flush()


def _after_fork() -> None:
    """In a forked child: the parent's notes are the parent's to write, its thread is not
    here, and its lock may have been held by another thread at the fork."""
    global _lock, _thread, _thread_pid
    _lock = threading.Lock()
    _pending.clear()
    _stores.clear()
    _thread, _thread_pid = None, 0


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
