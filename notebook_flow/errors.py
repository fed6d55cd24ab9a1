"""The exceptions notebook_flow raises.

Every error is a ``NotebookFlowError``; where a built-in fits, it is inherited too, so
``except TimeoutError`` catches a ``LockTimeout``::

    NotebookFlowError
    ├── ConfigurationError (ValueError)      bad option, bad store URL, bad policy
    │   └── ConfigurationTypeError (TypeError)  an option of the wrong type
    ├── MissingExtraError (ImportError)      an optional backend's package is not installed
    ├── CacheKeyError (TypeError)            a cache key could not be computed
    │   └── UnhashableError                  a value has no stable fingerprint
    │       └── UnhashableInputError         ... and it is a task argument (names it)
    ├── StorageError (OSError)               the result store failed
    │   ├── CommitError                      a result could not be committed (always raised)
    │   └── PayloadCorruptError              checksum/size mismatch on read (degrades to a miss)
    ├── SerializationError                   a value could not be (de)serialized
    │   └── SignatureError                   unsigned or tampered pickled payload refused
    ├── MetadataError                        the DuckDB metadata index failed
    ├── LockError                            a lock manager failed
    │   ├── LockTimeout (TimeoutError)       waited too long; names the holder and since when
    │   ├── LockNotHeldError (ValueError)    release_lock by a holder that does not hold it
    │   └── LeaseLostError                   our lease expired; the commit was refused (fencing)
    └── TaskError                            running a task failed for a reason of ours
        ├── TaskTimeoutError (TimeoutError)  the body ran past ``timeout_seconds``
        ├── UpstreamFailedError              a future this run depends on failed
        └── TaskCancelledError               the run was cancelled

A user's own exception is never wrapped: after the last retry it propagates as itself.
Messages say what happened and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CacheKeyError",
    "CommitError",
    "ConfigurationError",
    "ConfigurationTypeError",
    "LeaseLostError",
    "LockError",
    "LockNotHeldError",
    "LockTimeout",
    "MetadataError",
    "MissingExtraError",
    "NotebookFlowError",
    "PayloadCorruptError",
    "SerializationError",
    "SignatureError",
    "StorageError",
    "TaskCancelledError",
    "TaskError",
    "TaskTimeoutError",
    "UnhashableError",
    "UnhashableInputError",
    "UpstreamFailedError",
]


class NotebookFlowError(Exception):
    """Root of every error raised by notebook_flow."""


class ConfigurationError(NotebookFlowError, ValueError):
    """An option, store URL or cache policy is invalid."""


class ConfigurationTypeError(ConfigurationError, TypeError):
    """An option has the wrong type (``retries=True``, ``tags="abc"``, ``timeout_seconds="5"``)."""


class MissingExtraError(NotebookFlowError, ImportError):
    """An optional backend needs a package that is not installed; names the extra."""


class CacheKeyError(NotebookFlowError, TypeError):
    """A cache key could not be computed."""


class UnhashableError(CacheKeyError):
    """A value has no stable fingerprint.

    ``path`` says where inside the value the problem is (``"['a'][2].conn"``) and
    ``type_name`` what type was found there.
    """

    def __init__(self, message: str, *, path: str = "", type_name: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.type_name = type_name


class UnhashableInputError(UnhashableError):
    """A task argument has no stable fingerprint; the message names it and the fixes."""

    def __init__(self, message: str, *, argument: str, path: str = "", type_name: str = "") -> None:
        super().__init__(message, path=path, type_name=type_name)
        self.argument = argument


class StorageError(NotebookFlowError, OSError):
    """The result store failed."""


class CommitError(StorageError):
    """A result could not be committed; nothing half-written is visible to readers."""


class PayloadCorruptError(StorageError):
    """A stored payload does not match its manifest (size or checksum).

    Raised on the read path; a task treats it as a cache miss and recomputes.
    """


class SerializationError(NotebookFlowError):
    """A value could not be serialized or deserialized."""


class SignatureError(SerializationError):
    """A pickled payload is unsigned or its signature does not match; it was not unpickled."""


class MetadataError(NotebookFlowError):
    """The DuckDB metadata index could not be read or written."""


class LockError(NotebookFlowError):
    """A lock manager failed."""


class LockTimeout(LockError, TimeoutError):
    """Waiting for a lock took longer than allowed; the message names the holder."""


class LockNotHeldError(LockError, ValueError):
    """``release_lock`` by a holder while another one holds the lock (Prefect's
    ``ValueError``)."""


class LeaseLostError(LockError):
    """This holder's lease expired and another holder may have taken over.

    Raised before a commit would overwrite what a successor committed (fencing).
    """


class TaskError(NotebookFlowError):
    """Running a task failed for a reason of notebook_flow's, not the user's code."""


class TaskTimeoutError(TaskError, TimeoutError):
    """A task body ran longer than its ``timeout_seconds``."""


class UpstreamFailedError(TaskError):
    """A future this run depends on failed; ``allow_failure(x)`` passes it through instead."""


class TaskCancelledError(TaskError):
    """The run was cancelled before it finished."""


def reraise_interrupt(exc: BaseException) -> None:
    """Raise KeyboardInterrupt if ``exc`` hides one (e.g. an import that Ctrl-C broke off
    comes back as an ImportError): code that logs and goes on must not swallow Ctrl-C."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
