"""Which manifests a reader believes: signed ones, and (once) legacy ones it alone could write.

A store is untrusted input: anyone who can write the folder or bucket can write a manifest.
So every manifest carries ``mac`` (:func:`notebook_flow.signing.manifest_mac`), and a
reader believes only a manifest whose ``mac`` verifies under its own signing key. The mac
covers every field — task, key, serializer, payload name or inline bytes, size, checksum,
the payload's HMAC, expiry, seal, format version — so a forged, downgraded (``mac`` or
``signature`` removed), replayed (copied under another key or task) or revived (expiry
moved) entry is not believed: it is a cache miss, and nothing of it is deserialized.

**Upgrade path.** Entries written before every entry was signed have no ``mac``. Such an
entry is re-signed, once, when the store is local and it could only have been written by
this user: the store's root, the entry's folders, its manifest and its payload file are all
owned by the current user and writable by nobody else (no group or other write bit, no
symlink). Its payload is then verified against its checksum and signed. Anywhere else —
object stores, shared or group-writable folders — an unsigned entry is a miss, and the
first recomputation replaces it with a signed one.

What a writer without the key *can* still do: delete entries (a miss), or put back an
older signed entry of the same key and task (a result this task did compute for these
inputs; its own expiry still applies).

Entries signed with another key (a teammate's) are misses too. Every store warns once per
process, naming the fix: share one key (``notebook-flow key show`` / ``key import`` or
``$NOTEBOOK_FLOW_SIGNING_KEY``).
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import logging
import os
import stat
import threading
import weakref
from typing import TYPE_CHECKING

import xxhash

from notebook_flow.serializers import new_signer
from notebook_flow.signing import SIGNING_KEY_ENV, manifest_mac

from . import files

if TYPE_CHECKING:
    from .manifest import Manifest
    from .store import ResultStore

logger = logging.getLogger("notebook_flow")

_warned: set[str] = set()
# (id, key) → a manifest object verified under that key, while it lives (see verified()).
_seen: weakref.WeakValueDictionary[tuple[int, bytes], Manifest] = weakref.WeakValueDictionary()
_warned_lock = threading.Lock()

FIX = (
    "Every process that shares a store must share one signing key: run "
    "`notebook-flow key show` where the entries were written and `notebook-flow key import` "
    f"here, or set {SIGNING_KEY_ENV} in both."
)


def sign(store: ResultStore, manifest: Manifest) -> Manifest:
    """``manifest`` with its ``mac`` set by this store's key."""
    return dataclasses.replace(manifest, mac=manifest_mac(store._signing_key(), manifest.fields()))


def verified(store: ResultStore, manifest: Manifest) -> bool:
    """True when the manifest's ``mac`` verifies under this store's key.

    A manifest object verified once (by ``lookup``) is remembered for as long as it lives,
    so the ``load`` that follows does not compute the mac again. Manifests are frozen.
    """
    if manifest.mac is None:
        return False
    key = store._signing_key()
    if _seen.get((id(manifest), key)) is manifest:
        return True
    if not hmac.compare_digest(manifest_mac(key, manifest.fields()), manifest.mac):
        return False
    _seen[(id(manifest), key)] = manifest
    return True


def accept(store: ResultStore, manifest: Manifest, rel: str, data: bytes) -> Manifest | None:
    """The manifest a reader may believe (``manifest``, or it re-signed), else None.

    ``data`` is the manifest file as read; a legacy entry is re-signed only if the file
    still holds it.
    """
    if verified(store, manifest):
        return manifest
    if manifest.mac is None and legacy_trusted(store, rel, manifest):
        resigned = resign(store, manifest, rel, data)
        if resigned is not None:
            return resigned
    warn_once(
        store,
        f"entry {rel} (task {manifest.task!r}) is not signed with this process's key "
        f"({'unsigned' if manifest.mac is None else 'signature does not match'}); it is "
        "treated as missing and was not loaded. Entries are forged, written by an older "
        "notebook_flow in a store others can write, or signed with another key. " + FIX,
    )
    return None


def warn_once(store: ResultStore, message: str) -> None:
    """Log every refusal; warn (StorageWarning) once per store and process."""
    with _warned_lock:
        first = store.url not in _warned
        _warned.add(store.url)
    if first:
        store._warn(message + " (This warning is shown once per store; later ones are logged.)")
    else:
        logger.info("%s (store %s)", message, store.url)


def _private(path: str, uid: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid == uid and not st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)


def legacy_trusted(store: ResultStore, rel: str, manifest: Manifest) -> bool:
    """True when only the current user could have written this entry (local stores)."""
    if not store.is_local or not hasattr(os, "getuid"):
        return False
    uid = os.getuid()
    root = store._root
    paths = [root, os.path.join(root, "manifests"), os.path.dirname(store._path(rel))]
    paths.append(store._path(rel))
    if manifest.inline is None:
        paths += [os.path.join(root, "results"), os.path.dirname(store._path(manifest.payload))]
        paths.append(store._path(manifest.payload))
    return all(_private(p, uid) for p in paths)


def resign(store: ResultStore, manifest: Manifest, rel: str, data: bytes) -> Manifest | None:
    """Verify a legacy entry's payload against its checksum, sign it, rewrite its manifest.

    None (a miss) if the payload does not match or the manifest changed meanwhile.
    """
    try:
        if manifest.inline is not None:
            payload = base64.b64decode(manifest.inline, validate=True)
        else:
            with os.fdopen(files.open_local(store, manifest.payload), "rb") as f:
                payload = f.read()
    except (OSError, ValueError) as exc:
        logger.info("legacy entry %s not re-signed: %s", rel, exc)
        return None
    if len(payload) != manifest.size or xxhash.xxh3_128_hexdigest(payload) != manifest.checksum:
        logger.info("legacy entry %s not re-signed: its payload does not match", rel)
        return None
    signer = new_signer(store._signing_key(), manifest.key, manifest.serializer)
    signer.update(payload)
    signed = sign(store, dataclasses.replace(manifest, signature=signer.hexdigest(), mac=None))
    try:
        if files.read_bytes(store, rel) != data:  # replaced meanwhile: leave it alone
            return None
        body = signed.to_json()
        files.write_atomic(store, rel, lambda write: write(memoryview(body)))
    except OSError as exc:  # (a read-only store: trusted now, checked again next time)
        logger.info("legacy entry %s verified but not rewritten: %s", rel, exc)
        return signed
    logger.info("re-signed the legacy entry %s in %s (a private local store)", rel, store.url)
    return signed
