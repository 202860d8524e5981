"""Load run: the initial sync of a large tenant (default 20k companies / 60k contacts) through the
local servers with the CRM's rate limit active, and figures for it.

How it works:

1. A dry run at the full size with the CRM limit raised (so nothing waits) counts the CRM requests
   the initial sync needs, and times everything else. From that it projects the wall time under
   the real limit (the client lets the first `limit` requests through, then one window per
   `limit` more).
2. If the projection fits `--real-budget-minutes`, the full size is run again under the real
   limit. Otherwise a smaller world, sized to need about `--real-windows` + 1 windows' worth of
   CRM requests, is run under the real limit instead, and the output says which figures were
   measured under which limit.

Each run is a child process with fresh local servers (another child) and a fresh DuckDB file. The
run executes `sync_cycle_job` in process (as `sync-devservers demo` does), then checks the result
independently of the product: after lifting the server's limit it reads both systems in full
through their APIs and compares every linked pair's mapped fields after normalisation, checks
the links against the seed world's truth, and counts lost and duplicated records. A second cycle
must plan nothing but the open rejections.

    python benchmarks/bench_load.py                                   # the real thing
    python benchmarks/bench_load.py --companies 2000 --crm-rate-limit 100000   # quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import ROOT, PeakRss, ServerProcess  # noqa: E402

RAISED_LIMIT = 1_000_000
GB = 1024**3
MB = 1024**2
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


# --------------------------------------------------------------------------------------------
# One run (in a child process, so its peak RSS is its own)
# --------------------------------------------------------------------------------------------
def _counting_resources(servers: ServerProcess, db: Path, settings_file: Path, crm_limit: int):
    """The product's resources, with every API client they hand out kept for its stats."""
    from sync_pipeline.defs.resources import (
        DEFAULT_MAPPINGS,
        CrmResource,
        SyncConfigResource,
        SyncDuckDB,
        UnleashedResource,
    )

    clients: list[Any] = []

    class CountedCrm(CrmResource):
        def get_client(self):  # noqa: ANN202
            client = super().get_client()
            clients.append(client)
            return client

    class CountedUnleashed(UnleashedResource):
        def get_client(self):  # noqa: ANN202
            client = super().get_client()
            clients.append(client)
            return client

    resources = {
        "crm": CountedCrm(base_url=servers.crm_url, token=servers.crm_token, rate_limit=crm_limit),
        "unleashed": CountedUnleashed(
            base_url=servers.unleashed_url, api_id=servers.unleashed_api_id,
            api_key=servers.unleashed_api_key,
        ),
        "duckdb": SyncDuckDB(database=str(db)),
        "sync_config": SyncConfigResource(
            settings_file=str(settings_file), mappings_dir=DEFAULT_MAPPINGS
        ),
    }  # fmt: skip
    return resources, clients


