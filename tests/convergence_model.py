"""Helpers for tests/test_convergence.py: the hypothesis profiles, one synced world per session
(both local servers plus a DuckDB file after the first sync), the model of what each side should
end up as, and the invariants checked at quiescence.

Why a snapshot and not `POST /_admin/reset` + two cycles per example: those two initial cycles
cost ~5 s, more than a whole example. The session resets both servers once, runs the two initial
cycles, and keeps (a) every document both servers hold and (b) the DuckDB file. Each example then
loads those documents back into the servers (in process, through the servers' own `load` /
`replace_world`, which bump the CRM listing cache and never move a server clock back) and starts
from a copy of the DuckDB file (held open for the example, see `keep_database_open`), a fresh
settings file and the session's ephemeral Dagster instance wiped (no runs, no events).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

# ------------------------------------------------------------------------------------------------
# Profiles. They must exist before the hypothesis pytest plugin reads `--hypothesis-profile` (at
# configure time, before any test module is imported), so the root conftest.py imports this module.
# The CI profile is not called "default": that name is hypothesis' own default for every other
# test in the suite, which must not inherit 200 stateful examples.
# ------------------------------------------------------------------------------------------------
CI_PROFILE = "convergence"
SOAK_PROFILE = "soak"
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    CI_PROFILE,
    max_examples=200,
    stateful_step_count=4,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_QUIET,
)
settings.register_profile(
    SOAK_PROFILE,
    max_examples=int(os.environ.get("CONVERGENCE_MAX_EXAMPLES", "3000")),
    stateful_step_count=25,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=_QUIET,
)

CI_WORLD = {"companies": 8, "seed": 11}
CI_SEEDS = {1: 20261126, 2: 31415926}  # the example streams of the two CI halves
SOAK_WORLD = {"companies": 20, "seed": 23}

# ------------------------------------------------------------------------------------------------
# Field table: canonical name -> (CRM field, Unleashed field, normaliser)
# ------------------------------------------------------------------------------------------------
COMPANY_FIELDS = {
    "name": ("Name", "CustomerName", "name"),
    "phone": ("PhoneNumber", "PhoneNumber", "phone"),
    "website": ("Website", "Website", "website"),
    "account_manager": ("AccountManager", "SalesPerson", "email"),
}
CONTACT_FIELDS = {
    "first_name": ("Forename", "FirstName", "name"),
    "last_name": ("Surname", "LastName", "name"),
    "email": ("Email", "EmailAddress", "email"),
    "phone": ("PhoneNumber", "PhoneNumber", "phone"),
    "mobile": ("MobilePhoneNumber", "MobilePhone", "phone"),
    "fax": ("Fax", "FaxNumber", "phone"),
}
FIELDS = {"company": COMPANY_FIELDS, "contact": CONTACT_FIELDS}


def norm(entity: str, field_name: str, value: Any) -> str:
    from sync_pipeline.mapping.normalise import normalise

    return normalise(FIELDS[entity][field_name][2], None if value is None else str(value))


# ------------------------------------------------------------------------------------------------
# Counters printed at session end (make soak)
# ------------------------------------------------------------------------------------------------
TOTALS: Counter[str] = Counter()
STARTED = time.monotonic()
PROGRESS_EVERY = int(os.environ.get("CONVERGENCE_PROGRESS_EVERY", "50"))  # soak progress lines


def progress() -> str:
    """One line for a long soak: how far it is, how fast, and whether anything broke yet."""
    done = TOTALS["scenarios"] - 1  # the scenario just started is not done
    minutes = (time.monotonic() - STARTED) / 60
    bad = "/".join(str(TOTALS[k]) for k in ("lost", "duplicated", "divergent"))
    return (
        f"soak progress: {done} scenarios in {minutes:.1f} min "
        f"({60 * minutes / max(done, 1):.1f} s each), {TOTALS['steps']} steps, "
        f"{TOTALS['faults_injected']} faults injected, {TOTALS['crashes_recovered']} crashes "
        f"recovered, lost/duplicated/divergent {bad}"
    )


def report() -> str:
    keys = [
        ("scenarios run", "scenarios"),
        ("rule steps run", "steps"),
        ("operations applied (edits, creations, deletions, obsoletes by the rules)", "operations"),
        ("  of which refused by the API (not part of the model)", "refused"),
        ("sync jobs run", "jobs"),
        ("sync writes audited (audit rows)", "audit_rows"),
        ("faults armed", "faults_armed"),
        ("faults injected (server-side count)", "faults_injected"),
        ("jobs failed under faults", "jobs_failed"),
        ("crashes injected", "crashes"),
        ("crashes recovered", "crashes_recovered"),
        ("edits checked at quiescence", "edits_checked"),
        ("edits checked right after a clean push", "pushed_checked"),
        ("  of which not in Unleashed yet", "pushed_late"),
        ("conflicts recorded", "conflicts"),
        ("  of which on a field not changed on both sides", "phantom_conflicts"),
        ("  newest ones whose later edit is certain (winner checked)", "newest_checked"),
        ("  of which won by the earlier edit", "newest_wrong"),
        ("CRM companies set aside mid-sequence (nothing written while so)", "set_aside"),
        ("open rejections at quiescence", "open_rejections"),
        ("edits back to the agreed value before a sync saw them", "returned_unseen"),
        ("lost edits", "lost"),
        ("duplicated contacts", "duplicated"),
        ("divergent fields", "divergent"),
        ("contacts POSTed to Unleashed by the sync", "sync_contact_posts"),
        ("writes not in the audit log", "unaudited"),
        ("history prunes (every finished row)", "history_prunes"),
        ("  rows they deleted", "history_rows_pruned"),
    ]
    width = max(len(k) for k, _ in keys)
    lines = ["", "convergence: " + ", ".join(f"{k}={TOTALS[k]}" for k in ("scenarios",))]
    lines += [f"  {label:<{width}}  {TOTALS[key]}" for label, key in keys]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The synced world, once per session
# ------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """A record the model follows. Either id may be unknown (contact created on one side)."""

    entity: str
    crm_id: int | None
    erp_id: str | None
    crm_parent: int | None = None
    erp_parent: str | None = None
    origin: str = "seed"  # seed | crm | erp
    gone: str | None = None  # why it is no longer expected to be linked


@dataclass
class Baseline:
    """What the session captured after the initial sync."""

    crm_docs: dict[str, list[dict[str, Any]]]
    erp_customers: list[dict[str, Any]]
    erp_salespersons: list[dict[str, Any]]
    db_file: Path
    companies: list[Pair]
    contacts: list[Pair]
    users: list[dict[str, Any]]  # UserCode, EmailAddress, Email (the same), salesperson (bool)
    salespersons: list[dict[str, Any]]  # Guid, Email, Obsolete, user (bool)
    dup_email_groups: set[tuple[str, Any, str]] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)  # audit/conflict rows after capture
    conflict_keys: set[str] = field(default_factory=set)  # conflicts recorded before the model


def _servers(emu: Any) -> tuple[Any, Any]:
    return emu._crm.app.state.crm, emu._unleashed.app.state.unleashed  # noqa: SLF001


def capture(emu: Any, workdir: Path) -> Baseline:
    """Reset both servers, run two sync cycles through Dagster, keep the result."""
    import httpx

    from tests.harness import Harness

    for url in (emu.crm_url, emu.unleashed_url):
        httpx.post(f"{url}/_admin/reset", timeout=30).raise_for_status()
    h = Harness(emu, workdir)
    try:
        h.cycle()
        h.cycle()
        companies = [
            Pair("company", int(r.crm_id), r.erp_id)
            for r in h.query(
                """SELECT l.crm_id, l.erp_id FROM company_links l
                   JOIN crm_companies c ON c.id = l.crm_id AND c.active
                   JOIN unleashed_customers u ON u.id = l.erp_id AND u.active
                   ORDER BY CAST(l.crm_id AS INT)"""
            ).itertuples()
        ]
        linked = {p.erp_id for p in companies}
        contacts = [
            Pair("contact", int(r.crm_id), r.erp_id, int(r.crm_parent_id), r.erp_parent_id)
            for r in h.query(
                """SELECT l.* FROM contact_links l
                   JOIN crm_contacts c ON c.id = l.crm_id AND c.active
                   JOIN unleashed_contacts u ON u.id = l.erp_id AND u.active
                   ORDER BY CAST(l.crm_id AS INT)"""
            ).itertuples()
            if r.erp_parent_id in linked
        ]
    finally:
        h.close()
    crm, erp = _servers(emu)
    from devservers.crm_server import ENTITY_SETS

    crm_docs = {name: copy.deepcopy(crm.rows(name)) for name in ENTITY_SETS}
    customers = copy.deepcopy(erp.store.all("customers"))
    salespersons = copy.deepcopy(erp.store.all("salespersons"))
    sp_emails = {str(s["Email"]).lower() for s in salespersons if not s.get("Obsolete")}
    # Users who can be account managers: active, with an email (the house account has none).
    people = [u for u in crm_docs["Users"] if not u.get("Obsolete") and u.get("EmailAddress")]
    user_emails = {str(u["EmailAddress"]).lower() for u in people}
    users = [
        {**u, "Email": u["EmailAddress"], "salesperson": u["EmailAddress"].lower() in sp_emails}
        for u in people
    ]
    sps = [{**s, "user": str(s["Email"]).lower() in user_emails} for s in salespersons]
    base = Baseline(
        crm_docs, customers, salespersons, workdir / "sync.duckdb", companies, contacts, users, sps
    )
    base.dup_email_groups = duplicate_email_groups(crm_docs["Contacts"], customers)
    base.counts = {
        t: int(h.query(f"SELECT count(*) AS n FROM {t}").iloc[0]["n"])  # noqa: S608
        for t in ("audit_log", "conflicts")
    }
    base.conflict_keys = set(h.query("SELECT op_key FROM conflicts")["op_key"])
    return base


def restore(emu: Any, base: Baseline) -> None:
    """Put both servers back to the captured state; clear faults, counts and the CRM rate window."""
    crm, erp = _servers(emu)
    crm.load(copy.deepcopy(base.crm_docs))
    erp.replace_world(
        {
            "customers": copy.deepcopy(base.erp_customers),
            "salespersons": copy.deepcopy(base.erp_salespersons),
        }
    )
    for system in ("crm", "unleashed"):
        emu.set_faults(system)
        emu.reset_stats(system)
    emu._admin("POST", "crm", "/ratelimit/reset")  # noqa: SLF001


def scratch_dir(prefix: str) -> Path:
    """A scratch folder in memory when the machine has one: DuckDB checkpoints on every close
    (19 connections per cycle), and on disk those fsyncs are half of a cycle's wall time."""
    shm = Path("/dev/shm")  # noqa: S108 - private mkdtemp folder
    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm if shm.is_dir() else None))


