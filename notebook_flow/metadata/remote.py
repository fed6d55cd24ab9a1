"""Run events made in other processes (Dask workers): how they travel and how they land.

A Dask worker never opens DuckDB (DESIGN.md §7). Its run, cache-entry and lock events go
home two ways, both read by :func:`ingest`, which is idempotent, so an event that arrives
both ways is written once:

* **with the result** — the submitting process queues them into its own recorder as if
  the run had been made here (``MetadataStore.record_*``; no DuckDB on the caller's path);
* **through the store** — each worker also spools them, every second or so, to one small
  file per (worker, client session) under ``<store>/events/<session>/``. When the client
  died before its results came back, a later client (``DaskRunner`` start, ``resume()``)
  or ``notebook_flow.rebuild_index()`` ingests them: the runs a dead client left PENDING
  become COMPLETED / CACHED / FAILED instead of CRASHED.

An event file is untrusted input, like everything read from a store: it is JSON (never
unpickled), every field is type-checked, and with a signing key it carries an HMAC over
its bytes — a file with a missing or wrong signature is skipped with a warning. Only the
index is at stake (history rows), never a cached value.

>>> blob = encode([RunEvent("r1", "t", "m:t", None, RunState.COMPLETED, 1.0)], None)
>>> [e.state for e in decode(blob, None)]
[<RunState.COMPLETED: 'COMPLETED'>]
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from notebook_flow import _json
from notebook_flow.metadata.records import CacheEntry, LockEvent, RunEvent
from notebook_flow.states import RunState

if TYPE_CHECKING:
    import duckdb

    from notebook_flow.metadata.store import MetadataStore
    from notebook_flow.storage import ResultStore

__all__ = ["EVENTS_DIR", "decode", "encode", "ingest", "ingest_store_events", "session_dir"]

logger = logging.getLogger("notebook_flow")

#: The store folder of spooled worker events: ``events/<session>/<file>.json``.
EVENTS_DIR = "events"
#: Event files of other sessions are removed once ingested and this old (seconds): other
#: hosts' clients, with DuckDB files of their own, may still need them until then.
RETENTION = 7 * 86400.0

_FORMAT = "notebook_flow-events-v1"
_SIGN_DOMAIN = b"notebook_flow-events-v1\0"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}$")
_MAX_TEXT = 1 << 20  # longest string kept from a file (a traceback), in characters

Op = RunEvent | CacheEntry | LockEvent


def session_dir(session: str) -> str:
    """The store folder (relative) of one client session's spooled events."""
    if not _NAME_RE.match(session):
        raise ValueError(f"invalid session name {session!r}")
    return f"{EVENTS_DIR}/{session}"


# --------------------------------------------------------------------------- the file format


def _as_dict(op: Op) -> dict[str, Any]:
    if isinstance(op, RunEvent):
        out = {f.name: getattr(op, f.name) for f in dataclasses.fields(op)}
        out["state"] = op.state.value
        out["tags"] = list(op.tags)
        return {"run": out}
    if isinstance(op, CacheEntry):
        return {"entry": dataclasses.asdict(op)}
    return {"lock": dataclasses.asdict(op)}


def _sign(body: bytes, key: bytes) -> str:
    return hmac.new(key, _SIGN_DOMAIN + body, hashlib.sha256).hexdigest()


def encode(ops: Iterable[Op], signing_key: bytes | None) -> bytes:
    """One event file: a JSON header line (format, signature), then the events' JSON."""
    body = json.dumps([_as_dict(op) for op in ops], separators=(",", ":")).encode()
    header = {"format": _FORMAT, "signature": _sign(body, signing_key) if signing_key else None}
    return json.dumps(header).encode() + b"\n" + body


def decode(data: bytes, signing_key: bytes | None) -> list[Op]:
    """The events of one file; ``ValueError`` naming the problem for a file that is not a
    valid (and, with a key, correctly signed) event file. Invalid single events are
    skipped with a log line."""
    head, sep, body = data.partition(b"\n")
    try:
        header = _json.loads(head)
    except ValueError:
        raise ValueError("not an event file (bad header)") from None
    if not sep or not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise ValueError("not an event file of this version")
    if signing_key is not None:
        signature = header.get("signature")
        if not isinstance(signature, str) or not hmac.compare_digest(
            signature, _sign(body, signing_key)
        ):
            raise ValueError("unsigned, or signed with another key")
    items = _json.loads(body)
    if not isinstance(items, list):
        raise ValueError("the body is not a list of events")
    out: list[Op] = []
    for item in items:
        try:
            out.append(_from_dict(item))
        except (TypeError, ValueError, KeyError) as exc:
            logger.info("skipped an invalid remote event (%s)", exc)
    return out


