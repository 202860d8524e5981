"""Writes the target fails or refuses: the run says so (it fails, through a blocking check naming
the count and the first failures), and failed writes are retried on their own, with a bounded
backoff, by a sensor that launches a run at any hour; through Dagster against both local servers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import dagster as dg
import pandas as pd

from sync_pipeline import store
from sync_pipeline.defs.automation import failed_write_retry_sensor
from sync_pipeline.settings import WEEKDAYS, ImportWindow, WriteRetry
from tests.harness import run_with_unwritten, writes_check

PUSH = "sync/push_to_unleashed"
PULL = "sync/pull_to_crm"


def _customer(h, guid) -> dict:
    return h.unleashed.get_customer(guid).to_wire()


def _pairs(h, n: int):
    return list(
        h.query(f"SELECT crm_id, erp_id FROM company_links ORDER BY crm_id LIMIT {n}").itertuples(
            index=False
        )
    )


def _tick(h):
    with dg.build_sensor_context(instance=h.instance, resources=h.resources) as context:
        return failed_write_retry_sensor(context)


def _later(h, minutes: float) -> None:
    """The clock moves on: every retry time in the outbox comes `minutes` sooner."""
    with store.connect(h.db) as con:
        con.execute(
            "UPDATE outbox SET next_attempt_at = next_attempt_at - to_microseconds(?)",
            [int(minutes * 60e6)],
        )


def _launch(h, request: dg.RunRequest, *, unwritten: bool = False):
    """What the daemon does with the sensor's request: a run of its job with its tags."""
    tags = {**request.tags, "dagster/run_key": request.run_key}
    if unwritten:
        return run_with_unwritten(h, request.job_name, tags=tags)
    return h.run(request.job_name, tags=tags)


# This test's push: the first cycle's own writes (a first sync fills empty Unleashed fields from
# the CRM) are not it.
MINE = "op = 'update_erp' AND new_value LIKE '0113 496 09%'"


def _op(h, where: str) -> dict:
    rows = h.query(
        f"""SELECT op_id, status, attempts, failures, next_attempt_at, last_error
            FROM outbox WHERE {where} ORDER BY created_at"""
    )
    assert len(rows) == 1, rows.to_string()
    return rows.iloc[0].to_dict()


# ------------------------------------------------------------------------------------------------
# A run whose writes failed is a failed run
# ------------------------------------------------------------------------------------------------
def test_a_push_whose_writes_all_fail_is_a_failed_run_naming_the_count_and_first_error(harness):
    h = harness
    h.cycle()
    pairs = _pairs(h, 2)
    for n, p in enumerate(pairs):
        h.crm.patch("Divisions", int(p.crm_id), {"PhoneNumber": f"0113 496 09{n:02d}"})
    h.emu.set_faults("unleashed", error_rate=1.0)  # Unleashed answers 5xx to everything
    result = run_with_unwritten(h, "crm_push_job")
    h.emu.set_faults("unleashed")
    passed, description, meta = writes_check(result, PUSH)
    assert not passed
    assert description.startswith("None of the 2 writes to Unleashed this run planned was made")
    assert "(2 failed)" in description
    assert "HTTP 50" in description and pairs[0].erp_id in description
    assert (meta["writes_planned"], meta["writes_made"], meta["writes_failed"]) == (2, 0, 2)
    assert pairs[0].erp_id[:8] in meta["first_failures"] and "phone" in meta["first_failures"]
    assert "automatically from" in meta["first_failures"]
    # The run says it in the runs list (its tags), and its failure names the check.
    run = h.instance.get_run_by_id(result.run_id)
    assert run.tags["sync/writes-not-made-unleashed"] == "2 of 2 not written"
    failures = [e for e in result.all_events if e.is_step_failure]
    assert [e.step_key for e in failures] == ["sync__push_to_unleashed"]
    assert "planned_writes_written" in failures[0].event_specific_data.error.message
    # The apply step still recorded what it did (the outbox moved; nothing is lost).
    pushed = h.materialization_metadata(result, ["sync", "push_to_unleashed"])
    assert pushed["operations_failed"] == 2
    assert set(h.query(f"SELECT status FROM outbox WHERE {MINE}")["status"]) == {"failed"}


