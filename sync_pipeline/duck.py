"""Connection helpers for DuckDB 2's Python client, whose query results stream.

`con.execute()` starts a query and rows are read as they are fetched, so a result read with
`fetchone()` stays open until it is drained. `execute()` closes it, but `register()` and `sql()`
refuse to run while one is open (ResourceInUseException). Every result this package reads is
done with by the time it registers data or asks for a relation, so the helpers below close any
result left open first.
"""

from __future__ import annotations

import contextlib
from typing import Any

import duckdb
import pyarrow as pa


def register(con: duckdb.DuckDBPyConnection, name: str, data: Any) -> None:
    """`con.register(name, data)` (a DataFrame or Arrow table) after closing an open result."""
    con.abort()
    con.register(name, data)


def arrow(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """A query's result as an Arrow table. Through a relation: on an `execute()` result the
    client copies the rows once more (and warns).

    Text comes as `large_string`, the layout pandas keeps its strings in: DuckDB's default
    `string` made every `to_pandas()` cast (copy) each text column again, 0.15 s for a 465k-row
    plan. The setting is reset after the query; when the query fails, its error is what is
    raised (a failed statement aborts an open transaction, and the reset would then fail too)."""
    con.abort()
    con.execute("SET arrow_large_buffer_size = true")
    try:
        table = con.sql(sql).to_arrow_table()
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("RESET arrow_large_buffer_size")
        raise
    con.execute("RESET arrow_large_buffer_size")
    return table