def _text(value: Any, name: str, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string")
    return value[:_MAX_TEXT]


def _number(value: Any, name: str, kind: type = float, *, optional: bool = True) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number")
    return kind(value)


def _from_dict(item: Any) -> Op:
    if not isinstance(item, dict) or len(item) != 1:
        raise TypeError("an event is an object with one member")
    kind, raw = next(iter(item.items()))
    if not isinstance(raw, dict):
        raise TypeError("an event's fields are an object")
    if kind == "run":
        tags = raw.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise TypeError("tags must be a list of strings")
        return RunEvent(
            run_id=_text(raw["run_id"], "run_id", optional=False),  # type: ignore[arg-type]
            task=_text(raw["task"], "task", optional=False),  # type: ignore[arg-type]
            task_identity=_text(raw["task_identity"], "task_identity", optional=False),  # type: ignore[arg-type]
            key=_text(raw.get("key"), "key"),
            state=RunState(raw["state"]),
            at=_number(raw["at"], "at", optional=False),
            attempt=_number(raw.get("attempt", 1), "attempt", int, optional=False),
            duration=_number(raw.get("duration"), "duration"),
            saved=_number(raw.get("saved"), "saved"),
            error=_text(raw.get("error"), "error"),
            traceback=_text(raw.get("traceback"), "traceback"),
            explain=_text(raw.get("explain"), "explain"),
            size=_number(raw.get("size"), "size", int),
            inputs=_text(raw.get("inputs"), "inputs"),
            notebook=_text(raw.get("notebook"), "notebook"),
            cell=_text(raw.get("cell"), "cell"),
            tags=tuple(tags),
            host=_text(raw.get("host"), "host", optional=False),  # type: ignore[arg-type]
            pid=_number(raw.get("pid"), "pid", int, optional=False),
            pid_start=_number(raw.get("pid_start"), "pid_start", int),
            kernel=_text(raw.get("kernel"), "kernel"),
        )
    if kind == "entry":
        components = raw.get("components") or {}
        if not isinstance(components, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in components.items()
        ):
            raise TypeError("components must map strings to strings")
        origin = raw.get("provenance")
        if origin is not None and (
            not isinstance(origin, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in origin.items())
        ):
            raise TypeError("provenance must map strings to strings")
        return CacheEntry(
            key=_text(raw["key"], "key", optional=False),  # type: ignore[arg-type]
            task=_text(raw["task"], "task", optional=False),  # type: ignore[arg-type]
            task_identity=_text(raw["task_identity"], "task_identity", optional=False),  # type: ignore[arg-type]
            size=_number(raw["size"], "size", int, optional=False),
            created_at=_number(raw["created_at"], "created_at", optional=False),
            expires_at=_number(raw.get("expires_at"), "expires_at"),
            duration=_number(raw["duration"], "duration", optional=False),
            serializer=_text(raw["serializer"], "serializer", optional=False),  # type: ignore[arg-type]
            payload=_text(raw["payload"], "payload", optional=False),  # type: ignore[arg-type]
            components=dict(components),
            run_id=_text(raw.get("run_id"), "run_id"),
            provenance=None if origin is None else dict(origin),
        )
    if kind == "lock":
        return LockEvent(
            key=_text(raw["key"], "key", optional=False),  # type: ignore[arg-type]
            holder=_text(raw["holder"], "holder", optional=False),  # type: ignore[arg-type]
            event=_text(raw["event"], "event", optional=False),  # type: ignore[arg-type]
            at=_number(raw["at"], "at", optional=False),
            manager=_text(raw["manager"], "manager", optional=False),  # type: ignore[arg-type]
            lease_expires=_number(raw.get("lease_expires"), "lease_expires"),
            waited=_number(raw.get("waited"), "waited"),
            task=_text(raw.get("task"), "task"),
        )
    raise ValueError(f"unknown event kind {kind!r}")


# --------------------------------------------------------------------------- ingestion


def ingest(meta: MetadataStore, ops: Sequence[Op]) -> int:
    """Write events made elsewhere into ``meta`` in one transaction, skipping any already
    there (same run, state, time and attempt); returns how many operations were given.

    Synchronous (it waits for the metadata lock): for batches read from the store. Events
    that came back with a result go through the recorder's queue instead.
    """
    from notebook_flow.metadata.batch import _apply_cache_ops, _apply_lock_events, _write_run_events

    runs = [op for op in ops if isinstance(op, RunEvent)]
    entries = [op for op in ops if isinstance(op, CacheEntry)]
    locks = [op for op in ops if isinstance(op, LockEvent)]
    if not ops:
        return 0

    def body(con: duckdb.DuckDBPyConnection) -> None:
        if runs:
            _write_run_events(con, runs, dedupe=True)
        if entries:
            _apply_cache_ops(con, list(entries))
        if locks:
            _apply_lock_events(con, locks, True)

    meta._write_now(body)
    return len(ops)


def ingest_store_events(
    store: ResultStore,
    meta: MetadataStore,
    *,
    session: str | None = None,
    remove: bool = False,
) -> int:
    """Ingest the spooled event files in ``store`` (of one ``session``, or all); returns
    the number of events read.

    ``remove`` deletes the files read (a session cleaning up after itself). Otherwise only
    files older than :data:`RETENTION` are removed once ingested. Files that are not valid
    event files are skipped with a warning and left in place. Cache entries in the files
    are not applied: the index of results is rebuilt from the manifests.
    """
    from notebook_flow.storage import files

    top = session_dir(session) if session is not None else EVENTS_DIR
    try:
        listed = files.list_files(store, top)
    except OSError as exc:
        logger.warning("cannot list the remote events in %s: %s", store.url, exc)
        return 0
    if not listed:
        return 0
    key = store._signing_key() if store.signing else None
    ops: list[Op] = []
    done: list[str] = []
    cutoff = time.time() - RETENTION
    for rel, mtime in sorted(listed):
        if not rel.endswith(".json"):
            continue
        try:
            data = files.read_bytes(store, rel)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("cannot read remote events %s in %s: %s", rel, store.url, exc)
            continue
        try:
            ops.extend(decode(data, key))
        except ValueError as exc:
            logger.warning("skipped remote events %s in %s: %s", rel, store.url, exc)
            continue
        if remove or (mtime is not None and mtime < cutoff):
            done.append(rel)
    # Cache entries come from the manifests (the store is the truth: an entry spooled
    # before a result was deleted must not come back), so rebuild_index() indexes them.
    ops = [op for op in ops if not isinstance(op, CacheEntry)]
    if ops:
        ingest(meta, ops)
    for rel in done:
        files.remove_quietly(store, rel)
    return len(ops)
