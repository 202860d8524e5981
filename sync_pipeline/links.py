"""Links: which CRM record is which Unleashed record, one-to-one, kept in DuckDB.

Tables (created by sync_pipeline/schema):

- `company_links(crm_id, erp_id, method, linked_at)`
- `contact_links(crm_id, erp_id, crm_parent_id, erp_parent_id, method, linked_at)`
- `link_issues(entity, kind, method, key_value, crm_ids, erp_ids, detail, seen_at)`: what the
  last `update_links` could not do (ambiguous keys) or undid (unlinked records); replaced on
  every run.
- `link_state(name, value)`: 'last_pass:<entity>' = what the entity's last complete pass read
  (see `_pass_markers`); an entity's pass over the same inputs is skipped.

Uniqueness on each side is kept by `update_links` (a record only ever joins a link when it is in
none) and verified by `one_to_one_violations` (an asset check); there is no DuckDB UNIQUE index
because at millions of rows its ART index costs more memory than the whole diff.

Matching rules come from the mapping's `match.keys`, tried in order; a rule links a pair only when
the key value is held by exactly one unlinked record on each side. Existing links are kept as
long as both records are active (and, for contacts, still under a linked company pair);
otherwise the link is removed and reported, and its baseline forgotten. Nothing is deleted in
either system.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline import baseline, derived, schema
from sync_pipeline.mapping.projection import ident
from sync_pipeline.mapping.schema import EntityMapping, MatchKey
from sync_pipeline.schema import LINK_TABLES

ISSUE_COLUMNS = ["entity", "kind", "method", "key_value", "crm_ids", "erp_ids", "detail"]


@dataclass
class LinkResult:
    """What one `update_links` pass did, per entity."""

    kept: dict[str, int] = field(default_factory=dict)
    linked: dict[str, dict[str, int]] = field(default_factory=dict)  # entity -> method -> n
    unlinked: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ISSUE_COLUMNS))
    ambiguous: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ISSUE_COLUMNS))
    # The entities for which nothing their link pass reads had changed since their last pass,
    # so the tables were not compared again (the result would have been the same).
    skipped_entities: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        """Both entities' passes were skipped."""
        return set(self.skipped_entities) >= set(LINK_TABLES)

    def total_linked(self, entity: str) -> int:
        return sum(self.linked.get(entity, {}).values())


def crm_keys_sql(mapping: EntityMapping, key: MatchKey, *, active_only: bool = True) -> str:
    """crm_id, crm_parent_id, key_value, crm_active for every CRM record carrying a non-empty
    key.

    Reads the derived key columns: call `derived.refresh` first."""
    crm_table = ident(mapping.crm.table)
    parent = "r.parent_id" if mapping.crm.parent_key else "CAST(NULL AS VARCHAR)"
    active = "AND r.active" if active_only else ""
    col = ident(derived.key_column(key.name))
    if key.crm_table:
        # e.g. the sales ledger: its parent_id is the company (Division) id.
        return (
            f"SELECT r.id AS crm_id, {parent} AS crm_parent_id, t.{col} AS key_value, "
            "r.active AS crm_active "
            f"FROM {ident(key.crm_table)} t JOIN {crm_table} r ON r.id = t.parent_id {active} "
            f"WHERE t.active AND t.{col} IS NOT NULL"
        )
    return (
        f"SELECT r.id AS crm_id, {parent} AS crm_parent_id, r.{col} AS key_value, "
        f"r.active AS crm_active FROM {crm_table} r WHERE r.{col} IS NOT NULL {active}"
    )


def erp_keys_sql(mapping: EntityMapping, key: MatchKey, *, active_only: bool = True) -> str:
    """erp_id, erp_parent_id, key_value for every Unleashed record carrying a non-empty key.

    Reads the derived key columns: call `derived.refresh` first."""
    parent = "r.parent_id" if mapping.erp.parent_resource else "CAST(NULL AS VARCHAR)"
    col = ident(derived.key_column(key.name))
    active = "AND r.active" if active_only else ""
    return (
        f"SELECT r.id AS erp_id, {parent} AS erp_parent_id, r.{col} AS key_value "
        f"FROM {ident(mapping.erp.table)} r WHERE r.{col} IS NOT NULL {active}"
    )


