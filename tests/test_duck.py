"""The DuckDB connection helpers (sync_pipeline/duck.py)."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from sync_pipeline import duck


def test_arrow_gives_text_as_large_string_and_leaves_the_connection_as_it_was():
    """pandas keeps strings as large_string, so text handed over in that layout is not copied
    again; the setting that does it is the query's only."""
    con = duckdb.connect()
    table = duck.arrow(con, "SELECT 'Ada' AS name, 1 AS n")
    assert table.schema.field("name").type == pa.large_string()
    assert table.to_pandas()["name"].tolist() == ["Ada"]
    [(setting,)] = con.execute("SELECT current_setting('arrow_large_buffer_size')").fetchall()
    assert setting is False
    assert con.sql("SELECT 'x' AS s").to_arrow_table().schema.field("s").type == pa.string()


def test_a_failing_query_inside_a_transaction_raises_its_own_error():
    """A failed statement aborts the open transaction; the error a caller sees must still be the
    query's (here: the value it could not convert), not the aborted transaction's."""
    con = duckdb.connect()
    con.execute("BEGIN")
    with pytest.raises(duckdb.ConversionException, match="not-a-number"):
        duck.arrow(con, "SELECT CAST('not-a-number' AS INTEGER) AS n")
    con.execute("ROLLBACK")
    assert duck.arrow(con, "SELECT 1 AS n").num_rows == 1
