"""Tenant guards: when two-way sync must refuse to run, and why."""

from __future__ import annotations

from sync_pipeline.clients.crm import CrmClient


def two_way_refusal(crm: CrmClient) -> str | None:
    """A reason the sync must not write to this CRM tenant at all, or None when it may (design
    rule 7: more than one operating company, advanced ledgers, or Prospect's own Unleashed
    integration running beside it)."""
    reason = crm.tenant_facts().refusal_reason()
    if reason is None:
        return None
    return (
        f"Sync refused for this CRM tenant: {reason}. Nothing was written: neither two-way "
        "updates nor the standard import of new Unleashed customers and contacts."
    )