def test_a_push_with_some_writes_refused_fails_and_says_how_many_went_through(harness):
    """One customer's phone goes through; a contact edit Unleashed refuses (the same name and
    email as another contact of its customer: HTTP 400) does not. The run is not green, and its
    check says how many of the planned writes were not made, and that the refusal is not
    retried (it is a rejection from the next run on, which is green)."""
    h = harness
    h.cycle()
    twin = h.two_contacts_of_one_customer()
    other = h.linked_company(f"l.erp_id <> '{twin['cust']}'")
    h.crm.patch("Divisions", other["crm_id"], {"PhoneNumber": "0113 496 0977"})
    h.crm.patch(
        "Contacts",
        int(twin["b_crm"]),
        {"Forename": twin["first"], "Surname": twin["last"], "Email": twin["email"]},
    )
    result = run_with_unwritten(h, "crm_push_job")
    passed, description, meta = writes_check(result, PUSH)
    assert not passed and meta["writes_made"] == 1 and meta["writes_failed"] >= 1
    missing = meta["writes_planned"] - 1
    assert description.startswith(
        f"{missing} of the {meta['writes_planned']} writes to Unleashed this run planned were "
        "not made"
    )
    assert "HTTP 400" in description
    assert "no: refused by the server" in meta["first_failures"]
    assert _customer(h, other["erp_id"])["PhoneNumber"] == "0113 496 0977"
    assert h.query(
        "SELECT * FROM outbox WHERE status = 'refused' AND next_attempt_at IS NOT NULL"
    ).empty
    # The next run reports the refusal as a rejection and sends the record's other fields,
    # if any: a rejection is not a failed write.
    h.push()
    assert not h.query("SELECT * FROM rejections WHERE resolved_at IS NULL").empty


def test_a_push_whose_writes_were_all_deferred_is_green(harness):
    """Unleashed changed the field after the last import, so the push leaves it (deferred, for
    the next plan to see the conflict): nothing failed, and the run is green."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0113 496 0988"})
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0989"})
    result = h.push()  # asserts the run succeeded
    passed, description, meta = writes_check(result, PUSH)
    assert passed and description is None
    assert (meta["writes_planned"], meta["writes_made"], meta["deferred_or_set_aside"]) == (1, 0, 1)
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0113 496 0988"
    # The next push sees the conflict (the push wrote the record as read into its snapshot),
    # and one with nothing left to do is green too.
    assert writes_check(h.push(), PUSH)[0]
    passed, _, meta = writes_check(h.push(), PUSH)
    assert passed and meta["writes_planned"] == 0


def test_a_cycle_whose_crm_writes_fail_fails_and_its_other_steps_still_run(harness):
    """The CRM answers reads but refuses every write with a 5xx: the pull fails the run, naming
    the count and the first error, while the import, the plan, the push and the link checks of
    the same run are still done (and recorded)."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    other = h.linked_company(f"l.erp_id <> '{pair['erp_id']}'")
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0113 496 0966"})
    h.crm.patch("Divisions", other["crm_id"], {"PhoneNumber": "0113 496 0967"})
    h.emu.set_faults("crm", error_rate=1.0, methods=["PATCH", "POST"])
    result = run_with_unwritten(h, "sync_cycle_job")
    h.emu.set_faults("crm")
    passed, description, meta = writes_check(result, PULL)
    assert not passed and meta["writes_failed"] >= 1 and meta["writes_made"] == 0
    assert description.startswith("None of the") and "writes to the CRM" in description
    assert "PATCH" in description and "HTTP 50" in description
    assert str(pair["crm_id"]) in meta["first_failures"]
    run = h.instance.get_run_by_id(result.run_id)
    assert run.tags["sync/writes-not-made-crm"].endswith("not written")
    # The same run's push went through, and its checks on links and the plan ran.
    assert writes_check(result, PUSH)[0]
    assert _customer(h, other["erp_id"])["PhoneNumber"] == "0113 496 0967"
    checks = {
        (e.asset_key.to_user_string(), e.check_name) for e in result.get_asset_check_evaluations()
    }
    assert ("sync/sync_links", "links_are_one_to_one") in checks
    assert ("sync/sync_plan", "no_stale_rejections") in checks
    h.cycle()  # the CRM takes writes again: the next run writes it and is green
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0113 496 0966"


