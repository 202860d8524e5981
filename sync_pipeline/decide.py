"""The per-field decisions of the three-way diff, made in DuckDB over the candidate rows.

Input: `_cand_fields` (diff.py), one row per candidate (record, field) with the two current raw
values and the two baseline raw values. Output:

- `_planned`: plan rows (update_erp / update_crm / reject) in `diff.PLAN_COLUMNS` order;
- `_agreed`: (erp_id, field, crm_value, erp_value) of fields whose sides agree after
  normalisation, to be written to the baseline.

Rows in neither stay unsettled (a one-way field's ignored edit, a field held back by a setting)
and keep their record on the pending set.

Equality after normalisation is decided on each distinct value once. The normalisers in
`mapping/normalise.py` are the definition; for printable-ASCII values they have exact SQL
equivalents here (trim and collapse spaces, lower-case, the website rule, the UK phone fast
path), which `tests/test_mapping.py` checks against the Python functions on generated values.
Every other value (non-ASCII text, a phone number that needs `phonenumbers`) is normalised by the
Python function. Which side wins, the conflict policy, the reasons and the rejections are SQL
over all rows, so a plan of hundreds of thousands of rows costs DuckDB time, not Python loops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline.mapping.normalise import normalise_series
from sync_pipeline.mapping.schema import EntityMapping

# What a reason shows for a value: quoted, with quotes, backslashes and line breaks escaped.
# `quote` below is the same rule in Python, for the reasons written there.
Q_MACRO = r"""CREATE OR REPLACE TEMP MACRO _q(x) AS
    '''' || replace(replace(replace(replace(replace(coalesce(x, ''), '\', '\\'), '''', '\'''),
        chr(10), '\n'), chr(13), '\r'), chr(9), '\t') || ''''"""


def quote(value: Any) -> str:
    """A value as a person reads it in a reason: in single quotes, '' for empty."""
    if value is None or (isinstance(value, float) and value != value):
        value = ""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    text = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f"'{text}'"


# Normalisers in SQL ---------------------------------------------------------------------------


def canon_select(values_sql: str, region: str) -> str:
    """SELECT kind, v, n over the (kind, v) rows of `values_sql` (v VARCHAR, not NULL): n is the
    normalised value, or NULL when the value must go through the Python normaliser. Exact for
    printable ASCII (where the only whitespace is the space and case-folding is lower-casing):
    `regexp_full_match(v, '[ -~]*')`. Each step is a column so no expression is repeated."""
    phone = (
        """WHEN length(t) <= 40 AND regexp_full_match(p, '(\\+44|0)[1-357-9][0-9]{9}')
             THEN '+44' || right(p, 10)"""
        if region == "GB"
        else ""
    )
    return f"""
        WITH a AS (
            SELECT kind, v, regexp_full_match(v, '[ -~]*') AS plain,
                   trim(regexp_replace(v, ' +', ' ', 'g')) AS t
            FROM ({values_sql})),
        b AS (
            SELECT *,
                   CASE WHEN kind = 'website'
                        THEN regexp_replace(t, '^[A-Za-z][A-Za-z0-9+.\\-]*://', '') END AS s,
                   CASE WHEN kind = 'phone'
                        THEN regexp_replace(t, '[ \\-.()/]', '', 'g') END AS p
            FROM a),
        c AS (SELECT *, regexp_extract(s, '^[^/?#]*') AS host FROM b),
        d AS (SELECT *, rtrim(lower(host), '.') AS h FROM c)
        SELECT kind, v, CASE
            WHEN kind = 'exact' THEN v
            WHEN NOT plain THEN NULL
            WHEN kind IN ('text', 'name') THEN t
            WHEN kind = 'email' THEN lower(t)
            WHEN kind = 'website' THEN CASE
                WHEN t = '' THEN ''
                ELSE (CASE WHEN starts_with(h, 'www.') THEN substr(h, 5) ELSE h END)
                     || rtrim(substr(s, length(host) + 1), '/') END
            WHEN kind = 'phone' THEN CASE WHEN t = '' THEN '' {phone} END
        END AS n
        FROM d"""


