"""ResultStore: task results on any fsspec filesystem, committed payload first, manifest last.

Layout under the store's root::

    results/<key[:2]>/<key>-<unique>.<ext>     payloads (a new unique name on every commit)
    manifests/<key[:2]>/<key>.json             the commit point: names payload, size, checksum
    manifests/GENERATION                       rewritten after a manifest is deleted or replaced
    metadata.duckdb, locks/, ...               local stores only (remote: a per-URL cache dir)

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

>>> import tempfile
>>> store = ResultStore(tempfile.mkdtemp())
>>> key = "0123456789abcdef0123456789abcdef"
>>> m = store.commit(key, {"answer": 42}, task="demo", components={}, run_id="r1",
...                  duration=0.1, expires_at=None)
>>> m.serializer, store.load(store.lookup(key))
('json', {'answer': 42})
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

from . import _localfs
from .errors import (
    CommitError,
    ConfigurationError,
    PayloadCorruptError,
    SerializationError,
    SignatureError,
    StorageError,
)
from .serializers import (
    PickleSerializer,
    Serializer,
    SerializerDeclined,
    choose_serializer,
    get_serializer,
    new_signer,
    signing_key_from_env,
    verify_signature,
)

if TYPE_CHECKING:
    import hmac

    from fsspec import AbstractFileSystem

__all__ = [
    "CACHE_DIR_ENV",
    "FORMAT_VERSION",
    "Manifest",
    "ResultStore",
    "StorageWarning",
    "validate_key",
]

logger = logging.getLogger("notebook_flow")

#: Version of the manifest format; a reader skips manifests of versions it does not know.
FORMAT_VERSION = 1
#: Where remote stores keep their local files (metadata, locks); default ~/.cache/notebook_flow.
CACHE_DIR_ENV = "NOTEBOOK_FLOW_CACHE_DIR"

_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
_PAYLOAD_RE = re.compile(r"^results/([0-9a-f]{2})/([0-9a-f]{32})-[0-9a-f]{16}\.[a-z0-9]{1,16}$")
_MANIFEST_NAME_RE = re.compile(r"^[0-9a-f]{32}\.json$")
_SHARD_RE = re.compile(r"^[0-9a-f]{2}$")
_LOCAL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED_NAMES = frozenset({"results", "manifests", "metadata.duckdb"})


class StorageWarning(UserWarning):
    """A stored file was unreadable or invalid and was treated as missing (a cache miss)."""


def validate_key(key: object) -> str:
    """Return ``key`` if it is a cache key (32 lowercase hex characters), else raise.

    Only validated keys reach a path, so nothing user-controlled is ever joined into one.

    >>> validate_key("0123456789abcdef0123456789abcdef")
    '0123456789abcdef0123456789abcdef'
    """
    if isinstance(key, str) and _KEY_RE.match(key):
        return key
    shown = repr(key) if len(repr(key)) <= 60 else repr(key)[:57] + "..."
    raise ConfigurationError(
        f"invalid cache key {shown}: a key is 32 lowercase hex characters (an xxh3-128 "
        "digest, as returned by CachePolicy.compute_key)"
    )


# ------------------------------------------------------------------------------ manifest


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The record that commits one result: which payload, how big, its checksum, when.

    ``payload`` is relative to the store root. ``signature`` is the HMAC-SHA256 (hex) of a
    pickled payload when the writer had a signing key. Times are UNIX seconds.

    >>> m = Manifest(1, "0" * 32, "t", "json", "results/00/" + "0" * 32 + "-" + "1" * 16
    ...              + ".json", 2, "f" * 32, None, 0.0, 10.0, 0.1, {}, "r")
    >>> m.expired(now=5.0), m.expired(now=10.0)
    (False, True)
    """

    format_version: int
    key: str
    task: str
    serializer: str
    payload: str
    size: int
    checksum: str
    signature: str | None
    created_at: float
    expires_at: float | None
    duration: float
    components: dict[str, str]
    run_id: str
    fence: int | None = None
    inline: str | None = None  # base64 of a small payload kept in the manifest itself
    seal: str | None = None  # the local payload file as committed: see _localfs.seal_of

    def expired(self, now: float | None = None) -> bool:
        """True when ``expires_at`` is set and has passed."""
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at

    def to_json(self) -> bytes:
        # Not dataclasses.asdict: its deep copy doubled the cost, on every commit.
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        for optional in ("inline", "seal"):  # format 1 as first written had neither
            if data[optional] is None:
                del data[optional]
        return json.dumps(data, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, *, key: str | None = None) -> Manifest:
        """Parse and validate a manifest; ``ValueError`` says what is wrong with it."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unknown format_version {version!r} (this notebook_flow reads "
                f"{FORMAT_VERSION}; was it written by a newer version?)"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n, f in fields.items() if n not in raw and n not in _OPTIONAL_FIELDS]
        if missing:
            raise ValueError(f"missing fields {missing}")
        values: dict[str, Any] = {n: raw.get(n) for n in fields}
        m = cls(**values)
        m._validate(key)
        return m

    def _validate(self, key: str | None) -> None:
        def number(v: object) -> bool:
            return type(v) in (int, float)

        match = _PAYLOAD_RE.match(self.payload) if isinstance(self.payload, str) else None
        problems = [
            (not isinstance(self.key, str) or not _KEY_RE.match(self.key), "key"),
            (key is not None and self.key != key, "key (names another key)"),
            (
                (match is None or match.group(2) != self.key)
                if self.inline is None
                else (self.payload != "" or not isinstance(self.inline, str)),
                "payload path",
            ),
            (not isinstance(self.task, str) or not isinstance(self.run_id, str), "task/run_id"),
            (not isinstance(self.serializer, str), "serializer"),
            (type(self.size) is not int or self.size < 0, "size"),
            (not isinstance(self.checksum, str) or not _KEY_RE.match(self.checksum), "checksum"),
            (self.signature is not None and not _is_hex(self.signature, 64), "signature"),
            (not number(self.created_at) or not number(self.duration), "times"),
            (self.expires_at is not None and not number(self.expires_at), "expires_at"),
            (self.fence is not None and type(self.fence) is not int, "fence"),
            (self.seal is not None and not isinstance(self.seal, str), "seal"),
            (
                not isinstance(self.components, dict)
                or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in self.components.items()
                ),
                "components",
            ),
        ]
        bad = [name for failed, name in problems if failed]
        if bad:
            raise ValueError(f"invalid {', '.join(bad)}")


_OPTIONAL_FIELDS = ("fence", "inline", "seal")
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Manifest))

#: Payloads up to this many bytes are kept inside their manifest (one write, one read).
INLINE_LIMIT = 16 * 1024


class _TooBig(Exception):
    """Raised by _BoundedBuffer: the payload will not fit inline."""


class _BoundedBuffer(io.BytesIO):
    """A BytesIO that refuses to grow past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, b: Any) -> int:
        if self.tell() + memoryview(b).nbytes > self.limit:
            raise _TooBig
        return super().write(b)


