"""Apply planned operations through the API clients, outbox first.

Every operation is in the outbox before its API call and is marked in flight just before it; a
success marks it applied, moves the baseline and appends to the audit log in one DuckDB
transaction. A run that crashed in between finds the operation still in flight and redoes it
safely: updates are idempotent (same value written again), and a creation first looks for the
record it may already have made (by the Unleashed Guid stored on the CRM record).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import duckdb
import pandas as pd

from sync_pipeline import baseline, derived, store
from sync_pipeline.clients.base import (
    ApiError,
    TransientApiError,
    UsageLimitError,
    ValidationError,
)
from sync_pipeline.clients.crm import (
    TIMESTAMP_FIELD,
    CrmClient,
    crm_key,
    format_timestamp,
    odata_literal,
)
from sync_pipeline.clients.unleashed import UnleashedClient
from sync_pipeline.core import TARGET, Operation, Side
from sync_pipeline.extract import (
    EMBEDDED_CONTACTS_LIMIT,
    contact_snapshot,
    crm_expand,
    customer_snapshot,
)
from sync_pipeline.mapping.normalise import normalise

if TYPE_CHECKING:
    from sync_pipeline.settings import WriteRetry

log = logging.getLogger("sync_pipeline.apply")

# How long before its planning a parent record found after a lost answer may have been made
# (clock skew between this machine and the CRM).
PLANNED_SLACK = timedelta(minutes=5)


class CrashForTest(RuntimeError):
    """Raised by a test hook to simulate a process dying between an API write and the baseline."""


# A run stops once this many records in a row failed with the API not answering (timeouts, 5xx,
# 429s, dropped connections, each already retried by the client): the rest of its operations
# wait for the next run instead of each spending the whole retry budget on a service that is down
# (with 30 s timeouts that is minutes per record, while the run holds the DuckDB pool).
UNANSWERED_RECORDS_TO_STOP = 2


@dataclass
class ApplyStats:
    applied: int = 0
    failed: int = 0
    deferred: int = 0
    set_aside: int = 0  # in doubt, not sent: the latest plan no longer wants them
    recovered: int = 0
    records: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    applied_rows: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None  # why the run stopped before its last operation
    unanswered: int = 0  # records in a row whose requests failed transiently
    planned: int = 0  # operations this run set out to write
    not_tried: int = 0  # left for later when the run stopped early
    # One row per failed operation: record, field, status left in, reason, next retry.
    failures: list[dict[str, Any]] = field(default_factory=list)
    retry_at: datetime | None = None  # the last failure's automatic retry, if it has one

    @property
    def unwritten(self) -> int:
        """Planned writes this run did not make for a reason that is not fine: failed, refused,
        or not tried because the run stopped. (Deferred and set-aside ones are fine: the target
        changed, or the plan no longer wants them.)"""
        return self.failed + self.not_tried

    def metadata(self) -> dict[str, Any]:
        return {
            "operations_planned": self.planned,
            "operations_applied": self.applied,
            "operations_failed": self.failed,
            "operations_not_tried": self.not_tried,
            "operations_deferred": self.deferred,
            "operations_set_aside": self.set_aside,
            "recovered_after_crash": self.recovered,
            "records_written": self.records,
            "api_requests": self.requests,
            "stopped_early": self.stopped or "no",
        }

    def should_stop(self, exc: ApiError | None, system: str, left: Callable[[], int]) -> bool:
        """After one record: count records in a row the API did not answer; at the limit, say
        why the run stops and what waits (`left()`: operations not tried yet in this run).
        A used-up usage limit stops the run at once: every further request would be refused."""
        if isinstance(exc, UsageLimitError):
            self.stopped = (
                f"{system}'s API usage limit is used up (it refused {exc.method} "
                f"{exc.endpoint}: {exc.message}); every request is refused until it resets on "
                f"{exc.resets_at:%Y-%m-%d %H:%M} UTC. The run stopped there: that record's "
                f"operations and {left()} not tried wait for the first run after the limit "
                "resets or is raised"
            )
            log.warning("%s", self.stopped)
            return True
        if exc is None or not isinstance(exc, TransientApiError):
            self.unanswered = 0
            return False
        self.unanswered += 1
        if self.unanswered < UNANSWERED_RECORDS_TO_STOP or not left():
            return False
        self.stopped = (
            f"{system} did not answer for {self.unanswered} records in a row (last: {exc}); "
            f"the run stopped there and {left()} operations wait for the next run"
        )
        log.warning("%s", self.stopped)
        return True


@dataclass
class Hooks:
    """Test seams: `after_write(op_ids)` runs after an API write, before the baseline moves."""

    after_write: Callable[[list[str]], None] | None = None

    def wrote(self, op_ids: list[str]) -> None:
        if self.after_write is not None:
            self.after_write(op_ids)


# Used when a caller passes no hooks (the Dagster assets); tests set `after_write` to crash a run.
TEST_HOOKS = Hooks()


# ------------------------------------------------------------------------------------------------
# Helpers over nested JSON paths ("SalesPerson.Email")
# ------------------------------------------------------------------------------------------------
def get_path(obj: dict[str, Any] | None, path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _group(ops: pd.DataFrame, keys: list[str]) -> list[tuple[Any, pd.DataFrame]]:
    if ops.empty:
        return []
    return list(ops.groupby(keys, dropna=False, sort=False))


def _left(groups: list[tuple[Any, pd.DataFrame]], i: int) -> int:
    """How many operations the groups after the i-th hold (not tried yet in this run)."""
    return sum(len(ops) for _, ops in groups[i + 1 :])


class Resolver:
    """Turns canonical reference values (an account manager's email) into what each API stores,
    following the mapping's `crm_write` / `erp_write` rules (look up a raw table by a field)."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con
        self._cache: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}

    def lookup(self, ref: Any, value: str) -> Any:
        key = (ref.table, ref.match)
        if key not in self._cache:
            rows = self._con.execute(
                f"SELECT data->>'$.{ref.match}', data FROM {ref.table} WHERE active"
            ).fetchall()
            self._cache[key] = {(m or "").strip().lower(): json.loads(d) for m, d in rows if m}
        record = self._cache[key].get(value.strip().lower())
        if record is None:
            return None
        return record if ref.value is None else get_path(record, ref.value)


