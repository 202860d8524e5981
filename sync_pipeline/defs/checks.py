"""Asset checks: one-to-one links, snapshots hold what the APIs reported, rejections and
operations that keep waiting get seen.

The checks are grouped into three steps, each opening the database once: the extract counts (one
check per extract asset, and the Unleashed usage against the account's monthly limit), the sync
checks (links, rejections) and the waiting-operation checks of the apply assets (apart, because a
failed apply step skips the steps after it). The blocking check that fails a run whose planned
writes were not made is evaluated in the apply asset's own step (`defs/sync.py`). Each is
still its own asset check in the UI, on its own asset; a job selecting only some of those assets
runs only their checks. Separate steps cost a cycle about 90 ms of step overhead and database
opens for what are one-row queries.
"""

from datetime import datetime, timedelta

import dagster as dg
import pandas as pd

from sync_pipeline import links, store
from sync_pipeline.defs.extract import (
    crm_companies,
    crm_contacts,
    crm_users,
    unleashed_salespersons,
)
from sync_pipeline.defs.resources import SyncConfigResource, SyncDuckDB, UnleashedResource
from sync_pipeline.defs.sync import pull_to_crm, push_to_unleashed, sync_links, sync_plan
from sync_pipeline.report import md_table

RECEIVED = "received_what_the_api_reported"
UNLEASHED_CUSTOMERS = dg.AssetKey(["unleashed", "unleashed_customers"])

# asset -> extract_state source
COUNT_SOURCES = {
    crm_companies.key: "crm/companies",
    crm_contacts.key: "crm/contacts",
    crm_users.key: "crm/users",
    unleashed_salespersons.key: "unleashed/salespersons",
    UNLEASHED_CUSTOMERS: "unleashed/customers",
}


def _count_description(key: dg.AssetKey) -> str:
    if key == UNLEASHED_CUSTOMERS:
        return "The last import received as many customers as Unleashed said it had."
    return "The last extract received as many records as the API said it had."


USAGE = dg.AssetCheckKey(UNLEASHED_CUSTOMERS, "unleashed_usage_within_limit")
# A warning from this share of the account's monthly usage limit on: Unleashed itself e-mails the
# account at 90%, by which time a busy month may have days left.
USAGE_WARN_SHARE = 0.8


@dg.multi_asset_check(
    name="extracts_received_what_the_apis_reported",
    specs=[
        *(
            dg.AssetCheckSpec(RECEIVED, asset=key, description=_count_description(key))
            for key in COUNT_SOURCES
        ),
        dg.AssetCheckSpec(
            USAGE.name,
            asset=UNLEASHED_CUSTOMERS,
            description=f"This deployment's Unleashed requests this month stay under "
            f"{USAGE_WARN_SHARE:.0%} of the account's monthly API usage limit (settings: "
            "unleashed_monthly_request_limit), and Unleashed is not refusing them because the "
            "limit is used up.",
        ),
    ],
    can_subset=True,
)
def extract_counts(
    context: dg.AssetCheckExecutionContext,
    duckdb: SyncDuckDB,
    unleashed: UnleashedResource,
    sync_config: SyncConfigResource,
):
    selected = context.selected_asset_check_keys
    if USAGE in selected:
        yield _unleashed_usage(unleashed, sync_config)
    with duckdb.get_connection() as con:
        rows = {
            source: (reported, received)
            for source, reported, received in con.execute(
                "SELECT source, reported_total, rows_received FROM extract_state"
            ).fetchall()
        }
    for key, source in COUNT_SOURCES.items():
        if dg.AssetCheckKey(key, RECEIVED) not in selected:
            continue
        reported, received = rows.get(source, (None, None))
        if reported is None:
            note = (
                "no count reported yet"
                if key == UNLEASHED_CUSTOMERS
                else "the API reported no count"
            )
            yield dg.AssetCheckResult(
                asset_key=key, check_name=RECEIVED, passed=True, metadata={"note": note}
            )
            continue
        reported, received = int(reported), int(received or 0)
        yield dg.AssetCheckResult(
            asset_key=key,
            check_name=RECEIVED,
            passed=reported == received,
            metadata={"api_reported": reported, "received": received},
        )


def _unleashed_usage(
    unleashed: UnleashedResource, sync_config: SyncConfigResource
) -> dg.AssetCheckResult:
    used = unleashed.requests_this_month()
    limit = sync_config.settings().unleashed_monthly_request_limit
    meta: dict = {"requests_this_month": "not counted" if used is None else used}
    passed = True
    if used is None:
        meta["limit"] = "no pacing file (SYNC_PACING_FILE)"
    elif limit is None:
        meta["limit"] = "not set"
    else:
        share = used / limit
        meta |= {"limit": limit, "share_used": f"{share:.0%}"}
        passed = share < USAGE_WARN_SHARE
        if not passed:
            meta["why"] = (
                f"this deployment sent {used:,} requests to Unleashed this month, {share:.0%} of "
                f"the account's limit of {limit:,} (the account's other integrations count too); "
                "once the limit is used up Unleashed refuses every request until the 1st, 00:00 UTC"
            )
    block = unleashed.usage_block()
    if block is not None:
        passed = False
        meta["blocked"] = (
            f"the limit is used up: Unleashed refused a request at {block.seen_at:%Y-%m-%d %H:%M} "
            f"UTC and refuses every request until {block.resets_at:%Y-%m-%d %H:%M} UTC, unless "
            "the limit is raised; imports, pushes and the overnight fix are paused meanwhile "
            "(one probe import an hour)"
        )
    return dg.AssetCheckResult(
        asset_key=USAGE.asset_key,
        check_name=USAGE.name,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=meta,
    )


