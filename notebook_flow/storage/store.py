"""ResultStore: lookup, load, commit, delete; paths and low-level I/O on fsspec or local files.

The commit protocol itself (payload first, manifest last) is ``ResultStore.commit``; the
payload's bytes are written and verified by :mod:`.payload`, and the manifest's format is
:mod:`.manifest`. See :mod:`notebook_flow.storage` for the layout and why it is crash-safe.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import io
import logging
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypedDict

import xxhash

from notebook_flow import _localfs, provenance
from notebook_flow.errors import (
    CommitError,
    ConfigurationError,
    PayloadCorruptError,
    SerializationError,
    SignatureError,
    StorageError,
)
from notebook_flow.serializers import (
    PickleSerializer,
    Serializer,
    SerializerDeclined,
    choose_serializer,
    get_serializer,
    new_signer,
    verify_signature,
)
from notebook_flow.signing import check_key, default_signing_key

from . import behind, files, group, payload, trust
from .manifest import _PAYLOAD_RE, FORMAT_VERSION, Manifest, _is_manifest_rel, validate_key

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from typing_extensions import Unpack

logger = logging.getLogger("notebook_flow")

#: Where remote stores keep their local files (metadata, locks); default ~/.cache/notebook_flow.
CACHE_DIR_ENV = "NOTEBOOK_FLOW_CACHE_DIR"

_LOCAL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED_NAMES = frozenset(
    {"results", "manifests", "transactions", "quarantine", "metadata.duckdb"}
)

#: Payloads up to this many bytes are kept inside their manifest (one write, one read).
#: Read when a ResultStore is created (its ``inline_limit``): patch it here, in this module.
INLINE_LIMIT = 16 * 1024


class _EntryFields(TypedDict):
    task: str
    components: dict[str, str]
    run_id: str
    duration: float
    expires_at: float | None


class StageOptions(_EntryFields, total=False):
    """What :meth:`ResultStore.stage` (and ``commit``) record with a value, besides its key:
    the task's identity, the key's components, the run, its duration and expiry; a forced
    serializer; the lock's fencing token."""

    serializer: str | Serializer | None
    fence: int | None


class StorageWarning(UserWarning):
    """A stored file was unreadable or invalid and was treated as missing (a cache miss)."""


#: Rewritten by any process after it deletes or replaces a manifest (see generation_stamp()).
_GENERATION_REL = "manifests/GENERATION"
#: url → deletes and replacements made by this process (any ResultStore object of it).
_generations: dict[str, int] = {}

#: Keys this context has just seen absent from the store (a batched lookup on a Dask
#: worker, ``storage/batch.py``): their commit skips reading the manifest it would
#: replace. Only the removal of a replaced payload depends on that read, so a wrong hint
#: (someone committed the key meanwhile) leaves an orphan payload that
#: ``remove_orphans`` collects, never a wrong or torn entry.
assumed_absent: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "notebook_flow_assumed_absent", default=frozenset()
)


