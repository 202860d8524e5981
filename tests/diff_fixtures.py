"""Small hand-written snapshot tables for the mapping, link and diff tests."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from sync_pipeline import baseline
from sync_pipeline.mapping import load_mappings
from sync_pipeline.schema import RAW_TABLES

MAPPINGS_DIR = Path(__file__).resolve().parents[1] / "mappings"


T0 = datetime(2026, 1, 1, 9, 0, 0)


def user_code(user_id: int) -> str:
    """The CRM user code the fixtures give user `user_id` (codes are three characters)."""
    return f"U{user_id:02d}"


class World:
    """Both systems' raw snapshots in one DuckDB connection, shaped as the extract writes them."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection | None = None, mappings_dir: Path = MAPPINGS_DIR
    ):
        self.con = con or duckdb.connect()
        self.mappings = load_mappings(mappings_dir)
        self.clock = T0
        for table, has_parent in RAW_TABLES.items():
            parent = "parent_id VARCHAR," if has_parent else ""
            self.con.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (id VARCHAR PRIMARY KEY, {parent} "
                "modified TIMESTAMP, active BOOLEAN, data JSON)"
            )

    def tick(self, minutes: int = 1) -> datetime:
        self.clock += timedelta(minutes=minutes)
        return self.clock

    def _put(
        self,
        table: str,
        id_: str,
        data: dict[str, Any],
        *,
        parent: str | None = None,
        active: bool = True,
        modified: datetime | None = None,
    ) -> None:
        modified = modified or self.tick()
        self.con.execute(f"DELETE FROM {table} WHERE id = ?", [id_])
        if RAW_TABLES[table]:
            self.con.execute(
                f"INSERT INTO {table} (id, parent_id, modified, active, data) "
                "VALUES (?, ?, ?, ?, ?)",
                [id_, parent, modified, active, json.dumps(data)],
            )
        else:
            self.con.execute(
                f"INSERT INTO {table} (id, modified, active, data) VALUES (?, ?, ?, ?)",
                [id_, modified, active, json.dumps(data)],
            )

    def data(self, table: str, id_: str) -> dict[str, Any]:
        (raw,) = self.con.execute(f"SELECT data FROM {table} WHERE id = ?", [id_]).fetchall()[0]
        return json.loads(raw)

    def edit(
        self,
        table: str,
        id_: str,
        *,
        modified: datetime | None = None,
        active: bool | None = None,
        **changes: Any,
    ) -> None:
        """Change fields of a record as a person would in that system (bumps `modified`)."""
        data = self.data(table, id_)
        for path, value in changes.items():
            cur = data
            parts = path.split("__")
            for part in parts[:-1]:
                cur = cur.setdefault(part, {}) or {}
            cur[parts[-1]] = value
        sets = "data = ?, modified = ?" + (", active = ?" if active is not None else "")
        params: list[Any] = [json.dumps(data), modified or self.tick()]
        if active is not None:
            params.append(active)
        self.con.execute(f"UPDATE {table} SET {sets} WHERE id = ?", [*params, id_])

    # Builders ------------------------------------------------------------------------------

    def user(self, user_id: int, email: str, name: str = "User", active: bool = True) -> None:
        """A CRM user with the code `U<user_id>`."""
        code = user_code(user_id)
        self._put("crm_users", code,
                  {"UserCode": code, "UserName": name, "EmailAddress": email,
                   "Obsolete": 0 if active else 1},
                  active=active)  # fmt: skip

    def salesperson(self, guid: str, email: str, name: str = "Sales", active: bool = True) -> None:
        self._put("unleashed_salespersons", guid,
                  {"Guid": guid, "FullName": name, "Email": email, "Obsolete": not active},
                  active=active)  # fmt: skip

    def crm_company(
        self,
        division_id: int,
        name: str,
        *,
        phone: str = "",
        website: str = "",
        manager: str | None = None,
        code: str | None = None,
        guid: str | None = None,
        active: bool = True,
        modified: datetime | None = None,
        **extra: Any,
    ) -> str:
        data = {"DivisionId": division_id, "CompanyId": division_id, "Name": name,
                "PhoneNumber": phone, "Website": website,
                "DivisionXtra": {"DivisionId": division_id, "StandardTextField1": guid},
                "StatusFlag": "A" if active else "D", "AccountManager": "HSE",
                "AccountManagerUser": {"UserCode": "HSE", "EmailAddress": manager},
                "OperatingCompanyCode": "A",
                "SalesLedgerId": f"SL{division_id}" if code is not None else None,
                "SalesLedger": {"CustomerCode": code} if code is not None else None,
                **extra}  # fmt: skip
        self._put("crm_companies", str(division_id), data, active=active, modified=modified)
        return str(division_id)

    def customer(
        self,
        guid: str,
        code: str,
        name: str,
        *,
        phone: str = "",
        website: str = "",
        salesperson: str | None = None,
        active: bool = True,
        modified: datetime | None = None,
        **extra: Any,
    ) -> str:
        data = {"Guid": guid, "CustomerCode": code, "CustomerName": name, "PhoneNumber": phone,
                "Website": website, "Obsolete": not active, "Currency": {"CurrencyCode": "GBP"},
                "SalesPerson": {"Email": salesperson, "FullName": "S"} if salesperson else None,
                **extra}  # fmt: skip
        self._put("unleashed_customers", guid, data, active=active, modified=modified)
        return guid

    def crm_contact(
        self,
        contact_id: int,
        division_id: int,
        first: str,
        last: str,
        *,
        email: str = "",
        phone: str = "",
        mobile: str = "",
        fax: str = "",
        guid: str | None = None,
        active: bool = True,
        modified: datetime | None = None,
    ) -> str:
        data = {"ContactId": contact_id, "DivisionId": division_id, "Forename": first,
                "Surname": last, "Email": email, "PhoneNumber": phone,
                "MobilePhoneNumber": mobile, "Fax": fax, "RoleCode": "DECISN",
                "ContactXtra": {"ContactId": contact_id, "StandardTextField1": guid},
                "StatusFlag": "A" if active else "D"}  # fmt: skip
        self._put("crm_contacts", str(contact_id), data, parent=str(division_id), active=active,
                  modified=modified)  # fmt: skip
        return str(contact_id)

    def erp_contact(
        self,
        guid: str,
        customer: str,
        first: str,
        last: str,
        *,
        email: str = "",
        phone: str = "",
        mobile: str = "",
        fax: str = "",
        active: bool = True,
        modified: datetime | None = None,
    ) -> str:
        data = {"Guid": guid, "FirstName": first, "LastName": last, "EmailAddress": email,
                "PhoneNumber": phone, "MobilePhone": mobile, "FaxNumber": fax,
                "OfficePhone": ""}  # fmt: skip
        self._put("unleashed_contacts", guid, data, parent=customer, active=active,
                  modified=modified)  # fmt: skip
        return guid

    # Simulated apply -------------------------------------------------------------------------

    def apply(self, plan: pd.DataFrame) -> None:
        """What a successful apply does to the world: write the value into the target snapshot
        and move the baseline (record_agreement)."""
        updates = plan[plan["op"].isin(["update_erp", "update_crm"])]
        for r in updates.itertuples(index=False):
            spec = self.mappings[r.entity].fields[r.field]
            table, key, path = (
                (self.mappings[r.entity].erp.table, r.erp_id, spec.erp)
                if r.op == "update_erp"
                else (self.mappings[r.entity].crm.table, r.crm_id, spec.crm)
            )
            self.edit(table, key, **{path.replace(".", "__"): r.new_value})
            baseline.record_agreement(
                self.con, r.entity, [{"erp_id": r.erp_id, "field": r.field, "value": r.new_value}]
            )


def rows(plan: pd.DataFrame, **match: Any) -> pd.DataFrame:
    """Plan rows whose columns equal the given values."""
    mask = pd.Series(True, index=plan.index)
    for col, value in match.items():
        mask &= plan[col] == value
    return plan[mask]


def one(plan: pd.DataFrame, **match: Any) -> dict[str, Any]:
    found = rows(plan, **match)
    assert len(found) == 1, f"expected one row for {match}, got:\n{plan.to_string()}"
    return found.iloc[0].to_dict()
