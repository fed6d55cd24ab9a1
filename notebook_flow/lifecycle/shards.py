"""Listing a local store's shard folders, each only when it changed since it was listed.

A decision over 100,000 entries spends its time on one ``lstat`` per file (two files per
entry), like ``du``. But every write into a shard folder (``manifests/ab/``,
``results/ab/``) is a create, rename or unlink *in that folder*, which sets the folder's
modification time: a folder whose ``(st_mtime_ns, st_ino)`` is the one seen when it was
listed holds the same files with the same sizes and times (nothing in a store rewrites a
file in place). So a listing is kept per folder — in this process's memory, and in the
store (``listing/<top>.bin``, every shard of a top folder in one file) for the next
process — and a scan lists again only the folders whose stamp changed: 512 ``lstat``
calls instead of 200,000.

A listing is trusted only if it began more than :data:`MARGIN_NS` after the folder's last
change: timestamps are coarse (a clock tick), so a write in the same tick as the change
seen could leave the stamp unchanged; a write after the listing began then necessarily
carries a later time. The kept listings in the store are untrusted input like the rest of
it: anything malformed is ignored (the folder is listed), and a forged one can at worst
change which entries are evicted, which the claim of :mod:`.evict` checks against the
manifest itself (a file that is not there is not freed).

Object stores have no such stamp; their listing is one paginated LIST anyway.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING

from notebook_flow import _json

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["MARGIN_NS", "Shard", "list_local"]

logger = logging.getLogger("notebook_flow")

#: A listing begun less than this after its folder's last change is not kept.
MARGIN_NS = 2_000_000_000
#: Folder (``store.local_dir``) of the listings kept for the next process.
KEPT_DIR = "listing"


class Shard:
    """The files of one shard folder, as columns (``names``, ``sizes``, ``mtimes``) listed
    under the folder stamp ``stamp``; ``trusted`` when that stamp proves nothing changed
    since."""

    __slots__ = ("mtimes", "name", "names", "parsed", "sizes", "stamp", "trusted")

    def __init__(
        self,
        name: str,
        stamp: tuple[int, int],
        names: list[str],
        sizes: list[int],
        mtimes: list[float],
        *,
        trusted: bool,
    ) -> None:
        self.name = name
        self.stamp = stamp
        self.names = names
        self.sizes = sizes
        self.mtimes = mtimes
        self.trusted = trusted
        self.parsed: object = None  # what inventory.scan made of it (kept with it)

    @property
    def rows(self) -> Iterator[tuple[str, int, float]]:
        """(name, size, mtime) of each file."""
        return zip(self.names, self.sizes, self.mtimes, strict=True)


_lock = threading.Lock()
#: (root, top) → shard name → Shard, for this process.
_memory: dict[tuple[str, str], dict[str, Shard]] = {}


def _list_folder(name: str, path: str, stamp: tuple[int, int], trusted: bool) -> Shard:
    names: list[str] = []
    sizes: list[int] = []
    mtimes: list[float] = []
    regular = stat.S_ISREG
    for entry, st in _stats(path):
        if regular(st.st_mode):
            names.append(entry)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime)
    return Shard(name, stamp, names, sizes, mtimes, trusted=trusted)


def _stats(path: str) -> Iterator[tuple[str, os.stat_result]]:
    """(name, lstat) of each file of the folder ``path``; none if it cannot be opened.
    Where the platform allows, through the folder's descriptor: each lstat resolves one
    name in the open folder, not the whole path."""
    if not _BY_DIR_FD:
        try:
            items = list(os.scandir(path))
        except OSError:
            return
        for item in items:
            try:
                yield item.name, item.stat(follow_symlinks=False)
            except OSError:
                continue
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        try:
            entries = os.listdir(fd)
        except OSError:
            entries = []
        for entry in entries:
            try:
                yield entry, os.lstat(entry, dir_fd=fd)
            except OSError:
                continue
    finally:
        os.close(fd)


_BY_DIR_FD = (
    os.stat in os.supports_dir_fd
    and os.listdir in os.supports_fd
    and hasattr(os, "O_DIRECTORY")
    and hasattr(os, "O_NOFOLLOW")
)


def list_local(store: ResultStore, top: str) -> list[Shard]:
    """The shard folders below ``top`` of the local ``store``, each listed only if its
    stamp changed (see the module docstring); no link followed."""
    root = store.local_root
    assert root is not None
    base = os.path.join(root, top)
    ident = (root, top)
    with _lock:
        known = _memory.get(ident)
    if known is None:
        known = _load_kept(store, top)
    now = time.time_ns()  # before any folder is stat-ed: see MARGIN_NS
    try:
        folders = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out: list[Shard] = []
    changed = False
    for folder in folders:
        try:
            st = folder.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        stamp = (st.st_mtime_ns, st.st_ino)
        old = known.get(folder.name)
        if old is not None and old.trusted and old.stamp == stamp:
            out.append(old)
            continue
        shard = _list_folder(folder.name, folder.path, stamp, now - stamp[0] > MARGIN_NS)
        out.append(shard)
        changed = changed or shard.trusted
    with _lock:
        _memory[ident] = {s.name: s for s in out}
    if changed:
        _keep(store, top, [s for s in out if s.trusted])
    return out


# -- the listings kept in the store ---------------------------------------------------------
#
# One file per top folder (``listing/manifests.bin``, ``listing/results.bin``): a JSON
# header line naming each shard with its stamp, its file count and the byte length of its
# names, then every shard's names (UTF-8, ``/``-separated: no file name holds a ``/``), then
# all sizes (int64) and all modification times (float64), little-endian. One file, not one
# per shard: opening 512 files cost more than listing them.

_MAGIC = b"notebook-flow listing 2\n"
_NAME_ERRORS = "surrogateescape"  # a name that is not UTF-8 round-trips as os.scandir gave it


def _kept_path(folder: str, top: str) -> str:
    return os.path.join(folder, f"{top}.bin")


def _keep(store: ResultStore, top: str, shards: list[Shard]) -> None:
    """Write the listings of ``shards`` for the next process (best effort, no fsync: a file
    torn by a power cut does not parse, and the folders are then listed)."""
    try:
        folder = store.local_dir(KEPT_DIR)
        blobs = [
            "/".join(s.names).encode("utf-8", _NAME_ERRORS) if s.names else b"" for s in shards
        ]
        header = json.dumps(
            [[s.name, s.stamp[0], s.stamp[1], len(s.names), len(b)]
             for s, b in zip(shards, blobs, strict=True)],
            separators=(",", ":"),
        ).encode()  # fmt: skip
        sizes = array("q", [n for s in shards for n in s.sizes])
        mtimes = array("d", [t for s in shards for t in s.mtimes])
        if sys.byteorder != "little":
            sizes.byteswap()
            mtimes.byteswap()
        parts = [_MAGIC, header, b"\n", *blobs, sizes.tobytes(), mtimes.tobytes()]
        path = _kept_path(folder, top)
        tmp = os.path.join(folder, f".{top}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
        for old in os.listdir(folder):  # one file per shard, as version 1 kept them
            if old.endswith(".json"):
                os.unlink(os.path.join(folder, old))
    except Exception:  # a read-only store, a full disk: the next process lists again
        logger.debug("could not keep the listing of %s/%s", store.url, top, exc_info=True)


def _load_kept(store: ResultStore, top: str) -> dict[str, Shard]:
    """The listings kept in the store (validated; anything malformed is left out)."""
    try:
        path = _kept_path(store.local_dir(KEPT_DIR), top)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        return _parse_kept(data)
    except (OSError, ValueError, TypeError):
        return {}


def _parse_kept(data: bytes) -> dict[str, Shard]:
    """The shards of a kept file; ValueError if anything in it is not as written."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a kept listing")
    end = data.index(b"\n", len(_MAGIC))
    header = _json.loads(data[len(_MAGIC) : end])
    if type(header) is not list:
        raise ValueError("malformed")
    count = blob = 0
    for row in header:
        if not (
            type(row) is list
            and len(row) == 5
            and type(row[0]) is str
            and all(type(v) is int and v >= 0 for v in row[1:])
        ):
            raise ValueError("malformed")
        count += row[3]
        blob += row[4]
    start = end + 1
    if len(data) != start + blob + 16 * count:
        raise ValueError("truncated or padded")
    sizes, mtimes = array("q"), array("d")
    sizes.frombytes(data[start + blob : start + blob + 8 * count])
    mtimes.frombytes(data[start + blob + 8 * count :])
    if sys.byteorder != "little":
        sizes.byteswap()
        mtimes.byteswap()
    if count and (min(sizes) < 0 or not all(map(math.isfinite, mtimes))):
        raise ValueError("malformed")
    all_sizes, all_mtimes = sizes.tolist(), mtimes.tolist()
    out: dict[str, Shard] = {}
    at = first = 0
    for name, mtime_ns, ino, n, length in header:
        text = data[start + at : start + at + length].decode("utf-8", _NAME_ERRORS)
        names = text.split("/") if n else []
        if len(names) != n or (n and length == 0) or (not n and length):
            raise ValueError("malformed")
        out[name] = Shard(
            name, (mtime_ns, ino), names, all_sizes[first : first + n],
            all_mtimes[first : first + n], trusted=True,
        )  # fmt: skip
        at += length
        first += n
    return out


def forget() -> None:
    """Drop this process's listings (tests)."""
    with _lock:
        _memory.clear()
