"""Extract assets: both systems into DuckDB snapshot tables."""

import os
from datetime import UTC, datetime, timedelta

import dagster as dg

from sync_pipeline import derived, extract
from sync_pipeline.defs.preflight import sync_preflight
from sync_pipeline.defs.resources import (
    CrmResource,
    SyncConfigResource,
    SyncDuckDB,
    UnleashedResource,
)
from sync_pipeline.report import bad_records_md

# Unleashed imports are partitioned by hour so a missed window can be backfilled. The current hour
# is included (end_offset=1) so the daytime schedule can import it while it is still open. The
# partitions start BACKFILL_DAYS before today (UTC midnight, as the code location loads): the UI
# and a backfill offer the recent windows, not every hour since the first install. A gap older
# than that is caught up by full_resync_job, which re-reads both systems whole.
BACKFILL_DAYS = 7
BACKFILL_DAYS_ENV = "SYNC_BACKFILL_DAYS"


def import_partitions(now: datetime | None = None) -> dg.HourlyPartitionsDefinition:
    raw = os.environ.get(BACKFILL_DAYS_ENV) or str(BACKFILL_DAYS)
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 366:
        raise ValueError(
            f"{BACKFILL_DAYS_ENV} must be a whole number of days from 1 to 366, not {raw!r}"
        )
    today = (now or datetime.now(UTC)).replace(hour=0, minute=0, second=0, microsecond=0)
    return dg.HourlyPartitionsDefinition(
        start_date=today - timedelta(days=int(raw)), timezone="UTC", end_offset=1
    )


IMPORT_PARTITIONS = import_partitions()


class ExtractConfig(dg.Config):
    full_refresh: bool = False


def _derived_metadata(refreshed: derived.RefreshStats) -> dict[str, float | int]:
    """Digest and match-key columns recomputed for the rows just written (see derived.py)."""
    return {
        "derived_rows_refreshed": refreshed.total,
        "derived_refresh_seconds": round(refreshed.seconds, 3),
    }


def _crm_asset(kind: str, description: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=["crm", f"crm_{kind}"],
        group_name="extract",
        kinds={"duckdb"},
        pool="duckdb",
        deps=[sync_preflight],
        description=description,
    )
    def _extract(
        context: dg.AssetExecutionContext,
        config: ExtractConfig,
        crm: CrmResource,
        duckdb: SyncDuckDB,
        sync_config: SyncConfigResource,
    ) -> dg.MaterializeResult:
        settings = sync_config.settings()
        mappings = sync_config.mappings()
        source = extract.crm_sources(mappings)[kind]
        with crm.get_client() as client, duckdb.get_connection() as con:
            stats = extract.extract_crm(
                con, client, source, full_refresh=config.full_refresh,
                overlap=timedelta(seconds=settings.extract_overlap_seconds),
            )  # fmt: skip
            refreshed = derived.refresh(con, mappings, tables=[source.table])
        return dg.MaterializeResult(
            metadata={
                **stats.metadata(),
                **_derived_metadata(refreshed),
                "bad_records_preview": dg.MetadataValue.md(bad_records_md(stats.bad)),
            }
        )

    return _extract


crm_companies = _crm_asset(
    "companies",
    "CRM companies (OData Divisions) with their account managers, sales-ledger customer codes "
    "and Unleashed Guid slots.",
)
crm_contacts = _crm_asset("contacts", "CRM contacts.")
crm_users = _crm_asset("users", "CRM users (candidates for account manager), read in full.")


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            ["unleashed", "unleashed_customers"],
            group_name="extract",
            kinds={"duckdb"},
            description="Unleashed customers, imported by hourly window.",
            deps=[sync_preflight],
        ),
        dg.AssetSpec(
            ["unleashed", "unleashed_contacts"],
            group_name="extract",
            kinds={"duckdb"},
            description="Unleashed contacts, read inside their customers' pages.",
            deps=[sync_preflight],
        ),
    ],  # fmt: skip
    partitions_def=IMPORT_PARTITIONS,
    pool="duckdb",
)
def unleashed_customers(
    context: dg.AssetExecutionContext,
    config: ExtractConfig,
    unleashed: UnleashedResource,
    duckdb: SyncDuckDB,
    sync_config: SyncConfigResource,
):
    settings = sync_config.settings()
    window = context.partition_time_window if context.has_partition_key else None
    with unleashed.get_client() as client, duckdb.get_connection() as con:
        stats = extract.extract_unleashed_customers(
            con, client,
            window_start=window.start if window else None,
            full_refresh=config.full_refresh,
            overlap=timedelta(seconds=settings.extract_overlap_seconds),
        )  # fmt: skip
        refreshed = derived.refresh(
            con, sync_config.mappings(), tables=["unleashed_customers", "unleashed_contacts"]
        )
    meta = {**stats.metadata(), **_derived_metadata(refreshed)}
    yield dg.MaterializeResult(
        asset_key=["unleashed", "unleashed_customers"],
        metadata={
            **{k: v for k, v in meta.items() if not k.startswith("contacts_")},
            "window": f"{window.start:%Y-%m-%d %H:%M}–{window.end:%H:%M} UTC" if window else "-",
            "bad_records_preview": dg.MetadataValue.md(bad_records_md(stats.bad)),
        },
    )
    yield dg.MaterializeResult(
        asset_key=["unleashed", "unleashed_contacts"],
        metadata={k: v for k, v in meta.items() if k.startswith("contacts_")}
        | {"customers_with_over_100_contacts": meta["customers_with_over_100_contacts"]},
    )


@dg.asset(
    key=["unleashed", "unleashed_salespersons"],
    group_name="extract",
    kinds={"duckdb"},
    pool="duckdb",
    deps=[sync_preflight],
    description="Unleashed salespersons (account managers are matched to them by email).",
)
def unleashed_salespersons(
    unleashed: UnleashedResource, duckdb: SyncDuckDB
) -> dg.MaterializeResult:
    with unleashed.get_client() as client, duckdb.get_connection() as con:
        stats = extract.extract_unleashed_salespersons(con, client)
    return dg.MaterializeResult(metadata=stats.metadata())


CRM_EXTRACTS = [crm_companies, crm_contacts, crm_users]
UNLEASHED_EXTRACTS = [unleashed_customers, unleashed_salespersons]
