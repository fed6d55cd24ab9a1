"""What a store holds, from directory listings: entries, their bytes, last use and pins.

An eviction decision needs each entry's size and last use, not its manifest's contents:
both come from listing ``manifests/`` and ``results/`` (locally only the shard folders
that changed since they were last listed, see :mod:`.shards`; one paginated LIST on
object stores), parsed once per shard, plus the touch files and index hits of
:mod:`.usage` and the pin markers of :mod:`notebook_flow.storage.pins`. Rules that need
what a manifest says (task, code version) read manifests on top (``with_manifests``);
``gc`` reads only the chosen entries' (for the task names of its table).

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

import contextlib
import dataclasses
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from notebook_flow._localfs import is_temp_name
from notebook_flow.storage import files
from notebook_flow.storage.pins import pinned_keys

from . import usage
from .shards import list_local

if TYPE_CHECKING:
    from notebook_flow.storage import Manifest, ResultStore

__all__ = ["GRACE", "Entry", "Inventory", "scan"]

#: Seconds a file that belongs to no entry may be a write in flight (a payload written,
#: its manifest not yet: milliseconds in a plain commit, longer in a transaction). Older,
#: it is the leftover of a crash or of two writers racing on one key.
GRACE = 300.0


@dataclasses.dataclass(slots=True)
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

    def with_manifests(self, store: ResultStore, keys: Iterable[str] | None = None) -> Inventory:
        """Fill ``Entry.manifest`` from the store, of every entry or of ``keys`` only
        (unverified manifests too: deciding to delete believes only the task, times and
        components they name)."""
        if keys is None:
            for manifest in store.iter_manifests(verified=False):
                entry = self.entries.get(manifest.key)
                if entry is not None:
                    entry.manifest = manifest
            return self
        rels = {store._manifest_rel(k): k for k in keys if k in self.entries}
        if store.is_local:
            found: dict[str, object] = {}
            for rel in rels:
                with contextlib.suppress(OSError):
                    found[rel] = files.read_bytes(store, rel)
        else:
            paths = {store._path(rel): rel for rel in rels}
            got = store.fs.cat(list(paths), on_error="return") if paths else {}
            found = {paths[p]: data for p, data in got.items() if p in paths}
        for rel, data in found.items():
            if isinstance(data, bytes):
                parsed = store._parse_manifest(data, rel, rels[rel], verify=False)
                if parsed is not None:
                    self.entries[rels[rel]].manifest = parsed
        return self


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
        return [
            (f"{top}/{shard.name}/{name}", size, mtime)
            for shard in list_local(store, top)
            for name, size, mtime in shard.rows
        ]
    return _walk_remote(store, top)


_HEX = frozenset("0123456789abcdef")


def _is_hex_key(text: str) -> bool:
    return len(text) == 32 and _HEX.issuperset(text)


#: What one shard holds: (key, bytes, manifest mtime, payload files) of each entry, and
#: (relative path, size, mtime) of the files that belong to no entry.
_Parsed = tuple[list[list[Any]], list[tuple[str, int, float]]]


def _parse(
    shard: str,
    manifests: Iterable[tuple[str, int, float]],
    results: Iterable[tuple[str, int, float]],
) -> _Parsed:
    """Entries and stray files of one shard from its two folders' (name, size, mtime)."""
    found: dict[str, list[Any]] = {}
    stray: list[tuple[str, int, float]] = []
    hexdigits = _HEX.issuperset
    # String tests, not a regex per file: this loop runs once per file of the store.
    for name, size, mtime in manifests:
        if len(name) == 37 and name.endswith(".json") and name.startswith(shard):
            key = name[:32]
            if hexdigits(key):
                found[key] = [key, size, mtime, []]
                continue
        stray.append((f"manifests/{shard}/{name}", size, mtime))
    for name, size, mtime in results:  # "<key>-<unique>.<ext>"
        row = found.get(name[:32])
        rel = f"results/{shard}/{name}"
        if row is not None and name[32:33] == "-":
            row[1] += size
            row[3].append((rel, mtime))
        else:
            stray.append((rel, size, mtime))
    return list(found.values()), stray


def _shards(store: ResultStore) -> list[_Parsed]:
    """What each shard holds; locally from :mod:`.shards` (parsed again only when one of
    its two folders changed), on object stores from one LIST per folder."""
    if store.local_root is not None:
        results = {s.name: s for s in list_local(store, "results")}
        out = []
        for m in list_local(store, "manifests"):
            r = results.pop(m.name, None)
            kept = m.parsed
            if isinstance(kept, tuple) and kept[0] is r:
                out.append(kept[1])
                continue
            parsed = _parse(m.name, m.rows, r.rows if r is not None else [])
            m.parsed = (r, parsed)
            out.append(parsed)
        for r in results.values():  # payload folders with no manifest folder
            out.append(([], [(f"results/{r.name}/{n}", s, t) for n, s, t in r.rows]))
        return out
    by_shard: dict[str, tuple[list[tuple[str, int, float]], list[tuple[str, int, float]]]] = {}
    odd: list[tuple[str, int, float]] = []
    for index, top in enumerate(("manifests", "results")):
        for rel, size, mtime in _walk_remote(store, top):
            parts = rel.split("/")
            if len(parts) != 3:
                odd.append((rel, size, mtime))
                continue
            by_shard.setdefault(parts[1], ([], []))[index].append((parts[2], size, mtime))
    out = [_parse(shard, m, r) for shard, (m, r) in by_shard.items()]
    out.append(([], odd))
    return out


def scan(store: ResultStore) -> Inventory:
    """The entries of ``store`` with sizes, last use (merged from every process) and pins."""
    entries: dict[str, Entry] = {}
    total = in_flight = 0
    leftovers: list[str] = []
    cutoff = time.time() - GRACE
    for found, stray in _shards(store):
        for key, size, mtime, payloads in found:
            entries[key] = Entry(key, size, mtime, mtime, False, None, payloads)
            total += size
        for rel, size, mtime in stray:
            if mtime > cutoff:
                in_flight += size
                continue
            total += size
            name = rel.rsplit("/", 1)[-1]
            payload = rel.startswith("results/") and name[32:33] == "-" and _is_hex_key(name[:32])
            if payload or is_temp_name(name):  # nothing else is ours to remove
                leftovers.append(rel)
    # Last use: the touch files of every process, then the hits the local index recorded
    # (a touch file lost or not yet written must not make a recent hit look unused).
    for source in (usage.last_used(store), usage.indexed_hits(store)):
        for key, when in source.items():
            entry = entries.get(key)
            if entry is not None and when > entry.last_used:
                entry.last_used = when
    pinned = pinned_keys(store)
    for key in pinned:
        entry = entries.get(key)
        if entry is not None:
            entry.pinned = True
    return Inventory(entries, total, pinned, time.time(), in_flight, leftovers)
