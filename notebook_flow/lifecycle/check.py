"""``notebook-flow check [--fix]``: verify every entry of a store, quarantine the bad ones.

For each manifest (several at once, each payload streamed in 8 MiB chunks, so memory stays
bounded whatever the payloads' sizes):

1. it must parse and validate (:meth:`Manifest.from_json`) and name a known serializer;
2. its ``mac`` must verify under this store's signing key (a forged manifest, or one
   signed with another key, fails here; a legacy unsigned entry of a private local store
   is re-signed by ``--fix``, as a lookup would);
3. its payload (a file, or the inline bytes) must have the recorded size, xxh3-128
   checksum and HMAC ``signature``.

Then leftovers that no manifest names (temp files of interrupted writes, payloads of
commits that never reached their manifest), older than ``older_than`` seconds, are
orphans. A manifest written by a *newer* notebook_flow is skipped, not judged.

Without ``fix`` nothing is changed: the report says what is wrong. With ``fix`` each bad
entry is moved into ``quarantine/<UTC time>-<key>-<random>/`` (its manifest as
``manifest.json``, its payload file under its own name, and ``reason.txt``), orphans are
removed, and the metadata index is rebuilt from the manifests that remain. An entry is
quarantined only if its manifest still holds the bytes that were checked: a result
committed meanwhile is left alone. Quarantining removes an entry (the next call computes
it again); it never makes a reader load anything.

>>> import tempfile
>>> from notebook_flow.storage import ResultStore
>>> report = check_store(ResultStore(tempfile.mkdtemp()))
>>> report.ok, report.entries
(True, 0)
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, BinaryIO, Literal

import xxhash

from notebook_flow import _json, _localfs
from notebook_flow.errors import ConfigurationError
from notebook_flow.serializers import get_serializer, new_signer
from notebook_flow.storage import Manifest, behind, files, trust
from notebook_flow.storage.manifest import _PAYLOAD_RE, READABLE_VERSIONS, _is_manifest_rel

from .progress import Progress

if TYPE_CHECKING:
    import hmac

    from notebook_flow.storage import ResultStore

__all__ = ["CheckReport", "Problem", "check_store", "read_payload_chunks"]

logger = logging.getLogger("notebook_flow")

Kind = Literal[
    "unreadable", "invalid", "forged", "unsigned", "missing", "truncated", "corrupt",
    "signature", "orphan",
]  # fmt: skip
#: Folder (below the store's root) that bad entries are moved into.
QUARANTINE = "quarantine"
#: Manifests checked at once (each holds at most one payload chunk in memory).
WORKERS = 4
_WINDOW = 256  # manifests submitted at a time: the list of futures stays bounded too


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong in a store: which file, what kind of problem, why (for people)."""

    rel: str
    kind: Kind
    reason: str
    key: str | None = None
    task: str | None = None
    payload: str | None = None  # the payload file the bad manifest names, if any


@dataclasses.dataclass
class CheckReport:
    """What ``check_store`` found and did."""

    entries: int = 0  # manifests looked at
    good: int = 0
    bytes: int = 0  # payload bytes verified
    problems: list[Problem] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # newer formats
    resigned: list[str] = dataclasses.field(default_factory=list)
    quarantined: list[str] = dataclasses.field(default_factory=list)  # quarantine folders
    removed_orphans: list[str] = dataclasses.field(default_factory=list)
    indexed: int | None = None  # entries in the rebuilt index (with fix)

    @property
    def ok(self) -> bool:
        """True when nothing was wrong (even if ``fix`` repaired it, this stays False)."""
        return not self.problems


@dataclasses.dataclass
class _Verdict:
    rel: str
    problem: Problem | None = None
    data: bytes | None = None  # the manifest as checked (kept only for problems)
    payload: str | None = None  # the payload it names (for the orphan walk)
    size: int = 0
    newer: bool = False
    resigned: bool = False
    gone: bool = False  # deleted since the listing