def _is_hex(value: object, length: int) -> bool:
    return (
        isinstance(value, str)
        and len(value) == length
        and all(c in "0123456789abcdef" for c in value)
    )


# ------------------------------------------------------------------------- write helpers


class _HashingSink(io.RawIOBase):
    """A write-only stream that feeds every byte to xxh3-128 (and an HMAC) on its way out.

    Big writes are cut into 8 MiB chunks: each is hashed while it is hot in cache, then
    handed to ``write_raw``.
    """

    def __init__(self, write_raw: Callable[[memoryview], None], signer: hmac.HMAC | None):
        super().__init__()
        self._write_raw = write_raw
        self._signer = signer
        self.hasher = xxhash.xxh3_128()
        self.size = 0
        self._abandoned = False

    def writable(self) -> bool:
        return True

    def abandon(self) -> None:
        """Drop later writes: a buffer flushed at garbage collection must not reach a file."""
        self._abandoned = True

    def write(self, b: Any) -> int:
        view = memoryview(b)
        if self._abandoned:
            return view.nbytes
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = view.nbytes
        for start in range(0, n, _localfs.CHUNK):
            part = view[start : start + _localfs.CHUNK]
            self.hasher.update(part)
            if self._signer is not None:
                self._signer.update(part)
            self._write_raw(part)
        self.size += n
        return n


# ---------------------------------------------------------------------------- the store

#: Rewritten by any process after it deletes or replaces a manifest (see generation_stamp()).
_GENERATION_REL = "manifests/GENERATION"
#: url → deletes and replacements made by this process (any ResultStore object of it).
_generations: dict[str, int] = {}


