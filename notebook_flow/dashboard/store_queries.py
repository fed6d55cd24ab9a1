"""The dashboard's cache, locks and queue tabs: their queries and actions (invalidate a
result, break a lock) on the store and its index."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from notebook_flow.errors import NotebookFlowError

from .model import WORKER_SQL, Page

if TYPE_CHECKING:
    import pandas as pd

    from notebook_flow.locks.base import LockManager
    from notebook_flow.metadata import MetadataStore
    from notebook_flow.storage import ResultStore

__all__ = ["StoreQueries"]

logger = logging.getLogger("notebook_flow")


class StoreQueries:
    """The cache, locks and queue of ``Source`` (a mixin: it uses the source's ``query``,
    store and index)."""

    store: ResultStore | None
    meta: MetadataStore
    _cache_columns: set[str] | None

    @property
    def url(self) -> str:
        raise NotImplementedError

    def query(self, sql: str, params: Any = ()) -> pd.DataFrame:
        raise NotImplementedError

    # -- cache -------------------------------------------------------------------------------

    def cache_tasks(self) -> list[str]:
        df = self.query("SELECT DISTINCT task FROM cache_entries ORDER BY task")
        return [str(t) for t in df["task"] if t is not None]

    def cache_columns(self) -> set[str]:
        """The columns ``cache_entries`` has (a later schema may add pins or provenance)."""
        if self._cache_columns is None:
            df = self.query(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'cache_entries'"
            )
            self._cache_columns = {str(c) for c in df["column_name"]}
        return self._cache_columns

    def cache_page(
        self,
        task: str | None,
        *,
        page: int = 0,
        page_size: int = 50,
        search: str = "",
    ) -> Page:
        """Cache entries, newest first: size, creation, last use, expiry, pin, the inputs
        and where they were made (from the run that computed them).

        ``search`` matches (case-insensitively) the task, key, inputs, notebook, cell or host.
        """
        clauses: list[str] = []
        params: list[Any] = []
        if task:
            clauses.append("c.task = ?")
            params.append(task)
        if search.strip():
            text = search.strip()
            for special in ("\\", "%", "_"):
                text = text.replace(special, "\\" + special)
            like = f"%{text}%"
            # The inputs as the table shows them (``x=3, y='a'``), not their JSON.
            shown = "regexp_replace(replace(r.inputs, '\": \"', '='), '[{}\"]', '', 'g')"
            fields: tuple[str, ...] = ("c.task", "c.key", shown, "r.notebook", "r.cell", "r.host")
            if "provenance" in self.cache_columns():  # who made it, with what, git commit
                fields += ("c.provenance",)
            clauses.append("(" + " OR ".join(f"{f} ILIKE ? ESCAPE '\\'" for f in fields) + ")")
            params.extend([like] * len(fields))
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        columns = self.cache_columns()
        provenance = "c.provenance" if "provenance" in columns else "NULL"
        joined = "FROM cache_entries c LEFT JOIN runs r ON r.run_id = c.run_id"
        df = self.query(
            "SELECT c.key, c.task, c.size, c.created_at, c.expires_at, c.duration, "
            "c.serializer, c.run_id, r.inputs, r.notebook, r.cell, r.host, r.pid, "
            f"NULL AS pinned, {provenance} AS provenance, "
            "(SELECT max(h.created) FROM runs h WHERE h.key = c.key "
            "AND h.state = 'CACHED') AS last_used, "
            f"(SELECT count(*) {joined} {where}) AS _total "
            f"{joined} {where} ORDER BY c.created_at DESC, c.key LIMIT ? OFFSET ?",
            [*params, *params, page_size, max(0, page) * page_size],
        )
        if df.empty and page > 0:
            return self.cache_page(task, page=0, page_size=page_size, search=search)
        # Pins are marker files in the store (storage/pins.py), shared by every machine.
        df["pinned"] = df["key"].isin(self.pinned_keys())
        total = int(df["_total"].iloc[0]) if not df.empty else 0
        return Page(df.drop(columns="_total"), total, page, page_size)

    def pinned_keys(self) -> frozenset[str]:
        """The store's pinned keys (its ``pins/`` markers: one listing), empty if unreadable."""
        from notebook_flow.storage.pins import pinned_keys

        if self.store is None:
            return frozenset()
        try:
            return pinned_keys(self.store)
        except OSError as exc:
            logger.warning("could not list the pins of %s: %s", self.url, exc)
            return frozenset()

    def invalidate(self, keys: Sequence[str]) -> int:
        """Delete results from the store and their index rows; returns how many were stored."""
        assert self.store is not None
        removed = 0
        for key in keys:
            try:
                removed += bool(self.store.delete(key))
            except NotebookFlowError as exc:  # a bad key in the index must not block the rest
                logger.warning("could not delete %s from %s: %s", key, self.url, exc)
        self.meta.remove_cache_entries(list(keys))
        self.meta.flush(timeout=30)
        return removed

    def invalidate_task(self, task: str) -> int:
        """Delete every stored result of ``task`` (as the index knows them)."""
        keys = self.query("SELECT key FROM cache_entries WHERE task = ?", [task])["key"].tolist()
        return self.invalidate([str(k) for k in keys])

    # -- locks -------------------------------------------------------------------------------

    def locks(self) -> pd.DataFrame:
        """Locks currently recorded as held, oldest first."""
        return self.query(
            "SELECT key, holder, task, manager, acquired, lease_expires, updated "
            "FROM locks ORDER BY acquired"
        )

    def lock_waits(self, limit: int = 100) -> pd.DataFrame:
        """The latest waits for a lock (who waited, for which key, how long)."""
        return self.query(
            "SELECT time, key, task, holder, waited, manager FROM lock_events "
            "WHERE event = 'waited' ORDER BY time DESC LIMIT ?",
            [limit],
        )

    def lock_manager(self) -> LockManager | None:
        """The store's default lock manager, or None when it has none (remote stores)."""
        from notebook_flow.locks import default_lock_manager_for

        try:
            return default_lock_manager_for(self.store)
        except NotebookFlowError:
            return None

    def break_lock(self, key: str, manager_name: str | None = None) -> str:
        """Break ``key``'s lock with the store's default manager; says what happened."""
        from notebook_flow.metadata import LockEvent

        manager = self.lock_manager()
        if manager is None or not hasattr(manager, "break_lock"):
            return (
                "This store has no default lock manager the dashboard can reach; break the "
                f"lock where it lives, e.g. manager.break_lock({key!r})."
            )
        kind = type(manager).__name__
        if manager_name and manager_name != kind:
            return (
                f"The lock is held in a {manager_name}, which the dashboard cannot reach; "
                f"break it with that manager: break_lock({key!r})."
            )
        holder = manager.holder_of(key)
        broken = manager.break_lock(key)
        self.meta.record_lock_event(
            LockEvent(
                key=key,
                holder=holder.holder if holder is not None else "",
                event="broken",
                at=time.time(),
                manager=kind,
            )
        )
        self.meta.flush(timeout=30)
        return (
            f"Broke the lock on {key}."
            if broken
            else f"No lock was held on {key}; cleared its record."
        )

    # -- queue -------------------------------------------------------------------------------

    def queue(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Runs in flight: a summary per kernel/process, and the runs themselves."""
        runs = self.query(
            "SELECT run_id, task, state, created, started, attempt, notebook, cell, "
            f"{WORKER_SQL} AS worker, host, pid "
            "FROM runs WHERE state IN ('PENDING', 'RUNNING', 'RETRYING') "
            "ORDER BY created LIMIT 1000"
        )
        per_worker = self.query(
            "SELECT coalesce(r.host, '?') || ' · pid ' || coalesce(CAST(r.pid AS VARCHAR), '?') "
            "AS worker, r.host, r.pid, "
            "count(*) FILTER (WHERE r.state = 'PENDING') AS pending, "
            "count(*) FILTER (WHERE r.state = 'RUNNING') AS running, "
            "count(*) FILTER (WHERE r.state = 'RETRYING') AS retrying, "
            "min(r.created) AS oldest, max(p.last_seen) AS last_seen "
            "FROM runs r LEFT JOIN processes p ON p.host = r.host AND p.pid = r.pid "
            "WHERE r.state IN ('PENDING', 'RUNNING', 'RETRYING') "
            "GROUP BY 1, 2, 3 ORDER BY oldest"
        )
        return per_worker, runs