def _step_seconds(instance, run_id: str) -> dict[str, float]:
    """Seconds per step, from the run's event log."""
    import dagster as dg

    started: dict[str, float] = {}
    took: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not event.step_key:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            started[event.step_key] = entry.timestamp
        elif (
            event.event_type
            in (
                dg.DagsterEventType.STEP_SUCCESS,
                dg.DagsterEventType.STEP_FAILURE,
            )
            and event.step_key in started
        ):
            took[event.step_key] = entry.timestamp - started[event.step_key]
    return took


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    import dagster as dg

    from sync_pipeline import store
    from sync_pipeline.defs import build_defs
    from sync_pipeline.settings import Settings, save_settings

    logging.getLogger("dagster").setLevel(logging.WARNING)
    work = Path(args.workdir)
    db = work / "sync.duckdb"
    settings_file = work / "settings.yaml"
    save_settings(Settings(), settings_file)
    out: dict[str, Any] = {
        "companies_arg": args.companies,
        "contacts_per_company": args.contacts_per_company,
        "crm_rate_limit": args.crm_rate_limit,
        "crm_rate_window_s": args.crm_rate_window_s,
    }
    with ServerProcess(
        companies=args.companies,
        contacts_per_company=args.contacts_per_company,
        data_dir=work / "servers",
        crm_rate_limit=args.crm_rate_limit,
        crm_rate_window_s=args.crm_rate_window_s,
    ) as servers:
        out["world"] = servers.info["world"]
        truth = json.loads((work / "servers" / "world.json").read_text())
        resources, clients = _counting_resources(servers, db, settings_file, args.crm_rate_limit)
        defs = build_defs(resources)
        partition = datetime.now(UTC).strftime("%Y-%m-%d-%H:00")
        servers.reset_stats("crm")
        servers.reset_stats("unleashed")
        servers.reset_crm_rate_counts()
        with dg.DagsterInstance.ephemeral() as instance:
            with PeakRss() as own, PeakRss(servers.pid) as theirs:
                t0 = time.perf_counter()
                result = defs.resolve_job_def("sync_cycle_job").execute_in_process(
                    instance=instance, partition_key=partition, raise_on_error=False,
                    run_config=QUIET,
                )  # fmt: skip
                out["wall_s"] = time.perf_counter() - t0
            out["success"] = result.success
            out["failures"] = [
                f"{e.step_key}: {e.step_failure_data.error.message[:300]}"
                for e in result.all_events
                if e.is_step_failure and e.step_failure_data.error
            ]
            out["steps_s"] = _step_seconds(instance, result.run_id)
            out["peak_rss_bytes"] = own.peak
            out["servers_peak_rss_bytes"] = theirs.peak
            crm_stats, erp_stats = servers.stats("crm"), servers.stats("unleashed")
            out["requests"] = {
                "crm": crm_stats["total_requests"],
                "unleashed": erp_stats["total_requests"],
                "crm_by_endpoint": crm_stats["requests"],
                "unleashed_by_endpoint": erp_stats["requests"],
            }
            out["server_429"] = {
                "crm_rate_limited": servers.crm_rate()["throttled"],
                "crm_injected": crm_stats["injected"].get("429", 0),
                "unleashed_injected": erp_stats["injected"].get("429", 0),
            }
            statuses: Counter = Counter()
            for client in clients:
                statuses.update(
                    {f"{client.system} {k}": v for k, v in client.stats.statuses.items()}
                )
            out["client_statuses"] = dict(sorted(statuses.items()))
            with store.connect(db) as con:
                out["outbox"] = dict(
                    con.execute(
                        "SELECT op || ' ' || status, count(*) FROM outbox GROUP BY 1 ORDER BY 1"
                    ).fetchall()
                )
                out["audit_rows"] = con.execute("SELECT count(*) FROM audit_log").fetchone()[0]

            # ---- checking, with the server's limit lifted (not part of the measured run) ----
            httpx_put(f"{servers.crm_url}/_admin/ratelimit", {"limit": RAISED_LIMIT, "window_s": 1})
            check_resources, _ = _counting_resources(servers, db, settings_file, RAISED_LIMIT)
            check_defs = build_defs(check_resources)
            # Follow-up cycles until one plans nothing but rejections (at most three).
            out["follow_up"] = []
            for _ in range(3):
                t1 = time.perf_counter()
                again = check_defs.resolve_job_def("sync_cycle_job").execute_in_process(
                    instance=instance, partition_key=partition, raise_on_error=False,
                    run_config=QUIET,
                )  # fmt: skip
                with store.connect(db) as con:
                    plan = dict(
                        con.execute("SELECT op, count(*) FROM sync_plan GROUP BY 1").fetchall()
                    )
                    rejections = con.execute(
                        "SELECT count(*) FROM rejections WHERE resolved_at IS NULL"
                    ).fetchone()[0]
                out["follow_up"].append(
                    {
                        "seconds": time.perf_counter() - t1,
                        "success": again.success,
                        "plan": dict(sorted(plan.items())),
                        "open_rejections": rejections,
                    }
                )
                if not again.success or set(plan) <= {"reject"}:
                    break
            out["check"] = verify(servers, db, truth)
    return out


def httpx_put(url: str, body: dict[str, Any]) -> None:
    import httpx

    httpx.put(url, json=body, timeout=10).raise_for_status()


