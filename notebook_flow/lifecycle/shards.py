"""Listing a local store's shard folders, each only when it changed since it was listed.

A decision over 100,000 entries spends its time on one ``lstat`` per file (two files per
entry), like ``du``. But every write into a shard folder (``manifests/ab/``,
``results/ab/``) is a create, rename or unlink *in that folder*, which sets the folder's
modification time: a folder whose ``(st_mtime_ns, st_ino)`` is the one seen when it was
listed holds the same files with the same sizes and times (nothing in a store rewrites a
file in place). So a listing is kept per folder — in this process's memory, and in the
store (``listing/<top>-<shard>.json``) for the next process — and a scan lists again
only the folders whose stamp changed: 512 ``lstat`` calls instead of 200,000.

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

import contextlib
import json
import logging
import os
import stat
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["MARGIN_NS", "Shard", "list_local"]

logger = logging.getLogger("notebook_flow")

#: A listing begun less than this after its folder's last change is not kept.
MARGIN_NS = 2_000_000_000
#: Folder (``store.local_dir``) of the listings kept for the next process.
KEPT_DIR = "listing"
_VERSION = 1


class Shard:
    """The files of one shard folder: ``rows`` of (name, size, mtime) as listed under the
    folder stamp ``stamp``; ``trusted`` when that stamp proves nothing changed since."""

    __slots__ = ("name", "parsed", "rows", "stamp", "trusted")

    def __init__(
        self, name: str, stamp: tuple[int, int], rows: list[tuple[str, int, float]], trusted: bool
    ) -> None:
        self.name = name
        self.stamp = stamp
        self.rows = rows
        self.trusted = trusted
        self.parsed: object = None  # what inventory.scan made of it (kept with it)


_lock = threading.Lock()
#: (root, top) → shard name → Shard, for this process.
_memory: dict[tuple[str, str], dict[str, Shard]] = {}


def _list_folder(path: str) -> list[tuple[str, int, float]]:
    rows: list[tuple[str, int, float]] = []
    try:
        items = list(os.scandir(path))
    except OSError:
        return rows
    for item in items:
        try:
            st = item.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            rows.append((item.name, st.st_size, st.st_mtime))
    return rows


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
    fresh: list[Shard] = []
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
        shard = Shard(folder.name, stamp, _list_folder(folder.path), now - stamp[0] > MARGIN_NS)
        out.append(shard)
        if shard.trusted:
            fresh.append(shard)
    with _lock:
        _memory[ident] = {s.name: s for s in out}
    if fresh:
        _keep(store, top, fresh)
    return out


def _keep(store: ResultStore, top: str, shards: list[Shard]) -> None:
    """Write the listings of ``shards`` for the next process (best effort, no fsync: a
    file torn by a power cut does not parse, and the folder is then listed)."""
    try:
        folder = store.local_dir(KEPT_DIR)
        for shard in shards:
            data = json.dumps(
                {"v": _VERSION, "stamp": list(shard.stamp),
                 "names": "/".join([row[0] for row in shard.rows]),
                 "sizes": [row[1] for row in shard.rows],
                 "mtimes": [row[2] for row in shard.rows]},
                separators=(",", ":"),
            ).encode()  # fmt: skip
            path = os.path.join(folder, f"{top}-{shard.name}.json")
            tmp = os.path.join(folder, f".{top}-{shard.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except Exception:  # a read-only store, a full disk: the next process lists again
        logger.debug("could not keep the listing of %s/%s", store.url, top, exc_info=True)


def _load_kept(store: ResultStore, top: str) -> dict[str, Shard]:
    """The listings kept in the store (validated; anything malformed is left out)."""
    out: dict[str, Shard] = {}
    try:
        folder = store.local_dir(KEPT_DIR)
        names = os.listdir(folder)
    except OSError:
        return out
    prefix = f"{top}-"
    for file in names:
        if not (file.startswith(prefix) and file.endswith(".json")):
            continue
        shard = file[len(prefix) : -5]
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            out[shard] = _parse_kept(shard, os.path.join(folder, file))
    return out


def _parse_kept(shard: str, path: str) -> Shard:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        raw = json.loads(f.read())
    if raw["v"] != _VERSION:
        raise ValueError("another version")
    stamp = raw["stamp"]
    names = raw["names"].split("/") if raw["names"] else []
    sizes, mtimes = raw["sizes"], raw["mtimes"]
    if not (
        isinstance(stamp, list)
        and len(stamp) == 2
        and all(type(v) is int for v in stamp)
        and len(names) == len(sizes) == len(mtimes)
    ):
        raise ValueError("malformed")
    # Numbers (JSON has no other kind that adds up): one C loop each, not a test per row.
    if type(sum(sizes)) is not int or type(sum(mtimes, 0.0)) is not float:
        raise ValueError("malformed")
    return Shard(shard, (stamp[0], stamp[1]), list(zip(names, sizes, mtimes, strict=True)), True)


def forget() -> None:
    """Drop this process's listings (tests)."""
    with _lock:
        _memory.clear()