def candidate_pairs_sql(mapping: EntityMapping, key: MatchKey, pooled: set[str]) -> str:
    """Distinct (crm_id, erp_id, key_value) pairs of unlinked records agreeing on `key`, with
    how many partners each side has (n_crm: CRM records for this erp_id; n_erp: the reverse).

    A side in `pooled` ('crm', 'erp') reads its unlinked records from its pool (`_pools`);
    another side finds them by an anti-join with the link table."""
    links = LINK_TABLES[mapping.entity]

    def unlinked(side: str) -> str:
        if side in pooled:
            return f"WHERE {side}_id IN (SELECT id FROM _link_pool_{side})"
        return f"WHERE {side}_id NOT IN (SELECT {side}_id FROM {links})"

    if mapping.match.within_linked_parent:
        join = (
            "JOIN company_links pl ON pl.crm_id = c.crm_parent_id "
            "JOIN e ON e.erp_parent_id = pl.erp_id AND e.key_value = c.key_value"
        )
    else:
        join = "JOIN e ON e.key_value = c.key_value"
    return f"""
        WITH c AS (SELECT * FROM ({crm_keys_sql(mapping, key)}) {unlinked("crm")}),
             e AS (SELECT * FROM ({erp_keys_sql(mapping, key)}) {unlinked("erp")}),
             pairs AS (
                SELECT DISTINCT c.crm_id, c.crm_parent_id, e.erp_id, e.erp_parent_id, c.key_value
                FROM c {join})
        SELECT *, count(*) OVER (PARTITION BY erp_id) AS n_crm,
                  count(*) OVER (PARTITION BY crm_id) AS n_erp
        FROM pairs"""


def _pools(con: duckdb.DuckDBPyConnection, mapping: EntityMapping, n_links: int) -> set[str]:
    """`_link_pool_crm(id)`, `_link_pool_erp(id)`: the active records of each side that are not
    linked, the only ones matching reads. Found once a pass (each is a whole-table anti-join
    with the links) and kept as records get linked, so each rule (three for contacts) reads
    the keys of these few records instead of comparing whole tables again. Returns the sides
    that have a pool: one larger than the link table (a first sync, when nothing is linked yet)
    would cost more to read and keep than the anti-join it saves, so it is not made. Its size
    is known without making it: after `_unlink` every one of the `n_links` links joins two
    active records, one on each side."""
    links = LINK_TABLES[mapping.entity]
    pooled = set()
    for side, table in (("crm", mapping.crm.table), ("erp", mapping.erp.table)):
        (n_active,) = con.execute(f"SELECT count(*) FROM {ident(table)} WHERE active").fetchone()
        if n_active - n_links > n_links:
            continue
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE _link_pool_{side} AS
                SELECT id FROM {ident(table)}
                WHERE active AND id NOT IN (SELECT {side}_id FROM {links})"""
        )
        pooled.add(side)
    return pooled


# Update ----------------------------------------------------------------------------------


def _unlink(con: duckdb.DuckDBPyConnection, mapping: EntityMapping) -> pd.DataFrame:
    """Remove the links whose records are gone or inactive (for contacts: whose companies are
    no longer linked to each other) and report them; for contacts, also bring the kept links'
    parent ids up to date. One read of the links and both tables does both."""
    entity = mapping.entity
    links = LINK_TABLES[entity]
    crm_t, erp_t = ident(mapping.crm.table), ident(mapping.erp.table)
    crm_label = "CRM company" if entity == "company" else "CRM contact"
    erp_label = "Unleashed customer" if entity == "company" else "Unleashed contact"
    parent_check, parents, moved = "", "", ""
    if entity == "contact":
        parent_check = """
            WHEN NOT EXISTS (SELECT 1 FROM company_links pl
                             WHERE pl.crm_id = c.parent_id AND pl.erp_id = e.parent_id)
              THEN 'its companies are no longer linked to each other'"""
        parents = ", c.parent_id AS crm_parent_id, e.parent_id AS erp_parent_id"
        moved = """OR l.crm_parent_id IS DISTINCT FROM c.parent_id
                   OR l.erp_parent_id IS DISTINCT FROM e.parent_id"""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _link_check AS
            SELECT l.crm_id, l.erp_id,
                CASE WHEN c.id IS NULL THEN '{crm_label} ' || l.crm_id || ' is no longer in the CRM'
                     WHEN NOT c.active THEN '{crm_label} ' || l.crm_id || ' is inactive'
                     WHEN e.id IS NULL THEN '{erp_label} ' || l.erp_id || ' is gone from Unleashed'
                     WHEN NOT e.active THEN '{erp_label} ' || l.erp_id || ' is obsolete or removed'
                     {parent_check}
                END AS detail {parents}
            FROM {links} l
            LEFT JOIN {crm_t} c ON c.id = l.crm_id
            LEFT JOIN {erp_t} e ON e.id = l.erp_id
            WHERE detail IS NOT NULL {moved}"""
    )
    if entity == "contact":
        # A contact moved to another company whose pair is linked too: its link stays.
        con.execute(
            """UPDATE contact_links l
               SET crm_parent_id = k.crm_parent_id, erp_parent_id = k.erp_parent_id
               FROM _link_check k
               WHERE k.detail IS NULL AND l.crm_id = k.crm_id AND l.erp_id = k.erp_id"""
        )
    gone = con.execute(
        "SELECT crm_id, erp_id, detail FROM _link_check WHERE detail IS NOT NULL"
    ).df()
    con.execute("DROP TABLE _link_check")
    if gone.empty:
        return pd.DataFrame(columns=ISSUE_COLUMNS)
    con.execute(
        f"DELETE FROM {links} WHERE (crm_id, erp_id) IN (SELECT (crm_id, erp_id) FROM gone)"
    )
    baseline.forget(con, entity, gone["erp_id"].tolist())
    return pd.DataFrame(
        {
            "entity": entity,
            "kind": "unlinked",
            "method": None,
            "key_value": None,
            "crm_ids": [[x] for x in gone["crm_id"]],
            "erp_ids": [[x] for x in gone["erp_id"]],
            "detail": gone["detail"] + "; the link was removed, nothing was deleted",
        }
    )