# ------------------------------------------------------------------------------------------------
# The applier: the outbox's unfinished operations to one target, record by record
# ------------------------------------------------------------------------------------------------
@dataclass
class _Pass:
    """What one apply pass works with; every writer takes it and one record's operations."""

    con: duckdb.DuckDBPyConnection
    client: Any  # UnleashedClient for the ERP, CrmClient for the CRM
    mappings: dict[str, Any]
    resolver: Resolver
    run_id: str
    stats: ApplyStats
    hooks: Hooks


Writer = Callable[[_Pass, pd.DataFrame], None]

# Who says a run stopped: "Unleashed did not answer …", "the CRM did not answer …".
_SYSTEM: dict[Side, str] = {"erp": "Unleashed", "crm": "the CRM"}
# The order a pass takes its records in: companies created before updates, and contacts after,
# so a new contact's company already exists.
_ORDER: dict[str, int] = {"create_crm_company": 0, "update_crm": 1, "update_erp": 1}


def apply_writes(
    con: duckdb.DuckDBPyConnection,
    client: UnleashedClient | CrmClient,
    mappings: dict[str, Any],
    run_id: str,
    target: Side,
    *,
    ops: tuple[str, ...] | None = None,
    hooks: Hooks | None = None,
    retry: WriteRetry | None = None,
) -> ApplyStats:
    """Write the outbox's unfinished operations for `target` (those of the kinds `ops`, default
    all that go there) through `client`, one record at a time: CRM changes to Unleashed
    (read–merge–write of the whole record), Unleashed changes to the CRM (partial updates) and
    the CRM records created from Unleashed. A record's failure is recorded on its operations
    and the pass goes on, until the target stops answering (`ApplyStats.should_stop`)."""
    kinds = [k for k, side in TARGET.items() if side == target and (ops is None or k in ops)]
    stats = ApplyStats()
    before = client.stats.total
    pending = store.unfinished(con, kinds)
    stats.planned = len(pending)
    if pending.empty:
        return stats
    pending = pending.sort_values("op", key=lambda s: s.map(_ORDER).fillna(2), kind="stable")
    run = _Pass(con, client, mappings, Resolver(con), run_id, stats, hooks or TEST_HOOKS)
    groups = _group(pending, ["entity", "op", "erp_id"])
    for i, ((entity, kind, _erp_id), record_ops) in enumerate(groups):
        failure = None
        try:
            WRITERS[kind](run, record_ops)
        except CrashForTest:
            raise
        except ApiError as exc:
            failure = exc
            _fail(con, record_ops, exc, stats, mappings[entity], retry)
        if stats.should_stop(failure, _SYSTEM[target], lambda i=i: _left(groups, i)):
            _leave_untried(con, groups, i, stats)
            break
    stats.requests = client.stats.total - before
    return stats


# ------------------------------------------------------------------------------------------------
# CRM → Unleashed (read–merge–write per record)
# ------------------------------------------------------------------------------------------------
def _push_update(run: _Pass, ops: pd.DataFrame) -> None:
    entity, erp_id = ops["entity"].iloc[0], ops["erp_id"].iloc[0]
    if entity == "company":
        _push_customer(run, erp_id, ops)
    else:
        _push_contact(run, ops["erp_parent_id"].iloc[0], erp_id, ops)


