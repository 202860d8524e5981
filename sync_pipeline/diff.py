"""The three-way diff: current CRM value, current Unleashed value and the last agreed value
(baseline), per linked record and mapped field, turned into plan rows.

How it stays fast at millions of records: a pass never compares whole tables. Every write that
can make a linked pair disagree with its baseline (an extract's upsert, a new or removed link, a
baseline written by apply) puts the record on `sync_pending` (baseline.py), and the planner reads
only those records: their ids resolved through the links, their two snapshot rows and their
one-row baseline, unpivoted to (record, field) rows in DuckDB, keeping the fields whose raw values
moved. decide.py decides those rows in SQL (normal forms per row, the Python normalisers and
validators only for what SQL cannot settle, once per distinct value). Records left not in
agreement stay on the pending set for the next pass.

The plan is returned as a DataFrame with exactly `PLAN_COLUMNS` and written to `sync_plan`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline import baseline, decide, derived, duck, links, schema, store
from sync_pipeline.clients.crm import crm_key
from sync_pipeline.core import check_policy
from sync_pipeline.decide import quote
from sync_pipeline.mapping.projection import ident, json_path, key_expr, values_list_expr
from sync_pipeline.mapping.schema import EntityMapping, Reference
from sync_pipeline.mapping.validate import ValidationContext, check_value
from sync_pipeline.stages import Stages

PLAN_COLUMNS = [
    "entity", "op", "crm_id", "erp_id", "crm_parent_id", "erp_parent_id", "field",
    "crm_value", "erp_value", "baseline_value", "new_value", "conflict", "policy", "reason",
    "crm_modified", "erp_modified", "payload",
]  # fmt: skip

# The plan is rewritten by every pass and read once or twice: compressing its text columns
# (DuckDB's dictionary/FSST analysis) cost more than half of writing it (1.1 s vs 0.4 s for 465k
# rows at 1M/3M records), so they are stored uncompressed.
_U = "USING COMPRESSION uncompressed"
PLAN_DDL = f"""CREATE OR REPLACE TABLE sync_plan (
    entity VARCHAR {_U}, op VARCHAR {_U}, crm_id VARCHAR {_U}, erp_id VARCHAR {_U},
    crm_parent_id VARCHAR {_U}, erp_parent_id VARCHAR {_U}, field VARCHAR {_U},
    crm_value VARCHAR {_U}, erp_value VARCHAR {_U}, baseline_value VARCHAR {_U},
    new_value VARCHAR {_U}, conflict BOOLEAN, policy VARCHAR {_U}, reason VARCHAR {_U},
    crm_modified TIMESTAMP, erp_modified TIMESTAMP, payload JSON {_U}
)"""

RECORD_NAME = {
    ("company", "crm"): "CRM company",
    ("company", "erp"): "Unleashed customer",
    ("contact", "crm"): "CRM contact",
    ("contact", "erp"): "Unleashed contact",
}


def empty_plan() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in PLAN_COLUMNS})


# Context shared by one planning pass ------------------------------------------------------


@dataclass
class _Context:
    con: duckdb.DuckDBPyConnection
    region: str
    initial_policy: str
    overrides: Mapping[str, str]
    account_manager_sync: bool
    _lookups: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    _validation: ValidationContext | None = None

    def lookup(self, ref: Reference) -> dict[str, Any]:
        """Active rows of a reference table keyed by the trimmed, case-folded match value."""
        key = (ref.table, ref.match)
        if key not in self._lookups:
            value = "data" if ref.value is None else f"json_extract(data, {json_path(ref.value)})"
            rows = self._con_rows(
                f"SELECT data->>{json_path(ref.match)}, {value} FROM {ident(ref.table)} "
                "WHERE active"
            )
            table: dict[str, Any] = {}
            for match, val in rows:
                if match and match.strip():
                    table.setdefault(match.strip().casefold(), json.loads(val) if val else None)
            self._lookups[key] = table
        return self._lookups[key]

    def _con_rows(self, sql: str) -> list[tuple]:
        try:
            return self.con.execute(sql).fetchall()
        except duckdb.CatalogException:
            return []  # the reference table has not been extracted yet

    def validation(self, mapping: EntityMapping) -> ValidationContext:
        if self._validation is None:
            emails: set[str] = set()
            for spec in mapping.fields.values():
                if "salesperson_exists" in spec.checks_to("erp") and spec.erp_write is not None:
                    emails |= set(self.lookup(spec.erp_write))
            if not emails:
                rows = self._con_rows(
                    "SELECT data->>'$.Email' FROM unleashed_salespersons WHERE active"
                )
                emails = {r[0].strip().casefold() for r in rows if r[0]}
            self._validation = ValidationContext(salesperson_emails=frozenset(emails))
        return self._validation

    def policy(self, mapping: EntityMapping, name: str) -> str:
        return (
            self.overrides.get(f"{mapping.entity}.{name}")
            or self.overrides.get(mapping.entity)
            or mapping.policy(name)
        )


# SQL passes --------------------------------------------------------------------------------


def _field_order(mapping: EntityMapping) -> str:
    return ", ".join(f"({i + 1}, '{f}')" for i, f in enumerate(mapping.fields))


def _label_expr(mapping: EntityMapping, list_col: str) -> str:
    positions = [i + 1 for i, s in enumerate(mapping.fields.values()) if s.normaliser == "name"]
    if not positions:
        return "''"
    parts = ", ".join(f"nullif({list_col}[{p}], '')" for p in positions)
    return f"concat_ws(' ', {parts})"


# Reading a few percent of a big table's rows costs DuckDB about a full read of the columns
# asked for, and a join builds its hash table on whichever side it estimates smaller. So each
# table is read in two steps: its narrow key columns, filtered by a semi-join on the (small) set
# of ids of this pass, which also gives each row's rowid; then the wide columns (JSON) of exactly
# those rows by rowid. At 1M/3M records that is 3-4x cheaper than one join reading them all.


def _scan(st: Stages, mapping: EntityMapping) -> None:
    """`_scan`: the records on this pass (`baseline.sync_pending`, CRM ids resolved through the
    links): each active Unleashed record with its link and its CRM record, keeping linked pairs
    with both records active (the candidates) and unlinked records (the creation candidates,
    crm_id NULL), with the rowids of their snapshot rows. `_erp_rows`: the Unleashed JSON of
    the creation candidates."""
    entity = mapping.entity
    link_table = links.LINK_TABLES[entity]
    erp_parent = "parent_id" if mapping.erp.parent_resource else "CAST(NULL AS VARCHAR)"
    crm_parent = "parent_id" if mapping.crm.parent_key else "CAST(NULL AS VARCHAR)"
    st.table(
        f"{entity}.scan_ids",
        "_ids",
        f"""SELECT id AS erp_id FROM sync_pending WHERE entity = '{entity}' AND side = 'erp'
            UNION
            SELECT l.erp_id FROM {link_table} l
            WHERE l.crm_id IN (SELECT id FROM sync_pending
                               WHERE entity = '{entity}' AND side = 'crm')""",
    )
    st.table(
        f"{entity}.scan",
        "_scan",
        f"""WITH e AS (
            SELECT rowid AS erp_row, id, {erp_parent} AS parent_id, modified
            FROM {ident(mapping.erp.table)}
            WHERE active AND id IN (SELECT erp_id FROM _ids)),
        l AS (SELECT crm_id, erp_id FROM {link_table}
              WHERE erp_id IN (SELECT erp_id FROM _ids)),
        c AS (
            SELECT rowid AS crm_row, id, {crm_parent} AS parent_id, modified, active
            FROM {ident(mapping.crm.table)} WHERE id IN (SELECT crm_id FROM l))
        SELECT l.crm_id, e.id AS erp_id, c.parent_id AS crm_parent_id,
               e.parent_id AS erp_parent_id, c.modified AS crm_modified,
               e.modified AS erp_modified, c.crm_row, e.erp_row
        FROM e LEFT JOIN l ON l.erp_id = e.id LEFT JOIN c ON c.id = l.crm_id
        WHERE l.erp_id IS NULL OR c.active""",
        reads=["_ids"],
    )
    st.table(
        f"{entity}.scan",
        "_erp_rows",
        f"""SELECT id, data FROM {ident(mapping.erp.table)}
            WHERE rowid IN (SELECT erp_row FROM _scan WHERE crm_id IS NULL)""",
        reads=["_scan"],
    )
    st.drop("_ids")


def _freeze(st: Stages, mapping: EntityMapping) -> None:
    """Move out of `_scan` into `_frozen` the records with a side set aside as malformed (or,
    for a contact, whose Unleashed customer is: its contacts were not read either), with why.

    Their snapshot holds the last good version, which may be older than what the sync itself
    wrote since; planned from it, the stale value would travel back. Nothing of such a record is
    planned in either direction (no update, no creation) until it reads clean; it stays on the
    pending set, and a rejection says so."""
    crm_bad = store.set_aside_sql("CRM", f"GET /{mapping.crm.entity_set}")
    erp_bad = store.set_aside_sql("Unleashed")
    parents_bad = store.set_aside_sql("Unleashed", children=True)
    by_parent = (
        "UNION ALL SELECT s.erp_id, 'its Unleashed customer ' || b.id || ' could not be read "
        "whole (' || b.reason || ')' FROM _scan s JOIN pb b ON b.id = s.erp_parent_id"
        if mapping.erp.parent_resource
        else ""
    )
    stage = f"{mapping.entity}.freeze"
    st.table(
        stage,
        "_frozen",
        f"""WITH cb AS ({crm_bad}), eb AS ({erp_bad}), pb AS ({parents_bad}),
        w AS (
            SELECT s.erp_id, 'the CRM record is set aside as malformed (' || b.reason || ')'
                   AS why
            FROM _scan s JOIN cb b ON b.id = s.crm_id
            UNION ALL
            SELECT s.erp_id, 'the Unleashed record is set aside as malformed (' || b.reason
                   || ')'
            FROM _scan s JOIN eb b ON b.id = s.erp_id
            {by_parent})
        SELECT s.crm_id, s.erp_id, s.crm_parent_id, s.erp_parent_id, s.crm_modified,
               s.erp_modified, string_agg(w.why, '; ' ORDER BY w.why) AS why
        FROM _scan s JOIN w USING (erp_id)
        GROUP BY ALL""",
        reads=["_scan"],
    )
    st.run(stage, "DELETE FROM _scan WHERE erp_id IN (SELECT erp_id FROM _frozen)",
           reads=["_scan", "_frozen"])  # fmt: skip


def _frozen_rows(mapping: EntityMapping) -> str:
    """The plan's rejections for `_frozen`: one per record, with no field."""
    what = mapping.entity
    return f"""SELECT '{what}' AS entity, 'reject' AS op, crm_id, erp_id, crm_parent_id,
            erp_parent_id, NULL AS field, NULL AS crm_value, NULL AS erp_value,
            NULL AS baseline_value, NULL AS new_value, false AS conflict, NULL AS policy,
            '{what} (' || CASE WHEN crm_id IS NULL THEN '' ELSE 'CRM ' || crm_id || ' / ' END
            || 'Unleashed ' || erp_id || ') is frozen: ' || why
            || '; nothing of it is synced in either direction'
            || CASE WHEN crm_id IS NULL THEN ' (nor created in the CRM)' ELSE '' END
            || ' until it reads clean' AS reason,
            crm_modified, erp_modified, CAST(NULL AS JSON) AS payload
        FROM _frozen"""


