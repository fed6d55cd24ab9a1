"""Lock managers: one holder per key across threads, processes and machines.

``MemoryLockManager`` (threads of one process), ``FileLockManager`` (processes sharing a
filesystem), ``RedisLockManager`` and ``PostgresLockManager`` (many machines) implement
the ``LockManager`` protocol in ``base.py`` and Prefect's (``prefect.py``); ``hold()`` in
``lease.py`` holds a lock with a renewed lease and a fencing check. Redis and PostgreSQL
drivers are imported only when a manager of theirs connects.
"""

from __future__ import annotations

from .base import Acquisition, LockInfo, LockManager, describe_holder
from .file import FileLockManager
from .lease import Lease, default_lock_manager_for, hold
from .memory import MemoryLockManager
from .postgres import PostgresLockManager
from .prefect import HOLD_FOREVER, PrefectLockAdapter, as_lock_manager
from .redis import RedisLockManager

__all__ = [
    "HOLD_FOREVER",
    "Acquisition",
    "FileLockManager",
    "Lease",
    "LockInfo",
    "LockManager",
    "MemoryLockManager",
    "PostgresLockManager",
    "PrefectLockAdapter",
    "RedisLockManager",
    "as_lock_manager",
    "default_lock_manager_for",
    "describe_holder",
    "hold",
]
