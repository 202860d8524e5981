"""Unleashed → CRM in seconds: the webhook job and the sensor that launches it.

The receiver (`sync-pipeline webhooks`) records each signed delivery in the event file; this
sensor launches `unleashed_webhook_job` when events are pending and no webhook run is waiting to
start, and the run claims every pending event as it starts (so deliveries that arrive while it
waits in the queue ride along). The job reads the customers they name alone
(`GET /Customers/{guid}`), reads the CRM afresh, links, plans, and pulls to the CRM; it does not
push: CRM changes have their own sensor
and push job, and each direction's run fails, and is retried, on its own writes only. A run's
events are consumed once it succeeded; a failed run's go back to pending and are read again
(after 30 s, doubling up to an hour). The daytime imports stay the safety net and the backfill:
an event that never arrived is read by the next import.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import dagster as dg

from sync_pipeline.defs.extract import crm_companies, crm_contacts
from sync_pipeline.defs.preflight import sync_preflight
from sync_pipeline.defs.resources import SyncConfigResource, SyncDuckDB, UnleashedResource
from sync_pipeline.defs.sync import (
    BRAKE_CHECK,
    WRITES_CHECK,
    pull_to_crm,
    sync_links,
    sync_plan,
)
from sync_pipeline.defs.webhook_reads import unleashed_webhook_reads
from sync_pipeline.pause import usage_limit_pause
from sync_pipeline.webhooks.events import EventStore, events_path

STALE_CLAIM_S = 300  # a batch whose run cannot be found after this long is released
KEEP_CONSUMED_S = 7 * 24 * 3600  # delivery ids kept for de-duplication
UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]

unleashed_webhook_job = dg.define_asset_job(
    "unleashed_webhook_job",
    selection=dg.AssetSelection.assets(
        sync_preflight, unleashed_webhook_reads, crm_companies, crm_contacts, sync_links,
        sync_plan, pull_to_crm,
    ).without_checks()
    | dg.AssetSelection.checks(
        dg.AssetCheckKey(pull_to_crm.key, WRITES_CHECK),
        # the plan's brake check comes with the plan (and holds an unusual plan here too)
        dg.AssetCheckKey(sync_plan.key, BRAKE_CHECK),
    ),
    description="Unleashed changes announced by webhooks to the CRM within seconds: the "
    "customers the pending events name read one by one, the CRM read afresh, then link, plan "
    "and pull. Launched by unleashed_webhook_sensor.",
    tags={"sync/direction": "pull"},
    executor_def=dg.in_process_executor,
)  # fmt: skip


def _settle(context: dg.SensorEvaluationContext, events: EventStore) -> dict[str, int]:
    """Close the batches whose runs ended: consumed after a success, pending again after a
    failure (or when the run cannot be found)."""
    done = {"consumed": 0, "released": 0, "running": 0}
    for batch in events.open_batches():
        run = context.instance.get_run_by_id(batch.key)
        if run is None:
            if time.time() - batch.claimed_at > STALE_CLAIM_S:
                done["released"] += events.release(batch.key, failed=False)
            else:
                done["running"] += batch.events
        elif run.status == dg.DagsterRunStatus.SUCCESS:
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
                f"No new webhook event (events being read by runs: {settled['running']}; "
                f"consumed this tick: {settled['consumed']}).{note}"
            )
        # A run that has not claimed its events yet (queued, or starting) reads these too: one
        # run per queue slot, however many deliveries arrive while runs wait for the database.
        waiting = [
            run.run_id
            for run in context.instance.get_runs(
                dg.RunsFilter(job_name=unleashed_webhook_job.name, statuses=UNFINISHED)
            )
            if not events.has_batch(run.run_id)
        ]
        if waiting:
            return dg.SkipReason(
                f"{len(pending)} webhook events wait for run {waiting[0][:8]}, which reads them "
                "when it starts."
            )
        block = unleashed.usage_block()
        if block is not None:
            return dg.SkipReason(
                usage_limit_pause(
                    block,
                    sync_config.settings(),
                    f"{len(pending)} webhook events wait; they are read once requests pass "
                    "again (or by the import that follows).",
                )
            )
    customers = {e.customer_guid for e in pending}
    return dg.RunRequest(
        run_key=f"unleashed-webhook:{pending[-1].delivery_id}:{time.time():.0f}",
        tags={
            "sync/trigger": "unleashed-webhook",
            "sync/webhook-events": str(len(pending)),
            "sync/webhook-customers": str(len(customers)),
        },
    )


WEBHOOK_JOBS = [unleashed_webhook_job]
WEBHOOK_SENSORS = [unleashed_webhook_sensor]
