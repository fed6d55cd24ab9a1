"""Low-level I/O of a ResultStore: local files directly, everything else through fsspec.

Local stores skip fsspec (importing it costs ~30 ms) and write through
:mod:`notebook_flow._localfs` (temp file, fsync, rename, fsync the folder); on object stores
a file is written in one PUT, so it appears whole or not at all. Paths are relative to the
store's root (``store._path`` makes them absolute).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from notebook_flow import _localfs

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from .store import ResultStore

logger = logging.getLogger("notebook_flow")


def read_bytes(store: ResultStore, rel: str) -> bytes:
    path = store._path(rel)
    if store.is_local:
        with open(path, "rb") as f:
            return f.read()
    data = store.fs.cat_file(path)
    return bytes(data)


def read_small(store: ResultStore, rel: str) -> bytes:
    """A file known to be small (a manifest). On S3 one GET: s3fs otherwise first sends a
    HEAD (and, for a missing key, a LIST) to decide whether to download in parallel
    chunks, which tripled the requests of every lookup."""
    if not store.is_local:
        fs = store.fs
        if getattr(fs, "max_concurrency", None) is not None:  # s3fs
            return bytes(fs.cat_file(store._path(rel), max_concurrency=1))
    return read_bytes(store, rel)


def write_atomic(
    store: ResultStore, rel: str, fill: Callable[[Callable[[memoryview], None]], None]
) -> None:
    path = store._path(rel)
    if store.is_local:
        _localfs.write_atomic(path, fill)
        return
    buf = io.BytesIO()
    fill(buf.write)  # type: ignore[arg-type]
    store.fs.pipe_file(path, buf.getvalue())  # one PUT: an object appears whole or not


def remove(store: ResultStore, rel: str) -> bool:
    path = store._path(rel)
    try:
        if store.is_local:
            os.unlink(path)
        else:
            store.fs.rm_file(path)
    except FileNotFoundError:
        return False
    return True


def remove_quietly(store: ResultStore, rel: str) -> None:
    if not rel:  # an inline payload has no file of its own
        return
    try:
        remove(store, rel)
    except OSError as exc:
        logger.warning("could not remove %s from %s: %s", rel, store.url, exc)


def list_files(store: ResultStore, rel_dir: str) -> list[tuple[str, float | None]]:
    """(relative path, mtime or None) of every file below ``rel_dir``."""
    top = store._path(rel_dir)
    out: list[tuple[str, float | None]] = []
    if store.is_local:
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                full = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    out.append((os.path.relpath(full, store._root), os.stat(full).st_mtime))
        return out
    fs = store.fs
    fs.invalidate_cache(top)
    try:
        found = fs.find(top, detail=True)
    except FileNotFoundError:
        return out
    for path, info in found.items():
        if info.get("type", "file") == "file":
            out.append((path[len(store._root) + 1 :], info_mtime(info)))
    return out


def is_local_fs(fs: AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def info_mtime(info: dict[str, Any]) -> float | None:
    for field in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, (int, float)):
            return float(value)
        timestamp = getattr(value, "timestamp", None)
        if callable(timestamp):
            return float(timestamp())
    return None
