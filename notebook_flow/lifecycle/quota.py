"""Quotas that enforce themselves: eviction in the background after a commit.

``configure(max_size="20GB")`` (or ``NOTEBOOK_FLOW_MAX_SIZE``) sets the store's quota and
``@task(max_size=...)`` a task's own. After every commit into a store with a quota,
:func:`committed` asks this process's evictor thread for a pass; requests that arrive
while a pass runs are folded into one more pass, so a burst of commits costs one or two
listings, not one per commit. A pass lists the store (:func:`.inventory.scan`), chooses
the least recently used entries that are not pinned until the scope fits
(:func:`.rules.decide`) and removes them (:func:`.evict.remove_entry`), again until the
listing says it fits. The caller never waits for any of it.

Every process sharing a store runs its own passes: the pass started after the last
commit sees every commit, so the store ends under its quota whoever committed last; two
passes removing at once never remove one entry twice (see :mod:`.evict`). On a local
store, passes of all processes take turns (an exclusive ``flock`` on ``.evict.lock`` in
the store's folder), each listing the store after the one before it finished: four
processes that each saw the store 2 entries over quota once removed 8 entries between
them, every unpinned one. On an object store the turn is a lease object
(``.evict.lease``, see :class:`_Lease`) created with a conditional PUT; where the store
offers no conditional writes, passes may still overlap and remove more than the quota
asks. When pinned entries alone exceed the quota, a warning says so and they stay.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from notebook_flow import _json
from notebook_flow.storage import files
from notebook_flow.storage.pins import pin

from . import usage
from .evict import remove_entries
from .inventory import Inventory, scan
from .rules import Rules, decide, format_bytes, matches_task

if TYPE_CHECKING:
    from notebook_flow.storage import Manifest, ResultStore

__all__ = ["Eviction", "committed", "enforce", "wait_idle"]

logger = logging.getLogger("notebook_flow")


@dataclasses.dataclass(frozen=True)
class Eviction:
    """What one call of :func:`enforce` removed, and the scope's size after it."""

    removed: int
    freed: int
    size: int
    max_size: int

    @property
    def over(self) -> bool:
        return self.size > self.max_size


_cond = threading.Condition()
#: (url, task or None) → (store, quota): the passes asked for and not started yet.
_wanted: dict[tuple[str, str | None], tuple[ResultStore, int]] = {}
_running = 0
_thread: threading.Thread | None = None
_thread_pid = 0
_warned: set[tuple[str, str | None]] = set()

#: Set at interpreter exit: waiting for the eviction turn is then given up.
_exiting = threading.Event()


class _Dropped(Exception):
    """The pass was given up while it waited for its turn (the process is exiting)."""


def committed(
    store: ResultStore, manifest: Manifest, *, max_size: int | None = None, pinned: bool = False
) -> None:
    """After ``manifest`` was committed: pin it (``@task(pin=True)``) and, if the store or
    the task has a quota, ask for an eviction pass in the background."""
    if pinned:
        pin(store, [manifest.key])
    from notebook_flow.config import settings

    limit = settings().max_size
    if limit is not None:
        _ask(store, None, limit)
    if max_size is not None:
        _ask(store, manifest.task, max_size)


def _ask(store: ResultStore, task: str | None, limit: int) -> None:
    global _thread, _thread_pid
    with _cond:
        if _thread_pid != os.getpid():  # forked: the parent's thread and requests are not ours
            _wanted.clear()
            _thread = None
        _wanted[(store.url, task)] = (store, limit)
        if _thread is None:
            _thread = threading.Thread(target=_run, name="notebook_flow-evictor", daemon=True)
            _thread_pid = os.getpid()
            _thread.start()
        _cond.notify_all()


def _run() -> None:
    global _running
    while True:
        with _cond:
            while not _wanted:
                _cond.wait()
            (url, task), (store, limit) = _wanted.popitem()
            _running += 1
        try:
            enforce(store, limit, task=task)
        except Exception:  # the next commit asks again
            logger.warning("eviction in %s failed", url, exc_info=True)
        finally:
            with _cond:
                _running -= 1
                _cond.notify_all()


