"""The metadata index: runs, cache entries and locks, kept in one DuckDB file.

DuckDB lets only one *process* open a file at a time (DESIGN.md, "Metadata"), and several
kernels, a dashboard and the CLI share one store. So:

* Callers never wait for DuckDB: ``record_*`` appends to an in-memory queue (microseconds).
* One daemon recorder thread per (process, file) drains the queue and writes each batch in one
  transaction: file lock (``<path>.lock``) → open → write → close → unlock. The batch is taken
  *after* the lock is acquired, so the longer other processes keep us waiting, the bigger the
  batch. The file is never held open while idle.
* Reads take the same lock (DuckDB refuses even read-only opens while another process writes)
  and first flush this process's queue, so users see their own runs.
* While this process has runs in flight, the recorder writes a heartbeat every minute (so
  other hosts can tell it is alive); otherwise an idle process never opens the file.
* Every write is idempotent: runs merge by state (a final state never regresses; among equals
  the latest ``at`` wins), entries and locks are upserts, and the append-only tables skip rows
  already present when a batch is written again after a failure whose outcome is in doubt.

The index is not the only copy: results stay usable from the store's manifests, and
:meth:`MetadataStore.rebuild` recreates the cache index from them.

>>> import tempfile, time, os
>>> store = MetadataStore(os.path.join(tempfile.mkdtemp(), "meta", "metadata.duckdb"))
>>> store.record_run(RunEvent("r1", "load", "load-id", None, RunState.COMPLETED, time.time()))
>>> store.history()["state"].tolist()
['COMPLETED']
>>> store.close()
"""

from __future__ import annotations

# The package's layout follows a write's path: records → store (queue) → recorder (thread)
# → batch (one transaction) → database (one session) → schema (tables); registry holds the
# per-process state (recorders, exit and fork hooks). Names are re-exported here so that
# ``notebook_flow.metadata.X`` keeps working, and objects pickled as such still load. To
# patch a tunable (``_MAX_PENDING``, ``_IDLE_CHECKPOINT``, ...) patch the submodule that
# reads it: they are deliberately not re-exported, so a patch here fails loudly.
from notebook_flow.errors import MetadataError as MetadataError
from notebook_flow.metadata.batch import _write_batch as _write_batch
from notebook_flow.metadata.database import _Database as _Database
from notebook_flow.metadata.recorder import HEARTBEAT_INTERVAL as HEARTBEAT_INTERVAL
from notebook_flow.metadata.records import CacheEntry, LockEvent, RunEvent
from notebook_flow.metadata.records import LockEventKind as LockEventKind
from notebook_flow.metadata.schema import SCHEMA_VERSION
from notebook_flow.metadata.store import LOCK_TIMEOUT as LOCK_TIMEOUT
from notebook_flow.metadata.store import STALE_AFTER as STALE_AFTER
from notebook_flow.metadata.store import MetadataStore
from notebook_flow.states import RunState as RunState

__all__ = ["SCHEMA_VERSION", "CacheEntry", "LockEvent", "MetadataStore", "RunEvent"]
