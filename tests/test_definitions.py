"""The code location loads, from Python and through workspace.yaml as `dagster dev` loads it."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from sync_pipeline.definitions import defs
from sync_pipeline.settings import load_settings
from sync_pipeline.timetable import import_crons

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_are_loadable_and_complete():
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {
        "sync/sync_preflight", "crm/crm_companies", "crm/crm_contacts", "crm/crm_users",
        "unleashed/unleashed_customers", "unleashed/unleashed_contacts",
        "unleashed/unleashed_salespersons", "sync/sync_links", "sync/sync_plan",
        "sync/push_to_unleashed", "sync/pull_to_crm", "sync/account_manager_fix",
        "crm/account_manager_candidates", "sync/sync_history",
    } <= keys  # fmt: skip
    # The UI's graph and lineage show an asset by the last part of its key: each names its system.
    names = [k.path[-1] for k in defs.resolve_asset_graph().get_all_asset_keys()]
    assert len(names) == len(set(names)), sorted(names)
    # The sales ledger's customer code comes expanded with the division: no asset of its own.
    assert "crm/sales_ledgers" not in keys
    jobs = ("crm_push_job", "sync_cycle_job", "full_resync_job", "account_manager_fix_job",
            "history_pruning_job", "preflight_job")  # fmt: skip
    for job in jobs:
        defs.resolve_job_def(job)
    sensor = defs.resolve_sensor_def("crm_change_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    schedules = ("daytime_import_schedule", "overnight_account_manager_fix_schedule",
                 "history_pruning_schedule")  # fmt: skip
    for name in schedules:
        assert defs.resolve_schedule_def(name).default_status == dg.DefaultScheduleStatus.RUNNING
    # The schedules run at the times of the settings file the code location loaded.
    settings = load_settings(ROOT / "settings.yaml")
    imports = defs.resolve_schedule_def("daytime_import_schedule")
    assert imports.cron_schedule == import_crons(settings.imports)
    assert imports.execution_timezone == settings.timezone


def test_code_location_loads_from_workspace_yaml(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={"PATH": "/usr/bin:/bin", "DAGSTER_HOME": str(tmp_path), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Validation successful for code location sync_pipeline" in result.stderr + result.stdout


def test_api_pacing_window_is_shared_through_a_file_next_to_the_database(monkeypatch, tmp_path):
    """Every run process of a deployment draws from one pacing window per API (see
    test_crm_api for two processes against a rate-limited server)."""
    from sync_pipeline.defs.resources import default_resources

    monkeypatch.setenv("SYNC_DUCKDB_PATH", str(tmp_path / "db" / "sync.duckdb"))
    monkeypatch.delenv("SYNC_PACING_FILE", raising=False)
    resources = default_resources()
    beside = str(tmp_path / "db" / "api-pacing.sqlite")
    assert resources["crm"].pacing_file == resources["unleashed"].pacing_file == beside
    monkeypatch.setenv("SYNC_PACING_FILE", str(tmp_path / "pacing.sqlite"))
    assert default_resources()["crm"].pacing_file == str(tmp_path / "pacing.sqlite")


# Jobs that talk to the CRM or Unleashed; history pruning only deletes old rows in DuckDB.
API_JOBS = ("crm_push_job", "sync_cycle_job", "full_resync_job", "account_manager_fix_job",
            "unleashed_webhook_job")  # fmt: skip


def test_every_job_that_reads_or_writes_starts_with_the_preflight():
    """`sync/sync_preflight` is in every job that calls an API, and every other asset of the job is
    downstream of it: nothing is read into the sync or written before the preflight passed."""
    graph = defs.resolve_asset_graph()
    preflight = dg.AssetKey(["sync", "sync_preflight"])
    for name in API_JOBS:
        selected = defs.resolve_job_def(name).asset_layer.selected_asset_keys
        assert preflight in selected, name
        for key in selected - {preflight}:
            upstream = dg.AssetSelection.assets(key).upstream().resolve(graph)
            assert preflight in upstream, f"{name}: {key.to_user_string()} can run before it"
    only = defs.resolve_job_def("preflight_job").asset_layer.selected_asset_keys
    assert only == {preflight}


def test_import_partitions_cover_the_recent_days_not_every_hour_since_install(monkeypatch):
    """The UI and a backfill offer the last SYNC_BACKFILL_DAYS days of hourly windows (7 by
    default) up to the current hour, not thousands of windows since the first install."""
    from sync_pipeline.defs.extract import BACKFILL_DAYS, import_partitions

    now = datetime(2026, 12, 6, 3, 40, tzinfo=UTC)
    keys = import_partitions(now).get_partition_keys(current_time=now)
    assert (keys[0], keys[-1]) == ("2026-11-29-00:00", "2026-12-06-03:00")
    assert len(keys) == BACKFILL_DAYS * 24 + 4
    shown = defs.resolve_job_def("sync_cycle_job").partitions_def.get_partition_keys()
    assert len(shown) <= (BACKFILL_DAYS + 1) * 24 + 1
    assert datetime.now(UTC).strftime("%Y-%m-%d-%H:00") in shown

    monkeypatch.setenv("SYNC_BACKFILL_DAYS", "30")
    assert import_partitions(now).get_partition_keys(current_time=now)[0] == "2026-11-06-00:00"
    monkeypatch.setenv("SYNC_BACKFILL_DAYS", "a month")
    with pytest.raises(ValueError, match="SYNC_BACKFILL_DAYS must be a whole number of days"):
        import_partitions(now)