# --------------------------------------------------------------------------------------------
# Independent check: both systems read in full through their APIs
# --------------------------------------------------------------------------------------------
def _read_both(servers: ServerProcess) -> tuple[dict, dict]:
    from sync_pipeline.clients.crm import CrmClient
    from sync_pipeline.clients.unleashed import UnleashedClient

    with CrmClient(servers.crm_url, servers.crm_token, rate_limit=RAISED_LIMIT) as crm:
        divisions = crm.list(
            "Divisions",
            expand="AccountManagerUser($select=UserCode,EmailAddress),"
            "DivisionXtra($select=StandardTextField1)",
        ).items
        contacts = crm.list("Contacts", expand="ContactXtra($select=StandardTextField1)").items
        ledgers = crm.list("SalesLedgers").items
    with UnleashedClient(
        servers.unleashed_url, servers.unleashed_api_id, servers.unleashed_api_key
    ) as erp:
        customers = [c.to_wire() for c in erp.list_customers(include_all_contacts=True).items]
        for c in customers:
            if len(c.get("Contacts") or []) >= 100:
                c["Contacts"] = [x.to_wire() for x in erp.list_contacts(c["Guid"])]
    crm_side = {"divisions": divisions, "contacts": contacts, "ledgers": ledgers}
    return crm_side, {"customers": customers}


def _slot(record: dict, navigation: str) -> str | None:
    """The Unleashed Guid a CRM record keeps in its custom-field slot (mappings' `crm.link`)."""
    xtra = record.get(navigation)
    return xtra.get("StandardTextField1") if isinstance(xtra, dict) else None


