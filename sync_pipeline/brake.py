"""The mass-change brake: a plan that would change an unusual share of the linked records, or
blank many values, is held before anything is queued, and written only once an operator
releases that very plan (by its id) or fixes the cause.

A plan's id is a digest of the keys of its write operations (`store.op_keys`: record, field,
the value replaced, the new value, the agreed value), so planning the same data again gives the
same id, and any change to what it would write gives another. A release names the id the
operator reviewed; the release run plans again, and writes only if the plan is still that one.

The hold is kept in `sync_state` (`HOLD_KEY`) while the latest plan exceeds the limits: every
apply step (push, pull, the overnight account-manager fix) writes nothing while it is there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline import store
from sync_pipeline.core import CREATE_OPS, UPDATE_OPS
from sync_pipeline.settings import MassChangeBrake

HOLD_KEY = "mass_change_hold"
WRITE_OPS = (*UPDATE_OPS, *CREATE_OPS)
EXAMPLES = 10  # example changes in the check's metadata
RELEASE_JOB = "mass_change_release_job"


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


LIVE_KEY = "live_since"


def is_first_connection(con: duckdb.DuckDBPyConnection) -> bool:
    """The sync has never queued a live plan (shadow runs do not count) nor written anything."""
    if store.get_state(con, LIVE_KEY):
        return False
    return con.execute("SELECT 1 FROM audit_log LIMIT 1").fetchone() is None


def mark_live(con: duckdb.DuckDBPyConnection) -> None:
    """A live plan was queued: from now on the share of changed records is held too."""
    if not store.get_state(con, LIVE_KEY):
        store.set_state(con, LIVE_KEY, f"{store.utcnow():%Y-%m-%d %H:%M:%S}")


def plan_id(plan: pd.DataFrame) -> str | None:
    """The id of what a plan would write (None: it writes nothing)."""
    writes = plan[plan["op"].isin(WRITE_OPS)] if not plan.empty else plan
    if writes.empty:
        return None
    digest = hashlib.sha256("\n".join(sorted(store.op_keys(writes))).encode()).hexdigest()
    return digest[:16]


def linked_records(con: duckdb.DuckDBPyConnection) -> int:
    (n,) = con.execute(
        "SELECT (SELECT count(*) FROM company_links) + (SELECT count(*) FROM contact_links)"
    ).fetchone()
    return int(n)


@dataclass
class BrakeResult:
    plan_id: str | None
    changed_records: int
    linked_records: int
    blanked_values: int
    values_written: int
    creations: int
    first_connection: bool
    limits: MassChangeBrake
    reasons: list[str] = field(default_factory=list)  # why it is held; empty: it is not
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return bool(self.reasons)

    @property
    def share(self) -> float:
        return self.changed_records / self.linked_records if self.linked_records else 0.0

    def summary(self) -> str:
        what = (
            f"this plan would change {self.changed_records:,} of the {self.linked_records:,} "
            f"linked records ({self.share:.1%}), {self.values_written:,} values, blanking "
            f"{self.blanked_values:,} of them, and create {self.creations:,} CRM records"
        )
        if not self.held:
            return what[0].upper() + what[1:]
        return (
            f"Held by the mass-change brake: {'; '.join(self.reasons)}. Nothing was written in "
            f"either direction. {what[0].upper() + what[1:]}. Review the changes below; if they "
            f"are right, launch {RELEASE_JOB} with release_plan_id: {self.plan_id}, else fix "
            "the cause (the next run plans again)"
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id or "(nothing to write)",
            "linked_records": self.linked_records,
            "records_changed": self.changed_records,
            "share_changed": f"{self.share:.1%}",
            "values_written": self.values_written,
            "values_blanked": self.blanked_values,
            "records_created": self.creations,
            "limits": self.limits.describe(),
            "first_connection": self.first_connection,
        }


def evaluate(
    con: duckdb.DuckDBPyConnection,
    plan: pd.DataFrame,
    limits: MassChangeBrake,
    *,
    first_connection: bool,
) -> BrakeResult:
    """Measure a plan against the brake's limits.

    Changed records: linked records with at least one value to write, either way (first
    agreements of new links included). On a first connection (nothing agreed yet) every linked
    record is a first agreement, so the share is not held (shadow mode is how a first connection
    is reviewed); blanking still is, though a first agreement never blanks a value."""
    if plan.empty:
        updates = plan
        creations = 0
    else:
        updates = plan[plan["op"].isin(UPDATE_OPS)]
        creations = int(plan["op"].isin(CREATE_OPS).sum())
    linked = linked_records(con)
    if updates.empty:
        changed, blanks, examples = 0, pd.DataFrame(), []
    else:
        changed = int(updates[["entity", "erp_id"]].drop_duplicates().shape[0])
        before = updates["erp_value"].where(updates["op"] == "update_erp", updates["crm_value"])
        before = before.map(_text)
        after = updates["new_value"].map(_text)
        blank = (after.str.strip() == "") & (before.str.strip() != "")
        blanks = updates[blank]
        shown = pd.concat([blanks, updates[~blank]]).head(EXAMPLES)
        examples = [
            {
                "direction": "CRM → Unleashed" if r["op"] == "update_erp" else "Unleashed → CRM",
                "entity": r["entity"],
                "crm_id": _text(r["crm_id"]),
                "erp_id": _text(r["erp_id"]),
                "field": _text(r["field"]),
                "change": f"{_q(before[i])} → {_q(after[i])}",
            }
            for i, r in shown.iterrows()
        ]
    result = BrakeResult(
        plan_id=plan_id(plan),
        changed_records=changed,
        linked_records=linked,
        blanked_values=len(blanks),
        values_written=len(updates),
        creations=creations,
        first_connection=first_connection,
        limits=limits,
        examples=examples,
    )
    if not limits.enabled:
        return result
    if (
        not first_connection
        and linked
        and result.share > limits.max_changed_share
        and changed > limits.min_changed_records
    ):
        result.reasons.append(
            f"{changed:,} of {linked:,} linked records would change ({result.share:.1%}, over "
            f"the {limits.max_changed_share:.0%} limit and more than "
            f"{limits.min_changed_records:,} records)"
        )
    if result.blanked_values > limits.max_blanked_values:
        result.reasons.append(
            f"{result.blanked_values:,} filled values would be blanked (over the limit of "
            f"{limits.max_blanked_values:,})"
        )
    return result


def _q(value: str) -> str:
    from sync_pipeline.decide import quote

    return quote(value)


def hold(con: duckdb.DuckDBPyConnection, result: BrakeResult, run_id: str) -> None:
    """Record that the latest plan is held (every apply step writes nothing meanwhile)."""
    previous = active_hold(con)
    since = (
        previous["held_since"]
        if previous and previous.get("plan_id") == result.plan_id
        else f"{store.utcnow():%Y-%m-%d %H:%M:%S}"
    )
    store.set_state(
        con,
        HOLD_KEY,
        json.dumps(
            {
                "plan_id": result.plan_id,
                "run_id": run_id,
                "held_since": since,
                "why": "; ".join(result.reasons),
            }
        ),
    )


def clear(con: duckdb.DuckDBPyConnection) -> None:
    if store.get_state(con, HOLD_KEY) is not None:
        store.set_state(con, HOLD_KEY, None)


def active_hold(con: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
    value = store.get_state(con, HOLD_KEY)
    return json.loads(value) if value else None


def hold_message(hold_state: dict[str, Any]) -> str:
    return (
        f"The mass-change brake holds plan {hold_state['plan_id']} (since "
        f"{hold_state['held_since']} UTC: {hold_state['why']}): nothing is written until it is "
        f"released ({RELEASE_JOB}) or the cause is fixed"
    )
