"""The asset a webhook run reads Unleashed with: only the customers its events name."""

import dagster as dg

from sync_pipeline import derived
from sync_pipeline.defs.preflight import sync_preflight
from sync_pipeline.defs.resources import SyncConfigResource, SyncDuckDB, UnleashedResource
from sync_pipeline.report import bad_records_md
from sync_pipeline.webhooks.reads import read_customers


class WebhookReadConfig(dg.Config):
    customers: list[str] = []  # the customer Guids the batch's events name


@dg.asset(
    key=["unleashed", "webhook_reads"],
    group_name="extract",
    kinds={"duckdb"},
    pool="duckdb",
    deps=[sync_preflight],
    description="Unleashed customers named by webhook events (created, updated, deleted), "
    "read one by one (GET /Customers/{guid} with their contacts) into the same snapshot as the "
    "import; the import's own cursor is left alone.",
)
def unleashed_webhook_reads(
    config: WebhookReadConfig,
    unleashed: UnleashedResource,
    duckdb: SyncDuckDB,
    sync_config: SyncConfigResource,
) -> dg.MaterializeResult:
    with unleashed.get_client() as client, duckdb.get_connection() as con:
        stats = read_customers(con, client, config.customers)
        refreshed = derived.refresh(
            con, sync_config.mappings(), tables=["unleashed_customers", "unleashed_contacts"]
        )
    return dg.MaterializeResult(
        metadata={
            **stats.metadata(),
            "derived_rows_refreshed": refreshed.total,
            "bad_records_preview": dg.MetadataValue.md(bad_records_md(stats.bad)),
        }
    )