def reset_workdir(base: Baseline, work: Path) -> None:
    """The DuckDB file as the initial sync left it; nothing else from an earlier example."""
    for old in work.glob("sync.duckdb*"):
        old.unlink()
    shutil.copy(base.db_file, work / "sync.duckdb")
    wal = base.db_file.with_name(base.db_file.name + ".wal")
    if wal.exists():
        shutil.copy(wal, work / wal.name)


def keep_database_open(db_file: Path) -> Any:
    """A connection held for the whole example, so DuckDB keeps the database loaded in this
    process between the steps' own connections.

    Every step still opens, uses and closes its own connection (a crashed step's open transaction
    is rolled back when that connection closes, as before); what the held connection saves is
    DuckDB loading the database on every open (~10 ms) and checkpointing it on every close
    (~5 ms), about 20 times a cycle. Only this process uses the file during an example, which is
    what makes holding it safe here; the product cannot do this, because overlapping runs in other
    processes must be able to open the file between steps.

    The database instance also runs on one thread (a setting of the instance, so every step's
    connection gets it): the world is a few dozen rows, and handing each tiny query to a second
    thread costs ~15% of a cycle's CPU on this 2-core machine."""
    import duckdb

    con = duckdb.connect(str(db_file))
    con.execute("SET threads = 1")
    return con


