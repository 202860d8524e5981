"""Extract both systems into the DuckDB snapshot tables, incrementally by modification time.

Each extract asks only for what changed since the stored high-water mark minus an overlap window
(clock skew, records committed late), and upserts monotonically, so re-running is harmless.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb

from sync_pipeline import store
from sync_pipeline.clients.crm import (
    TIMESTAMP_FIELD,
    CrmClient,
    format_timestamp,
    parse_timestamp,
)
from sync_pipeline.clients.unleashed import UnleashedClient
from sync_pipeline.mapping import EntityMapping

# Unleashed returns at most this many contacts inside a customer (includeAllContacts).
EMBEDDED_CONTACTS_LIMIT = 100


@dataclass
class CrmSource:
    """One CRM entity set and the snapshot table it fills. Without a `modified` field the set
    has no change timestamp and is read in full every time (users: one request per 500)."""

    name: str
    entity_set: str
    table: str
    key: str
    modified: str | None = TIMESTAMP_FIELD
    parent_field: str | None = None
    expand: str | None = None
    active: Any = None  # callable(record) -> bool

    def is_active(self, record: dict[str, Any]) -> bool:
        return True if self.active is None else bool(self.active(record))


def _status_active(record: dict[str, Any]) -> bool:
    """'A' active; 'D' deleted (the live service still returns deleted rows)."""
    return (record.get("StatusFlag") or "A") != "D"


def crm_expand(mapping: EntityMapping) -> str | None:
    """The `$expand` a mapping's CRM records are read with: its own, plus the navigation to the
    custom-field slot that holds the Unleashed Guid."""
    link = mapping.crm.link
    parts = [*mapping.crm.expand, f"{link.navigation}($select={link.field})"]
    return ",".join(dict.fromkeys(parts))


def crm_sources(mappings: dict[str, EntityMapping]) -> dict[str, CrmSource]:
    """The CRM extracts: companies and contacts as the mappings name them, and the users."""
    company, contact = mappings["company"].crm, mappings["contact"].crm
    return {
        "companies": CrmSource(
            "crm/companies", company.entity_set, company.table, company.key, company.modified,
            expand=crm_expand(mappings["company"]), active=_status_active,
        ),
        "contacts": CrmSource(
            "crm/contacts", contact.entity_set, contact.table, contact.key, contact.modified,
            parent_field=contact.parent_key, expand=crm_expand(mappings["contact"]),
            active=_status_active,
        ),
        "users": CrmSource(
            "crm/users", "Users", "crm_users", "UserCode", modified=None,
            active=lambda r: not r.get("Obsolete"),
        ),
    }  # fmt: skip


@dataclass
class ExtractStats:
    source: str
    since: datetime | None
    received: int = 0
    written: int = 0
    deactivated: int = 0
    bad: list[Any] = field(default_factory=list)
    reported_total: int | None = None
    requests: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else "(full load)",
            "rows_received": self.received,
            "rows_changed": self.written,
            "rows_deactivated": self.deactivated,
            "bad_records": len(self.bad),
            "api_requests": self.requests,
            **self.extra,
        }


def _since(
    con: duckdb.DuckDBPyConnection, source: str, full_refresh: bool, overlap: timedelta
) -> datetime | None:
    if full_refresh:
        return None
    high = store.get_high_water(con, source)
    # DuckDB holds naive UTC; the clients and partition windows speak aware UTC.
    return None if high is None else high.replace(tzinfo=UTC) - overlap


def extract_crm(
    con: duckdb.DuckDBPyConnection,
    crm: CrmClient,
    source: CrmSource,
    *,
    full_refresh: bool = False,
    overlap: timedelta = timedelta(seconds=120),
) -> ExtractStats:
    """Read what changed since the cursor (everything, for a set without a timestamp) and
    upsert it. The cursor kept is the newest timestamp read, but never later than when this
    read began: a record changed while the pages were read may have been seen in its older
    version, and the next read starts early enough to see it again."""
    started = datetime.now(UTC)
    timestamped = source.modified is not None
    since = _since(con, source.name, full_refresh or not timestamped, overlap)
    before = crm.stats.total
    flt = f"{source.modified} gt {format_timestamp(since)}" if since else None
    result = crm.list(source.entity_set, filter=flt, expand=source.expand)
    rows = []
    for rec in result.items:
        rows.append(
            store.SnapshotRow(
                id=str(rec[source.key]),
                parent_id=(
                    None
                    if source.parent_field is None or rec.get(source.parent_field) is None
                    else str(rec.get(source.parent_field))
                ),
                modified=parse_timestamp(rec[source.modified]) if timestamped else None,
                active=source.is_active(rec),
                data=rec,
            )
        )
    if not timestamped:
        rows = _changed_only(con, source.table, rows)
    upserted = store.upsert_snapshot(con, source.table, rows)
    store.record_bad_records(con, result.bad)
    store.resolve_bad_records(
        con, "CRM", f"GET /{source.entity_set}", [r.id for r in rows],
        still_bad=result.bad, complete=since is None,
    )  # fmt: skip
    high = max((r.modified for r in rows if r.modified), default=None)
    store.set_extract_state(
        con,
        source.name,
        high_water=None if high is None else min(high, started),
        reported_total=result.reported_total,
        rows_received=len(result.items) + len(result.bad),
    )
    return ExtractStats(
        source=source.name,
        since=since,
        received=len(result.items),
        written=upserted.written,
        bad=list(result.bad),
        reported_total=result.reported_total,
        requests=crm.stats.total - before,
    )


def _changed_only(
    con: duckdb.DuckDBPyConnection, table: str, rows: list[store.SnapshotRow]
) -> list[store.SnapshotRow]:
    """The rows of a full read that differ from what the table holds (a set without a change
    timestamp is read whole each time; only its real changes are written)."""
    held = {
        rid: (json.loads(data), active)
        for rid, data, active in con.execute(f"SELECT id, data, active FROM {table}").fetchall()
    }
    return [r for r in rows if held.get(r.id) != (r.data, r.active)]


def customer_snapshot(
    guid: str, wire: dict[str, Any], modified: datetime | None
) -> store.SnapshotRow:
    """An Unleashed customer (wire form) as `unleashed_customers` holds it: without its
    contacts (they have their own table), active unless obsolete. The import and apply's
    write-through both store customers this way."""
    data = {k: v for k, v in wire.items() if k != "Contacts"}
    return store.SnapshotRow(
        id=guid, modified=modified, active=not bool(data.get("Obsolete")), data=data
    )


def contact_snapshot(
    guid: str, customer_guid: str, wire: dict[str, Any], modified: datetime | None
) -> store.SnapshotRow:
    """An Unleashed contact (wire form) as `unleashed_contacts` holds it: under its customer,
    with the customer's modified time (a contact has none of its own; None keeps the stored
    one). The import and apply's write-through both store contacts this way."""
    return store.SnapshotRow(
        id=guid, parent_id=customer_guid, modified=modified, active=True, data=wire
    )


