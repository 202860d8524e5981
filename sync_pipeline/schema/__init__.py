"""The one owner of the sync database's tables: numbered migrations and the schema version.

Each migration is a file `NNN_name.sql` in this package, applied in order. The database records
every migration applied in `schema_version`; opening a database (`ensure`, called by
`store.connect` and by every module before it touches its tables) applies the missing ones in
one transaction, so a database is either at its old version or at the new one, never between.
A database written by a newer release is refused rather than guessed at.

A database from before versioning (tables, no `schema_version`) is brought to version 1 by
`_from_unversioned` inside the same transaction: the layouts it may have are known and each is
moved forward where it is found.

Not here: the derived columns of the snapshot tables, which follow the YAML mapping
(`derived.refresh` adds them), and the tables an asset replaces whole on every run
(`sync_plan`, `shadow_plan`, `account_manager_candidates`).

To change the schema, add the next numbered file (never edit an applied one) and a test that
opens a database at the previous version (tests/test_schema.py shows how).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import duckdb

# Raw snapshot tables: name -> whether its records have a parent (a contact's company).
RAW_TABLES = {
    "crm_companies": False,
    "crm_contacts": True,
    "crm_users": False,
    "unleashed_customers": False,
    "unleashed_contacts": True,
    "unleashed_salespersons": False,
}
# The link table of each entity.
LINK_TABLES = {"company": "company_links", "contact": "contact_links"}
# Raw snapshot rows carry derived columns computed from `data` by sync_pipeline.derived; this
# column holds the `modified` they were computed for, and every upsert clears it.
DERIVED_MARK = "_derived_mod"

_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
VERSION_TABLE = "schema_version"
_VERSION_DDL = f"""CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (
    version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL
)"""


class SchemaError(RuntimeError):
    """The database cannot be opened by this release."""


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str


@cache
def migrations() -> tuple[Migration, ...]:
    found = []
    for entry in resources.files(__package__).iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.number)
    numbers = [m.number for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise SchemaError(f"schema migrations must be numbered 1, 2, 3 … without gaps: {numbers}")
    return tuple(found)


def latest() -> int:
    return migrations()[-1].number


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        r[0]
        for r in con.execute(
            """SELECT table_name FROM duckdb_tables()
               WHERE NOT temporary AND database_name = current_database()"""
        ).fetchall()
    }


def version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version of the database: 0 when it has none (new, or from before
    versioning)."""
    has = con.execute(
        """SELECT count(*) FROM duckdb_tables()
           WHERE table_name = ? AND NOT temporary AND database_name = current_database()""",
        [VERSION_TABLE],
    ).fetchone()[0]
    if not has:
        return 0
    return con.execute(f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}").fetchone()[0]


def ensure(con: duckdb.DuckDBPyConnection) -> None:
    """Bring the database to the latest schema; two catalogue reads when it is there already."""
    if version(con) != latest():
        migrate(con)


def migrate(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Apply every migration the database lacks, in one transaction (or inside the caller's).
    Returns the numbers applied."""
    try:
        con.begin()
        own = True
    except duckdb.TransactionException:
        own = False  # inside the caller's transaction: part of it
    try:
        applied = _migrate(con)
    except BaseException:
        if own:
            con.rollback()
        raise
    if own:
        con.commit()
    return applied


def _migrate(con: duckdb.DuckDBPyConnection) -> list[int]:
    current = version(con)
    if current > latest():
        raise SchemaError(
            f"the sync database is at schema version {current}, written by a newer release of "
            f"sync-pipeline; this release knows versions up to {latest()}. Run the newer "
            "release, or restore a backup made before the upgrade."
        )
    before = _tables(con) if current == 0 else set()
    applied = []
    for migration in migrations():
        if migration.number <= current:
            continue
        con.execute(migration.sql)
        if migration.number == 1 and before:
            _from_unversioned(con, before)
        con.execute(_VERSION_DDL)
        con.execute(
            f"INSERT INTO {VERSION_TABLE} VALUES (?, ?, now()::TIMESTAMP)",
            [migration.number, migration.name],
        )
        applied.append(migration.number)
    return applied


# ------------------------------------------------------------------------------------------------
# Databases from before versioning
# ------------------------------------------------------------------------------------------------
# Columns such databases may lack, by table: name -> type. Rows get the column's default.
_UNVERSIONED_COLUMNS = {
    **{table: {DERIVED_MARK: "TIMESTAMP"} for table in RAW_TABLES},
    "outbox": {"failures": "INTEGER DEFAULT 0", "next_attempt_at": "TIMESTAMP"},
    "bad_records": {"parent_id": "VARCHAR"},
}


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    return {
        r[0]
        for r in con.execute(
            """SELECT column_name FROM duckdb_columns()
               WHERE table_name = ? AND NOT internal AND database_name = current_database()""",
            [table],
        ).fetchall()
    }


def _from_unversioned(con: duckdb.DuckDBPyConnection, before: set[str]) -> None:
    """Move a database from before versioning to the version-1 layout. Migration 1 has just
    created the tables it lacked (`before` is what it had)."""
    for table, added in _UNVERSIONED_COLUMNS.items():
        if table in before:
            for name, kind in added.items():
                con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")
    if "field" in _columns(con, "sync_baseline"):
        # One row per record and field (and a digest table): folded into one row per record.
        con.execute(
            """CREATE TABLE sync_baseline_records AS
               SELECT entity, erp_id, json_group_object(field, crm_value) AS crm_values,
                      json_group_object(field, erp_value) AS erp_values,
                      max(agreed_at) AS agreed_at
               FROM sync_baseline GROUP BY entity, erp_id"""
        )
        con.execute("DROP TABLE sync_baseline")
        con.execute("ALTER TABLE sync_baseline_records RENAME TO sync_baseline")
    con.execute("DROP TABLE IF EXISTS sync_baseline_digest")
    if "conflicts" in before and "conflict_decisions" not in before:
        fill_decisions_from_log(con)


def fill_decisions_from_log(con: duckdb.DuckDBPyConnection) -> None:
    """Fill `conflict_decisions` from the `conflicts` log: each field's last `newest` decision
    (for a database whose log predates the table)."""
    con.execute(
        """INSERT OR REPLACE INTO conflict_decisions
           SELECT entity, erp_id, field, crm_value, erp_value, baseline_value, winner, seen_at
           FROM conflicts WHERE policy = 'newest' AND erp_id IS NOT NULL
           QUALIFY row_number() OVER (
               PARTITION BY entity, erp_id, field ORDER BY seen_at DESC) = 1"""
    )
