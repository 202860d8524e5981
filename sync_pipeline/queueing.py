"""From a plan to the outbox: what of a plan may be written, and putting it there before any call.

A plan (the planner's rows) is written only when nothing stops it:

- the CRM tenant guard refuses two-way sync (`guards.two_way_refusal`): nothing is written;
- two-way sync is off in the settings: only creations from Unleashed (the standard import);
- shadow mode: nothing is queued; the writes are shown and kept in `shadow_plan`;
- the mass-change brake holds the plan (`brake`): nothing is queued until an operator releases
  that very plan by its id.

A change the target refused before is turned into a rejection first, so the brake measures and
the outbox receives only what would really be sent. The apply steps ask `apply_block` before
writing: the same reasons, read back from the state this step left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline import brake, duck, preflight, shadow, store
from sync_pipeline.core import CREATE_OPS, UPDATE_OPS, Side
from sync_pipeline.decide import quote
from sync_pipeline.settings import Settings

# The guard's refusal as the plan step saw it, for the apply steps of the same run.
REFUSAL_KEY = "two_way_refusal"

SHADOW_SKIP = (
    "Shadow mode is on in settings: nothing written (the plan's shadow_preview shows what "
    "would have been)."
)
TWO_WAY_OFF_PUSH = "Two-way sync is off in settings: nothing pushed to Unleashed."


@dataclass(frozen=True)
class Plan:
    """A plan as the planner made it (`rows`, one per operation, `diff.PLAN_COLUMNS`), with
    what decides how much of it may be written."""

    rows: pd.DataFrame
    two_way: bool
    refusal: str | None = None

    @property
    def allowed_ops(self) -> set[str]:
        """Creations from Unleashed (the standard import) whatever the options; updates only
        with two-way sync on; nothing while the tenant guard refuses."""
        if self.refusal:
            return set()
        return set(CREATE_OPS) | (set(UPDATE_OPS) if self.two_way else set())

    def writable(self) -> pd.DataFrame:
        """The rows a run would write."""
        if self.rows.empty:
            return self.rows
        return self.rows[self.rows["op"].isin(self.allowed_ops)]

    def op_counts(self) -> dict[str, int]:
        if self.rows.empty:
            return {}
        return {str(k): int(v) for k, v in self.rows["op"].value_counts().items()}

    def conflicts(self) -> int:
        if self.rows.empty:
            return 0
        return int(self.rows["conflict"].fillna(False).astype(bool).sum())


@dataclass
class Queued:
    """What the plan step did with a plan: queued it (`queued` operations), or held it back
    (shadow mode, the brake), with the rejections recorded either way."""

    plan: Plan
    verdict: brake.BrakeResult
    released: bool = False  # the operator released the held plan it names
    queued: int = 0
    rejections: dict[str, Any] = field(default_factory=dict)
    conflicts: int = 0
    shadow: dict[str, Any] = field(default_factory=dict)  # shadow mode's metadata

    @property
    def held(self) -> bool:
        """The brake holds this plan (not released); in shadow mode nothing is written anyway."""
        return self.verdict.held and not self.released


def queue(
    con: duckdb.DuckDBPyConnection,
    plan: Plan,
    settings: Settings,
    run_id: str,
    *,
    first_connection: bool,
    release_plan_id: str = "",
) -> Queued:
    """Record the plan's rejections and conflicts and put what may run into the outbox, unless
    shadow mode or the mass-change brake holds it back (then the outbox is left as it is and
    the records stay pending). `first_connection` is `brake.is_first_connection` before
    planning."""
    plan = Plan(refused_as_rejections(con, plan.rows), plan.two_way, plan.refusal)
    verdict = brake.evaluate(
        con, plan.writable(), settings.mass_change_brake, first_connection=first_connection
    )
    release = release_plan_id.strip()
    released = verdict.held and bool(release) and release == verdict.plan_id
    result = Queued(plan=plan, verdict=verdict, released=released)
    if settings.shadow_mode or result.held:
        store.set_state(con, REFUSAL_KEY, plan.refusal)
        result.rejections = store.sync_rejections(con, plan.rows)
        if settings.shadow_mode:
            shown = shadow.writes(plan.writable())
            shadow.record(con, shown, run_id)
            result.shadow = shadow.metadata(shown)
        else:
            brake.hold(con, verdict, run_id)
        return result
    brake.clear(con)
    brake.mark_live(con)
    result.queued, result.rejections, result.conflicts = _enqueue(con, plan, run_id)
    return result


def _enqueue(
    con: duckdb.DuckDBPyConnection, plan: Plan, run_id: str
) -> tuple[int, dict[str, Any], int]:
    """Rejections, conflicts, then the outbox (before any call): (queued, rejections,
    conflicts)."""
    store.set_state(con, REFUSAL_KEY, plan.refusal)
    rejections = store.sync_rejections(con, plan.rows)
    allowed = plan.allowed_ops
    ops = plan.writable()
    keep = store.op_keys(ops)
    # Conflicts decided this pass, including those whose winning value is refused (the decision
    # stands while neither value changes); not while updates are off, when nothing is decided.
    updates = plan.two_way and not plan.refusal
    decided = plan.rows[plan.rows["op"].isin([*allowed, "reject"])] if updates else ops
    conflicts = store.record_conflicts(con, decided, run_id)
    store.supersede(con, keep, (*UPDATE_OPS, *CREATE_OPS))
    queued = store.enqueue(con, ops, run_id, keep)
    return queued, rejections, conflicts


def refused_as_rejections(con: duckdb.DuckDBPyConnection, plan: pd.DataFrame) -> pd.DataFrame:
    """A change the target system refused (HTTP 400/409/422: apply marks it `refused`) is not
    sent again while it is the same change: it becomes a rejection naming the record, the field,
    the value and the server's reason. A new value (or the other side agreeing) ends it."""
    refused = store.refused(con)
    if not refused or plan.empty:
        return plan
    sub = plan[plan["op"].isin([*UPDATE_OPS, *CREATE_OPS])]
    keys = dict(zip(sub.index, store.op_keys(sub), strict=True))
    hits = {i: k for i, k in keys.items() if k in refused}
    if not hits:
        return plan
    plan = plan.copy()
    changed = []
    for i, key in hits.items():
        row = plan.loc[i]
        what = row["field"] if isinstance(row["field"], str) else "the new record"
        reason = (
            f"{row['entity']} (CRM {row['crm_id']} / Unleashed {row['erp_id']}): {what} "
            f"{quote(row['new_value'] if isinstance(row['new_value'], str) else '')} was refused: "
            f"{refused[key]}; not sent again until the value changes ({row['reason']})"
        )
        changed.append({k: row[k] for k in ("entity", "op", "crm_id", "erp_id", "field")})
        changed[-1]["reason"] = reason
        plan.at[i, "reason"] = reason
        plan.at[i, "op"] = "reject"
    # The DuckDB table `sync_plan` shows what the run does, as the DataFrame does.
    duck.register(con, "_refused_rows", pd.DataFrame(changed).astype(object))
    try:
        con.execute(
            """UPDATE sync_plan p SET op = 'reject', reason = r.reason FROM _refused_rows r
               WHERE p.entity = r.entity AND p.op = r.op
                 AND p.erp_id IS NOT DISTINCT FROM r.erp_id
                 AND p.crm_id IS NOT DISTINCT FROM r.crm_id
                 AND p.field IS NOT DISTINCT FROM r.field"""
        )
    finally:
        con.unregister("_refused_rows")
    return plan


