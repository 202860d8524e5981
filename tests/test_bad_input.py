"""Bad input: malformed records planted at either source, broken mapping and settings files, and
missing or malformed environment variables. Each is checked through a Dagster run, as an operator
would meet it: the report names the record (or file, or variable), the field and the reason, the
other records keep syncing, and a fixed record syncs on the next cycle."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest

from sync_pipeline.defs import build_defs
from sync_pipeline.defs.resources import DEFAULT_MAPPINGS, default_resources
from sync_pipeline.settings import Settings, SettingsError, load_settings, save_settings
from tests.harness import (
    Harness,
    current_partition,
    failure_messages,
    run_failing,
    run_with_unwritten,
)

LONG = "L" * 100_000
# Where the CRM keeps a record's Unleashed Guid: a custom-field slot of its Xtra row.
COMPANY_SLOT = "DivisionXtra/StandardTextField1"
CONTACT_SLOT = "ContactXtra/StandardTextField1"
STAMPS = ("LastUpdatedTimestamp", "LastUpdated")  # kept by the server on every write


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _raw_customer(h: Harness, guid: str) -> dict[str, Any]:
    response = httpx.get(f"{h.emu.unleashed_url}/_admin/customers/{guid}", timeout=30)
    response.raise_for_status()
    return response.json()


def _two_pairs(h: Harness) -> tuple[dict[str, Any], dict[str, Any]]:
    frame = h.query(
        """SELECT l.crm_id, l.erp_id FROM company_links l
           JOIN unleashed_customers u ON u.id = l.erp_id AND u.active
           JOIN crm_companies c ON c.id = l.crm_id AND c.active
           ORDER BY l.crm_id LIMIT 2"""
    )
    return tuple({"crm_id": int(r["crm_id"]), "erp_id": r["erp_id"]} for _, r in frame.iterrows())


def _open_bad(h: Harness, system: str, record_id: str) -> list[str]:
    rows = h.query(
        "SELECT reason FROM bad_records WHERE system = ? AND record_id = ? AND resolved_at IS NULL",
        [system, record_id],
    )
    return list(rows["reason"])


def _all_bad(h: Harness, system: str, record_id: str):
    return h.query(
        "SELECT reason, resolved_at FROM bad_records WHERE system = ? AND record_id = ?",
        [system, record_id],
    )


# ------------------------------------------------------------------------------------------------
# Malformed Unleashed customers
# ------------------------------------------------------------------------------------------------
UNLEASHED_CASES = [
    # (field, bad value, words the reason must carry)
    ("LastModifiedOn", "/Date(yesterday)/", ["LastModifiedOn", "/Date(yesterday)/"]),
    ("CreatedOn", "2026-11-26T05:26:07Z", ["CreatedOn", "2026-11-26T05:26:07Z"]),
    ("CustomerName", 12345, ["CustomerName", "12345"]),
    ("Obsolete", "maybe", ["Obsolete", "maybe"]),
    ("SalesPerson", "Bob Smith", ["SalesPerson", "Bob Smith"]),
    ("CustomerName", None, ["CustomerName"]),
    ("CustomerCode", None, ["CustomerCode"]),
]


@pytest.mark.parametrize(
    "field, bad, words", UNLEASHED_CASES, ids=[f"{c[0]}={c[1]!r}" for c in UNLEASHED_CASES]
)
def test_malformed_unleashed_customer_is_set_aside_others_sync_and_fix_syncs(
    harness, field, bad, words
):
    h = harness
    h.cycle()
    bad_pair, good_pair = _two_pairs(h)
    original = _raw_customer(h, bad_pair["erp_id"])
    crm_name_before = h.crm.get("Divisions", bad_pair["crm_id"])["Name"]
    h.plant_customer(bad_pair["erp_id"], **{field: bad, "CustomerName": "Must Not Travel"})
    if field == "CustomerName":
        h.plant_customer(bad_pair["erp_id"], CustomerName=bad)
    h.unleashed.update_customer(good_pair["erp_id"], {"CustomerName": "Good Neighbour Ltd"})

    result = h.cycle()

    # The other record synced in the same cycle.
    assert h.crm.get("Divisions", good_pair["crm_id"])["Name"] == "Good Neighbour Ltd"
    # The bad one did not travel, and is reported by record, field and reason.
    assert h.crm.get("Divisions", bad_pair["crm_id"])["Name"] == crm_name_before
    reasons = _open_bad(h, "Unleashed", bad_pair["erp_id"])
    assert len(reasons) == 1, reasons
    for word in words:
        assert word in reasons[0], reasons[0]
    meta = h.materialization_metadata(result, ["unleashed", "unleashed_customers"])
    assert meta["bad_records"] >= 1
    preview = meta["bad_records_preview"]
    assert bad_pair["erp_id"] in preview and field in preview

    # Fixed at the source: it syncs and the report closes. (A fixed LastModifiedOn is the
    # server's fresh write time, as after any real edit.)
    fix = {} if field == "LastModifiedOn" else {field: original.get(field)}
    h.plant_customer(bad_pair["erp_id"], **{**fix, "CustomerName": "Fixed At Source Ltd"})
    h.cycle()
    assert h.crm.get("Divisions", bad_pair["crm_id"])["Name"] == "Fixed At Source Ltd"
    assert _open_bad(h, "Unleashed", bad_pair["erp_id"]) == []
    assert _all_bad(h, "Unleashed", bad_pair["erp_id"])["resolved_at"].notna().all()


def test_malformed_unleashed_contact_is_set_aside_and_its_customer_still_syncs(harness):
    h = harness
    h.cycle()
    pair, _ = _two_pairs(h)
    original = _raw_customer(h, pair["erp_id"])
    bad_guid = str(uuid.uuid4())
    good_guid = str(uuid.uuid4())
    contacts = [
        *original.get("Contacts", []),
        {"Guid": bad_guid, "FirstName": 42, "LastName": "Broken", "EmailAddress": "b@example.com"},
        {"Guid": good_guid, "FirstName": "Grace", "LastName": "Good", "EmailAddress": "g@ex.com"},
    ]
    h.plant_customer(pair["erp_id"], Contacts=contacts, CustomerName="Customer Still Syncs")
    h.cycle()
    assert h.crm.get("Divisions", pair["crm_id"])["Name"] == "Customer Still Syncs"
    assert len(h.crm.find("Contacts", CONTACT_SLOT, good_guid)) == 1
    assert h.crm.find("Contacts", CONTACT_SLOT, bad_guid) == []
    # The customer's contact list is incomplete: none of its contacts is read as deleted.
    assert (
        h.query(
            "SELECT count(*) AS n FROM unleashed_contacts WHERE parent_id = ? AND NOT active",
            [pair["erp_id"]],
        ).iloc[0]["n"]
        == 0
    )
    reasons = h.query(
        "SELECT reason FROM bad_records WHERE system = 'Unleashed' AND resolved_at IS NULL"
    )["reason"]
    mine = [r for r in reasons if bad_guid in r]
    assert len(mine) == 1 and "FirstName" in mine[0] and "42" in mine[0], list(reasons)
    assert pair["erp_id"] in mine[0]  # names the customer it belongs to

    fixed = [
        {**c, "FirstName": "Fixed"} if c.get("Guid") == bad_guid else c
        for c in _raw_customer(h, pair["erp_id"])["Contacts"]
    ]
    h.plant_customer(pair["erp_id"], Contacts=fixed)
    h.cycle()
    created = h.crm.find("Contacts", CONTACT_SLOT, bad_guid)
    assert len(created) == 1 and created[0]["Forename"] == "Fixed"
    # Fixed and synced: no longer reported as malformed.
    assert _open_bad(h, "Unleashed", bad_guid) == []
    assert _all_bad(h, "Unleashed", bad_guid)["resolved_at"].notna().all()


def test_customer_with_a_malformed_contact_list_stays_reported_until_fixed(harness):
    h = harness
    h.cycle()
    (parent,) = h.query("SELECT erp_parent_id FROM contact_links ORDER BY erp_parent_id LIMIT 1")[
        "erp_parent_id"
    ]
    pair = {"erp_id": parent}
    pair["crm_id"] = int(
        h.query("SELECT crm_id FROM company_links WHERE erp_id = ?", [parent]).iloc[0]["crm_id"]
    )
    contacts = _raw_customer(h, pair["erp_id"]).get("Contacts", [])
    assert contacts
    h.plant_customer(pair["erp_id"], Contacts="not a list", CustomerName="List Broken Ltd")
    h.cycle()
    assert h.crm.get("Divisions", pair["crm_id"])["Name"] == "List Broken Ltd"  # still syncs
    reasons = _open_bad(h, "Unleashed", pair["erp_id"])
    assert len(reasons) == 1 and "Contacts is not a list" in reasons[0], reasons
    # Its contact list is unknown, not empty: none of its contacts is read as deleted.
    inactive = h.query(
        "SELECT id FROM unleashed_contacts WHERE parent_id = ? AND NOT active", [pair["erp_id"]]
    )
    assert inactive.empty, inactive.to_string()
    h.plant_customer(pair["erp_id"], Contacts=contacts)
    h.cycle()
    assert _open_bad(h, "Unleashed", pair["erp_id"]) == []


def test_unleashed_customer_missing_required_fields_is_reported_not_created(harness):
    h = harness
    h.cycle()
    guid = str(uuid.uuid4())
    other = str(uuid.uuid4())
    h.plant_customer(guid, PhoneNumber="0161 000 0000")  # no CustomerCode, no CustomerName
    h.unleashed.save_customer({"Guid": other, "CustomerCode": "OKCO1", "CustomerName": "Ok Co"})
    h.cycle()
    assert len(h.crm.find("Divisions", COMPANY_SLOT, other)) == 1
    assert h.crm.find("Divisions", COMPANY_SLOT, guid) == []
    reasons = _open_bad(h, "Unleashed", guid)
    assert len(reasons) == 1 and "CustomerCode" in reasons[0] and "CustomerName" in reasons[0]

    h.plant_customer(guid, CustomerCode="FIXED1", CustomerName="Fixed Later Ltd")
    h.cycle()
    created = h.crm.find("Divisions", COMPANY_SLOT, guid)
    assert len(created) == 1 and created[0]["Name"] == "Fixed Later Ltd"
    assert _open_bad(h, "Unleashed", guid) == []


def test_unknown_unleashed_fields_survive_a_push_untouched(harness):
    h = harness
    h.cycle()
    pair, _ = _two_pairs(h)
    custom = {"Colour": "teal", "Tags": [1, "two", {"three": None}]}
    h.plant_customer(pair["erp_id"], XCustomBlock=custom, XCustomText="keep me")
    h.cycle()
    h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0777"})
    h.push()
    after = _raw_customer(h, pair["erp_id"])
    assert after["PhoneNumber"] == "0113 496 0777"
    assert after["XCustomBlock"] == custom and after["XCustomText"] == "keep me"
    assert _all_bad(h, "Unleashed", pair["erp_id"]).empty


# ------------------------------------------------------------------------------------------------
# Malformed CRM records
# ------------------------------------------------------------------------------------------------
CRM_CASES = [
    ("LastUpdatedTimestamp", "last tuesday", ["LastUpdatedTimestamp", "last tuesday"]),
    ("Name", 12345, ["Name", "12345"]),
    ("PhoneNumber", {"number": "0161"}, ["PhoneNumber", "number"]),
    ("Website", ["https://a.example.com"], ["Website", "a.example.com"]),
]


@pytest.mark.parametrize(
    "field, bad, words", CRM_CASES, ids=[f"{c[0]}={c[1]!r}" for c in CRM_CASES]
)
def test_malformed_crm_company_is_set_aside_others_sync_and_fix_syncs(harness, field, bad, words):
    h = harness
    h.cycle()
    bad_pair, good_pair = _two_pairs(h)
    division = h.crm.get("Divisions", bad_pair["crm_id"])
    erp_before = h.unleashed.get_customer(bad_pair["erp_id"]).to_wire()
    # The server stamps the change timestamp (and its visible copy) on the planted record.
    fresh = {k: v for k, v in division.items() if k not in STAMPS}
    h.plant_crm("Divisions", bad_pair["crm_id"], {**fresh, "Name": "Must Not Travel", field: bad})
    h.crm.patch("Divisions", good_pair["crm_id"], {"PhoneNumber": "0161 496 0555"})

    result = h.cycle()

    assert h.unleashed.get_customer(good_pair["erp_id"]).PhoneNumber == "0161 496 0555"
    erp_after = h.unleashed.get_customer(bad_pair["erp_id"]).to_wire()
    assert erp_after["CustomerName"] == erp_before["CustomerName"]
    assert erp_after.get("PhoneNumber") == erp_before.get("PhoneNumber")
    reasons = _open_bad(h, "CRM", str(bad_pair["crm_id"]))
    assert len(reasons) == 1, reasons
    for word in words:
        assert word in reasons[0], reasons[0]
    assert f"Divisions({bad_pair['crm_id']})" in reasons[0]
    meta = h.materialization_metadata(result, ["crm", "crm_companies"])
    assert meta["bad_records"] >= 1 and field in meta["bad_records_preview"]

    h.plant_crm("Divisions", bad_pair["crm_id"], {**fresh, "Name": "Fixed In Crm Ltd"})
    h.cycle()
    assert h.unleashed.get_customer(bad_pair["erp_id"]).CustomerName == "Fixed In Crm Ltd"
    assert _open_bad(h, "CRM", str(bad_pair["crm_id"])) == []


def test_a_set_aside_crm_record_is_frozen_both_ways_until_it_reads_clean(harness):
    """A malformed CRM company (its Website a JSON list) cannot be read, so its snapshot keeps
    the last good version. An Unleashed phone edit written to it would not show in that
    snapshot, and the stale phone would travel back to Unleashed. So nothing of the pair moves
    in either direction while it is set aside, a rejection says so, and once the CRM record
    reads clean the Unleashed edit arrives and nothing is reverted."""
    h = harness
    h.cycle()
    pair, _ = _two_pairs(h)
    division = h.crm.get("Divisions", pair["crm_id"])
    fresh = {k: v for k, v in division.items() if k not in STAMPS}
    h.plant_crm("Divisions", pair["crm_id"], {**fresh, "Website": ["a.example", "b.example"]})
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0161 496 0777"})
    for _ in range(3):
        h.cycle()
        assert h.unleashed.get_customer(pair["erp_id"]).PhoneNumber == "0161 496 0777"
        assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == division["PhoneNumber"]
    frozen = h.query(
        """SELECT reason FROM rejections WHERE resolved_at IS NULL AND entity = 'company'
           AND crm_id = ? AND field IS NULL""",
        [str(pair["crm_id"])],
    )
    assert len(frozen) == 1
    reason = frozen.iloc[0]["reason"]
    assert "frozen" in reason and "either direction" in reason and "Website" in reason, reason
    assert h.query(
        "SELECT * FROM audit_log WHERE erp_id = ? OR crm_id = ?",
        [pair["erp_id"], str(pair["crm_id"])],
    ).empty

    h.plant_crm("Divisions", pair["crm_id"], {**fresh, "Website": "https://fixed.example.com"})
    h.cycle()
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0161 496 0777"
    after = h.unleashed.get_customer(pair["erp_id"])
    assert (after.PhoneNumber, after.Website) == ("0161 496 0777", "https://fixed.example.com")
    h.cycle()
    assert h.unleashed.get_customer(pair["erp_id"]).PhoneNumber == "0161 496 0777"
    assert h.query(
        """SELECT * FROM rejections WHERE resolved_at IS NULL AND crm_id = ?""",
        [str(pair["crm_id"])],
    ).empty


def test_crm_record_without_its_key_is_reported_and_others_sync(harness):
    h = harness
    h.cycle()
    bad_pair, good_pair = _two_pairs(h)
    division = h.crm.get("Divisions", bad_pair["crm_id"])
    keyless = {k: v for k, v in division.items() if k not in ("DivisionId", *STAMPS)}
    h.plant_crm("Divisions", bad_pair["crm_id"], {**keyless, "Name": "Keyless One"})
    other = h.crm.get("Divisions", good_pair["crm_id"])
    other_keyless = {k: v for k, v in other.items() if k not in ("DivisionId", *STAMPS)}
    spare = int(h.query("SELECT max(id::INTEGER) AS m FROM crm_companies").iloc[0]["m"]) + 1
    h.plant_crm("Divisions", spare, {**other_keyless, "Name": "Keyless Two"})
    h.crm.patch("Divisions", good_pair["crm_id"], {"PhoneNumber": "0161 496 0556"})
    h.cycle()
    assert h.unleashed.get_customer(good_pair["erp_id"]).PhoneNumber == "0161 496 0556"
    assert h.unleashed.get_customer(bad_pair["erp_id"]).CustomerName != "Keyless One"
    open_rows = h.query(
        "SELECT reason FROM bad_records WHERE system = 'CRM' AND resolved_at IS NULL"
    )["reason"]
    # Two records without a key are two reports, each naming its record and the missing key.
    for name in ("Keyless One", "Keyless Two"):
        mine = [r for r in open_rows if name in r]
        assert len(mine) == 1 and "DivisionId" in mine[0], list(open_rows)


def test_unknown_crm_fields_are_kept_and_do_not_fail_the_record(harness):
    h = harness
    h.cycle()
    pair, _ = _two_pairs(h)
    division = h.crm.get("Divisions", pair["crm_id"])
    extra = {"ZzLegacyFlag": "keep-me", "ZzScores": [1, 2, 3]}
    # The change timestamp left to the server (a fresh write time).
    h.plant_crm("Divisions", pair["crm_id"],
        {k: v for k, v in {**division, **extra}.items() if k not in STAMPS},
    )  # fmt: skip
    h.unleashed.update_customer(pair["erp_id"], {"CustomerName": "Renamed In Unleashed"})
    h.cycle()
    after = h.crm.get("Divisions", pair["crm_id"])
    assert after["Name"] == "Renamed In Unleashed"
    assert after["ZzLegacyFlag"] == "keep-me" and after["ZzScores"] == [1, 2, 3]
    assert _all_bad(h, "CRM", str(pair["crm_id"])).empty
    stored = h.query("SELECT data->>'$.ZzLegacyFlag' AS f FROM crm_companies WHERE id = ?",
                     [str(pair["crm_id"])])  # fmt: skip
    assert stored.iloc[0]["f"] == "keep-me"


# ------------------------------------------------------------------------------------------------
# Unsafe values: checked per direction before anything is written, both ways
# ------------------------------------------------------------------------------------------------
def _open_rejections(h: Harness, **where: str):
    cond = " AND ".join(f"{k} IS NOT DISTINCT FROM ?" for k in where)
    return h.query(
        f"SELECT field, value, reason FROM rejections WHERE resolved_at IS NULL AND {cond}",
        list(where.values()),
    )


def _rejected_in_plan_preview(h: Harness, result) -> str:
    return h.materialization_metadata(result, ["sync", "sync_plan"])["rejections_preview"]


def _no_raw_unsafe_characters(text: str) -> bool:
    from sync_pipeline.mapping.validate import unsafe_kind

    return all(unsafe_kind(ch) is None for ch in text.replace("\n", ""))


def _linked_contact(h: Harness) -> dict[str, Any]:
    row = h.query(
        """SELECT l.crm_id, l.erp_id, l.erp_parent_id FROM contact_links l
           JOIN unleashed_contacts u ON u.id = l.erp_id AND u.active
           JOIN crm_contacts c ON c.id = l.crm_id AND c.active
           WHERE coalesce(u.data->>'$.EmailAddress', '') <> ''
           ORDER BY l.crm_id LIMIT 1"""
    ).iloc[0]
    return {"crm_id": int(row["crm_id"]), "erp_id": row["erp_id"], "customer": row["erp_parent_id"]}


def _erp_contact(h: Harness, contact: dict[str, Any]) -> dict[str, Any]:
    (found,) = [
        c.to_wire()
        for c in h.unleashed.list_contacts(contact["customer"])
        if str(c.Guid) == contact["erp_id"]
    ]
    return found


def test_a_javascript_website_in_unleashed_is_reported_and_never_reaches_the_crm(harness):
    h = harness
    h.cycle()
    pair, other = _two_pairs(h)
    crm_before = h.crm.get("Divisions", pair["crm_id"])["Website"]
    # Unleashed's own API refuses it; a record can still hold one (imported, older data).
    h.plant_customer(pair["erp_id"], Website="javascript:alert(document.cookie)")
    h.unleashed.update_customer(other["erp_id"], {"Website": "https://other.example.com"})

    result = h.cycle()

    assert h.crm.get("Divisions", pair["crm_id"])["Website"] == crm_before
    assert h.crm.get("Divisions", other["crm_id"])["Website"] == "https://other.example.com"
    (reason,) = _open_rejections(h, crm_id=str(pair["crm_id"]), field="website")["reason"]
    assert f"(CRM {pair['crm_id']} / Unleashed {pair['erp_id']}): website " in reason
    assert (
        "'javascript:alert(document.cookie)' cannot be written to the CRM: is not an absolute "
        "http:// or https:// address; not sent (Unleashed changed website from "
    ) in reason, reason
    assert "javascript:alert(document.cookie)" in _rejected_in_plan_preview(h, result)
    # Nothing is sent while the value stays: the next cycles write nothing to the division.
    before = h.emu.stats("crm")["requests"].get("PATCH /Divisions({key})", 0)
    h.cycle()
    assert h.emu.stats("crm")["requests"].get("PATCH /Divisions({key})", 0) == before

    h.unleashed.update_customer(pair["erp_id"], {"Website": "https://fixed.example.com"})
    h.cycle()
    assert h.crm.get("Divisions", pair["crm_id"])["Website"] == "https://fixed.example.com"
    assert _open_rejections(h, crm_id=str(pair["crm_id"]), field="website").empty


def test_a_nul_in_a_crm_company_name_is_reported_and_never_reaches_unleashed(harness):
    h = harness
    h.cycle()
    pair = h.linked_company()
    name_before = h.unleashed.get_customer(pair["erp_id"]).CustomerName
    h.crm.patch(
        "Divisions", pair["crm_id"], {"Name": "Acme\x00Trading", "PhoneNumber": "0161 496 0321"}
    )

    result = h.push()

    after = h.unleashed.get_customer(pair["erp_id"])
    assert after.CustomerName == name_before
    assert after.PhoneNumber == "0161 496 0321"  # the rest of the record still syncs
    (reason,) = _open_rejections(h, crm_id=str(pair["crm_id"]), field="name")["reason"]
    assert (
        f"(CRM {pair['crm_id']} / Unleashed {pair['erp_id']}): name 'Acme\\x00Trading' is not "
        "accepted by Unleashed: contains the control character U+0000; not sent (CRM changed name"
    ) in reason, reason
    assert "\x00" not in reason
    preview = _rejected_in_plan_preview(h, result)
    assert "Acme\\x00Trading" in preview and _no_raw_unsafe_characters(preview)

    h.crm.patch("Divisions", pair["crm_id"], {"Name": "Acme Trading"})
    h.push()
    assert h.unleashed.get_customer(pair["erp_id"]).CustomerName == "Acme Trading"
    assert _open_rejections(h, crm_id=str(pair["crm_id"]), field="name").empty


def test_a_right_to_left_override_in_an_unleashed_surname_never_reaches_the_crm(harness):
    h = harness
    h.cycle()
    h.cycle()  # the CRM contacts the first cycle created are linked
    contact = _linked_contact(h)
    surname_before = h.crm.get("Contacts", contact["crm_id"])["Surname"]
    spoofed = "Smith\u202efdp.exe"  # shows as "Smithexe.pdf"
    h.unleashed.update_contact(contact["customer"], contact["erp_id"], {"LastName": spoofed})
    assert _erp_contact(h, contact)["LastName"] == spoofed  # Unleashed took it

    result = h.cycle()

    assert h.crm.get("Contacts", contact["crm_id"])["Surname"] == surname_before
    (reason,) = _open_rejections(h, erp_id=contact["erp_id"], field="last_name")["reason"]
    assert (
        "last name 'Smith\\u202efdp.exe' cannot be written to the CRM: contains the "
        "bidirectional control character U+202E (RIGHT-TO-LEFT OVERRIDE)"
    ) in reason, reason
    assert f"(CRM {contact['crm_id']} / Unleashed {contact['erp_id']})" in reason
    assert _no_raw_unsafe_characters(reason)
    assert _no_raw_unsafe_characters(_rejected_in_plan_preview(h, result))

    h.unleashed.update_contact(contact["customer"], contact["erp_id"], {"LastName": "Smith"})
    h.cycle()
    assert h.crm.get("Contacts", contact["crm_id"])["Surname"] == "Smith"
    assert _open_rejections(h, erp_id=contact["erp_id"], field="last_name").empty


def test_a_control_character_in_a_crm_email_never_reaches_unleashed(harness):
    h = harness
    h.cycle()
    h.cycle()
    contact = _linked_contact(h)
    email_before = _erp_contact(h, contact)["EmailAddress"]
    injected = "jo@example.com\r\nBcc: everyone@example.org"
    h.crm.patch("Contacts", contact["crm_id"], {"Email": injected})

    h.push()

    assert _erp_contact(h, contact)["EmailAddress"] == email_before
    (reason,) = _open_rejections(h, erp_id=contact["erp_id"], field="email")["reason"]
    assert (
        "email 'jo@example.com\\r\\nBcc: everyone@example.org' is not accepted by Unleashed: "
        "contains the control character U+000D (carriage return)"
    ) in reason, reason

    h.crm.patch("Contacts", contact["crm_id"], {"Email": "jo.fixed@example.com"})
    h.push()
    assert _erp_contact(h, contact)["EmailAddress"] == "jo.fixed@example.com"
    assert _open_rejections(h, erp_id=contact["erp_id"], field="email").empty


def test_an_unleashed_contact_with_an_unsafe_value_is_not_created_in_the_crm_until_fixed(harness):
    """A creation is refused whole (the CRM record is not made without the field): the
    rejection names the Unleashed contact, the field, the value and why; fixed in Unleashed, the
    contact is created at the next cycle and the rejection closes."""
    h = harness
    h.cycle()
    pair = h.linked_company()
    created = h.unleashed.create_contact(
        pair["erp_id"],
        {"FirstName": "Eve\x1b[8m", "LastName": "Hidden", "EmailAddress": "eve@example.com"},
    )
    guid = str(created.Guid)
    result = h.cycle()
    h.cycle()

    assert h.crm.find("Contacts", CONTACT_SLOT, guid) == []
    assert h.crm.find("Contacts", "Surname", "Hidden") == []
    (reason,) = _open_rejections(h, erp_id=guid, field=None)["reason"]
    assert reason == (
        f"Unleashed contact 'Eve\\x1b[8m Hidden' (Unleashed {guid}) is not created in the CRM: "
        "first name 'Eve\\x1b[8m' contains the control character U+001B"
    )
    assert _no_raw_unsafe_characters(_rejected_in_plan_preview(h, result))

    h.unleashed.update_contact(pair["erp_id"], guid, {"FirstName": "Eve"})
    h.cycle()
    (contact,) = h.crm.find("Contacts", CONTACT_SLOT, guid)
    assert (contact["Forename"], contact["Surname"]) == ("Eve", "Hidden")
    assert contact["DivisionId"] == pair["crm_id"]
    assert _open_rejections(h, erp_id=guid, field=None).empty


# ------------------------------------------------------------------------------------------------
# Very long strings: Unleashed sets no length limit, the CRM's Division.Name is String(250)
# ------------------------------------------------------------------------------------------------
def test_very_long_strings_sync_whole_or_are_refused_whole(harness):
    h = harness
    h.cycle()
    a, b = _two_pairs(h)
    crm_name_b = h.crm.get("Divisions", b["crm_id"])["Name"]
    longest = "L" * 250  # the most the CRM column holds
    h.crm.patch("Divisions", a["crm_id"], {"Name": longest})
    h.unleashed.update_customer(b["erp_id"], {"CustomerName": LONG, "PhoneNumber": "0161 496 0999"})
    result = run_with_unwritten(h, "sync_cycle_job")  # the CRM refused a write: the run says so
    # The longest CRM name reaches Unleashed whole; the audit keeps the whole value too.
    assert h.unleashed.get_customer(a["erp_id"]).CustomerName == longest
    audit = h.query(
        "SELECT new_value FROM audit_log WHERE crm_id = ? AND field = 'name'", [str(a["crm_id"])]
    )
    assert list(audit["new_value"]) == [longest]
    # A name the CRM cannot hold is not cut short: the CRM keeps its own and the run says why.
    assert h.crm.get("Divisions", b["crm_id"])["Name"] == crm_name_b
    errors = h.materialization_metadata(result, ["sync", "pull_to_crm"])["errors"]
    assert "Name" in errors and "250" in errors, errors
    assert h.query("SELECT * FROM bad_records WHERE resolved_at IS NULL").empty
    # By the next cycle the customer's other change has arrived without it, and the refused
    # name is a rejection naming the record, the field and the limit.
    h.cycle()
    division = h.crm.get("Divisions", b["crm_id"])
    assert division["Name"] == crm_name_b
    assert division["PhoneNumber"] == "0161 496 0999", "a valid change held back by a refused one"
    rejected = h.query(
        "SELECT reason FROM rejections WHERE crm_id = ? AND field = 'name' AND resolved_at IS NULL",
        [str(b["crm_id"])],
    )["reason"]
    assert len(rejected) == 1 and "250" in rejected[0], list(rejected)
    # Not sent again while the value stays the same.
    before = h.emu.stats("crm")["requests"].get("PATCH /Divisions({key})", 0)
    h.cycle()
    assert h.emu.stats("crm")["requests"].get("PATCH /Divisions({key})", 0) == before


# ------------------------------------------------------------------------------------------------
# Broken mapping and settings files
# ------------------------------------------------------------------------------------------------
def test_broken_mapping_dir_fails_the_run_naming_file_and_entry(emulators, tmp_path, monkeypatch):
    mappings = tmp_path / "mappings"
    shutil.copytree(DEFAULT_MAPPINGS, mappings)
    company = mappings / "company.yaml"
    company.write_text(
        company.read_text().replace(
            "    crm: PhoneNumber\n", "    crm: PhoneNumber\n    colour: blue\n", 1
        )
    )
    monkeypatch.setenv("SYNC_MAPPINGS_DIR", str(mappings))
    monkeypatch.setenv("SYNC_SETTINGS_FILE", str(save_settings(Settings(), tmp_path / "s.yaml")))
    monkeypatch.setenv("SYNC_DUCKDB_PATH", str(tmp_path / "sync.duckdb"))
    for name, value in emulators.env().items():
        monkeypatch.setenv(name, value)
    defs = build_defs(default_resources())
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("sync_cycle_job").execute_in_process(
            instance=instance, partition_key=current_partition(), raise_on_error=False
        )
    assert not result.success
    text = failure_messages(result)
    assert str(company) in text
    assert "fields.phone" in text and "unknown key 'colour'" in text


SETTINGS_CASES = [
    ("bad_yaml", "two_way_sync: [true\n", ["not valid YAML"]),
    ("unknown_key", "two_way_sync: true\nturbo_mode: true\n", ["turbo_mode", "unknown setting"]),
    ("bad_timezone", "timezone: Mars/Olympus_Mons\n", ["timezone", "Mars/Olympus_Mons"]),
    ("wrong_type", "imports:\n  every_minutes: often\n", ["imports.every_minutes", "integer"]),
]


@pytest.mark.parametrize("case, text, words", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_broken_settings_file_fails_the_run_naming_file_setting_and_reason(
    harness, case, text, words
):
    h = harness
    h.settings_file.write_text(text)
    with pytest.raises(SettingsError) as raised:
        load_settings(h.settings_file)
    message = str(raised.value)
    assert str(h.settings_file) in message
    for word in words:
        assert word.lower() in message.lower(), message
    result = run_failing(h)
    failures = failure_messages(result)
    assert message in failures


def test_settings_file_with_python_tag_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    file = tmp_path / "settings.yaml"
    file.write_text(f'two_way_sync: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(SettingsError) as raised:
        load_settings(file)
    assert str(file) in str(raised.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Environment variables
# ------------------------------------------------------------------------------------------------
def _env_defs(emulators, tmp_path: Path, monkeypatch, **overrides: str | None):
    monkeypatch.setenv("SYNC_SETTINGS_FILE", str(save_settings(Settings(), tmp_path / "s.yaml")))
    monkeypatch.setenv("SYNC_DUCKDB_PATH", str(tmp_path / "sync.duckdb"))
    monkeypatch.delenv("SYNC_MAPPINGS_DIR", raising=False)
    for name, value in {**emulators.env(), **overrides}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return build_defs(default_resources())


def _run_env_job(defs, job: str = "crm_push_job") -> str:
    """The error text a run gives (config errors raise before the run starts)."""
    with dg.DagsterInstance.ephemeral() as instance:
        try:
            result = defs.resolve_job_def(job).execute_in_process(
                instance=instance, raise_on_error=False
            )
        except dg.DagsterInvalidConfigError as exc:
            return str(exc)
    assert not result.success
    return failure_messages(result)


@pytest.mark.parametrize("variable", ["CRM_TOKEN", "UNLEASHED_API_KEY", "UNLEASHED_BASE_URL"])
def test_unset_environment_variable_is_named(emulators, tmp_path, monkeypatch, variable):
    defs = _env_defs(emulators, tmp_path, monkeypatch, **{variable: None})
    job = "sync_cycle_job" if variable.startswith("UNLEASHED") else "crm_push_job"
    if job == "sync_cycle_job":
        with (
            dg.DagsterInstance.ephemeral() as instance,
            pytest.raises(dg.DagsterInvalidConfigError) as raised,
        ):
            defs.resolve_job_def(job).execute_in_process(
                instance=instance, partition_key=current_partition()
            )
        text = str(raised.value)
    else:
        text = _run_env_job(defs, job)
    assert f'"{variable}"' in text and "not set" in text


@pytest.mark.parametrize(
    "variable, value, words",
    [
        ("UNLEASHED_BASE_URL", "api.unleashedsoftware.com", ["http"]),
        ("UNLEASHED_BASE_URL", "not a url", ["http"]),
        ("CRM_BASE_URL", "ftp://crm.example.com", ["http"]),
        ("UNLEASHED_API_ID", "not-a-guid", ["GUID"]),
        ("CRM_TOKEN", "", ["empty"]),
        ("UNLEASHED_API_KEY", "", ["empty"]),
    ],
)
def test_malformed_environment_variable_is_named_with_the_reason(
    emulators, tmp_path, monkeypatch, variable, value, words
):
    defs = _env_defs(emulators, tmp_path, monkeypatch, **{variable: value})
    job = "crm_push_job" if variable.startswith("CRM") else "sync_cycle_job"
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(job).execute_in_process(
            instance=instance,
            partition_key=current_partition() if job == "sync_cycle_job" else None,
            raise_on_error=False,
        )
    assert not result.success
    text = failure_messages(result)
    assert variable in text, text[:2000]
    for word in words:
        assert word in text, text[:2000]
    if variable.endswith("_URL"):
        assert repr(value) in text  # the operator sees what was wrong
    else:
        assert not value or value not in text  # a credential is never echoed


@pytest.mark.parametrize(
    "variable, ending",
    [("CRM_TOKEN", "\r"), ("CRM_TOKEN", "\n"), ("UNLEASHED_API_KEY", "\r\n"),
     ("UNLEASHED_API_ID", "\r")],
)  # fmt: skip
def test_a_secret_ending_in_a_line_break_is_refused_naming_the_variable_never_the_value(
    emulators, tmp_path, monkeypatch, variable, ending
):
    """An .env file with Windows line endings leaves a \\r on every value: refused before any
    request, the message naming the variable; the value is nowhere in the run's events."""
    secret = emulators.env()[variable]
    defs = _env_defs(emulators, tmp_path, monkeypatch, **{variable: secret + ending})
    job = "crm_push_job" if variable.startswith("CRM") else "sync_cycle_job"
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(job).execute_in_process(
            instance=instance,
            partition_key=current_partition() if job == "sync_cycle_job" else None,
            raise_on_error=False,
        )
        events = "\n".join(repr(entry) for entry in instance.all_logs(result.run_id))
    assert not result.success
    text = failure_messages(result)
    assert f"{variable} contains a line break" in text, text[:3000]
    assert secret not in text and secret not in events


