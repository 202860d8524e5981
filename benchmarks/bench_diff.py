"""Benchmark the three-way diff at 100k/300k and 1M/3M companies/contacts.

For each size: build the raw snapshot tables as the product holds them (sync_pipeline.schema:
id PRIMARY KEY; derived match-key columns filled by `derived.refresh`, the product's code
path), links and the one-row-per-record baseline, as a cycle that agreed on everything leaves
them (nothing pending), and a log of 2 recorded conflicts per company from earlier cycles.
Then edit about 1% of the mapped field values on each side (some on both sides = conflicts, some
invalid websites, some formatting-only edits, some new Unleashed contacts and customers) the way
an extract's upsert changes rows (new data, derived columns marked stale).

Each of 3 runs is one cycle on a fresh copy of that database, each step in its own process so
its peak RSS is its own: `derived.refresh` (what the extract assets run after their upserts: the
derived columns of the ~1% changed rows, which also puts them on the planner's pending set), the
bare DuckDB join of the tables a plan compares (links ⋈ crm ⋈ unleashed ⋈ baseline), then
`plan_changes`.
Then the push at this size: on the world as it was before the edits, a linked CRM contact's
phone is edited (three contacts, one after the other), then a linked contact's email (a match
key: three more), and the DuckDB steps of a push run are timed: the derived refresh, the link
step and the plan. Last, a link pass that finds 200 ambiguous emails (new contacts sharing
them), and a first sync's pass (every link removed), timed.
Medians are reported, with process CPU time (user+sys) next to wall time because the machine may
be shared; the load average is printed per run.

    python benchmarks/bench_diff.py                 # both sizes
    python benchmarks/bench_diff.py --sizes 100000  # one size (companies; contacts = 3x)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_SECONDS = 5.0
TARGET_RSS_MB = 2560
TARGET_RATIO = 2.0
MEMORY_LIMIT = "1536MB"  # DuckDB buffer pool cap for the planner process
THREADS = 2
RUNS = 3
AMBIGUOUS = 200  # ambiguous emails in the push world's last link pass


def _guid(expr: str) -> str:
    """A deterministic GUID-shaped string from an integer expression (md5 in SQL)."""
    h = f"md5(({expr})::VARCHAR)"
    return (
        f"substr({h},1,8)||'-'||substr({h},9,4)||'-'||substr({h},13,4)||'-'"
        f"||substr({h},17,4)||'-'||substr({h},21,12)"
    )


def _phone(expr: str) -> str:
    d = f"lpad((({expr}) % 100000000)::VARCHAR, 8, '0')"
    return f"'020 ' || substr({d},1,4) || ' ' || substr({d},5,4)"


def _intl(expr: str) -> str:
    d = f"lpad((({expr}) % 100000000)::VARCHAR, 8, '0')"
    return f"'+44 20 ' || substr({d},1,4) || ' ' || substr({d},5,4)"


def generate(db: str, n: int, settled: str | None = None, every: int = 100) -> dict:
    """Build the tables for n companies / 3n contacts as the product holds them after a cycle
    that agreed on everything (copied to `settled` when given), then apply the edits the way an
    extract would (rows replaced, derived columns marked stale). Returns counts of what was
    edited and timings."""
    import duckdb

    from sync_pipeline import derived, links, schema
    from sync_pipeline.mapping import load_mappings
    from sync_pipeline.mapping.projection import values_list_expr

    mappings = load_mappings(ROOT / "mappings")
    con = duckdb.connect(db)
    con.execute(f"SET memory_limit='{MEMORY_LIMIT}'")
    con.execute("SET preserve_insertion_order=false")
    t0 = time.perf_counter()
    schema.ensure(con)  # the product's tables: raw snapshots with id PRIMARY KEY, links, baseline
    cols = "id, modified, active, data, extracted_at"
    pcols = "id, parent_id, modified, active, data, extracted_at"
    ext = "TIMESTAMP '2026-01-01 00:10'"
    ts = "TIMESTAMP '2026-01-01' + to_seconds(i % 86400)"
    con.execute(
        f"""INSERT INTO crm_users ({cols}) SELECT 'R' || i, TIMESTAMP '2026-01-01', true,
             json_object('UserCode', 'R' || i, 'UserName', 'User ' || i,
                         'EmailAddress', 'rep' || i || '@example.com', 'Obsolete', 0), {ext}
           FROM range(20) t(i)"""
    )
    con.execute(
        f"""INSERT INTO unleashed_salespersons ({cols}) SELECT {_guid("-i - 1")},
             TIMESTAMP '2026-01-01', true, json_object('Guid', {_guid("-i - 1")},
             'FullName', 'Rep ' || i, 'Email', 'Rep' || i || '@Example.com', 'Obsolete', false),
             {ext} FROM range(20) t(i)"""
    )
    con.execute(
        f"""INSERT INTO crm_companies ({cols}) SELECT i::VARCHAR, {ts}, true, json_object(
              'DivisionId', i, 'CompanyId', i, 'Name', 'Company ' || i,
              'PhoneNumber', CASE WHEN i % 2 = 0 THEN {_intl("i")} ELSE {_phone("i")} END,
              'Website', 'c' || i || '.example.com/', 'AccountManager', 'R' || (i % 20),
              'AccountManagerUser', json_object('UserCode', 'R' || (i % 20),
                  'EmailAddress', 'rep' || (i % 20) || '@example.com'),
              'SalesLedgerId', 'SL' || i, 'SalesLedger', json_object('CustomerCode', 'C' || i),
              'DivisionXtra', json_object('StandardTextField1', NULL),
              'StatusFlag', 'A', 'LastUpdatedTimestamp', '2026-01-01T00:00:00.000000Z'),
              {ext} FROM range({n}) t(i)"""
    )
    con.execute(
        f"""INSERT INTO unleashed_customers ({cols}) SELECT {_guid("i")}, {ts}, true, json_object(
              'Guid', {_guid("i")}, 'CustomerCode', 'C' || i, 'CustomerName', 'Company ' || i,
              'PhoneNumber', {_phone("i")}, 'Website', 'https://www.c' || i || '.example.com',
              'Obsolete', false, 'Currency', json_object('CurrencyCode', 'GBP'),
              'SalesPerson', json_object('Guid', {_guid("-(i % 20) - 1")},
                  'FullName', 'Rep ' || (i % 20), 'Email', 'Rep' || (i % 20) || '@Example.com')),
              {ext} FROM range({n}) t(i)"""
    )
    con.execute(
        f"""INSERT INTO crm_contacts ({pcols}) SELECT j::VARCHAR, (j // 3)::VARCHAR,
              {ts.replace("i", "j")}, true, json_object('ContactId', j, 'DivisionId', j // 3,
              'Title', '', 'Forename', 'First' || j, 'Surname', 'Last' || j,
              'Email', 'Person' || j || '@Example.com', 'PhoneNumber', {_phone("j + 7")},
              'MobilePhoneNumber', '07700 ' || lpad((j % 1000000)::VARCHAR, 6, '0'), 'Fax', '',
              'ContactXtra', json_object('StandardTextField1', NULL), 'StatusFlag', 'A'), {ext}
            FROM range({3 * n}) t(j)"""
    )
    con.execute(
        f"""INSERT INTO unleashed_contacts ({pcols}) SELECT {_guid("j + 100000000")},
              {_guid("j // 3")}, {ts.replace("i", "j")}, true,
              json_object('Guid', {_guid("j + 100000000")},
              'FirstName', 'First' || j, 'LastName', 'Last' || j,
              'EmailAddress', 'person' || j || '@example.com', 'PhoneNumber', {_intl("j + 7")},
              'MobilePhone', '+44 7700 ' || lpad((j % 1000000)::VARCHAR, 6, '0'),
              'FaxNumber', '', 'OfficePhone', ''), {ext}
            FROM range({3 * n}) t(j)"""
    )
    con.execute(
        f"""INSERT INTO company_links SELECT i::VARCHAR, {_guid("i")}, 'account_code',
            TIMESTAMP '2026-01-01' FROM range({n}) t(i)"""
    )
    con.execute(
        f"""INSERT INTO contact_links SELECT j::VARCHAR, {_guid("j + 100000000")},
            (j // 3)::VARCHAR, {_guid("j // 3")}, 'email', TIMESTAMP '2026-01-01'
            FROM range({3 * n}) t(j)"""
    )
    gen_raw = time.perf_counter() - t0
    # The first extract's refresh: key columns of every row (product code path).
    first = derived.refresh(con, mappings)
    # Baseline: the values both sides held when they last agreed (before the edits), one row
    # per record, one JSON parse per record.
    t1 = time.perf_counter()
    for entity, m in mappings.items():
        lt = links.LINK_TABLES[entity]
        crm = values_list_expr([s.crm for s in m.fields.values()], "c")
        erp = values_list_expr([s.erp for s in m.fields.values()], "e")
        obj = ", ".join(f"'{f}', {{v}}[{i + 1}]" for i, f in enumerate(m.fields))
        con.execute(
            f"""INSERT INTO sync_baseline
                WITH v AS (SELECT l.erp_id, {crm} AS cv, {erp} AS ev
                           FROM {lt} l JOIN {m.crm.table} c ON c.id = l.crm_id
                           JOIN {m.erp.table} e ON e.id = l.erp_id)
                SELECT '{entity}', v.erp_id, json_object({obj.format(v="v.cv")}),
                       json_object({obj.format(v="v.ev")}), TIMESTAMP '2026-01-01'
                FROM v"""
        )
    # The conflicts recorded by earlier cycles: the planner looks up the last `newest` decision
    # of every candidate field in this log (a year of two conflicts a minute is about 1M rows).
    con.execute(
        f"""INSERT INTO conflicts
            SELECT TIMESTAMP '2025-01-01' + to_seconds(i * 15), 'earlier-run',
                   CASE WHEN i % 4 = 0 THEN 'company' ELSE 'contact' END,
                   (i % {n})::VARCHAR,
                   CASE WHEN i % 4 = 0 THEN {_guid(f"i % {n}")}
                        ELSE {_guid(f"i % {3 * n} + 100000000")} END,
                   CASE WHEN i % 4 = 0 THEN 'phone' ELSE 'email' END,
                   'crm ' || i, 'erp ' || i, 'agreed ' || i,
                   CASE WHEN i % 2 = 0 THEN 'crm' ELSE 'erp' END, 'newest', NULL, NULL,
                   'history-' || i
            FROM range({2 * n}) t(i)"""
    )
    schema.fill_decisions_from_log(con)  # the planner reads each field's last decision
    # That cycle looked at every record and left nothing pending.
    con.execute("DELETE FROM sync_pending")
    con.execute("INSERT INTO sync_pending_state SELECT unnest(?::VARCHAR[])", [list(mappings)])
    gen_base = time.perf_counter() - t1
    con.execute("CHECKPOINT")
    if settled:
        con.close()
        shutil.copyfile(db, settled)
        con = duckdb.connect(db)
        con.execute(f"SET memory_limit='{MEMORY_LIMIT}'")
        con.execute("SET preserve_insertion_order=false")
    edits = _edit(con, mappings, n, every)
    con.execute("CHECKPOINT")
    con.close()
    edits["generate_seconds"] = round(time.perf_counter() - t0, 1)
    edits["generate_raw_seconds"] = round(gen_raw, 1)
    edits["first_refresh_seconds"] = round(first.seconds, 1)
    edits["first_refresh_rows"] = first.total
    edits["generate_baseline_seconds"] = round(gen_base, 1)
    return edits


# What store.upsert_snapshot does to a row it replaces: its derived columns are stale.
STALE = "_derived_mod = NULL"


def _edit(con, mappings, n: int, every: int = 100) -> dict:
    """About 1 in `every` field values (1%) edited on each side, plus conflicts and specials.

    Rows are changed the way an extract's upsert changes them (new data, derived columns marked
    stale); `derived.refresh` then runs as part of each measured cycle."""
    from sync_pipeline.links import LINK_TABLES

    counts = {}
    for entity, m in mappings.items():
        lt = LINK_TABLES[entity]
        fields = list(m.fields.items())
        for side, table, key in (("crm", m.crm.table, "crm_id"), ("erp", m.erp.table, "erp_id")):
            # Each field of each record is edited with probability 1% on this side (a hash of
            # record, field and side); a field with hash % 1000 == 7 is edited on both sides
            # (a conflict). So about 1% of all field values change on each side, and a record
            # may have several fields edited.
            salt = 1 if side == "crm" else 2
            patched = "t.data"
            any_chosen, counted = [], []
            for pos, (name, spec) in enumerate(fields):
                path = getattr(spec, side)
                if name == "account_manager":
                    new = (
                        "json_object('UserCode', 'R3', 'EmailAddress', 'rep3@example.com')"
                        if side == "crm"
                        else "json_object('Guid', 'x', 'FullName', 'Rep 4', "
                        "'Email', 'Rep4@Example.com')"
                    )
                    top = path.split(".")[0]
                    patch = f"json_object('{top}', {new})"
                elif name == "website":
                    patch = f"json_object('{path}', 'https://new-' || {key} || '.example.org')"
                elif spec.normaliser == "phone":
                    patch = f"json_object('{path}', {_phone(f'hash({key}, {pos}) % 99991')})"
                elif spec.normaliser == "email":
                    patch = f"json_object('{path}', 'new{pos}.' || {key} || '@example.net')"
                else:
                    patch = f"json_object('{path}', 'Renamed {side} ' || {key})"
                chosen = (
                    f"(hash(l.erp_id, {pos}, {salt}) % {every} = 0 "
                    f"OR hash(l.erp_id, {pos}) % {10 * every} = 7)"
                )
                patched = (
                    f"json_merge_patch({patched}, CASE WHEN {chosen} THEN {patch} ELSE '{{}}' END)"
                )
                any_chosen.append(chosen)
                counted.append(f"count(*) FILTER (WHERE {chosen})")
            con.execute(
                f"""UPDATE {table} t SET data = {patched},
                        modified = t.modified + INTERVAL ({salt}) HOUR, {STALE}
                    FROM {lt} l WHERE t.id = l.{key} AND ({" OR ".join(any_chosen)})"""
            )
            row = con.execute(
                f"SELECT {', '.join(counted)}, count(*) FILTER (WHERE {' OR '.join(any_chosen)}) "
                f"FROM {lt} l"
            ).fetchone()
            counts[f"{entity}_{side}_fields_edited"] = int(sum(row[:-1]))
            counts[f"{entity}_{side}_records_edited"] = int(row[-1])
        # 0.05% invalid websites typed in the CRM (rejected), 0.05% formatting-only phone edits.
        if entity == "company":
            con.execute(
                f"""UPDATE crm_companies SET data = json_merge_patch(data,
                     json_object('Website', 'bad site ' || id)), {STALE}
                   WHERE hash(id, 'w') % 2000 = 0"""
            )
        phone_path = m.fields["phone"].crm
        con.execute(
            f"""UPDATE {m.crm.table} SET data = json_merge_patch(data, json_object('{phone_path}',
                  replace(data->>'$.{phone_path}', ' ', '-'))), {STALE}
                WHERE hash(id, 'f') % 2000 = 0"""
        )
    # New Unleashed records (0.1%): contacts under linked customers, and new customers.
    k = max(1, n // 1000)
    con.execute(
        f"""INSERT INTO unleashed_contacts (id, parent_id, modified, active, data)
              SELECT {_guid("j + 900000000")}, {_guid("j * 7")},
              TIMESTAMP '2026-01-02', true, json_object('Guid', {_guid("j + 900000000")},
              'FirstName', 'Newbie' || j, 'LastName', 'Fresh', 'EmailAddress',
              'newbie' || j || '@example.com', 'PhoneNumber', '', 'MobilePhone', '',
              'FaxNumber', '') FROM range({3 * k}) t(j)"""
    )
    con.execute(
        f"""INSERT INTO unleashed_customers (id, modified, active, data)
              SELECT {_guid("i + 800000000")},
              TIMESTAMP '2026-01-02', true, json_object('Guid', {_guid("i + 800000000")},
              'CustomerCode', 'NEW' || i, 'CustomerName', 'New customer ' || i,
              'PhoneNumber', '', 'Website', '', 'Obsolete', false) FROM range({k}) t(i)"""
    )
    counts["new_erp_contacts"] = 3 * k
    counts["new_erp_customers"] = k
    return counts


class PeakRss:
    """Samples this process's RSS every 20 ms."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


JOIN_DESCRIPTION = (
    "per entity: links JOIN crm ON id JOIN unleashed ON id LEFT JOIN sync_baseline "
    "ON (entity, erp_id), both sides active, reading ids, parent ids, modified and active "
    "(no values: a join that also read them would be slower, and the ratio smaller)"
)


VALUES_JOIN_DESCRIPTION = (
    "the same join also reading the values a plan compares: both snapshots' JSON `data` and "
    "the baseline's two JSON columns (not parsed)"
)


def bare_join_sql(mappings, *, values: bool = False) -> list[str]:
    """The bare DuckDB join of the tables a plan compares (links, both snapshots, baseline);
    with `values`, also reading the columns that hold the compared values."""
    from sync_pipeline.links import LINK_TABLES

    out = []
    for entity, m in mappings.items():
        cp = "c.parent_id" if m.crm.parent_key else "NULL"
        ep = "e.parent_id" if m.erp.parent_resource else "NULL"
        extra = ", c.data, e.data, b.crm_values, b.erp_values" if values else ""
        out.append(
            f"""SELECT count(*), sum(hash(l.crm_id, {cp}, c.modified, {ep}, e.modified,
                                          b.agreed_at{extra}))
                FROM {LINK_TABLES[entity]} l
                JOIN {m.crm.table} c ON c.id = l.crm_id
                JOIN {m.erp.table} e ON e.id = l.erp_id
                LEFT JOIN sync_baseline b ON b.entity = '{entity}' AND b.erp_id = l.erp_id
                WHERE c.active AND e.active"""
        )
    return out


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(db: str, what: str) -> dict:
    """Run once in this (fresh) process: 'refresh' (the derived columns of the rows the
    extract changed), 'plan' or 'join'."""
    import duckdb

    from sync_pipeline import derived
    from sync_pipeline.diff import plan_changes
    from sync_pipeline.mapping import load_mappings

    mappings = load_mappings(ROOT / "mappings")
    con = duckdb.connect(db)
    con.execute(f"SET memory_limit='{MEMORY_LIMIT}'")
    con.execute(f"SET threads={THREADS}")
    ops, conflicts, stages = {}, 0, {}
    with PeakRss() as rss:
        cpu0, t0 = _cpu(), time.perf_counter()
        if what == "plan":
            plan = plan_changes(con, mappings, timings=stages)
            rows = len(plan)
            ops = {k: int(v) for k, v in plan["op"].value_counts().items()}
            conflicts = int(plan["conflict"].sum())
        elif what == "refresh":
            rows = derived.refresh(con, mappings).total
        else:
            rows = 0
            for sql in bare_join_sql(mappings, values=what == "join_values"):
                rows += con.execute(sql).fetchall()[0][0]
        seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    con.close()
    return {
        "seconds": seconds,
        "cpu": cpu,
        "rss_mb": rss.peak / 2**20,
        "rows": rows,
        "ops": ops,
        "conflicts": conflicts,
        "stages": stages,
    }


def measure_push(db: str) -> dict:
    """The DuckDB work of a push at this size, on the settled world: one CRM contact's phone
    edited and written by the extract's upsert, then the steps a push run takes before its API
    call (the extract's derived refresh, the link step, the plan). The link step's first pass
    (no pass recorded yet) is timed separately: it compares the whole tables."""
    from datetime import timedelta

    import duckdb

    from sync_pipeline import derived, links, store
    from sync_pipeline.diff import plan_changes
    from sync_pipeline.mapping import load_mappings

    mappings = load_mappings(ROOT / "mappings")
    con = duckdb.connect(db)
    con.execute(f"SET memory_limit='{MEMORY_LIMIT}'")
    con.execute(f"SET threads={THREADS}")
    t0 = time.perf_counter()
    links.update_links(con, mappings)
    full_links = time.perf_counter() - t0
    plan_changes(con, mappings)  # the settled world: nothing pending
    out: dict = {"full_links_s": full_links, "steps": []}
    for i, field in enumerate(["PhoneNumber"] * 3 + ["Email"] * 3):
        contact_id, modified, raw = con.execute(
            "SELECT id, modified, data FROM crm_contacts WHERE id = ?", [str(1000 + i)]
        ).fetchone()
        data = json.loads(raw)
        data[field] = f"020 7946 {i:04d}" if field == "PhoneNumber" else f"moved{i}@example.org"
        row = store.SnapshotRow(
            id=contact_id, parent_id=str(data["DivisionId"]), active=True, data=data,
            modified=modified + timedelta(days=1),
        )  # fmt: skip
        store.upsert_snapshot(con, "crm_contacts", [row])
        t0 = time.perf_counter()
        derived.refresh(con, mappings, tables=["crm_contacts"])
        t1 = time.perf_counter()
        linked = links.update_links(con, mappings)
        t2 = time.perf_counter()
        plan = plan_changes(con, mappings)
        t3 = time.perf_counter()
        out["steps"].append(
            {
                "field": "phone" if field == "PhoneNumber" else "email",
                "refresh_s": t1 - t0,
                "links_s": t2 - t1,
                "links_skipped": linked.skipped,
                "plan_s": t3 - t2,
                "planned": [f"{r.op} {r.field} {r.new_value}" for r in plan.itertuples()],
            }
        )
    # Then a pass that finds ambiguous keys: under each of the first AMBIGUOUS linked companies,
    # two new CRM contacts and a new Unleashed contact share an email (each key is reported).
    for k in (0, 1):
        con.execute(
            f"""INSERT INTO crm_contacts (id, parent_id, modified, active, data, extracted_at)
                SELECT 'dup{k}-' || i, i::VARCHAR, TIMESTAMP '2026-02-01', true,
                  json_object('ContactId', 0, 'DivisionId', i, 'Forename', 'Dup{k}',
                              'Surname', 'X' || i, 'Email', 'shared' || i || '@example.com',
                              'ContactXtra', json_object('StandardTextField1', NULL)),
                  TIMESTAMP '2026-02-01'
                FROM range({AMBIGUOUS}) t(i)"""
        )
    con.execute(
        f"""INSERT INTO unleashed_contacts (id, parent_id, modified, active, data, extracted_at)
            SELECT 'dup-' || i, {_guid("i")}, TIMESTAMP '2026-02-01', true,
              json_object('Guid', 'dup-' || i, 'FirstName', 'Other', 'LastName', 'Y' || i,
                          'EmailAddress', 'shared' || i || '@example.com'),
              TIMESTAMP '2026-02-01' FROM range({AMBIGUOUS}) t(i)"""
    )
    derived.refresh(con, mappings)
    t0 = time.perf_counter()
    result = links.update_links(con, mappings)
    out["ambiguous_links_s"] = time.perf_counter() - t0
    out["ambiguous_reported"] = len(result.ambiguous)
    # And a first sync's pass: nothing linked yet, every record unlinked.
    con.execute("DELETE FROM company_links")
    con.execute("DELETE FROM contact_links")
    con.execute("DELETE FROM link_state")
    t0 = time.perf_counter()
    result = links.update_links(con, mappings)
    out["first_sync_links_s"] = time.perf_counter() - t0
    out["first_sync_linked"] = sum(result.total_linked(e) for e in ("company", "contact"))
    con.close()
    return out


def _child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run_size(n: int, workdir: Path) -> dict:
    base = workdir / f"bench_{n}.duckdb"
    settled = workdir / f"settled_{n}.duckdb"
    base.unlink(missing_ok=True)  # left by an interrupted run: generation starts from nothing
    print(f"\n== {n:,} companies / {3 * n:,} contacts: generating … (load {_load()})", flush=True)
    info = _child("--generate", str(base), str(n), "--settled", str(settled))
    print(
        f"   generated in {info['generate_seconds']} s (raw {info['generate_raw_seconds']} s, "
        f"first derived refresh {info['first_refresh_seconds']} s for "
        f"{info['first_refresh_rows']:,} rows, baseline {info['generate_baseline_seconds']} s); "
        "edits: "
        + json.dumps({k: v for k, v in info.items() if not k.startswith(("generate", "first"))}),
        flush=True,
    )
    plans, joins, vjoins, refreshes, loads = [], [], [], [], []
    for i in range(RUNS):
        # One sync cycle on a fresh copy: the extract's refresh of the derived columns of the
        # rows it changed, then the plan. The bare join reads the refreshed tables.
        copy = workdir / f"run_{n}.duckdb"
        shutil.copyfile(base, copy)
        loads.append(_load())
        refreshes.append(_child("--measure", str(copy), "refresh"))
        joins.append(_child("--measure", str(copy), "join"))
        vjoins.append(_child("--measure", str(copy), "join_values"))
        plans.append(_child("--measure", str(copy), "plan"))
        copy.unlink()
        print(
            f"   run {i + 1} (load {loads[-1]}): refresh {refreshes[-1]['seconds']:.2f} s "
            f"({refreshes[-1]['rows']:,} rows); plan {plans[-1]['seconds']:.2f} s "
            f"(cpu {plans[-1]['cpu']:.2f} s), {plans[-1]['rss_mb']:.0f} MB, "
            f"{plans[-1]['rows']:,} rows; bare join {joins[-1]['seconds']:.2f} s "
            f"(cpu {joins[-1]['cpu']:.2f} s), with values {vjoins[-1]['seconds']:.2f} s",
            flush=True,
        )
    base.unlink()
    push = _child("--push", str(settled))
    settled.unlink()
    print(f"   push (settled world): link step's first pass {push['full_links_s']:.2f} s")
    for what in ("phone", "email"):
        steps = [x for x in push["steps"] if x["field"] == what]
        print(
            f"   then per CRM contact {what} edit: refresh "
            + ", ".join(f"{x['refresh_s']:.2f}" for x in steps)
            + " s; links "
            + ", ".join(
                f"{x['links_s']:.2f}{' (skipped)' if x['links_skipped'] else ''}" for x in steps
            )
            + " s; plan "
            + ", ".join(f"{x['plan_s']:.2f}" for x in steps)
            + f" s; last plan (nothing is applied in between): {steps[-1]['planned']}",
            flush=True,
        )
    print(
        f"   then a link pass finding {push['ambiguous_reported']} ambiguous emails (new "
        f"contacts sharing them): {push['ambiguous_links_s']:.2f} s; a first sync's pass "
        f"(no links yet): {push['first_sync_links_s']:.2f} s, "
        f"{push['first_sync_linked']:,} pairs linked",
        flush=True,
    )
    plan_s = statistics.median(p["seconds"] for p in plans)
    join_s = statistics.median(j["seconds"] for j in joins)
    return {
        "n": n,
        "plan_s": plan_s,
        "plan_cpu": statistics.median(p["cpu"] for p in plans),
        "join_s": join_s,
        "join_cpu": statistics.median(j["cpu"] for j in joins),
        "ratio": plan_s / join_s,
        "vjoin_s": statistics.median(j["seconds"] for j in vjoins),
        "rss_mb": max(p["rss_mb"] for p in plans),
        "rows": plans[-1]["rows"],
        "ops": plans[-1]["ops"],
        "conflicts": plans[-1]["conflicts"],
        "refresh_s": statistics.median(r["seconds"] for r in refreshes),
        "refresh_rows": refreshes[-1]["rows"],
        "refresh_rss_mb": max(r["rss_mb"] for r in refreshes),
        "loads": loads,
        "push": push,
        "stages": {
            name: statistics.median(p["stages"].get(name, 0.0) for p in plans)
            for name in plans[-1]["stages"]
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--generate", nargs=2, metavar=("DB", "N"))
    parser.add_argument("--settled", default=None, help="with --generate: keep the pre-edit copy")
    parser.add_argument(
        "--edit-every",
        type=int,
        default=100,
        help="with --generate: edit 1 in this many field values per side (100 = the 1%% of the "
        "targets; 1000 = 0.1%%, a quieter day)",
    )
    parser.add_argument("--measure", nargs=2, metavar=("DB", "WHAT"))
    parser.add_argument("--push", metavar="DB")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.generate:
        db, n = args.generate[0], int(args.generate[1])
        print(json.dumps(generate(db, n, args.settled, args.edit_every)))
        return
    if args.push:
        print(json.dumps(measure_push(args.push)))
        return
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    # A --workdir given by the caller is kept (only the databases made here are removed, by
    # run_size); a temporary one is removed at the end.
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_diff_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = [run_size(n, workdir) for n in args.sizes]
    print(
        f"\nthree-way diff (plan_changes), median of {RUNS} runs; DuckDB memory_limit "
        f"{MEMORY_LIMIT}, threads {THREADS}; load average now {_load()}"
    )
    print(f"bare join = {JOIN_DESCRIPTION}")
    print(f"values join = {VALUES_JOIN_DESCRIPTION}")
    print(
        "refresh = derived.refresh after the extract's upserts (match-key columns of the changed "
        "rows, and the rows put on the planner's pending set); part of each cycle, paid in the "
        "extract assets, not in the plan"
    )
    header = (
        f"{'companies':>10} {'contacts':>10} {'plan s':>7} {'cpu s':>6} {'join s':>7} "
        f"{'cpu s':>6} {'ratio':>6} {'values join s':>13} {'ratio':>6} {'peak RSS MB':>11} "
        f"{'rows planned':>12} {'conflicts':>9} "
        f"{'refresh s':>9} {'refreshed':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['n']:>10,} {3 * r['n']:>10,} {r['plan_s']:>7.2f} {r['plan_cpu']:>6.2f} "
            f"{r['join_s']:>7.2f} {r['join_cpu']:>6.2f} {r['ratio']:>6.2f} {r['vjoin_s']:>13.2f} "
            f"{r['plan_s'] / r['vjoin_s']:>6.2f} {r['rss_mb']:>11.0f} "
            f"{r['rows']:>12,} {r['conflicts']:>9,} {r['refresh_s']:>9.2f} "
            f"{r['refresh_rows']:>9,}"
        )
    for r in results:
        print(f"ops at {r['n']:,}: {r['ops']}")
    for r in results:
        total = sum(r["stages"].values()) or 1.0
        print(f"plan stages at {r['n']:,} (median s of the runs, share of their sum):")
        for name, sec in sorted(r["stages"].items(), key=lambda kv: -kv[1]):
            if sec >= 0.005:
                print(f"  {name:<32} {sec:6.3f}  {100 * sec / total:3.0f}%")
    for r in results:
        for what in ("phone", "email"):
            steps = [x for x in r["push"]["steps"] if x["field"] == what]
            print(
                f"push at {r['n']:,}: one CRM contact {what} edit costs refresh "
                f"{statistics.median(x['refresh_s'] for x in steps):.2f} s + links "
                f"{statistics.median(x['links_s'] for x in steps):.2f} s + plan "
                f"{statistics.median(x['plan_s'] for x in steps):.2f} s of DuckDB work (medians "
                f"of {len(steps)})"
            )
        print(f"  (a link pass that compares the tables: {r['push']['full_links_s']:.2f} s)")
    big = max(results, key=lambda r: r["n"])
    print(f"\ntargets at {big['n']:,} / {3 * big['n']:,}:")
    for label, value, target, unit in (
        ("plan time", big["plan_s"], TARGET_SECONDS, "s"),
        ("peak memory", big["rss_mb"], TARGET_RSS_MB, "MB"),
        ("ratio to bare join", big["ratio"], TARGET_RATIO, "x"),
    ):
        verdict = "met" if value <= target else "NOT met"
        print(f"  {label:<20} {value:8.2f} {unit:<3} (target <= {target}) {verdict}")
    print(
        f"  (against the values join the ratio is {big['plan_s'] / big['vjoin_s']:.2f}; the "
        "target is judged against the narrower bare join above)"
    )
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
