"""The sync database's schema: one owner (sync_pipeline/schema), numbered migrations, a version
recorded in the database, databases from the previous release migrated forward in one
transaction, and a database from a newer release refused."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from sync_pipeline import schema, store
from sync_pipeline.schema import Migration
from tests.harness import Harness

UNVERSIONED = Path(__file__).parent / "fixtures" / "unversioned_database.sql"


def _tables(con) -> set[str]:
    return {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE NOT temporary"
        ).fetchall()
    }


def _columns(con, table: str) -> set[str]:
    return {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = ?", [table]
        ).fetchall()
    }


def _unversioned(path: Path) -> None:
    """A database as the release before schema versioning wrote it, with a little history."""
    con = duckdb.connect(str(path))
    con.execute(UNVERSIONED.read_text())
    con.execute(
        """INSERT INTO outbox (op_id, op_key, created_at, entity, op, crm_id, erp_id, field,
                               old_value, new_value, status, attempts, reason)
           VALUES ('op-1', 'k-1', TIMESTAMP '2026-11-01 10:00', 'company', 'update_erp', '1',
                   'g-old', 'phone', '0161 000 0000', '0161 000 0001', 'applied', 1,
                   'CRM changed phone')"""
    )
    con.execute(
        """INSERT INTO audit_log VALUES (TIMESTAMP '2026-11-01 10:00', 'run-1', 'op-1',
           'company', '1', 'g-old', 'phone', '0161 000 0000', '0161 000 0001', 'to_erp',
           'CRM changed phone')"""
    )
    con.execute(
        """INSERT INTO sync_baseline VALUES ('company', 'g-old', '{"phone": "0161 000 0001"}',
           '{"phone": "0161 000 0001"}', TIMESTAMP '2026-11-01 10:00')"""
    )
    con.close()


def test_a_new_database_is_created_at_the_latest_version(tmp_path):
    with store.connect(tmp_path / "new.duckdb") as con:
        assert schema.version(con) == schema.latest()
        applied = con.execute("SELECT version, name FROM schema_version ORDER BY 1").fetchall()
        assert [v for v, _ in applied] == [m.number for m in schema.migrations()]
        assert {"outbox", "sync_baseline", "company_links", "derived_state"} <= _tables(con)


def test_opening_an_up_to_date_database_changes_nothing(tmp_path):
    db = tmp_path / "sync.duckdb"
    with store.connect(db) as con:
        (applied_at,) = con.execute("SELECT max(applied_at) FROM schema_version").fetchone()
    with store.connect(db) as con:
        assert schema.migrate(con) == []
        rows = con.execute("SELECT count(*), max(applied_at) FROM schema_version").fetchone()
        assert rows == (len(schema.migrations()), applied_at)


def test_a_database_from_the_previous_release_is_migrated_and_a_cycle_runs_on_it(
    emulators, tmp_path
):
    """The release before versioning: its tables, no version. Opened by this release, it is at
    the latest version with its history kept, and a sync cycle runs on it."""
    db = tmp_path / "sync.duckdb"
    _unversioned(db)
    with duckdb.connect(str(db)) as con:
        assert schema.version(con) == 0
    h = Harness(emulators, tmp_path)  # uses tmp_path / "sync.duckdb"
    try:
        with store.connect(db) as con:
            assert schema.version(con) == schema.latest()
        kept = h.query("SELECT op_id, status, failures FROM outbox WHERE op_id = 'op-1'")
        assert kept.to_dict("records") == [{"op_id": "op-1", "status": "applied", "failures": 0}]
        assert len(h.query("SELECT * FROM audit_log WHERE op_id = 'op-1'")) == 1
        h.cycle()
        assert len(h.query("SELECT * FROM company_links")) > 0
        assert h.query("SELECT * FROM audit_log WHERE op_id = 'op-1'")["run_id"].tolist() == [
            "run-1"
        ]
    finally:
        h.close()


def test_an_older_unversioned_layout_is_brought_forward(tmp_path):
    """Databases from before the baseline's one-row-per-record layout, the decisions table, the
    outbox's retry columns, the bad-records parent and the derived mark: each is moved forward
    where it is found."""
    db = tmp_path / "old.duckdb"
    _unversioned(db)
    con = duckdb.connect(str(db))
    con.execute("ALTER TABLE outbox DROP COLUMN failures")
    con.execute("ALTER TABLE outbox DROP COLUMN next_attempt_at")
    con.execute("ALTER TABLE bad_records DROP COLUMN parent_id")
    con.execute("ALTER TABLE crm_companies DROP COLUMN _derived_mod")
    con.execute("DROP TABLE conflict_decisions")
    con.execute("DROP TABLE sync_baseline")
    con.execute(
        """CREATE TABLE sync_baseline (entity VARCHAR, erp_id VARCHAR, field VARCHAR,
           crm_value VARCHAR, erp_value VARCHAR, agreed_at TIMESTAMP)"""
    )
    con.execute(
        """INSERT INTO sync_baseline VALUES
           ('company', 'g-1', 'phone', '0161 1', '0161 1', TIMESTAMP '2026-01-01'),
           ('company', 'g-1', 'name', 'Acme', 'ACME', TIMESTAMP '2026-01-02')"""
    )
    con.execute("CREATE TABLE sync_baseline_digest (erp_id VARCHAR, digest VARCHAR)")
    con.execute(
        """INSERT INTO conflicts VALUES
           (TIMESTAMP '2026-01-01', 'r1', 'company', '1', 'g-1', 'name', 'A', 'B', 'O', 'crm',
            'newest', NULL, NULL, 'c1'),
           (TIMESTAMP '2026-01-03', 'r2', 'company', '1', 'g-1', 'name', 'C', 'D', 'O', 'erp',
            'newest', NULL, NULL, 'c2')"""
    )
    con.close()

    with store.connect(db) as con:
        assert schema.version(con) == schema.latest()
        assert {"failures", "next_attempt_at"} <= _columns(con, "outbox")
        assert con.execute("SELECT failures FROM outbox").fetchall() == [(0,)]
        assert "parent_id" in _columns(con, "bad_records")
        assert "_derived_mod" in _columns(con, "crm_companies")
        assert "sync_baseline_digest" not in _tables(con)
        (crm_values, erp_values) = con.execute(
            "SELECT crm_values, erp_values FROM sync_baseline WHERE erp_id = 'g-1'"
        ).fetchone()
        assert json.loads(crm_values) == {"phone": "0161 1", "name": "Acme"}
        assert json.loads(erp_values) == {"phone": "0161 1", "name": "ACME"}
        decisions = con.execute(
            "SELECT field, crm_value, erp_value, winner FROM conflict_decisions"
        ).fetchall()
        assert decisions == [("name", "C", "D", "erp")]  # the last decision of the log


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    """Migrations run in one transaction: one that fails half-way leaves nothing of itself or of
    the ones before it in the same upgrade."""
    db = tmp_path / "sync.duckdb"
    with store.connect(db) as con:
        at = schema.version(con)
    broken = (
        *schema.migrations(),
        Migration(at + 1, "adds_a_table", "CREATE TABLE shiny_new (x INTEGER)"),
        Migration(at + 2, "fails", "ALTER TABLE no_such_table ADD COLUMN y INTEGER"),
    )
    monkeypatch.setattr(schema, "migrations", lambda: broken)
    con = duckdb.connect(str(db))
    with pytest.raises(duckdb.CatalogException):
        schema.ensure(con)
    con.close()
    monkeypatch.undo()
    with duckdb.connect(str(db)) as con:
        assert schema.version(con) == at
        assert "shiny_new" not in _tables(con)


def test_a_database_from_a_newer_release_is_refused_naming_both_versions(tmp_path):
    db = tmp_path / "sync.duckdb"
    with store.connect(db) as con:
        newer = schema.latest() + 1
        con.execute("INSERT INTO schema_version VALUES (?, 'from_the_future', now())", [newer])
    with pytest.raises(schema.SchemaError) as refused, store.connect(db):
        pass
    message = str(refused.value)
    assert f"schema version {newer}" in message and f"up to {schema.latest()}" in message


def test_no_module_but_the_schema_owner_creates_or_alters_a_persistent_table():
    """Temporary tables and the two asset outputs replaced whole each run are the exceptions."""
    root = Path(schema.__file__).parent.parent
    offenders = []
    for path in root.rglob("*.py"):
        # The pacing file and the webhook event file (SQLite files of their own, not the sync
        # database).
        if {"schema", "clients", "webhooks"} & set(path.parts):
            continue
        text = path.read_text()
        for needle in ("CREATE TABLE IF NOT EXISTS", "ADD COLUMN"):
            if needle in text and path.name != "derived.py":  # mapping-driven derived columns
                offenders.append(f"{path.relative_to(root)}: {needle}")
    assert offenders == []
