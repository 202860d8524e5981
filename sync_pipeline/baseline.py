"""Baseline: the last value both sides agreed on, per linked record and field.

Tables (created by `ensure_schema`):

- `sync_baseline(entity, erp_id, field, crm_value, erp_value, agreed_at)`: one row per linked
  record and field once the two sides have agreed. `crm_value` / `erp_value` are the raw values
  each side held at that moment (equal after normalisation), so "did this side change?" is a raw
  string comparison and normalisation is only needed for the few values that differ. No row =
  no baseline yet (first sync); '' = they agreed the field is empty.
- `sync_baseline_digest(entity, erp_id, crm_digest, erp_digest)`: per record, a 64-bit hash of
  the baseline values of every mapped field (in mapping order) on each side. It lets the diff
  skip a record whose current raw values hash to the same digest without looking at single
  fields, which is what makes a plan over millions of records cheap. It only exists when every
  field has a baseline; anything that moves a baseline row drops it, and the planner rebuilds it
  for the records it looked at. (A 64-bit collision would hide one change; odds ~1e-19.)
- `sync_creation_baseline(entity, erp_id, field, value)`: the values a planned creation will
  write; `record_creation` turns them into baseline rows once the record exists in the CRM.

Baseline rows are keyed by the Unleashed id: a link owns its baseline, and `links.update_links`
forgets it when the link is removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline.mapping.schema import EntityMapping

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS sync_baseline (
        entity VARCHAR NOT NULL, erp_id VARCHAR NOT NULL, field VARCHAR NOT NULL,
        crm_value VARCHAR NOT NULL, erp_value VARCHAR NOT NULL, agreed_at TIMESTAMP
    )""",
    """CREATE TABLE IF NOT EXISTS sync_baseline_digest (
        entity VARCHAR NOT NULL, erp_id VARCHAR NOT NULL,
        crm_digest UBIGINT NOT NULL, erp_digest UBIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS sync_creation_baseline (
        entity VARCHAR NOT NULL, erp_id VARCHAR NOT NULL, field VARCHAR NOT NULL,
        value VARCHAR NOT NULL
    )""",
]


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    for ddl in SCHEMA:
        con.execute(ddl)


def _upsert(con: duckdb.DuckDBPyConnection, entity: str, frame: pd.DataFrame) -> None:
    """Replace baseline rows (erp_id, field, crm_value, erp_value) of one entity."""
    if frame.empty:
        return
    rows = frame[["erp_id", "field", "crm_value", "erp_value"]].astype(object)
    rows = rows.where(rows.notna(), "")
    con.register("_baseline_rows", rows)
    try:
        # A join, not `(erp_id, field) IN (SELECT ...)`: DuckDB plans the row-value IN as a slow
        # scan, about 4x the cost, and apply calls this once per record written.
        con.execute(
            """DELETE FROM sync_baseline b USING _baseline_rows r
               WHERE b.entity = ? AND b.erp_id = r.erp_id AND b.field = r.field""",
            [entity],
        )
        con.execute(
            """INSERT INTO sync_baseline
               SELECT DISTINCT ON (erp_id, field) ?, erp_id, field, crm_value, erp_value,
                      now()::TIMESTAMP
               FROM _baseline_rows""",
            [entity],
        )
        con.execute(
            """DELETE FROM sync_baseline_digest WHERE entity = ?
               AND erp_id IN (SELECT erp_id FROM _baseline_rows)""",
            [entity],
        )
    finally:
        con.unregister("_baseline_rows")


def record_agreement(
    con: duckdb.DuckDBPyConnection, entity: str, rows: Iterable[Mapping[str, Any]]
) -> None:
    """After a successful write: the written value is now what both sides hold.

    Each row has `erp_id`, `field` and `value` (the raw value written), or `crm_value` and
    `erp_value` when the two sides hold different spellings of the same value. Runs inside the
    caller's transaction (no commit here)."""
    ensure_schema(con)
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
    ensure_schema(con)
    con.execute(
        """DELETE FROM sync_baseline WHERE entity = ? AND erp_id = ? AND field IN
             (SELECT field FROM sync_creation_baseline WHERE entity = ? AND erp_id = ?)""",
        [entity, erp_id, entity, erp_id],
    )
    con.execute(
        """INSERT INTO sync_baseline
           SELECT entity, erp_id, field, value, value, now()::TIMESTAMP
           FROM sync_creation_baseline WHERE entity = ? AND erp_id = ?""",
        [entity, erp_id],
    )
    con.execute(
        "DELETE FROM sync_creation_baseline WHERE entity = ? AND erp_id = ?", [entity, erp_id]
    )
    con.execute(
        "DELETE FROM sync_baseline_digest WHERE entity = ? AND erp_id = ?", [entity, erp_id]
    )


def forget(con: duckdb.DuckDBPyConnection, entity: str, erp_ids: Sequence[str]) -> None:
    """Drop the baseline of records that are no longer linked."""
    ensure_schema(con)
    if not erp_ids:
        return
    ids = [str(x) for x in erp_ids]
    for table in ("sync_baseline", "sync_baseline_digest"):
        con.execute(
            f"DELETE FROM {table} WHERE entity = ? AND erp_id IN (SELECT unnest(?::VARCHAR[]))",
            [entity, ids],
        )


def refresh_digests(con: duckdb.DuckDBPyConnection, mapping: EntityMapping, ids_table: str) -> None:
    """Rebuild the digest of the records listed in `ids_table` (a table with an erp_id column)."""
    fields = list(mapping.fields)
    order = ", ".join(f"({i}, '{f}')" for i, f in enumerate(fields))
    entity = mapping.entity
    con.execute(
        f"""DELETE FROM sync_baseline_digest WHERE entity = ?
            AND erp_id IN (SELECT erp_id FROM {ids_table})""",
        [entity],
    )
    con.execute(
        f"""INSERT INTO sync_baseline_digest
            SELECT ?, b.erp_id, hash(list(b.crm_value ORDER BY f.pos)),
                   hash(list(b.erp_value ORDER BY f.pos))
            FROM sync_baseline b JOIN (VALUES {order}) f(pos, field) ON f.field = b.field
            WHERE b.entity = ? AND b.erp_id IN (SELECT erp_id FROM {ids_table})
            GROUP BY b.erp_id HAVING count(*) = {len(fields)}""",
        [entity, entity],
    )


def settle(
    con: duckdb.DuckDBPyConnection,
    mappings: Mapping[str, EntityMapping],
    *,
    default_region: str = "GB",
) -> int:
    """Set the baseline of every linked record and field whose two sides already agree
    (after normalisation). Returns how many baseline rows were written.

    The planner does the same as part of `plan_changes`; this entry point is for callers that
    want the baseline caught up without planning."""
    from sync_pipeline.diff import settle_entities  # the candidate search lives with the diff

    return settle_entities(con, mappings, default_region=default_region)