def wait_idle(timeout: float | None = None) -> bool:
    """Wait until no eviction pass is wanted or running; False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _cond:
        while _wanted or _running:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            _cond.wait(left)
    return True


def enforce(
    store: ResultStore, max_size: int, *, task: str | None = None, rounds: int = 5
) -> Eviction:
    """Evict the least recently used unpinned entries of ``store`` (or of ``task``) until
    it holds at most ``max_size`` bytes; returns what was done. Runs in the caller, after
    any pass of another process on the same local store."""
    try:
        with _one_pass_at_a_time(store) as lease:
            return _enforce(store, max_size, task, rounds, lease)
    except _Dropped:  # the next commit, here or in another process, asks again
        logger.debug("eviction pass in %s dropped at exit", store.url)
        return Eviction(0, 0, 0, max_size)


@contextlib.contextmanager
def _one_pass_at_a_time(store: ResultStore) -> Iterator[_Lease | None]:
    """Hold the store's eviction turn: an ``flock`` on a local store, a :class:`_Lease` on
    an object store (``None`` where neither can be had: passes may overlap)."""
    root = store.local_root
    if root is None:
        lease = _Lease(store)
        try:
            yield lease if lease.acquire() else None
        finally:
            lease.release()
        return
    try:
        import fcntl
    except ImportError:  # Windows: passes may overlap
        fcntl = None  # type: ignore[assignment]
    if fcntl is None or not os.path.isdir(root):
        yield None
        return
    with open(os.path.join(root, ".evict.lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield None


class _Lease:
    """The eviction turn on an object store: the object ``.evict.lease`` in the store's
    root, ``{"owner": <random token>, "expires": <unix time>}``.

    A pass creates it with a conditional PUT (``If-None-Match: *``: one creator wins),
    renews it before each listing and every ``TTL / 3`` while it removes, and deletes it
    at the end; the others wait for it to go. A holder that died leaves a lease that
    expires after :data:`LEASE_TTL` (plus :data:`LEASE_SKEW` for clocks that disagree);
    then one waiter takes it over with a PUT conditional on the ETag it read (``If-Match``,
    on S3), so two waiters never both win. A pass that finds its lease taken over (it was
    too slow to renew) stops removing. At exit a waiting pass goes on waiting for a
    holder that renews (it comes after that pass, so the store ends under quota), but is
    dropped when the lease was not renewed for half its life (a holder likely dead: the
    exit would otherwise wait out its lease). Stores without conditional writes (where
    the create raises something other than ``FileExistsError``) get no lease: passes
    overlap, as they did before.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.path = store._path(LEASE_NAME)
        self.token = secrets.token_hex(8)
        self.etag: str | None = None
        self.held = False
        self.renewed = 0.0
        self.s3 = "s3" in getattr(store.fs, "protocol", ())

    def _body(self) -> bytes:
        return json.dumps({"owner": self.token, "expires": time.time() + LEASE_TTL}).encode()

    def _put(self, **condition: str) -> bool:
        """Write the lease (``mode="create"``, ``IfMatch=<etag>`` or unconditionally);
        False when the condition did not hold."""
        try:
            out = self.store.fs.pipe_file(self.path, self._body(), **condition)
        except FileExistsError:
            return False
        except OSError as e:
            if condition and _precondition_failed(e):
                return False
            raise
        self.etag = out.get("ETag") if isinstance(out, dict) else None
        self.renewed = time.monotonic()
        return True

    def _content(self) -> dict[str, Any]:
        """The lease there now; ``{}`` when it cannot be read as one (a damaged lease is
        taken over as an expired one). Raises FileNotFoundError when there is none."""
        try:
            found = _json.loads(bytes(self.store.fs.cat_file(self.path)))
        except ValueError:
            return {}
        return found if isinstance(found, dict) else {}

    def _read(self) -> tuple[str | None, float | None]:
        """(ETag, expiry) of the lease there now; (None, None) when there is none, expiry
        0 when it is damaged."""
        fs = self.store.fs
        try:
            info = fs.info(self.path, refresh=True) if self.s3 else fs.info(self.path)
            content = self._content()
        except FileNotFoundError:
            return None, None
        try:
            expires = float(content["expires"])
        except (KeyError, TypeError, ValueError):
            expires = 0.0
        return info.get("ETag") or info.get("etag"), expires

    def acquire(self) -> bool:
        """Wait for the turn; False where the store cannot hold a lease."""
        delay = 0.05
        while True:
            try:
                if self._put(mode="create"):
                    self.held = True
                    return True
                etag, expires = self._read()
                if expires is not None and time.time() > expires + LEASE_SKEW:
                    if self.s3 and etag:
                        taken = self._put(IfMatch=etag)
                    else:  # no conditional overwrite: remove it and race for the create
                        self.store.fs.rm_file(self.path)
                        taken = self._put(mode="create")
                    if taken:
                        logger.info("took over an expired eviction lease in %s", self.store.url)
                        self.held = True
                        return True
                elif _exiting.is_set() and expires and time.time() > expires - LEASE_TTL / 2:
                    # At exit, wait for a holder that renews its lease (its pass is under
                    # way, and this one comes after it), not for one that stopped renewing
                    # half a lease ago: likely dead, and its lease would outlast the exit.
                    raise _Dropped
            except (NotImplementedError, TypeError, ValueError) as e:
                logger.debug("no eviction lease in %s: %s", self.store.url, e)
                return False
            except FileNotFoundError:
                pass  # it went between two requests: try again at once
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    def renew(self, *, every: float = 0.0) -> bool:
        """Push the expiry on (when ``every`` seconds passed since the last renewal); False
        when the lease is no longer this pass's."""
        if not self.held:
            return False
        if time.monotonic() - self.renewed < every:
            return True
        try:
            if self.s3 and self.etag:
                ok = self._put(IfMatch=self.etag)
            else:
                owner = self._owner()
                ok = owner == self.token and self._put()
        except OSError:
            ok = False
        if not ok:
            logger.warning("the eviction lease of %s was taken over; pass stopped", self.store.url)
            self.held = False
        return ok

    def _owner(self) -> str | None:
        try:
            owner = self._content().get("owner")
        except OSError:
            return None
        return owner if isinstance(owner, str) else None

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError):
            if self._owner() == self.token:  # not one that took over from a slow pass
                self.store.fs.rm_file(self.path)


