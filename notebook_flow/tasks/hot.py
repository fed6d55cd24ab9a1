"""The in-process hot cache: small results this process loaded or committed recently.

A repeated hit on a local store is answered from memory (:data:`_hot`) instead of reading
the manifest and payload again; ``docs/internals.md`` explains when an entry is trusted.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from notebook_flow.storage import Manifest, ResultStore

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, range)


def _immutable(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _IMMUTABLE):
        return True
    if isinstance(value, (tuple, frozenset)) and depth < 4 and len(value) <= 64:
        return all(_immutable(v, depth + 1) for v in value)
    return False


class _HotCache:
    """Small results this process loaded recently, so a repeated hit costs microseconds.

    Only local stores and only payloads up to ``max_size`` bytes. Immutable values are
    returned as they are; anything else is kept pickled and unpickled on every hit, so
    mutating a returned value never changes what the next hit returns, and is kept only
    from the second time it is stored or loaded here.

    An entry is trusted while its store's generation (``ResultStore.changes_here``, and
    ``generation_stamp``: the file every process rewrites after it deletes or replaces a
    manifest) is the one it was last checked against; the file is read at most every
    ``recheck_after`` seconds per store. When the generation moved, each entry re-checks its
    own manifest's stat stamp once. A commit of a new key leaves entries alone (a key is
    content-addressed). One stat per store and period, instead of one per hit: a system
    call on the hit path let other threads take the GIL, which cost the embedded worker
    more than half its throughput.
    """

    def __init__(
        self,
        max_entries: int = 65_536,
        max_size: int = 64 * 1024,
        max_bytes: int = 64 * 2**20,
        recheck_after: float = 0.5,
    ) -> None:
        self.max_entries = max_entries
        self.max_size = max_size
        self.max_bytes = max_bytes  # budget for the payloads kept (by their stored size)
        self.recheck_after = recheck_after
        self._bytes = 0
        # (store url, key) → (manifest stamp, generation checked, manifest, pickled, payload)
        self._entries: collections.OrderedDict[
            tuple[str, str], tuple[Any, Any, Manifest, bool, Any]
        ] = collections.OrderedDict()
        self._seen: collections.OrderedDict[tuple[str, str], bool] = collections.OrderedDict()
        # store url → (when its generation was read, that generation)
        self._generations: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def _generation(self, store: ResultStore) -> Any:
        """(changes here, generation file stamp) of ``store``; the stamp read at most every
        ``recheck_after`` seconds, and at once after a change made in this process."""
        now = time.monotonic()
        here = store.changes_here()
        seen = self._generations.get(store.url)
        if seen is None or seen[1][0] != here or now - seen[0] > self.recheck_after:
            seen = self._generations[store.url] = (now, (here, store.generation_stamp()))
        return seen[1]

    def get(self, store: ResultStore, key: str) -> tuple[Manifest, Any] | None:
        slot = (store.url, key)  # the same key may live in several stores
        entry = self._entries.get(slot)
        if entry is None:
            return None
        stamp, checked, manifest, pickled, payload = entry
        generation = self._generation(store)
        if checked != generation:
            if stamp != store.manifest_stamp(key):
                self.discard(slot)
                return None
            self._entries[slot] = (stamp, generation, manifest, pickled, payload)
        if pickled:
            import pickle

            return manifest, pickle.loads(payload)
        return manifest, payload

    def put(self, store: ResultStore, manifest: Manifest, value: Any) -> None:
        if manifest.size > self.max_size or not store.is_local:
            return
        pickled = not _immutable(value)
        payload = value
        slot = (store.url, manifest.key)
        if pickled and slot not in self._entries:
            # Admit a value that must be copied (pickled) only the second time this process
            # stores or loads it: a resumed notebook loads most results once, and pickling
            # each (~1 ms for a small DataFrame under a busy GIL) would buy nothing.
            with self._lock:
                if self._seen.pop(slot, None) is None:
                    self._seen[slot] = True
                    while len(self._seen) > self.max_entries:
                        self._seen.popitem(last=False)
                    return
        generation = self._generation(store)
        stamp = store.manifest_stamp(manifest.key)
        if stamp is None:
            return
        if pickled:
            import pickle

            try:
                payload = pickle.dumps(value, protocol=5)
            except Exception:  # not picklable by reference in this process: don't keep it
                return
        with self._lock:
            old = self._entries.pop(slot, None)
            if old is not None:
                self._bytes -= old[2].size
            self._entries[slot] = (stamp, generation, manifest, pickled, payload)
            self._bytes += manifest.size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted[2].size

    def discard(self, slot: tuple[str, str]) -> None:
        with self._lock:
            old = self._entries.pop(slot, None)
            if old is not None:
                self._bytes -= old[2].size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._seen.clear()
            self._generations.clear()
            self._bytes = 0


_hot = _HotCache()
