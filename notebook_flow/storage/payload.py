"""Payloads: the bytes of a result, written once under a fresh name and verified on load.

Writing (step 1 of the commit protocol, see :mod:`notebook_flow.storage`): the serializer
streams into a ``_HashingSink`` that feeds xxh3-128 (and, for a signed pickle, the HMAC) on
the way to the file, so the checksum costs no second pass. A local payload is also *sealed*
(``_localfs.seal_of``) and remembered as verified, so this machine need not re-hash it. A
small json/pickle payload skips the file altogether and travels inside its manifest
(``inline_payload``).

Reading: a payload is handed to its serializer only after its size and checksum (and
signature, when signing is on) match the manifest; a local file whose seal or memoized
identity still matches is trusted without re-reading every byte. Anything else raises
``PayloadCorruptError``, which callers treat as a cache miss.

These are functions of a :class:`~notebook_flow.storage.ResultStore`, which owns the paths
and low-level I/O they use.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import secrets
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

from notebook_flow import _localfs
from notebook_flow.errors import (
    CommitError,
    PayloadCorruptError,
    SerializationError,
)
from notebook_flow.serializers import Serializer, new_signer, verify_signature

from . import files

if TYPE_CHECKING:
    import hmac

    from .manifest import Manifest
    from .store import ResultStore


#: Writes at least this big are signed on a second thread while they are hashed and written.
_PARALLEL_SIGN = 4 << 20


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
        signer = self._signer
        worker = None
        if signer is not None and n >= _PARALLEL_SIGN:
            # The HMAC (~1 ms/MB, the GIL released) runs beside xxh3 and the write; the
            # view stays valid until this call returns, and we wait for it before that.
            worker = threading.Thread(target=signer.update, args=(view,), daemon=True)
            worker.start()
            signer = None
        try:
            for start in range(0, n, _localfs.CHUNK):
                part = view[start : start + _localfs.CHUNK]
                self.hasher.update(part)
                if signer is not None:
                    signer.update(part)
                self._write_raw(part)
        finally:
            if worker is not None:
                worker.join()
        self.size += n
        return n


def inline_payload(
    store: ResultStore, key: str, serializer: Serializer, value: object
) -> tuple[int, str, str | None, str] | None:
    """(size, checksum, signature, base64) when ``value`` serializes small enough to
    live inside its manifest, else None.

    A small result then commits with one atomic write instead of two (payload file +
    manifest), and a hit reads one file. Only the formats that are never memory-mapped
    (json, pickle) qualify; serialization stops as soon as it passes INLINE_LIMIT.
    """
    if serializer.name not in ("json", "pickle"):
        return None
    if store.inline_limit <= 0:
        return None
    buf = _BoundedBuffer(store.inline_limit)
    try:
        serializer.dump(value, buf)  # type: ignore[arg-type]
    except _TooBig:
        return None
    except Exception:  # declined, or fails: the regular path decides and reports
        return None
    data = buf.getvalue()
    signer = _signer(store, key, serializer)
    signer.update(data)
    signature = signer.hexdigest()
    checksum = xxhash.xxh3_128_hexdigest(data)
    return len(data), checksum, signature, base64.b64encode(data).decode("ascii")


def _signer(store: ResultStore, key: str, serializer: Serializer) -> Any:
    """The HMAC signer of a payload of ``key`` in ``serializer``'s format."""
    return new_signer(store._signing_key(), key, serializer.name)


def write_payload(
    store: ResultStore, key: str, serializer: Serializer, value: object
) -> tuple[str, int, str, str | None, str | None]:
    """Write the payload file: (relative path, size, checksum, signature, seal)."""
    signer = _signer(store, key, serializer)
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
        files.write_atomic(store, rel, fill)
    except SerializationError:
        raise
    except Exception as exc:  # fsspec backends raise more than OSError (boundary)
        files.remove_quietly(store, rel)
        raise CommitError(store._commit_failure(key, exc)) from exc
    assert sink is not None
    checksum = sink.hasher.hexdigest()
    seal = None
    if store.is_local:
        # We hashed these bytes as we wrote them: a later load needs no re-hash, in this
        # process (the memo) or another one on this machine and boot (the seal).
        with contextlib.suppress(OSError):
            st = os.stat(store._path(rel))
            _localfs.remember_verified(_localfs.file_identity(st), checksum)
            seal = _localfs.seal_of(st)
    return rel, sink.size, checksum, signer.hexdigest(), seal


def read_payload(store: ResultStore, manifest: Manifest) -> bytes:
    try:
        return files.read_bytes(store, manifest.payload)
    except FileNotFoundError:
        raise missing(store, manifest) from None
    except OSError as exc:
        raise PayloadCorruptError(f"cannot read {what(store, manifest)}: {exc}") from exc


def load_local(store: ResultStore, manifest: Manifest, serializer: Serializer, mac: Any) -> object:
    """Load a local payload, verified unless this very file was verified before.

    The manifest is authenticated (its ``mac``), so its seal and checksum are the writer's:
    a file whose identity matches the seal (this boot, same inode, size, mtime and ctime,
    which no write leaves unchanged) or one this process already verified needs no re-read.
    Any other is read once, mapped, for its size, checksum and HMAC.
    """
    try:
        fd = files.open_local(store, manifest.payload)
    except FileNotFoundError:  # also a symlink, FIFO or device: never opened
        raise missing(store, manifest) from None
    except OSError as exc:
        raise PayloadCorruptError(f"cannot read {what(store, manifest)}: {exc}") from exc
    return _load_fd(store, manifest, serializer, mac, fd=fd, real=store._path(manifest.payload))