# ------------------------------------------------------------------------------------------------
# Failed writes retried on their own
# ------------------------------------------------------------------------------------------------
def test_a_failed_push_is_retried_by_the_sensor_with_backoff_at_any_hour_and_lands_once(harness):
    h = harness
    # Imports only on a day that is not today: the retries do not wait for one.
    today = WEEKDAYS[datetime.now(h.settings_zone()).weekday()]
    h.set_settings(imports=ImportWindow(days=[d for d in WEEKDAYS if d != today]))
    h.reload()
    h.cycle()
    pair = h.linked_company()
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0955"})
    h.emu.set_faults("unleashed", error_rate=1.0)
    run_with_unwritten(h, "crm_push_job")
    op = _op(h, MINE)
    assert (op["status"], op["failures"]) == ("failed", 1)
    first_delay = op["next_attempt_at"] - store.utcnow()
    assert timedelta(seconds=45) < first_delay <= timedelta(minutes=1)  # the first delay: 1 min

    waiting = _tick(h)  # not due yet
    assert isinstance(waiting, dg.SkipReason), waiting
    assert "the next retry is due at" in waiting.skip_message
    assert "writes to Unleashed" in waiting.skip_message

    _later(h, 1)
    (request,) = _tick(h)
    assert request.job_name == "crm_push_job"
    assert request.tags["sync/trigger"] == "failed-write-retry"
    schedule = h.schedule("daytime_import_schedule")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    with dg.build_schedule_context(
        instance=h.instance, resources=h.resources, scheduled_execution_time=now
    ) as context:
        outside = schedule(context)  # no import today
        assert isinstance(outside, dg.SkipReason) and "Outside the import window" in str(outside)
    # A run of the push job in progress: the sensor waits for it instead of queueing another.
    busy = dg.DagsterRun(
        job_name="crm_push_job", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED
    )
    h.instance.add_run(busy)
    assert isinstance(_tick(h), dg.SkipReason)
    h.instance.report_run_canceled(busy)

    _launch(h, _tick(h)[0], unwritten=True)  # still down: the delay doubles
    op = _op(h, MINE)
    assert (op["status"], op["failures"]) == ("failed", 2)
    assert timedelta(seconds=105) < op["next_attempt_at"] - store.utcnow() <= timedelta(minutes=2)
    assert isinstance(_tick(h), dg.SkipReason)

    h.emu.set_faults("unleashed")  # Unleashed is back
    _later(h, 2)
    (request,) = _tick(h)
    result = _launch(h, request)
    assert writes_check(result, PUSH)[0]
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0113 496 0955"
    op = _op(h, MINE)
    assert op["status"] == "applied" and pd.isna(op["next_attempt_at"])
    audit = h.query(
        "SELECT new_value FROM audit_log WHERE erp_id = ? AND field = 'phone'", [pair["erp_id"]]
    )
    assert list(audit["new_value"]) == ["0113 496 0955"]  # written once
    nothing = _tick(h)
    assert isinstance(nothing, dg.SkipReason)
    assert nothing.skip_message == "No failed write is due for a retry."


def test_retries_are_bounded_and_the_last_failure_is_reported(harness):
    h = harness
    h.set_settings(retry_failed_writes=WriteRetry(max_attempts=2))
    h.cycle()
    pair = h.linked_company()
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0944"})
    h.emu.set_faults("unleashed", error_rate=1.0)
    run_with_unwritten(h, "crm_push_job")
    _later(h, 1)
    result = _launch(h, _tick(h)[0], unwritten=True)
    h.emu.set_faults("unleashed")
    op = _op(h, MINE)
    assert (op["status"], op["failures"]) == ("failed", 2)
    assert pd.isna(op["next_attempt_at"])  # no more automatic tries
    passed, description, meta = writes_check(result, PUSH)
    assert not passed
    assert "at the next planned run (2 automatic tries used up)" in description
    _later(h, 60 * 24)
    idle = _tick(h)
    assert isinstance(idle, dg.SkipReason) and idle.skip_message.startswith("No failed write")
    h.push()  # the next planned run still tries it
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0113 496 0944"


