"""ResultStore: task results on any fsspec filesystem, committed payload first, manifest last.

Layout under the store's root::

    results/<key[:2]>/<key>-<unique>.<ext>     payloads (a new unique name on every commit)
    manifests/<key[:2]>/<key>.json             the commit point: names payload, size, checksum
    manifests/GENERATION                       rewritten after a manifest is deleted or replaced
    transactions/<id>.json                     a transaction's commit record (see .group)
    metadata.duckdb, locks/, ...               local stores only (remote: a per-URL cache dir)
    events/, chunks/                           a Dask runner's spooled run events and
                                               chunk markers (``runners/dask_worker.py``)

The commit protocol, and why it is crash-safe:

1. The payload is written under a fresh unique name: locally to a temp file in the same
   folder, fsync'd, renamed, the folder fsync'd; on object stores in one PUT. Its xxh3-128
   checksum (and, for pickles with a signing key, its HMAC-SHA256) is computed on the bytes
   as they stream out, so hashing costs no second pass.
2. ``before_manifest()`` runs (the lock's fencing check); if it raises, the payload is
   removed and nothing is committed.
3. The manifest is replaced atomically (same temp/fsync/rename dance, or one PUT).
4. The payload the previous manifest named is deleted, and (if there was one) the
   generation file rewritten, so that other processes' in-memory caches look again.

A reader trusts only a manifest, and verifies size and checksum before handing out a value,
so a crash at any instant leaves the old result or the new one, never a torn one. Payload
names are never reused, so a reader holding the old manifest never sees its payload change
(it may see it vanish: ``load`` then raises ``PayloadCorruptError``, a cache miss). Leftover
temp files and unreferenced payloads (a crash between steps 1 and 3, or two writers racing on
one key) are invisible to readers and removed by ``remove_orphans``.

Several results commit together (a transaction) through :mod:`.group`: their manifests
name the transaction and are misses until one signed commit record makes them all visible.

The package follows the protocol: :mod:`.manifest` (the commit record, its JSON format and
validation), :mod:`.group` (group commits), :mod:`.payload` (writing a payload while
hashing it; verifying it before it is loaded), :mod:`.files` (low-level I/O: local files
directly, the rest through fsspec) and :mod:`.store` (``ResultStore``: lookup, load,
commit, delete, the generation file). What other modules use is re-exported here: import
it from ``notebook_flow.storage``. Module globals live in their submodule: patch
``INLINE_LIMIT`` as ``notebook_flow.storage.store.INLINE_LIMIT``.

>>> import tempfile
>>> store = ResultStore(tempfile.mkdtemp())
>>> key = "0123456789abcdef0123456789abcdef"
>>> m = store.commit(key, {"answer": 42}, task="demo", components={}, run_id="r1",
...                  duration=0.1, expires_at=None)
>>> m.serializer, store.load(store.lookup(key))
('json', {'answer': 42})
"""

from __future__ import annotations

from .manifest import FORMAT_VERSION, Manifest, validate_key
from .store import CACHE_DIR_ENV, ResultStore, StorageWarning
from .store import INLINE_LIMIT as INLINE_LIMIT

__all__ = [
    "CACHE_DIR_ENV",
    "FORMAT_VERSION",
    "Manifest",
    "ResultStore",
    "StorageWarning",
    "validate_key",
]
