"""Derived columns on the raw snapshot tables, computed once when a row changes.

Link matching and the creation search compare match keys of millions of rows; extracting them
from the JSON `data` of every row on each pass is what made that slow, so they are kept next to it:

- `_key_<name> VARCHAR` (every table a match key reads, e.g. `crm_companies._key_account_code`):
  the key value as it is compared (`mapping.projection.key_expr`), NULL when empty. The
  creation search and link matching join on these instead of extracting keys from every row.
- `_link_sig UBIGINT` (every table link matching reads): a hash of the row's status as a link
  pass sees it (active, parent id). `refresh` counts in `derived_counters`
  ('link_inputs:<entity>', for each entity whose link pass reads the table) the rows where it
  moved, and the rows whose match keys moved while they are not linked (a new row counts too).
  Nothing else can change what a pass does: it keeps a link while both records are active (and a
  contact's two companies are linked to each other), and matches keys of unlinked records only.
  So after a phone edit, or a linked contact's new email or name, `links.update_links` skips its
  whole-table work (4 s a pass at 1M / 3M records), and after a contact-only change, the
  companies' part of it.
- `_fh_<field> UBIGINT`, `_fat_<field> TIMESTAMP` (every mapping's CRM and Unleashed table): per
  mapped field, a hash of the raw value and the `modified` of the first
  version in which the row held that value: when that side's value of the field changed, as
  observed. A `newest` conflict compares these, not the records' modified times, which move with
  every write to any field (the sync's own writes included; an Unleashed contact carries its
  customer's). Apply stores the version it reads before writing to Unleashed and refreshes it
  (`refresh_now`) before storing the version it wrote, so an edit made there before the sync's
  write keeps its own time.
- `_derived_mod TIMESTAMP`: the row's `modified` when the columns above were computed; NULL means
  "to do". `store.upsert_snapshot` sets it NULL whenever it writes a row, and a row whose `modified`
  no longer equals it (a writer that bypassed the upsert) is recomputed too.

`refresh` brings them up to date with one `UPDATE ... WHERE` stale per table. The extract assets
call it right after each upsert (so the cost is paid once per changed row, at extract time), and
the planner and link matching call it again first (a scan of two timestamp columns when nothing
is stale). Every row it recomputes in a mapping's CRM or Unleashed table is also put on the
planner's next pass (`baseline.sync_pending`): that is how the planner learns what changed
without comparing whole tables. The column set and SQL are fingerprinted per table in
`derived_state`: when a mapping changes (a field added, a path or key changed), every row of that
table is recomputed.

The columns are added with `ALTER TABLE ... ADD COLUMN IF NOT EXISTS`, so no schema migration is
needed; writers must name their columns on insert (store.upsert_snapshot does).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import duckdb

from sync_pipeline import baseline, schema
from sync_pipeline.mapping.projection import ident, key_expr, value_expr
from sync_pipeline.mapping.schema import EntityMapping
from sync_pipeline.schema import LINK_TABLES, RAW_TABLES

MARK = "_derived_mod"
LINK_SIG = "_link_sig"
FIELD_HASH = "_fh_"  # + field name: UBIGINT
FIELD_AT = "_fat_"  # + field name: TIMESTAMP


def field_at_column(field_name: str) -> str:
    return FIELD_AT + field_name


LINK_INPUTS = "link_inputs"
# NULL `modified` is stored as -infinity in the mark so that "computed" and "stale" stay distinct.
_MOD = "coalesce(modified, '-infinity'::TIMESTAMP)"


def key_column(key_name: str) -> str:
    return f"_key_{key_name}"


def columns(mappings: Mapping[str, EntityMapping]) -> dict[str, dict[str, tuple[str, str]]]:
    """table -> {column: (type, SQL expression over the row's `data`)} for every raw table the
    mappings read a match key from, and every mapping's CRM and Unleashed table (possibly with no
    columns: their rows are still tracked for the planner)."""

    out: dict[str, dict[str, tuple[str, str]]] = {}
    has_parent: dict[str, bool] = {}

    def add(table: str, col: str, typ: str, expr: str) -> None:
        cols = out.setdefault(table, {})
        if col in cols and cols[col] != (typ, expr):
            raise ValueError(f"derived column {table}.{col} is defined two different ways")
        cols[col] = (typ, expr)

    for mapping in mappings.values():
        for side in ("crm", "erp"):
            paths = [getattr(f, side) for f in mapping.fields.values()]
            table = getattr(mapping, side).table
            # One scalar column per field: DuckDB updates list columns on disk 100x slower.
            for name, path in zip(mapping.fields, paths, strict=True):
                add(table, FIELD_HASH + name, "UBIGINT", f"hash({value_expr(path)})")
        has_parent[mapping.crm.table] = mapping.crm.parent_key is not None
        has_parent[mapping.erp.table] = mapping.erp.parent_resource is not None
        for key in mapping.match.keys:
            if key.crm_table:
                has_parent[key.crm_table] = True  # e.g. a sales ledger's company
            crm_table = key.crm_table or mapping.crm.table
            add(crm_table, key_column(key.name), "VARCHAR", key_expr(key, "crm"))
            add(mapping.erp.table, key_column(key.name), "VARCHAR", key_expr(key, "erp"))
    # Every table above is read by link matching: the row's status there, as one hash.
    for table, cols in out.items():
        parent = "parent_id" if has_parent.get(table) else "NULL"
        cols[LINK_SIG] = ("UBIGINT", f"hash(active, {parent})")
    return out


def link_readers(mappings: Mapping[str, EntityMapping]) -> dict[str, set[str]]:
    """table -> the entities whose link pass reads it (its CRM and Unleashed tables, and the
    tables its match keys read, e.g. the sales ledgers for companies)."""
    out: dict[str, set[str]] = {}
    for mapping in mappings.values():
        tables = [mapping.crm.table, mapping.erp.table]
        tables += [key.crm_table for key in mapping.match.keys if key.crm_table]
        for table in tables:
            out.setdefault(table, set()).add(mapping.entity)
    return out


def linked_by(mappings: Mapping[str, EntityMapping]) -> dict[str, tuple[str, str, str]]:
    """table -> (column of its row, link table, link column): the row's record is linked when
    its column's value is in the link column (for a key table such as the sales ledgers, the
    record it belongs to, by `parent_id`)."""

    out: dict[str, tuple[str, str, str]] = {}
    for mapping in mappings.values():
        links = LINK_TABLES[mapping.entity]
        out[mapping.crm.table] = ("id", links, "crm_id")
        out[mapping.erp.table] = ("id", links, "erp_id")
        for key in mapping.match.keys:
            if key.crm_table:
                out[key.crm_table] = ("parent_id", links, "crm_id")
    return out


def _fingerprint(cols: Mapping[str, tuple[str, str]]) -> str:
    text = json.dumps(sorted((c, t, e) for c, (t, e) in cols.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class RefreshStats:
    """Rows recomputed per table, and the wall time the refresh took."""

    rows: dict[str, int] = field(default_factory=dict)
    rebuilt: list[str] = field(default_factory=list)  # tables recomputed in full (new mapping)
    link_inputs: int = 0  # rows whose status, parent or match keys moved (or that are new)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def refresh(
    con: duckdb.DuckDBPyConnection,
    mappings: Mapping[str, EntityMapping],
    tables: Iterable[str] | None = None,
) -> RefreshStats:
    """Recompute the derived columns of rows that changed since they were last computed.

    `tables` limits the work to those raw tables (e.g. the ones an extract just wrote); tables
    that do not exist yet are skipped."""
    t0 = time.perf_counter()
    stats = RefreshStats()
    wanted = columns(mappings)
    owners: dict[str, list[tuple[str, str]]] = {}
    for mapping in mappings.values():
        owners.setdefault(mapping.crm.table, []).append((mapping.entity, "crm"))
        owners.setdefault(mapping.erp.table, []).append((mapping.entity, "erp"))
    schema.ensure(con)
    only = None if tables is None else set(tables)
    existing = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE NOT temporary"
        ).fetchall()
    }
    known = dict(con.execute("SELECT table_name, fingerprint FROM derived_state").fetchall())
    # Before the first link pass there are no link tables: every record counts as unlinked.
    linked = {t: spec for t, spec in linked_by(mappings).items() if spec[1] in existing}
    readers = link_readers(mappings)
    for table, cols in wanted.items():
        if (only is not None and table not in only) or table not in existing:
            continue
        t = ident(table)
        fp = _fingerprint(cols)
        hashed = [c for c in cols if c.startswith(FIELD_HASH)]
        extra = {FIELD_AT + c.removeprefix(FIELD_HASH): ("TIMESTAMP", "") for c in hashed}
        if known.get(table) != fp:  # new table or changed mapping: (re)compute every row
            for col, (typ, _) in {**cols, **extra, MARK: ("TIMESTAMP", "")}.items():
                con.execute(f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {ident(col)} {typ}")
            con.execute(f"UPDATE {t} SET {MARK} = NULL")
            stats.rebuilt.append(table)
            con.execute(
                """INSERT INTO derived_state VALUES (?, ?, now()::TIMESTAMP)
                   ON CONFLICT (table_name) DO UPDATE
                   SET fingerprint = excluded.fingerprint, refreshed_at = excluded.refreshed_at""",
                [table, fp],
            )
        # Find the stale rows reading only two timestamp columns; an UPDATE with this WHERE
        # would read `data` of every row.
        stale = f"{MARK} IS NULL OR {MARK} <> {_MOD}"
        (n,) = con.execute(f"SELECT count(*) FROM {t} WHERE {stale}").fetchone()
        stats.rows[table] = int(n)
        if not n:
            continue
        exprs = "".join(f"{expr} AS {ident(c)}, " for c, (_, expr) in cols.items())
        sets = "".join(f"{ident(c)} = v.{ident(c)}, " for c in cols)
        keys = [c for c in cols if c != LINK_SIG and c not in hashed]
        # The values before this refresh ride along, to tell what moved.
        rides = [LINK_SIG, *keys, *hashed]
        old = "".join(f"t.{ident(c)} AS {ident('_old' + c)}, " for c in rides)
        for c in hashed:
            sets += f"{_field_at_sql(c)}, "
        parent = "t.parent_id" if RAW_TABLES.get(table) else "NULL::VARCHAR AS parent_id"
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE _derived_values AS
                WITH s AS (SELECT rowid AS row_id FROM {t} WHERE {stale})
                SELECT t.rowid AS row_id, t.id, {parent}, {exprs}{old}{_MOD} AS mark,
                       t.modified
                FROM {t} t WHERE t.rowid IN (SELECT row_id FROM s)"""
        )
        moved = _link_inputs_moved(con, table, keys, linked.get(table))
        if moved:
            stats.link_inputs += int(moved)
            for entity in sorted(readers.get(table, ())):
                _bump(con, f"{LINK_INPUTS}:{entity}", int(moved))
        con.execute(
            f"""UPDATE {t} SET {sets}{MARK} = v.mark
                FROM _derived_values v WHERE {t}.rowid = v.row_id"""
        )
        for entity, side in owners.get(table, []):
            baseline.mark_pending(con, entity, side, "SELECT id FROM _derived_values")
        con.execute("DROP TABLE _derived_values")
    stats.seconds = time.perf_counter() - t0
    return stats