def _reference(
    ref: Any, field_name: str, value: str, resolver: Resolver, where: tuple[str, str, str]
) -> tuple[str, Any]:
    """The field to write and its value for a reference (e.g. an account manager's email →
    the CRM user code, or the whole Unleashed salesperson); an empty value clears it (writes
    the reference's `blank`, where the target cannot hold none)."""
    if not value:
        return ref.field, ref.blank
    found = resolver.lookup(ref, value)
    if found is None:
        system, method, endpoint = where
        raise ValidationError(
            system, method, endpoint, None,
            f"{field_name}: nothing in {ref.table} has {ref.match} {value!r}",
        )  # fmt: skip
    return ref.field, found


def _erp_value(mapping: Any, field_name: str, value: str, resolver: Resolver) -> tuple[str, Any]:
    """The top-level Unleashed key to set and its value for one canonical field."""
    f = mapping.fields[field_name]
    erp_path = f.erp
    if f.erp_write is not None:
        where = ("Unleashed", "POST", f"/{mapping.erp.resource}/{{guid}}")
        return _reference(f.erp_write, field_name, value, resolver, where)
    top = erp_path
    if "." in erp_path:
        raise ValueError(f"cannot write nested Unleashed path {erp_path!r} for {field_name}")
    return top, value


def _triage(
    ops: pd.DataFrame, current: dict[str, Any], mapping: Any, side: str = "erp"
) -> tuple[list[str], list[str]]:
    """Split operations by what the target (`side`) holds now: (already there, changed since
    planning).

    A value already equal to the one we write was written by a run that died before recording it.
    A value that is neither the planned old one nor ours was changed there after planning:
    that operation waits for the next plan, where the three-way diff sees the conflict."""
    done, stale = [], []
    for op in ops.to_dict("records"):
        f = mapping.fields[op["field"]]

        def norm(value: Any, kind: str = f.normaliser) -> str:
            return normalise(kind, _text(value))

        now = norm(get_path(current, getattr(f, side)))
        if now == norm(op["new_value"]):
            done.append(op["op_id"])
        elif now != norm(op["old_value"]):
            stale.append(op["op_id"])
    return done, stale


def _observe(
    con: duckdb.DuckDBPyConnection,
    mappings: dict[str, Any],
    guid: str,
    record: Any,
) -> None:
    """Store the customer and the contacts just read, before the sync writes to it.

    A person's edit made in Unleashed since the last import is in this read, with the
    customer's modified time from before the sync's write; the derived field times are
    computed from it now (`derived.refresh`), so the edit keeps that time. Stored only after the
    write, it would take the time of the sync's own write, and a `newest` conflict would count
    the sync's write as that person's edit."""
    modified = record.LastModifiedOn
    written = store.upsert_snapshot(
        con, "unleashed_customers", [customer_snapshot(str(guid), record.to_wire(), modified)]
    ).written
    contacts = [
        contact_snapshot(str(c.Guid), str(guid), c.to_wire(), modified)
        for c in record.Contacts or []
    ]
    written += store.upsert_snapshot(con, "unleashed_contacts", contacts).written
    if written:
        derived.refresh(con, mappings, ["unleashed_customers", "unleashed_contacts"])


def _push_customer(run: _Pass, guid: str, ops: pd.DataFrame) -> None:
    con, client, mappings, stats, run_id = run.con, run.client, run.mappings, run.stats, run.run_id
    mapping = mappings["company"]
    record, _bad = client.get_customer_and_contacts(guid)
    _observe(con, mappings, guid, record)
    current = record.to_wire(include_contacts=False)
    ops = _drop_stale(con, ops, current, mapping, stats, run_id)
    if ops.empty:
        # Nothing to send: Unleashed already held the values (a run died after writing them)
        # or changed since planning; the snapshot now holds what was just read.
        return
    changes = {}
    for op in ops.to_dict("records"):
        key, value = _erp_value(mapping, op["field"], _text(op["new_value"]), run.resolver)
        changes[key] = value
    _mark_in_flight(con, ops)
    current.update(changes)
    saved = client.save_customer(current)
    run.hooks.wrote(list(ops["op_id"]))
    row = customer_snapshot(str(guid), current, saved.LastModifiedOn)  # as sent
    _write_through(con, "unleashed_customers", row)
    _complete_updates(con, "company", ops, run_id, "crm_to_erp", stats)


