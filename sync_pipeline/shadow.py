"""Shadow mode: every run extracts and plans as usual, and reports what it would write instead
of writing it (settings: `shadow_mode: true`).

Nothing is queued (the outbox is not touched, so nothing counts as a failed write) and the apply
steps send nothing. The plan step keeps the latest shadow plan in the DuckDB table
`shadow_plan` (replaced by every shadow run) and shows it in its metadata: each write with its
direction, record, field and value before → after, counts per direction and field, and the API
requests the writes would cost. The records a shadow plan names stay on the pending set (they
are not in agreement), so the first live run plans them again: it writes the same set, unless
one of the systems changed since.
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg
import duckdb
import pandas as pd

from sync_pipeline import duck, store
from sync_pipeline.decide import quote
from sync_pipeline.report import md_table

TABLE = "shadow_plan"
DIRECTIONS = {
    "update_erp": "CRM → Unleashed",
    "update_crm": "Unleashed → CRM",
    "create_crm_company": "new customer → CRM",
    "create_crm_contact": "new contact → CRM",
}
COLUMNS = ["direction", "op", "entity", "crm_id", "erp_id", "field", "before", "after"]

# Requests per record written, by operation (see apply.py): a push reads the Unleashed customer
# (with its contacts) and writes the customer or the contact whole; a pull PATCHes the CRM record
# once for all its fields; a new customer is a company group, its division and the division's
# link slot; a new contact is the contact and its link slot. A link slot that does not exist yet
# costs one more request (a PATCH answered 404, then the POST).
REQUESTS = {
    "update_erp": {"Unleashed": (1, 1)},  # (reads, writes)
    "update_crm": {"CRM": (0, 1)},
    "create_crm_company": {"CRM": (0, 3)},
    "create_crm_contact": {"CRM": (0, 2)},
}


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def writes(plan: pd.DataFrame) -> pd.DataFrame:
    """One row per value (or record) the plan would write: `COLUMNS`."""
    rows = plan[plan["op"].isin(list(DIRECTIONS))] if not plan.empty else plan
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    out = []
    for r in rows.to_dict("records"):
        op = r["op"]
        if op.startswith("create_"):
            before, after = "", _payload(r.get("payload"))
        else:
            before = _text(r["erp_value"] if op == "update_erp" else r["crm_value"])
            after = _text(r["new_value"])
        out.append(
            {
                "direction": DIRECTIONS[op],
                "op": op,
                "entity": r["entity"],
                "crm_id": _text(r.get("crm_id")) or None,
                "erp_id": _text(r.get("erp_id")),
                "field": _text(r.get("field")) or None,
                "before": before,
                "after": after,
            }
        )
    return pd.DataFrame(out, columns=COLUMNS)


def _payload(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if not isinstance(value, dict):
        return _text(value)
    return ", ".join(f"{k}={v}" for k, v in value.items() if v not in (None, ""))


def requests(shown: pd.DataFrame) -> dict[str, dict[str, int]]:
    """The API requests the writes would cost, per system: {'Unleashed': {'reads', 'writes'}}."""
    cost = {"Unleashed": {"reads": 0, "writes": 0}, "CRM": {"reads": 0, "writes": 0}}
    if shown.empty:
        return cost
    records = shown.drop_duplicates(["op", "entity", "erp_id"])
    for op, n in records["op"].value_counts().items():
        for system, (reads, writes_) in REQUESTS[str(op)].items():
            cost[system]["reads"] += reads * int(n)
            cost[system]["writes"] += writes_ * int(n)
    return cost


def record(con: duckdb.DuckDBPyConnection, shown: pd.DataFrame, run_id: str) -> None:
    """Keep the latest shadow plan in `shadow_plan` (replacing the one before)."""
    frame = shown.assign(run_id=run_id, planned_at=store.utcnow()).astype(
        {c: object for c in COLUMNS}
    )
    duck.register(con, "_shadow_rows", frame)
    try:
        con.execute(
            f"""CREATE OR REPLACE TABLE {TABLE} AS
                SELECT run_id::VARCHAR AS run_id, planned_at::TIMESTAMP AS planned_at,
                       {", ".join(f"{c}::VARCHAR AS {c}" for c in COLUMNS)}
                FROM _shadow_rows"""
        )
    finally:
        con.unregister("_shadow_rows")


def metadata(shown: pd.DataFrame) -> dict[str, Any]:
    """What the plan step shows of a shadow plan (markdown previews and counts)."""
    cost = requests(shown)
    by_field = (
        shown.assign(field=shown["field"].fillna("(new record)"))
        .groupby(["direction", "entity", "field"], dropna=False)
        .size()
        .reset_index(name="writes")
        .to_dict("records")
        if not shown.empty
        else []
    )
    preview = [
        {**r, "change": f"{quote(r['before'])} → {quote(r['after'])}"}
        for r in shown.head(50).to_dict("records")
    ]
    return {
        "shadow_mode": "on: nothing was written; this is what the run would have written",
        "shadow_writes": len(shown),
        "shadow_writes_to_unleashed": int((shown["op"] == "update_erp").sum()),
        "shadow_writes_to_crm": int((shown["op"] != "update_erp").sum()),
        "shadow_requests_unleashed": cost["Unleashed"]["reads"] + cost["Unleashed"]["writes"],
        "shadow_requests_crm": cost["CRM"]["reads"] + cost["CRM"]["writes"],
        "shadow_write_requests_unleashed": cost["Unleashed"]["writes"],
        "shadow_write_requests_crm": cost["CRM"]["writes"],
        "shadow_requests": dg.MetadataValue.md(
            md_table([{"system": s, **c} for s, c in cost.items()], ["system", "reads", "writes"])
        ),
        "shadow_by_field": dg.MetadataValue.md(
            md_table(by_field, ["direction", "entity", "field", "writes"], limit=100)
        ),
        "shadow_preview": dg.MetadataValue.md(
            md_table(
                preview,
                ["direction", "entity", "crm_id", "erp_id", "field", "change"],
                limit=50,
                widths={"change": 160},
                total=len(shown),
            )
        ),
    }
