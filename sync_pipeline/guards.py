"""Tenant guards: when two-way sync must refuse to run, and why."""

from __future__ import annotations

from sync_pipeline.clients.crm import CrmClient


def two_way_refusal(crm: CrmClient) -> str | None:
    """A reason two-way sync must not run for this CRM tenant, or None when it may."""
    facts = crm.tenant_facts()
    reasons = []
    if facts.operating_companies > 1:
        reasons.append(
            f"the CRM tenant has {facts.operating_companies} operating companies "
            "(two-way sync supports exactly one)"
        )
    if facts.advanced_ledgers:
        reasons.append("the CRM tenant has advanced ledgers enabled")
    if not reasons:
        return None
    return (
        "Two-way sync refused: "
        + " and ".join(reasons)
        + ". Nothing was written. The standard import of new Unleashed customers and contacts "
        "continues."
    )
