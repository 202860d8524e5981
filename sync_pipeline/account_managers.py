"""Account managers: CRM users matched to Unleashed salespersons by email, and the overnight fix."""

from __future__ import annotations

from typing import Any

import duckdb
import pandas as pd

from sync_pipeline import store

FIELD = "account_manager"
# The CRM `User` fields read here (the live names: key `UserCode`).
USER_NAME, USER_EMAIL = "UserName", "EmailAddress"


def candidates(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Every active CRM user, with the active Unleashed salesperson of the same email (if any)."""
    frame = con.execute(
        f"""SELECT u.id AS user_code, u.data->>'$.{USER_NAME}' AS name,
                  u.data->>'$.{USER_EMAIL}' AS email,
                  s.id AS salesperson_guid, s.data->>'$.FullName' AS salesperson
           FROM crm_users u
           LEFT JOIN unleashed_salespersons s
             ON s.active
            AND lower(trim(s.data->>'$.Email')) = lower(trim(u.data->>'$.{USER_EMAIL}'))
           WHERE u.active
           ORDER BY salesperson_guid IS NULL, name"""
    ).df()
    con.execute("CREATE OR REPLACE TABLE account_manager_candidates AS SELECT * FROM frame")
    return frame


def _json_path(path: str) -> str:
    # Paths were validated by the mapping loader (identifiers joined by dots).
    return "$." + path


def plan_fix(con: duckdb.DuckDBPyConnection, mappings: dict[str, Any]) -> pd.DataFrame:
    """Plan rows setting each linked CRM company's account manager to Unleashed's salesperson.

    A salesperson with no CRM user of the same email cannot be set: that company is rejected with
    a reason. Companies that already agree plan nothing."""
    f = mappings["company"].fields[FIELD]
    crm_path, erp_path = _json_path(f.crm), _json_path(f.erp)
    user_email = _json_path(f.crm_write.match if f.crm_write else USER_EMAIL)
    crm_bad = store.set_aside_sql("CRM", f"GET /{mappings['company'].crm.entity_set}")
    erp_bad = store.set_aside_sql("Unleashed")
    frame = con.execute(
        f"""SELECT l.crm_id, l.erp_id,
                   coalesce(c.data->>'{crm_path}', '') AS crm_value,
                   coalesce(u.data->>'{erp_path}', '') AS erp_value,
                   c.data->>'$.Name' AS crm_name,
                   c.modified AS crm_modified, u.modified AS erp_modified,
                   cu.id AS crm_user_id
            FROM company_links l
            JOIN crm_companies c ON c.id = l.crm_id AND c.active
            JOIN unleashed_customers u ON u.id = l.erp_id AND u.active
            LEFT JOIN crm_users cu ON cu.active
                 AND lower(trim(cu.data->>'{user_email}')) = lower(trim(u.data->>'{erp_path}'))
            WHERE lower(trim(coalesce(c.data->>'{crm_path}', '')))
               <> lower(trim(coalesce(u.data->>'{erp_path}', '')))
              -- a record set aside as malformed is frozen (its snapshot is stale)
              AND l.crm_id NOT IN (SELECT id FROM ({crm_bad}))
              AND l.erp_id NOT IN (SELECT id FROM ({erp_bad}))"""
    ).df()
    if frame.empty:
        return pd.DataFrame(columns=["entity", "op", "crm_id", "erp_id", "field", "new_value"])
    no_user = frame["crm_user_id"].isna() & (frame["erp_value"] != "")
    frame["entity"] = "company"
    frame["field"] = FIELD
    frame["op"] = "update_crm"
    frame.loc[no_user, "op"] = "reject"
    frame["new_value"] = frame["erp_value"]
    frame["baseline_value"] = None
    frame["conflict"] = False
    frame["policy"] = "overnight_fix"
    frame["crm_parent_id"] = None
    frame["erp_parent_id"] = None
    frame["payload"] = None
    frame["reason"] = "overnight fix: account manager set to the Unleashed salesperson"
    frame.loc[no_user, "reason"] = frame.loc[no_user].apply(
        lambda r: (
            f"company {r['crm_name']!r} (CRM {r['crm_id']} / Unleashed {r['erp_id']}): "
            f"account manager: Unleashed salesperson {r['erp_value']!r} has no CRM user with "
            "that email, so the overnight fix cannot set it"
        ),
        axis=1,
    )
    return frame.drop(columns=["crm_user_id", "crm_name"])