# How many record ids a report names (link_issues keeps them all in crm_ids / erp_ids): a
# placeholder email shared by thousands of contacts must not make a report of megabytes.
SHOWN_IDS = 10


def some_ids(ids: Any) -> str:
    """Ids as a report names them: all of them up to SHOWN_IDS, then the first ones and a count."""
    ids = [str(i) for i in ids]
    if len(ids) <= SHOWN_IDS:
        return ", ".join(ids)
    return f"{', '.join(ids[:SHOWN_IDS])} and {len(ids) - SHOWN_IDS:,} more"


def _shown_key(value: str) -> str:
    """A key as a person reads it: a name key's parts joined by a space, not chr(31)."""
    return value.replace(chr(31), " ")


def _link_by_key(
    con: duckdb.DuckDBPyConnection, mapping: EntityMapping, key: MatchKey, pooled: set[str]
) -> tuple[int, pd.DataFrame]:
    entity = mapping.entity
    links = LINK_TABLES[entity]
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _link_candidates AS "
        + candidate_pairs_sql(mapping, key, pooled)
    )
    if entity == "contact":
        inserted = con.execute(
            f"""INSERT INTO {links}
                    (crm_id, erp_id, crm_parent_id, erp_parent_id, method, linked_at)
                SELECT crm_id, erp_id, crm_parent_id, erp_parent_id, ?, now()::TIMESTAMP
                FROM _link_candidates WHERE n_crm = 1 AND n_erp = 1""",
            [key.name],
        ).fetchall()[0]
    else:
        inserted = con.execute(
            f"""INSERT INTO {links} (crm_id, erp_id, method, linked_at)
                SELECT crm_id, erp_id, ?, now()::TIMESTAMP
                FROM _link_candidates WHERE n_crm = 1 AND n_erp = 1""",
            [key.name],
        ).fetchall()[0]
    baseline.mark_pending(
        con, entity, "erp", "SELECT erp_id FROM _link_candidates WHERE n_crm = 1 AND n_erp = 1"
    )
    for side in sorted(pooled):
        con.execute(
            f"""DELETE FROM _link_pool_{side} WHERE id IN (
                    SELECT {side}_id FROM _link_candidates WHERE n_crm = 1 AND n_erp = 1)"""
        )
    ambiguous = con.execute(
        """SELECT key_value, list(DISTINCT crm_id ORDER BY crm_id) AS crm_ids,
                  list(DISTINCT erp_id ORDER BY erp_id) AS erp_ids
           FROM _link_candidates WHERE n_crm > 1 OR n_erp > 1
           GROUP BY key_value ORDER BY key_value"""
    ).df()
    con.execute("DROP TABLE _link_candidates")
    if ambiguous.empty:
        return int(inserted[0]) if inserted else 0, pd.DataFrame(columns=ISSUE_COLUMNS)
    ambiguous.insert(0, "method", key.name)
    ambiguous.insert(0, "kind", "ambiguous")
    ambiguous.insert(0, "entity", entity)
    ambiguous["detail"] = [
        f"{entity} {key.name} {_shown_key(kv)!r} is shared by CRM {some_ids(c)} and "
        f"Unleashed {some_ids(e)}; not linked: make the key unique on each side"
        for kv, c, e in zip(
            ambiguous["key_value"], ambiguous["crm_ids"], ambiguous["erp_ids"], strict=True
        )
    ]
    return int(inserted[0]) if inserted else 0, ambiguous[ISSUE_COLUMNS]


