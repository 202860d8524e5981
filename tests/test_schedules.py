"""The schedules are cron schedules built from the settings: Dagster runs them exactly at the
import times and nightly times the settings give, in their time zone, and what a tick decides
agrees with the cron. A change to those times in the file needs a code-location reload, and a
tick says so."""

from __future__ import annotations

import heapq
import itertools
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

# Dagster's own iteration of cron strings, to see the ticks it will run (tests only: not public).
from dagster._utils.schedules import cron_string_iterator

from sync_pipeline.defs.automation import build_schedules
from sync_pipeline.defs.resources import SyncConfigResource, UnleashedResource
from sync_pipeline.settings import (
    EVERY_MINUTES,
    ImportWindow,
    Settings,
    SettingsError,
    load_settings,
    save_settings,
)
from sync_pipeline.timetable import import_crons, import_times, is_due, next_import_time


def _dagster_ticks(schedule: dg.ScheduleDefinition, start: datetime, until: datetime):
    """The ticks Dagster runs `schedule` at from `start` until `until`, local times."""
    crons = schedule.cron_schedule
    crons = [crons] if isinstance(crons, str) else crons
    zone = schedule.execution_timezone
    iterators = [cron_string_iterator(start.timestamp(), c, zone) for c in crons]
    merged = heapq.merge(*iterators, key=lambda t: t.timestamp())
    return list(itertools.takewhile(lambda t: t < until, merged))


@pytest.mark.parametrize("minutes", [45, 90, 7, 300])
def test_an_interval_cron_cannot_keep_is_refused_listing_the_allowed_ones(tmp_path, minutes):
    """A 45-minute cron step runs at :00 and :45, not every 45 minutes; 90, 120 and 240 would
    run hourly."""
    file = tmp_path / "settings.yaml"
    file.write_text(f"imports:\n  every_minutes: {minutes}\n")
    with pytest.raises(SettingsError) as raised:
        load_settings(file)
    assert f"{file}: imports.every_minutes: {minutes} minutes is not an interval" in str(
        raised.value
    )
    assert "5, 6, 10, 12, 15, 20, 30, 60, 120, 180, 240, 360, 480, 720, 1440" in str(raised.value)


def test_the_import_schedule_is_the_settings_window_as_cron():
    schedule, fix, pruning = build_schedules(Settings())
    assert schedule.cron_schedule == ["0 7-19 * * 1-5", "15,30,45 7-18 * * 1-5"]
    assert schedule.execution_timezone == "Europe/London"
    assert "mon,tue,wed,thu,fri 07:00-19:00 every 15 min, Europe/London" in schedule.description
    assert "reload" in schedule.description
    assert (fix.cron_schedule, fix.execution_timezone) == ("0 2 * * *", "Europe/London")
    assert (pruning.cron_schedule, pruning.execution_timezone) == ("0 3 * * *", "Europe/London")
    assert "02:00 Europe/London" in fix.description and "reload" in fix.description


WINDOWS = [
    ImportWindow(),
    ImportWindow(start=time(7, 0), end=time(19, 0), every_minutes=120),
    ImportWindow(start=time(7, 10), end=time(18, 50), every_minutes=20, days=["sat", "sun"]),
    ImportWindow(start=time(6, 30), end=time(22, 0), every_minutes=60, days=["mon", "wed"]),
    ImportWindow(start=time(0, 0), end=time.max, every_minutes=5, days=["sun", "mon"]),
    ImportWindow(start=time(9, 0), end=time(17, 0), every_minutes=1440),
]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"{w.start:%H%M}-every-{w.every_minutes}")
def test_dagster_runs_the_imports_exactly_at_the_settings_times(window):
    """From start, every every_minutes, up to and including end, on the set days: the ticks
    Dagster runs over a week are those, and each one is a tick that imports."""
    settings = Settings(imports=window, timezone="America/New_York")
    schedule = build_schedules(settings)[0]
    zone = ZoneInfo(settings.timezone)
    monday = datetime(2026, 6, 1, tzinfo=zone)
    ticks = _dagster_ticks(schedule, monday - timedelta(seconds=1), monday + timedelta(days=7))
    expected = [
        datetime.combine(monday.date() + timedelta(days=d), at, tzinfo=zone)
        for d in range(7)
        if ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[d] in window.days
        for at in import_times(window)
    ]
    assert [t.astimezone(zone) for t in ticks] == expected
    assert all(is_due(import_times(window), window.days, zone, t.astimezone(UTC)) for t in ticks)