# A field's time after a refresh: kept while its value hash is the one already stored; any other
# (a new value, a new row, a field new to the mapping) takes the row's `modified`.
def _field_at_sql(hash_col: str) -> str:
    at = ident(FIELD_AT + hash_col.removeprefix(FIELD_HASH))
    new, old = f"v.{ident(hash_col)}", f"v.{ident('_old' + hash_col)}"
    return f"{at} = CASE WHEN {old} = {new} AND {at} IS NOT NULL THEN {at} ELSE v.modified END"


def _link_inputs_moved(
    con: duckdb.DuckDBPyConnection,
    table: str,
    keys: list[str],
    linked: tuple[str, str, str] | None,
) -> int:
    """Rows of `_derived_values` that can change what a link pass does: a moved status (active,
    parent; a new row), or a moved match key on a record that is not linked (`linked`: how to
    tell, None before any link exists). A linked record's key is not read by matching, which
    only pairs unlinked records."""
    sig, old_sig = ident(LINK_SIG), ident("_old" + LINK_SIG)
    (status,) = con.execute(
        f"SELECT count(*) FROM _derived_values WHERE {sig} IS DISTINCT FROM {old_sig}"
    ).fetchone()
    if not keys:
        return int(status)
    key_moved = " OR ".join(f"{ident(c)} IS DISTINCT FROM {ident('_old' + c)}" for c in keys)
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _keys_moved AS SELECT id, parent_id
            FROM _derived_values WHERE {sig} = {old_sig} AND ({key_moved})"""
    )
    (moved,) = con.execute("SELECT count(*) FROM _keys_moved").fetchone()
    if moved and linked is not None:
        col, links, link_col = linked
        # The link table is read only for these records (a semi-join built on the few rows
        # here, not a hash table of millions of links).
        (linked_n,) = con.execute(
            f"""SELECT count(*) FROM _keys_moved WHERE {col} IN (
                    SELECT {link_col} FROM {links}
                    WHERE {link_col} IN (SELECT {col} FROM _keys_moved))"""
        ).fetchone()
        moved -= linked_n
    con.execute("DROP TABLE _keys_moved")
    return int(status) + int(moved)


def _bump(con: duckdb.DuckDBPyConnection, name: str, by: int) -> None:
    con.execute(
        """INSERT INTO derived_counters VALUES (?, ?)
           ON CONFLICT (name) DO UPDATE SET value = derived_counters.value + excluded.value""",
        [name, by],
    )


def link_inputs_version(con: duckdb.DuckDBPyConnection, entity: str) -> int:
    """How many times a row the entity's link pass reads has changed what it sees (a count that
    only grows): equal before and after means nothing that pass reads has changed."""
    schema.ensure(con)
    row = con.execute(
        "SELECT value FROM derived_counters WHERE name = ?", [f"{LINK_INPUTS}:{entity}"]
    ).fetchone()
    return int(row[0]) if row else 0
