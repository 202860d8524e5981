"""What a person reads: markdown previews for the Dagster UI and the plain-text cycle report."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline.core import FILLED_POLICY
from sync_pipeline.decide import quote
from sync_pipeline.mapping.validate import visible

OP_LABELS = {
    "update_erp": "CRM → Unleashed",
    "update_crm": "Unleashed → CRM",
    "create_crm_contact": "new contact → CRM",
    "create_crm_company": "new customer → CRM",
    "reject": "rejected",
}


# Columns shown whole: a reason names the record, the field, the value and why, and an operator
# cut off mid-sentence cannot act on it. Other cells (values can be long free text) are cut at
# VALUE_WIDTH characters, marked with "…". The Dagster UI wraps a markdown table's cells to the
# panel's width, so a long reason reads as a paragraph in its row.
WHOLE = frozenset({"reason", "problem", "retry", "policy", "last_error"})
VALUE_WIDTH = 120


def _cell(value: Any, width: int | None = VALUE_WIDTH) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return ""
    text = visible(str(value).replace("|", "\\|").replace("\n", " "))
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def md_table(
    rows: list[dict[str, Any]],
    columns: list[str],
    limit: int = 25,
    widths: dict[str, int | None] | None = None,
    total: int | None = None,
) -> str:
    """A markdown table of the first `limit` rows. The columns in WHOLE are never cut, others at
    VALUE_WIDTH characters; `widths` sets another width for a column (None: never cut).
    `total` is the number of rows when `rows` holds only the first ones."""
    if not rows:
        return "_none_"
    total = len(rows) if total is None else total
    widths = {c: None if c in WHOLE else VALUE_WIDTH for c in columns} | (widths or {})
    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    body = "\n".join(
        "| " + " | ".join(_cell(r.get(c), widths[c]) for c in columns) + " |" for r in rows[:limit]
    )
    more = f"\n\n_…and {total - limit} more_" if total > limit else ""
    return head + body + more


def frame_table(frame: pd.DataFrame, columns: list[str], limit: int = 25) -> str:
    """`md_table` of a DataFrame, converting only the rows shown (a plan can have 100,000s)."""
    return md_table(frame.head(limit).to_dict("records"), columns, limit, total=len(frame))


def bad_records_md(bad: Iterable[Any]) -> str:
    rows = [
        {"system": b.system, "endpoint": b.endpoint, "record": b.record_id, "reason": b.reason}
        for b in bad
    ]
    return md_table(rows, ["system", "endpoint", "record", "reason"])


def plan_md(plan: pd.DataFrame, limit: int = 25) -> str:
    if plan is None or plan.empty:
        return "_nothing to do: both systems agree_"
    return frame_table(
        plan.assign(direction=plan["op"].map(OP_LABELS)),
        ["direction", "entity", "crm_id", "erp_id", "field", "crm_value", "erp_value",
         "new_value", "conflict", "reason"],
        limit,
    )  # fmt: skip


def conflicts_md(plan: pd.DataFrame) -> str:
    if plan is None or plan.empty or "conflict" not in plan:
        return "_none_"
    return frame_table(
        plan[plan["conflict"].fillna(False).astype(bool)],
        ["entity", "crm_id", "erp_id", "field", "crm_value", "erp_value", "policy", "reason"],
    )


# The policy of a first agreement where one side was empty: the filled value wins, both ways.
FILLED = FILLED_POLICY


def filled_md(plan: pd.DataFrame) -> str:
    """The planned writes that fill an empty field from the other side's value on first
    agreement (a first sync, a new link): listed so an operator sees what was not blanked."""
    if plan is None or plan.empty:
        return "_none_"
    rows = plan[(plan["policy"] == FILLED) & (plan["op"] != "reject")]
    return frame_table(
        rows.assign(direction=rows["op"].map(OP_LABELS)),
        ["direction", "entity", "crm_id", "erp_id", "field", "crm_value", "erp_value"],
    )


def stage_timings_md(timings: dict[str, float]) -> str:
    """Seconds per named planning stage (`stages.Stages`), in the order they ran, with each
    stage's share of the total."""
    total = sum(timings.values()) or 1.0
    return md_table(
        [
            {"stage": name, "seconds": f"{sec:.3f}", "share": f"{100 * sec / total:.0f}%"}
            for name, sec in timings.items()
        ],
        ["stage", "seconds", "share"],
        limit=max(len(timings), 1),
    )


def rejections_md(plan: pd.DataFrame) -> str:
    if plan is None or plan.empty:
        return "_none_"
    return frame_table(
        plan[plan["op"] == "reject"], ["entity", "crm_id", "erp_id", "field", "new_value", "reason"]
    )


def applied_md(rows: list[dict[str, Any]]) -> str:
    return md_table(
        [{**r, "direction": OP_LABELS.get(r.get("op"), r.get("op"))} for r in rows],
        ["direction", "entity", "crm_id", "erp_id", "field", "old_value", "new_value"],
    )


