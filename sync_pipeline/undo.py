"""Undo a run: write back the value each of its audited writes replaced, where the field still
holds what the run wrote, and report what was left because someone changed it since.

The run's writes are read from `audit_log` (one row per field written, with the value it
replaced). Each record is read from the system the run wrote to first; a field that still holds
what the run wrote (equal after normalisation) gets its earlier value back, in one write per
record as apply does; a field that holds something else is left, and reported with what it
holds now; one already back at its earlier value is counted as such. Creations are not undone
(records the run created in the CRM stay): they are counted.

The baseline is not moved: it still says both sides agreed on what the run wrote. So the next
run sees the undone field as changed on the side the undo wrote to, and carries the earlier
value to the other system too (when that side still holds what the run wrote), and both end
where they were before the run. Every write the undo makes is in the audit log under the undo's
own run id (reason `undo of run …`), so an undo can be undone. Running the same undo again
writes nothing more: the fields it restored hold the earlier value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline import store
from sync_pipeline.apply import Resolver, _crm_change, _erp_value, _text, get_path
from sync_pipeline.clients.base import ApiError
from sync_pipeline.clients.crm import CrmClient
from sync_pipeline.clients.unleashed import UnleashedClient
from sync_pipeline.extract import crm_expand
from sync_pipeline.mapping.normalise import normalise

log = logging.getLogger("sync_pipeline.undo")


class UnknownRun(ValueError):
    """No audited write has that run id."""


@dataclass
class UndoResult:
    run_id: str
    restored: list[dict[str, Any]] = field(default_factory=list)
    left: list[dict[str, Any]] = field(default_factory=list)  # changed since: not touched
    already: list[dict[str, Any]] = field(default_factory=list)  # held the earlier value
    failed: list[dict[str, Any]] = field(default_factory=list)
    creations: int = 0

    def summary(self) -> str:
        parts = [
            f"Undo of run {self.run_id}: {len(self.restored)} values written back",
            f"{len(self.left)} left because someone changed them since",
        ]
        if self.already:
            parts.append(f"{len(self.already)} already held their earlier value")
        if self.failed:
            parts.append(f"{len(self.failed)} not written (the API failed; run the undo again)")
        if self.creations:
            parts.append(f"{self.creations} records the run created are not undone")
        return ", ".join(parts)

    def lines(self) -> list[str]:
        out = [self.summary() + "."]
        for title, rows in (
            ("Written back", self.restored),
            ("Left (changed since the run)", self.left),
            ("Not written", self.failed),
        ):
            if rows:
                out.append(f"{title}:")
                out += [f"  {_line(r)}" for r in rows]
        return out


def _line(r: dict[str, Any]) -> str:
    from sync_pipeline.decide import quote

    where = f"{r['entity']} CRM {r['crm_id'] or '-'} / Unleashed {r['erp_id']} {r['field']}"
    text = f"{r['system']}: {where}: run wrote {quote(r['run_wrote'])}"
    if "now" in r:
        text += f", holds {quote(r['now'])} now"
    text += f"; before the run {quote(r['before'])}"
    if r.get("error"):
        text += f" ({r['error']})"
    return text


def run_writes(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """The audited writes of a run; raises UnknownRun when it has none."""
    rows = con.execute(
        """SELECT entity, crm_id, erp_id, field, old_value, new_value, direction, logged_at
           FROM audit_log WHERE run_id = ? ORDER BY logged_at""",
        [run_id],
    ).df()
    if rows.empty:
        raise UnknownRun(
            f"run {run_id!r} has no audited writes: no run with that id wrote anything this "
            "database knows of (or its history was pruned: keep_history_days). Run ids are in "
            "the Dagster UI (Runs) and in the audit_log table."
        )
    return rows


def undo_run(
    con: duckdb.DuckDBPyConnection,
    crm: CrmClient,
    unleashed: UnleashedClient,
    mappings: dict[str, Any],
    run_id: str,
    undo_run_id: str,
) -> UndoResult:
    rows = run_writes(con, run_id)
    result = UndoResult(run_id=run_id, creations=int(rows["field"].isna().sum()))
    updates = rows[rows["field"].notna()]
    # A field the run wrote twice: the value before its first write, the value of its last.
    updates = updates.groupby(
        ["direction", "entity", "erp_id", "field"], sort=False, as_index=False
    ).agg(crm_id=("crm_id", "last"), old_value=("old_value", "first"),
          new_value=("new_value", "last"))  # fmt: skip
    resolver = Resolver(con)
    for (direction, entity, erp_id), fields in updates.groupby(
        ["direction", "entity", "erp_id"], sort=False
    ):
        mapping = mappings[entity]
        system = "Unleashed" if direction == "crm_to_erp" else "CRM"
        try:
            if system == "Unleashed":
                current, write = _unleashed_record(con, unleashed, entity, str(erp_id))
            else:
                crm_id = int(fields["crm_id"].iloc[0])
                current = crm.get(mapping.crm.entity_set, crm_id, expand=crm_expand(mapping))
                write = None
            todo = _sort(result, mapping, fields, current, system)
            if not todo:
                continue
            if system == "Unleashed":
                changes = dict(_erp_value(mapping, r["field"], r["before"], resolver) for r in todo)
                write(changes)
            else:
                changes = dict(
                    _crm_change(mapping, r["field"], r["before"], resolver) for r in todo
                )
                crm.patch(mapping.crm.entity_set, crm_id, changes)
        except ApiError as exc:
            log.warning("undo of run %s: %s", run_id, exc)
            for r in fields.to_dict("records"):
                result.failed.append({**_row(r, system), "error": str(exc)})
            continue
        _audit(con, todo, run_id, undo_run_id, direction)
        result.restored += todo
    return result


def _row(r: dict[str, Any], system: str) -> dict[str, Any]:
    return {
        "system": system,
        "entity": r["entity"],
        "crm_id": _text(r["crm_id"]) or None,
        "erp_id": r["erp_id"],
        "field": r["field"],
        "run_wrote": _text(r["new_value"]),
        "before": _text(r["old_value"]),
    }


def _sort(
    result: UndoResult,
    mapping: Any,
    fields: pd.DataFrame,
    current: dict[str, Any],
    system: str,
) -> list[dict[str, Any]]:
    """The fields to write back (still holding what the run wrote); the rest are recorded as
    left (changed since) or already back at the earlier value."""
    todo = []
    for r in fields.to_dict("records"):
        spec = mapping.fields[r["field"]]
        path = spec.erp if system == "Unleashed" else spec.crm
        now = _text(get_path(current, path))
        row = _row(r, system)

        def norm(value: str, kind: str = spec.normaliser) -> str:
            return normalise(kind, value)

        if norm(now) == norm(row["run_wrote"]) and norm(now) != norm(row["before"]):
            todo.append(row)
        elif norm(now) == norm(row["before"]):
            result.already.append({**row, "now": now})
        else:
            result.left.append({**row, "now": now})
    return todo


def _unleashed_record(
    con: duckdb.DuckDBPyConnection, client: UnleashedClient, entity: str, erp_id: str
) -> tuple[dict[str, Any], Any]:
    """The Unleashed record as it is now, and how to write changes to it (read-merge-write of
    the whole record, as a push does)."""
    if entity == "company":
        record, _bad = client.get_customer_and_contacts(erp_id)
        current = record.to_wire(include_contacts=False)

        def save(changes: dict[str, Any]) -> None:
            client.save_customer({**current, **changes})

        return current, save
    row = con.execute(
        """SELECT erp_parent_id FROM contact_links WHERE erp_id = ?
           UNION ALL SELECT parent_id FROM unleashed_contacts WHERE id = ? LIMIT 1""",
        [erp_id, erp_id],
    ).fetchone()
    if row is None:
        raise ApiError("Unleashed", "GET", "/Customers/{guid}", None, f"contact {erp_id} unknown")
    parent = str(row[0])
    contacts = {str(c.Guid): c.to_wire() for c in client.list_contacts(parent)}
    current = contacts.get(erp_id)
    if current is None:
        raise ApiError(
            "Unleashed", "GET", "/Customers/{guid}/Contacts", 404,
            f"contact {erp_id} of customer {parent} no longer exists",
        )  # fmt: skip

    def update(changes: dict[str, Any]) -> None:
        client.update_contact(parent, erp_id, changes, current=current)

    return current, update


def _audit(
    con: duckdb.DuckDBPyConnection,
    rows: list[dict[str, Any]],
    run_id: str,
    undo_run_id: str,
    direction: str,
) -> None:
    now = store.utcnow()
    for r in rows:
        con.execute(
            "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                now, undo_run_id, f"undo:{run_id}", r["entity"], r["crm_id"], r["erp_id"],
                r["field"], r["run_wrote"], r["before"], direction, f"undo of run {run_id}",
            ],
        )  # fmt: skip
