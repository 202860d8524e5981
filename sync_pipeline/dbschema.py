"""One catalogue query instead of a DDL statement per table on every connection.

`ensure_schema` functions are called whenever a connection is opened (about fifteen times a sync
cycle, once per record written by apply). Running every `CREATE TABLE IF NOT EXISTS` each time
cost ~1.5 ms a statement; `complete` answers "is everything already there?" with one query.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import duckdb

# The link table of each entity (sync_pipeline/links.py creates and keeps them).
LINK_TABLES = {"company": "company_links", "contact": "contact_links"}

_CREATE = re.compile(r"CREATE\s+TABLE\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.IGNORECASE)


def tables_of(ddl: Iterable[str]) -> list[str]:
    """The table names a list of `CREATE TABLE IF NOT EXISTS` statements creates."""
    return [m.group(1) for d in ddl if (m := _CREATE.search(d))]


def complete(
    con: duckdb.DuckDBPyConnection,
    tables: Iterable[str],
    columns: Mapping[str, Iterable[str]] | None = None,
    *,
    absent: Mapping[str, Iterable[str]] | None = None,
) -> bool:
    """True when every table exists (not temporary), has the given `columns`, and has none of
    the `absent` columns (an older layout still to migrate)."""
    columns = columns or {}
    absent = absent or {}
    wanted = set(tables) | set(columns) | set(absent)
    have: dict[str, set[str]] = {}
    for table, column in con.execute(
        """SELECT table_name, column_name FROM duckdb_columns()
           WHERE NOT internal AND database_name = current_database()
             AND table_name IN (SELECT unnest(?::VARCHAR[]))""",
        [sorted(wanted)],
    ).fetchall():
        have.setdefault(table, set()).add(column)
    if any(t not in have for t in set(tables) | set(columns)):
        return False
    if any(not set(cols) <= have[t] for t, cols in columns.items()):
        return False
    return not any(set(cols) & have.get(t, set()) for t, cols in absent.items())
