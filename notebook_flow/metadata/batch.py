"""What one recorder transaction writes: run events, cache ops, lock events, crash marks.

Every function here runs inside an open write transaction (``_Database.write``) and is
idempotent, so a batch whose commit is in doubt can be written again (``dedupe``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from notebook_flow import _identity
from notebook_flow.metadata.records import (
    CacheEntry,
    LockEvent,
    RunEvent,
    _Op,
    _Remove,
    storable,
)
from notebook_flow.metadata.schema import (
    _BATCH_COLUMNS,
    _CACHE_ENTRIES,
    _FOLD_RUNS,
    _LOCK_EVENTS,
    _LOCKS,
    _NON_FINAL_SQL,
    _PROCESSES,
    _RUN_EVENTS,
    _batch_rows,
    _Columns,
    _lit,
    _names,
    _table,
    _values,
)

if TYPE_CHECKING:
    import duckdb

    from notebook_flow.metadata.recorder import _Recorder

logger = logging.getLogger("notebook_flow")


def _write_batch(
    con: duckdb.DuckDBPyConnection, rec: _Recorder, batch: list[_Op], dedupe: bool
) -> None:
    """Write one batch inside an open transaction; order matters only among cache ops.

    Every operation is made storable first (``records.storable``); one that cannot be is
    dropped alone, with a warning, and the rest of the batch is written.
    """
    events: list[RunEvent] = []
    lock_events: list[LockEvent] = []
    cache_ops: list[CacheEntry | _Remove] = []
    for raw in batch:
        try:
            op = storable(raw)
        except Exception as exc:
            drop_one(raw, exc, rec.db.path)
            continue
        if type(op) is RunEvent:
            events.append(op)
        elif isinstance(op, LockEvent):
            lock_events.append(op)
        elif isinstance(op, (CacheEntry, _Remove)):
            cache_ops.append(op)
        else:
            count = _mark_crashed(con, rec.stale_after)
            if count:
                logger.info("Marked %d runs of dead processes as crashed", count)
    if events:
        _write_run_events(con, events, dedupe=dedupe)
    _apply_cache_ops(con, cache_ops)
    if lock_events:
        _apply_lock_events(con, lock_events, dedupe)
    me = _identity.process()
    row = (f"{me.host}:{me.pid}:{me.start_time or 0}", me.host, me.pid, me.start_time,
           me.kernel, rec.started_at, time.time())  # fmt: skip
    con.execute(
        f"INSERT INTO processes ({_names(_PROCESSES)}) VALUES ({_values(row)}) "
        "ON CONFLICT (process_id) "
        "DO UPDATE SET last_seen = greatest(processes.last_seen, excluded.last_seen)"
    )


def drop_one(op: object, exc: BaseException, path: str) -> None:
    """Report one operation that cannot be stored (the others of its batch are kept)."""
    what = getattr(op, "task", None) or getattr(op, "key", None) or type(op).__name__
    logger.warning(
        "Dropped one metadata record (%s of %r) that cannot be stored in %s: %s: %s",
        type(op).__name__,
        what,
        path,
        type(exc).__name__,
        exc,
    )


def _write_run_events(
    con: duckdb.DuckDBPyConnection, events: list[RunEvent], *, dedupe: bool
) -> None:
    """Append the events to run_events and fold them into runs (see _FOLD_RUNS)."""
    with _table(con, "_batch", _BATCH_COLUMNS, _batch_rows(events)):
        key = ("run_id", "state", "time", "attempt")
        _insert_from(con, "_batch", "run_events", _RUN_EVENTS, key, dedupe=dedupe)
        con.execute(_FOLD_RUNS)


def _append(
    con: duckdb.DuckDBPyConnection,
    table: str,
    columns: _Columns,
    rows: list[tuple[Any, ...]],
    natural_key: tuple[str, ...],
    *,
    dedupe: bool,
) -> None:
    """Append rows (tuples in ``columns`` order); when a retry may repeat an earlier commit,
    skip rows already there."""
    with _table(con, "_new", columns, rows):
        _insert_from(con, "_new", table, columns, natural_key, dedupe=dedupe)


def _insert_from(
    con: duckdb.DuckDBPyConnection,
    source: str,
    table: str,
    columns: _Columns,
    natural_key: tuple[str, ...],
    *,
    dedupe: bool,
) -> None:
    """INSERT the rows of a registered ``source``; with ``dedupe`` (a retry may repeat an
    earlier commit) only those whose ``natural_key`` is not in ``table`` yet."""
    where = ""
    if dedupe:
        match = " AND ".join(f"t.{c} IS NOT DISTINCT FROM b.{c}" for c in natural_key)
        where = f" WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {match})"
    names = _names(columns)
    con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {source} b{where}")


def _entry_row(e: CacheEntry) -> tuple[Any, ...]:
    """A cache_entries row, in _CACHE_ENTRIES order."""
    return (
        e.key, e.task, e.task_identity, e.size, e.created_at, e.expires_at, e.duration,
        e.serializer, e.payload, json.dumps(e.components, sort_keys=True), e.run_id,
        None if e.provenance is None else json.dumps(e.provenance, sort_keys=True),
    )  # fmt: skip


def _apply_cache_ops(con: duckdb.DuckDBPyConnection, ops: list[CacheEntry | _Remove]) -> None:
    pending: dict[str, CacheEntry] = {}

    def put() -> None:
        if pending:
            with _table(con, "_entries", _CACHE_ENTRIES, [_entry_row(e) for e in pending.values()]):
                con.execute(
                    f"INSERT OR REPLACE INTO cache_entries ({_names(_CACHE_ENTRIES)}) "
                    f"SELECT {_names(_CACHE_ENTRIES)} FROM _entries"
                )
            pending.clear()

    for op in ops:
        if isinstance(op, CacheEntry):
            pending[op.key] = op
            continue
        put()  # a removal applies to what was recorded before it
        if op.keys is not None:
            with _table(con, "_keys", (("key", "VARCHAR"),), [(k,) for k in op.keys]):
                con.execute("DELETE FROM cache_entries WHERE key IN (SELECT key FROM _keys)")
        elif op.task is not None:
            task = _lit(op.task)
            con.execute(f"DELETE FROM cache_entries WHERE task = {task} OR task_identity = {task}")
        else:
            con.execute("DELETE FROM cache_entries")
    put()


def _apply_lock_events(
    con: duckdb.DuckDBPyConnection, events: list[LockEvent], dedupe: bool
) -> None:
    rows = [
        (e.key, e.holder, e.event, e.at, e.manager, e.lease_expires, e.waited, e.task)
        for e in events
    ]  # LOCK_EVENTS order
    _append(
        con, "lock_events", _LOCK_EVENTS, rows, ("key", "holder", "event", "time"), dedupe=dedupe
    )
    # The current lock table keeps, per key, the holder of the latest acquisition or renewal
    # unless that holder gave the lock up since. Every release in the batch is applied, not
    # only the latest event: "A released, B acquired, B released" must remove A's row too.
    last: dict[str, LockEvent] = {}
    acquired: dict[tuple[str, str], float] = {}
    gone: list[LockEvent] = []
    for e in sorted(events, key=lambda e: e.at):
        if e.event in ("waited", "renew_failed"):
            continue
        if e.event in ("acquired", "recovered"):
            acquired[(e.key, e.holder)] = e.at
        if e.event in ("acquired", "recovered", "renewed"):
            last[e.key] = e
        else:  # released, lost, broken
            gone.append(e)
            held = last.get(e.key)
            if held is not None and (e.event == "broken" or held.holder == e.holder):
                del last[e.key]
    for e in gone:
        if e.event == "broken":
            con.execute(f"DELETE FROM locks WHERE key = {_lit(e.key)} AND updated <= {_lit(e.at)}")
        else:  # released, lost
            con.execute(
                f"DELETE FROM locks WHERE key = {_lit(e.key)} AND holder = {_lit(e.holder)} "
                f"AND updated <= {_lit(e.at)}"
            )
    for e in last.values():
        if e.event in ("acquired", "recovered", "renewed"):
            row = (e.key, e.holder, acquired.get((e.key, e.holder), e.at), e.lease_expires,
                   e.manager, e.task, e.at)  # fmt: skip
            con.execute(
                f"INSERT INTO locks ({_names(_LOCKS)}) VALUES ({_values(row)}) "
                "ON CONFLICT (key) DO UPDATE SET "
                "acquired = CASE WHEN excluded.holder = locks.holder "
                "THEN least(locks.acquired, excluded.acquired) ELSE excluded.acquired END, "
                "holder = excluded.holder, lease_expires = excluded.lease_expires, "
                "manager = excluded.manager, task = coalesce(excluded.task, locks.task), "
                "updated = excluded.updated WHERE excluded.updated >= locks.updated"
            )


def _process_dead(
    host: str | None, pid: int | None, start: int | None, seen: float, stale: float
) -> bool:
    if host == _identity.process().host:
        return pid is None or not _identity.pid_alive(int(pid), start)
    return seen < time.time() - stale  # another host: only its heartbeat tells


def _mark_crashed(con: duckdb.DuckDBPyConnection, stale_after: float) -> int:
    """Mark runs in flight whose process is dead as CRASHED; drop their stale lock records."""
    rows = con.execute(
        "SELECT r.run_id, r.state, r.host, r.pid, r.pid_start, "
        "greatest(r.updated, coalesce(p.last_seen, r.updated)) "
        "FROM runs r LEFT JOIN processes p ON p.host = r.host AND p.pid = r.pid "
        "AND p.pid_start IS NOT DISTINCT FROM r.pid_start "
        f"WHERE r.state IN {_NON_FINAL_SQL}"
    ).fetchall()
    now = time.time()
    dead = [
        (run_id, f"Process {pid} on {host} ended while the run was {state}")
        for run_id, state, host, pid, start, seen in rows
        if _process_dead(host, pid, start, seen or 0.0, stale_after)
    ]
    if dead:
        with _table(con, "_dead", (("run_id", "VARCHAR"), ("error", "VARCHAR")), dead):
            con.execute(
                f"INSERT INTO run_events ({_names(_RUN_EVENTS)}) SELECT r.run_id, r.task, "
                f"r.task_identity, r.key, 'CRASHED', {_lit(now)}, r.attempt, NULL, NULL, "
                "d.error, NULL, NULL, NULL, NULL, r.host, r.pid, r.pid_start, r.kernel, "
                "r.notebook, r.cell "
                f"FROM runs r JOIN _dead d USING (run_id) WHERE r.state IN {_NON_FINAL_SQL}"
            )
            con.execute(
                f"UPDATE runs SET state = 'CRASHED', ended = {_lit(now)}, updated = {_lit(now)}, "
                "error = d.error FROM _dead d "
                f"WHERE runs.run_id = d.run_id AND runs.state IN {_NON_FINAL_SQL}"
            )
    for key, holder, lease in con.execute(
        "SELECT key, holder, lease_expires FROM locks"
    ).fetchall():
        h = _identity.parse_holder(holder)
        if "raw" in h:
            continue
        seen = lease if lease is not None else 0.0
        host, pid, start = h["host"], h["pid"], h["start_time"]
        if _process_dead(
            str(host), int(pid or 0), start if isinstance(start, int) else None, seen, stale_after
        ):
            con.execute(f"DELETE FROM locks WHERE key = {_lit(key)} AND holder = {_lit(holder)}")
    return len(dead)