def extract_unleashed_customers(
    con: duckdb.DuckDBPyConnection,
    client: UnleashedClient,
    *,
    window_start: datetime | None,
    full_refresh: bool = False,
    overlap: timedelta = timedelta(seconds=120),
) -> ExtractStats:
    """Customers with their contacts (same pages); contacts of big customers fetched separately.

    `since` is the earlier of the partition window's start and the stored high-water mark, so a
    scheduled window also catches up on anything missed since the last successful import, and a
    backfilled window re-reads exactly from its own start.
    """
    source = "unleashed/customers"
    since = _since(con, source, full_refresh, overlap)
    if window_start is not None and not full_refresh and since is not None:
        since = min(since, window_start - overlap)
    before = client.stats.total
    # Ordered by creation: an edit made while we page does not shift the pages (it would with
    # LastModifiedOn), so no customer is skipped.
    result = client.list_customers(
        modified_since=since,
        include_obsolete=True,
        include_all_contacts=True,
        order_by="CreatedOn",
    )
    customers, contacts = [], []
    parents, present, parent_modified = [], [], {}
    big = 0
    for customer in result.items:
        wire = customer.to_wire()
        embedded = wire.get("Contacts") or []
        guid = str(customer.Guid)
        customers.append(customer_snapshot(guid, wire, customer.LastModifiedOn))
        if len(embedded) >= EMBEDDED_CONTACTS_LIMIT:
            big += 1
            embedded = [c.to_wire() for c in client.list_contacts(guid)]
        parents.append(guid)
        parent_modified[guid] = customer.LastModifiedOn
        for c in embedded:
            if not c.get("Guid"):
                continue
            present.append(str(c["Guid"]))
            contacts.append(contact_snapshot(str(c["Guid"]), guid, c, customer.LastModifiedOn))
    up_customers = store.upsert_snapshot(con, "unleashed_customers", customers)
    up_contacts = store.upsert_snapshot(con, "unleashed_contacts", contacts)
    # A customer with a contact set aside as malformed has an incomplete list: a contact missing
    # from it may just be that one, so nothing of that customer is read as deleted.
    incomplete = {b.parent_id for b in result.bad if getattr(b, "parent_id", None)}
    gone = store.deactivate_missing_children(
        con,
        "unleashed_contacts",
        [p for p in parents if p not in incomplete],
        present,
        parent_modified,
    )
    store.record_bad_records(con, result.bad)
    # Contacts are reported under their own Guid: a fixed one is closed by its contact id.
    store.resolve_bad_records(
        con, "Unleashed", "GET /Customers/{page}", [*(r.id for r in customers), *present],
        still_bad=result.bad, complete=since is None,
    )  # fmt: skip
    high = max((r.modified for r in customers if r.modified), default=None)
    store.set_extract_state(
        con,
        source,
        high_water=high,
        reported_total=result.reported_total,
        rows_received=len(customers) + len(result.bad),
    )
    return ExtractStats(
        source=source,
        since=since,
        received=len(customers),
        written=up_customers.written,
        deactivated=gone,
        bad=list(result.bad),
        reported_total=result.reported_total,
        requests=client.stats.total - before,
        extra={
            "contacts_received": len(contacts),
            "contacts_changed": up_contacts.written,
            "contacts_removed_in_unleashed": gone,
            "customers_with_over_100_contacts": big,
        },
    )


def extract_unleashed_salespersons(
    con: duckdb.DuckDBPyConnection, client: UnleashedClient
) -> ExtractStats:
    """Salespersons are few: always read in full (one or two pages)."""
    before = client.stats.total
    result = client.list_salespersons()
    rows = [
        store.SnapshotRow(
            id=str(sp.Guid), modified=sp.LastModifiedOn, active=not bool(sp.Obsolete),
            data=sp.to_wire(),
        )
        for sp in result.items
    ]  # fmt: skip
    upserted = store.upsert_snapshot(con, "unleashed_salespersons", rows)
    store.record_bad_records(con, result.bad)
    store.resolve_bad_records(
        con, "Unleashed", "GET /Salespersons/{page}", [r.id for r in rows],
        still_bad=result.bad, complete=True,
    )  # fmt: skip
    store.set_extract_state(
        con,
        "unleashed/salespersons",
        high_water=max((r.modified for r in rows if r.modified), default=None),
        reported_total=result.reported_total,
        rows_received=len(rows) + len(result.bad),
    )
    return ExtractStats(
        source="unleashed/salespersons",
        since=None,
        received=len(rows),
        written=upserted.written,
        bad=list(result.bad),
        reported_total=result.reported_total,
        requests=client.stats.total - before,
    )
