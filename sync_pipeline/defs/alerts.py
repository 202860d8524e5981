"""The two alert sensors: a notice for every failed run of this code location, and one for each
plan that opened new rejections. What a notice says and how it is delivered: `sync_pipeline.alerts`.
Both read the `alerts` settings at every tick and send nothing while they are off (the default)."""

import dagster as dg

from sync_pipeline.alerts import alert_settings, notify_new_rejections, notify_run_failure
from sync_pipeline.defs.resources import AlertsResource, SyncConfigResource
from sync_pipeline.defs.sync import sync_plan


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A notice (webhook and/or email, settings: alerts) for every failed run of this "
    "code location's jobs: job, run, partition, why it failed, the first failed writes, and a "
    "link to the run.",
)
def run_failure_alert_sensor(
    context: dg.RunFailureSensorContext, sync_config: SyncConfigResource, alerts: AlertsResource
) -> None:
    notify_run_failure(
        context.instance,
        context.dagster_run,
        context.failure_event,
        alert_settings(sync_config.settings, sync_config.settings_file, context.log),
        alerts.secrets(),
        context.log,
    )
    # None: the sensor goes on with the next failed run in the same tick.


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A notice (webhook and/or email, settings: alerts) when a plan opens new "
    "rejections (values the target would refuse or must not get): how many, and the first few "
    "with the record, the field and the whole reason. A rejection still open is not sent again.",
)
def rejection_alert_sensor(
    context: dg.SensorEvaluationContext, sync_config: SyncConfigResource, alerts: AlertsResource
):
    cursor, summary = notify_new_rejections(
        context.instance,
        sync_plan.key,
        context.cursor,
        alert_settings(sync_config.settings, sync_config.settings_file, context.log),
        alerts.secrets(),
        context.log,
    )
    context.update_cursor(cursor)
    return dg.SkipReason(summary)


ALERT_SENSORS = [run_failure_alert_sensor, rejection_alert_sensor]
