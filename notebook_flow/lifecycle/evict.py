"""Removing one entry so that it is removed once, and a reader racing with it gets a miss.

The manifest goes first (readers then miss), its payload second. What makes the removal
safe when several processes evict from one store at once:

* **One remover per entry.** Locally the manifest is first *claimed*: renamed to a temp
  name in its folder (``.<key>.evict-<random>.tmp``), which only one process can do; the
  others find nothing and free nothing. On object stores the claim is a marker
  ``evicting/<key>.<digest of the manifest>`` written with a conditional PUT
  (``If-None-Match: *``): only the first writer succeeds. The bytes freed are counted by
  the process that won.
* **Never an entry being written or locked.** Keys a live holder locks (the store's
  default lock manager) are skipped. An entry committed again after the decision is not
  the entry that was chosen: locally, the claimed file's modification time differs from
  the one the decision saw, and it is put back with ``link`` (which never replaces a
  newer commit); on object stores the manifest is read, and nothing is removed when it
  changed since the listing.
* **A reader that loses the race misses.** A reader that read the manifest before it went
  finds the payload gone (``PayloadCorruptError``, a miss) or, having opened it already,
  reads it whole (the file is unlinked, not truncated); either way it checks size,
  checksum and signature before believing a byte.

A crash between the steps leaves a temp file, a payload no manifest names or a stale
claim marker: ``gc`` removes each once it is an hour old.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Sequence

import xxhash

from notebook_flow.storage import Manifest, ResultStore
from notebook_flow.storage import files as _files

__all__ = ["remove_entries", "remove_entry"]

logger = logging.getLogger("notebook_flow")

#: Folder of the claim markers on object stores.
CLAIMS_DIR = "evicting"


def remove_entry(
    store: ResultStore,
    key: str,
    *,
    committed: float | None = None,
    signal: bool = True,
    siblings: Sequence[str] = (),
) -> int:
    """Remove the entry ``key``; returns the bytes freed, 0 when another process removed it
    first or it was committed again after ``committed`` (its manifest's mtime when chosen).

    With ``signal=False`` the caller rewrites the store's generation file itself, once
    after many removals (``remove_entries``). ``siblings`` are other payload files of the
    key, old enough not to be a commit in flight (see ``inventory.GRACE``): they go too.
    """
    if store.local_root is not None:
        freed = _remove_local(store, key, committed)
    else:
        freed = _remove_remote(store, key, committed)
    if freed:
        for rel in siblings:  # a racing writer's leftovers (the named payload is gone)
            if rel.startswith(f"results/{key[:2]}/{key}-"):
                with contextlib.suppress(OSError):
                    _files.remove(store, rel)
    if freed and signal:
        store._changed()  # other processes' in-memory caches look again
    return freed


def remove_entries(
    store: ResultStore, chosen: Iterable[tuple[str, float | None, Sequence[str]]]
) -> list[tuple[str, int]]:
    """Remove ``(key, committed, siblings)``; returns ``(key, bytes freed)`` of those
    removed here. Other processes' caches are told once, at the end."""
    removed = []
    locked = locked_keys(store)
    try:
        for key, committed, siblings in chosen:
            if key in locked:  # a holder is computing it again: not now
                continue
            freed = remove_entry(store, key, committed=committed, signal=False, siblings=siblings)
            if freed:
                removed.append((key, freed))
    finally:
        if removed:
            store._changed()
    return removed


def locked_keys(store: ResultStore) -> frozenset[str]:
    """Keys a live holder locks in the store's default lock manager (local stores; a lock
    manager of a task's own, such as Redis, is not seen here)."""
    if store.local_root is None:
        return frozenset()
    from notebook_flow.locks import default_lock_manager_for

    try:
        manager = default_lock_manager_for(store)
        return frozenset(info.key for info in manager.list_locks())  # type: ignore[attr-defined]
    except Exception:  # no locks folder yet, or unreadable: nothing known to be locked
        return frozenset()


def _parse(data: bytes, key: str) -> Manifest | None:
    try:
        return Manifest.from_json(data, key=key)
    except (ValueError, TypeError):
        return None


def _payload_size(store: ResultStore, manifest: Manifest | None) -> int:
    if manifest is None or not manifest.payload:
        return 0
    try:
        if store.local_root is not None:
            return os.lstat(store._path(manifest.payload)).st_size
        return int(store.fs.size(store._path(manifest.payload)) or 0)
    except (OSError, ValueError, TypeError):
        return 0


def _remove_local(store: ResultStore, key: str, committed: float | None) -> int:
    rel = f"manifests/{key[:2]}/{key}.json"
    claimed_name = f".{key}.evict-{secrets.token_hex(4)}.tmp"
    try:
        parent, name = _files._open_parent(store, rel)
    except OSError:
        return 0
    try:
        try:
            st = os.lstat(name, dir_fd=parent)
            if not stat.S_ISREG(st.st_mode):
                return 0
            os.rename(name, claimed_name, src_dir_fd=parent, dst_dir_fd=parent)
        except FileNotFoundError:
            return 0  # another process removed it first
        claimed = os.lstat(claimed_name, dir_fd=parent)
        if committed is not None and abs(claimed.st_mtime - committed) > 1e-6:
            # Committed again since the decision: not the entry that was chosen. Put it
            # back unless a newer commit is already there.
            with contextlib.suppress(FileExistsError):
                os.link(claimed_name, name, src_dir_fd=parent, dst_dir_fd=parent)
                os.unlink(claimed_name, dir_fd=parent)
                return 0
        with os.fdopen(
            os.open(claimed_name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=parent), "rb"
        ) as f:
            data = f.read()
        manifest = _parse(data, key)
        freed = claimed.st_size + _payload_size(store, manifest)
        if manifest is not None:
            _files.remove_quietly(store, manifest.payload)
        os.unlink(claimed_name, dir_fd=parent)
        return freed
    finally:
        os.close(parent)


def _remove_remote(store: ResultStore, key: str, committed: float | None) -> int:
    fs = store.fs
    path = store._path(f"manifests/{key[:2]}/{key}.json")
    try:
        data = bytes(fs.cat_file(path))
    except FileNotFoundError:
        return 0
    manifest = _parse(data, key)
    if committed is not None and manifest is not None and manifest.created_at > committed + 5:
        return 0  # committed again since the listing (clock skew allowed for)
    claim = store._path(f"{CLAIMS_DIR}/{key}.{xxhash.xxh3_64_hexdigest(data)}")
    try:
        fs.pipe_file(claim, b"", mode="create")  # If-None-Match: only one process wins
    except FileExistsError:
        return 0
    # The marker stays (gc removes it after an hour): a process that read the same
    # manifest later must still lose, and deletes on S3 succeed for missing objects.
    try:
        if bytes(fs.cat_file(path)) != data:
            return 0  # replaced between the read and the claim: not the chosen entry
        fs.rm_file(path)
    except FileNotFoundError:
        return 0
    freed = len(data) + _payload_size(store, manifest)
    if manifest is not None:
        _files.remove_quietly(store, manifest.payload)
    return freed
