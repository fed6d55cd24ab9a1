"""Crash-safe local file primitives for ``storage.py``: atomic writes and verified reads.

* ``write_atomic(path, fill)``: temp file in the same folder → write → fsync → rename →
  fsync the folder. After a crash at any instant ``path`` holds the old content or the new,
  and a leftover temp file (``.<name>.<random>.tmp``, see ``is_temp_name``) at worst.
* ``mapped(file)``: a whole file as a read-only memory map, for hashing at memory speed.
* A per-process memo of payloads already verified, keyed by file identity, so repeated
  loads of one memory-mapped array do not re-hash it.
* ``seal_of(stat)``: that identity plus the boot it was taken in, written into the manifest
  at commit, so that a later process on the same machine and boot can trust a payload
  nobody has touched since without reading all of it.

POSIX semantics are assumed (Linux, macOS); Windows may refuse to replace an open file.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import mmap
import os
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

__all__ = [
    "CHUNK",
    "file_identity",
    "fsync_dir",
    "is_temp_name",
    "makedirs_durable",
    "mapped",
    "remember_verified",
    "seal_of",
    "verified_checksum",
    "write_atomic",
]

#: Granularity of hashing and of early writeback.
CHUNK = 8 << 20


@functools.lru_cache(maxsize=1)
def _writeback_starter() -> Callable[[int, int, int], object] | None:
    """Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start flushing a range, no wait.

    Starting writeback while the rest of a large payload is still being written lets the
    final fsync find most pages already on disk (RocksDB's bytes_per_sync, PostgreSQL's
    *_flush_after). Measured here on a 100 MB write + fsync: 65 → 47 ms. Absent elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)


def fsync_dir(path: str) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str) -> None:
    """``os.makedirs`` that also fsyncs the parent of every folder it creates."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        makedirs_durable(parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
        fsync_dir(parent)


def is_temp_name(name: str) -> bool:
    """True for the temp files ``write_atomic`` creates (readers ignore them)."""
    return name.startswith(".") and name.endswith(".tmp")


def write_atomic(path: str, fill: Callable[[Callable[[memoryview], None]], None]) -> None:
    """Write ``path`` so that it appears whole or not at all, and survives a power cut.

    ``fill`` receives the function that appends bytes. If it raises (or the process is
    interrupted), the temp file is removed and ``path`` is untouched.
    """
    folder = os.path.dirname(path)
    makedirs_durable(folder)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    start_writeback = _writeback_starter()
    offset = flushed = 0
    open_ = True

    def write_raw(view: memoryview) -> None:
        nonlocal offset, flushed
        if not open_:  # a late flush (e.g. from a garbage-collected buffer) must go nowhere
            raise ValueError("write to a finished atomic write")
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done:])
        offset += view.nbytes
        if start_writeback is not None and offset - flushed >= CHUNK:
            start_writeback(fd, flushed, offset - flushed)
            flushed = offset

    try:
        try:
            fill(write_raw)
            os.fsync(fd)
        finally:
            open_ = False
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


@contextlib.contextmanager
def mapped(f: BinaryIO, size: int) -> Iterator[memoryview | bytes]:
    """A read-only view of a whole open file (memory-mapped; an empty file cannot be)."""
    if size == 0:
        yield b""
        return
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        view = memoryview(mm)
        try:
            yield view
        finally:
            view.release()
    finally:
        mm.close()


# (dev, ino, size, mtime_ns, ctime_ns) of a local payload → the checksum it was verified to
# have in this process. Payloads are never rewritten in place, and any write or rename
# moves ctime, which no user call can set back; so a repeat load skips re-hashing.
_verified: collections.OrderedDict[tuple[int, ...], str] = collections.OrderedDict()
_verified_lock = threading.Lock()
_VERIFIED_MAX = 4096


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def verified_checksum(identity: tuple[int, ...]) -> str | None:
    """The checksum a file with this identity was verified to have, if any."""
    return _verified.get(identity)


def remember_verified(identity: tuple[int, ...], checksum: str) -> None:
    with _verified_lock:
        _verified[identity] = checksum
        _verified.move_to_end(identity)
        while len(_verified) > _VERIFIED_MAX:
            _verified.popitem(last=False)


def forget_verified() -> None:
    """Clear the memo (tests and benchmarks: behave like a fresh process)."""
    with _verified_lock:
        _verified.clear()


@functools.lru_cache(maxsize=1)
def _boot_id() -> str | None:
    """This boot of this machine (Linux); None where there is no such thing to read."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        return None
    return boot or None


def seal_of(st: os.stat_result) -> str | None:
    """A payload file's identity as committed: boot, device, inode, size, mtime, ctime.

    A load that finds the same seal may skip re-hashing the file. Writing to it, renaming
    it, linking it or copying it elsewhere all change ctime or the inode, and no call sets
    ctime back; the page cache is coherent within a boot, and after a reboot (when a power
    cut could have torn a write, or the disk rotted) the boot differs, so the first load
    verifies every byte again. None where there is no boot id (then loads always verify).
    """
    boot = _boot_id()
    if boot is None:
        return None
    return f"{boot}:" + ":".join(map(str, file_identity(st)))
