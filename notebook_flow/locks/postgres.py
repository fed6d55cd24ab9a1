"""``PostgresLockManager``: session-level advisory locks, with holder records in a table.

Each held key has a connection of its own holding ``pg_try_advisory_lock(id)``, where
``id`` is the key's first 16 hex digits as a signed 64-bit integer (a hash of the key when
it is not hex), so ``pg_locks`` shows which key a session holds. When the holder's process
dies its connection closes and PostgreSQL drops the lock at once: no lease has to run out.

The table ``notebook_flow_locks(key, holder, acquired, lease_expires, fence, backend_pid,
lock_id)`` says who holds what (upserted on acquire, deleted on release); a row whose
``backend_pid`` no longer holds the advisory lock is stale and is overwritten by the next
holder. Fences come from the sequence ``notebook_flow_locks_fence``. Times are the server's
clock, converted to ours with the offset seen on each query.

A holder that is alive but stuck (SIGSTOP, a debugger, swapped out) keeps its session and
so its advisory lock; once its lease has expired, a waiter ends that session with
``pg_terminate_backend`` (allowed to superusers and to members of the holder's role or of
``pg_signal_backend``) and takes the lock. The stuck holder's renew then fails, and its
``Lease.check()`` refuses the commit.

Connections are per process: a forked child never touches its parent's sessions (their
sockets are pointed at /dev/null in the child, so not even garbage collection can end
them), and a pickled manager reconnects on first use. Each key held at once costs one
connection; released connections are kept for reuse (up to ``IDLE_CONNECTIONS``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from notebook_flow._extras import require
from notebook_flow.errors import ConfigurationError, LockError

from .base import (
    Attempt,
    BackoffAcquire,
    LockInfo,
    wait_until_released,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresLockManager", "lock_id"]

logger = logging.getLogger("notebook_flow")

#: Released connections kept per (dsn, table) and process, for the next acquire.
IDLE_CONNECTIONS = 4
_HEX = re.compile(r"[0-9a-fA-F]{16}")
_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,50}")
# Serialises CREATE TABLE IF NOT EXISTS between processes (it can fail when it races).
_SCHEMA_LOCK = 0x6E66_6C6F_7773_6368  # "nflowsch"
#: How long ``break_lock`` waits for the sessions it ended to let go of the lock.
_BREAK_WAIT = 10.0


def lock_id(key: str) -> int:
    """The advisory lock id of ``key``: its first 16 hex digits as a signed int64.

    >>> lock_id("00000000000000ff" + "0" * 16)
    255
    """
    if _HEX.fullmatch(key[:16]):
        raw = key[:16]
    else:
        raw = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    value = int(raw, 16)
    return value - (1 << 64) if value >= 1 << 63 else value


@functools.lru_cache(maxsize=64)
def _compose(text: str, table: str) -> Any:
    """``text`` with ``{t}`` and ``{seq}`` filled in as quoted identifiers (cached)."""
    from psycopg import sql

    return sql.SQL(text).format(t=sql.Identifier(table), seq=sql.Identifier(table + "_fence"))


@dataclass
class _Held:
    holder: str
    conn: psycopg.Connection[Any]


@dataclass
class _Pool:
    """This process's connections for one (dsn, table)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: list[psycopg.Connection[Any]] = field(default_factory=list)
    held: dict[str, _Held] = field(default_factory=dict)
    schema_ready: bool = False