def _candidate_fields(st: Stages, mapping: EntityMapping) -> None:
    """`_cand_fields` (a view): (record, field) rows of the candidate records (`_cand`) whose
    raw values moved from the baseline, or that have no baseline yet, with when each side's
    value of the field changed (`derived.field_at_column`, as `crm_modified` / `erp_modified`: a
    `newest` conflict compares those, never a record time the sync's own writes moved), the
    record's label
    (how a rejection names it) and the rowid of its baseline row (the settle step merges into
    it without searching `sync_baseline` again).

    It is one query from the snapshot tables to the unpivoted rows, read once, by the
    statement that normalises them (decide.py). (DuckDB 1.x scanned a temporary table made inside
    the pass's transaction on one thread, so a table in between serialised the normalisation: 1.6
    s of 2 cores' work at 1M/3M records. DuckDB 2 scans it on both.)"""
    names = list(mapping.fields)
    crm_paths = [s.crm for s in mapping.fields.values()]
    erp_paths = [s.erp for s in mapping.fields.values()]
    base_paths = ", ".join(json_path(n) for n in names)
    ats = [ident(derived.field_at_column(n)) for n in names]
    at = ", ".join(ats)
    w = f"""WITH c AS (SELECT rowid AS r, data, {at} FROM {ident(mapping.crm.table)}
                       WHERE rowid IN (SELECT crm_row FROM _cand)),
                 e AS (SELECT rowid AS r, data, {at} FROM {ident(mapping.erp.table)}
                       WHERE rowid IN (SELECT erp_row FROM _cand)),
                 r AS (SELECT rowid AS base_row FROM sync_baseline
                       WHERE entity = '{mapping.entity}'
                         AND erp_id IN (SELECT erp_id FROM _cand)),
                 b AS (SELECT rowid AS base_row, erp_id, crm_values, erp_values
                       FROM sync_baseline WHERE rowid IN (SELECT base_row FROM r))
            SELECT k.*, {values_list_expr(crm_paths, "c")} AS cv,
                   {values_list_expr(erp_paths, "e")} AS ev, b.base_row,
                   [{", ".join("c." + a for a in ats)}] AS cat,
                   [{", ".join("e." + a for a in ats)}] AS eat,
                   json_extract_string(b.crm_values, [{base_paths}]) AS bc,
                   json_extract_string(b.erp_values, [{base_paths}]) AS be
            FROM _cand k JOIN c ON c.r = k.crm_row
                         JOIN e ON e.r = k.erp_row
                         LEFT JOIN b ON b.erp_id = k.erp_id"""
    # Only the positions whose raw values moved (or that have no baseline) are unpivoted: most
    # candidate records changed in one field of several.
    moved = (
        f"list_filter(range(1, {len(names) + 1}), "
        "lambda i: bc[i] IS NULL OR cv[i] <> bc[i] OR ev[i] <> be[i])"
    )
    label = (
        f"coalesce(nullif({_label_expr(mapping, 'cv')}, ''), "
        f"nullif({_label_expr(mapping, 'ev')}, ''))"
    )
    st.view(
        f"{mapping.entity}.candidate_fields",
        "_cand_fields",
        f"""WITH f AS (SELECT * FROM (VALUES {_field_order(mapping)}) f(pos, field)),
        w AS ({w}),
        x AS (SELECT crm_id, erp_id, crm_parent_id, erp_parent_id, crm_modified, erp_modified,
                     cv, ev, bc, be, cat, eat, base_row, {label} AS rec_label,
                     unnest({moved}) AS pos
              FROM w)
        SELECT x.crm_id, x.erp_id, x.crm_parent_id, x.erp_parent_id,
               coalesce(x.cat[x.pos], x.crm_modified) AS crm_modified,
               coalesce(x.eat[x.pos], x.erp_modified) AS erp_modified, f.field,
               x.cv[x.pos] AS crm_value, x.ev[x.pos] AS erp_value,
               x.bc[x.pos] AS base_crm, x.be[x.pos] AS base_erp, x.base_row, x.rec_label
        FROM x JOIN f ON f.pos = x.pos""",
        reads=["_cand"],
    )


