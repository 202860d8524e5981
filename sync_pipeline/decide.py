"""The per-field decisions of the three-way diff, made in DuckDB over the candidate rows.

Input: `_cand_fields` (diff.py), one row per candidate (record, field) with the two current raw
values and the two baseline raw values (and the record's label and baseline rowid). Output:

- `_cf`: those rows with the normal forms the decision needs; the rows where `AGREE` holds
  (the two sides agree after normalisation) are written to the baseline by diff.py;
- `_planned` (a view): plan rows (update_erp / update_crm / reject) in `diff.PLAN_COLUMNS`
  order.

Rows in neither stay unsettled (a one-way field's ignored edit, a field held back by a setting)
and keep their record on the pending set.

Equality after normalisation is decided per row, in SQL. The normalisers in
`mapping/normalise.py` are the definition; for printable-ASCII values they have exact SQL
equivalents here (trim and collapse spaces, lower-case, the website rule, the UK phone fast
path), which `tests/test_mapping.py` checks against the Python functions on generated values.
Every other value (non-ASCII text, a phone number that needs `phonenumbers`) is normalised by the
Python function. Which side wins, the conflict policy, the reasons and the rejections are SQL
over all rows, so a plan of hundreds of thousands of rows costs DuckDB time, not Python loops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline import duck
from sync_pipeline.mapping.normalise import normalise_series
from sync_pipeline.mapping.schema import EntityMapping, FieldSpec
from sync_pipeline.mapping.validate import PLAIN_EMAIL, SPECIAL_TLDS, escape_char
from sync_pipeline.stages import Stages

# What a reason shows for a value: quoted, with quotes, backslashes, tabs and line breaks
# escaped, and every other character the safety check refuses (`validate.escape_char`: control
# characters, line separators, bidirectional controls) written as its code point, so a NUL or a
# right-to-left override shows as `\x00` or `\u202e` and cannot garble the text around it.
# `quote` below is the same rule in Python, for the reasons written there.
UNSAFE_CLASS = (
    r"\x00-\x1f\x7f-\x{9f}\x{2028}\x{2029}\x{61c}\x{200e}\x{200f}\x{202a}-\x{202e}"
    r"\x{2066}-\x{2069}"
)  # an RE2 character class: what `validate.unsafe_kind` refuses in a single-line field
Q_MACRO = rf"""CREATE OR REPLACE TEMP MACRO _q(x) AS
    '''' || CASE WHEN regexp_matches(x, '[\\''{UNSAFE_CLASS}]')
                 THEN array_to_string(list_transform(string_split(x, ''), lambda c: CASE
                   WHEN c = '\' THEN '\\' WHEN c = '''' THEN '\'''
                   WHEN c = chr(10) THEN '\n' WHEN c = chr(13) THEN '\r' WHEN c = chr(9) THEN '\t'
                   WHEN NOT regexp_matches(c, '[{UNSAFE_CLASS}]') THEN c
                   WHEN unicode(c) < 256 THEN '\x' || format('{{:02x}}', unicode(c))
                   ELSE '\u' || format('{{:04x}}', unicode(c)) END), '')
                 ELSE coalesce(x, '') END || ''''"""  # one regex test: most values need no escape
_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


# What a reason shows for a time: to the millisecond (both APIs keep milliseconds; a conflict's
# two records may be modified within the same second), the same width whatever the value.
T_MACRO = "CREATE OR REPLACE TEMP MACRO _t(x) AS strftime(x, '%Y-%m-%d %H:%M:%S.%g')"


def quote(value: Any) -> str:
    """A value as a person reads it in a reason: in single quotes, '' for empty, escaped as
    `Q_MACRO` says."""
    if value is None or (isinstance(value, float) and value != value):
        value = ""
    text = str(value)
    if text.isprintable() and "\\" not in text and "'" not in text:
        return f"'{text}'"
    return "'" + "".join(_escape(ch) for ch in text) + "'"


def _escape(ch: str) -> str:
    return _ESCAPES.get(ch) or escape_char(ch)


# Normalisers in SQL ---------------------------------------------------------------------------


