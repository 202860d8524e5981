"""A safe go-live: the mass-change brake holds a plan that would change an unusual share of the
linked records or blank many values (nothing written either way) until an operator releases
that very plan; through Dagster against both local servers."""

from __future__ import annotations

from typing import Any

import pandas as pd

from sync_pipeline.settings import MassChangeBrake
from tests.harness import failure_messages, run_failing

RELEASE = "mass_change_release_job"
WRITES = "planned_writes_written"


def _check(result, asset: str, name: str) -> tuple[bool, str | None, dict[str, Any]]:
    for e in result.get_asset_check_evaluations():
        if e.asset_key.to_user_string() == asset and e.check_name == name:
            return e.passed, e.description, {k: v.value for k, v in e.metadata.items()}
    raise AssertionError(f"no check {name} on {asset} in the run")


def brake_check(result) -> tuple[bool, str | None, dict[str, Any]]:
    return _check(result, "sync/sync_plan", "mass_change_brake")


def writes_sent(h) -> dict[str, int]:
    """Requests that change something, per system and endpoint, since the stats were reset."""
    return {
        f"{system} {key}": n
        for system in ("unleashed", "crm")
        for key, n in h.emu.stats(system)["requests"].items()
        if not key.startswith("GET ")
    }


def reset_request_counts(h) -> None:
    for system in ("unleashed", "crm"):
        h.emu.reset_stats(system)


def linked_contacts(h, n: int) -> list[Any]:
    """`n` linked contacts with a phone number in Unleashed, one per row (crm_id, erp_id,
    erp_parent_id)."""
    return list(
        h.query(
            f"""SELECT l.crm_id, l.erp_id, l.erp_parent_id FROM contact_links l
                JOIN unleashed_contacts u ON u.id = l.erp_id AND u.active
                WHERE coalesce(u.data->>'$.PhoneNumber', '') <> ''
                ORDER BY l.crm_id LIMIT {n}"""
        ).itertuples(index=False)
    )


def unleashed_phone(h, contact) -> str:
    for c in h.unleashed.list_contacts(contact.erp_parent_id):
        if str(c.Guid) == contact.erp_id:
            return c.to_wire().get("PhoneNumber") or ""
    raise AssertionError(f"contact {contact.erp_id} not in Unleashed")


def edit_phones(h, contacts, prefix: str = "0113 496 1") -> dict[str, str]:
    """A person changes each contact's phone in the CRM; returns erp_id -> the new phone."""
    new = {}
    for n, c in enumerate(contacts):
        phone = f"{prefix}{n:03d}"
        h.crm.patch("Contacts", int(c.crm_id), {"PhoneNumber": phone})
        new[c.erp_id] = phone
    return new


def linked_total(h) -> int:
    return int(
        h.query(
            "SELECT (SELECT count(*) FROM company_links) + (SELECT count(*) FROM contact_links) n"
        )["n"][0]
    )


