"""The automation pauses while Unleashed's monthly API usage limit is used up
(docs/api-assumptions.md): the ticks that would call Unleashed skip and say until when, the
daytime import probes once an hour, and everything resumes on its own once a request succeeds
again or the limit resets."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import dagster as dg
import pytest

from sync_pipeline.clients.base import usage_log
from sync_pipeline.defs.automation import build_schedules, crm_change_sensor
from sync_pipeline.defs.checks import _unleashed_usage
from sync_pipeline.defs.resources import SyncConfigResource, UnleashedResource
from sync_pipeline.settings import WEEKDAYS, ImportWindow, Settings, load_settings, save_settings
from tests.harness import failure_messages, run_failing

UNLEASHED_URL = "https://unleashed.test"  # never called: a paused tick sends no request
SEEN = datetime(2026, 11, 23, 10, 2, tzinfo=UTC)  # a Monday
RESET = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def instance():
    # One for all the ticks of a test: without it, each tick's resources build their own. On
    # disk, as the daemon's: the import schedule looks up the runs it launched.
    with dg.instance_for_test() as instance:
        yield instance


def _resources(tmp_path, **settings) -> dict:
    settings_file = tmp_path / "settings.yaml"
    save_settings(Settings(**settings), settings_file)
    return {
        "unleashed": UnleashedResource(
            base_url=UNLEASHED_URL,
            api_id="00000000-0000-0000-0000-000000000001",
            api_key="not-used",
            pacing_file=str(tmp_path / "api-pacing.sqlite"),
        ),
        "sync_config": SyncConfigResource(settings_file=str(settings_file)),
    }


def _schedules(resources) -> list[dg.ScheduleDefinition]:
    """The import, overnight-fix and pruning schedules, built from the settings file as the code
    location builds them."""
    return build_schedules(load_settings(resources["sync_config"].settings_file))


def _on_the_schedule(when: datetime) -> datetime:
    """The import tick at or before `when`, every 5 minutes."""
    return when.replace(minute=when.minute - when.minute % 5, second=0, microsecond=0)


def _tick(schedule, resources, when: datetime, instance):
    with dg.build_schedule_context(
        instance=instance, scheduled_execution_time=when, resources=resources
    ) as context:
        return schedule(context)


def _launched(instance, request) -> dg.RunRequest:
    """What the daemon does with a tick's run request: a run with its tags."""
    tags = {**request.tags, "dagster/run_key": request.run_key}
    instance.add_run(dg.DagsterRun(job_name="sync_cycle_job", run_id=str(uuid.uuid4()), tags=tags))
    return request