def read_payload_chunks(
    store: ResultStore, rel: str, *, whole: bool = False
) -> Iterator[memoryview]:
    """The bytes of the payload file ``rel``, chunk by chunk (``_localfs.CHUNK``).

    Local files are opened as a reader opens them (regular files only, no symlink) and
    read a chunk at a time, remote ones by ranged reads; with ``whole`` a remote file is
    fetched in one GET instead (s3fs splits a big object into parallel ranges itself:
    several times faster, but the payload is in memory at once, as on an object store's
    commit path). Raises ``FileNotFoundError`` for a missing file.
    """
    f: BinaryIO
    if store.is_local:
        f = os.fdopen(files.open_local(store, rel), "rb")
    elif whole:
        view = memoryview(files.read_bytes(store, rel))
        for start in range(0, view.nbytes, _localfs.CHUNK):
            yield view[start : start + _localfs.CHUNK]
        return
    else:
        f = store.fs.open(store._path(rel), "rb", block_size=_localfs.CHUNK, cache_type="none")
    with f:
        while True:
            chunk = f.read(_localfs.CHUNK)
            if not chunk:
                return
            yield memoryview(chunk)


def _payload_of(data: bytes) -> str | None:
    """The payload file a (possibly invalid) manifest names, if it looks like one."""
    try:
        raw = _json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    rel = raw.get("payload") if isinstance(raw, dict) else None
    return rel if isinstance(rel, str) and _PAYLOAD_RE.match(rel) else None


def _verify_payload(store: ResultStore, m: Manifest, signer: hmac.HMAC) -> tuple[Kind, str] | None:
    """Stream the payload through size, xxh3-128 and HMAC; None when all three match."""
    hasher = xxhash.xxh3_128()
    size = 0
    if m.inline is not None:
        try:
            chunks: Iterator[memoryview] = iter(
                [memoryview(base64.b64decode(m.inline, validate=True))]
            )
        except ValueError:
            return "corrupt", "its inline payload is not valid base64"
    else:
        chunks = read_payload_chunks(store, m.payload)
    try:
        for chunk in chunks:
            size += chunk.nbytes
            if size > m.size:
                return "corrupt", f"its payload is longer than the {m.size} bytes recorded"
            hasher.update(chunk)
            signer.update(chunk)
    except FileNotFoundError:
        return "missing", f"its payload {m.payload} is missing"
    except OSError as exc:
        return "unreadable", f"its payload {m.payload} cannot be read: {exc}"
    if size < m.size:
        return "truncated", f"its payload has {size} bytes, the manifest says {m.size}"
    if hasher.hexdigest() != m.checksum:
        return "corrupt", "its payload does not match its checksum (altered or damaged)"
    if m.signature is None or signer.hexdigest() != m.signature:
        return "signature", "its payload's HMAC does not match (altered, or another key)"
    return None


def _check_one(store: ResultStore, rel: str, fix: bool) -> _Verdict:
    key = rel[-37:-5]

    def bad(kind: Kind, reason: str, data: bytes, m: Manifest | None = None) -> _Verdict:
        payload = m.payload or None if m is not None else _payload_of(data)
        task = m.task if m is not None else None
        problem = Problem(rel, kind, reason, key, task, payload)
        return _Verdict(rel, problem, data, payload)

    try:
        data = files.read_small(store, rel)
    except files.NotRegularFile as exc:
        return _Verdict(rel, Problem(rel, "unreadable", f"not read: {exc}", key))
    except FileNotFoundError:
        return _Verdict(rel, gone=True)  # deleted since listed: nothing to judge
    except OSError as exc:
        return _Verdict(rel, Problem(rel, "unreadable", f"cannot be read: {exc}", key))
    try:
        m = Manifest.from_json(data, key=key)
    except (ValueError, TypeError) as exc:
        if "unknown format_version" in str(exc) and _newer(data):
            return _Verdict(rel, payload=_payload_of(data), newer=True)
        return bad("invalid", f"invalid manifest: {exc}", data)
    try:
        get_serializer(m.serializer)
    except ConfigurationError:
        return bad("invalid", f"names an unknown serializer {m.serializer!r}", data, m)
    resigned = False
    if not trust.verified(store, m):
        if m.mac is not None:
            reason = "its mac does not verify under this store's key (forged, or another key)"
            return bad("forged", reason, data, m)
        legacy = trust.legacy_trusted(store, rel, m)
        if not (fix and legacy):
            why = "unsigned (written before entries were signed)"
            if legacy:
                why += "; --fix re-signs it (this private store's lookups would too)"
            return bad("unsigned", why, data, m)
        signed = trust.resign(store, m, rel, data)
        if signed is None:
            return bad("unsigned", "unsigned, and its payload does not match", data, m)
        m, resigned = signed, True
    found = _verify_payload(store, m, new_signer(store._signing_key(), m.key, m.serializer))
    if found is not None:
        return bad(found[0], found[1], data, m)
    return _Verdict(rel, payload=m.payload or None, size=m.size, resigned=resigned)