#: Remote payloads of a format that maps a local file (``npy``, ``arrow``), from this size
#: on, are downloaded once into the store's local cache folder and mapped from there.
MAP_REMOTE_MIN = 16 * 2**20
_MAPPABLE = frozenset({"npy", "arrow"})


def maps_remote(store: ResultStore, manifest: Manifest) -> bool:
    """Whether ``load`` maps a local copy of this remote payload (see load_remote_mapped)."""
    return (
        not store.is_local
        and manifest.inline is None
        and manifest.serializer in _MAPPABLE
        and manifest.size >= MAP_REMOTE_MIN
    )


def load_remote_mapped(
    store: ResultStore, manifest: Manifest, serializer: Serializer, mac: Any
) -> object:
    """Load a large remote payload memory-mapped: downloaded once (streamed to a file, not
    held in memory) into ``payloads/`` of the store's local cache folder, then verified
    (size, checksum, HMAC: the copy is as untrusted as the store) and mapped read-only.

    Payload names are unique per commit, so a copy never goes stale; a copy that does not
    verify (damaged on disk) is fetched again once. Copies stay until removed (they are
    caches: delete the folder at will; a mapped copy stays readable after it is deleted).
    """
    folder = store.local_dir("payloads")
    name = manifest.payload.rsplit("/", 1)[-1]
    path = os.path.join(folder, name)
    for attempt in (1, 2):
        if attempt == 2 or not os.path.exists(path):
            _download(store, manifest, path)
        try:
            flags = os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(path, flags)
        except OSError as exc:
            raise PayloadCorruptError(f"cannot read the local copy {path}: {exc}") from exc
        try:
            return _load_fd(store, manifest, serializer, mac.copy(), fd=fd, real=path)
        except PayloadCorruptError:
            with contextlib.suppress(OSError):
                os.unlink(path)  # damaged, or the object was: fetch it again once
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _download(store: ResultStore, manifest: Manifest, path: str) -> None:
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        store.fs.get_file(store._path(manifest.payload), tmp)
        os.replace(tmp, path)
    except FileNotFoundError:
        raise missing(store, manifest) from None
    except Exception as exc:  # fsspec backends raise more than OSError (boundary)
        raise PayloadCorruptError(f"cannot download {what(store, manifest)}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _load_fd(
    store: ResultStore,
    manifest: Manifest,
    serializer: Serializer,
    mac: Any,
    *,
    fd: int,
    real: str,
) -> object:
    """Verify (unless this file was verified before) and load the open payload file
    ``fd``, whose path is ``real``."""
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PayloadCorruptError(f"{real} is not a regular file; it was not loaded")
        identity = _localfs.file_identity(st)
        known = _localfs.verified_checksum(identity)
        if known != manifest.checksum and (
            manifest.seal is None or manifest.seal != _localfs.seal_of(st)
        ):
            check(store, manifest, st.st_size, None)
            # One pass over the mapped file feeds both digests; xxh3 runs at >10 GB/s.
            with _localfs.mapped(f, st.st_size) as view:
                check(store, manifest, st.st_size, xxhash.xxh3_128_hexdigest(view))
                mac.update(view)
                verify_signature(mac, manifest.signature, what=what(store, manifest))
        if known != manifest.checksum:  # verified now, or sealed at commit
            _localfs.remember_verified(identity, manifest.checksum)
        # Formats that map the file by path get this descriptor's path, so they map the
        # file just verified, even if the name was replaced meanwhile.
        path = _fd_path(fd, real)
        value = deserialize(store, serializer, f, path, manifest)
    if path != real and getattr(value, "filename", None) == path:
        # A np.memmap names its file; the descriptor's path dies (and its number is reused)
        # when we return, so it names the store's file, as np.load(real) would have.
        value.filename = real  # type: ignore[attr-defined]
    return value


def _fd_path(fd: int, path: str) -> str:
    """A path that opens the file behind ``fd`` (Linux ``/proc/self/fd``), else ``path``."""
    proc = f"/proc/self/fd/{fd}"
    return proc if _HAVE_PROC_FD else path


_HAVE_PROC_FD = os.path.isdir("/proc/self/fd")


def deserialize(
    store: ResultStore, serializer: Serializer, f: BinaryIO, path: str | None, manifest: Manifest
) -> object:
    try:
        return serializer.load(f, local_path=path)
    except FileNotFoundError:  # a by-path reader (np.load) lost a race with a delete
        raise missing(store, manifest) from None
    except (SerializationError, MemoryError):
        raise
    except Exception as exc:
        # The checksum matched, so the bytes are what was written: a format/library
        # mismatch (e.g. written by a newer pyarrow) or a class that no longer exists.
        raise SerializationError(f"cannot load {what(store, manifest)}: {exc}") from exc


def check(store: ResultStore, manifest: Manifest, size: int, checksum: str | None) -> None:
    if size != manifest.size:
        raise PayloadCorruptError(
            f"{what(store, manifest)} has {size} bytes, its manifest says {manifest.size} "
            "(truncated or replaced); it will be recomputed"
        )
    if checksum is not None and checksum != manifest.checksum:
        raise PayloadCorruptError(
            f"{what(store, manifest)} does not match its checksum (corrupted on disk or "
            "altered); it will be recomputed"
        )


def missing(store: ResultStore, manifest: Manifest) -> PayloadCorruptError:
    return PayloadCorruptError(
        f"{what(store, manifest)} is missing (deleted, or replaced by a newer commit "
        "since the manifest was read); it will be recomputed"
    )


def what(store: ResultStore, manifest: Manifest) -> str:
    return f"payload {manifest.payload} of task {manifest.task!r} in {store.url}"