def test_daytime_imports_skip_while_the_limit_is_used_up_and_probe_once_an_hour(tmp_path, instance):
    """Each paused tick says why, until when (UTC and the settings' time zone), how it resumes
    and when the next probe is; once no request has been refused for about an hour, an import
    tick is the normal import tagged as a probe; one probe per refusal and hour, however many
    ticks come while it waits in the queue, and another an hour on if it ended without reaching
    Unleashed; evaluating a tick writes nothing, so a retried or previewed tick changes nothing;
    once the block is cleared, or its reset time has come, the ticks import as before."""
    resources = _resources(tmp_path, timezone="Europe/Berlin")  # UTC+1 in November
    daytime_import_schedule, _, _ = _schedules(resources)
    log = usage_log(resources["unleashed"].pacing_file, UNLEASHED_URL)
    log.block(RESET, now=SEEN)
    pacing = Path(resources["unleashed"].pacing_file)

    # The import ticks (every 15 minutes in the settings), 10:15 to 12:30 UTC; the schedule's
    # other ticks skip as outside the window whatever the block (11:20 stands for them).
    ticks = [SEEN.replace(minute=0) + timedelta(minutes=15 * i) for i in range(1, 11)]
    ticks.insert(5, datetime(2026, 11, 23, 11, 20, tzinfo=UTC))
    first_probe = datetime(2026, 11, 23, 11, 0, tzinfo=UTC)  # 58 minutes after the refusal
    results = {}
    for when in ticks:
        before = pacing.read_bytes()
        results[when] = _tick(daytime_import_schedule, resources, when, instance)
        assert pacing.read_bytes() == before  # a tick (or its preview) writes nothing
        if when == first_probe:
            again = _tick(daytime_import_schedule, resources, when, instance)  # a retried tick
            assert again == results[when]
        if isinstance(results[when], dg.RunRequest):
            _launched(instance, results[when])
        if when == first_probe + timedelta(minutes=15):
            # The probe waited in the run queue past the next tick; it is refused now.
            log.block(RESET, now=when + timedelta(seconds=40))
        if when == datetime(2026, 11, 23, 12, 15, tzinfo=UTC):
            log.block(RESET, now=when + timedelta(seconds=30))  # the next probe is refused too
    requests = {when: r for when, r in results.items() if isinstance(r, dg.RunRequest)}
    assert {when: r.run_key for when, r in requests.items()} == {
        first_probe: "usage-limit-probe:2026-11-23T10:02:00+0h",
        # About an hour after the probe's own refusal (11:15:40): the next probe.
        datetime(2026, 11, 23, 12, 15, tzinfo=UTC): "usage-limit-probe:2026-11-23T11:15:40+0h",
    }
    probe = requests[first_probe]
    assert probe.partition_key == "2026-11-23-11:00"
    assert probe.tags["sync/trigger"] == "usage-limit-probe"
    assert probe.tags["sync/usage-limit-refused-at"] == "2026-11-23T10:02:00"

    skipped = [r.skip_message for r in results.values() if isinstance(r, dg.SkipReason)]
    paused = [message for message in skipped if "usage limit" in message]
    assert len(paused) == 8  # every import tick but the two probes
    first = results[datetime(2026, 11, 23, 10, 15, tzinfo=UTC)].skip_message
    assert "Unleashed's monthly API usage limit is used up" in first
    assert "a request was refused at 2026-11-23 10:02 UTC" in first
    assert (
        "until the limit resets on 2026-12-01 00:00 UTC (2026-12-01 01:00 Europe/Berlin)" in first
    )
    assert "resume on their own at the reset, or as soon as an Unleashed request succeeds" in first
    assert "the next at 2026-11-23 11:00 UTC (2026-11-23 12:00 Europe/Berlin)." in first
    waiting = results[first_probe + timedelta(minutes=15)].skip_message  # the probe is queued
    assert "the probe of this hour (run " in waiting
    assert "has not reached Unleashed yet; if it ends without doing so, the next at " in waiting
    assert "2026-11-23 12:00 UTC (2026-11-23 13:00 Europe/Berlin)." in waiting
    after_probe = results[datetime(2026, 11, 23, 11, 30, tzinfo=UTC)].skip_message
    assert "a request was refused at 2026-11-23 11:15 UTC" in after_probe
    assert "the next at 2026-11-23 12:15 UTC (2026-11-23 13:15 Europe/Berlin)." in after_probe
    between = results[datetime(2026, 11, 23, 11, 20, tzinfo=UTC)].skip_message
    assert between.startswith("Outside the import window")  # not an import tick anyway

    # A probe that ended without reaching Unleashed (no refusal, no success): another an hour on.
    unanswered = []
    for when in (datetime(2026, 11, 23, 13, 30, tzinfo=UTC),
                 datetime(2026, 11, 23, 13, 45, tzinfo=UTC),
                 datetime(2026, 11, 23, 14, 15, tzinfo=UTC),
                 datetime(2026, 11, 23, 14, 30, tzinfo=UTC)):  # fmt: skip
        result = _tick(daytime_import_schedule, resources, when, instance)
        if isinstance(result, dg.RunRequest):
            unanswered.append(_launched(instance, result).run_key)
        else:
            unanswered.append(None)
    assert unanswered == [
        "usage-limit-probe:2026-11-23T12:15:30+0h",  # 12:15:30 + 55 min: due from 13:10:30
        None,
        "usage-limit-probe:2026-11-23T12:15:30+1h",
        None,
    ]
    # The next probe is the first import tick at or after the earliest time, not before it.
    log.block(RESET, now=datetime(2026, 11, 24, 10, 7, tzinfo=UTC))
    tuesday = _tick(
        daytime_import_schedule, resources, datetime(2026, 11, 24, 10, 15, tzinfo=UTC), instance
    )
    assert "the next at 2026-11-24 11:15 UTC" in tuesday.skip_message  # 11:00 is too early
    # Friday evening: the window has closed for the weekend, so the next probe is on Monday.
    log.block(RESET, now=datetime(2026, 11, 27, 17, 50, tzinfo=UTC))
    friday = _tick(
        daytime_import_schedule, resources, datetime(2026, 11, 27, 18, 0, tzinfo=UTC), instance
    )
    assert "the next at 2026-11-30 06:00 UTC (2026-11-30 07:00 Europe/Berlin)" in (
        friday.skip_message
    )
    # Monday's last import tick, the limit resetting at midnight: no probe before the reset.
    log.block(RESET, now=datetime(2026, 11, 30, 17, 50, tzinfo=UTC))
    monday = _tick(
        daytime_import_schedule, resources, datetime(2026, 11, 30, 18, 0, tzinfo=UTC), instance
    )
    assert monday.skip_message.endswith("about an hour: the reset comes first.")

    normal = _tick(
        daytime_import_schedule, resources, datetime(2026, 12, 1, 9, 0, tzinfo=UTC), instance
    )
    assert isinstance(normal, dg.RunRequest) and normal.run_key == "import:2026-12-01T09:00"
    log.clear()  # a request succeeded: the limit was raised
    resumed = _tick(
        daytime_import_schedule, resources, datetime(2026, 11, 23, 12, 30, tzinfo=UTC), instance
    )
    assert isinstance(resumed, dg.RunRequest)
    assert resumed.run_key == "import:2026-11-23T12:30"
    assert resumed.tags["sync/trigger"] == "daytime-import"


