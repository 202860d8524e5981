"""End to end through Dagster against both local servers: one test per behaviour of the product."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import dagster as dg
import httpx
import pytest

from sync_pipeline import apply, store
from sync_pipeline.clients.base import ApiError
from sync_pipeline.defs.automation import crm_change_sensor
from sync_pipeline.report import cycle_report
from tests.harness import failure_messages, run_failing, run_with_unwritten, writes_check

VOLATILE = {"LastModifiedOn"}
# Where the CRM keeps a record's Unleashed Guid (the mappings' link slots), as a $filter path.
COMPANY_SLOT = "DivisionXtra/StandardTextField1"
CONTACT_SLOT = "ContactXtra/StandardTextField1"


def _customer(h, guid) -> dict:
    return h.unleashed.get_customer(guid).to_wire()


def _unleashed_requests(h) -> int:
    return h.emu.stats("unleashed")["total_requests"]


def _requests_by_endpoint(h, system) -> dict[str, int]:
    return h.emu.stats(system)["requests"]


# ------------------------------------------------------------------------------------------------
# Updates both ways
# ------------------------------------------------------------------------------------------------
def test_crm_edit_reaches_unleashed_and_nothing_else_changes(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    before = _customer(h, pair["erp_id"])
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "+44 161 496 0123"})
    h.emu.reset_stats("unleashed")
    result = h.push()
    # One read and one write for the record; the push job reads nothing else from Unleashed.
    by_endpoint = _requests_by_endpoint(h, "unleashed")
    assert by_endpoint == {"GET /Customers/{guid}": 1, "POST /Customers/{guid}": 1}
    after = _customer(h, pair["erp_id"])
    assert after["PhoneNumber"] == "+44 161 496 0123"
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed - VOLATILE == {"PhoneNumber"}
    # That push's link step also linked the CRM records the cycle created from Unleashed (new
    # rows in its CRM extract). A second phone edit cannot link or unlink anything: the link step
    # says it did not compare the tables, and the edit still arrives.
    assert h.materialization_metadata(result, ["sync", "sync_links"])["pass"] == "full"
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "+44 161 496 0124"})
    result = h.push()
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "+44 161 496 0124"
    links_meta = h.materialization_metadata(result, ["sync", "sync_links"])
    assert links_meta["pass"].startswith("skipped: no record's status or parent")


def _linked_company_and_contact(h):
    """After two cycles (the CRM records the first one created are linked by the second): a
    linked company and its first linked contact."""
    h.cycle()
    h.cycle()
    pair = h.linked_company()
    contact = h.query(
        "SELECT crm_id, erp_id FROM contact_links WHERE erp_parent_id = ? ORDER BY crm_id LIMIT 1",
        [pair["erp_id"]],
    ).iloc[0]
    return pair, contact


def test_a_second_crm_edit_before_the_next_import_is_pushed_at_once(harness):
    """A push does not import Unleashed. A person who corrects a field they just saved (or
    edits the record again) must not wait for the next import, and no conflict may be invented:
    Unleashed has not changed, only the sync wrote to it."""
    h = harness
    pair, contact = _linked_company_and_contact(h)
    for phone, mobile in (("0161 496 0201", "07700 900201"), ("0161 496 0202", "07700 900202")):
        h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": phone})
        h.crm.patch("Contacts", int(contact["crm_id"]), {"MobilePhoneNumber": mobile})
        h.push()
        assert _customer(h, pair["erp_id"])["PhoneNumber"] == phone
        mobiles = {str(c.Guid): c.MobilePhone for c in h.unleashed.list_contacts(pair["erp_id"])}
        assert mobiles[contact["erp_id"]] == mobile
    assert h.query("SELECT * FROM conflicts").empty
    assert h.query("SELECT * FROM outbox WHERE status <> 'applied'").empty


def test_a_linked_contacts_new_email_is_pushed_without_a_full_link_pass(harness):
    """An email is a match key, but matching pairs unlinked records only: the push after a linked
    contact's new email keeps the link and skips the whole-table link pass (4 s at 1M/3M
    records), and the email arrives."""
    h = harness
    pair, contact = _linked_company_and_contact(h)
    h.crm.patch("Contacts", int(contact["crm_id"]), {"Email": "moved.on@example.org"})
    result = h.push()
    emails = {str(c.Guid): c.EmailAddress for c in h.unleashed.list_contacts(pair["erp_id"])}
    assert emails[contact["erp_id"]] == "moved.on@example.org"
    assert h.materialization_metadata(result, ["sync", "sync_links"])["pass"].startswith("skipped")
    linked = h.query("SELECT erp_id FROM contact_links WHERE crm_id = ?", [contact["crm_id"]])
    assert list(linked["erp_id"]) == [contact["erp_id"]]


def test_unleashed_edit_reaches_crm(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"CustomerName": "Northwind Trading Ltd"})
    h.cycle()
    assert h.crm.get("Divisions", pair["crm_id"])["Name"] == "Northwind Trading Ltd"
    audit = h.query(
        "SELECT * FROM audit_log WHERE crm_id = ? AND field = 'name'", [str(pair["crm_id"])]
    )
    assert list(audit["direction"]) == ["erp_to_crm"]
    assert list(audit["new_value"]) == ["Northwind Trading Ltd"]


def test_a_quiet_cycle_costs_one_request_per_list_endpoint(harness):
    h = harness
    h.cycle()
    h.cycle()  # settles anything the first cycle wrote
    h.emu.reset_stats("unleashed")
    h.emu.reset_stats("crm")
    h.cycle()
    for system in ("unleashed", "crm"):
        counts = _requests_by_endpoint(h, system)
        assert all(n == 1 for n in counts.values()), (system, counts)
        assert not any(k.startswith(("POST", "PATCH", "PUT")) for k in counts), counts


# ------------------------------------------------------------------------------------------------
# Contacts
# ------------------------------------------------------------------------------------------------
def test_contact_created_in_unleashed_appears_in_crm_once(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    created = h.unleashed.create_contact(
        pair["erp_id"],
        {"FirstName": "Søren", "LastName": "Kierkegaard", "EmailAddress": "soren@example.dk",
         "PhoneNumber": "+45 32 12 34 56"},
    )  # fmt: skip
    h.cycle()
    h.cycle()
    found = h.crm.find("Contacts", CONTACT_SLOT, str(created.Guid))
    assert len(found) == 1
    assert found[0]["Forename"] == "Søren"
    assert found[0]["Email"] == "soren@example.dk"
    assert found[0]["DivisionId"] == pair["crm_id"]


def _new_customer_with_contact(h) -> tuple[str, str]:
    guid = str(uuid.uuid4())
    h.unleashed.save_customer(
        {"Guid": guid, "CustomerCode": "FRESH1", "CustomerName": "Fresh Customer Ltd"}
    )
    contact = h.unleashed.create_contact(
        guid, {"FirstName": "Farah", "LastName": "Fresh", "EmailAddress": "farah@fresh.example"}
    )
    return guid, str(contact.Guid)


def test_new_customer_and_its_contacts_reach_the_crm_in_one_cycle(harness):
    h = harness
    h.cycle()
    guid, contact_guid = _new_customer_with_contact(h)
    h.cycle()
    (company,) = h.crm.find("Divisions", COMPANY_SLOT, guid)
    (contact,) = h.crm.find("Contacts", CONTACT_SLOT, contact_guid)
    assert contact["DivisionId"] == company["DivisionId"]
    assert contact["Forename"] == "Farah"
    h.cycle()
    assert len(h.crm.find("Divisions", COMPANY_SLOT, guid)) == 1
    assert len(h.crm.find("Contacts", CONTACT_SLOT, contact_guid)) == 1
    linked = h.query("SELECT crm_id FROM contact_links WHERE erp_id = ?", [contact_guid])
    assert list(linked["crm_id"]) == [str(contact["ContactId"])]


def test_contact_waits_when_its_new_customer_could_not_be_created(harness):
    h = harness
    h.cycle()
    guid, contact_guid = _new_customer_with_contact(h)

    writes = []

    def refuse_company(op_ids):
        # The pass's first write is the company's creation (companies go first); the run holds
        # the database, so the hook cannot look the operation up.
        writes.append(op_ids)
        if len(writes) == 1:
            raise ApiError("CRM", "POST", "/Divisions", 503, "simulated failure")

    apply.TEST_HOOKS.after_write = refuse_company
    try:
        run_with_unwritten(h, "sync_cycle_job")  # the creation failed: the run says so
    finally:
        apply.TEST_HOOKS.after_write = None
    waiting = h.query("SELECT status, last_error FROM outbox WHERE erp_id = ?", [contact_guid])
    assert list(waiting["status"]) == ["deferred"]
    assert "not in the CRM yet" in waiting["last_error"].iloc[0]
    assert h.crm.find("Contacts", CONTACT_SLOT, contact_guid) == []
    h.cycle()
    h.cycle()
    (company,) = h.crm.find("Divisions", COMPANY_SLOT, guid)
    (contact,) = h.crm.find("Contacts", CONTACT_SLOT, contact_guid)
    assert contact["DivisionId"] == company["DivisionId"]


def test_crm_only_contact_never_appears_in_unleashed(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.crm.create(
        "Contacts",
        {"DivisionId": pair["crm_id"], "Forename": "Only", "Surname": "InCrm",
         "Email": "only.in.crm@example.com", "RoleCode": "DECISN"},
    )  # fmt: skip
    h.push()
    h.cycle()
    emails = {(c.EmailAddress or "").lower() for c in h.unleashed.list_contacts(pair["erp_id"])}
    assert "only.in.crm@example.com" not in emails


def test_first_sync_never_blanks_a_filled_value_and_reports_the_fill(harness):
    """With the initial policy `erp` (Unleashed wins a first disagreement), an Unleashed
    customer whose phone is empty does not wipe the CRM phone on the first sync: the filled
    value wins and reaches Unleashed, and the plan and the cycle report list the fill."""
    h = harness
    divisions = h.crm.list("Divisions", expand="SalesLedger($select=CustomerCode)").items
    division = next(
        d for d in divisions if (d.get("SalesLedger") or {}).get("CustomerCode")
        and d.get("PhoneNumber")
    )  # fmt: skip
    code = division["SalesLedger"]["CustomerCode"]
    (customer,) = h.unleashed.list_customers(customer_code=code).items
    h.unleashed.update_customer(str(customer.Guid), {"PhoneNumber": ""})
    result = h.cycle()
    assert h.crm.get("Divisions", division["DivisionId"])["PhoneNumber"] == division["PhoneNumber"]
    assert h.unleashed.get_customer(str(customer.Guid)).PhoneNumber == division["PhoneNumber"]
    meta = h.materialization_metadata(result, ["sync", "sync_plan"])
    assert meta["empty_fields_filled"] >= 1
    assert str(customer.Guid) in meta["filled_preview"]
    with store.connect(h.db) as con:
        report = cycle_report(con, since=datetime.now(UTC) - timedelta(hours=1))
    assert "Empty fields filled on first agreement" in report
    assert f"phone: empty in Unleashed, filled with '{division['PhoneNumber']}'" in report


def test_linking_a_new_unleashed_contact_keeps_the_crm_contacts_phone(harness):
    """A contact created in Unleashed with the email of an unlinked CRM contact is linked to it
    (not created again); its empty phone does not wipe the CRM contact's phone, which fills it."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    crm_contact = h.crm.create(
        "Contacts",
        {"DivisionId": pair["crm_id"], "Forename": "Pat", "Surname": "Filled",
         "Email": "pat.filled@example.com", "PhoneNumber": "0161 496 0888", "RoleCode": "DECISN"},
    )  # fmt: skip
    h.push()
    made = h.unleashed.create_contact(
        pair["erp_id"],
        {"FirstName": "Pat", "LastName": "Filled", "EmailAddress": "pat.filled@example.com"},
    )
    h.cycle()
    linked = h.query("SELECT crm_id FROM contact_links WHERE erp_id = ?", [str(made.Guid)])
    assert list(linked["crm_id"]) == [str(crm_contact["ContactId"])]
    assert h.crm.get("Contacts", crm_contact["ContactId"])["PhoneNumber"] == "0161 496 0888"
    now = {str(c.Guid): c for c in h.unleashed.list_contacts(pair["erp_id"])}[str(made.Guid)]
    assert now.PhoneNumber == "0161 496 0888"