def _push_contact(run: _Pass, customer_guid: str, contact_guid: str, ops: pd.DataFrame) -> None:
    con, client, mappings, stats, run_id = run.con, run.client, run.mappings, run.stats, run.run_id
    mapping = mappings["contact"]
    # The customer with its contacts: one request, and the customer's modified time (a contact
    # has none of its own) for what a person changed there since the last import.
    record, _bad = client.get_customer_and_contacts(customer_guid)
    _observe(con, mappings, customer_guid, record)
    contacts = {str(c.Guid): c.to_wire() for c in record.Contacts or []}
    current = contacts.get(str(contact_guid))
    if current is None and len(record.Contacts or []) >= EMBEDDED_CONTACTS_LIMIT:
        # Not among the first 100 a customer carries: its own list has it.
        contacts = {str(c.Guid): c.to_wire() for c in client.list_contacts(customer_guid)}
        current = contacts.get(str(contact_guid))
    if current is None:
        for op_id in ops["op_id"]:
            store.mark(con, op_id, "deferred", "contact no longer exists in Unleashed")
        stats.deferred += len(ops)
        return
    ops = _drop_stale(con, ops, current, mapping, stats, run_id)
    if ops.empty:  # nothing to send; the snapshot is behind what was just read (as above)
        row = contact_snapshot(str(contact_guid), str(customer_guid), current, None)
        _write_through(con, "unleashed_contacts", row)
        return
    changes = {
        mapping.fields[op["field"]].erp: _text(op["new_value"]) for op in ops.to_dict("records")
    }
    _mark_in_flight(con, ops)
    client.update_contact(customer_guid, contact_guid, changes, current=current)
    run.hooks.wrote(list(ops["op_id"]))
    row = contact_snapshot(str(contact_guid), str(customer_guid), {**current, **changes}, None)
    _write_through(con, "unleashed_contacts", row)
    _complete_updates(con, "contact", ops, run_id, "crm_to_erp", stats)


def _write_through(con: duckdb.DuckDBPyConnection, table: str, row: store.SnapshotRow) -> None:
    """Put the record as written to Unleashed (or as just read, when nothing was written) into
    its snapshot.

    A push run does not import Unleashed, so without this the snapshot still holds the value
    from before the write until the next import: a second CRM edit of the same field then looks
    like a conflict with Unleashed (which has not changed), and waits for that import (at night,
    until the morning). The data is what was sent: the record just read, with the changes (a
    full replace), not the response, whose shape is not documented. The modified time is the
    response's when it has one; a contact has none of its own (the import takes its customer's),
    so the snapshot's is kept. The upsert stays monotonic: an import that has already seen a
    later version is not overwritten."""
    if row.modified is None:
        found = con.execute(f"SELECT modified FROM {table} WHERE id = ?", [row.id]).fetchone()
        if found is None:
            return  # not imported yet: the next import brings it
        row = dataclasses.replace(row, modified=found[0])
    store.upsert_snapshot(con, table, [row])


def _drop_stale(
    con: duckdb.DuckDBPyConnection,
    ops: pd.DataFrame,
    current: dict[str, Any],
    mapping: Any,
    stats: ApplyStats,
    run_id: str,
    direction: str = "crm_to_erp",
) -> pd.DataFrame:
    """The operations still to send, after those the target already holds are completed (a run
    died after writing them), those changed there since planning are deferred, and those the
    latest plan no longer wants (`in_doubt`) are set aside."""
    side = "erp" if direction == "crm_to_erp" else "crm"
    done, stale_ids = _triage(ops, current, mapping, side)
    # Account managers are compared by email; the planned old value is what the snapshot held.
    stale = set(stale_ids)
    if done:
        _complete_updates(
            con, mapping.entity, ops[ops["op_id"].isin(done)], run_id, direction, stats
        )
        ops = ops[~ops["op_id"].isin(done)]
    target, source = ("Unleashed", "the CRM") if side == "erp" else ("the CRM", "Unleashed")
    why = (
        "Unleashed changed this field after planning; the next run plans it again from what "
        "Unleashed holds now"
        if side == "erp"
        else "the CRM changed this field after planning; it is re-planned in the next cycle"
    )
    unwanted = set(ops.loc[ops["status"] == "in_doubt", "op_id"])
    for op_id in unwanted:
        store.mark(
            con, op_id, "superseded",
            why if op_id in stale else (
                f"not sent: a run stopped before it knew whether this reached {target}, and it "
                f"had not; the latest plan no longer wants it ({source} changed the field again, "
                "or a setting now holds it back)"
            ),
        )  # fmt: skip
    for op_id in stale - unwanted:
        store.mark(con, op_id, "deferred", why)
    stats.deferred += len(stale - unwanted)
    stats.set_aside += len(unwanted)
    return ops[~ops["op_id"].isin(stale | unwanted)]