def test_the_overnight_fix_skips_while_the_limit_is_used_up_and_pruning_runs(tmp_path, instance):
    """The overnight account-manager fix reads Unleashed: on its night while the limit is used up
    it skips, saying why and until when. History pruning sends no API request and runs."""
    resources = _resources(tmp_path)
    _, overnight_account_manager_fix_schedule, history_pruning_schedule = _schedules(resources)
    usage_log(resources["unleashed"].pacing_file, UNLEASHED_URL).block(RESET, now=SEEN)
    fix_at = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)  # 02:00 in London (UTC in November)
    fix = _tick(overnight_account_manager_fix_schedule, resources, fix_at, instance)
    assert isinstance(fix, dg.SkipReason)
    assert "usage limit is used up" in fix.skip_message
    assert "2026-12-01 00:00 UTC (2026-12-01 00:00 Europe/London)" in fix.skip_message
    assert "overnight account-manager fix is skipped tonight" in fix.skip_message
    pruning = _tick(history_pruning_schedule, resources, fix_at + timedelta(hours=1), instance)
    assert isinstance(pruning, dg.RunRequest)
    after_reset = _tick(
        overnight_account_manager_fix_schedule, resources, RESET + timedelta(hours=2), instance
    )
    assert isinstance(after_reset, dg.RunRequest)
    assert after_reset.run_key == "account-manager-fix:2026-12-01"


def test_the_usage_check_warns_while_unleashed_refuses_requests(tmp_path):
    resources = _resources(tmp_path)
    unleashed, sync_config = resources["unleashed"], resources["sync_config"]
    assert _unleashed_usage(unleashed, sync_config).passed
    usage_log(unleashed.pacing_file, UNLEASHED_URL).block(
        datetime.now(UTC) + timedelta(days=3), now=datetime.now(UTC)
    )
    check = _unleashed_usage(unleashed, sync_config)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "Unleashed refused a request at" in check.metadata["blocked"].value


def _unleashed_requests(h) -> int:
    return h.emu.stats("unleashed")["total_requests"]


