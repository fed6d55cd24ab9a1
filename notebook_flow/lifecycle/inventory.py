"""What a store holds, from directory listings: entries, their bytes, last use and pins.

An eviction decision needs each entry's size and last use, not its manifest's contents:
both come from listing ``manifests/`` and ``results/`` (one ``scandir`` walk locally, one
paginated LIST on object stores) plus the touch files of :mod:`.usage` and the pin
markers of :mod:`notebook_flow.storage.pins`. That keeps a decision over 100,000 entries
within a second or two. Rules that need what a manifest says (task, code version,
creation time) read manifests on top (``with_manifests``).

An entry is a key with a manifest; its bytes are its manifest plus every payload file of
its key (during a replacement there are briefly two; two writers racing on one key leave
the loser's payload behind). Files that belong to no entry — payloads of a key without a
manifest, temp files — are a write in flight while younger than :data:`GRACE`
(``in_flight``: not counted, they are counted once committed) and a leftover after it
(``leftovers``: counted, and removed by the next eviction pass).

>>> import tempfile
>>> from notebook_flow.storage import ResultStore
>>> store = ResultStore(tempfile.mkdtemp())
>>> _ = store.commit("0" * 32, list(range(9000)), task="t", components={}, run_id="r",
...                  duration=0.1, expires_at=None)
>>> inv = scan(store)
>>> len(inv.entries), inv.entries["0" * 32].size > 9000, inv.total >= inv.entries["0" * 32].size
(1, True, True)
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from typing import TYPE_CHECKING

from notebook_flow._localfs import is_temp_name
from notebook_flow.storage.pins import pinned_keys

from . import usage

if TYPE_CHECKING:
    from notebook_flow.storage import Manifest, ResultStore

__all__ = ["GRACE", "Entry", "Inventory", "scan"]

#: Seconds a file that belongs to no entry may be a write in flight (a payload written,
#: its manifest not yet: milliseconds in a plain commit, longer in a transaction). Older,
#: it is the leftover of a crash or of two writers racing on one key.
GRACE = 300.0


@dataclasses.dataclass
class Entry:
    """One committed entry: its bytes, when its manifest was written, its last use."""

    key: str
    size: int
    committed: float
    last_used: float
    pinned: bool = False
    manifest: Manifest | None = None  # filled by with_manifests()
    #: (relative path, mtime) of every payload file of the key
    files: list[tuple[str, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Inventory:
    """A store's entries by key, and every byte under ``results/`` and ``manifests/``."""

    entries: dict[str, Entry]
    total: int
    pinned: frozenset[str]
    scanned_at: float
    in_flight: int = 0  # bytes of young files that belong to no entry (not in total)
    leftovers: list[str] = dataclasses.field(default_factory=list)  # old ones (in total)

    def siblings(self, key: str) -> list[str]:
        """Payload files of ``key`` older than :data:`GRACE`: a racing writer's leftovers
        (and the current payload), removed with the entry."""
        entry = self.entries.get(key)
        cutoff = time.time() - GRACE
        return [rel for rel, mtime in entry.files if mtime <= cutoff] if entry else []

    def with_manifests(self, store: ResultStore) -> Inventory:
        """Fill ``Entry.manifest`` from the store (unverified manifests too: deciding to
        delete believes only the task, times and components they name)."""
        for manifest in store.iter_manifests(verified=False):
            entry = self.entries.get(manifest.key)
            if entry is not None:
                entry.manifest = manifest
        return self


def _walk_local(root: str, top: str) -> list[tuple[str, int, float]]:
    """(relative path, size, mtime) of the regular files below ``top``; no link followed."""
    out: list[tuple[str, int, float]] = []
    base = os.path.join(root, top)
    try:
        shards = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for shard in shards:
        if not shard.is_dir(follow_symlinks=False):
            continue
        try:
            items = list(os.scandir(shard.path))
        except OSError:
            continue
        for item in items:
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((f"{top}/{shard.name}/{item.name}", st.st_size, st.st_mtime))
    return out


def _walk_remote(store: ResultStore, top: str) -> list[tuple[str, int, float]]:
    from notebook_flow.storage.files import info_mtime

    fs = store.fs
    path = store._path(top)
    fs.invalidate_cache(path)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return []
    out = []
    for name, info in found.items():
        if info.get("type", "file") != "file":
            continue
        rel = name[len(store._root) + 1 :]
        out.append((rel, int(info.get("size") or 0), info_mtime(info) or 0.0))
    return out


def listing(store: ResultStore, top: str) -> list[tuple[str, int, float]]:
    """(relative path, size, mtime) of every file below ``top`` (two levels: shards)."""
    if store.local_root is not None:
        return _walk_local(store.local_root, top)
    return _walk_remote(store, top)


def _is_hex_key(text: str) -> bool:
    return len(text) == 32 and _HEX.issuperset(text)


_HEX = frozenset("0123456789abcdef")


def scan(store: ResultStore) -> Inventory:
    """The entries of ``store`` with sizes, last use (merged from every process) and pins."""
    entries: dict[str, Entry] = {}
    total = in_flight = 0
    leftovers: list[str] = []
    cutoff = time.time() - GRACE
    stray: list[tuple[str, int, float]] = []
    # String tests, not a regex per file: this loop runs once per file of the store.
    for rel, size, mtime in listing(store, "manifests"):
        name = rel[13:]  # "manifests/ab/" + "<key>.json"
        if len(name) == 37 and name.endswith(".json") and name.startswith(rel[10:12]):
            key = name[:32]
            if _is_hex_key(key):
                entries[key] = Entry(key, size, mtime, mtime)
                total += size
                continue
        stray.append((rel, size, mtime))
    for rel, size, mtime in listing(store, "results"):
        entry = entries.get(rel[11:43])  # "results/ab/" + "<key>-<unique>.<ext>"
        if entry is not None and rel[43:44] == "-":
            entry.size += size
            entry.files.append((rel, mtime))
            total += size
        else:
            stray.append((rel, size, mtime))
    for rel, size, mtime in stray:
        if mtime > cutoff:
            in_flight += size
            continue
        total += size
        name = rel.rsplit("/", 1)[-1]
        payload = rel.startswith("results/") and name[32:33] == "-" and _is_hex_key(name[:32])
        if payload or is_temp_name(name):  # nothing else is ours to remove
            leftovers.append(rel)
    for key, when in usage.last_used(store).items():
        entry = entries.get(key)
        if entry is not None and when > entry.last_used:
            entry.last_used = when
    pinned = pinned_keys(store)
    for key in pinned:
        entry = entries.get(key)
        if entry is not None:
            entry.pinned = True
    return Inventory(entries, total, pinned, time.time(), in_flight, leftovers)
