"""Group commits: several entries of one store made visible at once, or none of them.

A transaction's results are staged (payloads written, manifests signed, nothing visible);
:func:`publish_group` then commits them together:

1. Each manifest is written under its key carrying the group's id (``Manifest.txn``),
   signed with it. A reader treats such a manifest as a miss until step 2 happened.
2. The commit record ``transactions/<id>.json`` is written with one atomic put (temp file
   and rename locally, one PUT on object stores): ``{txn, keys, created_at, mac}``, signed
   with the store's key (:func:`notebook_flow.signing.record_mac`). **This is the commit
   point**: from here on every manifest of the group is visible, before it none is.
3. Roll forward: each manifest is rewritten without ``txn`` (re-signed), then the record
   is removed. Readers of a finished group pay nothing extra; only a manifest that still
   names a group costs a reader one more small read (its record).

A SIGKILL anywhere leaves the group all-or-nothing: before the record, the manifests
written are misses (their payloads remain, unreferenced once recovered); after it, all are
hits. :func:`recover` (run by ``ResultStore.remove_orphans``) finishes what a dead
committer left: records older than the cutoff are rolled forward, and manifests of groups
with no record are removed (rolled back). A record is believed only when its mac verifies
and it lists the manifest's key, so nobody without the key can make a staged entry visible.

Atomicity is per store: a transaction over two stores commits each store's group in turn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from notebook_flow import _json
from notebook_flow._crash import crash_point
from notebook_flow.errors import CommitError
from notebook_flow.signing import record_mac

from . import files, trust

if TYPE_CHECKING:
    from .manifest import Manifest
    from .store import ResultStore

logger = logging.getLogger("notebook_flow")

#: Where commit records live, under the store's root.
RECORDS = "transactions"
RECORD_VERSION = 1
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_RECORD_REL_RE = re.compile(r"^transactions/([0-9a-f]{32})\.json$")


def record_rel(txn: str) -> str:
    """The commit record's path for the group ``txn`` (validated: 32 hex characters)."""
    if not _ID_RE.match(txn):
        raise ValueError(f"invalid transaction id {txn!r}")
    return f"{RECORDS}/{txn}.json"


def visible(store: ResultStore, manifest: Manifest) -> bool:
    """True when a reader may believe ``manifest``: it belongs to no group, or its group's
    signed record exists and lists its key."""
    if manifest.txn is None:
        return True
    keys = read_record(store, manifest.txn)
    return keys is not None and manifest.key in keys


def believe(store: ResultStore, manifest: Manifest) -> Manifest | None:
    """What a reader that found ``manifest`` (naming a transaction) may believe for its key:
    ``manifest`` once its group committed; the plain manifest that replaced it, if the
    committer finished (rewrote it and removed the record) between the two reads; else None.
    """
    if visible(store, manifest):
        return manifest
    rel = store._manifest_rel(manifest.key)
    try:
        data = files.read_small(store, rel)
    except OSError:
        return None
    again = store._parse_manifest(data, rel, manifest.key)
    return again if again is not None and again.txn is None else None


def read_record(store: ResultStore, txn: str) -> frozenset[str] | None:
    """The keys the group ``txn`` committed, or None (no record, or one not to believe)."""
    try:
        data = files.read_small(store, record_rel(txn))
    except (OSError, ValueError):  # absent, unreadable, or not a regular file
        return None
    try:
        raw = _json.loads(data)
        keys = raw["keys"]
        ok = (
            isinstance(raw, dict)
            and raw.get("format_version") == RECORD_VERSION
            and raw.get("txn") == txn
            and isinstance(keys, list)
            and all(isinstance(k, str) for k in keys)
            and isinstance(raw.get("mac"), str)
        )
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        ok = False
    if not ok:
        logger.warning("commit record %s in %s is malformed; ignored", record_rel(txn), store.url)
        return None
    expected = record_mac(store._signing_key(), raw)
    if not hmac.compare_digest(expected, raw["mac"]):
        trust.warn_once(
            store,
            f"commit record {record_rel(txn)} is not signed with this process's key; the "
            f"entries of that transaction are treated as missing. {trust.FIX}",
        )
        return None
    return frozenset(keys)


def _write_record(store: ResultStore, txn: str, keys: Sequence[str]) -> None:
    fields: dict[str, Any] = {
        "format_version": RECORD_VERSION,
        "txn": txn,
        "keys": sorted(keys),
        "created_at": time.time(),
    }
    fields["mac"] = record_mac(store._signing_key(), fields)
    body = json.dumps(fields, sort_keys=True, indent=1).encode()
    files.write_atomic(store, record_rel(txn), lambda write: write(memoryview(body)))


def _put(store: ResultStore, manifest: Manifest) -> None:
    data = manifest.to_json()
    files.write_atomic(
        store, store._manifest_rel(manifest.key), lambda write: write(memoryview(data))
    )


def _still_ours(store: ResultStore, manifest: Manifest) -> bool:
    current = store._read_previous(manifest.key)
    return (
        current is not None and current.txn == manifest.txn and current.payload == manifest.payload
    )


