"""``RedisLockManager``: locks as Redis keys with a TTL, for processes on many machines.

One key per lock, ``<prefix>:lock:{<key>}``, set with ``SET NX PX``-semantics by a Lua
script whose value is the holder record (JSON). The script also hands out the fence from
``<prefix>:fence:{<key>}`` (``INCR``, floored by the server's clock in milliseconds, so
fences keep growing after a restart of a Redis that keeps nothing on disk). Release and
renew are compare-and-delete / compare-and-pexpire scripts: only the holder named in the
value can do either. The ``{…}`` hash tag keeps both keys in one cluster slot.

Recovery is the TTL: a dead holder's key disappears when its lease runs out. On the
holder's own host (same host name, boot and pid namespace) a waiter also checks the
holder's pid (with its start time) and takes a dead holder's lock over at once, with a
compare-and-swap on the exact value it saw.

Requires Redis >= 5 (scripts that read ``TIME`` before writing). The client is created
lazily, per process: a pickled or forked manager reconnects on first use.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from notebook_flow import _identity, _json
from notebook_flow._extras import require
from notebook_flow.errors import LockError

from .base import (
    Attempt,
    BackoffAcquire,
    LockInfo,
    holder_process_dead,
    pid_scope,
    wait_until_released,
)

if TYPE_CHECKING:
    import redis as redis_

__all__ = ["RedisLockManager"]

# KEYS: lock, fence. ARGV: holder, record head, record tail, lease ms, fence ttl ms,
# value a dead holder left (or "").  Returns {1, our value, replaced value or ""} or
# {0, current value, its pttl}.
_ACQUIRE = """
local cur = redis.call('get', KEYS[1])
if cur and cur ~= ARGV[6] then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' and rec['holder'] == ARGV[1] then
    redis.call('pexpire', KEYS[1], ARGV[4])
    return {1, cur, ''}
  end
  return {0, cur, redis.call('pttl', KEYS[1])}
end
local t = redis.call('time')
local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fence = redis.call('incr', KEYS[2])
if fence < floor then
  fence = floor
  redis.call('set', KEYS[2], string.format('%d', fence))