def _frame(con: duckdb.DuckDBPyConnection, sql: str) -> pd.DataFrame:
    """A query result as a DataFrame through Arrow: 4x faster than `.df()` for string columns
    (no Python object per value); the Arrow buffers are handed over, not copied."""
    return duck.arrow(con, sql).to_pandas(self_destruct=True, split_blocks=True)


def _write_settles(st: Stages, mapping: EntityMapping) -> None:
    """Baseline values for the fields found to agree (decide.AGREE over `_cf`), merged into
    the candidates' baseline rows read earlier in this pass (by rowid, so `sync_baseline` is not
    searched again)."""
    stage = f"{mapping.entity}.settle"
    agreed = f"SELECT erp_id, field, crm_value, erp_value FROM _cf WHERE {decide.AGREE}"
    ((n,),) = st.run(stage, f"SELECT count(*) FROM ({agreed})", reads=["_cf"])
    if n:
        with st.timed(stage):
            baseline.merge_into_baseline(
                st.con,
                mapping.entity,
                agreed,
                existing_sql="""SELECT erp_id, rowid AS base_row, crm_values, erp_values
                            FROM sync_baseline WHERE rowid IN (
                                SELECT base_row FROM _cf WHERE base_row IS NOT NULL
                                  AND erp_id IN (SELECT erp_id FROM _merge_new))""",
            )


