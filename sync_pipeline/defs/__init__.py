"""Dagster wiring: assets, checks, sensors, schedules, jobs and resources."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg


def build_defs(resources: Mapping[str, Any]) -> dg.Definitions:
    """All definitions bound to the given resources (the code location passes env-backed ones,
    tests pass resources pointing at the local servers), the schedules built from the settings
    file of `resources["sync_config"]`."""
    from sync_pipeline.defs.alerts import ALERT_SENSORS
    from sync_pipeline.defs.automation import JOBS, SENSORS, build_schedules
    from sync_pipeline.defs.checks import CHECKS
    from sync_pipeline.defs.extract import CRM_EXTRACTS, UNLEASHED_EXTRACTS
    from sync_pipeline.defs.preflight import sync_preflight
    from sync_pipeline.defs.resources import AlertsResource
    from sync_pipeline.defs.sync import SYNC_ASSETS
    from sync_pipeline.defs.webhook_reads import unleashed_webhook_reads
    from sync_pipeline.defs.webhooks import WEBHOOK_JOBS, WEBHOOK_SENSORS
    from sync_pipeline.settings import load_settings

    # The schedules' cron strings are the settings' times, so the settings file is read here, as
    # the code location loads; a file that cannot be read fails the load with its message. Its
    # conflict_policies are checked against the mappings at each run instead: a broken mapping
    # should fail the runs that read it, not hide the whole code location.
    schedules = build_schedules(load_settings(resources["sync_config"].settings_file))

    return dg.Definitions(
        assets=[
            sync_preflight,
            *CRM_EXTRACTS,
            *UNLEASHED_EXTRACTS,
            unleashed_webhook_reads,
            *SYNC_ASSETS,
        ],
        asset_checks=CHECKS,
        jobs=[*JOBS, *WEBHOOK_JOBS],
        sensors=[*SENSORS, *WEBHOOK_SENSORS, *ALERT_SENSORS],
        schedules=schedules,
        # Notices need no secret until an operator turns them on (settings: alerts).
        resources={"alerts": AlertsResource(), **resources},
        # Every step opens the one DuckDB file, so steps of a run are serialised by the `duckdb`
        # pool anyway; a subprocess per step (the default executor) only adds seconds per step,
        # and a slow import run delays the pushes queued behind it.
        executor=dg.in_process_executor,
    )
