"""``notebook-flow export`` / ``import``: copy entries between stores, verified, re-signed.

A colleague's results become hits here: the manifests and payloads of one task (or all)
are copied from a *source* store to a *destination* store (a local folder, a bucket...),
with their provenance, expiry, components and run id unchanged.

**Trust.** The source is untrusted input like any store. An entry is copied only if its
manifest's ``mac`` verifies under the **source's** signing key and its payload streams
through with the recorded size, xxh3-128 checksum and HMAC; it is then **re-signed with the
destination's key** (a new payload HMAC and ``mac``), so readers of the destination verify
it with the key they already trust. Anything that fails is refused (reported, nothing of it
written: the payload is verified while it is copied, and the copy is abandoned before its
name becomes visible). The destination side is checked after the commit: the manifest is
read back and must verify under the destination's key. When both stores use one key (a team
sharing a key, or one person moving results) the verified signature is kept as it is.

The keys: the source's is the default key (``$NOTEBOOK_FLOW_SIGNING_KEY`` or the key file),
unless given (``--from-key-file`` / ``--to-key-file`` name a file holding a key, never a
key on the command line); to import a colleague's export, have them export with a key you
both hold (``notebook-flow key show``), or pass theirs as ``--from-key-file``.

An entry the destination already holds with the same checksum is skipped; one with
another result for the same key is kept unless ``replace``. Expired entries are not
copied. Several entries are copied at once (``workers``); a local payload is read in
8 MiB chunks, a remote one fetched in one GET, and an object-store destination takes a
payload in one PUT (so it appears whole): such a payload is held in memory once.

>>> import tempfile
>>> from notebook_flow.storage import ResultStore
>>> mine, team = ResultStore(tempfile.mkdtemp()), ResultStore(tempfile.mkdtemp())  # or s3://…
>>> _ = mine.commit("0" * 32, [1, 2, 3], task="load", components={}, run_id="r",
...                 duration=0.1, expires_at=None)
>>> report = transfer(mine, team, task="load", index=False)
>>> len(report.copied), team.load(team.lookup("0" * 32))
(1, [1, 2, 3])
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import xxhash

from notebook_flow import _localfs
from notebook_flow.metadata import CacheEntry
from notebook_flow.serializers import new_signer
from notebook_flow.storage import Manifest, behind, files, trust

from .check import _manifest_rels, read_payload_chunks
from .progress import Progress

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["TransferReport", "transfer"]

logger = logging.getLogger("notebook_flow")

WORKERS = 4


class _Refused(Exception):
    """An entry of the source failed verification: it is not copied."""


@dataclasses.dataclass
class TransferReport:
    """What ``transfer`` copied, skipped (and why) and refused (and why)."""

    copied: list[str] = dataclasses.field(default_factory=list)  # keys
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (key, why)
    refused: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (key, why)
    bytes: int = 0  # payload bytes copied

    @property
    def ok(self) -> bool:
        return not self.refused


def _matches(manifest: Manifest, task: str | None) -> bool:
    """``task`` is a task's identity (``module:qualname``), its name, or a cell's name."""
    if task is None:
        return True
    return task in (manifest.task, manifest.task.split(":", 1)[-1])


def _read_manifest(store: ResultStore, rel: str) -> Manifest | None:
    """The manifest at ``rel`` if it parses (not yet authenticated), else None."""
    try:
        data = files.read_small(store, rel)
    except OSError:
        return None
    with contextlib.suppress(ValueError, TypeError):
        return Manifest.from_json(data, key=rel[-37:-5])
    return None


def _copy_payload(
    source: ResultStore, dest: ResultStore, m: Manifest
) -> tuple[str, str | None, str, str | None]:
    """Copy ``m``'s payload, verifying it on the way: (new payload, new inline, signature,
    seal). Raises ``_Refused`` (nothing left behind) when it does not verify."""
    same_key = hmac.compare_digest(source._signing_key(), dest._signing_key())
    theirs = new_signer(source._signing_key(), m.key, m.serializer)
    ours = None if same_key else new_signer(dest._signing_key(), m.key, m.serializer)
    hasher = xxhash.xxh3_128()

    def verify(size: int) -> str:
        if size != m.size:
            raise _Refused(f"its payload has {size} bytes, the manifest says {m.size}")
        if hasher.hexdigest() != m.checksum:
            raise _Refused("its payload does not match its checksum")
        if m.signature is None or not hmac.compare_digest(theirs.hexdigest(), m.signature):
            raise _Refused("its payload's HMAC does not match the source's key")
        return m.signature if ours is None else ours.hexdigest()

    def feed(chunk: memoryview) -> None:
        hasher.update(chunk)
        theirs.update(chunk)
        if ours is not None:
            ours.update(chunk)

    if m.inline is not None:
        try:
            data = memoryview(base64.b64decode(m.inline, validate=True))
        except ValueError:
            raise _Refused("its inline payload is not valid base64") from None
        feed(data)
        return "", m.inline, verify(data.nbytes), None
    ext = m.payload.rsplit(".", 1)[-1]
    rel = f"results/{m.key[:2]}/{m.key}-{secrets.token_hex(8)}.{ext}"
    signature = ""

    def fill(write: Callable[[memoryview], None]) -> None:
        nonlocal signature
        size = 0
        try:
            for chunk in read_payload_chunks(source, m.payload, whole=True):
                size += chunk.nbytes
                if size > m.size:
                    raise _Refused(f"its payload is longer than the {m.size} bytes recorded")
                feed(chunk)
                write(chunk)
        except FileNotFoundError:
            raise _Refused(f"its payload {m.payload} is missing") from None
        signature = verify(size)  # raising here abandons the write: nothing appears

    try:
        files.write_atomic(dest, rel, fill)
    except _Refused:
        raise
    except BaseException:
        files.remove_quietly(dest, rel)
        raise
    seal = None
    if dest.is_local:  # hashed as written, as a commit does: the next load need not re-hash
        with contextlib.suppress(OSError):
            st = os.stat(dest._path(rel))
            _localfs.remember_verified(_localfs.file_identity(st), m.checksum)
            seal = _localfs.seal_of(st)
    return rel, None, signature, seal


def _copy_one(
    source: ResultStore, dest: ResultStore, rel: str, task: str | None, replace: bool
) -> tuple[str, str, str, Manifest | None]:
    """Copy one entry: (key, outcome: copied / skipped / refused / other, why, manifest)."""
    key = rel[-37:-5]
    m = _read_manifest(source, rel)
    if m is None:
        return key, "refused", "its manifest is unreadable or invalid", None
    if not _matches(m, task):
        return key, "other", "", None
    if not trust.verified(source, m):
        why = "unsigned" if m.mac is None else "its mac does not verify under the source's key"
        return key, "refused", f"{why} (forged, or signed with another key)", None
    if m.expired():
        return key, "skipped", "expired", None
    there = _read_manifest(dest, rel)
    if there is not None and trust.verified(dest, there) and not there.expired():
        if there.checksum == m.checksum:
            return key, "skipped", "already there", None
        if not replace:
            return key, "skipped", "the destination holds another result for this key", None
    try:
        payload, inline, signature, seal = _copy_payload(source, dest, m)
    except _Refused as exc:
        return key, "refused", str(exc), None
    copied = dataclasses.replace(
        m, payload=payload, inline=inline, signature=signature, seal=seal, mac=None
    )
    dest.publish(trust.sign(dest, copied))
    back = _read_manifest(dest, rel)  # the destination side: read back, verify
    if back is None or not trust.verified(dest, back) or back.checksum != m.checksum:
        return key, "refused", "the copy did not verify in the destination", None
    return key, "copied", "", back


def transfer(
    source: ResultStore,
    dest: ResultStore,
    *,
    task: str | None = None,
    replace: bool = False,
    progress: bool = False,
    workers: int = WORKERS,
    index: bool = True,
) -> TransferReport:
    """Copy the entries of ``task`` (all when None) from ``source`` to ``dest``.

    Verified with the source's key, re-signed with the destination's (see the module
    docstring). With ``index``, the destination's metadata index learns the new entries.
    """
    if source.url == dest.url and source._storage_options == dest._storage_options:
        from notebook_flow.errors import ConfigurationError

        raise ConfigurationError(f"source and destination are the same store ({source.url})")
    behind.flush(source.url)
    rels = _manifest_rels(source)
    report = TransferReport()
    bar = Progress("copy", len(rels), enabled=progress)
    entries: list[CacheEntry] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for key, outcome, why, m in pool.map(
            lambda r: _copy_one(source, dest, r, task, replace), rels
        ):
            bar.advance(1, m.size if m is not None else 0)
            if outcome == "copied" and m is not None:
                report.copied.append(key)
                report.bytes += m.size
                entries.append(CacheEntry.from_manifest(m, task=m.task.split(":", 1)[-1]))
            elif outcome == "skipped":
                report.skipped.append((key, why))
            elif outcome == "refused":
                report.refused.append((key, why))
    bar.close()
    if index and entries:
        from notebook_flow.config import get_metadata

        try:
            meta = get_metadata(dest)
            for entry in entries:
                meta.record_cache_entry(entry)
            meta.flush(timeout=60)
        except Exception as exc:  # the entries are committed; only the index lags
            logger.warning("the index of %s was not updated (%s); run rebuild_index()", dest, exc)
    return report