def canonical(con: duckdb.DuckDBPyConnection, values: pd.DataFrame, region: str) -> pd.DataFrame:
    """(kind, v) -> (kind, v, n) through the SQL rules and the Python fallback (the tests
    compare it with the Python normalisers)."""
    con.register("_canon_in", values[["kind", "v"]])
    try:
        _canon_table(con, "SELECT DISTINCT kind, v FROM _canon_in", region)
    finally:
        con.unregister("_canon_in")
    out = con.execute("SELECT kind, v, n FROM _canon").to_arrow_table().to_pandas()
    con.execute("DROP TABLE _canon")
    return out


def _canon_table(con: duckdb.DuckDBPyConnection, values_sql: str, region: str) -> None:
    """`_canon(kind, v, n)` for the distinct (kind, v) of `values_sql`."""
    # `k` is the one join key (kind + NUL + value): joining on kind and value separately lets
    # the optimizer chain several lookups on `kind` alone, a near cross product.
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _canon AS
            SELECT kind || chr(0) || v AS k, * FROM ({canon_select(values_sql, region)})"""
    )
    todo = con.execute("SELECT kind, v FROM _canon WHERE n IS NULL").to_arrow_table().to_pandas()
    if todo.empty:
        return
    parts = []
    for kind, group in todo.groupby("kind", sort=False):
        done = normalise_series(str(kind), group["v"], region)
        parts.append(
            pd.DataFrame({"kind": kind, "v": group["v"].astype(object), "n": done.astype(object)})
        )
    con.register("_canon_py", pd.concat(parts, ignore_index=True))
    try:
        con.execute(
            """UPDATE _canon SET n = p.n FROM _canon_py p
               WHERE _canon.k = p.kind || chr(0) || p.v AND _canon.n IS NULL"""
        )
    finally:
        con.unregister("_canon_py")


# Decisions --------------------------------------------------------------------------------


def _fields_frame(
    mapping: EntityMapping,
    *,
    initial_policy: str,
    policy_of: Callable[[str], str],
    active: Iterable[str],
) -> pd.DataFrame:
    active = set(active)
    rows = []
    for name, spec in mapping.fields.items():
        direction = mapping.direction(name)
        if direction == "crm_to_erp":
            initial, initial_label = "crm", "crm"
        elif direction == "erp_to_crm":
            initial, initial_label = "erp", "erp"
        else:
            initial, initial_label = initial_policy, initial_policy
        rows.append(
            {
                "field": name,
                "kind": spec.normaliser,
                "direction": direction,
                "conflict_policy": policy_of(name),
                "initial": initial,  # 'crm', 'erp' or 'newest'
                "initial_label": initial_label,
                "active": name in active,
                "label": name.replace("_", " "),
                "checked": bool(spec.validator or spec.erp_write or spec.crm_write),
            }
        )
    return pd.DataFrame(rows)


def decide(
    con: duckdb.DuckDBPyConnection,
    mapping: EntityMapping,
    *,
    region: str,
    initial_policy: str,
    policy_of: Callable[[str], str],
    active: Iterable[str],
    problem: Callable[[str, str, str], str | None],
) -> None:
    """Fill `_planned` and `_agreed` from `_cand_fields` (see the module docstring).

    `problem(field, op, value)` says why the target system would refuse `value` (or None)."""
    entity = mapping.entity
    con.execute(Q_MACRO)
    con.register(
        "_fields_in",
        _fields_frame(mapping, initial_policy=initial_policy, policy_of=policy_of, active=active),
    )
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE _fields AS SELECT * FROM _fields_in")
    finally:
        con.unregister("_fields_in")
    # Rows still to decide: not the first-sync fields settled by raw equality in diff.py.
    con.execute(
        """CREATE OR REPLACE TEMP TABLE _cf AS
           SELECT c.*, f.kind, c.base_crm IS NOT NULL AS has_base,
                  c.base_crm IS NOT NULL AND c.crm_value <> c.base_crm AS c_raw,
                  c.base_crm IS NOT NULL AND c.erp_value <> c.base_erp AS e_raw
           FROM _cand_fields c JOIN _fields f USING (field)
           WHERE NOT (c.base_crm IS NULL AND c.crm_value = c.erp_value)"""
    )
    # The distinct values whose normal form is needed: both sides where they differ raw, and
    # the baselines where both sides moved raw (only a normaliser can tell who really changed).
    _canon_table(
        con,
        """SELECT DISTINCT kind, v FROM (
               SELECT kind, crm_value AS v FROM _cf WHERE crm_value <> erp_value
               UNION ALL SELECT kind, erp_value FROM _cf WHERE crm_value <> erp_value
               UNION ALL SELECT kind, base_crm FROM _cf WHERE c_raw AND e_raw
               UNION ALL SELECT kind, base_erp FROM _cf WHERE c_raw AND e_raw)""",
        region,
    )
    con.execute(
        """CREATE OR REPLACE TEMP TABLE _d AS
        WITH both_moved AS (  -- the few rows where both raw values left the baseline
            SELECT c.erp_id, c.field, cn.n <> bc.n AS c_moved, en.n <> be.n AS e_moved
            FROM (SELECT * FROM _cf WHERE c_raw AND e_raw) c
            JOIN _canon cn ON cn.k = c.kind || chr(0) || c.crm_value
            JOIN _canon en ON en.k = c.kind || chr(0) || c.erp_value
            JOIN _canon bc ON bc.k = c.kind || chr(0) || c.base_crm
            JOIN _canon be ON be.k = c.kind || chr(0) || c.base_erp),
        n AS (
            SELECT c.*,
                   c.crm_value = c.erp_value OR cn.n = en.n AS same,
                   CASE WHEN c.c_raw AND c.e_raw THEN b.c_moved ELSE c.c_raw END AS c_moved,
                   CASE WHEN c.c_raw AND c.e_raw THEN b.e_moved ELSE c.e_raw END AS e_moved
            FROM _cf c
            LEFT JOIN _canon cn ON cn.k = c.kind || chr(0) || c.crm_value
            LEFT JOIN _canon en ON en.k = c.kind || chr(0) || c.erp_value
            LEFT JOIN both_moved b ON b.erp_id = c.erp_id AND b.field = c.field),
        m AS (
            SELECT n.*, f.direction, f.conflict_policy, f.initial, f.initial_label, f.active,
                   f.label, f.checked,
                   n.c_moved AND f.direction <> 'erp_to_crm' AS c_counts,
                   n.e_moved AND f.direction <> 'crm_to_erp' AS e_counts,
                   NOT n.has_base OR (NOT n.c_moved AND NOT n.e_moved) AS is_initial,
                   coalesce(n.crm_modified > n.erp_modified, false) AS newer_crm
            FROM n JOIN _fields f USING (field)
            WHERE NOT n.same)
        SELECT m.*,
               CASE WHEN c_counts AND e_counts THEN
                        CASE WHEN conflict_policy = 'newest'
                             THEN CASE WHEN newer_crm THEN 'crm' ELSE 'erp' END
                             ELSE conflict_policy END
                    WHEN c_counts THEN 'crm'
                    WHEN e_counts THEN 'erp'
                    WHEN is_initial THEN
                        CASE WHEN initial = 'newest'
                             THEN CASE WHEN newer_crm THEN 'crm' ELSE 'erp' END
                             ELSE initial END
               END AS winner,
               CASE WHEN c_counts AND e_counts THEN 'conflict'
                    WHEN c_counts OR e_counts THEN 'changed'
                    WHEN is_initial THEN 'initial' END AS how,
               CASE WHEN c_counts AND e_counts THEN conflict_policy
                    WHEN NOT (c_counts OR e_counts) AND is_initial
                      THEN 'initial:' || initial_label END AS policy
        FROM m"""
    )
    con.execute(
        """CREATE OR REPLACE TEMP TABLE _agreed AS
           SELECT erp_id, field, crm_value, erp_value FROM _cand_fields
           WHERE base_crm IS NULL AND crm_value = erp_value
           UNION ALL
           SELECT c.erp_id, c.field, c.crm_value, c.erp_value FROM _cf c
           WHERE NOT EXISTS (SELECT 1 FROM _d d WHERE d.erp_id = c.erp_id AND d.field = c.field)"""
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _planned AS
        WITH p AS (
            SELECT d.*, winner = 'crm' AS to_erp,
                   CASE WHEN winner = 'crm' THEN 'update_erp' ELSE 'update_crm' END AS op,
                   CASE WHEN winner = 'crm' THEN crm_value ELSE erp_value END AS new_value,
                   CASE WHEN winner = 'crm' THEN base_erp ELSE base_crm END AS baseline_value,
                   CASE WHEN winner = 'crm' THEN 'CRM' ELSE 'Unleashed' END AS win,
                   CASE WHEN winner = 'crm' THEN 'Unleashed' ELSE 'CRM' END AS lose
            FROM _d d WHERE winner IS NOT NULL AND active)
        SELECT '{entity}' AS entity, op, crm_id, erp_id, crm_parent_id, erp_parent_id, field,
               crm_value, erp_value, baseline_value, new_value,
               how = 'conflict' AS conflict, policy,
               CASE how
                 WHEN 'changed' THEN
                   win || ' changed ' || label || ' from '
                   || _q(CASE WHEN to_erp THEN base_crm ELSE base_erp END) || ' to '
                   || _q(new_value)
                   || CASE WHEN direction <> 'both'
                           THEN '; ' || label || ' flows ' || win || ' → ' || lose || ' only'
                           ELSE '' END
                 WHEN 'conflict' THEN
                   'conflict: both sides changed ' || label || ' from ' || _q(base_crm)
                   || ': CRM ' || _q(crm_value) || ' (modified '
                   || coalesce(CAST(crm_modified AS VARCHAR), 'unknown') || '), Unleashed '
                   || _q(erp_value) || ' (modified '
                   || coalesce(CAST(erp_modified AS VARCHAR), 'unknown') || '); '
                   || win || ' wins by policy ' || policy
                   || CASE WHEN policy <> 'newest' THEN ''
                           WHEN to_erp THEN ' (CRM record modified later)'
                           ELSE ' (Unleashed record modified later or at the same time)' END
                 ELSE
                   'no agreed value yet: CRM ' || _q(crm_value) || ', Unleashed '
                   || _q(erp_value) || '; ' || win || ' wins ('
                   || replace(policy, 'initial:', 'initial policy ') || ')'
               END AS reason,
               crm_modified, erp_modified, CAST(NULL AS JSON) AS payload,
               checked, label, coalesce(nullif(crm_label, ''), nullif(erp_label, ''), '')
                 AS record_label
        FROM p"""
    )
    _reject_refused(con, entity, problem)
    for table in ("_cf", "_d", "_canon", "_fields"):
        con.execute(f"DROP TABLE IF EXISTS {table}")