def _value(record: dict | None, path: str) -> Any:
    cur: Any = record
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def verify(servers: ServerProcess, db: Path, truth: dict[str, Any]) -> dict[str, Any]:
    """Lost, duplicated and disagreeing records, read from the APIs (links from the product)."""
    from sync_pipeline import store
    from sync_pipeline.defs.resources import DEFAULT_MAPPINGS
    from sync_pipeline.mapping import load_mappings
    from sync_pipeline.mapping.normalise import normalise

    crm, erp = _read_both(servers)
    mappings = load_mappings(DEFAULT_MAPPINGS)
    with store.connect(db) as con:
        company_links = dict(con.execute("SELECT crm_id, erp_id FROM company_links").fetchall())
        contact_links = dict(con.execute("SELECT crm_id, erp_id FROM contact_links").fetchall())
        rejected = {
            (e, c, f)
            for e, c, f in con.execute(
                "SELECT entity, coalesce(crm_id, ''), field FROM rejections "
                "WHERE resolved_at IS NULL"
            ).fetchall()
        }
    divisions = {str(d["DivisionId"]): d for d in crm["divisions"]}
    crm_contacts = {str(c["ContactId"]): c for c in crm["contacts"]}
    customers = {c["Guid"]: c for c in erp["customers"]}
    erp_contacts = {str(k["Guid"]): k for c in erp["customers"] for k in (c.get("Contacts") or [])}
    out: dict[str, Any] = {
        "crm_divisions": len(divisions),
        "crm_contacts": len(crm_contacts),
        "unleashed_customers": len(customers),
        "unleashed_contacts": len(erp_contacts),
    }

    # Agreement: every linked pair's mapped fields, normalised, except open rejections.
    def compare(entity: str, links: dict[str, str], crm_rows: dict, erp_rows: dict) -> dict:
        fields = mappings[entity].fields
        pairs = mismatched = explained = missing = 0
        examples = []
        for crm_id, erp_id in links.items():
            a, b = crm_rows.get(crm_id), erp_rows.get(erp_id)
            if a is None or b is None:
                missing += 1
                continue
            pairs += 1
            for name, f in fields.items():
                left = normalise(f.normaliser, _text(_value(a, f.crm)))
                right = normalise(f.normaliser, _text(_value(b, f.erp)))
                if left != right:
                    if (entity, crm_id, name) in rejected:
                        explained += 1
                    else:
                        mismatched += 1
                        if len(examples) < 5:
                            examples.append(
                                f"{entity} {crm_id}/{erp_id} {name}: {left!r} vs {right!r}"
                            )
        return {
            "pairs": pairs, "fields_disagreeing": mismatched,
            "fields_disagreeing_with_open_rejection": explained,
            "links_to_missing_records": missing, "examples": examples,
        }  # fmt: skip

    # Obsolete customers are not synced field by field; compare the active pairs only.
    active_links = {
        c: e for c, e in company_links.items() if not customers.get(e, {}).get("Obsolete")
    }
    out["company_agreement"] = compare("company", active_links, divisions, customers)
    out["contact_agreement"] = compare("contact", contact_links, crm_contacts, erp_contacts)

    # Links against the seed world's truth (customer Guid -> DivisionId, contact Guid -> ContactId).
    erp_to_crm_company = {e: c for c, e in company_links.items()}
    erp_to_crm_contact = {e: c for c, e in contact_links.items()}
    # Links to obsolete customers (and their contacts) are dropped by design.
    live = {g for g, c in customers.items() if not c.get("Obsolete")}
    live_contacts = {str(k["Guid"]) for g in live for k in customers[g].get("Contacts") or []}
    seeded_company = {g: d for g, d in truth["company_links"].items() if g in live}
    seeded_contact = {g: d for g, d in truth["contact_links"].items() if g in live_contacts}
    out["seed_company_links_found"] = sum(
        1 for g, d in seeded_company.items() if erp_to_crm_company.get(g) == str(d)
    )
    out["seed_company_links"] = len(seeded_company)
    out["seed_contact_links_found"] = sum(
        1 for g, d in seeded_contact.items() if erp_to_crm_contact.get(g) == str(d)
    )
    out["seed_contact_links"] = len(seeded_contact)

    # Lost: an active Unleashed customer or contact with no CRM counterpart after the sync
    # (neither linked nor created from it: a CRM record carrying its Guid).
    made_companies = {_slot(d, "DivisionXtra") for d in divisions.values()}
    made_contacts = {_slot(c, "ContactXtra") for c in crm_contacts.values()}
    lost_customers = [g for g in live if g not in erp_to_crm_company and g not in made_companies]
    lost_contacts = [
        g for g in live_contacts if g not in erp_to_crm_contact and g not in made_contacts
    ]
    out["lost_customers"] = len(lost_customers)
    out["lost_contacts"] = len(lost_contacts)
    out["lost_examples"] = (lost_customers + lost_contacts)[:5]
    # ... and nothing of the CRM's seed data went missing.
    out["crm_seed_divisions_missing"] = truth["crm_divisions"] - sum(
        1 for d in divisions if int(d) <= truth["crm_divisions"]
    )
    out["crm_seed_contacts_missing"] = truth["crm_contacts"] - sum(
        1 for c in crm_contacts if int(c) <= truth["crm_contacts"]
    )

    # Duplicated: two CRM records for one Unleashed record, or two identical contacts.
    by_guid = Counter(
        _slot(d, "DivisionXtra") for d in divisions.values() if _slot(d, "DivisionXtra")
    )
    by_code = Counter(str(s.get("CustomerCode") or "").upper() for s in crm["ledgers"])
    contact_guids = Counter(
        _slot(c, "ContactXtra") for c in crm_contacts.values() if _slot(c, "ContactXtra")
    )
    same_person = Counter(
        (c.get("DivisionId"), c.get("Forename"), c.get("Surname"), (c.get("Email") or "").lower())
        for c in crm_contacts.values()
    )
    out["duplicate_crm_divisions"] = sum(n - 1 for n in by_guid.values() if n > 1)
    out["duplicate_crm_sales_ledgers"] = sum(n - 1 for k, n in by_code.items() if k and n > 1)
    out["duplicate_crm_contacts_by_guid"] = sum(n - 1 for n in contact_guids.values() if n > 1)
    out["duplicate_crm_contacts_by_name_email"] = sum(n - 1 for n in same_person.values() if n > 1)
    # Rule 2: nothing created in Unleashed.
    out["unleashed_contacts_added"] = len(erp_contacts) - truth["unleashed_contacts"]
    out["unleashed_customers_added"] = len(customers) - truth["customers"]
    return out


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# --------------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------------
def run_child(
    companies: int, cpc: float, limit: int, window_s: float, timeout_s: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-load-") as work:
        out = Path(work) / "result.json"
        cmd = [
            sys.executable, __file__, "--_child", "--workdir", work, "--out", str(out),
            "--companies", str(companies), "--contacts-per-company", str(cpc),
            "--crm-rate-limit", str(limit), "--crm-rate-window-s", str(window_s),
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the run did not finish within {timeout_s:.0f} s") from None
        finally:
            _stop_group(proc)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"the run failed (exit {proc.returncode})")
        return json.loads(out.read_text())


def _stop_group(proc: subprocess.Popen) -> None:
    """End the child's process group (it and the local servers it started), if still running."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def projected_seconds(dry: dict[str, Any], limit: int, window_s: float) -> float:
    """Wall time under the real limit: the dry run's time plus one client pacing window (a bit
    wider than the server's) for every further `limit` requests after the first `limit`."""
    from sync_pipeline.clients import crm

    n = dry["requests"]["crm"]
    windows = max(0, math.ceil(n / limit) - 1)
    return dry["wall_s"] + windows * (window_s * crm._PACING_STRETCH + crm._PACING_SLACK_S)


def report(label: str, r: dict[str, Any]) -> None:
    w = r["world"]
    c = r["check"]
    print(f"\n=== {label} ===")
    print(
        f"World: {w['customers']} Unleashed customers ({w['customers_obsolete']} obsolete), "
        f"{w['unleashed_contacts']} Unleashed contacts; {w['crm_divisions']} CRM companies, "
        f"{w['crm_contacts']} CRM contacts ({r['contacts_per_company']} contacts per company "
        "asked of the seed)"
    )
    print(
        f"CRM rate limit on the server and in the client: {r['crm_rate_limit']} requests per "
        f"{r['crm_rate_window_s']:g} s"
    )
    print(f"Cycle: {'succeeded' if r['success'] else 'FAILED'} in {r['wall_s']:.1f} s wall time")
    for f in r["failures"]:
        print(f"  failure: {f}")
    steps = sorted(r["steps_s"].items(), key=lambda kv: -kv[1])
    print("  steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in steps))
    req = r["requests"]
    print(f"Requests: CRM {req['crm']}, Unleashed {req['unleashed']}")
    print("  CRM: " + ", ".join(f"{k} {v}" for k, v in sorted(req["crm_by_endpoint"].items())))
    print(
        "  Unleashed: "
        + ", ".join(f"{k} {v}" for k, v in sorted(req["unleashed_by_endpoint"].items()))
    )
    s = r["server_429"]
    print(
        f"429s sent by the servers: CRM rate-limited {s['crm_rate_limited']}, CRM injected "
        f"{s['crm_injected']}, Unleashed injected {s['unleashed_injected']}"
    )
    print(
        "Statuses the clients received: "
        + ", ".join(f"{k}: {v}" for k, v in r["client_statuses"].items())
    )
    print(
        f"Peak RSS: this (pipeline) process {r['peak_rss_bytes'] / MB:.0f} MB; the local servers' "
        f"process {r['servers_peak_rss_bytes'] / MB:.0f} MB"
    )
    print(
        "Outbox: "
        + ", ".join(f"{k} {v}" for k, v in r["outbox"].items())
        + f"; audit rows {r['audit_rows']}"
    )
    for i, f in enumerate(r["follow_up"], start=2):
        print(
            f"Cycle {i} ({f['seconds']:.1f} s, limit lifted, "
            f"{'succeeded' if f['success'] else 'FAILED'}) planned: "
            + (", ".join(f"{k} {v}" for k, v in f["plan"].items()) or "nothing")
            + f"; open rejections {f['open_rejections']}"
        )
    ca, ka = c["company_agreement"], c["contact_agreement"]
    print(
        f"Read back through the APIs: {c['crm_divisions']} CRM companies, {c['crm_contacts']} CRM "
        f"contacts; {c['unleashed_customers']} Unleashed customers, {c['unleashed_contacts']} "
        "Unleashed contacts"
    )
    for name, a in (("companies", ca), ("contacts", ka)):
        print(
            f"  linked {name}: {a['pairs']} pairs; fields disagreeing after normalisation: "
            f"{a['fields_disagreeing']} (plus {a['fields_disagreeing_with_open_rejection']} held "
            f"back by an open rejection); links to missing records {a['links_to_missing_records']}"
        )
        for e in a["examples"]:
            print(f"    e.g. {e}")
    print(
        f"  links as seeded: companies {c['seed_company_links_found']}/{c['seed_company_links']}, "
        f"contacts {c['seed_contact_links_found']}/{c['seed_contact_links']}"
    )
    print(
        f"  lost: Unleashed customers with no CRM company {c['lost_customers']}, Unleashed "
        f"contacts with no CRM contact {c['lost_contacts']}; CRM seed records gone: "
        f"{c['crm_seed_divisions_missing']} companies, {c['crm_seed_contacts_missing']} contacts"
    )
    if c["lost_examples"]:
        print(f"    e.g. {c['lost_examples']}")
    print(
        f"  duplicated: CRM companies {c['duplicate_crm_divisions']}, sales ledgers "
        f"{c['duplicate_crm_sales_ledgers']}, contacts by Unleashed Guid "
        f"{c['duplicate_crm_contacts_by_guid']}, contacts by name+email "
        f"{c['duplicate_crm_contacts_by_name_email']}"
    )
    print(
        f"  created in Unleashed (must be 0): customers {c['unleashed_customers_added']}, "
        f"contacts {c['unleashed_contacts_added']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--companies", type=int, default=20000, help="Unleashed customers")
    parser.add_argument(
        "--contacts-per-company", type=float, default=3.0,
        help="mean Unleashed contacts per customer asked of the seed (its own mean is 2.625)",
    )  # fmt: skip
    parser.add_argument("--crm-rate-limit", type=int, default=1200)
    parser.add_argument("--crm-rate-window-s", type=float, default=600)
    parser.add_argument(
        "--real-budget-minutes", type=float, default=25,
        help="longest real-limit run to try; beyond it a smaller world runs at the real limit",
    )  # fmt: skip
    parser.add_argument(
        "--real-windows", type=int, default=2,
        help="for the smaller world: how many full rate windows it should have to wait",
    )  # fmt: skip
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if args._child:
        result = run_once(args)
        Path(args.out).write_text(json.dumps(result, default=str))
        return 0 if result["success"] else 1

    # SIGTERM ends the orchestrator through `finally`, so its child runs are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    limit, window = args.crm_rate_limit, args.crm_rate_window_s
    cpc = args.contacts_per_company
    budget_s = args.real_budget_minutes * 60
    print(
        f"Load run: {args.companies} companies, {cpc} contacts per company; CRM limit {limit} "
        f"per {window:g} s. Step 1: a dry run at full size with the CRM limit raised, to count "
        "the CRM requests the initial sync needs."
    )
    dry = run_child(args.companies, cpc, RAISED_LIMIT, window, timeout_s=3600)
    report(f"Full size, CRM limit RAISED to {RAISED_LIMIT} (not the real limit)", dry)
    needed = dry["requests"]["crm"]
    projected = projected_seconds(dry, limit, window)
    print(
        f"\nProjection: the initial sync needs {needed} CRM requests; at {limit} per {window:g} s "
        f"it would take about {projected / 60:.1f} min ({projected / 3600:.2f} h) of wall time."
    )
    if projected <= budget_s:
        print("That fits the budget: running the full size under the real limit.")
        real = run_child(args.companies, cpc, limit, window, timeout_s=projected * 2 + 600)
        report("Full size under the REAL CRM limit", real)
        return 0 if real["success"] else 1
    per_company = needed / args.companies
    target = limit * (args.real_windows + 1) * 0.9
    small = max(50, int(target / per_company))
    print(
        f"That is over the {args.real_budget_minutes:g} min budget, so the real limit is measured "
        f"on a smaller world: {small} companies (~{per_company:.2f} CRM requests per company, so "
        f"~{small * per_company:.0f} requests: {args.real_windows} full rate windows to wait)."
    )
    real = run_child(small, cpc, limit, window, timeout_s=budget_s * 2 + 600)
    report(f"SMALLER world ({small} companies) under the REAL CRM limit", real)
    print(
        f"\nSummary: the {args.companies}-company initial sync was measured with the CRM limit "
        f"raised ({dry['wall_s']:.0f} s, {needed} CRM requests); under the real limit it is "
        f"projected at {projected / 60:.0f} min. The real limit was measured on {small} companies: "
        f"{real['wall_s'] / 60:.1f} min, {real['server_429']['crm_rate_limited']} CRM 429s."
    )
    return 0 if (dry["success"] and real["success"]) else 1


if __name__ == "__main__":
    sys.exit(main())