def _keep_pending(st: Stages, mapping: EntityMapping, looked: bool) -> None:
    """The pass consumed the entity's pending set; put back what is still not in agreement
    (a field left different: planned, rejected or held back by a setting) and the unlinked
    Unleashed records (creation candidates, looked at until they are linked)."""
    entity = mapping.entity
    stage = f"{entity}.pending"
    st.run(stage, "DELETE FROM sync_pending WHERE entity = ?", [entity])
    unsettled = "UNION SELECT erp_id FROM _frozen"
    if looked:
        unsettled += f" UNION SELECT erp_id FROM _cf WHERE NOT {decide.AGREE}"
    with st.timed(stage):
        baseline.mark_pending(
            st.con, entity, "erp", f"SELECT erp_id FROM _scan WHERE crm_id IS NULL {unsettled}"
        )


# Refusals ----------------------------------------------------------------------------------


def _problem(mapping: EntityMapping, ctx: _Context) -> Callable[[str, str, str], str | None]:
    """problem(field, op, value): why `value` must not be written by `op` (update_erp: to
    Unleashed, update_crm: to the CRM), or None. The safety check, the field's checks for that
    direction (`FieldSpec.checks_to`), then its reference: the record the value names must
    exist on the target side."""

    def problem(name: str, op: str, value: str) -> str | None:
        spec = mapping.fields[name]
        target = "erp" if op == "update_erp" else "crm"
        why = check_value(
            value,
            spec.checks_to(target),
            multiline=spec.multiline,
            context=lambda: ctx.validation(mapping),
        )
        ref = spec.erp_write if op == "update_erp" else spec.crm_write
        if (
            why is None
            and ref is not None
            and value.strip()
            and value.strip().casefold() not in ctx.lookup(ref)
        ):
            why = f"no active record in {ref.table} has {ref.match} {quote(value.strip())}"
            if ref.table == "crm_users":
                why = "no active CRM user has this email"
            elif ref.table == "unleashed_salespersons":
                why = "matches no active Unleashed salesperson (by email)"
        return why

    return problem