# ------------------------------------------------------------------------------------------------
# Conflicts, rejections
# ------------------------------------------------------------------------------------------------
def test_conflict_follows_newest_policy_and_is_recorded(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0161 000 1111"})
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0161 000 2222"})  # later
    h.cycle()
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0161 000 2222"
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0161 000 2222"
    conflicts = h.query("SELECT * FROM conflicts WHERE erp_id = ?", [pair["erp_id"]])
    assert len(conflicts) == 1
    row = conflicts.iloc[0]
    assert (row["crm_value"], row["erp_value"], row["winner"]) == (
        "0161 000 1111",
        "0161 000 2222",
        "erp",
    )


def _later() -> None:
    """Both APIs keep milliseconds: make the next edit's time strictly later."""
    time.sleep(0.02)


def test_the_syncs_own_write_does_not_make_an_older_unleashed_edit_win(harness):
    """An Unleashed edit of the phone, then a later CRM edit of the phone and the website. The
    push writes the website (the phone changed in Unleashed since planning: not sent), which moves
    the customer's modified time past the CRM edit. The conflict is decided by when each side's
    phone changed, so the later CRM phone wins; the sync's write is nobody's edit."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0161 000 2222"})
    _later()
    h.crm.patch(
        "Divisions", pair["crm_id"],
        {"PhoneNumber": "0161 000 1111", "Website": "https://later.example.com"},
    )  # fmt: skip
    h.push()
    assert _customer(h, pair["erp_id"])["Website"] == "https://later.example.com"
    h.cycle()
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0161 000 1111"
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0161 000 1111"
    row = h.query(
        "SELECT * FROM conflicts WHERE erp_id = ? AND field = 'phone'", [pair["erp_id"]]
    ).iloc[0]
    assert (row["crm_value"], row["erp_value"], row["winner"]) == (
        "0161 000 1111", "0161 000 2222", "crm",
    )  # fmt: skip
    assert row["crm_modified"] > row["erp_modified"]  # the phones' own times, not the records'


def test_the_syncs_write_to_a_contact_does_not_make_an_older_unleashed_edit_win(harness):
    """The same for contacts, whose only time in Unleashed is their customer's: the sync writing
    one contact's surname moves it for every contact of the customer."""
    h = harness
    pair, contact = _linked_company_and_contact(h)
    h.unleashed.update_contact(pair["erp_id"], contact["erp_id"], {"PhoneNumber": "0161 000 3333"})
    _later()
    h.crm.patch(
        "Contacts", int(contact["crm_id"]),
        {"PhoneNumber": "0161 000 4444", "Surname": "Later-Surname"},
    )  # fmt: skip
    h.push()
    h.cycle()
    now = {str(c.Guid): c for c in h.unleashed.list_contacts(pair["erp_id"])}[contact["erp_id"]]
    assert (now.PhoneNumber, now.LastName) == ("0161 000 4444", "Later-Surname")
    assert h.crm.get("Contacts", int(contact["crm_id"]))["PhoneNumber"] == "0161 000 4444"
    winner = h.query(
        "SELECT winner FROM conflicts WHERE erp_id = ? AND field = 'phone'", [contact["erp_id"]]
    )
    assert list(winner["winner"]) == ["crm"]


def test_conflict_policy_crm_from_settings(harness):
    h = harness
    h.cycle()
    h.set_settings(conflict_policies={"company.phone": "crm"})
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0161 000 2222"})
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0161 000 1111"})
    h.cycle()
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0161 000 1111"
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0161 000 1111"
    winner = h.query("SELECT winner FROM conflicts WHERE erp_id = ?", [pair["erp_id"]])
    assert list(winner["winner"]) == ["crm"]


def test_invalid_website_is_reported_not_sent_while_other_fields_sync(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    before = _customer(h, pair["erp_id"])
    h.crm.patch("Divisions", pair["crm_id"], {"Website": "www.acme .com", "Name": "Acme Renamed"})
    h.push()
    after = _customer(h, pair["erp_id"])
    assert after["CustomerName"] == "Acme Renamed"
    assert after.get("Website") == before.get("Website")
    open_rejections = h.query(
        "SELECT * FROM rejections WHERE resolved_at IS NULL AND crm_id = ? AND field = 'website'",
        [str(pair["crm_id"])],
    )
    assert len(open_rejections) == 1
    reason = open_rejections.iloc[0]["reason"]
    assert "www.acme .com" in reason and "website" in reason.lower()
    # Fixing the value in the CRM clears the rejection and sends it.
    h.crm.patch("Divisions", pair["crm_id"], {"Website": "https://www.acme.com"})
    h.push()
    assert _customer(h, pair["erp_id"])["Website"] == "https://www.acme.com"
    still_open = h.query(
        "SELECT * FROM rejections WHERE resolved_at IS NULL AND crm_id = ? AND field = 'website'",
        [str(pair["crm_id"])],
    )
    assert still_open.empty


# ------------------------------------------------------------------------------------------------
# Account managers
# ------------------------------------------------------------------------------------------------
def _user_without_salesperson(h) -> dict:
    """An active CRM user with an email that no Unleashed salesperson has."""
    frame = h.query(
        """SELECT u.id, u.data->>'$.EmailAddress' AS email FROM crm_users u
           WHERE u.active AND u.data->>'$.EmailAddress' IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM unleashed_salespersons s
             WHERE lower(s.data->>'$.Email') = lower(u.data->>'$.EmailAddress'))
           ORDER BY u.id LIMIT 1"""
    )
    return {"code": frame.iloc[0]["id"], "email": frame.iloc[0]["email"]}


def test_account_manager_without_salesperson_is_rejected_then_clears(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    user = _user_without_salesperson(h)
    h.crm.patch(
        "Divisions",
        pair["crm_id"],
        {"AccountManager": user["code"], "PhoneNumber": "0113 496 0000"},
    )
    h.push()
    after = _customer(h, pair["erp_id"])
    assert after["PhoneNumber"] == "0113 496 0000"  # the rest of the record still syncs
    rejected = h.query(
        "SELECT reason FROM rejections WHERE resolved_at IS NULL AND field = 'account_manager' "
        "AND crm_id = ?",
        [str(pair["crm_id"])],
    )
    assert len(rejected) == 1 and user["email"].lower() in rejected.iloc[0]["reason"].lower()
    # The salesperson is added in Unleashed: the next cycle sends the account manager.
    httpx.post(
        f"{h.emu.unleashed_url}/_admin/salespersons",
        json={"FullName": "New Salesperson", "Email": user["email"]},
    ).raise_for_status()
    h.cycle()
    assert _customer(h, pair["erp_id"])["SalesPerson"]["Email"].lower() == user["email"].lower()
    cleared = h.query(
        "SELECT * FROM rejections WHERE resolved_at IS NULL AND field = 'account_manager' "
        "AND crm_id = ?",
        [str(pair["crm_id"])],
    )
    assert cleared.empty


def test_account_manager_sync_off_leaves_account_managers_alone(harness):
    h = harness
    h.cycle()
    h.set_settings(account_manager_sync=False)
    pair = h.linked_company("u.data->>'$.SalesPerson.Email' IS NOT NULL")
    before = _customer(h, pair["erp_id"])["SalesPerson"]
    other = h.query(
        """SELECT u.id FROM crm_users u JOIN unleashed_salespersons s
             ON lower(s.data->>'$.Email') = lower(u.data->>'$.EmailAddress') AND s.active
           WHERE u.active AND lower(u.data->>'$.EmailAddress') <> lower(?) LIMIT 1""",
        [before["Email"]],
    ).iloc[0]["id"]
    h.crm.patch("Divisions", pair["crm_id"], {"AccountManager": other})
    h.push()
    h.cycle()
    assert _customer(h, pair["erp_id"])["SalesPerson"]["Guid"] == before["Guid"]
    assert h.crm.get("Divisions", pair["crm_id"])["AccountManager"] == other


def test_overnight_fix_sets_crm_account_managers_from_unleashed(harness):
    h = harness
    h.set_settings(account_manager_sync=False)
    h.cycle()
    result = h.run("account_manager_fix_job")
    meta = h.materialization_metadata(result, ["sync", "account_manager_fix"])
    assert meta["companies_corrected"] >= 1
    mismatched = h.query(
        """SELECT l.crm_id FROM company_links l
           JOIN unleashed_customers u ON u.id = l.erp_id AND u.active
           JOIN crm_users cu
             ON lower(cu.data->>'$.EmailAddress') = lower(u.data->>'$.SalesPerson.Email')
           WHERE u.data->>'$.SalesPerson.Email' IS NOT NULL"""
    )
    for crm_id in mismatched["crm_id"]:
        division = h.crm.get("Divisions", int(crm_id))
        customer_email = h.query(
            "SELECT u.data->>'$.SalesPerson.Email' AS e FROM unleashed_customers u "
            "JOIN company_links l ON l.erp_id = u.id WHERE l.crm_id = ?",
            [crm_id],
        ).iloc[0]["e"]
        user = h.crm.get("Users", division["AccountManager"])
        assert user["EmailAddress"].lower() == customer_email.lower()


def test_overnight_fix_off_changes_nothing(harness):
    h = harness
    h.set_settings(account_manager_sync=False, overnight_account_manager_fix=False)
    h.cycle()
    h.emu.reset_stats("crm")
    result = h.run("account_manager_fix_job")
    meta = h.materialization_metadata(result, ["sync", "account_manager_fix"])
    assert "off" in meta["skipped"]
    assert not any(k.startswith("PATCH") for k in _requests_by_endpoint(h, "crm"))


# ------------------------------------------------------------------------------------------------
# Settings and guards
# ------------------------------------------------------------------------------------------------
def test_all_options_off_stops_two_way_but_standard_import_continues(harness):
    h = harness
    h.set_settings(
        two_way_sync=False, account_manager_sync=False, overnight_account_manager_fix=False
    )
    h.cycle()
    pair = h.linked_company()
    before = _customer(h, pair["erp_id"])
    h.crm.patch("Divisions", pair["crm_id"], {"Name": "Changed In CRM Only"})
    guid = str(uuid.uuid4())
    h.unleashed.save_customer(
        {"Guid": guid, "CustomerCode": "NEWCO1", "CustomerName": "Brand New Customer Ltd"}
    )
    h.cycle()
    assert _customer(h, pair["erp_id"])["CustomerName"] == before["CustomerName"]
    created = h.crm.find("Divisions", COMPANY_SLOT, guid)
    assert len(created) == 1 and created[0]["Name"] == "Brand New Customer Ltd"
    # A division in a company group of its own, of the tenant's customer type, in the
    # operating company the mapping names.
    group = h.crm.get("Companies", created[0]["CompanyId"])
    assert (group["Name"], group["TypeId"]) == ("Brand New Customer Ltd", "CUS")
    assert created[0]["OperatingCompanyCode"] == "A"


@pytest.mark.parametrize(
    "facts, words",
    [({"operating_companies": 2}, "operating companies"),
     ({"advanced_ledgers": True}, "advanced ledgers"),
     ({"unleashed_sync": True}, "Prospect's own Unleashed integration")],
)  # fmt: skip
def test_guard_refuses_two_way_sync_and_writes_nothing(harness, facts, words):
    h = harness
    h.cycle()
    h.cycle()  # contacts of customers imported in the first cycle arrive in the second
    httpx.put(f"{h.emu.crm_url}/_admin/tenant", json=facts).raise_for_status()
    pair = h.linked_company()
    h.crm.patch("Divisions", pair["crm_id"], {"Name": "Should Not Travel"})
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0200 000 0000"})
    # A new Unleashed customer is not created in a refused tenant either (the standard import
    # would have to choose an operating company, or would fight Prospect's own import).
    h.unleashed.save_customer(
        {"Guid": str(uuid.uuid4()), "CustomerCode": "REFUSE1", "CustomerName": "Not Imported Ltd"}
    )
    h.emu.reset_stats("unleashed")
    h.emu.reset_stats("crm")
    result = h.cycle()
    meta = h.materialization_metadata(result, ["sync", "sync_plan"])
    assert words in meta["two_way"]
    assert "Nothing was written" in meta["two_way"]
    for system in ("unleashed", "crm"):
        writes = [k for k in _requests_by_endpoint(h, system) if not k.startswith("GET")]
        assert writes == [], (system, writes)
    with dg.build_sensor_context(
        instance=h.instance, resources=h.resources, cursor=None
    ) as context:
        tick = crm_change_sensor(context)
    assert isinstance(tick, dg.SkipReason) and words in tick.skip_message


# ------------------------------------------------------------------------------------------------
# Crash safety
# ------------------------------------------------------------------------------------------------
def test_crash_between_write_and_baseline_recovers_without_duplicates(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    contact = h.unleashed.create_contact(
        pair["erp_id"],
        {"FirstName": "Crash", "LastName": "Test", "EmailAddress": "crash@example.com"},
    )
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0999"})
    # Plan, then die right after the API writes, before the baseline and audit are written.
    for job in ("sync_cycle_job",):
        with pytest.raises(Exception):  # noqa: B017 - the crash is the point
            _run_with_crash(h, job)
    h.cycle()
    h.cycle()
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0113 496 0999"
    assert len(h.crm.find("Contacts", CONTACT_SLOT, str(contact.Guid))) == 1
    audit = h.query("SELECT * FROM audit_log WHERE erp_id = ?", [str(contact.Guid)])
    assert len(audit) == 1  # the creation is logged once, after recovery
    phone_audit = h.query(
        "SELECT * FROM audit_log WHERE erp_id = ? AND field = 'phone'", [pair["erp_id"]]
    )
    assert len(phone_audit) == 1
    stuck = h.query("SELECT * FROM outbox WHERE status IN ('pending', 'in_flight')")
    assert stuck.empty


def test_a_crm_edit_after_a_recovered_push_is_pushed_at_once(harness):
    """A push dies right after Unleashed took the values, before recording them; the next push
    finds them there and completes the operations without writing. A person then edits the same
    fields again: the new values must go at once, not wait for the next import (found by the
    soak's check after every clean push)."""
    h = harness
    pair, contact = _linked_company_and_contact(h)

    def mobile() -> str:
        found = {str(c.Guid): c.MobilePhone for c in h.unleashed.list_contacts(pair["erp_id"])}
        return found[contact["erp_id"]]

    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0161 496 0301"})
    h.crm.patch("Contacts", int(contact["crm_id"]), {"MobilePhoneNumber": "07700 900301"})
    # The first push dies after writing the customer; the second completes the customer's
    # operation from what Unleashed holds, then dies after writing the contact.
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 - the crash is the point
            _run_with_crash(h, "crm_push_job")
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0161 496 0301"
    assert mobile() == "07700 900301"
    h.push()  # completes the contact's operation without writing
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0161 496 0302"})
    h.crm.patch("Contacts", int(contact["crm_id"]), {"MobilePhoneNumber": "07700 900302"})
    h.push()
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0161 496 0302"
    assert mobile() == "07700 900302"
    assert h.query("SELECT * FROM conflicts").empty
    assert h.query("SELECT * FROM outbox WHERE status <> 'applied'").empty


def test_an_unleashed_change_found_by_a_push_is_never_written_over(harness):
    """Both sides change a phone before any import. The push plans the CRM value against the
    old Unleashed one, reads the customer, finds Unleashed changed, and sends nothing. The next
    push sees that change (the push put what it read into the snapshot) and decides the conflict
    by policy: Unleashed's change is later, so it wins, and no push writes over it."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0161 496 0401"})
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0161 496 0402"})
    h.push()
    deferred = h.query(
        "SELECT status, last_error FROM outbox WHERE erp_id = ? AND op = 'update_erp'",
        [pair["erp_id"]],
    )
    assert list(deferred["status"]) == ["deferred"]
    assert "Unleashed changed this field after planning" in deferred["last_error"].iloc[0]
    h.push()
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0161 496 0402"
    conflicts = h.query(
        "SELECT crm_value, erp_value, winner FROM conflicts WHERE erp_id = ? AND field = 'phone'",
        [pair["erp_id"]],
    )
    assert conflicts.to_dict("records") == [
        {"crm_value": "0161 496 0401", "erp_value": "0161 496 0402", "winner": "erp"}
    ]
    h.cycle()
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0161 496 0402"
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0161 496 0402"


def test_write_recovered_after_a_crash_does_not_overwrite_a_later_crm_edit(harness):
    """A run dies right after writing an Unleashed phone to the CRM; then a person changes that
    phone in the CRM. The next run must not send the old write again over the person's edit."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0161 496 0001"})
    with pytest.raises(Exception):  # noqa: B017 - the crash is the point
        _run_with_crash(h, "sync_cycle_job")
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0161 496 0001"  # written
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0161 496 0002"})  # a person, later
    h.cycle()
    h.cycle()
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0161 496 0002"
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0161 496 0002"
    stale = h.query(
        "SELECT status, last_error FROM outbox WHERE op = 'update_crm' AND new_value = ?",
        ["0161 496 0001"],
    )
    # Set aside (then superseded by the plan that saw the person's edit), never re-sent.
    assert list(stale["status"]) == ["superseded"]
    assert "CRM changed this field after planning" in stale["last_error"].iloc[0]


def test_a_push_left_in_doubt_is_not_sent_after_the_crm_edit_was_undone(harness):
    """Found by `make soak`: a push fails without knowing whether Unleashed took it (the
    operation stays in flight); then the person undoes the edit in the CRM (A → B → A). The next
    run must not send B: Unleashed would hold, for a cycle, a value nobody wants any more."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    before = _customer(h, pair["erp_id"])["PhoneNumber"]
    original = h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"]
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0555"})
    # Reads answer, every write fails with a 5xx: was it written? (It was not; nobody knows.)
    h.emu.set_faults("unleashed", error_rate=1.0, methods=["POST"])
    run_with_unwritten(h)
    h.emu.set_faults("unleashed")
    held = h.query("SELECT op_id, status FROM outbox WHERE new_value = '0113 496 0555'")
    assert list(held["status"]) == ["in_flight"]
    with store.connect(h.db) as con:  # the operator's report says so
        assert "Writes whose outcome is not known yet" in cycle_report(con, since=datetime.min)
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": original})  # the person undoes it
    result = h.cycle()
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == before
    # The run's metadata says it set one write aside (not "deferred": nothing waits for it).
    meta = h.materialization_metadata(result, ["sync", "push_to_unleashed"])
    assert (meta["operations_set_aside"], meta["operations_deferred"]) == (1, 0)
    sent = h.query("SELECT * FROM audit_log WHERE new_value = '0113 496 0555'")
    assert sent.empty, sent.to_string()
    op = h.query("SELECT status, last_error FROM outbox WHERE op_id = ?", [held["op_id"][0]])
    assert op["status"][0] == "superseded"
    assert "the latest plan no longer wants it" in op["last_error"][0]
    h.cycle()
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == before
    assert h.query("SELECT * FROM outbox WHERE status IN ('in_flight', 'in_doubt')").empty


def test_a_push_left_in_doubt_that_did_land_is_recorded_once(harness):
    """The other half: a push whose answer was lost but which Unleashed did take is completed
    from what Unleashed holds (baseline moved, one audit row), not sent again or dropped."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0666"})
    h.emu.set_faults("unleashed", error_rate=1.0, methods=["POST"])  # the write fails with a 5xx
    run_with_unwritten(h)
    h.emu.set_faults("unleashed")
    held = h.query("SELECT status FROM outbox WHERE new_value = '0113 496 0666'")
    assert list(held["status"]) == ["in_flight"]
    # What a lost answer looks like: Unleashed has the value, the outbox does not know.
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0113 496 0666"})
    h.cycle()
    h.cycle()
    audit = h.query(
        "SELECT direction FROM audit_log WHERE erp_id = ? AND field = 'phone'", [pair["erp_id"]]
    )
    assert list(audit["direction"]) == ["crm_to_erp"]
    assert h.query("SELECT * FROM outbox WHERE status IN ('in_flight', 'in_doubt')").empty


def test_a_run_stops_when_unleashed_does_not_answer_and_the_rest_waits(harness):
    """Unleashed down: after two records in a row whose requests failed (each retried by the
    client), the push stops instead of spending the retry budget on every record; the operations
    it did not try are still pending, the run says why, and the next run sends them."""
    h = harness
    h.cycle()
    pairs = h.query("SELECT crm_id, erp_id FROM company_links ORDER BY crm_id LIMIT 4")
    for n, crm_id in enumerate(pairs["crm_id"]):
        h.crm.patch("Divisions", int(crm_id), {"PhoneNumber": f"0113 496 07{n:02d}"})
    h.emu.set_faults("unleashed", error_rate=1.0)
    before = _unleashed_requests(h)
    result = run_with_unwritten(h)
    h.emu.set_faults("unleashed")
    tried = _unleashed_requests(h) - before
    meta = h.materialization_metadata(result, ["sync", "push_to_unleashed"])
    stopped = meta["stopped_early"]
    assert "did not answer for 2 records in a row" in stopped
    assert "2 operations wait for the next run" in stopped, stopped
    ops = h.query(
        """SELECT status, attempts FROM outbox WHERE op = 'update_erp' AND status <> 'applied'
           ORDER BY op_id"""
    )
    assert len(ops) == 4
    assert sorted(ops["status"]) == ["failed", "failed", "pending", "pending"], ops.to_string()
    # The two tried failed on the read of read-merge-write: no write was sent (attempts 0), so
    # they are failed, not in flight (which would say a write may have landed).
    tried_ops = h.query(
        "SELECT attempts, last_error FROM outbox WHERE op = 'update_erp' AND status = 'failed'"
    )
    assert list(tried_ops["attempts"]) == [0, 0]
    assert all("GET /Customers/{guid} failed" in e for e in tried_ops["last_error"])
    per_record = tried / 2  # both tried records cost the same (the client's retries)
    assert per_record >= 2 and tried == 2 * per_record
    h.push()
    for n, erp_id in enumerate(pairs["erp_id"]):
        assert _customer(h, erp_id)["PhoneNumber"] == f"0113 496 07{n:02d}"


def test_unleashed_usage_limit_used_up_pauses_the_sync_and_nothing_is_lost(harness):
    """Unleashed blocks every request once the account's monthly usage limit is used
    (docs/api-assumptions.md). A push stops at its first refused request instead of retrying
    into the block, and says why and until when; an import run fails naming the limit (its
    window is then backfilled). Nothing waiting is lost: once the limit resets, each edit is
    written once."""
    h = harness
    h.cycle()
    pairs = h.query("SELECT crm_id, erp_id FROM company_links ORDER BY crm_id LIMIT 2")
    for n, crm_id in enumerate(pairs["crm_id"]):
        h.crm.patch("Divisions", int(crm_id), {"PhoneNumber": f"0113 496 08{n:02d}"})
    used = h.emu.set_unleashed_quota(None)["used"]
    h.emu.set_unleashed_quota(used, used=used)  # this month's requests are used up
    reset = datetime.fromisoformat(h.emu.set_unleashed_quota(used)["resets_at"])
    before = _unleashed_requests(h)
    push = run_with_unwritten(h)
    assert _unleashed_requests(h) - before == 1  # the first refusal stops the run: no retries
    stopped = h.materialization_metadata(push, ["sync", "push_to_unleashed"])["stopped_early"]
    assert "Unleashed's API usage limit is used up" in stopped, stopped
    assert f"resets on {reset:%Y-%m-%d} 00:00 UTC" in stopped
    assert "1 not tried wait for the first run after the limit resets" in stopped
    phones = f"""FROM outbox WHERE field = 'phone' AND op = 'update_erp'
                 AND erp_id IN ('{"', '".join(pairs["erp_id"])}')"""
    ops = h.query(f"SELECT status, attempts, last_error {phones} ORDER BY status")
    assert list(ops["status"]) == ["failed", "pending"] and list(ops["attempts"]) == [0, 0]
    assert "API usage limit reached" in ops["last_error"][0]
    failed = run_failing(h)
    assert "API usage limit reached" in failure_messages(failed)
    assert _unleashed_requests(h) - before == 3  # the import asked each of its two lists once
    h.emu.set_unleashed_quota(None, used=0)  # the 1st of the month
    h.cycle()
    for n, erp_id in enumerate(pairs["erp_id"]):
        assert _customer(h, erp_id)["PhoneNumber"] == f"0113 496 08{n:02d}"
    assert list(h.query(f"SELECT status {phones}")["status"]) == ["applied", "applied"]
    audited = h.query(f"SELECT count(*) AS n FROM audit_log WHERE op_id IN (SELECT op_id {phones})")
    assert audited["n"][0] == 2  # one write each, none repeated


def _check_results(result) -> dict[str, tuple[bool, dict]]:
    """'asset:check' -> (passed, metadata) of a run's asset check evaluations."""
    return {
        f"{e.asset_key.to_user_string()}:{e.check_name}": (
            e.passed,
            {k: v.value for k, v in e.metadata.items()},
        )
        for e in result.get_asset_check_evaluations()
    }


def _run_sync_checks(h, checks=None):
    """The sync checks alone (or `checks`), as an operator runs them from the UI (no extract,
    no apply)."""
    from sync_pipeline.defs.checks import sync_checks, waiting_operation_checks

    chosen = [checks] if checks else [sync_checks, waiting_operation_checks]
    selection = dg.AssetSelection.checks(*chosen)
    job = dg.define_asset_job("checks_only", selection=selection)
    defs = dg.Definitions.merge(h.defs, dg.Definitions(jobs=[job]))
    result = defs.resolve_job_def("checks_only").execute_in_process(instance=h.instance)
    assert result.success
    return _check_results(result)


def test_a_check_counts_this_months_unleashed_requests_and_warns_near_the_limit(harness, tmp_path):
    """Every run process adds its Unleashed requests to the month's count in the pacing file;
    the check on unleashed/unleashed_customers shows it, and warns from 80% of the account's monthly
    usage limit once the operator has set it."""
    from sync_pipeline.defs.checks import extract_counts

    h = harness
    h.use_pacing_file(tmp_path / "api-pacing.sqlite")
    usage = "unleashed/unleashed_customers:unleashed_usage_within_limit"
    before = _unleashed_requests(h)
    h.cycle()
    h.push()
    sent = _unleashed_requests(h) - before
    passed, meta = _run_sync_checks(h, extract_counts)[usage]
    assert passed and meta["requests_this_month"] == sent > 0 and meta["limit"] == "not set"
    h.set_settings(unleashed_monthly_request_limit=sent * 2)
    passed, meta = _run_sync_checks(h, extract_counts)[usage]
    assert passed and meta["share_used"] == "50%"
    h.set_settings(unleashed_monthly_request_limit=sent)
    passed, meta = _run_sync_checks(h, extract_counts)[usage]
    assert not passed and meta["share_used"] == "100%"
    assert f"sent {sent:,} requests to Unleashed this month" in meta["why"]
    assert f"limit of {sent:,}" in meta["why"]


def test_checks_warn_about_rejections_and_operations_left_unwritten_for_over_a_day(harness):
    """The cycle's checks pass on a healthy sync; a rejection nobody fixed and a push Unleashed
    kept failing both show as warnings a day later, naming the record, the field and why."""
    h = harness
    waiting = {
        "sync/push_to_unleashed:no_operation_waiting_over_a_day",
        "sync/pull_to_crm:no_operation_waiting_over_a_day",
    }
    checks = _check_results(h.cycle())
    assert waiting | {
        "sync/sync_plan:no_stale_rejections",
        "sync/sync_links:links_are_one_to_one",
    } <= set(checks)
    assert all(passed for passed, _ in checks.values()), checks
    rejected, failing = h.query(
        "SELECT crm_id, erp_id FROM company_links ORDER BY crm_id LIMIT 2"
    ).itertuples(index=False)
    h.crm.patch("Divisions", int(rejected.crm_id), {"Website": "www.acme .com"})
    h.push()
    h.crm.patch("Divisions", int(failing.crm_id), {"PhoneNumber": "0113 496 0555"})
    h.emu.set_faults("unleashed", error_rate=1.0)
    run_with_unwritten(h)
    h.emu.set_faults("unleashed")
    checks = _run_sync_checks(h)
    assert all(checks[k][0] for k in waiting) and checks["sync/sync_plan:no_stale_rejections"][0]

    with store.connect(h.db) as con:  # a day and a bit later, nothing changed
        # (the seed world's own rejections, e.g. a first sync's fills Unleashed would refuse,
        # stay young: only this test's rejection ages)
        con.execute(
            "UPDATE rejections SET first_seen = first_seen - INTERVAL 26 HOUR WHERE crm_id = ?",
            [str(rejected.crm_id)],
        )
        con.execute("UPDATE outbox SET created_at = created_at - INTERVAL 26 HOUR")
    checks = _run_sync_checks(h)
    passed, meta = checks["sync/push_to_unleashed:no_operation_waiting_over_a_day"]
    assert not passed and meta["operations_waiting_over_a_day"] == 1
    assert failing.erp_id[:8] in meta["preview"] and "phone" in meta["preview"]
    assert "Unleashed GET /Customers/{guid} failed (HTTP 50" in meta["preview"]
    assert checks["sync/pull_to_crm:no_operation_waiting_over_a_day"][0]
    passed, meta = checks["sync/sync_plan:no_stale_rejections"]
    assert not passed and meta["rejections_older_than_a_day"] == 1
    assert "| website | www.acme .com |" in meta["preview"]
    assert "is not accepted by Unleashed" in meta["preview"]  # the reason, not cut off before it

    checks = _check_results(h.cycle())  # Unleashed answers again: the push goes through
    assert checks["sync/push_to_unleashed:no_operation_waiting_over_a_day"][0]
    assert _customer(h, failing.erp_id)["PhoneNumber"] == "0113 496 0555"
    assert not checks["sync/sync_plan:no_stale_rejections"][0]  # still not fixed


def test_a_write_that_timed_out_after_landing_is_checked_not_sent_again(harness):
    """Unleashed applied the write but the answer never came (a timeout): the operation stays in
    flight, and the next run finds the value there and records it without writing again."""
    from sync_pipeline.clients.base import TransientApiError

    h = harness
    h.cycle()
    pair = h.linked_company()
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0321"})

    def lost_answer(op_ids):
        raise TransientApiError(
            "Unleashed", "POST", "/Customers/{guid}", None, "timed out (ReadTimeout)"
        )

    apply.TEST_HOOKS.after_write = lost_answer
    try:
        run_with_unwritten(h)
    finally:
        apply.TEST_HOOKS.after_write = None
    mine = f"op = 'update_erp' AND erp_id = '{pair['erp_id']}' AND field = 'phone'"
    held = h.query(f"SELECT status, attempts, last_error FROM outbox WHERE {mine}")
    assert list(held["status"]) == ["in_flight"] and "timed out" in held["last_error"].iloc[0]
    assert list(held["attempts"]) == [1]  # one send, counted once
    h.emu.reset_stats("unleashed")
    h.push()
    assert _requests_by_endpoint(h, "unleashed") == {"GET /Customers/{guid}": 1}  # no rewrite
    assert _customer(h, pair["erp_id"])["PhoneNumber"] == "0113 496 0321"
    done = h.query(f"SELECT status FROM outbox WHERE {mine}")
    assert list(done["status"]) == ["applied"]
    audit = h.query(
        "SELECT * FROM audit_log WHERE erp_id = ? AND field = 'phone'", [pair["erp_id"]]
    )
    assert len(audit) == 1


def _run_with_crash(h, job):
    def crash(op_ids):
        raise apply.CrashForTest(f"simulated crash after writing {op_ids}")

    apply.TEST_HOOKS.after_write = crash
    try:
        h.run(job)
    finally:
        apply.TEST_HOOKS.after_write = None


# ------------------------------------------------------------------------------------------------
# Automation
# ------------------------------------------------------------------------------------------------
def test_sensor_cursor_and_run_keys(harness):
    h = harness
    h.cycle()
    with dg.build_sensor_context(instance=h.instance, resources=h.resources) as context:
        first = crm_change_sensor(context)
        assert isinstance(first, dg.RunRequest)
        cursor = context.cursor
        again = crm_change_sensor(context)
        assert isinstance(again, dg.SkipReason) and "No CRM" in again.skip_message
        assert context.cursor == cursor or json.loads(context.cursor).get("Divisions") == (
            json.loads(cursor).get("Divisions")
        )
        pair = h.linked_company()
        h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 1234"})
        second = crm_change_sensor(context)
        assert isinstance(second, dg.RunRequest)
        assert second.run_key != first.run_key
    h.set_settings(two_way_sync=False)
    with dg.build_sensor_context(instance=h.instance, resources=h.resources) as context:
        off = crm_change_sensor(context)
    assert isinstance(off, dg.SkipReason) and "off" in off.skip_message


@pytest.mark.parametrize(
    "local, fires",
    [("2026-11-23 10:00", True),   # Monday, inside the window
     ("2026-11-23 10:05", False),  # not on a 15-minute mark
     ("2026-11-23 06:45", False),  # before 07:00
     ("2026-11-23 19:15", False),  # after 19:00
     ("2026-11-28 10:00", False)],  # Saturday
)  # fmt: skip
def test_daytime_import_schedule_hours(harness, local, fires):
    h = harness
    from zoneinfo import ZoneInfo

    when = datetime.fromisoformat(local).replace(tzinfo=ZoneInfo("Europe/London"))
    with dg.build_schedule_context(
        instance=h.instance, scheduled_execution_time=when, resources=h.resources
    ) as context:
        result = h.schedule("daytime_import_schedule")(context)
    if fires:
        assert isinstance(result, dg.RunRequest)
        assert result.partition_key == when.astimezone(UTC).strftime("%Y-%m-%d-%H:00")
    else:
        assert isinstance(result, dg.SkipReason)


def test_overnight_schedule_fires_once_at_the_configured_time(harness):
    h = harness
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("Europe/London")
    results = []
    for hhmm in ("01:55", "02:00", "02:05"):
        when = datetime.fromisoformat(f"2026-11-24 {hhmm}").replace(tzinfo=tz)
        with dg.build_schedule_context(
            instance=h.instance, scheduled_execution_time=when, resources=h.resources
        ) as context:
            results.append(h.schedule("overnight_account_manager_fix_schedule")(context))
    assert [isinstance(r, dg.RunRequest) for r in results] == [False, True, False]
    assert results[1].run_key == "account-manager-fix:2026-11-24"


def test_backfill_of_a_past_window_imports_and_is_idempotent(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"CustomerName": "Changed During Outage"})
    past = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%d-%H:00")
    h.cycle(partition_key=past)
    assert h.crm.get("Divisions", pair["crm_id"])["Name"] == "Changed During Outage"
    snapshot = h.query("SELECT id, modified, data FROM unleashed_customers ORDER BY id")
    audit_rows = len(h.query("SELECT * FROM audit_log"))
    h.cycle(partition_key=past)
    assert h.query("SELECT id, modified, data FROM unleashed_customers ORDER BY id").equals(
        snapshot
    )
    assert len(h.query("SELECT * FROM audit_log")) == audit_rows


OVERLAP_SCRIPT = """
import sys, dagster as dg
from pathlib import Path
from tests.harness import Harness

class Emu:  # the servers run in the parent test process
    def __init__(self, u, c, i, k, t):
        self.unleashed_url, self.crm_url = u, c
        self.unleashed_api_id, self.unleashed_api_key, self.crm_token = i, k, t

h = Harness(Emu(*sys.argv[1:6]), Path(sys.argv[6]))
h.settings_file.write_text(Path(sys.argv[7]).read_text())
h.cycle()
print("cycle ok")
"""


def test_two_overlapping_runs_do_not_fail_on_the_duckdb_lock(harness, tmp_path):
    h = harness
    args = [
        h.emu.unleashed_url, h.emu.crm_url, h.emu.unleashed_api_id, h.emu.unleashed_api_key,
        h.emu.crm_token, str(h.db.parent), str(h.settings_file),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OVERLAP_SCRIPT, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "cycle ok" in out
    # Both runs completed and nothing was created twice.
    dupes = h.query(
        "SELECT data->>'$.ContactXtra.StandardTextField1' g, count(*) n FROM crm_contacts "
        "WHERE g IS NOT NULL GROUP BY 1 HAVING n > 1"
    )
    assert dupes.empty


def test_a_change_unleashed_refuses_is_a_rejection_not_resent_and_clears_when_changed(harness):
    """Unleashed keeps first name + last name + email unique per customer, which no validator
    can know in advance. A CRM edit that collides is refused (HTTP 400): it becomes a rejection
    naming the record, the field and the server's reason, it is not sent again on later cycles,
    and a new value goes through and resolves it."""
    h = harness
    h.cycle()
    pair = h.two_contacts_of_one_customer()
    # Contact B in the CRM takes A's name and email: the same person twice under one customer.
    h.crm.patch(
        "Contacts",
        int(pair["b_crm"]),
        {"Forename": pair["first"], "Surname": pair["last"], "Email": pair["email"]},
    )
    passed, description, _ = writes_check(run_with_unwritten(h), "sync/push_to_unleashed")
    assert not passed and "HTTP 400" in description  # the run that met the refusal fails
    refused_ops = h.query("SELECT count(*) AS n FROM outbox WHERE status = 'refused'")
    assert refused_ops.iloc[0]["n"] >= 1
    # The next run reports it (the other fields of the record may go without it); later runs
    # do not send it again.
    h.push()
    before = _requests_by_endpoint(h, "unleashed")
    h.cycle()
    h.push()
    after = _requests_by_endpoint(h, "unleashed")
    writes = [k for k in after if k.startswith(("POST", "PUT"))]
    assert all(after[k] == before.get(k, 0) for k in writes), (before, after)
    open_ = h.query(
        "SELECT field, reason FROM rejections WHERE resolved_at IS NULL AND erp_id = ?",
        [pair["b_erp"]],
    )
    assert not open_.empty, "the refused change is reported"
    reason = open_.iloc[0]["reason"]
    assert "refused" in reason and "400" in reason and str(pair["b_crm"]) in reason
    # The DuckDB plan table says what the run did: a rejection, not an update.
    planned = h.query("SELECT field, op, reason FROM sync_plan WHERE erp_id = ?", [pair["b_erp"]])
    shown = planned[planned["op"] == "reject"]
    assert set(shown["field"]) == set(open_["field"]), planned.to_string()
    assert shown["reason"].str.contains("refused").all()
    # A different email goes through and the rejection is resolved.
    h.crm.patch("Contacts", int(pair["b_crm"]), {"Email": "someone.else@example.org"})
    h.push()
    contacts = {c.to_wire()["Guid"]: c.to_wire() for c in h.unleashed.list_contacts(pair["cust"])}
    assert contacts[pair["b_erp"]]["EmailAddress"] == "someone.else@example.org"
    still = h.query(
        "SELECT * FROM rejections WHERE resolved_at IS NULL AND erp_id = ?", [pair["b_erp"]]
    )
    assert still.empty, still.to_string()


def test_an_edit_held_back_while_two_way_sync_was_off_is_sent_when_it_is_back_on(harness):
    """Found by `make soak`: an update queued, then dropped from the outbox by a run with two-way
    sync off (superseded), then planned again with it on, was reused as superseded and never
    sent. It must go through."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    h.crm.patch("Divisions", pair["crm_id"], {"Name": "Held Back Ltd"})
    h.emu.set_faults("unleashed", rate_429=1.0, retry_after_s=0)  # the push cannot get through
    run_with_unwritten(h)
    h.emu.set_faults("unleashed")
    assert _customer(h, pair["erp_id"])["CustomerName"] != "Held Back Ltd"
    h.set_settings(two_way_sync=False)
    h.cycle()
    superseded = h.query("SELECT count(*) AS n FROM outbox WHERE status = 'superseded'")
    assert superseded.iloc[0]["n"] >= 1
    h.set_settings(two_way_sync=True)
    h.cycle()
    assert _customer(h, pair["erp_id"])["CustomerName"] == "Held Back Ltd"


# ------------------------------------------------------------------------------------------------
# History retention
def test_pruning_deletes_old_finished_history_and_keeps_what_runs_still_act_on(tmp_path):
    now = datetime(2026, 11, 27, 3, 0)
    old, recent = now - timedelta(days=400), now - timedelta(days=10)
    with store.connect(tmp_path / "sync.duckdb") as con:
        for i, (when, status) in enumerate(
            [(old, "applied"), (old, "superseded"), (old, "failed"), (old, "pending"),
             (old, "in_flight"), (old, "in_doubt"), (old, "refused"), (old, "deferred"),
             (recent, "applied")]
        ):  # fmt: skip
            applied = when if status == "applied" else None
            con.execute(
                """INSERT INTO outbox (op_id, op_key, created_at, entity, op, status, applied_at)
                   VALUES (?, ?, ?, 'company', 'update_erp', ?, ?)""",
                [f"k{i}-0", f"k{i}", when, status, applied],
            )
        for when in (old, recent):
            con.execute(
                "INSERT INTO audit_log (logged_at, entity, field) VALUES (?, 'company', 'phone')",
                [when],
            )
            con.execute(
                """INSERT INTO conflicts (seen_at, entity, erp_id, field, op_key)
                   VALUES (?, 'company', 'e1', 'phone', ?)""",
                [when, f"c{when:%Y}"],
            )
        for i, resolved in enumerate((old, recent, None)):  # an old unresolved one stays open
            con.execute(
                """INSERT INTO rejections (entity, erp_id, reason, first_seen, resolved_at)
                   VALUES ('company', ?, 'why', ?, ?)""",
                [f"e{i}", old, resolved],
            )
            con.execute(
                """INSERT INTO bad_records (system, endpoint, record_id, reason, first_seen,
                                           resolved_at)
                   VALUES ('crm', 'Contacts', ?, 'why', ?, ?)""",
                [f"r{i}", old, resolved],
            )
        decisions = con.execute("SELECT count(*) FROM conflict_decisions").fetchone()

        kept_all = store.prune_history(con, 0, now=now)
        assert kept_all.cutoff is None and sum(kept_all.deleted.values()) == 0
        assert kept_all.kept["outbox"] == 9

        result = store.prune_history(con, 365, now=now)
        assert result.cutoff == now - timedelta(days=365)
        assert result.deleted == {
            "audit_log": 1, "conflicts": 1, "outbox": 2, "rejections": 1, "bad_records": 1,
        }  # fmt: skip
        left = dict(con.execute("SELECT op_key, status FROM outbox").fetchall())
        assert sorted(left.values()) == sorted(
            ["failed", "pending", "in_flight", "in_doubt", "refused", "deferred", "applied"]
        )
        assert con.execute("SELECT min(logged_at) FROM audit_log").fetchone()[0] == recent
        assert con.execute("SELECT min(seen_at) FROM conflicts").fetchone()[0] == recent
        for table in ("rejections", "bad_records"):
            rows = con.execute(f"SELECT resolved_at FROM {table} ORDER BY 1").fetchall()
            assert rows == [(recent,), (None,)]
        assert con.execute("SELECT count(*) FROM conflict_decisions").fetchone() == decisions
        with pytest.raises(ValueError, match="keep_days"):
            store.prune_history(con, -1, now=now)


def _age_history(h, before: datetime, days: int) -> None:
    """Move every history row written before `before` `days` days into the past."""
    back = f"INTERVAL {days} DAY"
    with store.connect(h.db) as con:
        con.execute(f"UPDATE audit_log SET logged_at = logged_at - {back} WHERE logged_at < ?",
                    [before])  # fmt: skip
        con.execute(
            f"""UPDATE outbox SET created_at = created_at - {back},
                                  applied_at = applied_at - {back}
                WHERE created_at < ?""",
            [before],
        )


def test_nightly_pruning_through_dagster_and_the_same_change_queued_again(harness):
    """The pruning job deletes a year-old push from the outbox and the audit log; the same
    change made again afterwards is queued and sent (its outbox row is numbered past the
    occurrence still kept, not after a count that pruning made smaller)."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    original = _customer(h, pair["erp_id"])["PhoneNumber"]
    edited = "+44 161 496 0777"

    def edit(phone):
        h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": phone})
        h.push()
        assert _customer(h, pair["erp_id"])["PhoneNumber"] == phone

    edit(edited)  # the first occurrence of this change
    key = h.query("SELECT op_key FROM outbox WHERE new_value = ?", [edited]).iloc[0]["op_key"]
    _age_history(h, datetime.now(UTC).replace(tzinfo=None), 400)
    edit(original)
    edit(edited)  # the same change again: its second occurrence, kept by the pruning
    result = h.run("history_pruning_job")
    meta = h.materialization_metadata(result, ["sync", "sync_history"])
    assert meta["rows_deleted"] >= 2  # the first push's outbox and audit rows at least
    assert "outbox" in meta["tables"] and "audit_log" in meta["tables"]
    occurrences = h.query("SELECT op_id FROM outbox WHERE op_key = ? ORDER BY op_id", [key])
    assert list(occurrences["op_id"]) == [f"{key}-1"]
    assert (
        h.query("SELECT count(*) AS n FROM audit_log WHERE new_value = ?", [edited]).iloc[0]["n"]
        == 1
    )
    edit(original)
    edit(edited)  # a third occurrence after the pruning
    occurrences = h.query("SELECT op_id, status FROM outbox WHERE op_key = ? ORDER BY op_id", [key])
    assert list(occurrences.itertuples(index=False, name=None)) == [
        (f"{key}-1", "applied"),
        (f"{key}-2", "applied"),
    ]


def test_history_pruning_schedule_fires_once_at_its_time_and_not_when_keeping_all(harness):
    h = harness
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("Europe/London")

    def tick(hhmm):
        when = datetime.fromisoformat(f"2026-11-24 {hhmm}").replace(tzinfo=tz)
        with dg.build_schedule_context(
            instance=h.instance, scheduled_execution_time=when, resources=h.resources
        ) as context:
            return h.schedule("history_pruning_schedule")(context)

    results = [tick(t) for t in ("02:55", "03:00", "03:05")]
    assert [isinstance(r, dg.RunRequest) for r in results] == [False, True, False]
    assert results[1].run_key == "history-pruning:2026-11-24"
    h.set_settings(keep_history_days=0)
    off = tick("03:00")
    assert isinstance(off, dg.SkipReason) and "keep_history_days: 0" in off.skip_message