class ResultStore:
    """Task results in a folder or bucket: ``lookup`` → ``load`` on a hit, ``commit`` after a run.

    ``url`` is anything ``fsspec.core.url_to_fs`` understands (a local path, ``s3://bucket/x``,
    ``memory://x``, ...); ``storage_options`` go to the filesystem (credentials, endpoint).
    Local paths are made absolute, so a pickled store means the same folder elsewhere.

    ``signing_key`` (or ``$NOTEBOOK_FLOW_SIGNING_KEY``) turns on signing: pickled payloads
    are HMAC-signed on commit, and on load an unsigned or tampered pickle is refused with
    ``SignatureError`` before anything is unpickled. The key is never written to the store.

    The store pickles its configuration, not its connection, and reconnects lazily (also
    after a fork), so it can travel to worker processes.

    >>> store = ResultStore("memory://doc-store")
    >>> store.is_local, store.local_root
    (False, None)
    """

    def __init__(
        self,
        url: str = ".notebook_flow",
        *,
        signing_key: bytes | str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise ConfigurationError(f"store URL must be a non-empty string, not {url!r}")
        self._storage_options = dict(storage_options or {})
        self._explicit_key = signing_key.encode() if isinstance(signing_key, str) else signing_key
        if self._explicit_key is not None and not self._explicit_key:
            raise ConfigurationError("signing_key is empty; pass None to disable signing")
        self._key_from_env = self._explicit_key is None and signing_key_from_env() is not None
        fs: AbstractFileSystem | None
        if "://" not in url and "::" not in url:  # a plain path: no fsspec needed (~30 ms)
            fs, root = None, os.path.expanduser(url)
            self.is_local: bool = True
        else:
            fs, root = self._connect(url)
            self.is_local = _is_local_fs(fs)
        self.local_root: str | None = os.path.abspath(root) if self.is_local else None
        self.url: str = self.local_root if self.local_root is not None else url.rstrip("/")
        self._root = self.local_root if self.local_root is not None else root.rstrip("/")
        self._fs: AbstractFileSystem | None = fs
        self._pid = os.getpid()
        self.inline_limit = INLINE_LIMIT  # bytes; 0 keeps every payload in a file of its own

    # -- configuration, pickling, connection -------------------------------------------

    def _connect(self, url: str) -> tuple[AbstractFileSystem, str]:
        try:
            from fsspec.core import url_to_fs

            fs, root = url_to_fs(url, **self._storage_options)
        except (ImportError, ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"cannot open result store {url!r}: {exc}. Use a local path or an fsspec URL "
                "(s3://bucket/prefix needs `pip install notebook-flow[s3]`)."
            ) from exc
        return fs, root

    @property
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem, reconnected after unpickling or a fork."""
        if self._fs is None or self._pid != os.getpid():
            self._fs, _ = self._connect(self.url)
            self._pid = os.getpid()
        return self._fs

    @property
    def signing(self) -> bool:
        """True when pickled payloads are signed on commit and must be signed on load."""
        return self._explicit_key is not None or self._key_from_env

    def _signing_key(self) -> bytes | None:
        if self._explicit_key is not None:
            return self._explicit_key
        if not self._key_from_env:
            return None
        key = signing_key_from_env()
        if key is None:  # the store was configured from the env var, but it is gone here
            raise SignatureError(
                "this store requires signed pickles but NOTEBOOK_FLOW_SIGNING_KEY is not set "
                "in this process; set it (or pass signing_key=) where the store is used"
            )
        return key

    _STATE = (
        "inline_limit",
        "url",
        "is_local",
        "local_root",
        "_root",
        "_storage_options",
        "_explicit_key",
    )

    def __getstate__(self) -> dict[str, Any]:
        # Configuration only, never the connection. A key that came from the environment
        # is not pickled: the other side re-reads it (and refuses pickles if it is unset).
        state = {name: getattr(self, name) for name in self._STATE}
        state["_key_from_env"] = self._key_from_env
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs = None  # reconnect lazily on first use
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"ResultStore({self.url!r}, signing={self.signing})"

    # -- paths ---------------------------------------------------------------------------

    def _path(self, rel: str) -> str:
        return f"{self._root}/{rel}" if not self.is_local else os.path.join(self._root, rel)

    @staticmethod
    def _manifest_rel(key: str) -> str:
        return f"manifests/{key[:2]}/{key}.json"

    def local_dir(self, name: str) -> str:
        """A local folder for ``name`` (locks, ...), created if needed.

        Inside the store for local stores; for remote ones in a per-URL cache folder
        (``$NOTEBOOK_FLOW_CACHE_DIR`` or ``~/.cache/notebook_flow``, then a hash of the URL).
        """
        if not _LOCAL_NAME_RE.match(name) or name in _RESERVED_NAMES:
            raise ConfigurationError(
                f"invalid local folder name {name!r}: use letters, digits, '_', '-', '.', "
                f"not one of {sorted(_RESERVED_NAMES)}"
            )
        path = os.path.join(self._local_base(), name)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the local folder {path}: {exc}") from exc
        return path

    def metadata_path(self) -> str:
        """Where the DuckDB metadata index lives (always a local file).

        Its folder is created when possible; an unwritable location is not an error here
        (the metadata layer reports it when it writes).
        """
        base = self._local_base()
        with contextlib.suppress(OSError):
            os.makedirs(base, exist_ok=True)
        return os.path.join(base, "metadata.duckdb")

    def _local_base(self) -> str:
        if self.local_root is not None:
            base = self.local_root
        else:
            cache = os.environ.get(CACHE_DIR_ENV) or os.path.join(
                os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                "notebook_flow",
            )
            # The endpoint is part of the identity: two servers may both have s3://bucket.
            ident = self.url
            endpoint = self._storage_options.get("client_kwargs", {}).get("endpoint_url")
            if endpoint:
                ident += f"\0{endpoint}"
            base = os.path.join(cache, xxhash.xxh3_64_hexdigest(ident.encode()))
        return base

    # -- low-level I/O: local files directly, everything else through fsspec -------------

    def _read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        if self.is_local:
            with open(path, "rb") as f:
                return f.read()
        data = self.fs.cat_file(path)
        return bytes(data)

    def _write_atomic(self, rel: str, fill: Callable[[Callable[[memoryview], None]], None]) -> None:
        path = self._path(rel)
        if self.is_local:
            _localfs.write_atomic(path, fill)
            return
        buf = io.BytesIO()
        fill(buf.write)  # type: ignore[arg-type]
        self.fs.pipe_file(path, buf.getvalue())  # one PUT: an object appears whole or not

    def _remove(self, rel: str) -> bool:
        path = self._path(rel)
        try:
            if self.is_local:
                os.unlink(path)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    def _remove_quietly(self, rel: str) -> None:
        if not rel:  # an inline payload has no file of its own
            return
        try:
            self._remove(rel)
        except OSError as exc:
            logger.warning("could not remove %s from %s: %s", rel, self.url, exc)

    def _list(self, rel_dir: str) -> list[tuple[str, float | None]]:
        """(relative path, mtime or None) of every file below ``rel_dir``."""
        top = self._path(rel_dir)
        out: list[tuple[str, float | None]] = []
        if self.is_local:
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    full = os.path.join(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):
                        out.append((os.path.relpath(full, self._root), os.stat(full).st_mtime))
            return out
        fs = self.fs
        fs.invalidate_cache(top)
        try:
            found = fs.find(top, detail=True)
        except FileNotFoundError:
            return out
        for path, info in found.items():
            if info.get("type", "file") == "file":
                out.append((path[len(self._root) + 1 :], _info_mtime(info)))
        return out

    # -- read path -------------------------------------------------------------------------

    def manifest_stamp(self, key: str) -> tuple[int, int, int] | None:
        """A cheap change stamp of ``key``'s manifest (local stores only), or None.

        ``(mtime_ns, inode, size)`` of the manifest file: a commit replaces the file, so a
        changed stamp means a changed manifest. Remote stores return None (no cheap check).
        """
        if not self.is_local:
            return None
        try:
            st = os.stat(f"{self._root}/manifests/{key[:2]}/{key}.json")
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def changes_here(self) -> int:
        """Deletes and replacements of manifests this process made in this store (through
        any ResultStore object of its URL); in-process caches compare it, see generation_stamp.
        """
        return _generations.get(self.url, 0)

    def generation_stamp(self) -> tuple[int, int, int] | None:
        """The stat stamp of the store's generation file, which every process rewrites after
        it deletes or replaces a manifest (local stores; None elsewhere, or before the first
        such change). A commit of a new key changes nothing: nobody holds a result for it.
        """
        if not self.is_local:
            return None
        try:
            st = os.stat(os.path.join(self._root, _GENERATION_REL))
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def _changed(self) -> None:
        """A manifest was deleted or replaced: tell in-process caches and other processes'."""
        _generations[self.url] = _generations.get(self.url, 0) + 1
        if not self.is_local:
            return
        path = os.path.join(self._root, _GENERATION_REL)
        head, tail = os.path.split(path)
        tmp = os.path.join(head, f".{tail}.{secrets.token_hex(4)}.tmp")  # remove_orphans: temp
        try:
            # A new inode each time: the stamp changes whatever the clock's granularity. No
            # fsync: the file only signals processes running now.
            with open(tmp, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()} {time.time_ns()}\n")
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            logger.debug("could not update %s: %s", path, exc)

    def lookup(self, key: str) -> Manifest | None:
        """The manifest committed for ``key``, or None.

        Expired manifests are returned too (check ``manifest.expired()``). A manifest that
        cannot be read or parsed, or names an unknown format, is reported with a
        ``StorageWarning`` and treated as missing: a bad file never crashes a task.
        """
        key = validate_key(key)
        rel = self._manifest_rel(key)
        try:
            data = self._read_bytes(rel)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._warn(f"cannot read manifest {rel}: {exc}")
            return None
        return self._parse_manifest(data, rel, key)

    def _parse_manifest(self, data: bytes, rel: str, key: str | None) -> Manifest | None:
        try:
            manifest = Manifest.from_json(data, key=key)
            get_serializer(manifest.serializer)
        except ConfigurationError as exc:
            self._warn(f"manifest {rel} names an unknown format: {exc}")
            return None
        except (ValueError, TypeError) as exc:
            self._warn(f"manifest {rel} is invalid and was ignored: {exc}")
            return None
        return manifest

    def _warn(self, message: str) -> None:
        logger.warning("%s (store %s)", message, self.url)
        warnings.warn(f"{message} (store {self.url})", StorageWarning, stacklevel=3)

    def load(self, manifest: Manifest) -> object:
        """The value a manifest commits, after checking its size and checksum.

        Raises ``PayloadCorruptError`` when the payload is missing, truncated or altered
        (callers treat it as a miss) and ``SignatureError`` when signing is on and a pickle
        is unsigned or its signature does not match (it is then never unpickled).
        Local ``npy``/``arrow`` payloads come back memory-mapped and read-only.
        """
        serializer = get_serializer(manifest.serializer)
        mac = None
        if serializer.pickles and self.signing:
            signing_key = self._signing_key()
            assert signing_key is not None
            mac = new_signer(signing_key, manifest.key, serializer.name)
            if manifest.signature is None:
                verify_signature(mac, None, what=self._what(manifest))
        if manifest.inline is not None:
            try:
                data = base64.b64decode(manifest.inline, validate=True)
            except ValueError as exc:
                raise PayloadCorruptError(f"{self._what(manifest)} is not valid base64") from exc
        elif self.is_local:
            return self._load_local(manifest, serializer, mac)
        else:
            data = self._read_payload(manifest)
        self._check(manifest, len(data), xxhash.xxh3_128_hexdigest(data))
        if mac is not None:
            mac.update(data)
            verify_signature(mac, manifest.signature, what=self._what(manifest))
        return self._deserialize(serializer, io.BytesIO(data), None, manifest)

    def _read_payload(self, manifest: Manifest) -> bytes:
        try:
            return self._read_bytes(manifest.payload)
        except FileNotFoundError:
            raise self._missing(manifest) from None
        except OSError as exc:
            raise PayloadCorruptError(f"cannot read {self._what(manifest)}: {exc}") from exc

    def _load_local(self, manifest: Manifest, serializer: Serializer, mac: Any) -> object:
        path = self._path(manifest.payload)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, or handed on
        except FileNotFoundError:
            raise self._missing(manifest) from None
        except OSError as exc:
            raise PayloadCorruptError(f"cannot read {self._what(manifest)}: {exc}") from exc
        with f:
            st = os.fstat(f.fileno())
            identity = _localfs.file_identity(st)
            known = _localfs.verified_checksum(identity)
            if mac is not None or (
                known != manifest.checksum
                and (manifest.seal is None or manifest.seal != _localfs.seal_of(st))
            ):
                self._check(manifest, st.st_size, None)
                # One pass over the mapped file feeds both digests; xxh3 runs at >10 GB/s.
                with _localfs.mapped(f, st.st_size) as view:
                    self._check(manifest, st.st_size, xxhash.xxh3_128_hexdigest(view))
                    if mac is not None:
                        mac.update(view)
                        verify_signature(mac, manifest.signature, what=self._what(manifest))
            if known != manifest.checksum:  # verified now, or sealed at commit
                _localfs.remember_verified(identity, manifest.checksum)
            return self._deserialize(serializer, f, path, manifest)

    def _deserialize(
        self, serializer: Serializer, f: BinaryIO, path: str | None, manifest: Manifest
    ) -> object:
        try:
            return serializer.load(f, local_path=path)
        except FileNotFoundError:  # a by-path reader (np.load) lost a race with a delete
            raise self._missing(manifest) from None
        except (SerializationError, MemoryError):
            raise
        except Exception as exc:
            # The checksum matched, so the bytes are what was written: a format/library
            # mismatch (e.g. written by a newer pyarrow) or a class that no longer exists.
            raise SerializationError(f"cannot load {self._what(manifest)}: {exc}") from exc

    def _check(self, manifest: Manifest, size: int, checksum: str | None) -> None:
        if size != manifest.size:
            raise PayloadCorruptError(
                f"{self._what(manifest)} has {size} bytes, its manifest says {manifest.size} "
                "(truncated or replaced); it will be recomputed"
            )
        if checksum is not None and checksum != manifest.checksum:
            raise PayloadCorruptError(
                f"{self._what(manifest)} does not match its checksum (corrupted on disk or "
                "altered); it will be recomputed"
            )

    def _missing(self, manifest: Manifest) -> PayloadCorruptError:
        return PayloadCorruptError(
            f"{self._what(manifest)} is missing (deleted, or replaced by a newer commit "
            "since the manifest was read); it will be recomputed"
        )

    def _what(self, manifest: Manifest) -> str:
        return f"payload {manifest.payload} of task {manifest.task!r} in {self.url}"

    def iter_manifests(self) -> Iterator[Manifest]:
        """Every valid manifest in the store (invalid ones are skipped with a warning)."""
        rels = [rel for rel, _mtime in self._list("manifests") if _is_manifest_rel(rel)]
        if self.is_local:
            for rel in sorted(rels):
                try:
                    data = self._read_bytes(rel)
                except FileNotFoundError:  # deleted since listed
                    continue
                except OSError as exc:
                    self._warn(f"cannot read manifest {rel}: {exc}")
                    continue
                m = self._parse_manifest(data, rel, rel[-37:-5])
                if m is not None:
                    yield m
            return
        paths = [self._path(rel) for rel in sorted(rels)]
        if not paths:
            return
        for path, data in self.fs.cat(paths, on_error="return").items():
            rel = path[len(self._root) + 1 :]
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, Exception):
                self._warn(f"cannot read manifest {rel}: {data}")
                continue
            m = self._parse_manifest(data, rel, rel[-37:-5])
            if m is not None:
                yield m

    # -- write path ------------------------------------------------------------------------

    def commit(
        self,
        key: str,
        value: object,
        *,
        task: str,
        components: dict[str, str],
        run_id: str,
        duration: float,
        expires_at: float | None,
        serializer: str | Serializer | None = None,
        before_manifest: Callable[[], None] | None = None,
        fence: int | None = None,
    ) -> Manifest:
        """Store ``value`` as the result for ``key``; returns the committed manifest.

        ``serializer`` forces a format (by name or object); by default one is chosen by
        type, and a DataFrame that Parquet cannot hold exactly is pickled. Raises
        ``CommitError`` (cause attached) when the store cannot be written and
        ``SerializationError`` when the value cannot be serialized; in both cases nothing is
        committed and no partial file is visible. ``before_manifest`` runs after the payload
        is written and before the manifest: if it raises (e.g. ``LeaseLostError``) the
        payload is removed and its exception propagates unchanged.
        """
        key = validate_key(key)
        chosen = choose_serializer(value, serializer)
        inline = seal = None
        small = self._inline_payload(key, chosen, value)
        try:
            if small is not None:
                rel, (size, checksum, signature, inline) = "", small
            else:
                rel, size, checksum, signature, seal = self._write_payload(key, chosen, value)
        except SerializerDeclined as exc:
            if serializer is not None:
                raise SerializationError(
                    f"serializer {chosen.name!r} cannot store this value exactly ({exc}); "
                    "pass serializer=None to let notebook_flow pick one"
                ) from exc
            logger.debug("%s declined the result of %s (%s); pickling it", chosen.name, task, exc)
            chosen = _PICKLE
            rel, size, checksum, signature, seal = self._write_payload(key, chosen, value)

        manifest = Manifest(
            format_version=FORMAT_VERSION,
            key=key,
            task=task,
            serializer=chosen.name,
            payload=rel,
            size=size,
            checksum=checksum,
            signature=signature,
            created_at=time.time(),
            expires_at=expires_at,
            duration=duration,
            components=dict(components),
            run_id=run_id,
            fence=fence,
            inline=inline,
            seal=seal,
        )
        if before_manifest is not None:
            try:
                before_manifest()
            except BaseException:
                self._remove_quietly(rel)
                raise
        previous = self._read_previous(key)
        data = manifest.to_json()
        try:
            self._write_atomic(self._manifest_rel(key), lambda write: write(memoryview(data)))
        except BaseException as exc:
            # If the manifest landed after all (say, only the folder fsync failed), keep the
            # payload it names: removing it would turn a committed result into a torn one.
            current = self._read_previous(key)
            if current is None or current.payload != rel:
                self._remove_quietly(rel)
            if isinstance(exc, Exception):
                raise CommitError(self._commit_failure(key, exc)) from exc
            raise
        if previous is not None:
            self._changed()
            if previous.payload != rel:
                self._remove_quietly(previous.payload)
        return manifest

    def _inline_payload(
        self, key: str, serializer: Serializer, value: object
    ) -> tuple[int, str, str | None, str] | None:
        """(size, checksum, signature, base64) when ``value`` serializes small enough to
        live inside its manifest, else None.

        A small result then commits with one atomic write instead of two (payload file +
        manifest), and a hit reads one file. Only the formats that are never memory-mapped
        (json, pickle) qualify; serialization stops as soon as it passes INLINE_LIMIT.
        """
        if serializer.name not in ("json", "pickle"):
            return None
        if self.inline_limit <= 0:
            return None
        buf = _BoundedBuffer(self.inline_limit)
        try:
            serializer.dump(value, buf)  # type: ignore[arg-type]
        except _TooBig:
            return None
        except Exception:  # declined, or fails: the regular path decides and reports
            return None
        data = buf.getvalue()
        signature = None
        if serializer.pickles and self.signing:
            try:
                signing_key = self._signing_key()
            except SignatureError as exc:
                raise CommitError(str(exc)) from exc
            assert signing_key is not None
            signer = new_signer(signing_key, key, serializer.name)
            signer.update(data)
            signature = signer.hexdigest()
        checksum = xxhash.xxh3_128_hexdigest(data)
        return len(data), checksum, signature, base64.b64encode(data).decode("ascii")

    def _write_payload(
        self, key: str, serializer: Serializer, value: object
    ) -> tuple[str, int, str, str | None, str | None]:
        """Write the payload file: (relative path, size, checksum, signature, seal)."""
        signer = None
        if serializer.pickles and self.signing:
            try:
                signing_key = self._signing_key()
            except SignatureError as exc:
                raise CommitError(str(exc)) from exc
            assert signing_key is not None
            signer = new_signer(signing_key, key, serializer.name)
        rel = f"results/{key[:2]}/{key}-{secrets.token_hex(8)}{serializer.extension}"
        sink: _HashingSink | None = None

        def fill(write_raw: Callable[[memoryview], None]) -> None:
            nonlocal sink
            io_errors: list[BaseException] = []

            def write_checked(view: memoryview) -> None:
                try:
                    write_raw(view)
                except BaseException as exc:  # remembered: the store failed, not the value
                    io_errors.append(exc)
                    raise

            sink = _HashingSink(write_checked, signer)
            buffered = io.BufferedWriter(sink, buffer_size=1 << 20)
            try:
                serializer.dump(value, buffered)  # type: ignore[arg-type]
                if not buffered.closed:
                    buffered.flush()
            except SerializationError:
                raise
            except Exception as exc:
                if io_errors:
                    raise
                raise SerializationError(
                    f"{serializer.name} could not serialize a {type(value).__qualname__}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            finally:
                sink.abandon()  # anything still buffered after a failure is dropped

        try:
            self._write_atomic(rel, fill)
        except SerializationError:
            raise
        except Exception as exc:  # fsspec backends raise more than OSError (boundary)
            self._remove_quietly(rel)
            raise CommitError(self._commit_failure(key, exc)) from exc
        assert sink is not None
        checksum = sink.hasher.hexdigest()
        seal = None
        if self.is_local:
            # We hashed these bytes as we wrote them: a later load needs no re-hash, in this
            # process (the memo) or another one on this machine and boot (the seal).
            with contextlib.suppress(OSError):
                st = os.stat(self._path(rel))
                _localfs.remember_verified(_localfs.file_identity(st), checksum)
                seal = _localfs.seal_of(st)
        return rel, sink.size, checksum, signer.hexdigest() if signer else None, seal

    def _read_previous(self, key: str) -> Manifest | None:
        """The current manifest, whose payload the new commit replaces (quietly)."""
        try:
            data = self._read_bytes(self._manifest_rel(key))
        except OSError:
            return None
        return self._parse_quietly(data, key)

    @staticmethod
    def _parse_quietly(data: bytes, key: str) -> Manifest | None:
        try:
            return Manifest.from_json(data, key=key)
        except (ValueError, TypeError):
            return None

    def _commit_failure(self, key: str, exc: BaseException) -> str:
        return (
            f"could not commit the result for key {key} to {self.url}: "
            f"{type(exc).__name__}: {exc}. Check that the store is writable (permissions, "
            "free space, credentials); nothing was committed."
        )

    def delete(self, key: str) -> bool:
        """Remove the entry for ``key`` (manifest first, then payload); False if absent."""
        deleted = self._delete(validate_key(key))
        if deleted:
            self._changed()
        return deleted

    def _delete(self, key: str) -> bool:
        rel = self._manifest_rel(key)
        try:
            data: bytes | None = self._read_bytes(rel)
        except FileNotFoundError:
            return False  # (object stores delete idempotently, so ask first)
        except OSError:
            data = None  # unreadable: still try to remove it
        previous = self._parse_quietly(data, key) if data is not None else None
        try:
            self._remove(rel)
        except OSError as exc:
            raise StorageError(f"could not delete key {key} from {self.url}: {exc}") from exc
        if previous is not None:
            self._remove_quietly(previous.payload)
        return True

    def clear(self, task: str | None = None) -> int:
        """Delete every entry (or only those of ``task``); returns how many were deleted."""
        count = 0
        try:
            for manifest in list(self.iter_manifests()):
                if (task is None or manifest.task == task) and self._delete(manifest.key):
                    count += 1
        finally:
            if count:
                self._changed()
        return count

    def remove_orphans(self, older_than: float = 3600.0) -> list[str]:
        """Delete leftovers no manifest names: temp files of interrupted writes, and payloads
        left by a crash before their manifest (or by two writers racing on one key).

        Only files older than ``older_than`` seconds are touched, so a commit in flight
        (payload written, manifest not yet) is left alone. Returns the removed paths,
        relative to the root.
        """
        referenced = {m.payload for m in self.iter_manifests()}
        cutoff = time.time() - older_than
        removed: list[str] = []
        for top in ("results", "manifests"):
            for rel, mtime in self._list(top):
                name = rel.rsplit("/", 1)[-1]
                orphan = _localfs.is_temp_name(name) or (
                    top == "results" and _PAYLOAD_RE.match(rel) and rel not in referenced
                )
                if orphan and (mtime is None or mtime <= cutoff):
                    with contextlib.suppress(OSError):
                        if self._remove(rel):
                            removed.append(rel)
        return removed


_PICKLE = PickleSerializer()


def _is_local_fs(fs: AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _is_manifest_rel(rel: str) -> bool:
    parts = rel.split("/")
    return (
        len(parts) == 3
        and _SHARD_RE.match(parts[1]) is not None
        and _MANIFEST_NAME_RE.match(parts[2]) is not None
        and parts[2].startswith(parts[1])
    )


def _info_mtime(info: dict[str, Any]) -> float | None:
    for field in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, (int, float)):
            return float(value)
        timestamp = getattr(value, "timestamp", None)
        if callable(timestamp):
            return float(timestamp())
    return None