def test_a_sensor_tick_with_a_secret_ending_in_a_line_break_names_only_the_variable(tmp_path):
    from sync_pipeline.defs.automation import crm_change_sensor
    from sync_pipeline.defs.resources import CrmResource, SyncConfigResource, UnleashedResource

    token = f"token-{uuid.uuid4().hex}"
    resources = {
        "crm": CrmResource(base_url="https://crm.test", token=f"{token}\r"),
        "unleashed": UnleashedResource(
            base_url="https://unleashed.test", api_id=str(uuid.uuid4()), api_key="key"
        ),
        "sync_config": SyncConfigResource(
            settings_file=str(save_settings(Settings(), tmp_path / "s.yaml"))
        ),
    }
    with (
        pytest.raises(Exception) as raised,
        dg.build_sensor_context(resources=resources) as context,
    ):
        crm_change_sensor(context)
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    text = "\n".join(chain)
    assert "CRM_TOKEN contains a line break" in text, text
    assert token not in text


@pytest.mark.parametrize(
    "value, problem",
    [
        ("\u201ctoken\u201d", "contains a character other than printable ASCII"),
        (" token", "starts or ends with a space"),
        ("tok\x00en", "contains a character other than printable ASCII"),
    ],
)
def test_a_secret_with_other_stray_characters_is_refused_without_its_value(value, problem):
    from sync_pipeline.defs.resources import CrmResource, ResourceConfigError

    with pytest.raises(ResourceConfigError) as raised:
        CrmResource(base_url="https://crm.test", token=value).get_client()
    assert f"CRM_TOKEN {problem}" in str(raised.value)
    assert "token" not in str(raised.value).replace("CRM_TOKEN", "")
    with pytest.raises(ResourceConfigError) as raised:
        CrmResource(base_url="https://crm.test\r", token="token").get_client()
    assert "CRM_BASE_URL contains a line break" in str(raised.value)
    assert "'https://crm.test\\r'" in str(raised.value)  # not a secret: shown
