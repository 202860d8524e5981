"""The code location: everything Dagster loads (`dagster dev` via workspace.yaml)."""

from __future__ import annotations

import dagster as dg

from sync_pipeline.defs.automation import JOBS, SCHEDULES, SENSORS
from sync_pipeline.defs.checks import CHECKS
from sync_pipeline.defs.extract import CRM_EXTRACTS, UNLEASHED_EXTRACTS
from sync_pipeline.defs.resources import default_resources
from sync_pipeline.defs.sync import SYNC_ASSETS

defs = dg.Definitions(
    assets=[*CRM_EXTRACTS, *UNLEASHED_EXTRACTS, *SYNC_ASSETS],
    asset_checks=CHECKS,
    jobs=JOBS,
    sensors=SENSORS,
    schedules=SCHEDULES,
    resources=default_resources(),
)
