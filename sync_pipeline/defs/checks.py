"""Asset checks: one-to-one links, snapshots hold what the APIs reported, rejections get seen."""

import dagster as dg

from sync_pipeline import links
from sync_pipeline.defs.extract import (
    crm_companies,
    crm_contacts,
    crm_sales_ledgers,
    crm_users,
    unleashed_salespersons,
)
from sync_pipeline.defs.resources import SyncDuckDB
from sync_pipeline.defs.sync import sync_links, sync_plan
from sync_pipeline.report import md_table


@dg.asset_check(
    asset=sync_links, description="Each record is linked to at most one on the other side."
)
def links_are_one_to_one(duckdb: SyncDuckDB) -> dg.AssetCheckResult:
    with duckdb.get_connection() as con:
        problems = links.one_to_one_violations(con)
    return dg.AssetCheckResult(
        passed=len(problems) == 0,
        metadata={
            "violations": len(problems),
            "preview": dg.MetadataValue.md(
                md_table(problems.to_dict("records"), list(problems.columns))
            ),
        },
    )


def _count_check(asset, source: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name="received_what_the_api_reported",
        description="The last extract received as many records as the API said it had.",
    )
    def _check(duckdb: SyncDuckDB) -> dg.AssetCheckResult:
        with duckdb.get_connection() as con:
            row = con.execute(
                "SELECT reported_total, rows_received FROM extract_state WHERE source = ?", [source]
            ).fetchone()
        if row is None or row[0] is None:
            return dg.AssetCheckResult(passed=True, metadata={"note": "the API reported no count"})
        reported, received = int(row[0]), int(row[1] or 0)
        return dg.AssetCheckResult(
            passed=reported == received,
            metadata={"api_reported": reported, "received": received},
        )

    return _check


COUNT_CHECKS = [
    _count_check(crm_companies, "crm/companies"),
    _count_check(crm_contacts, "crm/contacts"),
    _count_check(crm_users, "crm/users"),
    _count_check(crm_sales_ledgers, "crm/sales_ledgers"),
    _count_check(unleashed_salespersons, "unleashed/salespersons"),
]


@dg.asset_check(
    asset=dg.AssetKey(["unleashed", "customers"]),
    name="received_what_the_api_reported",
    description="The last import received as many customers as Unleashed said it had.",
)
def unleashed_customers_count(duckdb: SyncDuckDB) -> dg.AssetCheckResult:
    with duckdb.get_connection() as con:
        row = con.execute(
            "SELECT reported_total, rows_received FROM extract_state WHERE source = ?",
            ["unleashed/customers"],
        ).fetchone()
    if row is None or row[0] is None:
        return dg.AssetCheckResult(passed=True, metadata={"note": "no count reported yet"})
    return dg.AssetCheckResult(
        passed=int(row[0]) == int(row[1] or 0),
        metadata={"api_reported": int(row[0]), "received": int(row[1] or 0)},
    )


@dg.asset_check(
    asset=sync_plan,
    description="Warns about rejections open for more than a day: someone needs to fix the value.",
)
def no_stale_rejections(duckdb: SyncDuckDB) -> dg.AssetCheckResult:
    with duckdb.get_connection() as con:
        stale = con.execute(
            """SELECT entity, crm_id, erp_id, field, value, reason, first_seen FROM rejections
               WHERE resolved_at IS NULL AND first_seen < now()::TIMESTAMP - INTERVAL 1 DAY
               ORDER BY first_seen"""
        ).df()
    return dg.AssetCheckResult(
        passed=stale.empty,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "rejections_older_than_a_day": len(stale),
            "preview": dg.MetadataValue.md(
                md_table(
                    stale.to_dict("records"), ["entity", "crm_id", "field", "reason", "first_seen"]
                )
            ),
        },
    )


CHECKS = [links_are_one_to_one, *COUNT_CHECKS, unleashed_customers_count, no_stale_rejections]