end
redis.call('pexpire', KEYS[2], ARGV[5])
local value = ARGV[2] .. string.format('%d', fence) .. ARGV[3]
redis.call('set', KEYS[1], value, 'PX', ARGV[4])
return {1, value, cur or ''}
"""

# KEYS: lock. ARGV: holder. Returns 1 deleted, 0 not held, or the other holder's value.
_RELEASE = """
local cur = redis.call('get', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if ok and type(rec) == 'table' and rec['holder'] == ARGV[1] then
  redis.call('del', KEYS[1])
  return 1
end
return cur
"""

# KEYS: lock. ARGV: holder, lease ms. Returns 1 renewed, 0 lost.
_RENEW = """
local cur = redis.call('get', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if ok and type(rec) == 'table' and rec['holder'] == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

#: Fence counters outlive locks by a day; the clock floor covers them after that.
_FENCE_TTL_MS = 86_400_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisLockManager(BackoffAcquire):
    """Locks in Redis, shared by every process and machine that reaches the server.

    >>> m = RedisLockManager(host="localhost")            # doctest: +SKIP
    >>> m = RedisLockManager(url="redis://cache:6379/2")  # doctest: +SKIP
    >>> with hold(m, key, holder_id(run_id)) as lease:    # doctest: +SKIP
    ...     ...

    Extra keyword arguments go to ``redis.Redis`` (``socket_timeout``, ``ssl_ca_certs``,
    ...). The configuration, password included, is what pickling carries, so keep
    secrets in the URL's environment rather than in a notebook you share.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        *,
        url: str | None = None,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        prefix: str = "notebook_flow",
        **kwargs: Any,
    ) -> None:
        require("redis", "RedisLockManager")
        self.host = host
        self.port = port
        self.db = db
        self.url = url
        self.username = username
        self.password = password
        self.ssl = ssl
        self.prefix = prefix
        self.kwargs = kwargs
        self._reset()

    def _reset(self) -> None:
        self._client: redis_.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._pid = -1
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisLockManager({self._label!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_client", "_scripts", "_pid", "_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def _label(self) -> str:
        if self.url:
            where = self.url.split("@")[-1]  # never show a password
            return f"redis://{where.removeprefix('redis://').removeprefix('rediss://')}"
        return f"redis://{self.host}:{self.port}/{self.db}"

    # -- connection --------------------------------------------------------------------------

    def _redis(self) -> redis_.Redis:
        """The client of this process (created on first use and again after a fork)."""
        client = self._client
        if client is not None and self._pid == os.getpid():
            return client
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                import redis

                options: dict[str, Any] = {"socket_timeout": 10.0, "socket_connect_timeout": 5.0}
                options.update(self.kwargs)
                if self.url:
                    client = redis.Redis.from_url(self.url, **options)
                else:
                    client = redis.Redis(
                        host=self.host,
                        port=self.port,
                        db=self.db,
                        username=self.username,
                        password=self.password,
                        ssl=self.ssl,
                        **options,
                    )
                self._scripts = {
                    name: client.register_script(source)
                    for name, source in (
                        ("acquire", _ACQUIRE),
                        ("release", _RELEASE),
                        ("renew", _RENEW),
                    )
                }
                self._client = client
                self._pid = os.getpid()
            assert self._client is not None
            return self._client

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        client = self._redis()
        return self._scripts[name](keys=keys, args=args, client=client)

    def _keys(self, key: str) -> list[str]:
        return [f"{self.prefix}:lock:{{{key}}}", f"{self.prefix}:fence:{{{key}}}"]

    def _error(self, what: str, key: str, exc: Exception) -> LockError:
        return LockError(f"Redis ({self._label}) failed to {what} lock {key!r}: {exc}")

    # -- records -----------------------------------------------------------------------------

    def _info(self, key: str, value: bytes | str, pttl_ms: int | None) -> LockInfo | None:
        try:
            record = _json.loads(_text(value))
            holder = str(record["holder"])
        except (ValueError, KeyError, TypeError):
            return None
        now = time.time()
        expires = now + pttl_ms / 1000 if pttl_ms is not None and pttl_ms >= 0 else now + 1e9
        return LockInfo(
            key=key,
            holder=holder,
            acquired_at=float(record.get("acquired_at", 0.0)),
            lease_expires=expires,
            manager=self._label,
            fence=int(record.get("fence", 0)),
        )

    @staticmethod
    def _holder_dead(value: bytes | str) -> bool:
        """True when the record names a process of our host that no longer runs."""
        try:
            record = _json.loads(_text(value))
        except ValueError:
            return False
        return isinstance(record, dict) and holder_process_dead(record)

    def _record_parts(self, key: str, holder: str, now: float) -> tuple[str, str]:
        """The holder record as JSON, split where the script puts the fence."""
        me = _identity.process()
        head = json.dumps(
            {
                "key": key,
                "holder": holder,
                "acquired_at": now,
                "host": me.host,
                "scope": pid_scope(),
                "pid": me.pid,
                "start_time": me.start_time,
            }
        )
        return head[:-1] + ', "fence": ', "}"

    # -- acquiring ---------------------------------------------------------------------------

    def _try(self, key: str, holder: str, lease: float, dead_value: str = "") -> Attempt:
        import redis

        now = time.time()
        head, tail = self._record_parts(key, holder, now)
        lease_ms = max(1, int(lease * 1000))
        try:
            ok, value, extra = self._script(
                "acquire",
                self._keys(key),
                [holder, head, tail, lease_ms, max(_FENCE_TTL_MS, 2 * lease_ms), dead_value],
            )
        except redis.RedisError as exc:
            raise self._error("acquire", key, exc) from exc
        if ok:
            mine = self._info(key, value, lease_ms)
            assert mine is not None
            previous = self._info(key, extra, 0) if extra else None
            return Attempt(mine, previous)
        current = self._info(key, value, int(extra))
        if not dead_value and self._holder_dead(value):
            # Same host, holder process gone: take over now instead of waiting out its lease.
            return self._try(key, holder, lease, dead_value=_text(value))
        return Attempt(None, current)

    # -- holding -----------------------------------------------------------------------------

    def release(self, key: str, holder: str) -> None:
        """Give the lock back; ``LockError`` if ``holder`` does not hold it."""
        import redis

        try:
            result = self._script("release", self._keys(key)[:1], [holder])
        except redis.RedisError as exc:
            raise self._error("release", key, exc) from exc
        if result == 1:
            return
        if result == 0:
            raise LockError(
                f"cannot release lock {key!r}: it is not held (its lease expired, or it was broken)"
            )
        other = self._info(key, result, None)
        raise LockError(
            f"cannot release lock {key!r}: it is held by "
            f"{other.holder if other else _text(result)!r}, not {holder!r}"
        )

    def renew(self, key: str, holder: str, lease: float) -> bool:
        """Extend the lease; False when it expired or another holder took the lock."""
        import redis

        try:
            result = self._script("renew", self._keys(key)[:1], [holder, max(1, int(lease * 1000))])
        except redis.RedisError as exc:
            raise self._error("renew", key, exc) from exc
        return bool(result == 1)

    # -- inspecting --------------------------------------------------------------------------

    def holder_of(self, key: str) -> LockInfo | None:
        """The live holder's record, or None (a dead holder on this host counts as none)."""
        import redis

        name = self._keys(key)[0]
        try:
            pipe = self._redis().pipeline(transaction=False)
            pipe.get(name)
            pipe.pttl(name)
            value, pttl = pipe.execute()
        except redis.RedisError as exc:
            raise self._error("read", key, exc) from exc
        if value is None or self._holder_dead(value):
            return None
        return self._info(key, value, int(pttl))

    def is_locked(self, key: str) -> bool:
        """True while a live holder holds ``key``."""
        return self.holder_of(key) is not None

    def list_locks(self) -> list[LockInfo]:
        """Every live lock under this manager's prefix, sorted by key."""
        import redis

        client = self._redis()
        start = f"{self.prefix}:lock:{{"
        try:
            names = [_text(n) for n in client.scan_iter(match=start + "*", count=500)]
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.get(name)
                pipe.pttl(name)
            replies = pipe.execute()
        except redis.RedisError as exc:
            raise LockError(f"Redis ({self._label}) failed to list locks: {exc}") from exc
        infos = []
        for i, name in enumerate(names):
            value, pttl = replies[2 * i], replies[2 * i + 1]
            if value is None or self._holder_dead(value):
                continue
            info = self._info(name[len(start) : -1], value, int(pttl))
            if info is not None:
                infos.append(info)
        return sorted(infos, key=lambda i: i.key)

    def break_lock(self, key: str) -> bool:
        """Remove the lock whoever holds it; True if there was one."""
        import redis

        try:
            return bool(self._redis().delete(self._keys(key)[0]))
        except redis.RedisError as exc:
            raise self._error("break", key, exc) from exc

    def wait_for_release(self, key: str, timeout: float | None = None) -> bool:
        """Block until ``key`` is free; False if ``timeout`` passed first."""
        return wait_until_released(lambda: self.holder_of(key), timeout)