def cycle_report(
    con: duckdb.DuckDBPyConnection,
    *,
    since: datetime,
    requests: dict[str, int] | None = None,
    refusal: str | None = None,
) -> str:
    """A report a person can read in a minute: what changed each way, conflicts, rejections,
    contacts created in the CRM and API requests per system, for everything logged since `since`."""
    lines = ["Sync cycle report", "=================", ""]
    if refusal:
        lines += [refusal, ""]
    audit = con.execute(
        """SELECT direction, entity, crm_id, erp_id, field, old_value, new_value, reason
           FROM audit_log WHERE logged_at >= ? ORDER BY logged_at""",
        [since],
    ).df()
    for direction, title in (("crm_to_erp", "CRM → Unleashed"), ("erp_to_crm", "Unleashed → CRM")):
        part = audit[(audit["direction"] == direction) & audit["field"].notna()]
        lines.append(f"{title}: {len(part)} field update(s)")
        for r in part.head(15).to_dict("records"):
            lines.append(
                f"  - {r['entity']} crm={r['crm_id']} unleashed={_short(r['erp_id'])} "
                f"{r['field']}: {quote(r['old_value'])} → {quote(r['new_value'])}"
            )
        if len(part) > 15:
            lines.append(f"  … and {len(part) - 15} more (see the audit_log table)")
    filled = con.execute(
        """SELECT a.direction, a.entity, a.crm_id, a.erp_id, a.field, a.new_value
           FROM audit_log a JOIN outbox o USING (op_id)
           WHERE a.logged_at >= ? AND o.policy = ? ORDER BY a.logged_at""",
        [since, FILLED],
    ).df()
    if len(filled):
        lines.append(
            f"Empty fields filled on first agreement (an empty value never replaces a filled "
            f"one): {len(filled)}"
        )
        for r in filled.head(10).to_dict("records"):
            target = "Unleashed" if r["direction"] == "crm_to_erp" else "CRM"
            lines.append(
                f"  - {r['entity']} crm={r['crm_id']} unleashed={_short(r['erp_id'])} "
                f"{r['field']}: empty in {target}, filled with {quote(r['new_value'])}"
            )
    created = audit[audit["field"].isna()]
    titles = (
        ("contact", "Contacts created in the CRM"),
        ("company", "Companies created in the CRM (standard import)"),
    )
    for entity, title in titles:
        part = created[created["entity"] == entity]
        lines.append(f"{title}: {len(part)}")
        for r in part.head(10).to_dict("records"):
            lines.append(f"  - crm={r['crm_id']} from unleashed={_short(r['erp_id'])}")
    conflicts = con.execute(
        """SELECT entity, crm_id, erp_id, field, crm_value, erp_value, winner, policy
           FROM conflicts WHERE seen_at >= ? ORDER BY seen_at""",
        [since],
    ).df()
    lines.append(f"Conflicts resolved: {len(conflicts)}")
    for r in conflicts.head(10).to_dict("records"):
        lines.append(
            f"  - {r['entity']} crm={r['crm_id']} {r['field']}: CRM {quote(r['crm_value'])} vs "
            f"Unleashed {quote(r['erp_value'])} → {r['winner'].upper()} wins ({r['policy']})"
        )
    rejections = con.execute(
        """SELECT entity, crm_id, erp_id, field, value, reason FROM rejections
           WHERE resolved_at IS NULL ORDER BY first_seen"""
    ).df()
    lines.append(f"Open rejections (not sent; fix the value and they retry): {len(rejections)}")
    for r in rejections.head(15).to_dict("records"):
        lines.append(f"  - {r['reason']}")
    failed = con.execute(
        "SELECT entity, op, crm_id, erp_id, field, last_error FROM outbox WHERE status = 'failed'"
    ).df()
    if len(failed):
        lines.append(f"Failed operations (retried next run): {len(failed)}")
        for r in failed.head(10).to_dict("records"):
            lines.append(f"  - {r['last_error']}")
    (unsure,) = con.execute(
        "SELECT count(*) FROM outbox WHERE status IN ('in_flight', 'in_doubt')"
    ).fetchone()
    if unsure:
        lines.append(
            f"Writes whose outcome is not known yet (a run stopped before the answer; the next "
            f"run reads the target and completes or sets each aside, never sends blindly): {unsure}"
        )
    bad = con.execute(
        "SELECT system, endpoint, record_id, reason FROM bad_records WHERE resolved_at IS NULL"
    ).df()
    if len(bad):
        lines.append(f"Malformed source records set aside: {len(bad)}")
        for r in bad.head(10).to_dict("records"):
            lines.append(f"  - {r['system']} {r['endpoint']} {r['record_id']}: {r['reason']}")
    if requests:
        lines.append(
            "API requests: " + ", ".join(f"{system} {n}" for system, n in requests.items())
        )
    return "\n".join(lines)


def _short(guid: Any) -> str:
    text = "" if guid is None else str(guid)
    return text[:8] + "…" if len(text) > 12 else text
