"""Baseline: the last value both sides agreed on, per linked record and field, and the set of
records the next planning pass has to look at.

Tables (created by sync_pipeline/schema):

- `sync_baseline(entity, erp_id, crm_values, erp_values, agreed_at)`: one row per linked record.
  `crm_values` / `erp_values` are JSON objects, mapped field name -> the raw value each side held
  when the two last agreed on that field (equal after normalisation), so "did this side change?"
  is a raw string comparison and normalisation is only needed for the few values that differ. A
  field missing from the object has no baseline yet (first sync); '' means they agreed it is
  empty. Keyed by field name, so adding a field to a mapping needs no migration. One row per
  record (not per field) keeps the table at one row per linked record: the planner reads the
  baseline of its candidates with one join instead of a scan of (records x fields) rows.
- `sync_pending(entity, side, id)`: records to look at in the next pass, by the id on `side`
  ('crm' or 'erp'). Whatever can make a linked pair disagree with its baseline adds the record
  here: `derived.refresh` for every snapshot row an extract wrote, the link step for new and
  removed links, and the functions below whenever a baseline moves. The planner reads only these
  records (plus nothing else), and leaves behind the ones still not in agreement (planned,
  rejected, or held back by a setting) and the unlinked Unleashed records (creation candidates),
  so they are looked at again next time. This is what makes a pass over millions of linked
  records cost what the changes cost, not what the tables cost.
- `sync_pending_state(entity)`: which entities' pending sets are complete. An entity without a
  row (a database from before the pending set existed) has every active Unleashed record added
  once (`diff._ensure`).
- `sync_creation_baseline(entity, erp_id, field, value)`: the values a planned creation will
  write; `record_creation` turns them into the baseline once the record exists in the CRM.

Baseline rows are keyed by the Unleashed id: a link owns its baseline, and `links.update_links`
forgets it when the link is removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline import duck, schema


def mark_pending(con: duckdb.DuckDBPyConnection, entity: str, side: str, ids_sql: str) -> None:
    """Add the records whose `side` ids the query `ids_sql` returns (one column) to the next
    pass. Runs inside the caller's transaction."""
    con.execute(
        f"INSERT INTO sync_pending SELECT ?, ?, CAST(x AS VARCHAR) FROM ({ids_sql}) t(x)",
        [entity, side],
    )


def _mark_ids(con: duckdb.DuckDBPyConnection, entity: str, erp_ids: Sequence[str]) -> None:
    """`mark_pending` for a list of Unleashed ids."""
    ids = pd.DataFrame({"erp_id": [str(x) for x in erp_ids]}, dtype=object)
    duck.register(con, "_pending_ids", ids)
    try:
        mark_pending(con, entity, "erp", "SELECT erp_id FROM _pending_ids")
    finally:
        con.unregister("_pending_ids")


def _upsert(con: duckdb.DuckDBPyConnection, entity: str, frame: pd.DataFrame) -> None:
    """Merge baseline values (erp_id, field, crm_value, erp_value) of one entity into the
    records' rows, and put the records on the next pass."""
    if frame.empty:
        return
    rows = frame[["erp_id", "field", "crm_value", "erp_value"]].astype(object)
    rows = rows.where(rows.notna(), "")
    duck.register(con, "_baseline_rows", rows)
    try:
        merge_into_baseline(
            con,
            entity,
            """SELECT erp_id, field, crm_value, erp_value FROM _baseline_rows""",
        )
        mark_pending(con, entity, "erp", "SELECT DISTINCT erp_id FROM _baseline_rows")
    finally:
        con.unregister("_baseline_rows")


