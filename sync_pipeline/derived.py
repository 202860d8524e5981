"""Derived columns on the raw snapshot tables, computed once when a row changes.

Link matching and the creation search compare match keys of millions of rows; extracting them
from the JSON `data` of every row on each pass is what made that slow, so they are kept next to it:

- `_key_<name> VARCHAR` (every table a match key reads, e.g. `crm_sales_ledgers._key_account_code`):
  the key value as it is compared (`links.key_expr`), NULL when empty. The creation search and link
  matching join on these instead of extracting keys from every row.
- `_link_sig UBIGINT` (every table link matching reads): a hash of what a link pass looks at
  in the row (active, parent id, match keys). `refresh` compares it before and after, and counts
  the rows where it moved in `derived_counters` ('link_inputs'): a pass with nothing new there
  (a phone edit, a renamed contact) cannot link or unlink anything, so `links.update_links`
  skips its whole-table work (4 s a pass at 1M / 3M records).
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

from sync_pipeline import baseline
from sync_pipeline.mapping.projection import ident
from sync_pipeline.mapping.schema import EntityMapping

MARK = "_derived_mod"
STATE_DDL = """CREATE TABLE IF NOT EXISTS derived_state (
    table_name VARCHAR PRIMARY KEY, fingerprint VARCHAR, refreshed_at TIMESTAMP
)"""
COUNTERS_DDL = """CREATE TABLE IF NOT EXISTS derived_counters (
    name VARCHAR PRIMARY KEY, value BIGINT NOT NULL
)"""
LINK_SIG = "_link_sig"
LINK_INPUTS = "link_inputs"
# NULL `modified` is stored as -infinity in the mark so that "computed" and "stale" stay distinct.
_MOD = "coalesce(modified, '-infinity'::TIMESTAMP)"


def key_column(key_name: str) -> str:
    return f"_key_{key_name}"


def columns(mappings: Mapping[str, EntityMapping]) -> dict[str, dict[str, tuple[str, str]]]:
    """table -> {column: (type, SQL expression over the row's `data`)} for every raw table the
    mappings read a match key from, and every mapping's CRM and Unleashed table (possibly with no
    columns: their rows are still tracked for the planner)."""
    from sync_pipeline.links import key_expr  # links imports this module

    out: dict[str, dict[str, tuple[str, str]]] = {}
    has_parent: dict[str, bool] = {}

    def add(table: str, col: str, typ: str, expr: str) -> None:
        cols = out.setdefault(table, {})
        if col in cols and cols[col] != (typ, expr):
            raise ValueError(f"derived column {table}.{col} is defined two different ways")
        cols[col] = (typ, expr)

    for mapping in mappings.values():
        out.setdefault(mapping.crm.table, {})
        out.setdefault(mapping.erp.table, {})
        has_parent[mapping.crm.table] = mapping.crm.parent_key is not None
        has_parent[mapping.erp.table] = mapping.erp.parent_resource is not None
        for key in mapping.match.keys:
            if key.crm_table:
                has_parent[key.crm_table] = True  # e.g. a sales ledger's company
            crm_table = key.crm_table or mapping.crm.table
            add(crm_table, key_column(key.name), "VARCHAR", key_expr(key, "crm"))
            add(mapping.erp.table, key_column(key.name), "VARCHAR", key_expr(key, "erp"))
    # Every table above is read by link matching: what it reads there, as one hash.
    for table, cols in out.items():
        keys = [expr for _, (_, expr) in sorted(cols.items())]
        parent = "parent_id" if has_parent.get(table) else "NULL"
        cols[LINK_SIG] = ("UBIGINT", f"hash(active, {parent}, {', '.join(keys) or 'NULL'})")
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
    baseline.ensure_schema(con)
    only = None if tables is None else set(tables)
    con.execute(STATE_DDL)
    con.execute(COUNTERS_DDL)
    existing = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE NOT temporary"
        ).fetchall()
    }
    known = dict(con.execute("SELECT table_name, fingerprint FROM derived_state").fetchall())
    for table, cols in wanted.items():
        if (only is not None and table not in only) or table not in existing:
            continue
        t = ident(table)
        fp = _fingerprint(cols)
        if known.get(table) != fp:  # new table or changed mapping: (re)compute every row
            for col, (typ, _) in {**cols, MARK: ("TIMESTAMP", "")}.items():
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
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE _derived_values AS
                WITH s AS (SELECT rowid AS row_id FROM {t} WHERE {stale})
                SELECT rowid AS row_id, id, {exprs}{_MOD} AS mark,
                       {LINK_SIG} AS _old_link_sig FROM {t}
                WHERE rowid IN (SELECT row_id FROM s)"""
        )
        (moved,) = con.execute(
            f"SELECT count(*) FROM _derived_values WHERE {LINK_SIG} IS DISTINCT FROM _old_link_sig"
        ).fetchone()
        if moved:
            stats.link_inputs += int(moved)
            _bump(con, LINK_INPUTS, int(moved))
        con.execute(
            f"""UPDATE {t} SET {sets}{MARK} = v.mark
                FROM _derived_values v WHERE {t}.rowid = v.row_id"""
        )
        for entity, side in owners.get(table, []):
            baseline.mark_pending(con, entity, side, "SELECT id FROM _derived_values")
        con.execute("DROP TABLE _derived_values")
    stats.seconds = time.perf_counter() - t0
    return stats


def _bump(con: duckdb.DuckDBPyConnection, name: str, by: int) -> None:
    con.execute(
        """INSERT INTO derived_counters VALUES (?, ?)
           ON CONFLICT (name) DO UPDATE SET value = derived_counters.value + excluded.value""",
        [name, by],
    )


def link_inputs_version(con: duckdb.DuckDBPyConnection) -> int:
    """How many times a row link matching reads has changed what matching sees (a count that
    only grows): equal before and after means nothing a link pass reads has changed."""
    con.execute(COUNTERS_DDL)
    row = con.execute("SELECT value FROM derived_counters WHERE name = ?", [LINK_INPUTS]).fetchone()
    return int(row[0]) if row else 0