def norm_select(rel_sql: str, inputs: Mapping[str, str], region: str) -> str:
    """SELECT * from `rel_sql` (which has a `kind` column) plus, for each `out: expr` of
    `inputs`, the column `out`: the normal form of the text `expr`, or NULL when `expr` is NULL
    or the value must go through the Python normaliser (see `fill_python`).

    Exact for printable ASCII (where the only whitespace is the space and case-folding is
    lower-casing): `regexp_full_match(v, '[ -~]*')`. Each step is a column of its own layer so
    no expression is computed twice; the helper columns are dropped at the end."""
    layers: list[list[str]] = [[], [], [], [], []]
    finals, helpers = [], []
    for out, expr in inputs.items():
        names = ("v", "plain", "t", "s", "p", "host", "h")
        v, plain, t, s, p, host, h = (f"_{x}_{out}" for x in names)
        helpers += [v, plain, t, s, p, host, h]
        layers[0].append(f"{expr} AS {v}")
        layers[1].append(
            f"regexp_full_match({v}, '[ -~]*') AS {plain}, "
            f"trim(CASE WHEN contains({v}, '  ') THEN regexp_replace({v}, ' +', ' ', 'g') "
            f"ELSE {v} END) AS {t}"
        )
        layers[2].append(
            f"CASE WHEN kind = 'website' THEN "
            f"regexp_replace({t}, '^[A-Za-z][A-Za-z0-9+.\\-]*://', '') END AS {s}, "
            f"CASE WHEN kind = 'phone' THEN translate({t}, ' -.()/', '') END AS {p}"
        )
        layers[3].append(f"regexp_extract({s}, '^[^/?#]*') AS {host}")
        layers[4].append(f"rtrim(lower({host}), '.') AS {h}")
        phone = (
            f"""WHEN length({t}) <= 40 AND regexp_full_match({p}, '(\\+44|0)[1-357-9][0-9]{{9}}')
                 THEN '+44' || right({p}, 10)"""
            if region == "GB"
            else ""
        )
        finals.append(
            f"""CASE
                WHEN kind = 'exact' THEN {v}
                WHEN NOT {plain} THEN NULL
                WHEN kind IN ('text', 'name') THEN {t}
                WHEN kind = 'email' THEN lower({t})
                WHEN kind = 'website' THEN CASE
                    WHEN {t} = '' THEN ''
                    ELSE (CASE WHEN starts_with({h}, 'www.') THEN substr({h}, 5) ELSE {h} END)
                         || rtrim(substr({s}, length({host}) + 1), '/') END
                WHEN kind = 'phone' THEN CASE WHEN {t} = '' THEN '' {phone} END
            END AS {out}"""
        )
    sql = f"SELECT * FROM ({rel_sql})"
    for layer in layers:
        sql = f"SELECT *, {', '.join(layer)} FROM ({sql})"
    return f"SELECT * EXCLUDE ({', '.join(helpers)}), {', '.join(finals)} FROM ({sql})"


def canon_select(values_sql: str, region: str) -> str:
    """SELECT kind, v, n over the (kind, v) rows of `values_sql`: n is the normal form by the
    SQL rules, NULL where the Python normaliser is needed (`norm_select`)."""
    return f"SELECT kind, v, n FROM ({norm_select(values_sql, {'n': 'v'}, region)})"


def fill_python(
    con: duckdb.DuckDBPyConnection, table: str, inputs: Mapping[str, str], region: str
) -> None:
    """Fill the normal forms `norm_select` left NULL in `table` (non-ASCII text, phone numbers
    that need `phonenumbers`) with the Python normalisers, once per distinct value."""
    parts = " UNION ".join(
        f"SELECT kind, {expr} AS v FROM {table} WHERE {out} IS NULL AND {expr} IS NOT NULL"
        for out, expr in inputs.items()
    )
    todo = duck.arrow(con, parts).to_pandas()
    if todo.empty:
        return
    frames = []
    for kind, group in todo.groupby("kind", sort=False):
        done = normalise_series(str(kind), group["v"], region)
        frames.append(
            pd.DataFrame({"_k": kind, "_v": group["v"].astype(object), "_n": done.astype(object)})
        )
    duck.register(con, "_norm_py", pd.concat(frames, ignore_index=True))
    try:
        for out, expr in inputs.items():  # `expr` names columns of `table` only
            con.execute(
                f"""UPDATE {table} SET {out} = p._n FROM _norm_py p
                    WHERE {table}.{out} IS NULL AND p._k = {table}.kind AND p._v = ({expr})"""
            )
    finally:
        con.unregister("_norm_py")