# ------------------------------------------------------------------------------------------------
# Mass-change brake
# ------------------------------------------------------------------------------------------------
def test_a_plan_changing_over_a_tenth_is_held_until_that_plan_is_released(harness):
    h = harness
    h.cycle()  # a first connection is not held by the share (see docs/go-live.md)
    h.push()  # links the records the first cycle created in the CRM
    # The test world is small: hold by the share whatever the count.
    h.set_settings(mass_change_brake=MassChangeBrake(min_changed_records=0))
    total = linked_total(h)
    over = total // 10 + 1  # just over 10% of the linked records
    contacts = linked_contacts(h, over + 1)
    before = {c.erp_id: unleashed_phone(h, c) for c in contacts}
    new = edit_phones(h, contacts[:over])
    reset_request_counts(h)

    result = run_failing(h, "sync_cycle_job")
    passed, description, meta = brake_check(result)
    assert not passed
    assert description.startswith(
        f"Held by the mass-change brake: {over} of {total} linked records would change"
    )
    assert "Nothing was written in either direction" in description
    assert (meta["records_changed"], meta["linked_records"]) == (over, total)
    plan_id = meta["plan_id"]
    assert f"release_plan_id: {plan_id}" in description
    # Examples name the record, the field and the change, before -> after.
    first = contacts[0]
    assert f"'{before[first.erp_id]}' → '{new[first.erp_id]}'" in meta["example_changes"]
    # Nothing was written to either system, and nothing waits in the outbox as a failure.
    assert writes_sent(h) == {}
    assert all(unleashed_phone(h, c) == before[c.erp_id] for c in contacts[:3])
    assert h.query("SELECT * FROM outbox WHERE status = 'failed'").empty
    assert h.instance.get_run_by_id(result.run_id).tags["sync/mass-change-held"] == plan_id
    # A push the CRM change sensor launches is held too (the same plan).
    push = run_failing(h, "crm_push_job")
    assert not brake_check(push)[0] and brake_check(push)[2]["plan_id"] == plan_id
    assert writes_sent(h) == {}

    # The data changes before the release: the released plan is no longer the plan, so the
    # release writes nothing and names the plan as it is now.
    extra = contacts[over]
    new |= edit_phones(h, [extra], prefix="0113 496 2")
    reset_request_counts(h)
    stale = run_failing(h, RELEASE, run_config=_release(plan_id))
    passed, description, meta = brake_check(stale)
    assert not passed and meta["plan_id"] != plan_id
    assert description.startswith(f"Plan {plan_id} no longer matches")
    assert writes_sent(h) == {}

    # Releasing the plan as it is now writes exactly it, both ways, and lifts the hold.
    done = h.run(RELEASE, run_config=_release(meta["plan_id"]))
    assert brake_check(done)[0]
    assert {c.erp_id: unleashed_phone(h, c) for c in contacts} == new
    pushed = h.materialization_metadata(done, ["sync", "push_to_unleashed"])
    assert pushed["operations_applied"] == over + 1
    hold = h.query("SELECT value FROM sync_state WHERE key = 'mass_change_hold'")["value"]
    assert hold.isna().all()
    assert brake_check(h.push())[0]  # the next run is not held


def _release(plan_id: str) -> dict[str, Any]:
    return {"ops": {"sync__sync_plan": {"config": {"release_plan_id": plan_id}}}}


def test_a_plan_within_the_share_goes_through(harness):
    h = harness
    h.cycle()
    under = linked_total(h) // 10  # 10% at most: not over the limit
    contacts = linked_contacts(h, under)
    new = edit_phones(h, contacts)
    result = h.push()
    passed, _, meta = brake_check(result)
    assert passed and meta["records_changed"] == under
    assert {c.erp_id: unleashed_phone(h, c) for c in contacts} == new


def test_a_small_tenants_change_over_the_share_but_within_the_count_goes_through(harness):
    """Over 10% of a small tenant's records is still an ordinary day: the share holds a plan
    only when more than `min_changed_records` (25) records would change."""
    h = harness
    h.cycle()
    h.push()
    over = linked_total(h) // 10 + 1
    assert over <= MassChangeBrake().min_changed_records
    contacts = linked_contacts(h, over)
    new = edit_phones(h, contacts)
    result = h.push()
    passed, _, meta = brake_check(result)
    assert passed and meta["records_changed"] == over
    assert {c.erp_id: unleashed_phone(h, c) for c in contacts} == new


def test_blanking_more_values_than_the_limit_holds_the_plan(harness):
    h = harness
    h.cycle()
    h.set_settings(mass_change_brake=MassChangeBrake(max_blanked_values=3))
    contacts = linked_contacts(h, 4)
    before = {c.erp_id: unleashed_phone(h, c) for c in contacts}
    for c in contacts:
        h.crm.patch("Contacts", int(c.crm_id), {"PhoneNumber": ""})
    reset_request_counts(h)
    result = run_failing(h, "crm_push_job")
    passed, description, meta = brake_check(result)
    assert not passed and meta["values_blanked"] == 4
    assert "4 filled values would be blanked (over the limit of 3)" in description
    assert f"'{before[contacts[0].erp_id]}' → ''" in meta["example_changes"]
    assert writes_sent(h) == {}
    assert {c.erp_id: unleashed_phone(h, c) for c in contacts} == before
    # Three blanked values are within the limit: fixing one brings the plan under it.
    h.crm.patch("Contacts", int(contacts[0].crm_id), {"PhoneNumber": before[contacts[0].erp_id]})
    assert brake_check(h.push())[0]
    assert {c.erp_id: unleashed_phone(h, c) for c in contacts[1:]} == {
        c.erp_id: "" for c in contacts[1:]
    }


