"""The index's tables, their migrations, and the SQL and Arrow shapes the writes use.

Every statement names its columns explicitly (a later migration may add some); the run
events of a batch travel to DuckDB as one table (``_table``) and are folded into ``runs`` in
SQL (``_FOLD_RUNS``).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import duckdb

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


def _batch_rows(events: list[RunEvent]) -> list[tuple[Any, ...]]:
    """The batch's run events as rows of _BATCH_COLUMNS (``seq`` is the queue order)."""
    return [(*_event_values(e), seq) for seq, e in enumerate(events, 1)]


# Up to this many rows travel as one INSERT of literals into a temporary table; more as an
# Arrow table. A kernel's usual batch is a few events, and DuckDB imports numpy, pandas and
# pyarrow to bind the first parameter of a process (or to scan Arrow): ~0.5-2 s, on the
# recorder thread, for a notebook that never used them. So the write path binds no
# parameters: every value goes into the SQL text through _lit.
_SMALL = 256


def _lit(value: Any) -> str:
    """``value`` (None, bool, int, float, str, or a tuple/list of str) as a DuckDB literal
    that reads back as exactly the same value.

    >>> _lit("it's"), _lit(0.1), _lit(float("nan")), _lit(("a", "b")), _lit(None)
    ("'it''s'", "'0.1'::DOUBLE", "'nan'::DOUBLE", "['a', 'b']::VARCHAR[]", 'NULL')
    """
    if value is None:
        return "NULL"
    if isinstance(value, str):  # a str enum (RunState) by its value, as a parameter binds
        # Plain SQL strings know one escape, '' (no backslashes); a NUL would end the text.
        return _str_lit(str.__str__(value))
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        # A quoted cast: unquoted, 0.1 is a DECIMAL literal; the cast from text reads the
        # shortest repr back as the same DOUBLE (tests: the literal round trip).
        return f"'{float.__repr__(value)}'::DOUBLE"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_lit(v) for v in value) + "]::VARCHAR[]"
    raise TypeError(f"no SQL literal for a {type(value).__name__}")


def _str_lit(value: str) -> str:
    text = "'" + value.replace("'", "''") + "'"
    return text.replace("\x00", "' || chr(0) || '") if "\x00" in text else text


# The exact types of nearly every value, without _lit's isinstance chain (~3x faster).
_FAST: dict[type, Callable[[Any], str]] = {
    type(None): lambda v: "NULL", str: _str_lit, int: int.__repr__,
    float: lambda v: f"'{v!r}'::DOUBLE",
}  # fmt: skip


def _values(row: Sequence[Any]) -> str:
    """One row's literals, comma-separated (see _lit)."""
    fast = _FAST.get
    return ", ".join([fast(type(v), _lit)(v) for v in row])


@contextlib.contextmanager
def _table(
    con: duckdb.DuckDBPyConnection, name: str, columns: _Columns, rows: Sequence[Sequence[Any]]
) -> Iterator[None]:
    """``rows`` (tuples in ``columns`` order) readable as table ``name`` inside the body.

    Inside a write transaction: a failure aborts it, and the temporary table goes with the
    rollback, so nothing is dropped on the way out of a failed body.
    """
    if len(rows) > _SMALL:
        con.register(name, _arrow(columns, rows))
        try:
            yield
        finally:
            con.unregister(name)
        return
    types = ", ".join(f"{c} {t.split(' ')[0]}" for c, t in columns)
    con.execute(f"CREATE TEMPORARY TABLE {name} ({types})")
    if rows:
        try:
            values = ", ".join(f"({_values(row)})" for row in rows)
        except TypeError:  # a value of a kind _lit does not know: let DuckDB bind it
            one = "(" + ", ".join("?" * len(columns)) + ")"
            con.execute(
                f"INSERT INTO {name} VALUES " + ", ".join([one] * len(rows)),
                [v for row in rows for v in row],
            )
        else:
            con.execute(f"INSERT INTO {name} VALUES {values}")
    yield
    con.execute(f"DROP TABLE {name}")


def _schema(columns: _Columns) -> Any:
    """The Arrow schema of a table's columns, with their exact types."""
    import pyarrow as pa

    types = {"VARCHAR": pa.string(), "DOUBLE": pa.float64(), "BIGINT": pa.int64(),
             "INTEGER": pa.int32(), "VARCHAR[]": pa.list_(pa.string())}  # fmt: skip
    return pa.schema([(c, types[t.split(" ")[0]]) for c, t in columns])


def _arrow(columns: _Columns, rows: Sequence[Sequence[Any]]) -> Any:
    """An Arrow table of ``rows`` (tuples in ``columns`` order) with the columns' exact
    types (all-NULL columns included)."""
    import pyarrow as pa

    schema = _schema(columns)
    data = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
    return pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(data, schema, strict=True)], schema=schema
    )