def ephemeral_instance() -> Any:
    """An ephemeral Dagster instance (as `DagsterInstance.ephemeral()`) whose in-memory event log
    keeps one SQLite connection instead of opening one, with two PRAGMAs, for every read and
    write: a cycle stores ~90 events and reads the log as often, and those connections cost ~13%
    of an example's CPU. Dagster's own bookkeeping only; the runs, steps and events are the same.

    That connection may be used from any thread (the lock serialises it, as every use of the
    parent's): `make soak` runs its jobs off the main thread (ConvergenceHarness.run)."""
    from contextlib import contextmanager

    import sqlalchemy
    from dagster._core.instance import DagsterInstance, InstanceType
    from dagster._core.launcher.sync_in_memory_run_launcher import SyncInMemoryRunLauncher
    from dagster._core.run_coordinator import DefaultRunCoordinator
    from dagster._core.storage.event_log import InMemoryEventLogStorage
    from dagster._core.storage.noop_compute_log_manager import NoOpComputeLogManager
    from dagster._core.storage.root import TemporaryLocalArtifactStorage
    from dagster._core.storage.runs import InMemoryRunStorage

    class OneConnectionEventLog(InMemoryEventLogStorage):
        def __init__(self) -> None:
            super().__init__()  # its held connection keeps the in-memory database alive
            self._any_thread = sqlalchemy.create_engine(
                self._engine.url,
                poolclass=sqlalchemy.pool.NullPool,
                connect_args={"check_same_thread": False},
            )
            self._conn = self._any_thread.connect()
            self._conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            self._conn.commit()

        @contextmanager
        def _connect(self):  # the lock serialises every use, as in the parent class
            with self._db_lock, self._conn.begin():
                yield self._conn

        def dispose(self) -> None:
            self._conn.close()
            self._any_thread.dispose()
            super().dispose()

    return DagsterInstance(
        instance_type=InstanceType.EPHEMERAL,
        local_artifact_storage=TemporaryLocalArtifactStorage(),
        run_storage=InMemoryRunStorage(),
        event_storage=OneConnectionEventLog(),
        compute_log_manager=NoOpComputeLogManager(),
        run_coordinator=DefaultRunCoordinator(),
        run_launcher=SyncInMemoryRunLauncher(),
    )