def test_the_overnight_fix_writes_nothing_while_a_plan_is_held(harness):
    h = harness
    h.cycle()
    h.set_settings(mass_change_brake=MassChangeBrake(max_changed_share=0.01, min_changed_records=0))
    contacts = linked_contacts(h, 5)
    edit_phones(h, contacts)
    run_failing(h, "crm_push_job")
    reset_request_counts(h)
    fix = h.run("account_manager_fix_job")
    meta = h.materialization_metadata(fix, ["sync", "account_manager_fix"])
    assert meta["skipped"].startswith("The mass-change brake holds plan")
    assert writes_sent(h) == {}


# ------------------------------------------------------------------------------------------------
# Shadow mode
# ------------------------------------------------------------------------------------------------
def _or_none(value: Any) -> Any:
    return None if value is None or pd.isna(value) else value


def _change(direction: str, entity: str, erp_id: str, field: Any, value: Any) -> tuple:
    field = _or_none(field)
    return (direction, entity, erp_id, field, None if field is None else _or_none(value))


def _written_by(h, run_id: str) -> set[tuple]:
    """What a run wrote, from the audit log: (direction, entity, record, field, value); a
    creation as (direction, entity, Unleashed id, None, None)."""
    rows = h.query(
        "SELECT direction, entity, erp_id, field, new_value FROM audit_log WHERE run_id = ?",
        [run_id],
    )
    return {
        _change(r.direction, r.entity, r.erp_id, r.field, r.new_value)
        for r in rows.itertuples(index=False)
    }


def _shown(h) -> set[tuple]:
    direction = {"update_erp": "crm_to_erp"}
    rows = h.query("SELECT op, entity, erp_id, field, after FROM shadow_plan")
    return {
        _change(direction.get(r.op, "erp_to_crm"), r.entity, r.erp_id, r.field, r.after)
        for r in rows.itertuples(index=False)
    }


def test_shadow_mode_writes_nothing_and_the_first_live_run_writes_what_it_showed(harness):
    h = harness
    h.set_settings(shadow_mode=True)
    reset_request_counts(h)
    before = h.emu.holdings()
    result = h.cycle()  # a first connection, in shadow mode
    # Nothing changed in either system: only reads were sent.
    assert writes_sent(h) == {}
    assert h.emu.holdings() == before
    plan = h.materialization_metadata(result, ["sync", "sync_plan"])
    shown = h.query("SELECT * FROM shadow_plan")
    assert plan["shadow_writes"] == len(shown) > 0
    assert set(shown["direction"]) >= {"CRM → Unleashed", "Unleashed → CRM", "new contact → CRM"}
    assert plan["operations_queued"] == 0
    # Before -> after for every value, per direction and field.
    row = shown[shown["op"] == "update_crm"].iloc[0]
    assert f"'{row['before']}' → '{row['after']}'" in plan["shadow_preview"]
    assert "| Unleashed → CRM | contact |" in plan["shadow_by_field"]
    for asset in ("push_to_unleashed", "pull_to_crm"):
        applied = h.materialization_metadata(result, ["sync", asset])
        assert applied["skipped"].startswith("Shadow mode is on")
    # Nothing in the outbox, so nothing failed; every check that fails a run passed.
    assert h.query("SELECT * FROM outbox").empty
    checks = result.get_asset_check_evaluations()
    run_checks = [e for e in checks if e.check_name in (WRITES, "mass_change_brake")]
    assert len(run_checks) == 3 and all(e.passed for e in run_checks)
    shadow_set = _shown(h)
    estimated = {
        "unleashed": plan["shadow_write_requests_unleashed"],
        "crm": plan["shadow_write_requests_crm"],
    }

    # Going live: the first live run writes exactly the set the shadow run showed.
    h.set_settings(shadow_mode=False)
    reset_request_counts(h)
    live = h.cycle()
    assert _written_by(h, live.run_id) == shadow_set
    # The writes cost the write requests the shadow run said, in each system.
    sent = writes_sent(h)
    for system in ("unleashed", "crm"):
        writes = sum(n for k, n in sent.items() if k.startswith(system))
        assert writes == estimated[system], (system, sent, estimated)