# ------------------------------------------------------------------------------------------------
# Unleashed → CRM (partial updates) and creations
# ------------------------------------------------------------------------------------------------
def _crm_change(mapping: Any, field_name: str, value: str, resolver: Resolver) -> tuple[str, Any]:
    f = mapping.fields[field_name]
    if f.crm_write is not None:
        where = ("CRM", "PATCH", f"/{mapping.crm.entity_set}({{key}})")
        return _reference(f.crm_write, field_name, value, resolver, where)
    if "." in f.crm:
        raise ValueError(f"cannot write nested CRM path {f.crm!r} for {field_name}")
    return f.crm, value


def _pull_update(run: _Pass, ops: pd.DataFrame) -> None:
    con, client, stats, run_id = run.con, run.client, run.stats, run.run_id
    mapping = run.mappings[ops["entity"].iloc[0]]
    crm_id = ops["crm_id"].iloc[0]
    if any(_tried_before(op) for op in ops.to_dict("records")):
        # Planned by an earlier run (a crash, a failure): a person may have edited the field in
        # the CRM since, and a PATCH would overwrite it. Read the record first, as a push does.
        expand = crm_expand(mapping)
        current = client.get(mapping.crm.entity_set, int(crm_id), expand=expand)
        ops = _drop_stale(con, ops, current, mapping, stats, run_id, "erp_to_crm")
        if ops.empty:
            return
    changes = {}
    for op in ops.to_dict("records"):
        key, value = _crm_change(mapping, op["field"], _text(op["new_value"]), run.resolver)
        changes[key] = value
    _mark_in_flight(con, ops)
    client.patch(mapping.crm.entity_set, int(crm_id), changes)
    run.hooks.wrote(list(ops["op_id"]))
    _complete_updates(con, mapping.entity, ops, run_id, "erp_to_crm", stats)


def _create_contact(run: _Pass, ops: pd.DataFrame) -> None:
    con, client, stats, run_id, hooks = run.con, run.client, run.stats, run.run_id, run.hooks
    op: Operation = ops.iloc[0].to_dict()  # type: ignore[assignment]
    mapping = run.mappings[op["entity"]]
    payload = json.loads(op["payload"]) if isinstance(op["payload"], str) else op["payload"]
    payload = dict(payload)
    guid = str(op["erp_id"])
    parent_key = mapping.crm.parent_key
    if parent_key and pd.isna(payload.get(parent_key)):
        # Planned with its customer's creation: the company this apply pass created is its
        # parent. If that creation did not happen (yet), the contact waits for the next plan.
        parent = _created_company(con, op.get("erp_parent_id"))
        if parent is None:
            store.mark(
                con, op["op_id"], "deferred",
                "its customer is not in the CRM yet; planned again once the customer is",
            )  # fmt: skip
            stats.deferred += 1
            return
        payload[parent_key] = crm_key(parent)
    existing = _find_created(con, client, mapping, op, payload, stats)
    if existing is None and _unwanted(con, op, stats):
        return
    store.mark(con, op["op_id"], "in_flight")
    new_id = _create_linked(con, client, mapping, op, payload, existing)
    hooks.wrote([op["op_id"]])
    _complete_creation(
        con, "contact", op, new_id, guid, payload, run_id, stats, "contact created in Unleashed"
    )


def _create_linked(
    con: duckdb.DuckDBPyConnection,
    client: CrmClient,
    mapping: Any,
    op: Operation,
    payload: dict[str, Any],
    existing: dict[str, Any] | None,
) -> str:
    """Create the CRM record (after the record it needs first, if any: a Division's company
    group) unless an earlier run did, then keep the Unleashed Guid in its link slot. Returns
    the new record's id. Each step is safe to redo after a crash: the parent made is noted in
    the outbox before the record is created, and the slot write is a PATCH."""
    parent = mapping.crm.create.parent
    record = existing
    if record is None:
        if parent is not None:
            parent_id = _progress(op, parent.key)
            if parent_id is None:
                parent_id = _find_parent_made(client, mapping, op, payload)
            if parent_id is None:
                body = {**parent.values}
                body.update({f: payload.get(src) for f, src in parent.from_record.items()})
                parent_id = client.create(parent.entity_set, body)[parent.key]
            store.note_progress(con, op["op_id"], f"{parent.key}={parent_id}")
            op["result_id"] = f"{parent.key}={parent_id}"
            payload[parent.key] = parent_id
        record = client.create(mapping.crm.entity_set, payload)
    new_id = str(record[mapping.crm.key])
    link = mapping.crm.link
    if get_path(record, link.path) != str(op["erp_id"]):
        client.upsert_satellite(link.entity_set, int(new_id), {link.field: str(op["erp_id"])})
    return new_id


