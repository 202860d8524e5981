"""The vocabulary shared by planning, queueing, applying and reporting: the two sides, the
operations a plan holds, and the conflict policies. Defined once here; the mapping schema, the
settings, the planner and apply read these names instead of spelling them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypedDict, get_args

# The two systems: the CRM (Prospect) and the ERP (Unleashed).
Side = Literal["crm", "erp"]
SIDES: tuple[Side, ...] = get_args(Side)
SIDE_NAMES: dict[Side, str] = {"crm": "CRM", "erp": "Unleashed"}

# What a plan row asks for. `update_erp` writes a field to Unleashed, `update_crm` to the CRM;
# creations only ever go to the CRM (contacts created in the CRM never reach Unleashed); a
# `reject` is a change not made, with its reason.
Op = Literal["update_erp", "update_crm", "create_crm_company", "create_crm_contact", "reject"]
UPDATE_OPS: tuple[Op, ...] = ("update_erp", "update_crm")
CREATE_OPS: tuple[Op, ...] = ("create_crm_contact", "create_crm_company")
TARGET: dict[Op, Side] = {
    "update_erp": "erp",
    "update_crm": "crm",
    "create_crm_company": "crm",
    "create_crm_contact": "crm",
}


class Operation(TypedDict):
    """One write, as the plan step queues it in the outbox (`schema/001_tables.sql`, `outbox`)
    and apply reads it back: what to write where, and how far it got."""

    op_id: str
    op_key: str  # the same change planned again has the same key (`store.op_keys`)
    run_id: str | None  # the run that planned it
    created_at: datetime
    entity: str  # a mapping's entity: "company" or "contact"
    op: Op
    crm_id: str | None
    erp_id: str | None
    crm_parent_id: str | None
    erp_parent_id: str | None
    field: str | None  # a mapping field; None for a creation
    old_value: str | None  # what the target held when planned
    new_value: str | None
    payload: Any  # a creation's record (JSON)
    conflict: bool | None
    policy: str | None
    reason: str | None
    status: str  # pending, in_flight, in_doubt, failed, refused, deferred, superseded, applied
    attempts: int
    last_error: str | None
    applied_at: datetime | None
    result_id: str | None  # a creation's new record (or the parent it made first: `Key=id`)
    failures: int | None
    next_attempt_at: datetime | None


# Conflict policies: who wins when both sides changed a field since they last agreed.
Policy = Literal["newest", "crm", "erp"]
POLICIES: dict[Policy, str] = {
    "newest": "the side whose value of the field changed later wins",
    "crm": "the CRM wins",
    "erp": "Unleashed wins",
}
# First agreement (no agreed value yet): which side's value both take. `newest` is allowed in
# the planner's API; the settings offer `crm` and `erp`.
InitialPolicy = Literal["crm", "erp"]
# The policy recorded when first agreement fills an empty value from the other side.
FILLED_POLICY = "initial:filled"


def check_policy(value: str, what: str) -> Policy:
    """`value` as a policy, or a ValueError naming `what` and the policies there are."""
    if value not in POLICIES:
        raise ValueError(f"{what}={value!r}: expected one of {', '.join(POLICIES)}")
    return value  # type: ignore[return-value]