def test_a_used_up_limit_pauses_the_automation_and_a_probe_resumes_it(harness, tmp_path, instance):
    """On the local servers: the limit used up, an import fails and records it; the next tick
    and the sensor skip naming the reset (the sensor's cursor stays put, and neither sends a
    request); the account buys more calls; an hour later the probe import succeeds and clears
    the block, which also pushes the CRM edit made meanwhile; the ticks import again and the
    sensor asks for a push of that edit, which finds it written: once, nothing lost."""
    h = harness
    h.use_pacing_file(tmp_path / "api-pacing.sqlite")
    h.set_settings(imports=ImportWindow(start=time(0, 0), end=time.max, days=list(WEEKDAYS),
                                        every_minutes=5))  # fmt: skip
    h.reload()
    daytime_import_schedule = h.schedule("daytime_import_schedule")
    unleashed = h.resources["unleashed"]
    h.cycle()
    with dg.build_sensor_context(instance=h.instance, resources=h.resources) as sensor:
        crm_change_sensor(sensor)  # the cursor now stands after the records the cycle synced
        cursor = sensor.cursor
        used = h.emu.set_unleashed_quota(None)["used"]
        h.emu.set_unleashed_quota(used, used=used)  # this month's requests are used up
        failed = run_failing(h)
        assert "API usage limit reached" in failure_messages(failed)
        reset = unleashed.usage_blocked_until()
        assert reset is not None  # the refusal is kept for the sensor and the schedules
        server_reset = datetime.fromisoformat(h.emu.set_unleashed_quota(used)["resets_at"])
        assert abs(reset - server_reset) < timedelta(seconds=5)  # from Retry-After: seconds

        pair = h.linked_company()
        h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0909"})
        before = _unleashed_requests(h)
        paused = crm_change_sensor(sensor)
        assert isinstance(paused, dg.SkipReason), paused
        assert f"until the limit resets on {reset:%Y-%m-%d %H:%M} UTC" in paused.skip_message
        assert "CRM changes are not pushed meanwhile" in paused.skip_message
        assert sensor.cursor == cursor
        now = _on_the_schedule(datetime.now(UTC))
        tick = _tick(daytime_import_schedule, h.resources, now, instance)
        assert isinstance(tick, dg.SkipReason), tick
        assert f"until the limit resets on {reset:%Y-%m-%d %H:%M} UTC" in tick.skip_message
        assert "Europe/London" in tick.skip_message
        assert _unleashed_requests(h) == before

        h.emu.set_unleashed_quota(used + 1000)  # the account buys more calls
        log = usage_log(unleashed.pacing_file, unleashed.base_url)
        block = log.current_block()
        log.block(block.resets_at, now=block.seen_at - timedelta(hours=1))  # an hour later
        now = _on_the_schedule(datetime.now(UTC))
        probe = _tick(daytime_import_schedule, h.resources, now, instance)
        assert isinstance(probe, dg.RunRequest), probe
        assert probe.tags["sync/trigger"] == "usage-limit-probe"
        h.run("sync_cycle_job", probe.partition_key, tags=probe.tags)
        assert unleashed.usage_blocked_until() is None
        assert h.unleashed.get_customer(pair["erp_id"]).PhoneNumber == "0113 496 0909"
        later = now + timedelta(minutes=5)
        tick = _tick(daytime_import_schedule, h.resources, later, instance)
        assert isinstance(tick, dg.RunRequest) and tick.tags["sync/trigger"] == "daytime-import"

        push = crm_change_sensor(sensor)
        assert isinstance(push, dg.RunRequest), push
        edited = h.crm.get("Divisions", pair["crm_id"])["LastUpdatedTimestamp"]
        assert push.tags["sync/Divisions"] == edited  # the edit made while paused
    h.emu.reset_stats("unleashed")
    h.push()
    assert h.emu.stats("unleashed")["requests"] == {}  # already written: nothing sent again
    audit = h.query(
        "SELECT new_value FROM audit_log WHERE erp_id = ? AND field = 'phone'", [pair["erp_id"]]
    )
    assert list(audit["new_value"]) == ["0113 496 0909"]