def _newer(data: bytes) -> bool:
    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
        version = _json.loads(data).get("format_version")
        return type(version) is int and version > max(READABLE_VERSIONS)
    return False


def _quarantine(store: ResultStore, problem: Problem, data: bytes | None) -> str | None:
    """Move a bad entry into ``quarantine/``; its folder, or None if it changed meanwhile."""
    try:
        current = files.read_small(store, problem.rel)
    except FileNotFoundError:
        return None
    if data is not None and current != data:
        return None  # recommitted since it was checked: not ours to judge any more
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = f"{QUARANTINE}/{stamp}-{problem.key or 'unknown'}-{secrets.token_hex(3)}"
    reason = (
        f"{problem.kind}: {problem.reason}\nmanifest: {problem.rel}\n"
        f"payload: {problem.payload or '(inline or none)'}\ntask: {problem.task}\n"
        f"quarantined: {stamp} by notebook-flow check --fix\n"
    ).encode()
    for name, body in (("reason.txt", reason), ("manifest.json", current)):
        files.write_atomic(store, f"{folder}/{name}", _writer(body))
    files.remove(store, problem.rel)  # the entry is gone for readers from here on
    if problem.payload:
        target = f"{folder}/{problem.payload.rsplit('/', 1)[-1]}"
        with contextlib.suppress(FileNotFoundError):
            _move(store, problem.payload, target)
    return folder


def _writer(body: bytes) -> Callable[[Callable[[memoryview], None]], None]:
    return lambda write: write(memoryview(body))


def _move(store: ResultStore, rel: str, target: str) -> None:
    if store.is_local:
        files.check_local_folder(store, target)
        with os.fdopen(files.open_local(store, rel), "rb"):  # a regular file, no symlink
            os.rename(store._path(rel), store._path(target))
    else:
        store.fs.mv(store._path(rel), store._path(target))


def _manifest_rels(store: ResultStore) -> list[str]:
    return sorted(r for r, _ in files.list_files(store, "manifests") if _is_manifest_rel(r))


def check_store(
    store: ResultStore,
    *,
    fix: bool = False,
    older_than: float = 3600.0,
    progress: bool = False,
    workers: int = WORKERS,
) -> CheckReport:
    """Verify every entry of ``store``; with ``fix`` quarantine bad ones, remove orphans
    older than ``older_than`` seconds and rebuild the index. See the module docstring."""
    behind.flush(store.url)
    rels = _manifest_rels(store)
    report = CheckReport(entries=len(rels))
    bar = Progress("check", len(rels), enabled=progress)
    referenced: set[str] = set()
    verdicts: list[_Verdict] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(rels), _WINDOW):
            window = rels[start : start + _WINDOW]
            for v in pool.map(lambda r: _check_one(store, r, fix), window):
                bar.advance(1, v.size)
                report.bytes += v.size
                if v.problem is not None:
                    verdicts.append(v)
                    report.problems.append(v.problem)
                    continue
                if v.payload:
                    referenced.add(v.payload)
                if v.newer:
                    report.skipped.append(v.rel)
                elif not v.gone:
                    report.good += 1
                    if v.resigned:
                        report.resigned.append(v.rel)
    bar.close()
    # A bad entry's payload is not an orphan: it goes to quarantine with its manifest.
    referenced.update(v.problem.payload for v in verdicts if v.problem and v.problem.payload)
    orphans = store.find_orphans(older_than, referenced=referenced)
    report.problems.extend(Problem(rel, "orphan", "no manifest names it") for rel in orphans)
    if not fix:
        return report
    for v in verdicts:
        assert v.problem is not None
        try:
            folder = _quarantine(store, v.problem, v.data)
        except OSError as exc:
            logger.warning("could not quarantine %s: %s", v.problem.rel, exc)
            continue
        if folder is not None:
            report.quarantined.append(folder)
    for rel in orphans:
        with contextlib.suppress(OSError):
            if files.remove(store, rel):
                report.removed_orphans.append(rel)
    from notebook_flow.api import rebuild_index

    report.indexed = rebuild_index(store=store)
    return report