def canonical(con: duckdb.DuckDBPyConnection, values: pd.DataFrame, region: str) -> pd.DataFrame:
    """(kind, v) -> (kind, v, n) through the SQL rules and the Python fallback (the tests
    compare it with the Python normalisers)."""
    duck.register(con, "_canon_in", values[["kind", "v"]])
    try:
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE _canon AS
                {canon_select("SELECT DISTINCT kind, v FROM _canon_in", region)}"""
        )
    finally:
        con.unregister("_canon_in")
    fill_python(con, "_canon", {"n": "v"}, region)
    out = duck.arrow(con, "SELECT kind, v, n FROM _canon").to_pandas()
    con.execute("DROP TABLE _canon")
    return out


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
            }
        )
    return pd.DataFrame(rows)


# The normal forms a decision needs (inputs of `norm_select`, over `_cand_fields` columns): both
# sides where their raw values differ, and the baselines where both raw values left them (only a
# normaliser can tell who really changed).
NORMS = {
    "cn": "CASE WHEN crm_value <> erp_value THEN crm_value END",
    "en": "CASE WHEN crm_value <> erp_value THEN erp_value END",
    "bcn": "CASE WHEN crm_value <> erp_value AND crm_value <> base_crm AND erp_value <> base_erp "
    "THEN base_crm END",
    "ben": "CASE WHEN crm_value <> erp_value AND crm_value <> base_crm AND erp_value <> base_erp "
    "THEN base_erp END",
}
# A (record, field) row of `_cf` whose two sides agree (the baseline takes their values).
AGREE = "(crm_value = erp_value OR cn = en)"


def decide(
    st: Stages,
    mapping: EntityMapping,
    *,
    region: str,
    initial_policy: str,
    policy_of: Callable[[str], str],
    active: Iterable[str],
    problem: Callable[[str, str, str], str | None],
    labels_sql: str,
) -> None:
    """Fill `_cf` and define the view `_planned` over `_cand_fields` (see the module docstring).

    `problem(field, op, value)` says why `value` must not be written by `op` (or None);
    `labels_sql` gives (erp_id, label): how a rejection names its record."""
    con = st.con
    entity = mapping.entity
    con.execute(Q_MACRO)
    con.execute(T_MACRO)
    duck.register(
        con,
        "_fields_in",
        _fields_frame(mapping, initial_policy=initial_policy, policy_of=policy_of, active=active),
    )
    try:
        st.table(f"{entity}.fields", "_fields", "SELECT * FROM _fields_in")
    finally:
        con.unregister("_fields_in")
    st.table(
        f"{entity}.normal_forms",
        "_cf",
        norm_select(
            "SELECT c.*, f.kind FROM _cand_fields c JOIN _fields f USING (field)", NORMS, region
        ),
        reads=["_cand_fields", "_fields"],
    )
    with st.timed(f"{entity}.normal_forms_python"):
        fill_python(con, "_cf", NORMS, region)
    _prior_decisions(st, entity)
    # The decisions, a view read twice (by the refusal checks and by the plan): recomputing the
    # CASE logic costs less than materialising a wide table.
    st.view(
        f"{entity}.decisions",
        "_decided",
        f"""WITH n AS (
            SELECT c.*, c.base_crm IS NOT NULL AS has_base,
                   CASE WHEN c.base_crm IS NULL THEN false
                        WHEN c.bcn IS NOT NULL THEN c.cn <> c.bcn
                        ELSE c.crm_value <> c.base_crm END AS c_moved,
                   CASE WHEN c.base_crm IS NULL THEN false
                        WHEN c.ben IS NOT NULL THEN c.en <> c.ben
                        ELSE c.erp_value <> c.base_erp END AS e_moved
            FROM _cf c WHERE NOT {AGREE}),
        m AS (
            SELECT n.*, f.direction, f.conflict_policy, f.initial, f.initial_label, f.active,
                   f.label,
                   n.c_moved AND f.direction <> 'erp_to_crm' AS c_counts,
                   n.e_moved AND f.direction <> 'crm_to_erp' AS e_counts,
                   NOT n.has_base OR (NOT n.c_moved AND NOT n.e_moved) AS is_initial,
                   -- First agreement: an empty value never replaces a filled one.
                   CASE WHEN trim(n.crm_value) = '' AND trim(n.erp_value) <> '' THEN 'erp'
                        WHEN trim(n.erp_value) = '' AND trim(n.crm_value) <> '' THEN 'crm'
                   END AS filled,
                   coalesce(n.crm_modified > n.erp_modified, false) AS newer_crm,
                   CASE WHEN {_SAME_CONFLICT} THEN k.winner END AS kept_winner,
                   CASE WHEN {_SAME_CONFLICT} THEN k.seen_at END AS kept_since
            FROM n JOIN _fields f USING (field)
            -- Joined on its key alone (one row per record and field), the values compared
            -- after: with the comparisons in the join condition DuckDB chose a plan that took
            -- 100 s at 380k rows against 5M recorded conflicts.
            LEFT JOIN _prior k ON k.erp_id = n.erp_id AND k.field = n.field),
        d AS (
            SELECT m.*,
               CASE WHEN c_counts AND e_counts THEN
                        CASE WHEN conflict_policy = 'newest'
                             THEN coalesce(kept_winner,
                                           CASE WHEN newer_crm THEN 'crm' ELSE 'erp' END)
                             ELSE conflict_policy END
                    WHEN c_counts THEN 'crm'
                    WHEN e_counts THEN 'erp'
                    WHEN is_initial AND filled IS NOT NULL THEN
                        -- A one-way field is not written against its direction: an empty
                        -- source leaves the filled target as it is (unsettled).
                        CASE WHEN direction = 'both' OR filled = initial THEN filled END
                    WHEN is_initial THEN
                        CASE WHEN initial = 'newest'
                             THEN CASE WHEN newer_crm THEN 'crm' ELSE 'erp' END
                             ELSE initial END
               END AS winner,
               CASE WHEN c_counts AND e_counts THEN 'conflict'
                    WHEN c_counts OR e_counts THEN 'changed'
                    WHEN is_initial THEN 'initial' END AS how,
               CASE WHEN c_counts AND e_counts THEN conflict_policy
                    WHEN NOT (c_counts OR e_counts) AND is_initial AND filled IS NOT NULL
                      THEN 'initial:filled'
                    WHEN NOT (c_counts OR e_counts) AND is_initial
                      THEN 'initial:' || initial_label END AS policy
            FROM m)
        SELECT d.*, winner = 'crm' AS to_erp,
               CASE WHEN winner = 'crm' THEN 'update_erp' ELSE 'update_crm' END AS op,
               CASE WHEN winner = 'crm' THEN crm_value ELSE erp_value END AS new_value,
               CASE WHEN winner = 'crm' THEN base_erp ELSE base_crm END AS baseline_value,
               CASE WHEN winner = 'crm' THEN 'CRM' ELSE 'Unleashed' END AS win,
               CASE WHEN winner = 'crm' THEN 'Unleashed' ELSE 'CRM' END AS lose
        FROM d WHERE winner IS NOT NULL AND active""",
        reads=["_cf", "_fields", "_prior"],
    )
    _refusals(st, mapping, problem, labels_sql)
    st.view(
        f"{entity}.planned",
        "_planned",
        f"""WITH p AS (
            SELECT p.*, CASE how
                 WHEN 'changed' THEN
                   win || ' changed ' || label || ' from '
                   || _q(CASE WHEN to_erp THEN base_crm ELSE base_erp END) || ' to '
                   || _q(new_value)
                   || CASE WHEN direction <> 'both'
                           THEN '; ' || label || ' flows ' || win || ' → ' || lose || ' only'
                           ELSE '' END
                 WHEN 'conflict' THEN
                   'conflict: both sides changed ' || label || ' from ' || _q(base_crm)
                   || ': CRM ' || _q(crm_value) || ' (changed '
                   || coalesce(_t(crm_modified), 'unknown') || '), Unleashed '
                   || _q(erp_value) || ' (changed '
                   || coalesce(_t(erp_modified), 'unknown') || '); '
                   || win || ' wins by policy ' || policy
                   || CASE WHEN policy <> 'newest' THEN ''
                           WHEN kept_winner IS NOT NULL THEN
                             ' (as decided when this conflict was first seen, '
                             || _t(kept_since) || '; neither value has changed since)'
                           WHEN to_erp THEN ' (changed later in the CRM)'
                           ELSE ' (changed later in Unleashed, or at the same time)' END
                 ELSE
                   'no agreed value yet: CRM ' || _q(crm_value) || ', Unleashed '
                   || _q(erp_value) || '; ' || win || ' wins ('
                   || CASE WHEN policy = 'initial:filled'
                           THEN 'its value fills the empty one: an empty value never replaces '
                                || 'a filled one on first agreement'
                           ELSE replace(policy, 'initial:', 'initial policy ') END || ')'
               END AS why_planned,
               r.why AS refused, r.record_label
            FROM _decided p LEFT JOIN _refused r ON r.erp_id = p.erp_id AND r.field = p.field)
        SELECT '{mapping.entity}' AS entity,
               CASE WHEN refused IS NULL THEN op ELSE 'reject' END AS op,
               crm_id, erp_id, crm_parent_id, erp_parent_id, field,
               crm_value, erp_value, baseline_value, new_value,
               how = 'conflict' AS conflict, policy,
               CASE WHEN refused IS NULL THEN why_planned ELSE
                   '{mapping.entity} ' || _q(record_label) || ' ('
                   || CASE WHEN crm_id IS NULL THEN '' ELSE 'CRM ' || crm_id || ' / ' END
                   || 'Unleashed ' || erp_id || '): ' || label || ' ' || _q(new_value)
                   || CASE WHEN op = 'update_erp' THEN ' is not accepted by Unleashed'
                           ELSE ' cannot be written to the CRM' END
                   || ': ' || refused || '; not sent (' || why_planned || ')'
               END AS reason,
               crm_modified, erp_modified, CAST(NULL AS JSON) AS payload
        FROM p""",
        reads=["_decided", "_refused"],
    )


# A recorded decision (`_prior k`) is about the same conflict as the row `n`: the same two values
# over the same agreed value (the loser's side of the baseline).
_SAME_CONFLICT = """(k.crm_value IS NOT DISTINCT FROM n.crm_value
    AND k.erp_value IS NOT DISTINCT FROM n.erp_value
    AND k.baseline_value IS NOT DISTINCT FROM
        CASE WHEN k.winner = 'crm' THEN n.base_erp ELSE n.base_crm END)"""


def _prior_decisions(st: Stages, entity: str) -> None:
    """`_prior`: the last recorded `newest` conflict decision of each candidate (record, field).

    A `newest` conflict is decided once. When the same conflict (the same two values over the
    same agreed value) is planned again, because the winner's value was refused or its write did
    not happen yet, it keeps its first winner: the sync's own write to another field of the
    record moves the record's modified time, and must not turn the decision round. A new value on
    either side is a new conflict, decided afresh.

    Only rows whose two raw values both left the baseline can be a conflict (a side that moved
    after normalisation moved raw), so only their records are looked up: a few thousand of the
    hundreds of thousands of candidates, in a log with a row per field ever in conflict."""
    st.table(
        f"{entity}.prior_decisions",
        "_prior",
        f"""SELECT erp_id, field, crm_value, erp_value, baseline_value, winner, seen_at
            FROM conflict_decisions WHERE entity = '{entity}'
              AND erp_id IN (SELECT erp_id FROM _cf
                             WHERE crm_value <> base_crm AND erp_value <> base_erp)""",
        reads=["_cf"],
    )


def plain_email_sql(col: str) -> str:
    """SQL: `col` is an address `validate.check_email` passes by its regex fast path (the same
    regex, length limits and special-use TLDs), so the library need not see it."""
    text = f"trim({col})"
    tlds = ", ".join(f"'{t}'" for t in sorted(SPECIAL_TLDS))
    return f"""(length({text}) <= 254
        AND regexp_full_match({text}, '{PLAIN_EMAIL.pattern.removeprefix("^").removesuffix("$")}')
        AND length(split_part({text}, '@', 1)) <= 64
        AND lower(regexp_extract({text}, '\\.([^.]*)$', 1)) NOT IN ({tlds}))"""


def plain_website_sql(col: str) -> str:
    """SQL: `col` is an address `validate.check_unleashed_website` certainly passes (http or
    https, a dotted host of letters, digits and hyphens, a path without spaces)."""
    return f"regexp_full_match({col}, 'https?://[A-Za-z0-9\\-]+(\\.[A-Za-z0-9\\-]+)+(/[!-~]*)?')"


_SQL_PASSES: dict[str, Callable[[str], str]] = {
    "email": plain_email_sql,
    "unleashed_website": plain_website_sql,
    "crm_website": plain_website_sql,  # no user name before the host either: `@` cannot match
    "unleashed_required": lambda col: f"trim({col}) <> ''",
}
# Printable ASCII (the space to the tilde) has no character the safety check refuses: no control
# character, tab or line break, nothing bidirectional. Every SQL pass is read under it.
PRINTABLE_ASCII_SQL = "regexp_full_match({col}, '[ -~]*')"


def sql_pass(spec: FieldSpec, target: str, col: str) -> str | None:
    """SQL: true where the text `col` certainly passes every check a value of this field goes
    through on its way to `target` ('erp' or 'crm'): printable ASCII (the safety check) and each
    of the field's named checks by its SQL pass. None where SQL cannot tell: a named check
    without one, or a reference to look up (`crm_write`, `erp_write`)."""
    if (spec.erp_write if target == "erp" else spec.crm_write) is not None:
        return None
    parts = [PRINTABLE_ASCII_SQL.format(col=col)]
    for name in spec.checks_to(target):
        if name not in _SQL_PASSES:
            return None
        parts.append(_SQL_PASSES[name](col))
    return "(" + " AND ".join(parts) + ")"


def _sql_passes(mapping: EntityMapping, col: str) -> str:
    """SQL over `_decided` rows: `sql_pass` of the row's field and op (NULL: ask Python)."""
    by_op = []
    for op, target in (("update_erp", "erp"), ("update_crm", "crm")):
        cases = [
            f"WHEN '{name}' THEN {cond}"
            for name, spec in mapping.fields.items()
            if (cond := sql_pass(spec, target, col)) is not None
        ]
        if cases:
            by_op.append(f"WHEN op = '{op}' THEN CASE field {' '.join(cases)} END")
    return f"CASE {' '.join(by_op)} END" if by_op else "NULL"


