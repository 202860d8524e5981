"""Unleashed → CRM in seconds: the webhook job and the sensor that launches it.

The receiver (`sync-pipeline webhooks`) records each signed delivery in the event file; this
sensor claims the pending events as a batch and launches `unleashed_webhook_job` for the
customers they name. The job reads those customers alone (`GET /Customers/{guid}`), reads the CRM
afresh, links, plans, and pulls to the CRM; it does not push: CRM changes have their own sensor
and push job, and each direction's run fails, and is retried, on its own writes only. A batch's
events are consumed once its run succeeded; a failed run's go back to pending and are read again
(after 30 s, doubling up to an hour). The daytime imports stay the safety net and the backfill:
an event that never arrived is read by the next import.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import dagster as dg

from sync_pipeline.defs.automation import _usage_limit_pause
from sync_pipeline.defs.extract import crm_companies, crm_contacts
from sync_pipeline.defs.preflight import sync_preflight
from sync_pipeline.defs.resources import SyncConfigResource, SyncDuckDB, UnleashedResource
from sync_pipeline.defs.sync import WRITES_CHECK, pull_to_crm, sync_links, sync_plan
from sync_pipeline.defs.webhook_reads import unleashed_webhook_reads
from sync_pipeline.webhooks.events import EventStore, events_path

BATCH_TAG = "sync/webhook-batch"
READS_OP = "unleashed__webhook_reads"
MAX_BATCH = 500  # events per run; more wait for the next tick
STALE_CLAIM_S = 300  # a claimed batch with no run after this long is released
KEEP_CONSUMED_S = 7 * 24 * 3600  # delivery ids kept for de-duplication

unleashed_webhook_job = dg.define_asset_job(
    "unleashed_webhook_job",
    selection=dg.AssetSelection.assets(
        sync_preflight, unleashed_webhook_reads, crm_companies, crm_contacts, sync_links,
        sync_plan, pull_to_crm,
    ).without_checks()
    | dg.AssetSelection.checks(dg.AssetCheckKey(pull_to_crm.key, WRITES_CHECK)),
    description="Unleashed changes announced by webhooks to the CRM within seconds: the named "
    "customers read one by one, the CRM read afresh, then link, plan and pull. Launched by "
    "unleashed_webhook_sensor.",
    tags={"sync/direction": "pull"},
    executor_def=dg.in_process_executor,
)  # fmt: skip


def _settle(context: dg.SensorEvaluationContext, events: EventStore) -> dict[str, int]:
    """Close the batches whose runs ended: consumed after a success, pending again after a
    failure (or when no run was ever made for it)."""
    done = {"consumed": 0, "released": 0, "running": 0}
    for batch in events.open_batches():
        runs = context.instance.get_runs(dg.RunsFilter(tags={BATCH_TAG: batch.key}), limit=1)
        if not runs:
            if time.time() - batch.claimed_at > STALE_CLAIM_S:
                done["released"] += events.release(batch.key, failed=False)
            else:
                done["running"] += batch.events
            continue
        run = runs[0]
        if run.status == dg.DagsterRunStatus.SUCCESS:
            done["consumed"] += events.consume(batch.key, run.run_id)
        elif run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            done["released"] += events.release(batch.key, failed=True)
        else:
            done["running"] += batch.events
    return done


@dg.sensor(
    job=unleashed_webhook_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Unleashed webhook events recorded by the receiver: a run that reads the "
    "customers they name and pulls them to the CRM. Nothing to do without the receiver.",
)
def unleashed_webhook_sensor(
    context: dg.SensorEvaluationContext,
    duckdb: SyncDuckDB,
    unleashed: UnleashedResource,
    sync_config: SyncConfigResource,
):
    with EventStore(events_path(duckdb.database)) as events:
        settled = _settle(context, events)
        events.prune(KEEP_CONSUMED_S)
        pending = events.pending()
        if not pending:
            retry = events.next_retry()
            note = (
                f" Events of a failed run are read again at "
                f"{datetime.fromtimestamp(retry, UTC):%Y-%m-%d %H:%M:%S} UTC."
                if retry
                else ""
            )
            return dg.SkipReason(
                f"No new webhook event (runs in progress: {settled['running']} events; "
                f"consumed this tick: {settled['consumed']}).{note}"
            )
        block = unleashed.usage_block()
        if block is not None:
            return dg.SkipReason(
                _usage_limit_pause(
                    block,
                    sync_config.settings(),
                    f"{len(pending)} webhook events wait; they are read once requests pass "
                    "again (or by the import that follows).",
                )
            )
        take = pending[:MAX_BATCH]
        key = events.claim([e.seq for e in take])
    customers = list(dict.fromkeys(e.customer_guid for e in take))
    return dg.RunRequest(
        run_key=f"unleashed-webhook:{key}",
        run_config={"ops": {READS_OP: {"config": {"customers": customers}}}},
        tags={
            "sync/trigger": "unleashed-webhook",
            BATCH_TAG: key,
            "sync/webhook-events": str(len(take)),
            "sync/webhook-customers": str(len(customers)),
        },
    )


WEBHOOK_JOBS = [unleashed_webhook_job]
WEBHOOK_SENSORS = [unleashed_webhook_sensor]
