"""Many lookups at once — a map's worth of keys — for object stores, where each request
is a network round trip (a Dask map of 2,000 runs did 2,000 sequential GETs).

:func:`lookup_many` answers ``{key: Manifest | None}`` as ``ResultStore.lookup`` would
for each key (a manifest that does not verify is a miss; expired ones are returned), in
few requests:

1. **One listing** of ``manifests/`` (1,000 names per page) says which keys have a
   manifest at all: the absent ones are misses without a request each. The listing is
   only tried while the store holds at most :data:`LIST_BUDGET` manifests per key asked
   for (it stops at that count and falls back to step 3 for every key), so a huge store
   never costs more than reading the keys one by one.
2. **Manifests this process already read or committed** are not read again when the
   listing's ETag equals the MD5 of the bytes it holds (S3's ETag of a single-part PUT is
   the MD5 of the object): the bytes are the object's, and they are verified (HMAC) as
   any manifest read is. Any other ETag (multipart, SSE-KMS, another server's scheme)
   simply does not match, and the manifest is read.
3. **The rest is read concurrently** (one ``fs.cat`` of many paths: fsspec's async
   batch), not one GET after the other.

A stale answer can only be a miss where a hit was possible (the run computes again and
commits the same result); it never serves a value that was not verified. Local stores
and small batches go through ``ResultStore.lookup`` key by key (a local read costs
microseconds).

>>> import tempfile
>>> from notebook_flow.storage import ResultStore
>>> store = ResultStore(tempfile.mkdtemp())
>>> lookup_many(store, ["0123456789abcdef0123456789abcdef"])
{'0123456789abcdef0123456789abcdef': None}
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import behind
from .manifest import _is_manifest_rel, validate_key

if TYPE_CHECKING:
    from .manifest import Manifest
    from .store import ResultStore

__all__ = ["LIST_BUDGET", "MIN_BATCH", "lookup_many", "remember"]

logger = logging.getLogger("notebook_flow")

#: Keys below this count are looked up one by one (a listing would not pay for itself).
MIN_BATCH = 8
#: The listing stops (and every key is read instead) past this many manifests per key.
LIST_BUDGET = 500
#: Manifest bytes kept per process (for step 2), by total size.
RECENT_BYTES = 32 * 2**20

_recent: collections.OrderedDict[tuple[str, str], tuple[str, bytes]] = collections.OrderedDict()
_recent_bytes = [0]
_recent_lock = threading.Lock()


def remember(store: ResultStore, key: str, data: bytes) -> None:
    """Keep the bytes of ``key``'s manifest as read or committed (object stores only)."""
    if store.is_local:
        return
    entry = (hashlib.md5(data, usedforsecurity=False).hexdigest(), bytes(data))
    with _recent_lock:
        old = _recent.pop((store.url, key), None)
        if old is not None:
            _recent_bytes[0] -= len(old[1])
        _recent[(store.url, key)] = entry
        _recent_bytes[0] += len(data)
        while _recent_bytes[0] > RECENT_BYTES and _recent:
            _, evicted = _recent.popitem(last=False)
            _recent_bytes[0] -= len(evicted[1])


def _recalled(store: ResultStore, key: str, etag: str | None) -> bytes | None:
    if not etag:
        return None
    entry = _recent.get((store.url, key))
    if entry is None or entry[0] != etag.strip('"').lower():
        return None
    return entry[1]


def lookup_many(store: ResultStore, keys: Iterable[str]) -> dict[str, Manifest | None]:
    """The manifest committed for each key, or None (see the module docstring)."""
    wanted = list(dict.fromkeys(validate_key(k) for k in keys))
    if store.is_local or len(wanted) < MIN_BATCH:
        return {key: store.lookup(key) for key in wanted}
    for key in wanted:
        behind.wait_key(store.url, key)  # after this process's pending commit of the key
    out: dict[str, Manifest | None] = {}
    listed = _listing(store, LIST_BUDGET * len(wanted))
    to_read: list[str] = []
    if listed is None:
        to_read = wanted
    else:
        for key in wanted:
            if key not in listed:
                out[key] = None
                continue
            data = _recalled(store, key, listed[key])
            if data is None:
                to_read.append(key)
            else:
                out[key] = store._parse_manifest(data, store._manifest_rel(key), key)
    out.update(_read_all(store, to_read))
    return out


def _listing(store: ResultStore, budget: int) -> dict[str, str | None] | None:
    """``{key: ETag}`` of every manifest in the store; None when the filesystem cannot
    list asynchronously, the listing failed, or the store holds more than ``budget``."""
    fs = store.fs
    iterdir = getattr(fs, "_iterdir", None)
    if iterdir is None or not getattr(fs, "async_impl", False):
        return None
    from fsspec.asyn import sync

    root = store._root
    bucket, _, prefix = root.partition("/")
    start = f"{prefix}/manifests/" if prefix else "manifests/"

    async def collect() -> dict[str, str | None] | None:
        found: dict[str, str | None] = {}
        seen = 0
        async for entry in iterdir(bucket, delimiter="", prefix=start):
            seen += 1
            if seen > budget:
                return None
            rel = str(entry.get("name", ""))[len(root) + 1 :]
            if _is_manifest_rel(rel):
                found[rel[-37:-5]] = entry.get("ETag")
        return found

    try:
        result: dict[str, str | None] | None = sync(fs.loop, collect)
    except Exception as exc:  # a listing is an optimization: read the keys instead
        logger.debug("could not list the manifests of %s (%s)", store.url, exc)
        return None
    return result


def _read_all(store: ResultStore, keys: list[str]) -> dict[str, Manifest | None]:
    """Read and verify the manifests of ``keys`` concurrently."""
    if not keys:
        return {}
    rels = {store._path(store._manifest_rel(key)): key for key in keys}
    options: dict[str, Any] = {}
    if getattr(store.fs, "max_concurrency", None) is not None:  # s3fs: one GET, no HEAD
        options["max_concurrency"] = 1
    try:
        got = store.fs.cat(list(rels), on_error="return", **options)
    except Exception as exc:
        logger.debug("batched read of %d manifests failed (%s); one by one", len(keys), exc)
        return {key: store.lookup(key) for key in keys}
    out: dict[str, Manifest | None] = {}
    for path, key in rels.items():
        data = got.get(path, got.get(store.fs._strip_protocol(path)))
        rel = store._manifest_rel(key)
        if data is None or isinstance(data, FileNotFoundError):
            out[key] = None
        elif isinstance(data, BaseException):
            store._warn(f"cannot read manifest {rel}: {data}")
            out[key] = None
        else:
            data = bytes(data)
            out[key] = manifest = store._parse_manifest(data, rel, key)
            if manifest is not None:
                remember(store, key, data)
    return out