def publish_group(
    store: ResultStore,
    manifests: Sequence[Manifest],
    *,
    check: Callable[[], None] | None = None,
) -> list[Manifest]:
    """Commit staged ``manifests`` (of distinct keys) of ``store`` together; returns the
    published manifests.

    ``check`` (the locks' fencing checks) runs before the first manifest is written and
    again just before the record: if it raises, or a write fails, every manifest written so
    far is taken back (the previous one restored) and the exception propagates; the caller
    discards the payloads."""
    txn = secrets.token_hex(16)
    pending = [trust.sign(store, dataclasses.replace(m, txn=txn, mac=None)) for m in manifests]
    replaced: list[tuple[Manifest, Manifest | None]] = []  # (ours, the one it replaced)
    try:
        if check is not None:
            check()
        for n, manifest in enumerate(pending, 1):
            previous = store._read_previous(manifest.key)
            _put(store, manifest)
            replaced.append((manifest, previous))
            crash_point(f"group_manifest_{n}")
        if check is not None:
            check()
        crash_point("group_before_record")
        _write_record(store, txn, [m.key for m in pending])
    except OSError as exc:
        _take_back(store, replaced)
        raise CommitError(store._commit_failure(pending[0].key, exc)) from exc
    except BaseException:
        _take_back(store, replaced)
        raise
    crash_point("group_after_record")
    final, complete = _roll_forward(store, txn, pending)
    crash_point("group_before_forget")
    if complete:
        files.remove_quietly(store, record_rel(txn))
    # The results these replaced are gone for good now: their payloads, and in-process
    # caches elsewhere that may hold them.
    olds = [old for _ours, old in replaced if old is not None]
    for ours, old in replaced:
        if old is not None and old.payload != ours.payload:
            files.remove_quietly(store, old.payload)
    if olds:
        store._changed()
    return final


def _take_back(store: ResultStore, replaced: list[tuple[Manifest, Manifest | None]]) -> None:
    """Undo the manifests a failed group commit wrote: the previous one back, or none."""
    for ours, previous in reversed(replaced):
        try:
            if not _still_ours(store, ours):
                continue
            if previous is not None:
                _put(store, previous)
            else:
                files.remove(store, store._manifest_rel(ours.key))
        except OSError as exc:  # left for recover(): a miss meanwhile, never a wrong hit
            logger.warning("could not take back the manifest of %s: %s", ours.key, exc)


def _roll_forward(
    store: ResultStore, txn: str, pending: Sequence[Manifest]
) -> tuple[list[Manifest], bool]:
    """Rewrite the committed group's manifests without ``txn``: plain entries again.
    Returns them, and False if a rewrite failed: the group is committed all the same
    (visible through its record, which must then stay for ``recover`` to finish)."""
    final = []
    complete = True
    for n, manifest in enumerate(pending, 1):
        plain = trust.sign(store, dataclasses.replace(manifest, txn=None, mac=None))
        final.append(plain)
        try:
            if _still_ours(store, manifest):  # (not replaced since by a later commit)
                _put(store, plain)
        except OSError as exc:
            complete = False
            logger.warning(
                "the transaction %s committed, but rewriting the manifest of %s failed (%s); "
                "`notebook-flow gc` finishes it",
                txn,
                manifest.key,
                exc,
            )
        crash_point(f"group_final_{n}")
    return final, complete


def recover(store: ResultStore, older_than: float) -> list[str]:
    """Finish the group commits of dead committers (older than ``older_than`` seconds):
    roll a recorded group forward, take back manifests whose group has no record. Returns
    the relative paths removed."""
    cutoff = time.time() - older_than
    removed: list[str] = []
    for rel, mtime in files.list_files(store, RECORDS):
        match = _RECORD_REL_RE.match(rel)
        if match is None or (mtime is not None and mtime > cutoff):
            continue
        txn = match.group(1)
        keys = read_record(store, txn)
        if keys is None:  # not ours to finish (another key's), or damaged: left alone
            continue
        complete = True
        for key in keys:
            current = store._read_previous(key)
            if current is not None and current.txn == txn and trust.verified(store, current):
                complete = _roll_forward(store, txn, [current])[1] and complete
        with contextlib.suppress(OSError):
            if complete and files.remove(store, rel):
                removed.append(rel)
    mtimes = dict(files.list_files(store, "manifests"))
    for manifest in store.iter_manifests(verified=False):
        if manifest.txn is None:
            continue
        rel = store._manifest_rel(manifest.key)
        mtime = mtimes.get(rel)
        if mtime is not None and mtime > cutoff:
            continue
        if _record_exists(store, manifest.txn):  # committed, or a record not ours
            continue
        with contextlib.suppress(OSError):
            if _still_ours(store, manifest) and files.remove(store, rel):
                removed.append(rel)
                if manifest.payload and files.remove(store, manifest.payload):
                    removed.append(manifest.payload)
    return removed


def _record_exists(store: ResultStore, txn: str) -> bool:
    try:
        files.read_small(store, record_rel(txn))
    except FileNotFoundError:
        return False
    except OSError:  # unreadable: assume it is there (never roll back on a doubt)
        return True
    return True
