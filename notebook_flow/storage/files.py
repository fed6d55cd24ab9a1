"""Low-level I/O of a ResultStore: local files directly, everything else through fsspec.

Local stores skip fsspec (importing it costs ~30 ms) and write through
:mod:`notebook_flow._localfs` (temp file, fsync, rename, fsync the folder); on object stores
a file is written in one PUT, so it appears whole or not at all. Paths are relative to the
store's root (``store._path`` makes them absolute).

Only regular files inside the store are opened or removed. Locally every folder below the
root is opened with ``O_NOFOLLOW`` (a symlinked ``manifests/ab`` is refused, never
followed out of the store), the file itself with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO or
device cannot block the open), and ``fstat`` must say "regular file" before one byte is
read. ``open_local`` hands back the descriptor so that the checks and the read see the same
file; ``remove`` reaches the file through folder descriptors opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from notebook_flow import _localfs
from notebook_flow.errors import StorageError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from .store import ResultStore

logger = logging.getLogger("notebook_flow")


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class NotRegularFile(StorageError, FileNotFoundError):
    """A store path is a symlink, FIFO, device or folder: treated as absent, never opened."""


def _open_parent(store: ResultStore, rel: str) -> tuple[int, str]:
    """A descriptor of ``rel``'s folder, reached without following a symlink below the
    root; and the file's name in it. The caller closes the descriptor."""
    parts = rel.split("/")
    fd = os.open(store._root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if os.path.islink(os.path.join(store._root, *parts[: i + 1])):
                    raise NotRegularFile(f"{rel}: a folder of the store is a symlink") from exc
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def open_local(store: ResultStore, rel: str) -> int:
    """A read-only descriptor of the regular file ``rel`` of a local store.

    Raises ``NotRegularFile`` (a ``FileNotFoundError``: callers see a missing file) for a
    symlink (the file, or a folder below the root), a FIFO, a device or a folder. One open
    and two ``lstat`` calls: reads are on the miss and cold-hit paths (what is read is
    authenticated anyway; removals walk the folders by descriptor, see ``remove``).
    """
    path = store._path(rel)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
            raise NotRegularFile(f"{rel} is a symlink; it was not followed") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{rel} is not a regular file; it was not read")
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            if stat.S_ISLNK(os.lstat(os.path.join(store._root, *parts[:i])).st_mode):
                raise NotRegularFile(f"{rel}: a folder of the store is a symlink; not followed")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(store: ResultStore, rel: str) -> bytes:
    if store.is_local:
        with os.fdopen(open_local(store, rel), "rb") as f:
            return f.read()
    data = store.fs.cat_file(store._path(rel))
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


def check_local_folder(store: ResultStore, rel: str) -> None:
    """Refuse to write ``rel`` when a folder between the root and it is a symlink."""
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        path = os.path.join(store._root, *parts[:i])
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # created by the write, as a real folder
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(
                f"{path} is not a folder (a symlink?); notebook_flow only writes inside its "
                "store. Remove it."
            )


def write_atomic(
    store: ResultStore, rel: str, fill: Callable[[Callable[[memoryview], None]], None]
) -> None:
    path = store._path(rel)
    if store.is_local:
        check_local_folder(store, rel)
        _localfs.write_atomic(path, fill)
        return
    buf = io.BytesIO()
    fill(buf.write)  # type: ignore[arg-type]
    store.fs.pipe_file(path, buf.getvalue())  # one PUT: an object appears whole or not


def remove(store: ResultStore, rel: str) -> bool:
    """Remove the file ``rel``; False if there was none. Locally only a regular file in a
    real folder of the store is removed (``NotRegularFile`` for anything else)."""
    try:
        if store.is_local:
            parent, name = _open_parent(store, rel)
            try:
                st = os.lstat(name, dir_fd=parent)
                if not stat.S_ISREG(st.st_mode):
                    raise NotRegularFile(f"{rel} is not a regular file; it was not removed")
                os.unlink(name, dir_fd=parent)
            finally:
                os.close(parent)
        else:
            store.fs.rm_file(store._path(rel))
    except NotRegularFile:
        raise
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
        if os.path.islink(top):
            logger.warning("%s is a symlink; notebook_flow does not follow it", top)
            return out
        # os.walk does not descend into symlinked folders; lstat skips links, FIFOs, devices.
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                full = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(full)
                    if stat.S_ISREG(st.st_mode):
                        out.append((os.path.relpath(full, store._root), st.st_mtime))
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