def _reject_refused(
    con: duckdb.DuckDBPyConnection, entity: str, problem: Callable[[str, str, str], str | None]
) -> None:
    """Turn planned rows whose value the target system would refuse into rejects. The checks
    run once per distinct (field, op, value) of the fields that have a validator or a
    reference (names, websites, emails, account managers), in Python (validators/lookups)."""
    todo = (
        con.execute(
            """SELECT DISTINCT field, op, coalesce(new_value, '') AS value FROM _planned
               WHERE checked"""
        )
        .to_arrow_table()
        .to_pandas()
    )
    whys = [
        problem(f, op, v) for f, op, v in zip(todo["field"], todo["op"], todo["value"], strict=True)
    ]
    todo["why"] = whys
    todo = todo[todo["why"].notna()]
    if not todo.empty:
        con.register("_whys", todo)
        try:
            con.execute(
                f"""UPDATE _planned p SET op = 'reject', reason =
                    '{entity} ' || _q(p.record_label) || ' ('
                    || CASE WHEN p.crm_id IS NULL THEN '' ELSE 'CRM ' || p.crm_id || ' / ' END
                    || 'Unleashed ' || p.erp_id || '): ' || p.label || ' ' || _q(p.new_value)
                    || CASE WHEN p.op = 'update_erp' THEN ' is not accepted by Unleashed'
                            ELSE ' cannot be written to the CRM' END
                    || ': ' || w.why || '; not sent (' || p.reason || ')'
                    FROM _whys w
                    WHERE p.checked AND w.field = p.field AND w.op = p.op
                      AND w.value = coalesce(p.new_value, '')"""
            )
        finally:
            con.unregister("_whys")
