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
them, every unpinned one. Object stores have no such lock; there passes may still
overlap and remove more than the quota asks. When pinned entries alone exceed the quota,
a warning says so and they stay.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

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
    with _one_pass_at_a_time(store):
        return _enforce(store, max_size, task, rounds)


@contextlib.contextmanager
def _one_pass_at_a_time(store: ResultStore) -> Iterator[None]:
    """Hold the store's eviction lock (local stores; elsewhere nothing)."""
    root = store.local_root
    try:
        import fcntl
    except ImportError:  # Windows: passes may overlap, as on object stores
        fcntl = None  # type: ignore[assignment]
    if root is None or fcntl is None or not os.path.isdir(root):
        yield
        return
    with open(os.path.join(root, ".evict.lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield


def _enforce(store: ResultStore, max_size: int, task: str | None, rounds: int) -> Eviction:
    removed = freed = 0
    size = 0
    rules = Rules(max_size=max_size, task=task)
    swept = False
    for _ in range(rounds):
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
        done = remove_entries(store, ((d.key, d.committed, inv.siblings(d.key)) for d in plan))
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
        wait_idle(60.0)


atexit.register(_at_exit)
