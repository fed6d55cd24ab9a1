"""What a store holds, from directory listings: entries, their bytes, last use and pins.

An eviction decision needs each entry's size and last use, not its manifest's contents:
both come from listing ``manifests/`` and ``results/`` (one ``scandir`` walk locally, one
paginated LIST on object stores) plus the touch files of :mod:`.usage` and the pin
markers of :mod:`notebook_flow.storage.pins`. That keeps a decision over 100,000 entries
within a second or two. Rules that need what a manifest says (task, code version,
creation time) read manifests on top (``with_manifests``).

An entry is a key with a manifest. Payload files of a key without a manifest are a commit
in flight or a crash's leftover: they count in the store's bytes but are never an entry
(``gc`` removes leftovers once they are old). A key's bytes are its manifest plus every
payload file of the key (during a replacement there are briefly two).

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

from notebook_flow.storage.pins import pinned_keys

from . import usage

if TYPE_CHECKING:
    from notebook_flow.storage import Manifest, ResultStore

__all__ = ["Entry", "Inventory", "scan"]


@dataclasses.dataclass
class Entry:
    """One committed entry: its bytes, when its manifest was written, its last use."""

    key: str
    size: int
    committed: float
    last_used: float
    pinned: bool = False
    manifest: Manifest | None = None  # filled by with_manifests()


@dataclasses.dataclass
class Inventory:
    """A store's entries by key, and every byte under ``results/`` and ``manifests/``."""

    entries: dict[str, Entry]
    total: int
    pinned: frozenset[str]
    scanned_at: float

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
    total = 0
    # String tests, not a regex per file: this loop runs once per file of the store.
    for rel, size, mtime in listing(store, "manifests"):
        total += size
        name = rel[13:]  # "manifests/ab/" + "<key>.json"
        if len(name) == 37 and name.endswith(".json") and name.startswith(rel[10:12]):
            key = name[:32]
            if _is_hex_key(key):
                entries[key] = Entry(key, size, mtime, mtime)
    for rel, size, _mtime in listing(store, "results"):
        total += size
        entry = entries.get(rel[11:43])  # "results/ab/" + "<key>-<unique>.<ext>"
        if entry is not None and rel[43:44] == "-":
            entry.size += size
    for key, when in usage.last_used(store).items():
        entry = entries.get(key)
        if entry is not None and when > entry.last_used:
            entry.last_used = when
    pinned = pinned_keys(store)
    for key in pinned:
        entry = entries.get(key)
        if entry is not None:
            entry.pinned = True
    return Inventory(entries, total, pinned, time.time())