def test_a_failed_push_whose_crm_value_changed_meanwhile_is_not_written(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0933"})
    h.emu.set_faults("unleashed", error_rate=1.0)
    run_with_unwritten(h, "crm_push_job")
    h.emu.set_faults("unleashed")
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0934"})  # changed again
    _later(h, 1)
    _launch(h, _tick(h)[0])
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0113 496 0934"
    written = h.query(
        "SELECT new_value FROM audit_log WHERE erp_id = ? AND field = 'phone'", [pair["erp_id"]]
    )
    assert list(written["new_value"]) == ["0113 496 0934"]  # the superseded value never sent
    old = _op(h, "new_value = '0113 496 0933'")
    assert old["status"] == "superseded" and pd.isna(old["next_attempt_at"])


def test_a_failed_crm_write_is_retried_without_an_import_and_lands_once(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0113 496 0922"})
    h.emu.set_faults("crm", error_rate=1.0, methods=["PATCH", "POST"])
    run_with_unwritten(h, "sync_cycle_job")
    op = _op(h, f"op = 'update_crm' AND erp_id = '{pair['erp_id']}'")
    # A PATCH answered with a 5xx may have landed: in flight, so the retry reads first.
    assert (op["status"], op["attempts"], op["failures"]) == ("in_flight", 1, 1)
    h.emu.set_faults("crm")
    _later(h, 1)
    (request,) = _tick(h)
    assert request.job_name == "crm_write_retry_job"
    h.emu.reset_stats("unleashed")
    result = _launch(h, request)
    assert h.emu.stats("unleashed")["requests"] == {}  # no import, no Unleashed request
    assert writes_check(result, PULL)[0]
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0113 496 0922"
    audit = h.query(
        "SELECT new_value FROM audit_log WHERE erp_id = ? AND field = 'phone'", [pair["erp_id"]]
    )
    assert list(audit["new_value"]) == ["0113 496 0922"]
    assert _op(h, f"op = 'update_crm' AND erp_id = '{pair['erp_id']}'")["status"] == "applied"
    h.cycle()
    assert len(h.query("SELECT * FROM audit_log WHERE erp_id = ? AND field = 'phone'",
                       [pair["erp_id"]])) == 1  # fmt: skip


def test_write_retry_settings_are_validated_and_the_backoff_doubles_to_its_cap():
    from sync_pipeline.settings import SettingsError, parse_settings

    retry = WriteRetry(first_delay_minutes=1, max_delay_minutes=5, max_attempts=6)
    now = datetime(2026, 1, 3, 12, 0, tzinfo=UTC)  # a Saturday
    delays = [retry.next_attempt(n, now) for n in range(1, 7)]
    assert [(d - now).total_seconds() / 60 for d in delays[:5]] == [1, 2, 4, 5, 5]
    assert delays[5] is None
    assert WriteRetry(enabled=False).next_attempt(1, now) is None
    bad = b"retry_failed_writes:\n  max_delay_minute: 5\n"
    try:
        parse_settings(bad, "settings.yaml")
    except SettingsError as exc:
        assert "retry_failed_writes.max_delay_minute: unknown setting; did you mean" in str(exc)
    else:
        raise AssertionError("a misspelt retry setting was accepted")
    try:
        parse_settings(b"retry_failed_writes: {first_delay_minutes: 10, max_delay_minutes: 5}\n",
                       "settings.yaml")  # fmt: skip
    except SettingsError as exc:
        assert "the cap must be at least the first delay" in str(exc)
    else:
        raise AssertionError("a cap below the first delay was accepted")
