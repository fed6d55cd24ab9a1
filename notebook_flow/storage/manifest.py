"""The manifest: the small JSON record whose atomic replacement commits one result.

A manifest names its payload (a file under ``results/``, or the bytes themselves, base64,
when they are small), its size and xxh3-128 checksum, the payload's HMAC (``signature``),
and when and by which run it was written; ``mac`` authenticates all of it (see
:mod:`notebook_flow.signing`). ``Manifest.to_json`` is the on-disk format
(``FORMAT_VERSION``); ``Manifest.from_json`` validates every field, so a reader trusts
nothing a damaged or foreign file says. Cache keys are validated here too
(``validate_key``): only a valid key is ever joined into a path.

>>> m = Manifest.from_json(Manifest(1, "0" * 32, "t", "json", "", 2, "f" * 32, None, 0.0,
...                                 None, 0.1, {}, "r", inline="e30=").to_json())
>>> m.inline, m.expired()
('e30=', False)
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

from notebook_flow import _json
from notebook_flow.errors import ConfigurationError

#: Version of the manifest format written; a reader skips manifests of versions it does
#: not know. 2 added ``provenance`` (see :mod:`notebook_flow.provenance`); format-1
#: manifests stay readable and keep verifying (an absent ``provenance`` is not part of
#: what the ``mac`` covers), and an older notebook_flow reports a format-2 manifest as
#: "written by a newer version" (a miss), not as a forgery.
FORMAT_VERSION = 2
#: The formats this version reads.
READABLE_VERSIONS = (1, 2)

_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
_PAYLOAD_RE = re.compile(r"^results/([0-9a-f]{2})/([0-9a-f]{32})-[0-9a-f]{16}\.[a-z0-9]{1,16}$")
_MANIFEST_NAME_RE = re.compile(r"^[0-9a-f]{32}\.json$")
_SHARD_RE = re.compile(r"^[0-9a-f]{2}$")


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


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The record that commits one result: which payload, how big, its checksum, when.

    ``payload`` is relative to the store root. ``signature`` is the HMAC-SHA256 (hex) of the
    payload bytes, bound to the key and format; ``mac`` the HMAC-SHA256 of every other field
    (None only in entries written before every entry was signed). Times are UNIX seconds.

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
    mac: str | None = None  # HMAC-SHA256 of every other field: see notebook_flow.signing
    # Who made it, where, with what (format 2; see notebook_flow.provenance).
    provenance: dict[str, str] | None = None
    # The transaction whose commit record makes this entry visible (see .group); None for
    # an entry committed on its own, which a reader believes without further I/O.
    txn: str | None = None

    def fields(self) -> dict[str, Any]:
        """Every field by name (what ``to_json`` writes and the ``mac`` covers).

        Fields added after format 1 (``provenance``, ``txn``) are left out while absent, so
        a format-1 manifest's ``mac`` covers exactly what it covered when it was written
        (and an older reader refuses an entry that names a transaction: its mac does not
        verify there, a miss, which is what an uncommitted entry must be).
        """
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        for late in ("provenance", "txn"):
            if data[late] is None:
                del data[late]
        return data

    def expired(self, now: float | None = None) -> bool:
        """True when ``expires_at`` is set and has passed."""
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at

    def to_json(self) -> bytes:
        # Not dataclasses.asdict: its deep copy doubled the cost, on every commit.
        data = self.fields()
        for optional in ("inline", "seal", "mac"):  # format 1 as first written had none
            if data[optional] is None:
                del data[optional]
        return json.dumps(data, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, *, key: str | None = None) -> Manifest:
        """Parse and validate a manifest; ``ValueError`` says what is wrong with it."""
        try:
            raw = _json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        version = raw.get("format_version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ValueError(
                f"unknown format_version {version!r} (this notebook_flow reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}; was it written by a newer "
                "version? Upgrade notebook_flow to read it)"
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
            (self.mac is not None and not _is_hex(self.mac, 64), "mac"),
            (self.txn is not None and not _is_hex(self.txn, 32), "txn"),
            (
                self.provenance is not None
                and (
                    not isinstance(self.provenance, dict)
                    or self.format_version < 2
                    or not all(
                        isinstance(k, str) and isinstance(v, str)
                        for k, v in self.provenance.items()
                    )
                ),
                "provenance",
            ),
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


_OPTIONAL_FIELDS = ("fence", "inline", "seal", "mac", "provenance", "txn")
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Manifest))
# Pickles and fingerprints name the class where it was first defined (and is re-exported).
Manifest.__module__ = "notebook_flow.storage"


def _is_hex(value: object, length: int) -> bool:
    return (
        isinstance(value, str)
        and len(value) == length
        and all(c in "0123456789abcdef" for c in value)
    )


def _is_manifest_rel(rel: str) -> bool:
    parts = rel.split("/")
    return (
        len(parts) == 3
        and _SHARD_RE.match(parts[1]) is not None
        and _MANIFEST_NAME_RE.match(parts[2]) is not None
        and parts[2].startswith(parts[1])
    )
