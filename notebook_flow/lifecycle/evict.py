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
import itertools
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable, Sequence
from typing import Any

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
    removed here. Keys a live holder locks (in any lock manager :func:`lock_managers`
    names) are skipped; when one of those managers cannot be asked, nothing is removed.
    Other processes' caches are told once, at the end. Locally the shard folders are
    opened once for the whole batch and each file is removed through them."""
    removed: list[tuple[str, int]] = []
    locked = locked_keys(store)
    if locked is None:
        return removed
    folders = _Folders(store) if store.local_root is not None else None
    try:
        for key, committed, siblings in chosen:
            if key in locked:  # a holder is computing it again: not now
                continue
            if folders is not None:
                freed = _remove_local(store, key, committed, folders)
                if freed:
                    for rel in siblings:
                        folders.unlink(rel, key)
            else:
                freed = remove_entry(
                    store, key, committed=committed, signal=False, siblings=siblings
                )
            if freed:
                removed.append((key, freed))
    finally:
        if folders is not None:
            folders.close()
        if removed:
            store._changed()
    return removed


#: Lock managers a task of this process used with a store (store URL → label → manager).
_managers: dict[str, dict[str, Any]] = {}
#: Lock managers that eviction consults in every process, besides the store's own and the
#: ones a task of the process used: space-separated ``redis://…`` / ``postgresql://…`` URLs.
LOCK_URLS_ENV = "NOTEBOOK_FLOW_LOCK_URLS"


def note_lock_manager(store: ResultStore, manager: Any) -> None:
    """Remember that a task locks its keys of ``store`` in ``manager`` (a Redis or
    PostgreSQL one, say): eviction from this process then skips the keys it locks."""
    known = _managers.setdefault(store.url, {})
    # Two Redis managers on one server differ by their prefix only; managers of other
    # kinds may not say what tells them apart in their repr.
    if type(manager).__name__ in ("RedisLockManager", "PostgresLockManager", "FileLockManager"):
        label = f"{manager!r} {getattr(manager, 'prefix', '')}"
    else:
        label = f"{manager!r} {id(manager)}"
    known.setdefault(label, manager)


_from_env: dict[str, Any] = {}


def lock_managers(store: ResultStore) -> list[Any]:
    """The lock managers other than the store's default whose locks eviction respects:
    those noted by :func:`note_lock_manager` and those ``$NOTEBOOK_FLOW_LOCK_URLS`` names."""
    found = list(_managers.get(store.url, {}).values())
    for url in os.environ.get(LOCK_URLS_ENV, "").split():
        manager = _from_env.get(url)
        if manager is None:  # one client per URL and process, not one per eviction pass
            manager = _from_env[url] = _manager_from_url(url)
        found.append(manager)
    return found


def _manager_from_url(url: str) -> Any:
    from notebook_flow.errors import ConfigurationError
    from notebook_flow.locks import PostgresLockManager, RedisLockManager

    scheme = url.partition("://")[0]
    if scheme in ("redis", "rediss", "unix"):
        return RedisLockManager(url=url)
    if scheme in ("postgres", "postgresql"):
        return PostgresLockManager(url)
    raise ConfigurationError(
        f"{LOCK_URLS_ENV}: {url.rsplit('@', 1)[-1]!r} is not a lock manager URL; use "
        "redis://host:port/db or postgresql://user@host/db, separated by spaces"
    )


class _Locked:
    """What live holders lock: keys listed by every manager that can list them, and a
    question per key to those that cannot (Prefect's own managers)."""

    def __init__(self, keys: frozenset[str], ask: list[Any]) -> None:
        self.keys = keys
        self.ask = ask

    def __contains__(self, key: object) -> bool:
        if key in self.keys:
            return True
        try:
            return any(m.is_locked(key) for m in self.ask)
        except Exception:  # cannot tell: as if locked (the next pass asks again)
            return True


def locked_keys(store: ResultStore) -> _Locked | None:
    """Keys a live holder locks: in the store's default lock manager (local stores), and
    in every manager of :func:`lock_managers`. None when one of the latter cannot be
    asked (its server is down): then nobody knows what is locked, and nothing goes."""
    from notebook_flow.locks import PrefectLockAdapter

    keys: set[str] = set()
    if store.local_root is not None:
        from notebook_flow.locks import default_lock_manager_for

        try:
            manager = default_lock_manager_for(store)
            keys.update(info.key for info in manager.list_locks())  # type: ignore[attr-defined]
        except Exception:  # no locks folder yet, or unreadable: nothing known to be locked
            pass
    try:
        managers = lock_managers(store)
    except Exception:
        logger.warning("eviction skipped: bad %s", LOCK_URLS_ENV, exc_info=True)
        return None
    ask = []
    for manager in managers:
        try:
            if isinstance(manager, PrefectLockAdapter):
                manager.is_locked("0" * 32)  # reachable? (it cannot list its locks)
                ask.append(manager)
            else:
                keys.update(info.key for info in manager.list_locks())
        except Exception as exc:
            logger.warning(
                "eviction from %s skipped: could not list the locks of %r (%s); it runs "
                "again once the lock manager answers",
                store.url,
                manager,
                exc,
            )
            return None
    return _Locked(frozenset(keys), ask)


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


class _Folders:
    """Descriptors of a local store's shard folders, opened once per batch of removals
    (each reached without following a symlink, as ``files._open_parent`` does)."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.fds: dict[str, int] = {}

    def fd(self, folder: str) -> int:
        fd = self.fds.get(folder)
        if fd is None:
            fd, _name = _files._open_parent(self.store, f"{folder}/x")
            self.fds[folder] = fd
        return fd

    def unlink(self, rel: str, key: str) -> int:
        """Remove the regular file ``rel`` (a payload of ``key``); its size, 0 if none."""
        folder, _, name = rel.rpartition("/")
        if folder != f"results/{key[:2]}" or not name.startswith(f"{key}-"):
            return 0
        try:
            parent = self.fd(folder)
            st = os.lstat(name, dir_fd=parent)
            if not stat.S_ISREG(st.st_mode):
                return 0
            os.unlink(name, dir_fd=parent)
        except OSError:
            return 0
        return st.st_size

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


#: The payload a manifest names (``Manifest.payload``, see ``_PAYLOAD_RE``), found in its
#: bytes without parsing the JSON (an inline manifest holds up to 16 KiB of base64).
_PAYLOAD_FIELD = re.compile(
    rb'"payload": ?"(results/[0-9a-f]{2}/([0-9a-f]{32})-[0-9a-f]{16}\.[a-z0-9]{1,16})"'
)


def _named_payload(data: bytes, key: str) -> str:
    """The payload file the manifest ``data`` names, if it is one of ``key``'s (what an
    untrusted manifest names is believed only within the key being removed)."""
    match = _PAYLOAD_FIELD.search(data)
    if match is None or match.group(2) != key.encode():
        return ""
    return match.group(1).decode()


#: Claim names differ between processes (pid, a random tag) and within one (a counter).
_CLAIM_TAG = secrets.token_hex(4)
_claims = itertools.count()
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _remove_local(
    store: ResultStore, key: str, committed: float | None, folders: _Folders | None = None
) -> int:
    own = folders is None
    folders = _Folders(store) if folders is None else folders
    name = f"{key}.json"
    claimed_name = f".{key}.evict-{os.getpid():x}-{next(_claims)}-{_CLAIM_TAG}.tmp"
    try:
        try:
            parent = folders.fd(f"manifests/{key[:2]}")
            st = os.lstat(name, dir_fd=parent)
            if not stat.S_ISREG(st.st_mode):
                return 0
            os.rename(name, claimed_name, src_dir_fd=parent, dst_dir_fd=parent)
        except OSError:
            return 0  # no such folder or file: another process removed it first
        try:
            fd = os.open(claimed_name, _READ_FLAGS, dir_fd=parent)
        except OSError:  # a link swapped in since the lstat: left for gc (a temp name)
            return 0
        try:
            claimed = os.fstat(fd)  # the file claimed, not the one lstat-ed before
            data = _read_all(fd) if stat.S_ISREG(claimed.st_mode) else b""
        finally:
            os.close(fd)
        if not stat.S_ISREG(claimed.st_mode):  # swapped in since the lstat: not ours
            with contextlib.suppress(OSError):
                os.rename(claimed_name, name, src_dir_fd=parent, dst_dir_fd=parent)
            return 0
        if committed is not None and abs(claimed.st_mtime - committed) > 1e-6:
            # Committed again since the decision: not the entry that was chosen. Put it
            # back unless a newer commit is already there.
            with contextlib.suppress(FileExistsError):
                os.link(claimed_name, name, src_dir_fd=parent, dst_dir_fd=parent)
                os.unlink(claimed_name, dir_fd=parent)
                return 0
        payload = _named_payload(data, key)
        freed = claimed.st_size + (folders.unlink(payload, key) if payload else 0)
        os.unlink(claimed_name, dir_fd=parent)
        return freed
    finally:
        if own:
            folders.close()


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