def merge_into_baseline(
    con: duckdb.DuckDBPyConnection,
    entity: str,
    rows_sql: str,
    *,
    existing_sql: str | None = None,
) -> int:
    """Merge (erp_id, field, crm_value, erp_value) rows from `rows_sql` into `sync_baseline`
    (later rows of the same field win). `existing_sql`, when given, returns (erp_id, base_row,
    crm_values, erp_values) of the records' current baseline rows read earlier in the same
    transaction, so the table is not searched again; it may read the records being written from
    `_merge_new(erp_id)`. Returns the number of records written."""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _merge_new AS
            SELECT erp_id, json_group_object(field, crm_value) AS c,
                   json_group_object(field, erp_value) AS e
            FROM (SELECT DISTINCT ON (erp_id, field) * FROM ({rows_sql}))
            GROUP BY erp_id"""
    )
    if existing_sql is None:
        existing_sql = f"""SELECT b.erp_id, b.rowid AS base_row, b.crm_values, b.erp_values
            FROM sync_baseline b WHERE b.entity = '{_entity(entity)}'
              AND b.erp_id IN (SELECT erp_id FROM _merge_new)"""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _merge_rows AS
            SELECT n.erp_id, x.base_row,
                   CASE WHEN x.base_row IS NULL THEN n.c
                        ELSE json_merge_patch(x.crm_values, n.c) END AS crm_values,
                   CASE WHEN x.base_row IS NULL THEN n.e
                        ELSE json_merge_patch(x.erp_values, n.e) END AS erp_values
            FROM _merge_new n
            LEFT JOIN (SELECT DISTINCT ON (erp_id) * FROM ({existing_sql})) x
              ON x.erp_id = n.erp_id"""
    )
    (n,) = con.execute("SELECT count(*) FROM _merge_rows").fetchone()
    if n:
        con.execute(
            """DELETE FROM sync_baseline WHERE rowid IN
               (SELECT base_row FROM _merge_rows WHERE base_row IS NOT NULL)"""
        )
        con.execute(
            """INSERT INTO sync_baseline
               SELECT ?, erp_id, crm_values, erp_values, now()::TIMESTAMP FROM _merge_rows""",
            [entity],
        )
    con.execute("DROP TABLE _merge_rows")
    con.execute("DROP TABLE _merge_new")
    return int(n)


def _entity(entity: str) -> str:
    if entity not in ("company", "contact") and not entity.isidentifier():
        raise ValueError(f"unsafe entity name {entity!r}")
    return entity


def record_agreement(
    con: duckdb.DuckDBPyConnection, entity: str, rows: Iterable[Mapping[str, Any]]
) -> None:
    """After a successful write: the written value is now what both sides hold.

    Each row has `erp_id`, `field` and `value` (the raw value written), or `crm_value` and
    `erp_value` when the two sides hold different spellings of the same value. Runs inside the
    caller's transaction (no commit here)."""
    schema.ensure(con)
    records = []
    for r in rows:
        value = r.get("value")
        records.append(
            {
                "erp_id": str(r["erp_id"]),
                "field": str(r["field"]),
                "crm_value": r.get("crm_value", value),
                "erp_value": r.get("erp_value", value),
            }
        )
    _upsert(
        con, entity, pd.DataFrame(records, columns=["erp_id", "field", "crm_value", "erp_value"])
    )


def record_creation(
    con: duckdb.DuckDBPyConnection,
    entity: str,
    *,
    crm_id: str,
    erp_id: str,
    op: Mapping[str, Any] | None = None,
    payload: Mapping[str, Any] | None = None,
) -> None:
    """After a CRM record was created from Unleashed: the values it was created with are the
    baseline (so an edit made in the CRM before the next pass is seen as a CRM change, not
    overwritten by the initial policy). Runs inside the caller's transaction."""
    schema.ensure(con)
    merge_into_baseline(
        con,
        entity,
        f"""SELECT erp_id, field, value AS crm_value, value AS erp_value
            FROM sync_creation_baseline
            WHERE entity = '{_entity(entity)}' AND erp_id = {_literal(erp_id)}""",
    )
    con.execute(
        "DELETE FROM sync_creation_baseline WHERE entity = ? AND erp_id = ?", [entity, erp_id]
    )
    _mark_ids(con, entity, [erp_id])


def _literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def forget(con: duckdb.DuckDBPyConnection, entity: str, erp_ids: Sequence[str]) -> None:
    """Drop the baseline of records that are no longer linked (and look at them again: an
    unlinked Unleashed record is a creation candidate)."""
    schema.ensure(con)
    if not erp_ids:
        return
    ids = [str(x) for x in erp_ids]
    con.execute(
        "DELETE FROM sync_baseline WHERE entity = ? AND erp_id IN (SELECT unnest(?::VARCHAR[]))",
        [entity, ids],
    )
    _mark_ids(con, entity, ids)


def baseline_values(
    con: duckdb.DuckDBPyConnection, entity: str, erp_id: str
) -> dict[str, tuple[str, str]]:
    """field -> (crm value, Unleashed value) of one record's baseline ({} when none)."""
    import json

    row = con.execute(
        "SELECT crm_values, erp_values FROM sync_baseline WHERE entity = ? AND erp_id = ?",
        [entity, erp_id],
    ).fetchone()
    if row is None:
        return {}
    crm, erp = json.loads(row[0]), json.loads(row[1])
    return {f: (crm[f], erp.get(f, "")) for f in crm}