def test_import_times_run_from_start_every_interval_to_end():
    w = ImportWindow(start=time(7, 0), end=time(19, 0), every_minutes=120)
    assert [f"{t:%H:%M}" for t in import_times(w)] == [
        "07:00", "09:00", "11:00", "13:00", "15:00", "17:00", "19:00",
    ]  # fmt: skip
    assert import_crons(w) == ["0 7,9,11,13,15,17,19 * * 1-5"]
    zone = ZoneInfo("Europe/London")
    friday_evening = datetime(2026, 11, 27, 19, 1, tzinfo=UTC)
    assert next_import_time(w, zone, friday_evening) == datetime(2026, 11, 30, 7, 0, tzinfo=UTC)


def _tick(schedule, settings_file, when: datetime):
    resources = {
        "sync_config": SyncConfigResource(settings_file=str(settings_file)),
        "unleashed": UnleashedResource(
            base_url="https://unleashed.test", api_id="00000000-0000-0000-0000-000000000001",
            api_key="not-used",
        ),  # no pacing file: no usage block, and no request is sent
    }  # fmt: skip
    with (
        dg.instance_for_test() as instance,
        dg.build_schedule_context(
            instance=instance, scheduled_execution_time=when, resources=resources
        ) as context,
    ):
        return schedule(context)


def test_a_nightly_job_runs_on_the_night_daylight_saving_skips_its_time(tmp_path):
    """Berlin's clocks go from 02:00 to 03:00 on 29 March 2026: a pruning set at 02:30 runs at
    03:00 that night, as Dagster ticks it, and at 02:30 on the others."""
    file = save_settings(
        Settings(timezone="Europe/Berlin", history_pruning_at=time(2, 30)), tmp_path / "s.yaml"
    )
    pruning = build_schedules(load_settings(file))[2]
    zone = ZoneInfo("Europe/Berlin")
    start = datetime(2026, 3, 26, 12, 0, tzinfo=zone)
    ticks = _dagster_ticks(pruning, start, start + timedelta(days=5))
    assert [f"{t.astimezone(zone):%d %H:%M}" for t in ticks] == [
        "27 02:30", "28 02:30", "29 03:00", "30 02:30", "31 02:30",
    ]  # fmt: skip
    runs = [_tick(pruning, file, t.astimezone(UTC)) for t in ticks]
    assert [r.run_key for r in runs] == [
        f"history-pruning:2026-03-{day}" for day in (27, 28, 29, 30, 31)
    ]


def test_a_tick_after_the_times_changed_in_the_file_says_to_reload(tmp_path):
    file = save_settings(Settings(), tmp_path / "s.yaml")
    imports, fix, _ = build_schedules(load_settings(file))
    save_settings(
        Settings(imports=ImportWindow(every_minutes=30), overnight_fix_at=time(4, 0)), file
    )
    quarter_past = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)  # a Monday, London on UTC
    skipped = _tick(imports, file, quarter_past)
    assert isinstance(skipped, dg.SkipReason)
    assert "Outside the import window (mon,tue,wed,thu,fri 07:00-19:00 every 30 min" in (
        skipped.skip_message
    )
    assert "still runs at mon,tue,wed,thu,fri 07:00-19:00 every 15 min, Europe/London" in (
        skipped.skip_message
    )
    assert "reload the code location" in skipped.skip_message
    half_past = _tick(imports, file, quarter_past + timedelta(minutes=15))
    assert isinstance(half_past, dg.RunRequest)  # a time the file still imports at
    night = _tick(fix, file, datetime(2026, 11, 24, 2, 0, tzinfo=UTC))
    assert isinstance(night, dg.SkipReason)
    assert "Runs at 04:00 Europe/London; now 02:00." in night.skip_message
    assert "still runs at 02:00 Europe/London): reload the code location" in night.skip_message


def test_every_allowed_interval_is_a_cron_schedule():
    for minutes in EVERY_MINUTES:
        window = ImportWindow(start=time(0, 0), end=time(23, 59), every_minutes=minutes)
        assert import_crons(window)
        assert build_schedules(Settings(imports=window))[0].cron_schedule
