"""The index's tables, their migrations, and the SQL and Arrow shapes the writes use.

Every statement names its columns explicitly (a later migration may add some); the run
events of a batch travel to DuckDB as one Arrow table and are folded into ``runs`` in SQL
(``_FOLD_RUNS``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from notebook_flow.metadata.records import RunEvent

__all__ = ["SCHEMA_VERSION"]

_NON_FINAL = ("PENDING", "RUNNING", "RETRYING")
_NON_FINAL_SQL = "(" + ", ".join(f"'{s}'" for s in _NON_FINAL) + ")"


_RUNS = (
    ("run_id", "VARCHAR PRIMARY KEY"), ("task", "VARCHAR"), ("task_identity", "VARCHAR"),
    ("key", "VARCHAR"), ("state", "VARCHAR"), ("created", "DOUBLE"), ("started", "DOUBLE"),
    ("ended", "DOUBLE"), ("duration", "DOUBLE"), ("saved", "DOUBLE"), ("attempt", "INTEGER"),
    ("error", "VARCHAR"), ("traceback", "VARCHAR"), ("explain", "VARCHAR"), ("size", "BIGINT"),
    ("inputs", "VARCHAR"), ("host", "VARCHAR"), ("pid", "BIGINT"), ("pid_start", "BIGINT"),
    ("kernel", "VARCHAR"), ("notebook", "VARCHAR"), ("cell", "VARCHAR"), ("tags", "VARCHAR[]"),
    ("updated", "DOUBLE"),
)  # fmt: skip
_RUN_EVENTS = (
    ("run_id", "VARCHAR"), ("task", "VARCHAR"), ("task_identity", "VARCHAR"), ("key", "VARCHAR"),
    ("state", "VARCHAR"), ("time", "DOUBLE"), ("attempt", "INTEGER"), ("duration", "DOUBLE"),
    ("saved", "DOUBLE"), ("error", "VARCHAR"), ("traceback", "VARCHAR"), ("explain", "VARCHAR"),
    ("size", "BIGINT"), ("inputs", "VARCHAR"), ("host", "VARCHAR"), ("pid", "BIGINT"),
    ("pid_start", "BIGINT"), ("kernel", "VARCHAR"), ("notebook", "VARCHAR"), ("cell", "VARCHAR"),
)  # fmt: skip
_CACHE_ENTRIES_V1 = (
    ("key", "VARCHAR PRIMARY KEY"), ("task", "VARCHAR"), ("task_identity", "VARCHAR"),
    ("size", "BIGINT"), ("created_at", "DOUBLE"), ("expires_at", "DOUBLE"), ("duration", "DOUBLE"),
    ("serializer", "VARCHAR"), ("payload", "VARCHAR"), ("components", "VARCHAR"),
    ("run_id", "VARCHAR"),
)  # fmt: skip
# Version 2: the manifest's provenance (JSON), see notebook_flow.provenance.
_CACHE_ENTRIES = (*_CACHE_ENTRIES_V1, ("provenance", "VARCHAR"))
_LOCKS = (
    ("key", "VARCHAR PRIMARY KEY"), ("holder", "VARCHAR"), ("acquired", "DOUBLE"),
    ("lease_expires", "DOUBLE"), ("manager", "VARCHAR"), ("task", "VARCHAR"), ("updated", "DOUBLE"),
)  # fmt: skip
_LOCK_EVENTS = (
    ("key", "VARCHAR"), ("holder", "VARCHAR"), ("event", "VARCHAR"), ("time", "DOUBLE"),
    ("manager", "VARCHAR"), ("lease_expires", "DOUBLE"), ("waited", "DOUBLE"), ("task", "VARCHAR"),
)  # fmt: skip
_PROCESSES = (
    ("process_id", "VARCHAR PRIMARY KEY"), ("host", "VARCHAR"), ("pid", "BIGINT"),
    ("pid_start", "BIGINT"), ("kernel", "VARCHAR"), ("started", "DOUBLE"), ("last_seen", "DOUBLE"),
)  # fmt: skip

_Columns = tuple[tuple[str, str], ...]


def _create(table: str, columns: _Columns) -> str:
    return f"CREATE TABLE {table} (" + ", ".join(f"{c} {t}" for c, t in columns) + ")"


def _names(columns: _Columns) -> str:
    """Explicit column lists everywhere: a later migration may add columns."""
    return ", ".join(c for c, _ in columns)


# Migrations by version; a migration runs once, in one transaction with its version row.
# Never edit a released migration: append a new version (e.g. ALTER TABLE ... ADD COLUMN).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        _create("runs", _RUNS),
        _create("run_events", _RUN_EVENTS),
        _create("cache_entries", _CACHE_ENTRIES_V1),
        _create("locks", _LOCKS),
        _create("lock_events", _LOCK_EVENTS),
        _create("processes", _PROCESSES),
    ),
    2: ("ALTER TABLE cache_entries ADD COLUMN provenance VARCHAR",),
}
SCHEMA_VERSION = max(_MIGRATIONS)

# Runs fold in SQL, inside the write transaction: the batch's events and the rows already
# stored for the same runs are grouped by run_id. State-bound columns come from the winning
# transition, the others from the highest-ranked row that has them. A final state beats a
# non-final one; among equals the later transition wins, and among ties the one written
# last (stored rows rank below the batch, the batch in queue order). CRASHED ranks below
# the other final states (see _rank). Done row by row in
# Python this cost ~15 µs of GIL time per event on the recorder thread, which slowed every
# other thread of the kernel; DuckDB runs the GROUP BY without holding the GIL.
_STATE_BOUND = ("state", "updated", "ended", "error", "traceback")
_MIN, _MAX = ("created", "started"), ("attempt",)

# A batch of run events as one Arrow table: the run_events columns (``time`` is the
# event's ``at``), then ``tags`` and ``seq`` (queue order), read with one attrgetter per
# event instead of a dict per row.
_BATCH_COLUMNS: _Columns = (*_RUN_EVENTS, ("tags", "VARCHAR[]"), ("seq", "BIGINT"))
_event_values = operator.attrgetter(*("at" if c == "time" else c for c, _ in _RUN_EVENTS), "tags")


def _rank(seq: str) -> str:
    # CRASHED is inferred (the process looked dead), the other final states are observed:
    # a run a dead client left behind that a Dask worker did finish arrives later as
    # COMPLETED from the worker's events, and must not stay CRASHED.
    final = f"CASE WHEN state IN {_NON_FINAL_SQL} THEN 0 WHEN state = 'CRASHED' THEN 1 ELSE 2 END"
    return f"{{'final': {final}, 'updated': updated, 'seq': {seq}}}"


def _fold_runs_sql() -> str:
    names = _names(_RUNS)
    from_batch = ", ".join(
        {
            "created": "time",
            "started": "CASE WHEN state = 'RUNNING' THEN time END",
            "ended": f"CASE WHEN state NOT IN {_NON_FINAL_SQL} THEN time END",
            "tags": "CASE WHEN len(tags) > 0 THEN tags END",
            "updated": "time",
        }.get(c, c)
        + f" AS {c}"
        for c, _ in _RUNS
    )
    aggregate = {c: f"arg_max_null({c}, rank)" for c in _STATE_BOUND}
    aggregate.update({c: f"min({c})" for c in _MIN} | {c: f"max({c})" for c in _MAX})
    # arg_max skips NULLs: the best-ranked value there is, for the merged columns.
    folded = "run_id, " + ", ".join(
        f"{aggregate.get(c, f'arg_max({c}, rank)')} AS {c}" for c, _ in _RUNS if c != "run_id"
    )
    return (
        f"INSERT OR REPLACE INTO runs ({names}) SELECT {folded} FROM ("
        f"SELECT {names}, {_rank('0')} AS rank FROM runs "
        "WHERE run_id IN (SELECT run_id FROM _batch) UNION ALL "
        f"SELECT {names}, {_rank('seq')} AS rank FROM (SELECT {from_batch}, seq FROM _batch)"
        ") GROUP BY run_id"
    )


_FOLD_RUNS = _fold_runs_sql()


def _batch_arrow(events: list[RunEvent]) -> Any:
    """The batch's run events, columnar (see _BATCH_COLUMNS)."""
    import pyarrow as pa

    columns = list(zip(*map(_event_values, events), strict=True))
    columns.append(range(1, len(events) + 1))  # type: ignore[arg-type]
    schema = _schema(_BATCH_COLUMNS)
    return pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)],
        schema=schema,
    )


def _schema(columns: _Columns) -> Any:
    """The Arrow schema of a table's columns, with their exact types."""
    import pyarrow as pa

    types = {"VARCHAR": pa.string(), "DOUBLE": pa.float64(), "BIGINT": pa.int64(),
             "INTEGER": pa.int32(), "VARCHAR[]": pa.list_(pa.string())}  # fmt: skip
    return pa.schema([(c, types[t.split(" ")[0]]) for c, t in columns])


def _arrow(columns: _Columns, rows: Sequence[dict[str, Any]]) -> Any:
    """An Arrow table with the table's exact column types (all-NULL columns included)."""
    import pyarrow as pa

    return pa.table({c: [r.get(c) for r in rows] for c, _ in columns}, schema=_schema(columns))
