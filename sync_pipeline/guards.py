"""Tenant guards: when two-way sync must refuse to run, and why."""

from __future__ import annotations

from sync_pipeline.clients.crm import CrmClient


def two_way_refusal(crm: CrmClient) -> str | None:
    """A reason two-way sync must not run for this CRM tenant, or None when it may."""
    reason = crm.tenant_facts().refusal_reason()
    if reason is None:
        return None
    return (
        f"Two-way sync refused: {reason}. Nothing was written. The standard import of new "
        "Unleashed customers and contacts continues."
    )
