"""The records of the metadata index: run events, lock events and cache entries.

Callers build them and hand them to :class:`~notebook_flow.metadata.MetadataStore`, whose
recorder queues them (with the internal ``_Remove`` and ``_MarkCrashed`` operations) and
writes them in batches (:mod:`notebook_flow.metadata.batch`).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from notebook_flow import _identity
from notebook_flow.states import RunState

__all__ = ["CacheEntry", "LockEvent", "LockEventKind", "RunEvent"]


def _host() -> str:
    return _identity.process().host


def _pid() -> int:
    return _identity.process().pid


def _pid_start() -> int | None:
    return _identity.process().start_time


def _kernel() -> str | None:
    return _identity.process().kernel


@dataclass(slots=True)  # not frozen: a frozen init costs ~4 µs more, on every cache hit
class RunEvent:
    """One state transition of a run; the process fields default to the current process.

    >>> RunEvent("r1", "load", "load-id", None, RunState.RUNNING, 0.0).state
    <RunState.RUNNING: 'RUNNING'>
    """

    run_id: str
    task: str
    task_identity: str
    key: str | None
    state: RunState
    at: float
    attempt: int = 1
    duration: float | None = None
    saved: float | None = None  # seconds a cache hit saved
    error: str | None = None
    traceback: str | None = None
    explain: str | None = None
    size: int | None = None
    inputs: str | None = None  # short JSON summary
    notebook: str | None = None
    cell: str | None = None
    tags: tuple[str, ...] = ()
    host: str = field(default_factory=_host)
    pid: int = field(default_factory=_pid)
    pid_start: int | None = field(default_factory=_pid_start)
    kernel: str | None = field(default_factory=_kernel)

    def __post_init__(self) -> None:
        if not isinstance(self.state, RunState):
            object.__setattr__(self, "state", RunState(self.state))
        if not isinstance(self.tags, tuple):
            object.__setattr__(self, "tags", tuple(self.tags))


LockEventKind = Literal[
    "acquired", "waited", "released", "recovered", "broken", "renewed", "renew_failed", "lost"
]


@dataclass(frozen=True)
class LockEvent:
    """Something that happened to a lock; ``holder`` is the holder the event is about.

    >>> LockEvent("k", "host:1:2:3", "acquired", 0.0, "file").event
    'acquired'
    """

    key: str
    holder: str
    event: LockEventKind
    at: float
    manager: str
    lease_expires: float | None = None
    waited: float | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        if self.event not in get_args(LockEventKind):
            raise ValueError(
                f"unknown lock event {self.event!r}; use one of {get_args(LockEventKind)}"
            )


@dataclass(frozen=True)
class CacheEntry:
    """The index record of one committed result (mirrors the store's manifest).

    >>> CacheEntry("0" * 32, "load", "load-id", 10, 0.0, None, 1.5, "json", "p", {}).size
    10
    """

    key: str
    task: str
    task_identity: str
    size: int
    created_at: float
    expires_at: float | None
    duration: float
    serializer: str
    payload: str
    components: dict[str, str]
    run_id: str | None = None
    provenance: dict[str, str] | None = None  # who made it, where (notebook_flow.provenance)

    @classmethod
    def from_manifest(
        cls,
        manifest: Any,
        *,
        task: str | None = None,
        task_identity: str | None = None,
        size: int | None = None,
    ) -> CacheEntry:
        """Build an entry from a ``storage.Manifest`` (or any object with its fields);
        ``task`` is the task's display name (default: the manifest's ``task``)."""
        identity = task_identity or getattr(manifest, "task_identity", None) or manifest.task
        return cls(
            key=manifest.key,
            task=manifest.task if task is None else task,
            task_identity=identity,
            size=int(manifest.size if size is None else size),
            created_at=float(manifest.created_at),
            expires_at=manifest.expires_at,
            duration=float(manifest.duration),
            serializer=manifest.serializer,
            payload=manifest.payload,
            components=dict(manifest.components),
            run_id=getattr(manifest, "run_id", None),
            provenance=getattr(manifest, "provenance", None),
        )


@dataclass(frozen=True)
class _Remove:
    keys: tuple[str, ...] | None
    task: str | None


class _MarkCrashed:
    """Queued once per process and file: mark runs of dead processes crashed."""


_Op = RunEvent | CacheEntry | LockEvent | _Remove | _MarkCrashed


# -- making a record storable ------------------------------------------------------------------
#
# One odd value must never cost the rest of a batch (issue 13): a lone surrogate in an error
# message (``os.fsdecode(b"data_\xff.csv")``) cannot be encoded as UTF-8, and a non-str tag
# or name does not fit a VARCHAR column. The recorder passes every operation through
# ``storable`` before it writes a batch; what even that cannot fix is dropped alone.

_EVENT_TEXT = ("run_id", "task", "task_identity", "key", "error", "traceback", "explain",
               "inputs", "notebook", "cell", "host", "kernel")  # fmt: skip
_EVENT_FLOAT = ("at", "duration", "saved")
_EVENT_INT = ("attempt", "size", "pid", "pid_start")
_ENTRY_TEXT = ("key", "task", "task_identity", "serializer", "payload", "run_id")
_ENTRY_FLOAT = ("created_at", "expires_at", "duration")
_LOCK_TEXT = ("key", "holder", "manager", "task")
_LOCK_FLOAT = ("at", "lease_expires", "waited")


def storable_text(value: object) -> str:
    """``value`` as text that UTF-8 can encode: lone surrogates become ``\\udcff`` escapes,
    a non-str its ``str()``.

    >>> import os
    >>> storable_text(os.fsdecode(b"data_\\xff.csv")), storable_text(12)
    ('data_\\\\udcff.csv', '12')
    """
    if type(value) is not str:
        try:
            value = str(value)
        except Exception:  # a broken __str__ must not cost the event
            value = f"<{type(value).__name__} that cannot be shown>"
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _fine(value: object) -> bool:
    return type(value) is str and (value.isascii() or _encodable(value))  # type: ignore[attr-defined]


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fixes(
    op: Any, text: tuple[str, ...], floats: tuple[str, ...], ints: tuple[str, ...]
) -> dict[str, Any]:
    """The fields of ``op`` that need changing to be storable; raises if one cannot be."""
    changes: dict[str, Any] = {}
    for name in text:
        value = getattr(op, name)
        if value is not None and not _fine(value):
            changes[name] = storable_text(value)
    for name in floats:
        value = getattr(op, name)
        if value is not None and type(value) is not float:
            changes[name] = float(value)  # raises for a value that is no number at all
    for name in ints:
        value = getattr(op, name)
        if value is not None and type(value) is not int:
            changes[name] = int(value)
    return changes


_event_texts = operator.attrgetter(*_EVENT_TEXT)


def _clean_event(e: RunEvent) -> bool:
    """True when every text field is ASCII str (or None) and every number of its type."""
    try:  # join raises TypeError for a non-str: then the slow path looks closer
        text = "".join([v for v in _event_texts(e) if v is not None]) + "".join(e.tags)
    except TypeError:
        return False
    return (
        text.isascii()
        and type(e.tags) is tuple
        and type(e.at) is float
        and type(e.attempt) is int
        and type(e.pid) is int
        and (e.duration is None or type(e.duration) is float)
        and (e.saved is None or type(e.saved) is float)
        and (e.size is None or type(e.size) is int)
        and (e.pid_start is None or type(e.pid_start) is int)
    )


def storable(op: _Op) -> _Op:
    """``op`` with every field storable (text escaped, numbers of the column's type).

    Returns ``op`` itself when nothing needs fixing (the common case: a few type checks).
    Raises ``ValueError``/``TypeError`` for a record no fix can store.
    """
    changes: dict[str, Any]
    if type(op) is RunEvent:
        if _clean_event(op):  # the common case, in about a microsecond
            return op
        changes = _fixes(op, _EVENT_TEXT, _EVENT_FLOAT, _EVENT_INT)
        if not isinstance(op.tags, tuple) or not all(_fine(t) for t in op.tags):
            changes["tags"] = tuple(storable_text(t) for t in op.tags)
        return dataclasses.replace(op, **changes) if changes else op
    if isinstance(op, CacheEntry):
        changes = _fixes(op, _ENTRY_TEXT, _ENTRY_FLOAT, ())
        if type(op.size) is not int:
            changes["size"] = int(op.size)
        components = op.components
        if not all(_fine(k) and _fine(v) for k, v in components.items()):
            changes["components"] = {
                storable_text(k): storable_text(v) for k, v in components.items()
            }
        origin = op.provenance
        if origin is not None and not all(_fine(k) and _fine(v) for k, v in origin.items()):
            changes["provenance"] = {storable_text(k): storable_text(v) for k, v in origin.items()}
        return dataclasses.replace(op, **changes) if changes else op
    if isinstance(op, LockEvent):
        changes = _fixes(op, _LOCK_TEXT, _LOCK_FLOAT, ())
        return dataclasses.replace(op, **changes) if changes else op
    return op