# Creations ----------------------------------------------------------------------------------


def _creations(st: Stages, mapping: EntityMapping, ctx: _Context) -> pd.DataFrame:
    """create_crm_company / create_crm_contact rows for active, unlinked Unleashed records that
    no CRM record matches by any key (a match that could not be linked is reported instead of
    creating a duplicate)."""
    entity = mapping.entity
    names = list(mapping.fields)
    erp_paths = [mapping.fields[n].erp for n in names]
    parent_join, parent_ok = "", ""
    parent_col = "CAST(NULL AS VARCHAR)"
    if mapping.match.within_linked_parent:
        # Under a linked company, or under a customer this same plan creates in the CRM (its
        # contacts then arrive in the same cycle: apply fills in the new company's id).
        parent_join = "LEFT JOIN company_links pl ON pl.erp_id = n.erp_parent_id"
        parent_col = "pl.crm_id"
        parent_ok = """AND (pl.crm_id IS NOT NULL OR n.erp_parent_id IN (
                           SELECT erp_id FROM sync_plan WHERE op = 'create_crm_company'))"""
    key_cols = "".join(
        f", {key_expr(k, 'erp')} AS {ident('k_' + k.name)}" for k in mapping.match.keys
    )
    stage = f"{entity}.creations"
    con = st.con
    # The few unlinked records found by the scan; only their JSON is read.
    st.table(
        stage,
        "_new",
        f"""SELECT n.erp_id, n.erp_parent_id, {parent_col} AS crm_parent_id, n.erp_modified,
                   {values_list_expr(erp_paths, "e")} AS ev{key_cols}
            FROM _scan n {parent_join} JOIN _erp_rows e ON e.id = n.erp_id
            WHERE n.crm_id IS NULL {parent_ok}""",
        reads=["_scan", "_erp_rows"],
    )
    ((n_new,),) = st.run(stage, "SELECT count(*) FROM _new", reads=["_new"])
    if n_new == 0:
        return empty_plan()
    with st.timed(stage):
        return _creation_rows(con, mapping, ctx)