@dataclass(frozen=True)
class Block:
    """Why an apply step writes nothing now, and how loudly its log says so: `error` for a
    refusal or a configuration that cannot write to the CRM, `warning` for a held plan or shadow
    mode, `info` for what the settings ask (and for a push that may do nothing)."""

    why: str
    level: str = "info"


def held(con: duckdb.DuckDBPyConnection, settings: Settings | None = None) -> str | None:
    """Why nothing may be written now by choice: shadow mode, or the mass-change brake holds
    the latest plan."""
    if settings is not None and settings.shadow_mode:
        return SHADOW_SKIP
    hold = brake.active_hold(con)
    return brake.hold_message(hold) if hold else None


def apply_block(
    con: duckdb.DuckDBPyConnection,
    mappings: dict[str, Any],
    settings: Settings,
    target: Side,
) -> Block | None:
    """Why the apply step writing to `target` writes nothing now, or None: the tenant guard's
    refusal the plan step recorded, a configuration that cannot write, two-way sync off (for a
    push: the CRM still receives creations), shadow mode, or a held plan."""
    refusal = store.get_state(con, REFUSAL_KEY) or preflight.write_block(con, mappings)
    if target == "erp" and (refusal or not settings.two_way_sync):
        return Block(refusal or TWO_WAY_OFF_PUSH)
    if refusal:
        return Block(refusal, "error")
    why = held(con, settings)
    return Block(why, "warning") if why else None