def _refusals(
    st: Stages,
    mapping: EntityMapping,
    problem: Callable[[str, str, str], str | None],
    labels_sql: str,
) -> None:
    """`_refused(erp_id, field, why, record_label)`: the decided changes whose value must not be
    written to the target system (they are planned as rejections). Every value is checked: the
    ones SQL certainly passes (`sql_pass`: printable ASCII that the field's syntax checks pass)
    are passed there, and `problem` runs in Python (validators, lookups) once per distinct
    (field, op, value) of the rest."""
    con = st.con
    stage = f"{mapping.entity}.refusals"
    passes = _sql_passes(mapping, "coalesce(new_value, '')")
    todo = st.run(
        stage,
        f"""SELECT DISTINCT field, op, coalesce(new_value, '') FROM _decided
            WHERE NOT coalesce({passes}, false)""",
        reads=["_decided"],
    )
    with st.timed(f"{mapping.entity}.refusals_python"):
        whys = [(f, op, v, why) for f, op, v in todo if (why := problem(f, op, v)) is not None]
    st.empty_table(
        stage, "_refused", "erp_id VARCHAR, field VARCHAR, why VARCHAR, record_label VARCHAR"
    )
    if not whys:
        return
    duck.register(con, "_whys", pd.DataFrame(whys, columns=["field", "op", "value", "why"]))
    try:
        st.run(
            stage,
            f"""INSERT INTO _refused
                WITH r AS (
                    SELECT d.erp_id, d.field, w.why FROM _decided d
                    JOIN _whys w ON w.field = d.field AND w.op = d.op
                                AND w.value = coalesce(d.new_value, ''))
                SELECT r.erp_id, r.field, r.why, coalesce(l.label, '')
                FROM r LEFT JOIN ({labels_sql}) l ON l.erp_id = r.erp_id""",
            reads=["_refused", "_decided"],
        )
    finally:
        con.unregister("_whys")
