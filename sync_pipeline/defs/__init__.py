"""Dagster wiring: assets, checks, sensors, schedules, jobs and resources."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg


def build_defs(resources: Mapping[str, Any]) -> dg.Definitions:
    """All definitions bound to the given resources (the code location passes env-backed ones,
    tests pass resources pointing at the local servers)."""
    from sync_pipeline.defs.automation import JOBS, SCHEDULES, SENSORS
    from sync_pipeline.defs.checks import CHECKS
    from sync_pipeline.defs.extract import CRM_EXTRACTS, UNLEASHED_EXTRACTS
    from sync_pipeline.defs.preflight import sync_preflight
    from sync_pipeline.defs.sync import SYNC_ASSETS

    return dg.Definitions(
        assets=[sync_preflight, *CRM_EXTRACTS, *UNLEASHED_EXTRACTS, *SYNC_ASSETS],
        asset_checks=CHECKS,
        jobs=JOBS,
        sensors=SENSORS,
        schedules=SCHEDULES,
        resources=dict(resources),
        # Every step opens the one DuckDB file, so steps of a run are serialised by the `duckdb`
        # pool anyway; a subprocess per step (the default executor) only adds seconds per step,
        # and a slow import run delays the pushes queued behind it.
        executor=dg.in_process_executor,
    )