def one_certificate_bundle(folder: Path) -> Path:
    """A CA bundle holding one certificate. httpx builds an SSL context for every client, even
    for http:// URLs, and loading certifi's whole bundle costs ~45 ms a client (9 per cycle).
    The local servers speak plain http, so the bundle's content never matters here."""
    import certifi

    pem = Path(certifi.where()).read_text()
    end = "-----END CERTIFICATE-----"
    path = folder / "one-ca.pem"
    path.write_text(pem[: pem.index(end) + len(end)] + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Live state (read from the servers' stores directly: no HTTP, no faults, no rate limit)
# ------------------------------------------------------------------------------------------------
def live(emu: Any) -> dict[str, Any]:
    crm, erp = _servers(emu)
    users = {u["UserCode"]: u for u in crm.rows("Users")}
    slots = {x["ContactId"]: x.get("StandardTextField1") for x in crm.rows("ContactXtras")}
    customers = {c["Guid"]: c for c in erp.store.all("customers")}
    contacts = {}
    for c in customers.values():
        for k in c.get("Contacts") or []:
            contacts[k["Guid"]] = {**k, "_customer": c["Guid"]}
    return {
        "divisions": {d["DivisionId"]: d for d in crm.rows("Divisions")},
        "crm_contacts": {
            c["ContactId"]: {**c, "_guid": slots.get(c["ContactId"])} for c in crm.rows("Contacts")
        },
        "users": users,
        "customers": customers,
        "erp_contacts": contacts,
    }


def crm_value(state: dict[str, Any], entity: str, crm_id: int, field_name: str) -> Any:
    if entity == "company":
        record = state["divisions"].get(crm_id) or {}
        if field_name == "account_manager":
            user = state["users"].get(record.get("AccountManager"))
            return user.get("EmailAddress") if user else None
        return record.get(COMPANY_FIELDS[field_name][0])
    return (state["crm_contacts"].get(crm_id) or {}).get(CONTACT_FIELDS[field_name][0])


def erp_value(state: dict[str, Any], entity: str, erp_id: str, field_name: str) -> Any:
    if entity == "company":
        record = state["customers"].get(erp_id) or {}
        if field_name == "account_manager":
            sp = record.get("SalesPerson") or record.get("Salesperson")
            return sp.get("Email") if isinstance(sp, dict) else None
        return record.get(COMPANY_FIELDS[field_name][1])
    return (state["erp_contacts"].get(erp_id) or {}).get(CONTACT_FIELDS[field_name][1])


def duplicate_email_groups(
    crm_contacts: list[dict[str, Any]], customers: list[dict[str, Any]]
) -> set[tuple[str, Any, str]]:
    """(side, company, email) groups holding two or more active contacts with that email."""
    groups: Counter[tuple[str, Any, str]] = Counter()
    for c in crm_contacts:
        email = norm("contact", "email", c.get("Email"))
        if email and c.get("StatusFlag", "A") == "A":
            groups[("crm", c.get("DivisionId"), email)] += 1
    for cust in customers:
        for k in cust.get("Contacts") or []:
            email = norm("contact", "email", k.get("EmailAddress"))
            if email:
                groups[("erp", cust["Guid"], email)] += 1
    return {g for g, n in groups.items() if n > 1}


@dataclass
class Edit:
    seq: int
    entity: str
    pair: Pair
    field: str
    side: str  # crm | erp
    value: Any
    agreed: bool = False  # the other side already held this value (nothing to send)
    at: float = field(default_factory=time.time)  # when the person saved it