def _any_linked(con: duckdb.DuckDBPyConnection, entity: str, amb: pd.DataFrame) -> bool:
    """Whether a record of an ambiguous key (`amb`: rows with `crm_ids` and `erp_ids`) is
    linked. One query for all keys: the link table is read for these records only (a semi-join
    built on them), not hashed whole per key (0.5 s a key at 3M links)."""
    if amb.empty:
        return False
    table = LINK_TABLES[entity]
    crm_ids = sorted({str(i) for ids in amb["crm_ids"] for i in ids})
    erp_ids = sorted({str(i) for ids in amb["erp_ids"] for i in ids})
    (n,) = con.execute(
        f"""SELECT count(*) FROM {table}
            WHERE crm_id IN (SELECT unnest(?::VARCHAR[]))
               OR erp_id IN (SELECT unnest(?::VARCHAR[]))""",
        [crm_ids, erp_ids],
    ).fetchone()
    return n > 0


def _rules_digest(mapping: EntityMapping) -> str:
    used = {"crm", "erp", "match"}
    rules = json.dumps(mapping.model_dump(mode="json", include=used), sort_keys=True)
    return hashlib.sha256(rules.encode()).hexdigest()[:16]


def _pass_markers(
    con: duckdb.DuckDBPyConnection, mappings: Mapping[str, EntityMapping]
) -> dict[str, str]:
    """What each entity's pass depends on: the version of its inputs
    (`derived.link_inputs_version`) and its matching rules (tables, keys and their order). A
    contact pass also depends on the company links, which only the company pass writes: its
    marker includes the company marker, so it runs whenever the company pass does."""
    company = f"{derived.link_inputs_version(con, 'company')}:{_rules_digest(mappings['company'])}"
    contact = (
        f"{derived.link_inputs_version(con, 'contact')}:{_rules_digest(mappings['contact'])}"
        f"|{company}"
    )
    return {"company": company, "contact": contact}


def _count_kept(con: duckdb.DuckDBPyConnection, mapping: EntityMapping, result: LinkResult) -> None:
    """The entity's links now (kept), and no new ones yet."""
    entity = mapping.entity
    (kept,) = con.execute(f"SELECT count(*) FROM {LINK_TABLES[entity]}").fetchone()
    result.kept[entity] = int(kept)
    result.linked[entity] = {k.name: 0 for k in mapping.match.keys}


def _unchanged(
    con: duckdb.DuckDBPyConnection, mapping: EntityMapping, result: LinkResult
) -> pd.DataFrame:
    """An entity's pass over unchanged inputs, without comparing the tables: its links as they
    are, nothing new linked or unlinked; returns its ambiguous keys, still reported."""
    entity = mapping.entity
    _count_kept(con, mapping, result)
    result.skipped_entities.append(entity)
    # Unlinking is reported by the pass that did it; ambiguity stays until the data changes.
    con.execute("DELETE FROM link_issues WHERE entity = ? AND kind <> 'ambiguous'", [entity])
    return con.execute(
        f"""SELECT {", ".join(ISSUE_COLUMNS)} FROM link_issues WHERE entity = ?
            ORDER BY method, key_value""",
        [entity],
    ).df()