_pools: dict[tuple[str, str], _Pool] = {}
_told: set[str] = set()  # keys whose stuck holder we could not end (warned once)
_pools_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The child shares its parent's sockets. Closing a libpq connection sends Terminate,
    # which would end the *parent's* session and drop its advisory locks; so point each
    # inherited socket at /dev/null first: whatever the child's copies do then is harmless.
    global _pools_lock
    _pools_lock = threading.Lock()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for pool in _pools.values():
            for conn in [*pool.idle, *(h.conn for h in pool.held.values())]:
                try:
                    os.dup2(devnull, conn.pgconn.socket)
                except Exception:  # a closed connection has no socket: nothing to protect
                    pass
    finally:
        os.close(devnull)
    _pools.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_at_exit() -> None:
    """Close this process's connections (idle, and any still holding a lock: the server
    drops its advisory locks, as it would when the process dies), rather than leave them
    to the garbage collector, which warns about each."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        for conn in [*pool.idle, *(h.conn for h in pool.held.values())]:
            with contextlib.suppress(Exception):
                conn.close()


atexit.register(_close_at_exit)


class PostgresLockManager(BackoffAcquire):
    """Locks in PostgreSQL: advisory locks that die with their session.

    >>> m = PostgresLockManager("postgresql://app@db/app")      # doctest: +SKIP
    >>> m.acquire(key, holder_id(run_id), timeout=60)           # doctest: +SKIP
    True

    ``table`` names the holder table (and ``<table>_fence``, its fence sequence); both are
    created on first use.
    """

    def __init__(self, dsn: str, *, table: str = "notebook_flow_locks") -> None:
        require("psycopg", "PostgresLockManager")
        if not _TABLE.fullmatch(table):
            raise ConfigurationError(f"table name {table!r} must match {_TABLE.pattern}")
        self.dsn = dsn
        self.table = table

    def __repr__(self) -> str:
        return f"PostgresLockManager({self._label!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"dsn": self.dsn, "table": self.table}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.dsn = state["dsn"]
        self.table = state["table"]

    @property
    def _label(self) -> str:
        dsn = re.sub(r"//([^:@/]*):[^@/]*@", r"//\1@", self.dsn)  # hide a password
        dsn = re.sub(r"password=\S+", "password=***", dsn)
        return f"{dsn} ({self.table})"

    # -- connections -------------------------------------------------------------------------

    @property
    def _pool(self) -> _Pool:
        with _pools_lock:
            return _pools.setdefault((self.dsn, self.table), _Pool())

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        conn = psycopg.connect(self.dsn, autocommit=True, application_name="notebook_flow locks")
        pool = self._pool
        if not pool.schema_ready:
            self._create_schema(conn)
            pool.schema_ready = True
        return conn

    def _create_schema(self, conn: psycopg.Connection[Any]) -> None:
        try:
            with conn.transaction():
                conn.execute("select pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                # UNLOGGED: the rows only describe advisory locks, which a server crash
                # drops too, and without WAL a commit need not wait for a flush. The fence
                # sequence stays logged, so fences keep growing across crashes.
                conn.execute(
                    self._sql(
                        "create unlogged table if not exists {t} ("
                        " key text primary key, holder text not null,"
                        " acquired double precision not null,"
                        " lease_expires double precision not null, fence bigint not null,"
                        " backend_pid integer not null, lock_id bigint not null)"
                    )
                )
                conn.execute(self._sql("create sequence if not exists {seq}"))
        except BaseException:
            conn.close()
            raise

    @contextlib.contextmanager
    def _connection(self, what: str, key: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for one short job; driver errors become ``LockError``."""
        import psycopg

        conn = None
        try:
            conn = self._take()
            yield conn
        except psycopg.Error as exc:
            if conn is not None:
                conn.close()
            raise self._error(what, key, exc) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._give_back(conn)

    def _take(self) -> psycopg.Connection[Any]:
        pool = self._pool
        with pool.lock:
            while pool.idle:
                conn = pool.idle.pop()
                if not conn.closed and not conn.broken:
                    return conn
        return self._connect()

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        pool = self._pool
        with pool.lock:
            if not conn.closed and not conn.broken and len(pool.idle) < IDLE_CONNECTIONS:
                pool.idle.append(conn)
                return
        conn.close()

    def _sql(self, text: str) -> Any:
        return _compose(text, self.table)

    def _error(self, what: str, key: str, exc: Exception) -> LockError:
        return LockError(f"PostgreSQL ({self._label}) failed to {what} lock {key!r}: {exc}")

    # -- records -----------------------------------------------------------------------------

    def _info(self, key: str, row: tuple[Any, ...], server_now: float) -> LockInfo:
        """A LockInfo from ``(holder, acquired, lease_expires, fence)`` in server time."""
        holder, acquired, expires, fence = row
        offset = server_now - time.time()  # server clock minus ours
        return LockInfo(key, holder, acquired - offset, expires - offset, self._label, int(fence))

    @staticmethod
    def _lock_parts(ident: int) -> tuple[int, int]:
        """(classid, objid) under which ``pg_locks`` lists a bigint advisory lock."""
        unsigned = ident & 0xFFFF_FFFF_FFFF_FFFF
        return unsigned >> 32, unsigned & 0xFFFF_FFFF

    # The advisory lock row of pg_locks for a key, in the current database.
    _HOLDS = (
        "l.locktype = 'advisory' and l.granted and l.objsubid = 1"
        " and l.classid = %(classid)s::bigint::oid and l.objid = %(objid)s::bigint::oid"
        " and l.database = (select oid from pg_database where datname = current_database())"
    )

    def _params(self, key: str, **extra: Any) -> dict[str, Any]:
        ident = lock_id(key)
        classid, objid = self._lock_parts(ident)
        return {"key": key, "id": ident, "classid": classid, "objid": objid, **extra}

    def _read(self, conn: psycopg.Connection[Any], key: str) -> tuple[LockInfo, bool] | None:
        """The key's row and whether it is live (its session holds the lock, lease not over)."""
        row = conn.execute(
            self._sql(
                "select r.holder, r.acquired, r.lease_expires, r.fence,"
                " extract(epoch from clock_timestamp())::float8,"
                " exists(select 1 from pg_locks l where "
                + self._HOLDS
                + " and l.pid = r.backend_pid)"
                " from {t} r where r.key = %(key)s"
            ),
            self._params(key),
        ).fetchone()
        if row is None:
            return None
        *record, now, holds = row
        return self._info(key, tuple(record), now), bool(holds) and record[2] > now

    # -- acquiring ---------------------------------------------------------------------------

    def _try(self, key: str, holder: str, lease: float) -> Attempt:
        pool = self._pool
        mine = pool.held.get(key)
        if mine is not None and mine.holder == holder and self.renew(key, holder, lease):
            current = self._read(mine.conn, key)
            if current is not None:
                return Attempt(current[0])
        import psycopg

        for attempt in (1, 2):
            conn = None
            try:
                conn = self._take()
                return self._try_on(conn, key, holder, lease)
            except psycopg.OperationalError as exc:
                if conn is None or attempt == 2:  # cannot connect, or failed twice
                    raise self._error("acquire", key, exc) from exc
                conn.close()  # a dead idle connection (server restart): retry once
            except psycopg.Error as exc:
                if conn is not None:
                    conn.close()
                raise self._error("acquire", key, exc) from exc
        raise AssertionError("unreachable")

    def _try_on(
        self, conn: psycopg.Connection[Any], key: str, holder: str, lease: float
    ) -> Attempt:
        # One round trip: try the advisory lock and, only if we got it, upsert our row;
        # either way return the row that was there (the holder we wait for, or the dead
        # one we replace). The CTE ``l`` runs once, before ``new`` reads it.
        try:
            row = conn.execute(
                self._sql(
                    "with l as (select pg_try_advisory_lock(%(id)s) as ok),"
                    " old as (select holder, acquired, lease_expires, fence from {t}"
                    "  where key = %(key)s),"
                    " new as (insert into {t} as r"
                    "  (key, holder, acquired, lease_expires, fence, backend_pid, lock_id)"
                    "  select %(key)s, %(holder)s, extract(epoch from clock_timestamp()),"
                    "   extract(epoch from clock_timestamp()) + %(lease)s, nextval('{seq}'),"
                    "   pg_backend_pid(), %(id)s from l where l.ok"
                    "  on conflict (key) do update set holder = excluded.holder,"
                    "   acquired = excluded.acquired, lease_expires = excluded.lease_expires,"
                    "   fence = excluded.fence, backend_pid = excluded.backend_pid,"
                    "   lock_id = excluded.lock_id"
                    "  returning acquired, lease_expires, fence)"
                    " select l.ok, new.acquired, new.lease_expires, new.fence, old.holder,"
                    "  old.acquired, old.lease_expires, old.fence,"
                    "  extract(epoch from clock_timestamp())::float8"
                    " from l left join new on true left join old on true"
                ),
                self._params(key, holder=holder, lease=lease),
            ).fetchone()
        except BaseException:
            conn.close()  # ends the session, so an advisory lock it got goes with it
            raise
        assert row is not None
        ok, now = row[0], row[8]
        previous = self._info(key, row[4:8], now) if row[4] is not None else None
        if not ok:
            self._give_back(conn)
            if previous is not None and previous.expires_in() < 0:
                self._end_stuck_session(key)
            return Attempt(None, previous)
        with self._pool.lock:
            self._pool.held[key] = _Held(holder, conn)
        return Attempt(self._info(key, (holder, *row[1:4]), now), previous)

    def _end_stuck_session(self, key: str) -> None:
        """Terminate the session that holds ``key`` past its lease (it is stopped or hung)."""
        try:
            with self._connection("end the stuck holder of", key) as conn:
                ended = conn.execute(
                    self._sql(
                        "select pg_terminate_backend(l.pid) from pg_locks l join {t} r"
                        " on r.key = %(key)s and r.backend_pid = l.pid"
                        " and r.lease_expires < extract(epoch from clock_timestamp())"
                        " where " + self._HOLDS
                    ),
                    self._params(key),
                ).fetchall()
        except LockError as exc:  # e.g. no permission: keep waiting for the holder
            if key not in _told:  # once per key, not on every poll
                _told.add(key)
                logger.warning("lock %r: %s; waiting for the holder to go away", key, exc)
            return
        if ended:
            logger.warning("lock %r: ended the session of a holder whose lease had expired", key)

    # -- holding -----------------------------------------------------------------------------

    def _drop_held(self, key: str, held: _Held) -> None:
        with self._pool.lock:
            if self._pool.held.get(key) is held:
                del self._pool.held[key]

    def release(self, key: str, holder: str) -> None:
        """Give the lock back; ``LockError`` if ``holder`` does not hold it.

        Only the process that acquired a lock can release it (the advisory lock belongs to
        its session); elsewhere use ``break_lock``.
        """
        import psycopg

        held = self._pool.held.get(key)
        if held is None or held.holder != holder:
            current = self.holder_of(key)
            raise LockError(
                f"cannot release lock {key!r}: it is held by {current.holder!r}, not {holder!r}"
                if current is not None and current.holder != holder
                else f"cannot release lock {key!r}: {holder!r} does not hold it in this process"
            )
        self._drop_held(key, held)
        conn = held.conn
        try:
            with conn.pipeline():
                deleted = conn.execute(
                    self._sql(
                        "delete from {t} where key = %(key)s and holder = %(holder)s"
                        " and backend_pid = pg_backend_pid()"
                    ),
                    self._params(key, holder=holder),
                )
                unlocked = conn.execute("select pg_advisory_unlock(%(id)s)", self._params(key))
            ok = deleted.rowcount == 1
            row = unlocked.fetchone()
            if not (row and row[0]):
                ok = False
        except psycopg.Error as exc:
            conn.close()
            raise LockError(
                f"cannot release lock {key!r}: its session was lost ({exc}); the lock was "
                "probably taken over after its lease expired"
            ) from exc
        if not ok:
            conn.close()  # never reuse a session in an unknown state
            raise LockError(f"cannot release lock {key!r}: {holder!r} no longer holds it")
        self._give_back(conn)

    def renew(self, key: str, holder: str, lease: float) -> bool:
        """Extend the lease; False when it expired, was broken or its session ended."""
        import psycopg

        held = self._pool.held.get(key)
        if held is None or held.holder != holder:
            return False
        try:
            cur = held.conn.execute(
                self._sql(
                    "update {t} set lease_expires = extract(epoch from clock_timestamp())"
                    " + %(lease)s where key = %(key)s and holder = %(holder)s"
                    " and backend_pid = pg_backend_pid()"
                    " and lease_expires > extract(epoch from clock_timestamp())"
                ),
                self._params(key, holder=holder, lease=lease),
            )
            return cur.rowcount == 1
        except psycopg.Error as exc:
            logger.warning("lock %r: renew failed, the lease is lost: %s", key, exc)
            self._drop_held(key, held)
            held.conn.close()
            return False

    # -- inspecting --------------------------------------------------------------------------

    def holder_of(self, key: str) -> LockInfo | None:
        """The live holder's record, or None."""
        with self._connection("read", key) as conn:
            current = self._read(conn, key)
        return current[0] if current is not None and current[1] else None

    def is_locked(self, key: str) -> bool:
        """True while a live holder holds ``key``."""
        return self.holder_of(key) is not None

    def list_locks(self) -> list[LockInfo]:
        """Every live lock in the table, sorted by key."""
        with self._connection("list", "*") as conn:
            rows = conn.execute(
                self._sql(
                    "select r.key, r.holder, r.acquired, r.lease_expires, r.fence,"
                    " extract(epoch from clock_timestamp())::float8 from {t} r"
                    " where r.lease_expires > extract(epoch from clock_timestamp())"
                    " and exists(select 1 from pg_locks l where l.locktype = 'advisory'"
                    "  and l.granted and l.objsubid = 1 and l.pid = r.backend_pid"
                    "  and ((l.classid::bigint << 32) | l.objid::bigint) = r.lock_id"
                    "  and l.database = (select oid from pg_database"
                    "   where datname = current_database()))"
                    " order by r.key"
                )
            ).fetchall()
        return [self._info(row[0], row[1:5], row[5]) for row in rows]

    def break_lock(self, key: str) -> bool:
        """Remove the lock whoever holds it (ending the holder's session); True if live."""
        held = self._pool.held.get(key)
        ended: list[int] = []  # the sessions that held it, ending
        if held is not None:  # held in this process: end that session ourselves
            self._drop_held(key, held)
            with contextlib.suppress(Exception):
                ended.append(int(held.conn.info.backend_pid))
            held.conn.close()
        with self._connection("break", key) as conn:
            current = self._read(conn, key)
            rows = conn.execute(
                self._sql(
                    "select l.pid, pg_terminate_backend(l.pid) from pg_locks l join {t} r"
                    " on r.key = %(key)s and r.backend_pid = l.pid where " + self._HOLDS
                ),
                self._params(key),
            ).fetchall()
            ended += [int(row[0]) for row in rows]
            conn.execute(self._sql("delete from {t} where key = %(key)s"), self._params(key))
            self._wait_ended(conn, key, ended)
        return held is not None or (current is not None and current[1])

    def _wait_ended(self, conn: psycopg.Connection[Any], key: str, pids: list[int]) -> None:
        """Wait (at most :data:`_BREAK_WAIT` s) until none of the sessions ``pids`` holds
        ``key``'s advisory lock. A session ends after its connection closes or its backend
        is terminated, not at once: an ``acquire`` right after a break found the lock still
        held (1 round of 20 of a stress loop). Sessions that took it since are not waited
        for."""
        deadline = time.monotonic() + _BREAK_WAIT
        while pids:
            row = conn.execute(
                self._sql(
                    "select exists(select 1 from pg_locks l where "
                    + self._HOLDS
                    + " and l.pid = any(%(pids)s))"
                ),
                self._params(key, pids=pids),
            ).fetchone()
            if not (row and row[0]) or time.monotonic() > deadline:
                return
            time.sleep(0.005)

    def wait_for_release(self, key: str, timeout: float | None = None) -> bool:
        """Block until ``key`` is free; False if ``timeout`` passed first."""
        return wait_until_released(lambda: self.holder_of(key), timeout)