def _progress(op: Operation, key: str) -> int | None:
    """The parent record an earlier attempt of this creation made (noted as `Key=id`)."""
    noted = op.get("result_id")
    if not isinstance(noted, str) or not noted.startswith(f"{key}="):
        return None
    value = noted.split("=", 1)[1]
    return int(value) if value.isdigit() else None


def _find_parent_made(
    client: CrmClient, mapping: Any, op: Operation, payload: dict[str, Any]
) -> int | None:
    """After a lost answer to the parent's POST: a parent with the values this creation sends,
    made since it was planned, that no record uses yet."""
    parent = mapping.crm.create.parent
    if not _tried_before(op) or parent is None:
        return None
    body = {**parent.values, **{f: payload.get(src) for f, src in parent.from_record.items()}}
    since = pd.Timestamp(op["created_at"]).to_pydatetime() - PLANNED_SLACK
    terms = [f"{f} eq {odata_literal(v)}" for f, v in body.items() if v is not None]
    terms.append(f"{TIMESTAMP_FIELD} ge {format_timestamp(since)}")
    for candidate in client.list(parent.entity_set, filter=" and ".join(terms)).items:
        used = client.any_rows(
            mapping.crm.entity_set, f"{parent.key} eq {odata_literal(candidate[parent.key])}"
        )
        if not used:
            return int(candidate[parent.key])
    return None


def _find_created(
    con: duckdb.DuckDBPyConnection,
    client: CrmClient,
    mapping: Any,
    op: Operation,
    payload: dict[str, Any],
    stats: ApplyStats,
) -> dict[str, Any] | None:
    """For a creation tried before, the CRM record an earlier run made: the one whose link slot
    holds the Unleashed Guid, else (the answer to its POST was lost before the slot was
    written) one without a Guid that the creation's own values find: under the parent it made
    first, or under the same parent by the mapping's match keys."""
    if not _tried_before(op):
        return None
    link = mapping.crm.link
    guid = str(op["erp_id"])
    expand = crm_expand(mapping)
    found = client.list(
        mapping.crm.entity_set,
        filter=f"{link.navigation}/{link.field} eq {odata_literal(guid)}",
        expand=expand,
    ).items
    if not found:
        found = _same_values(client, mapping, op, payload)
        found = [r for r in found if not get_path(r, link.path)]
    if found:
        stats.recovered += 1
        return found[0]
    return None


def _same_values(
    client: CrmClient, mapping: Any, op: Operation, payload: dict[str, Any]
) -> list[dict[str, Any]]:
    expand = crm_expand(mapping)
    parent = mapping.crm.create.parent
    if parent is not None:
        parent_id = _progress(op, parent.key)
        if parent_id is None:
            return []
        flt = f"{parent.key} eq {parent_id}"
        return client.list(mapping.crm.entity_set, filter=flt, expand=expand).items
    scope = []
    if mapping.crm.parent_key and payload.get(mapping.crm.parent_key) is not None:
        scope = [f"{mapping.crm.parent_key} eq {odata_literal(payload[mapping.crm.parent_key])}"]
    for key in mapping.match.keys:
        if any("." in p or not payload.get(p) for p in key.crm):
            continue
        terms = scope + [f"{p} eq {odata_literal(payload[p])}" for p in key.crm]
        rows = client.list(mapping.crm.entity_set, filter=" and ".join(terms), expand=expand).items
        rows = [r for r in rows if r.get("StatusFlag") != "D"]
        if rows:
            return rows
    return []


def _unwanted(con: duckdb.DuckDBPyConnection, op: Operation, stats: ApplyStats) -> bool:
    """A creation in doubt that did not happen, and that the latest plan no longer wants (the
    Unleashed record went away meanwhile), is set aside rather than made now."""
    if op["status"] != "in_doubt":
        return False
    store.mark(
        con, op["op_id"], "superseded",
        "not created: a run stopped before it knew whether this reached the CRM, and it had not; "
        "the latest plan no longer wants it (the Unleashed record is gone or obsolete)",
    )  # fmt: skip
    stats.set_aside += 1
    return True


def _tried_before(op: Operation) -> bool:
    """Sent (or about to be) by an earlier run: the target may have changed since, or already
    hold what the operation writes, so it is read before anything is written."""
    return op["attempts"] > 0 or op["status"] in ("in_flight", "in_doubt")