def _creation_rows(
    con: duckdb.DuckDBPyConnection, mapping: EntityMapping, ctx: _Context
) -> pd.DataFrame:
    """The plan rows for the records in `_new` (see `_creations`)."""
    entity = mapping.entity
    names = list(mapping.fields)
    # Which CRM records (any status) share a key with a new record?
    blocked_parts = []
    for key in mapping.match.keys:
        crm_keys = links.crm_keys_sql(mapping, key, active_only=False)
        if mapping.match.within_linked_parent:
            crm_keys = (
                f"SELECT * FROM ({crm_keys}) WHERE crm_parent_id IN "
                "(SELECT crm_parent_id FROM _new)"
            )
            cond = "ck.crm_parent_id = n.crm_parent_id"
        else:
            cond = "TRUE"
        blocked_parts.append(
            f"""SELECT n.erp_id, ck.crm_id, '{key.name}' AS method, ck.crm_active
                FROM _new n JOIN ({crm_keys}) ck
                  ON ck.key_value = n.{ident("k_" + key.name)} AND {cond}"""
        )
    blocked = con.execute(
        f"""SELECT b.erp_id, list(DISTINCT b.crm_id ORDER BY b.crm_id) AS crm_ids,
                   list(DISTINCT b.method) AS methods,
                   bool_or(coalesce(b.crm_active, false)) AS active
            FROM ({" UNION ALL ".join(blocked_parts)}) b
            GROUP BY b.erp_id"""
    ).df()
    new = con.execute(
        "SELECT erp_id, erp_parent_id, crm_parent_id, erp_modified, ev FROM _new ORDER BY erp_id"
    ).df()
    blocked_by = {r.erp_id: r for r in blocked.itertuples(index=False)}
    op = f"create_crm_{entity}"
    rows, pending = [], []
    name_pos = [i for i, n in enumerate(names) if mapping.fields[n].normaliser == "name"]
    for rec in new.itertuples(index=False):
        values = list(rec.ev)
        label = " ".join(values[i] for i in name_pos if values[i])
        what = RECORD_NAME[(entity, "erp")]
        base = {
            "entity": entity,
            "crm_id": None,
            "erp_id": rec.erp_id,
            "crm_parent_id": rec.crm_parent_id,
            "erp_parent_id": rec.erp_parent_id,
            "field": None,
            "conflict": False,
            "erp_modified": rec.erp_modified,
        }
        block = blocked_by.get(rec.erp_id)
        if block is not None:
            if block.active:
                rows.append(
                    {
                        **base,
                        "op": "reject",
                        "reason": (
                            f"{what} {quote(label)} (Unleashed {rec.erp_id}) is not created in the "
                            f"CRM: CRM {entity} {links.some_ids(block.crm_ids)} matches it by "
                            f"{', '.join(sorted(block.methods))} but could not be linked "
                            "(ambiguous or already linked to another record); link them by hand"
                        ),
                    }
                )
            continue  # matched only by inactive CRM records: they were unlinked on purpose
        payload: dict[str, Any] = {}
        problems = []
        for i, n in enumerate(names):
            spec = mapping.fields[n]
            if mapping.direction(n) == "crm_to_erp":
                continue
            if spec.option == "account_manager_sync" and not ctx.account_manager_sync:
                continue
            value = values[i]
            if spec.crm_write is not None:
                found = spec.crm_write.blank
                if value.strip():
                    found = ctx.lookup(spec.crm_write).get(value.strip().casefold(), found)
                if found is not None:
                    payload[spec.crm_write.field] = found
                continue
            if "." in spec.crm:
                continue  # a navigation path cannot be written directly
            why = check_value(value, spec.checks_to("crm"), multiline=spec.multiline)
            if why:
                problems.append(f"{n.replace('_', ' ')} {quote(value)} {why}")
            payload[spec.crm] = value
            pending.append({"entity": entity, "erp_id": rec.erp_id, "field": n, "value": value})
        if mapping.crm.parent_key and not pd.isna(rec.crm_parent_id):
            payload[mapping.crm.parent_key] = crm_key(rec.crm_parent_id)
        payload.update(mapping.crm.create.values)
        if problems:
            rows.append(
                {
                    **base,
                    "op": "reject",
                    "reason": f"{what} {quote(label)} (Unleashed {rec.erp_id}) is not created "
                    f"in the CRM: {'; '.join(problems)}",
                }
            )
            continue
        rows.append(
            {
                **base,
                "op": op,
                "payload": json.dumps(payload, ensure_ascii=False, sort_keys=True),
                "reason": f"{what} {quote(label)} is new in Unleashed"
                + (
                    ", under a customer created in the CRM in this same cycle"
                    if mapping.match.within_linked_parent and pd.isna(rec.crm_parent_id)
                    else ""
                ),
            }
        )
    con.execute("DELETE FROM sync_creation_baseline WHERE entity = ?", [entity])
    if pending:
        frame = pd.DataFrame(pending)
        created = {r["erp_id"] for r in rows if r["op"] == op}
        frame = frame[frame["erp_id"].isin(created)]
        duck.register(con, "_pending", frame)
        con.execute(
            "INSERT INTO sync_creation_baseline SELECT entity, erp_id, field, value FROM _pending"
        )
        con.unregister("_pending")
    return pd.DataFrame(rows, columns=PLAN_COLUMNS) if rows else empty_plan()


