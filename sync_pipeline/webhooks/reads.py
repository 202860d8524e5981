"""Targeted reads: the customers named by webhook events, one `GET /Customers/{guid}` each
(with their first 100 contacts), into the same snapshot tables and through the same upserts as
the import, so links, derived columns and pending operations see them as imported.

The import's cursor (`unleashed/customers`) is left alone: the next import still reads
everything changed since its own last window, which is how a lost delivery is caught.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb

from sync_pipeline import store
from sync_pipeline.clients.base import ApiError, NotFoundError
from sync_pipeline.clients.unleashed import UnleashedClient
from sync_pipeline.extract import EMBEDDED_CONTACTS_LIMIT, contact_snapshot, customer_snapshot


@dataclass
class ReadStats:
    customers_read: int = 0
    customers_changed: int = 0
    contacts_changed: int = 0
    contacts_removed: int = 0
    customers_gone: list[str] = field(default_factory=list)
    left_to_import: list[str] = field(default_factory=list)  # malformed: the import reports it
    bad: list[Any] = field(default_factory=list)
    requests: int = 0

    def metadata(self) -> dict[str, Any]:
        return {
            "customers_read": self.customers_read,
            "customers_changed": self.customers_changed,
            "contacts_changed": self.contacts_changed,
            "contacts_removed_in_unleashed": self.contacts_removed,
            "customers_gone": len(self.customers_gone),
            "left_to_the_import": ", ".join(self.left_to_import) or "-",
            "bad_records": len(self.bad),
            "api_requests": self.requests,
        }


def read_customers(
    con: duckdb.DuckDBPyConnection, client: UnleashedClient, guids: list[str]
) -> ReadStats:
    """Read each customer once (a guid named by several events too) and store it."""
    stats = ReadStats()
    before = client.stats.total
    customers, contacts, present, parents = [], [], [], []
    parent_modified: dict[str, datetime | None] = {}
    for guid in dict.fromkeys(g.lower() for g in guids):
        try:
            customer, bads = client.get_customer_and_contacts(guid)
        except NotFoundError:
            stats.customers_gone.append(guid)  # deleted in Unleashed
            continue
        except ApiError as exc:
            if exc.status != 200:
                raise  # Unleashed did not answer: the run fails and the events wait
            stats.left_to_import.append(guid)  # read, but malformed
            continue
        stats.customers_read += 1
        wire = customer.to_wire()
        embedded = wire.get("Contacts") or []
        if len(embedded) >= EMBEDDED_CONTACTS_LIMIT:
            embedded = [c.to_wire() for c in client.list_contacts(guid)]
        customers.append(customer_snapshot(guid, wire, customer.LastModifiedOn))
        stats.bad.extend(bads)
        # A contact set aside leaves the list incomplete: nothing of it is read as deleted.
        if not any(getattr(b, "parent_id", None) for b in bads):
            parents.append(guid)
        parent_modified[guid] = customer.LastModifiedOn
        for c in embedded:
            if c.get("Guid"):
                present.append(str(c["Guid"]))
                contacts.append(contact_snapshot(str(c["Guid"]), guid, c, customer.LastModifiedOn))
    stats.customers_changed = store.upsert_snapshot(con, "unleashed_customers", customers).written
    stats.contacts_changed = store.upsert_snapshot(con, "unleashed_contacts", contacts).written
    stats.contacts_removed = store.deactivate_missing_children(
        con, "unleashed_contacts", parents, present, parent_modified
    )
    store.record_bad_records(con, stats.bad)
    if stats.customers_gone:
        _deactivate(con, stats.customers_gone)
    stats.requests = client.stats.total - before
    return stats


def _deactivate(con: duckdb.DuckDBPyConnection, guids: list[str]) -> None:
    """Customers Unleashed no longer has, and their contacts: inactive, as an import marks what
    its source no longer lists (the mark cleared so the planner looks at them again)."""
    for table, column in (("unleashed_customers", "id"), ("unleashed_contacts", "parent_id")):
        con.execute(
            f"UPDATE {table} SET active = FALSE, extracted_at = ?, {store.DERIVED_MARK} = NULL "
            f"WHERE active AND {column} IN (SELECT unnest(?::VARCHAR[]))",
            [store.utcnow(), guids],
        )