def _created_company(con: duckdb.DuckDBPyConnection, erp_parent_id: Any) -> str | None:
    """The CRM id of the company for an Unleashed customer: its link, or the result of an
    applied creation (the link step links it on the next cycle)."""
    if pd.isna(erp_parent_id):
        return None
    row = con.execute(
        """SELECT crm_id FROM company_links WHERE erp_id = ?
           UNION ALL
           SELECT * FROM (SELECT result_id FROM outbox
                          WHERE op = 'create_crm_company' AND erp_id = ? AND status = 'applied'
                            AND result_id IS NOT NULL
                          ORDER BY applied_at DESC LIMIT 1)
           LIMIT 1""",
        [str(erp_parent_id), str(erp_parent_id)],
    ).fetchone()
    return None if row is None else str(row[0])


def _create_company(run: _Pass, ops: pd.DataFrame) -> None:
    con, client, stats, run_id, hooks = run.con, run.client, run.stats, run.run_id, run.hooks
    op: Operation = ops.iloc[0].to_dict()  # type: ignore[assignment]
    mapping = run.mappings[op["entity"]]
    payload = json.loads(op["payload"]) if isinstance(op["payload"], str) else op["payload"]
    payload = dict(payload)
    guid = str(op["erp_id"])
    existing = _find_created(con, client, mapping, op, payload, stats)
    if existing is None and _unwanted(con, op, stats):
        return
    store.mark(con, op["op_id"], "in_flight")
    new_id = _create_linked(con, client, mapping, op, payload, existing)
    hooks.wrote([op["op_id"]])
    _complete_creation(
        con,
        "company",
        op,
        new_id,
        guid,
        payload,
        run_id,
        stats,
        "customer created in Unleashed (standard import)",
    )


# What writes each kind of operation (`core.TARGET` says where it goes).
WRITERS: dict[str, Writer] = {
    "update_erp": _push_update,
    "update_crm": _pull_update,
    "create_crm_company": _create_company,
    "create_crm_contact": _create_contact,
}


# ------------------------------------------------------------------------------------------------
# Shared bookkeeping
# ------------------------------------------------------------------------------------------------
def _complete_creation(
    con: duckdb.DuckDBPyConnection,
    entity: str,
    op: Operation,
    new_id: str,
    guid: str,
    payload: dict[str, Any],
    run_id: str,
    stats: ApplyStats,
    reason: str,
) -> None:
    """The created record's values become its baseline, and the outbox and audit log say so, in
    one transaction."""
    con.begin()
    try:
        baseline.record_creation(con, entity, crm_id=new_id, erp_id=guid, op=op, payload=payload)
        store.complete(
            con, op, run_id=run_id, direction="erp_to_crm", result_id=new_id,
            audit_rows=[{
                "entity": entity, "crm_id": new_id, "erp_id": guid, "field": None,
                "old_value": None, "new_value": json.dumps(payload, ensure_ascii=False),
                "reason": reason,
            }],
        )  # fmt: skip
        con.commit()
    except Exception:
        con.rollback()
        raise
    stats.applied += 1
    stats.records += 1
    stats.applied_rows.append({**op, "crm_id": new_id})


def _refused(ops: pd.DataFrame, exc: ApiError, mapping: Any) -> set[str]:
    """The operations a server refusal is about: those whose field the server named (Unleashed's
    `Items[].Field`, the CRM's `error.details[].target`), else the only operation of the
    request. Empty when the refusal did not come from a server (e.g. a reference that did not
    resolve at apply time: retried)."""
    if not isinstance(exc, ValidationError) or exc.status is None:
        return set()
    named = {f.lower() for f in _named_fields(exc)}
    if named and mapping is not None:
        hit = set()
        for op_id, name, op in zip(ops["op_id"], ops["field"], ops["op"], strict=True):
            spec = mapping.fields.get(name) if isinstance(name, str) else None
            if spec is None:
                continue
            crm = op == "update_crm"
            path, ref = (spec.crm, spec.crm_write) if crm else (spec.erp, spec.erp_write)
            tops = {path.split(".")[0].lower()}
            if ref is not None:
                tops.add(ref.field.lower())
            if tops & named:
                hit.add(op_id)
        if hit:
            return hit
    return set(ops["op_id"]) if len(ops) == 1 else set()


def _named_fields(exc: ApiError) -> list[str]:
    """The fields a refusal names: Unleashed's problem items, or the CRM's error details."""
    fields = list(getattr(exc, "fields", []) or [])
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details or []:
        if isinstance(detail, dict) and isinstance(detail.get("target"), str):
            fields.append(detail["target"])
    return fields


def _mark_in_flight(con: duckdb.DuckDBPyConnection, ops: pd.DataFrame) -> None:
    for op_id in ops["op_id"]:
        store.mark(con, op_id, "in_flight")