def update_links(
    con: duckdb.DuckDBPyConnection, mappings: Mapping[str, EntityMapping]
) -> LinkResult:
    """Keep valid links, drop links to inactive or missing records, add new unambiguous ones.

    Companies are linked before contacts (contacts pair only within linked companies). When no
    record an entity's pass reads has changed status or parent, and no unlinked one its match
    key, since that entity's last pass (and its rules are the same), its pass would change
    nothing, and its tables are not compared (derived.py). A contact pass runs whenever the
    company pass does (it reads the company links)."""
    schema.ensure(con)
    derived.refresh(con, mappings)  # the match keys are read from derived columns
    markers = _pass_markers(con, mappings)
    done = dict(
        con.execute("SELECT name, value FROM link_state WHERE name LIKE 'last_pass:%'").fetchall()
    )
    result = LinkResult()
    unlinked, ambiguous = [], []
    for entity in ("company", "contact"):
        mapping = mappings[entity]
        if done.get(f"last_pass:{entity}") == markers[entity]:
            ambiguous.append(_unchanged(con, mapping, result))
            continue
        gone, amb = _entity_pass(con, mapping, result)
        unlinked.append(gone)
        ambiguous.append(amb)
        issues = pd.concat([gone, amb], ignore_index=True)
        con.execute("DELETE FROM link_issues WHERE entity = ?", [entity])
        if not issues.empty:
            con.execute(
                """INSERT INTO link_issues
                   SELECT entity, kind, method, key_value, crm_ids, erp_ids, detail,
                          now()::TIMESTAMP
                   FROM issues"""
            )
        # This pass's own writes (new links) do not change the rows matching reads.
        con.execute(
            """INSERT INTO link_state VALUES (?, ?)
               ON CONFLICT (name) DO UPDATE SET value = excluded.value""",
            [f"last_pass:{entity}", markers[entity]],
        )
    con.execute("DELETE FROM link_state WHERE name = 'last_pass'")  # before per-entity markers
    result.unlinked = _concat(unlinked)
    result.ambiguous = _concat(ambiguous)
    return result


def _entity_pass(
    con: duckdb.DuckDBPyConnection, mapping: EntityMapping, result: LinkResult
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One entity's pass over the tables: unlink what is no longer valid, then link by each
    rule in order, in rounds. Returns the unlinked and the ambiguous issues."""
    entity = mapping.entity
    gone = _unlink(con, mapping)
    _count_kept(con, mapping, result)
    pooled = _pools(con, mapping, result.kept[entity])
    while True:
        found, round_linked = [], 0
        for key in mapping.match.keys:
            n, amb = _link_by_key(con, mapping, key, pooled)
            result.linked[entity][key.name] += n
            round_linked += n
            found.append(amb)
        amb = pd.concat(found, ignore_index=True)
        # A record of a key found ambiguous was linked by a later rule of this round: the key
        # may now be held by one unlinked record on each side, which another round links. The
        # pass ends when a round links none of them (each further round needs a new link, so it
        # ends), so a pass over the same records would link nothing more, and every key it
        # reports has unlinked records on both sides.
        if not round_linked or not _any_linked(con, entity, amb):
            break
    for side in pooled:
        con.execute(f"DROP TABLE _link_pool_{side}")
    return gone, amb


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=ISSUE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[ISSUE_COLUMNS]


# Verification and reporting -------------------------------------------------------------

ONE_TO_ONE_SQL = """
    SELECT 'company' AS entity, 'crm' AS side, crm_id AS id, count(*) AS links
    FROM company_links GROUP BY crm_id HAVING count(*) > 1
    UNION ALL
    SELECT 'company', 'erp', erp_id, count(*) FROM company_links GROUP BY erp_id HAVING count(*) > 1
    UNION ALL
    SELECT 'contact', 'crm', crm_id, count(*) FROM contact_links GROUP BY crm_id HAVING count(*) > 1
    UNION ALL
    SELECT 'contact', 'erp', erp_id, count(*) FROM contact_links GROUP BY erp_id HAVING count(*) > 1
    ORDER BY entity, side, id
"""


def one_to_one_violations(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Records linked more than once (entity, side, id, links); empty when links are one-to-one."""
    schema.ensure(con)
    return con.execute(ONE_TO_ONE_SQL).df()


def link_metadata(result: LinkResult) -> dict[str, Any]:
    """Plain values (ints, text) describing a pass, for run metadata."""
    why = (
        "no record's status or parent, and no unlinked record's match key, changed since "
        "the last pass"
    )
    ran = [e for e in LINK_TABLES if e not in result.skipped_entities]
    if not ran:
        described = f"skipped: {why}"
    elif result.skipped_entities:
        plural = {"company": "companies", "contact": "contacts"}
        described = (
            f"full for {', '.join(plural[e] for e in ran)}; skipped for "
            f"{', '.join(plural[e] for e in result.skipped_entities)}: {why}"
        )
    else:
        described = "full"
    meta: dict[str, Any] = {"pass": described}
    for entity in ("company", "contact"):
        meta[f"{entity}: links kept"] = result.kept.get(entity, 0)
        for method, n in result.linked.get(entity, {}).items():
            meta[f"{entity}: linked by {method}"] = n
    meta["unlinked"] = len(result.unlinked)
    meta["ambiguous"] = len(result.ambiguous)
    issues = pd.concat([result.unlinked, result.ambiguous], ignore_index=True)
    if not issues.empty:
        meta["issues"] = "\n".join(f"- {d}" for d in issues["detail"].head(20))
    return meta