#: The lease object of eviction passes on object stores, in the store's root.
LEASE_NAME = ".evict.lease"
#: Seconds a lease lasts unless renewed; a pass renews it every third of that.
LEASE_TTL = 60.0
#: Seconds more before another process believes a lease expired (clocks of hosts differ).
LEASE_SKEW = 10.0


def _precondition_failed(error: OSError) -> bool:
    """Whether S3 refused a conditional PUT (s3fs raises ``OSError(EINVAL)`` for If-Match)."""
    text = str(error).lower().replace("-", "")
    return "precondition" in text or "412" in text


def _renewing(plan: Iterable[Any], lease: _Lease | None) -> Iterator[Any]:
    """The entries of ``plan`` while ``lease`` (if any) is still this pass's."""
    for item in plan:
        if lease is not None and not lease.renew(every=LEASE_TTL / 3):
            return
        yield item


def _enforce(
    store: ResultStore, max_size: int, task: str | None, rounds: int, lease: _Lease | None = None
) -> Eviction:
    removed = freed = 0
    size = 0
    rules = Rules(max_size=max_size, task=task)
    swept = False
    for _ in range(rounds):
        if lease is not None and not lease.renew():
            break
        inv = scan(store)
        if task is not None:
            inv.with_manifests(store)
        if task is None and inv.leftovers and not swept:  # crashed or racing writers'
            swept = True
            for rel in inv.leftovers:
                files.remove_quietly(store, rel)
            continue  # list again: what they held is free
        size = inv.total if task is None else _task_size(inv, task)
        plan = decide(inv, rules)
        if not plan:
            break
        chosen = ((d.key, d.committed, inv.siblings(d.key)) for d in plan)
        done = remove_entries(store, _renewing(chosen, lease))
        freed += sum(n for _, n in done)
        removed += len(done)
        forget(store, [key for key, _ in done])
    if size > max_size and removed == 0:
        ident = (store.url, task)
        if ident not in _warned:
            _warned.add(ident)
            logger.warning(
                "%s holds %s, over its quota of %s, but what is left is pinned; unpin "
                "entries (notebook-flow unpin) or raise max_size",
                store.url if task is None else f"task {task}",
                format_bytes(size),
                format_bytes(max_size),
            )
    if removed:
        logger.info("evicted %d entries (%s) from %s", removed, format_bytes(freed), store.url)
        try:
            usage.compact(store)
        except Exception:
            logger.debug("could not compact the usage records of %s", store.url, exc_info=True)
    return Eviction(removed, freed, size, max_size)


def _task_size(inv: Inventory, task: str) -> int:
    return sum(
        e.size
        for e in inv.entries.values()
        if e.manifest is not None and matches_task(e.manifest.task, task)
    )


def forget(store: ResultStore, keys: list[str]) -> None:
    """Drop removed entries from the metadata index (best effort: it is rebuilt from the
    store when it falls behind)."""
    if not keys:
        return
    try:
        from notebook_flow.config import get_metadata

        get_metadata(store).remove_cache_entries(keys)
    except Exception:
        logger.warning("could not update the index of %s", store.url, exc_info=True)


def _at_exit() -> None:
    if _thread_pid == os.getpid():
        _exiting.set()  # a pass still waiting for another process's lease is dropped
        wait_idle(60.0)


atexit.register(_at_exit)