class ResultStore:
    """Task results in a folder or bucket: ``lookup`` → ``load`` on a hit, ``commit`` after a run.

    ``url`` is anything ``fsspec.core.url_to_fs`` understands (a local path, ``s3://bucket/x``,
    ``memory://x``, ...); ``storage_options`` go to the filesystem (credentials, endpoint).
    Local paths are made absolute, so a pickled store means the same folder elsewhere.

    Every entry is signed (see :mod:`notebook_flow.signing`): its payload's HMAC and an HMAC
    of its whole manifest. ``lookup`` believes only a manifest that verifies (anything else
    is a miss, with one ``StorageWarning`` per store), and ``load`` refuses with
    ``SignatureError`` before deserializing anything unverified. The key is ``signing_key``
    if given (at least 16 bytes), else ``$NOTEBOOK_FLOW_SIGNING_KEY``, else this user's key
    file, created on first use; it is never written to the store.

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
        self._explicit_key = None if signing_key is None else check_key(signing_key, "signing_key")
        fs: AbstractFileSystem | None
        if "://" not in url and "::" not in url:  # a plain path: no fsspec needed (~30 ms)
            fs, root = None, os.path.expanduser(url)
            self.is_local: bool = True
        else:
            fs, root = self._connect(url)
            self.is_local = files.is_local_fs(fs)
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
        """Always True: every entry is signed on commit and verified on read."""
        return True

    def _signing_key(self) -> bytes:
        if self._explicit_key is not None:
            return self._explicit_key
        return default_signing_key()

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
        # Configuration only, never the connection. A default key (environment or key
        # file) is not pickled: the other side resolves its own.
        return {name: getattr(self, name) for name in self._STATE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs = None  # reconnect lazily on first use
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"ResultStore({self.url!r})"

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
        if os.path.islink(path):  # never create files through a link planted in the store
            raise StorageError(f"{path} is a symlink; notebook_flow does not follow it. Remove it.")
        return path

    def metadata_path(self) -> str:
        """Where the DuckDB metadata index lives (always a local file).

        Its folder is created when possible; an unwritable location is not an error here
        (the metadata layer reports it when it writes).
        """
        base = self._local_base()
        with contextlib.suppress(OSError):
            os.makedirs(base, exist_ok=True)
        path = os.path.join(base, "metadata.duckdb")
        planted = [p for p in (path, path + ".wal", path + ".lock") if os.path.islink(p)]
        if planted and self.local_root is not None:
            # A link in a shared store would make DuckDB write wherever it points: keep the
            # index in this user's cache folder instead (as for remote stores).
            logger.warning(
                "%s is a symlink; the metadata index of %s is kept in your cache folder "
                "instead. Remove the link to keep it in the store.",
                planted[0],
                self.url,
            )
            base = self._cache_base()
            with contextlib.suppress(OSError):
                os.makedirs(base, exist_ok=True)
            path = os.path.join(base, "metadata.duckdb")
        return path

    def _local_base(self) -> str:
        return self.local_root if self.local_root is not None else self._cache_base()

    def _cache_base(self) -> str:
        """This store's folder in the user's cache (local files of remote stores)."""
        cache = os.environ.get(CACHE_DIR_ENV) or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
            "notebook_flow",
        )
        # The endpoint is part of the identity: two servers may both have s3://bucket.
        ident = self.url
        endpoint = self._storage_options.get("client_kwargs", {}).get("endpoint_url")
        if endpoint:
            ident += f"\0{endpoint}"
        return os.path.join(cache, xxhash.xxh3_64_hexdigest(ident.encode()))

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
            files.check_local_folder(self, _GENERATION_REL)  # not through a planted symlink
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
        ``StorageWarning`` and treated as missing: a bad file never crashes a task. So is
        one of a transaction whose commit record does not exist (yet): see :mod:`.group`.
        """
        key = validate_key(key)
        behind.wait_key(self.url, key)
        rel = self._manifest_rel(key)
        try:
            data = files.read_small(self, rel)
        except files.NotRegularFile as exc:
            self._warn(f"manifest {rel} was ignored: {exc}")
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._warn(f"cannot read manifest {rel}: {exc}")
            return None
        manifest = self._parse_manifest(data, rel, key)
        if manifest is not None and manifest.txn is not None:
            return group.believe(self, manifest)  # None until its transaction committed
        return manifest

    def _parse_manifest(
        self, data: bytes, rel: str, key: str | None, *, verify: bool = True
    ) -> Manifest | None:
        """The manifest in ``data`` if it is valid (and, with ``verify``, authenticated)."""
        try:
            manifest = Manifest.from_json(data, key=key)
            get_serializer(manifest.serializer)
        except ConfigurationError as exc:
            self._warn(f"manifest {rel} names an unknown format: {exc}")
            return None
        except (ValueError, TypeError) as exc:
            self._warn(f"manifest {rel} is invalid and was ignored: {exc}")
            return None
        return trust.accept(self, manifest, rel, data) if verify else manifest

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
        what = payload.what(self, manifest)
        if not trust.verified(self, manifest):
            raise SignatureError(
                f"{what} is not signed with this process's key; it was not loaded. {trust.FIX}"
            )
        mac = new_signer(self._signing_key(), manifest.key, serializer.name)
        if manifest.signature is None:  # (the mac covers it: only a writer bug gets here)
            verify_signature(mac, None, what=what)
        if manifest.inline is not None:
            try:
                data = base64.b64decode(manifest.inline, validate=True)
            except ValueError as exc:
                raise PayloadCorruptError(
                    f"{payload.what(self, manifest)} is not valid base64"
                ) from exc
        elif self.is_local:
            return payload.load_local(self, manifest, serializer, mac)
        elif payload.maps_remote(self, manifest):
            return payload.load_remote_mapped(self, manifest, serializer, mac)
        else:
            data = payload.read_payload(self, manifest)
        payload.check(self, manifest, len(data), xxhash.xxh3_128_hexdigest(data))
        mac.update(data)
        verify_signature(mac, manifest.signature, what=what)
        return payload.deserialize(self, serializer, io.BytesIO(data), None, manifest)

    def iter_manifests(self, *, verified: bool = True) -> Iterator[Manifest]:
        """Every valid manifest in the store (invalid ones are skipped with a warning).

        With ``verified=False`` also those that do not verify under this process's key, and
        those of uncommitted transactions (for deleting them: nothing read from them is
        believed).
        """
        if verified:
            for m in self._iter_manifests(verified=True):
                if m.txn is None or group.visible(self, m):
                    yield m
        else:
            yield from self._iter_manifests(verified=False)

    def _iter_manifests(self, *, verified: bool) -> Iterator[Manifest]:
        behind.flush(self.url)
        rels = [rel for rel, _mtime in files.list_files(self, "manifests") if _is_manifest_rel(rel)]
        if self.is_local:
            for rel in sorted(rels):
                try:
                    data = files.read_bytes(self, rel)
                except FileNotFoundError:  # deleted since listed
                    continue
                except OSError as exc:
                    self._warn(f"cannot read manifest {rel}: {exc}")
                    continue
                m = self._parse_manifest(data, rel, rel[-37:-5], verify=verified)
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
            m = self._parse_manifest(data, rel, rel[-37:-5], verify=verified)
            if m is not None:
                yield m

    # -- write path ------------------------------------------------------------------------

    def commit(
        self,
        key: str,
        value: object,
        *,
        before_manifest: Callable[[], None] | None = None,
        **options: Unpack[StageOptions],
    ) -> Manifest:
        """Store ``value`` as the result for ``key``; returns the committed manifest.

        ``options`` are :meth:`stage`'s (:class:`StageOptions`). ``serializer`` forces a
        format (by name or object); by default one is chosen by type, and a DataFrame that
        Parquet cannot hold exactly is pickled. Raises
        ``CommitError`` (cause attached) when the store cannot be written and
        ``SerializationError`` when the value cannot be serialized; in both cases nothing is
        committed and no partial file is visible. ``before_manifest`` runs after the payload
        is written and before the manifest: if it raises (e.g. ``LeaseLostError``) the
        payload is removed and its exception propagates unchanged.
        """
        return self.publish(self.stage(key, value, **options), before_manifest=before_manifest)

    def stage(
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
        fence: int | None = None,
    ) -> Manifest:
        """Write the payload of ``value`` for ``key`` but not its manifest: nothing is
        visible until :meth:`publish` (a transaction's commit); :meth:`discard` removes it.
        A staged payload that is never published is an orphan that ``remove_orphans``
        collects. Raises as :meth:`commit` does."""
        key = validate_key(key)
        behind.wait_key(self.url, key)  # after this process's pending commit of the key
        chosen = choose_serializer(value, serializer)
        inline = seal = None
        small = payload.inline_payload(self, key, chosen, value)
        try:
            if small is not None:
                rel, (size, checksum, signature, inline) = "", small
            else:
                rel, size, checksum, signature, seal = payload.write_payload(
                    self, key, chosen, value
                )
        except SerializerDeclined as exc:
            if serializer is not None:
                raise SerializationError(
                    f"serializer {chosen.name!r} cannot store this value exactly ({exc}); "
                    "pass serializer=None to let notebook_flow pick one"
                ) from exc
            logger.debug("%s declined the result of %s (%s); pickling it", chosen.name, task, exc)
            chosen = _PICKLE
            rel, size, checksum, signature, seal = payload.write_payload(self, key, chosen, value)

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
            provenance=provenance.collect(value, chosen.name, task),
        )
        # Signed here: a staged manifest is published later unchanged.
        return trust.sign(self, manifest)

    def discard(self, manifest: Manifest) -> None:
        """Remove the payload of a staged, unpublished manifest (a rolled-back result)."""
        files.remove_quietly(self, manifest.payload)

    def publish(
        self, manifest: Manifest, *, before_manifest: Callable[[], None] | None = None
    ) -> Manifest:
        """Make a staged result visible: write its manifest (the commit point).

        ``before_manifest`` runs first: if it raises (e.g. ``LeaseLostError``) the payload
        is removed and its exception propagates unchanged."""
        key = manifest.key
        rel = manifest.payload
        if before_manifest is not None:
            try:
                before_manifest()
            except BaseException:
                files.remove_quietly(self, rel)
                raise
        previous = None if key in assumed_absent.get() else self._read_previous(key)
        data = manifest.to_json()
        try:
            files.write_atomic(self, self._manifest_rel(key), lambda write: write(memoryview(data)))
        except BaseException as exc:
            # If the manifest landed after all (say, only the folder fsync failed), keep the
            # payload it names: removing it would turn a committed result into a torn one.
            current = self._read_previous(key)
            if current is None or current.payload != rel:
                files.remove_quietly(self, rel)
            if isinstance(exc, Exception):
                raise CommitError(self._commit_failure(key, exc)) from exc
            raise
        if previous is not None:
            self._changed()
            if previous.payload != rel:
                files.remove_quietly(self, previous.payload)
        return manifest

    def _read_previous(self, key: str) -> Manifest | None:
        """The current manifest, whose payload the new commit replaces (quietly)."""
        try:
            data = files.read_small(self, self._manifest_rel(key))
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
        key = validate_key(key)
        behind.wait_key(self.url, key)
        deleted = self._delete(key)
        if deleted:
            self._changed()
        return deleted

    def _delete(self, key: str) -> bool:
        rel = self._manifest_rel(key)
        try:
            data: bytes | None = files.read_bytes(self, rel)
        except FileNotFoundError:
            return False  # (object stores delete idempotently, so ask first)
        except OSError:
            data = None  # unreadable: still try to remove it
        previous = self._parse_quietly(data, key) if data is not None else None
        try:
            files.remove(self, rel)
        except OSError as exc:
            raise StorageError(f"could not delete key {key} from {self.url}: {exc}") from exc
        if previous is not None:
            files.remove_quietly(self, previous.payload)
        return True

    def clear(self, task: str | None = None) -> int:
        """Delete every entry (or only those of ``task``); returns how many were deleted."""
        count = 0
        try:
            for manifest in list(self.iter_manifests(verified=False)):
                if (task is None or manifest.task == task) and self._delete(manifest.key):
                    count += 1
        finally:
            if count:
                self._changed()
        return count

    def find_orphans(
        self, older_than: float = 3600.0, *, referenced: set[str] | None = None
    ) -> list[str]:
        """Leftovers no manifest names (see :meth:`remove_orphans`), relative to the root.

        ``referenced``: the payloads the manifests name, when the caller has read them
        already (``notebook-flow check``); by default every manifest is read.
        """
        if referenced is None:
            # Unverified manifests count too: a teammate's entries (another key) are not
            # ours to collect.
            referenced = {m.payload for m in self.iter_manifests(verified=False)}
        cutoff = time.time() - older_than
        found: list[str] = []
        for top in ("results", "manifests", group.RECORDS):
            for rel, mtime in files.list_files(self, top):
                name = rel.rsplit("/", 1)[-1]
                orphan = _localfs.is_temp_name(name) or (
                    top == "results" and _PAYLOAD_RE.match(rel) and rel not in referenced
                )
                if orphan and (mtime is None or mtime <= cutoff):
                    found.append(rel)
        return found

    def remove_orphans(self, older_than: float = 3600.0) -> list[str]:
        """Delete leftovers no manifest names: temp files of interrupted writes, and payloads
        left by a crash before their manifest (or by two writers racing on one key).

        Only files older than ``older_than`` seconds are touched, so a commit in flight
        (payload written, manifest not yet) is left alone. Transactions whose committer
        died are finished first (:func:`.group.recover`: rolled forward once their commit
        record exists, else back). Returns the removed paths, relative to the root.
        """
        removed = group.recover(self, older_than)
        for rel in self.find_orphans(older_than):
            with contextlib.suppress(OSError):
                if files.remove(self, rel):
                    removed.append(rel)
        return removed


# Pickles and fingerprints name the classes where they were first defined (and are
# re-exported): notebook_flow.storage.
ResultStore.__module__ = StorageWarning.__module__ = "notebook_flow.storage"

_PICKLE = PickleSerializer()