# ------------------------------------------------------------------------------------------------
# Undo a run
# ------------------------------------------------------------------------------------------------
def _use_env(h, monkeypatch) -> None:
    """The environment `sync-pipeline` reads, pointing at the harness's servers and files."""
    for name, value in h.emu.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SYNC_SETTINGS_FILE", str(h.settings_file))
    monkeypatch.setenv("SYNC_DUCKDB_PATH", str(h.db))


def test_undo_writes_back_what_a_run_replaced_and_leaves_what_a_person_changed(
    harness, monkeypatch, capsys
):
    h = harness
    h.cycle()
    contacts = linked_contacts(h, 3)
    before = {c.erp_id: unleashed_phone(h, c) for c in contacts}
    edit_phones(h, contacts)
    pushed = h.push()
    # A person changes the third contact in Unleashed after the push.
    third = contacts[2]
    h.unleashed.update_contact(third.erp_parent_id, third.erp_id, {"PhoneNumber": "0113 496 0999"})

    _use_env(h, monkeypatch)
    from sync_pipeline.cli import main

    assert main(["undo", pushed.run_id]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"Undo of run {pushed.run_id}: 2 values written back, 1 left because someone changed "
        "them since"
    )
    assert third.erp_id in out.split("Left (changed since the run):")[1]
    assert "holds '0113 496 0999' now" in out
    assert {c.erp_id: unleashed_phone(h, c) for c in contacts[:2]} == {
        c.erp_id: before[c.erp_id] for c in contacts[:2]
    }
    assert unleashed_phone(h, third) == "0113 496 0999"
    undone = h.query("SELECT * FROM audit_log WHERE reason = ?", [f"undo of run {pushed.run_id}"])
    assert len(undone) == 2
    # The next cycle carries the restored values back to the CRM: both systems as before the run.
    h.cycle()
    for c in contacts[:2]:
        assert h.crm.get("Contacts", int(c.crm_id))["PhoneNumber"] == before[c.erp_id]


def test_the_undo_job_restores_and_an_unknown_run_is_a_clear_error(harness, monkeypatch, capsys):
    h = harness
    h.cycle()
    contacts = linked_contacts(h, 2)
    before = {c.erp_id: unleashed_phone(h, c) for c in contacts}
    edit_phones(h, contacts)
    pushed = h.push()
    result = h.run("undo_run_job", run_config=_undo(pushed.run_id))
    out = result.output_for_node("undo_run")
    assert out.startswith(f"Undo of run {pushed.run_id}: 2 values written back, 0 left")
    assert {c.erp_id: unleashed_phone(h, c) for c in contacts} == before
    # Again: nothing more to write, both already hold their earlier values.
    again = h.run("undo_run_job", run_config=_undo(pushed.run_id)).output_for_node("undo_run")
    assert "0 values written back" in again and "2 already held their earlier value" in again

    failed = run_failing(h, "undo_run_job", run_config=_undo("no-such-run"))
    assert "run 'no-such-run' has no audited writes" in failure_messages(failed)
    _use_env(h, monkeypatch)
    from sync_pipeline.cli import main

    assert main(["undo", "no-such-run"]) == 1
    assert "Undo FAILED: run 'no-such-run' has no audited writes" in capsys.readouterr().err


def _undo(run_id: str) -> dict[str, Any]:
    return {"ops": {"undo_run": {"config": {"run_id": run_id}}}}