# Entry points ------------------------------------------------------------------------------


def _plan_entity(st: Stages, mapping: EntityMapping, ctx: _Context) -> None:
    """Plan rows for the linked records of one entity on this pass, inserted into `sync_plan`
    (and the creation candidates left in `_scan` for `_creations`)."""
    entity = mapping.entity
    _scan(st, mapping)
    _freeze(st, mapping)
    cols = ", ".join(PLAN_COLUMNS)
    st.run(
        f"{entity}.frozen_rejections",
        f"INSERT INTO sync_plan ({cols}) SELECT {cols} FROM ({_frozen_rows(mapping)})",
        reads=["_frozen"],
    )
    with st.scope():  # the candidates and their decisions, dropped once planned
        _plan_candidates(st, mapping, ctx)


def _plan_candidates(st: Stages, mapping: EntityMapping, ctx: _Context) -> None:
    entity = mapping.entity
    cols = ", ".join(PLAN_COLUMNS)
    st.table(f"{entity}.candidates", "_cand", "SELECT * FROM _scan WHERE crm_id IS NOT NULL",
             reads=["_scan"])  # fmt: skip
    ((n_cand,),) = st.run(f"{entity}.candidates", "SELECT count(*) FROM _cand", reads=["_cand"])
    if n_cand == 0:
        _keep_pending(st, mapping, looked=False)
        return
    _candidate_fields(st, mapping)
    decide.decide(
        st,
        mapping,
        region=ctx.region,
        initial_policy=ctx.initial_policy,
        policy_of=lambda name: ctx.policy(mapping, name),
        active=mapping.active_fields(account_manager_sync=ctx.account_manager_sync),
        problem=_problem(mapping, ctx),
        labels_sql="SELECT erp_id, any_value(rec_label) AS label FROM _cf GROUP BY erp_id",
    )
    st.run(f"{entity}.plan_insert", f"INSERT INTO sync_plan ({cols}) SELECT {cols} FROM _planned",
           reads=["_planned"])  # fmt: skip
    _write_settles(st, mapping)
    _keep_pending(st, mapping, looked=True)