def _complete_updates(
    con: duckdb.DuckDBPyConnection,
    entity: str,
    ops: pd.DataFrame,
    run_id: str,
    direction: str,
    stats: ApplyStats,
) -> None:
    rows = ops.to_dict("records")
    con.begin()
    try:
        baseline.record_agreement(
            con,
            entity,
            [
                {"erp_id": r["erp_id"], "field": r["field"], "value": _text(r["new_value"])}
                for r in rows
            ],
        )
        for r in rows:
            store.complete(con, r, run_id=run_id, direction=direction)
        con.commit()
    except Exception:
        con.rollback()
        raise
    stats.applied += len(rows)
    stats.records += 1
    stats.applied_rows.extend(rows)


def _fail(
    con: duckdb.DuckDBPyConnection,
    ops: pd.DataFrame,
    exc: ApiError,
    stats: ApplyStats,
    mapping: Any = None,
    retry: WriteRetry | None = None,
) -> None:
    retry_later = isinstance(exc, TransientApiError)
    message = str(exc)
    refused = _refused(ops, exc, mapping)
    # Which of them may have been written, by this run or an earlier one: every write is
    # preceded by marking its operations in flight. A request that fails before that (the read
    # of read-merge-write) wrote nothing, whatever the failure may mean for that request.
    sent = {
        r[0]
        for r in con.execute(
            """SELECT op_id FROM outbox WHERE status IN ('in_flight', 'in_doubt')
               AND op_id IN (SELECT unnest(?::VARCHAR[]))""",
            [list(ops["op_id"])],
        ).fetchall()
    }
    now = store.utcnow()
    for op in ops.to_dict("records"):
        op_id = op["op_id"]
        # A value the server refused (400/409/422) is not resent while it is the same change:
        # the plan reports it as a rejection. A transient failure after an ambiguous write stays
        # in flight so the next run checks before redoing; anything else is failed and retried
        # on the next run (other fields of a refused record then go without the refused one).
        if op_id in refused:
            status = "refused"
        elif retry_later and exc.maybe_applied and op_id in sent:
            status = "in_flight"
        else:
            status = "failed"
        store.mark(con, op_id, status, message, sending=False)
        when = _retry_time(con, op_id, status, exc, retry, now)
        stats.retry_at = when
        stats.failures.append(
            {
                "entity": op["entity"],
                "crm_id": _text(op.get("crm_id")),
                "erp_id": _text(op.get("erp_id")),
                "field": _text(op.get("field")) or op["op"],
                "left": status,
                "reason": message,
                "retry": _retry_note(status, exc, when, retry),
            }
        )
    stats.failed += len(ops)
    stats.errors.append(message)
    log.warning("%s", message)


def _retry_time(
    con: duckdb.DuckDBPyConnection,
    op_id: str,
    status: str,
    exc: ApiError,
    retry: WriteRetry | None,
    now: datetime,
) -> datetime | None:
    """When the retry sensor tries a failed operation again. A failure that passes (the target
    down, a timeout, 429s) after a backoff that doubles per failed try, up to the settings'
    bound; a used-up usage limit at its reset (not counted: nothing was tried). A refusal of the
    value, bad credentials or a reference that did not resolve are not retried on their own:
    they need a person, and the next planned run tries again."""
    if status == "refused":
        return None
    if isinstance(exc, UsageLimitError):
        when = store.to_naive_utc(exc.resets_at) if retry is not None and retry.enabled else None
    else:
        failures = store.count_failure(con, op_id)
        transient = isinstance(exc, TransientApiError)
        when = retry.next_attempt(failures, now) if retry is not None and transient else None
    store.schedule_retry(con, [op_id], when)
    return when


def _retry_note(status: str, exc: ApiError, when: datetime | None, retry: WriteRetry | None) -> str:
    if status == "refused":
        return "no: refused by the server (a rejection until the value changes)"
    if when is not None:
        return f"automatically from {when:%Y-%m-%d %H:%M:%S} UTC"
    if retry is None or not retry.enabled:
        return "at the next planned run (automatic retries are off)"
    if isinstance(exc, TransientApiError):
        return f"at the next planned run ({retry.max_attempts} automatic tries used up)"
    return "at the next planned run (not a failure that passes on its own)"


def _leave_untried(
    con: duckdb.DuckDBPyConnection,
    groups: list[tuple[Any, pd.DataFrame]],
    i: int,
    stats: ApplyStats,
) -> None:
    """The operations a stopped run did not try come back with the failure that stopped it
    (at its retry time, or at the next planned run when it has none)."""
    ids = [op_id for _, ops in groups[i + 1 :] for op_id in ops["op_id"]]
    stats.not_tried = len(ids)
    store.schedule_retry(con, ids, stats.retry_at)