ONE_TO_ONE = dg.AssetCheckKey(sync_links.key, "links_are_one_to_one")
STALE_REJECTIONS = dg.AssetCheckKey(sync_plan.key, "no_stale_rejections")
# Operations still not written a day after they were queued (waiting, failed or unresolved after
# an interrupted write), per apply asset: which operations it writes.
WAITING = "no_operation_waiting_over_a_day"
WAITING_OPS = {
    dg.AssetCheckKey(push_to_unleashed.key, WAITING): ("update_erp",),
    dg.AssetCheckKey(pull_to_crm.key, WAITING): (
        "update_crm", "create_crm_contact", "create_crm_company",
    ),
}  # fmt: skip


@dg.multi_asset_check(
    name="sync_checks",
    specs=[
        dg.AssetCheckSpec(
            ONE_TO_ONE.name,
            asset=sync_links,
            description="Each record is linked to at most one on the other side.",
        ),
        dg.AssetCheckSpec(
            STALE_REJECTIONS.name,
            asset=sync_plan,
            description=(
                "Warns about rejections open for more than a day: someone needs to fix the value."
            ),
        ),
    ],
    can_subset=True,
)
def sync_checks(context: dg.AssetCheckExecutionContext, duckdb: SyncDuckDB):
    selected = context.selected_asset_check_keys
    with duckdb.get_connection() as con:
        if ONE_TO_ONE in selected:
            yield _links_are_one_to_one(con)
        if STALE_REJECTIONS in selected:
            yield _no_stale_rejections(con)


# A step of their own, after the apply assets: a run whose writes failed fails in the apply step
# (its blocking writes check), which skips the steps after it; the link and plan checks above do
# not wait for it.
@dg.multi_asset_check(
    name="waiting_operation_checks",
    specs=[
        dg.AssetCheckSpec(
            key.name,
            asset=key.asset_key,
            description=(
                "Warns about operations not yet written a day after they were queued (the "
                "target system kept failing, or a write was interrupted): the change has not "
                "arrived. Held-back (settings) and refused changes are not counted."
            ),
        )
        for key in WAITING_OPS
    ],
    can_subset=True,
)
def waiting_operation_checks(context: dg.AssetCheckExecutionContext, duckdb: SyncDuckDB):
    selected = context.selected_asset_check_keys
    with duckdb.get_connection() as con:
        for key, ops in WAITING_OPS.items():
            if key in selected:
                yield _no_operation_waiting(con, key, ops)


def _links_are_one_to_one(con) -> dg.AssetCheckResult:
    problems = links.one_to_one_violations(con)
    return dg.AssetCheckResult(
        asset_key=sync_links.key,
        check_name=ONE_TO_ONE.name,
        passed=len(problems) == 0,
        metadata={
            "violations": len(problems),
            "preview": dg.MetadataValue.md(
                md_table(problems.to_dict("records"), list(problems.columns))
            ),
        },
    )


def _a_day_ago() -> datetime:
    """In naive UTC, as the store writes its times (DuckDB's `now()` cast to TIMESTAMP is in the
    session's time zone)."""
    return store.utcnow() - timedelta(days=1)


def _no_stale_rejections(con) -> dg.AssetCheckResult:
    stale = con.execute(
        """SELECT entity, crm_id, erp_id, field, value, reason, first_seen FROM rejections
           WHERE resolved_at IS NULL AND first_seen < ?
           ORDER BY first_seen""",
        [_a_day_ago()],
    ).df()
    return _warning(
        STALE_REJECTIONS,
        stale,
        "rejections_older_than_a_day",
        ["entity", "crm_id", "erp_id", "field", "value", "reason", "first_seen"],
    )


def _no_operation_waiting(con, key: dg.AssetCheckKey, ops: tuple[str, ...]) -> dg.AssetCheckResult:
    waiting = con.execute(
        """SELECT op, entity, crm_id, erp_id, field, new_value, status, attempts, last_error,
                  created_at AS queued_at
           FROM outbox
           WHERE status IN ('pending', 'failed', 'in_flight', 'in_doubt')
             AND op IN (SELECT unnest(?::VARCHAR[]))
             AND created_at < ?
           ORDER BY created_at""",
        [list(ops), _a_day_ago()],
    ).df()
    columns = ["op", "entity", "crm_id", "erp_id", "field", "status", "attempts", "last_error"]
    return _warning(key, waiting, "operations_waiting_over_a_day", [*columns, "queued_at"])


def _warning(
    key: dg.AssetCheckKey,
    found: pd.DataFrame,
    count_label: str,
    columns: list[str],
) -> dg.AssetCheckResult:
    """A WARN check that passes when `found` is empty, with its rows previewed."""
    return dg.AssetCheckResult(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=found.empty,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            count_label: len(found),
            "preview": dg.MetadataValue.md(md_table(found.to_dict("records"), columns)),
        },
    )


CHECKS = [extract_counts, sync_checks, waiting_operation_checks]
