"""The asset a webhook run reads Unleashed with: only the customers its events name."""

import dagster as dg

from sync_pipeline import derived
from sync_pipeline.defs.preflight import sync_preflight
from sync_pipeline.defs.resources import SyncConfigResource, SyncDuckDB, UnleashedResource
from sync_pipeline.report import bad_records_md
from sync_pipeline.webhooks.events import EventStore, events_path
from sync_pipeline.webhooks.reads import read_customers

MAX_BATCH = 500  # events one run reads; more are left to the next run


@dg.asset(
    key=["unleashed", "webhook_reads"],
    group_name="extract",
    kinds={"duckdb"},
    pool="duckdb",
    deps=[sync_preflight],
    description="Unleashed customers named by webhook events (created, updated, deleted), "
    "read one by one (GET /Customers/{guid} with their contacts) into the same snapshot as the "
    "import; the import's own cursor is left alone. The run claims every event pending when "
    "this step starts, including those that arrived while it waited in the queue.",
)
def unleashed_webhook_reads(
    context: dg.AssetExecutionContext,
    unleashed: UnleashedResource,
    duckdb: SyncDuckDB,
    sync_config: SyncConfigResource,
) -> dg.MaterializeResult:
    with EventStore(events_path(duckdb.database)) as events:
        claimed = events.claim(context.run_id, MAX_BATCH)
    customers = list(dict.fromkeys(e.customer_guid for e in claimed))
    with unleashed.get_client() as client, duckdb.get_connection() as con:
        stats = read_customers(con, client, customers)
        refreshed = derived.refresh(
            con, sync_config.mappings(), tables=["unleashed_customers", "unleashed_contacts"]
        )
    return dg.MaterializeResult(
        metadata={
            "webhook_events": len(claimed),
            **stats.metadata(),
            "derived_rows_refreshed": refreshed.total,
            "bad_records_preview": dg.MetadataValue.md(bad_records_md(stats.bad)),
        }
    )