def _ordered(mappings: Mapping[str, EntityMapping]) -> list[EntityMapping]:
    order = {"company": 0, "contact": 1}
    return sorted(mappings.values(), key=lambda m: order.get(m.entity, 9))


def _ensure(con: duckdb.DuckDBPyConnection, mappings: Mapping[str, EntityMapping]) -> None:
    schema.ensure(con)
    derived.refresh(con, mappings)  # usually a no-op: the extracts refresh what they write
    started = {r[0] for r in con.execute("SELECT entity FROM sync_pending_state").fetchall()}
    for mapping in mappings.values():
        if mapping.entity not in started:
            _start_pending(con, mapping)


def _start_pending(con: duckdb.DuckDBPyConnection, mapping: EntityMapping) -> None:
    """An entity's first pass on this database looks at every active Unleashed record (and so
    at every link); after that, only at what was put on the pending set."""
    (exists,) = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND NOT temporary",
        [mapping.erp.table],
    ).fetchone()
    if exists:
        baseline.mark_pending(
            con, mapping.entity, "erp", f"SELECT id FROM {ident(mapping.erp.table)} WHERE active"
        )
    con.execute("INSERT INTO sync_pending_state VALUES (?)", [mapping.entity])


def plan_changes(
    con: duckdb.DuckDBPyConnection,
    mappings: Mapping[str, EntityMapping],
    *,
    initial_policy: str = "erp",
    policy_overrides: Mapping[str, str] | None = None,
    account_manager_sync: bool = True,
    default_region: str = "GB",
    timings: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Plan every operation for the linked records and the Unleashed-side new records.

    Also settles the baseline of fields whose two sides already agree. Returns the plan
    (columns `PLAN_COLUMNS`) and replaces the DuckDB table `sync_plan` with it. `timings`, when
    given, receives the seconds each named stage took (`stages.Stages`)."""
    check_policy(initial_policy, "initial_policy")
    for key, value in (policy_overrides or {}).items():
        check_policy(value, f"policy override {key}")
    _ensure(con, mappings)
    ctx = _Context(
        con, default_region, initial_policy, dict(policy_overrides or {}), account_manager_sync
    )
    st = Stages(con)
    # One transaction for the pass: the settle step deletes by rowids it read earlier.
    with store.transaction(con):
        try:
            st.run("plan.reset", PLAN_DDL)
            for mapping in _ordered(mappings):
                _plan_entity(st, mapping, ctx)
                creations = _creations(st, mapping, ctx)
                with st.timed(f"{mapping.entity}.creations"):
                    write_plan(con, creations, replace=False)
                st.close()
        finally:
            st.close()
    with st.timed("plan.read_back"):
        plan = read_plan(con)
    if timings is not None:
        timings.update(st.timings())
    return plan


def read_plan(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """`sync_plan` as a DataFrame with exactly `PLAN_COLUMNS`, in a stable order."""
    plan = _frame(
        con,
        f"""SELECT {", ".join(PLAN_COLUMNS)} FROM sync_plan
            ORDER BY entity, op, erp_parent_id NULLS FIRST, erp_id NULLS FIRST,
                     field NULLS FIRST""",
    )
    if plan.empty:
        return empty_plan()
    plan["conflict"] = plan["conflict"].fillna(False).astype(bool)
    for col in ("crm_modified", "erp_modified"):
        plan[col] = pd.to_datetime(plan[col])
    return plan


def write_plan(con: duckdb.DuckDBPyConnection, plan: pd.DataFrame, *, replace: bool = True) -> None:
    """Write plan rows to `sync_plan` (replacing it unless `replace=False`)."""
    if replace:
        con.execute(PLAN_DDL)
    if plan.empty:
        return
    duck.register(con, "_plan_rows", store.for_register(plan[PLAN_COLUMNS]))
    try:
        cols = ", ".join(PLAN_COLUMNS)
        con.execute(f"INSERT INTO sync_plan ({cols}) SELECT {cols} FROM _plan_rows")
    finally:
        con.unregister("_plan_rows")
