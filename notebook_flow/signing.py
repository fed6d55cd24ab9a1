"""The signing key: where it comes from, and the HMAC that authenticates every manifest.

Every entry a store holds is authenticated: its manifest carries ``mac``, an HMAC-SHA256
over a canonical serialization of *every other field* (task, key, serializer, payload
name or inline bytes, size, checksum, payload signature, expiry, format version, ...), and
the payload's own HMAC (``signature``) is one of those fields. A reader that cannot verify
both never deserializes anything from the entry: it is a cache miss (see
:mod:`notebook_flow.storage.trust`).

The key, in the order it is looked for:

1. ``configure(signing_key=...)`` or ``ResultStore(signing_key=...)``;
2. ``$NOTEBOOK_FLOW_SIGNING_KEY`` (its UTF-8 bytes);
3. the key file ``signing_key`` in the user's config folder (``$NOTEBOOK_FLOW_CONFIG_DIR``,
   else ``$XDG_CONFIG_HOME/notebook_flow``, else ``~/.config/notebook_flow``), created with
   32 random bytes (64 hex characters) and mode 0600 on first use.

The key is never written into a store or a notebook. A team that shares a store shares
one key: ``notebook-flow key show`` on one machine, ``notebook-flow key import`` (or the
environment variable) on the others. Keys shorter than 16 bytes are refused everywhere.

>>> len(new_key_text())
64
>>> check_key(b"short", "signing_key")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
notebook_flow.errors.ConfigurationError: signing_key is 5 bytes: a signing key must be ...
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "CONFIG_DIR_ENV",
    "MIN_KEY_BYTES",
    "SIGNING_KEY_ENV",
    "check_key",
    "default_signing_key",
    "import_key",
    "key_file_path",
    "key_id",
    "manifest_mac",
    "new_key_text",
    "record_mac",
]

#: Environment variable holding a shared signing key (its UTF-8 bytes are the key).
SIGNING_KEY_ENV = "NOTEBOOK_FLOW_SIGNING_KEY"
#: Folder of the key file (default ``$XDG_CONFIG_HOME/notebook_flow`` or ``~/.config/...``).
CONFIG_DIR_ENV = "NOTEBOOK_FLOW_CONFIG_DIR"
#: Shorter keys are refused: an HMAC is only as strong as its key.
MIN_KEY_BYTES = 16

_MANIFEST_DOMAIN = b"notebook_flow manifest v1\0"
_RECORD_DOMAIN = b"notebook_flow transaction record v1\0"
_lock = threading.Lock()
_cached: tuple[str, bytes] | None = None  # (key file path, key) read by this process


def check_key(key: object, what: str) -> bytes:
    """``key`` as bytes (a str is UTF-8 encoded) if it is a usable signing key, else raise."""
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes):
        raise ConfigurationError(
            f"{what} must be str or bytes (at least {MIN_KEY_BYTES} bytes), "
            f"not {type(key).__name__}"
        )
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"{what} is {len(key)} bytes: a signing key must be at least {MIN_KEY_BYTES} "
            "bytes. Create one with `notebook-flow key show` (it creates a random key on "
            "first use) or `python -c 'import secrets; print(secrets.token_hex(32))'`."
        )
    return key


def new_key_text() -> str:
    """A fresh random key, as the 64 hex characters stored in the key file."""
    return secrets.token_hex(32)


def key_file_path() -> str:
    """Where this user's signing key lives (it may not exist yet)."""
    folder = os.environ.get(CONFIG_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "notebook_flow"
    )
    return os.path.join(os.path.abspath(folder), "signing_key")


def env_signing_key() -> bytes | None:
    """The key from ``$NOTEBOOK_FLOW_SIGNING_KEY``, None if unset; a weak one is refused."""
    raw = os.environ.get(SIGNING_KEY_ENV)
    if not raw:
        return None
    return check_key(raw, f"environment variable {SIGNING_KEY_ENV}")


def default_signing_key() -> bytes:
    """The key a store uses when given none: the environment variable, else the key file
    (created on first use)."""
    global _cached
    env = env_signing_key()
    if env is not None:
        return env
    path = key_file_path()
    cached = _cached
    if cached is not None and cached[0] == path:
        return cached[1]
    with _lock:
        key = _read_key_file(path)
        if key is None:
            key = _create_key_file(path, new_key_text())
        _cached = (path, key)
        return key


def import_key(text: str) -> str:
    """Write ``text`` as this user's key file (mode 0600), replacing any key; its path."""
    global _cached
    key = check_key(text.strip(), "the imported key")
    path = key_file_path()
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with _lock:
        _cached = None
    return path


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key (to compare keys without showing them)."""
    return hmac.new(key, b"notebook_flow key id", hashlib.sha256).hexdigest()[:16]


def manifest_mac(key: bytes, fields: dict[str, Any]) -> str:
    """HMAC-SHA256 (hex) of a manifest's fields, ``mac`` itself left out.

    (A transaction's commit record is signed by :func:`record_mac`, in another domain: a
    manifest's mac never verifies as a record's, nor the reverse.)

    The serialization is canonical (sorted keys, no spaces, ASCII, absent optional fields
    as null), so it is the same bytes for a manifest and for its JSON read back.
    """
    return _mac(key, _MANIFEST_DOMAIN, fields)


def record_mac(key: bytes, fields: dict[str, Any]) -> str:
    """HMAC-SHA256 (hex) of a transaction commit record's fields, ``mac`` left out
    (canonical as :func:`manifest_mac`; see ``notebook_flow.storage.group``)."""
    return _mac(key, _RECORD_DOMAIN, fields)


def _mac(key: bytes, domain: bytes, fields: dict[str, Any]) -> str:
    body = {name: value for name, value in fields.items() if name != "mac"}
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    mac = hmac.new(key, domain, hashlib.sha256)
    mac.update(data.encode("ascii"))
    return mac.hexdigest()


def _read_key_file(path: str) -> bytes | None:
    """The key in ``path``; None if there is no file. Refuses a file others could read or
    replace, a symlink, or anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the signing key file {path}: {exc}. It must be a regular file "
            f"(not a symlink); remove it to create a new key, or set {SIGNING_KEY_ENV}."
        ) from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"the signing key file {path} is not a regular file")
        if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o077):
            raise ConfigurationError(
                f"the signing key file {path} must be owned by you and private "
                f"(mode {stat.S_IMODE(st.st_mode):o}); run `chmod 600 {path}`"
            )
        text = f.read(4096).strip()
    return check_key(text, f"the signing key in {path}")


def _create_key_file(path: str, text: str) -> bytes:
    """Create the key file with ``text`` unless another process did first; the key."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, text.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # create-if-absent, whole: a racing process reads the winner
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the signing key file {path}: {exc}. Set {SIGNING_KEY_ENV} "
            f"(or {CONFIG_DIR_ENV} to a writable private folder)."
        ) from exc
    key = _read_key_file(path)
    assert key is not None
    return key
