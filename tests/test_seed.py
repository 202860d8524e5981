"""The seed world: deterministic, well-formed, and holding every case the sync has to handle.

Kinds are checked from the data itself (an independent matcher below), not from the generator's
own bookkeeping, so a test author can rely on the module docstring of `seed.py`.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import UTC, datetime
from functools import cache
from typing import Any

import phonenumbers
import pytest

from devservers import seed as seed_module
from devservers.prospect_model import ENTITY_SETS
from devservers.seed import BASE_TIME, IMPORT_TIME, World, generate_world
from devservers.unleashed_server import website_problem
from sync_pipeline.clients.crm import ADVANCED_LEDGERS_OPTIONS, UNLEASHED_SYNC_OPTIONS
from sync_pipeline.mapping import load_mappings
from tests.diff_fixtures import MAPPINGS_DIR

# The fields each seeded CRM record carries (the live names; the server fills the rest of its
# type with defaults).
CRM_FIELDS = {
    "Divisions": {
        "DivisionId", "CompanyId", "OperatingCompanyCode", "Name", "PhoneNumber", "Website",
        "AccountManager", "SalesLedgerId", "StatusFlag", "Created", "LastUpdatedTimestamp",
    },
    "Contacts": {
        "ContactId", "DivisionId", "Title", "Forename", "Surname", "Email", "PhoneNumber",
        "MobilePhoneNumber", "Fax", "RoleCode", "StatusFlag", "Created", "LastUpdatedTimestamp",
    },
    "Companies": {
        "CompanyId", "Name", "TypeId", "AccountManagerId", "StatusFlag", "LastUpdatedTimestamp",
    },
    "Users": {"UserCode", "UserName", "EmailAddress", "Obsolete", "AccountManager", "Created"},
    "SalesLedgers": {
        "OperatingCompanyCode", "SalesLedgerId", "CustomerCode", "Name", "DefaultDivisionId",
        "LastUpdatedTimestamp",
    },
    "ContactRoles": {"Code", "Description"},
    "HomeCurrencies": {"OperatingCompanyCode", "Description", "Code"},
    "SystemOptions": {"Option", "Value", "Group", "Description", "Visible"},
}  # fmt: skip
# Sets whose integer key the server generates: the seed numbers them from 1.
INTEGER_KEYED = ("Divisions", "Contacts", "Companies")
HOUSE = "HSE"  # the house user: stands for "no account manager" (AccountManager is NOT NULL)
CONTACT_FIELDS = {
    "Guid", "FirstName", "LastName", "EmailAddress", "PhoneNumber", "MobilePhone", "FaxNumber",
    "OfficePhone",
}  # fmt: skip
KEPT_FIELDS = ("Currency", "Addresses", "Notes", "TaxCode", "PaymentTerm", "DiscountRate")


@cache
def world(companies: int = 50, seed: int = 42) -> World:
    return generate_world(companies=companies, seed=seed)


def _lower(value: str | None) -> str | None:
    return value.lower() if value else None


class Matched:
    """Links found the way the sync finds them: a division by its sales ledger's customer code
    (the division points at the ledger by operating company + ledger id), a contact by email
    (case-insensitive) within the linked company, then by exact first + last name."""

    def __init__(self, w: World) -> None:
        by_code = {c["CustomerCode"]: c for c in w.customers}
        self.customers = {c["Guid"]: c for c in w.customers}
        self.divisions = {d["DivisionId"]: d for d in w.crm["Divisions"]}
        self.crm_contacts = {c["ContactId"]: c for c in w.crm["Contacts"]}
        self.users = {u["UserCode"]: u for u in w.crm["Users"]}
        self.sp_emails = {s["Email"].lower() for s in w.salespersons}
        ledgers = {
            (s["OperatingCompanyCode"], s["SalesLedgerId"]): s for s in w.crm["SalesLedgers"]
        }
        self.companies: dict[str, int] = {}
        for division in w.crm["Divisions"]:
            if division["SalesLedgerId"] is None:
                continue
            ledger = ledgers[(division["OperatingCompanyCode"], division["SalesLedgerId"])]
            guid = by_code[ledger["CustomerCode"]]["Guid"]
            assert guid not in self.companies, f"two divisions for {ledger['CustomerCode']}"
            self.companies[guid] = division["DivisionId"]
        by_division: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for contact in w.crm["Contacts"]:
            by_division[contact["DivisionId"]].append(contact)
        self.by_division = by_division
        self.contacts: dict[str, int] = {}
        self.how: dict[str, str] = {}
        for guid, division_id in self.companies.items():
            free = list(by_division[division_id])
            erp_contacts = self.customers[guid]["Contacts"]
            for by in ("email", "name"):
                for contact in erp_contacts:
                    if contact["Guid"] in self.contacts:
                        continue
                    if by == "email":
                        email = _lower(contact["EmailAddress"])
                        hits = [c for c in free if email and _lower(c["Email"]) == email]
                    else:
                        name = (contact["FirstName"], contact["LastName"])
                        hits = [c for c in free if (c["Forename"], c["Surname"]) == name]
                    assert len(hits) <= 1, f"ambiguous {by} match for {contact}"
                    if hits:
                        free.remove(hits[0])
                        self.contacts[contact["Guid"]] = hits[0]["ContactId"]
                        self.how[contact["Guid"]] = by
        matched_crm = set(self.contacts.values())
        self.crm_only_contacts = [
            c
            for division_id in self.companies.values()
            for c in by_division[division_id]
            if c["ContactId"] not in matched_crm
        ]
        self.erp_only_contacts = [
            c
            for guid in self.companies
            for c in self.customers[guid]["Contacts"]
            if c["Guid"] not in self.contacts
        ]

    def pairs(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return [(self.customers[g], self.divisions[d]) for g, d in self.companies.items()]

    def manager_email(self, division: dict[str, Any]) -> str | None:
        """The account manager's email as the sync reads it (None: the house user, no one)."""
        return self.users[division["AccountManager"]]["EmailAddress"]

    def has_salesperson(self, email: str | None) -> bool:
        return email is not None and email.lower() in self.sp_emails


# --------------------------------------------------------------------------------------------
# Determinism and form
# --------------------------------------------------------------------------------------------
def test_same_seed_gives_the_same_world_and_another_seed_another() -> None:
    assert generate_world(50, 42) == generate_world(50, 42)
    other = generate_world(50, 43)
    assert other != generate_world(50, 42)
    assert {c["Guid"] for c in other.customers}.isdisjoint(
        c["Guid"] for c in generate_world(50, 42).customers
    )


def test_timestamps_are_fixed_aware_utc_and_never_after_the_base_time() -> None:
    w = world()
    stamps = [s["LastModifiedOn"] for s in w.salespersons]
    stamps += [c[k] for c in w.customers for k in ("CreatedOn", "LastModifiedOn")]
    crm_stamps = [
        r[k] for rows in w.crm.values() for r in rows for k in ("Created", "LastUpdatedTimestamp")
        if k in r
    ]  # fmt: skip
    assert len(crm_stamps) > 2 * len(w.crm["Contacts"])
    stamps += crm_stamps
    assert all(isinstance(t, datetime) and t.utcoffset() == UTC.utcoffset(None) for t in stamps)
    assert all(t <= BASE_TIME and t.microsecond % 1000 == 0 for t in stamps)
    assert all(c["CreatedOn"] <= c["LastModifiedOn"] for c in w.customers)
    for r in w.crm["Divisions"] + w.crm["Contacts"]:
        assert r["Created"] <= r["LastUpdatedTimestamp"]
    # Users have no change timestamp (the live User has none: read in full every time).
    assert not any("LastUpdatedTimestamp" in u for u in w.crm["Users"])


def test_keys_are_unique_and_references_resolve() -> None:
    w = world()
    guids = [s["Guid"] for s in w.salespersons] + [c["Guid"] for c in w.customers]
    guids += [k["Guid"] for c in w.customers for k in c["Contacts"]]
    assert len(guids) == len(set(guids))
    guid_re = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    assert all(guid_re.fullmatch(g) for g in guids)
    codes = [c["CustomerCode"] for c in w.customers]
    assert len(codes) == len(set(codes))
    assert all(re.fullmatch(r"[A-Z]{3,4}[0-9]{3,}", code) for code in codes)
    emails = [s["Email"].lower() for s in w.salespersons]
    assert len(emails) == len(set(emails))
    for name, rows in w.crm.items():
        keys = [tuple(r[k] for k in ENTITY_SETS[name].keys) for r in rows]
        assert len(keys) == len(set(keys)), name
        if name in INTEGER_KEYED:
            assert [k for (k,) in keys] == list(range(1, len(rows) + 1)), name
    user_codes = [u["UserCode"] for u in w.crm["Users"]]
    assert all(isinstance(c, str) and len(c) == 3 for c in user_codes), user_codes
    division_ids = {d["DivisionId"] for d in w.crm["Divisions"]}
    company_ids = {c["CompanyId"] for c in w.crm["Companies"]}
    operating = {o["OperatingCompanyCode"] for o in w.crm["HomeCurrencies"]}
    roles = {r["Code"] for r in w.crm["ContactRoles"]}
    ledger_keys = {(s["OperatingCompanyCode"], s["SalesLedgerId"]) for s in w.crm["SalesLedgers"]}
    assert all(c["DivisionId"] in division_ids for c in w.crm["Contacts"])
    assert all(c["RoleCode"] in roles for c in w.crm["Contacts"])
    assert all(d["CompanyId"] in company_ids for d in w.crm["Divisions"])
    assert all(d["OperatingCompanyCode"] in operating for d in w.crm["Divisions"])
    assert all(d["AccountManager"] in user_codes for d in w.crm["Divisions"])
    assert all(c["AccountManagerId"] in user_codes for c in w.crm["Companies"])
    # Each ledger is pointed at by exactly one division, which is also its default division.
    pointed = Counter(
        (d["OperatingCompanyCode"], d["SalesLedgerId"])
        for d in w.crm["Divisions"]
        if d["SalesLedgerId"] is not None
    )
    assert set(pointed) == ledger_keys and set(pointed.values()) == {1}
    by_id = {d["DivisionId"]: d for d in w.crm["Divisions"]}
    for ledger in w.crm["SalesLedgers"]:
        assert by_id[ledger["DefaultDivisionId"]]["SalesLedgerId"] == ledger["SalesLedgerId"]
    ledger_codes = [s["CustomerCode"] for s in w.crm["SalesLedgers"]]
    assert len(ledger_codes) == len(set(ledger_codes)) and set(ledger_codes) <= set(codes)
    for customer in w.customers:
        people = [(k["FirstName"], k["LastName"], k["EmailAddress"]) for k in customer["Contacts"]]
        assert len(people) == len(set(people)), customer["CustomerCode"]


def _edm_ok(prop: Any, value: Any) -> bool:
    if prop.type == "Edm.String":
        return isinstance(value, str) and (prop.max_length is None or len(value) <= prop.max_length)
    if prop.type == "Edm.DateTimeOffset":
        return isinstance(value, datetime)
    if prop.type == "Edm.Byte":
        return value in (0, 1) and not isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool)


@pytest.mark.parametrize("companies, seed", [(50, 42), (50, 7), (1000, 3)])
def test_crm_records_fit_the_served_model(companies: int, seed: int) -> None:
    """Every seeded CRM record is one the live tenant could hold: only properties of its type,
    each of its Edm type and length, and every NOT NULL property the server cannot default."""
    w = world(companies, seed)
    for name, rows in w.crm.items():
        entity = ENTITY_SETS[name]
        needed = {
            f for f, p in entity.props.items() if not p.nullable and p.default is None
            and not p.computed
        }  # fmt: skip
        for r in rows:
            assert set(r) <= set(entity.props), (name, set(r) - set(entity.props))
            assert needed <= {f for f, v in r.items() if v is not None}, (name, r)
            wrong = {
                f: v for f, v in r.items()
                if (v is not None or not entity.props[f].nullable)
                and not _edm_ok(entity.props[f], v)
            }  # fmt: skip
            assert not wrong, (name, wrong)


def test_records_have_the_documented_shapes() -> None:
    w = world()
    assert set(w.crm) == set(CRM_FIELDS)
    for name, fields in CRM_FIELDS.items():
        assert all(set(r) == fields for r in w.crm[name]), name
    # One operating company, and no sign of advanced ledgers or Prospect's own Unleashed sync.
    assert [o["OperatingCompanyCode"] for o in w.crm["HomeCurrencies"]] == ["A"]
    options = {o["Option"] for o in w.crm["SystemOptions"]}
    assert options and not options & {*ADVANCED_LEDGERS_OPTIONS, *UNLEASHED_SYNC_OPTIONS}
    # No custom-field slot holds an Unleashed Guid yet: the sync links by code, email, name.
    assert "DivisionXtras" not in w.crm and "ContactXtras" not in w.crm
    for row in w.crm["Divisions"] + w.crm["Contacts"] + w.crm["Companies"]:
        assert row["StatusFlag"] == "A"
    assert {c["TypeId"] for c in w.crm["Companies"]} == {"CUS"}
    groups = {c["CompanyId"]: c for c in w.crm["Companies"]}
    for division in w.crm["Divisions"]:  # one company group per division, named after it
        group = groups[division["CompanyId"]]
        assert (group["Name"], group["AccountManagerId"]) == (
            division["Name"], division["AccountManager"],
        )  # fmt: skip
    for customer in w.customers:
        assert all(set(k) == CONTACT_FIELDS for k in customer["Contacts"])
        assert all(field in customer for field in KEPT_FIELDS)
        assert customer["Currency"]["CurrencyCode"] in {"GBP", "EUR", "USD"}
    assert sum(s["Obsolete"] for s in w.salespersons) == 1
    active = {s["Guid"]: s for s in w.salespersons if not s["Obsolete"]}
    for customer in w.customers:
        sp = customer["SalesPerson"]
        if sp is not None:
            assert set(sp) == {"Guid", "FullName", "Email"}
            assert sp == {k: active[sp["Guid"]][k] for k in sp}
    assert any(c["SalesPerson"] is None for c in w.customers)
    assert sum(c["Currency"]["CurrencyCode"] == "GBP" for c in w.customers) > 40


def test_the_shipped_mappings_find_what_they_need_in_the_seeded_tenant() -> None:
    """The creation values and the house user the mappings name exist in the seeded tenant, so
    the preflight passes on the local servers as they start."""
    w = world()
    mappings = load_mappings(MAPPINGS_DIR)
    company, contact = mappings["company"], mappings["contact"]
    operating = {o["OperatingCompanyCode"] for o in w.crm["HomeCurrencies"]}
    assert company.crm.create.values["OperatingCompanyCode"] in operating
    role = contact.crm.create.values["RoleCode"]
    assert role in {r["Code"] for r in w.crm["ContactRoles"]}
    assert {c["RoleCode"] for c in w.crm["Contacts"]} == {role}
    blank = company.fields["account_manager"].crm_write.blank
    (house,) = [u for u in w.crm["Users"] if u["UserCode"] == blank]
    assert house["EmailAddress"] is None and house["Obsolete"] == 0


# --------------------------------------------------------------------------------------------
# The variety promised by the seed module's docstring (checked at several seeds)
# --------------------------------------------------------------------------------------------
SEEDS = (42, 1, 7)


@pytest.mark.parametrize("seed", SEEDS)
def test_companies_linked_unlinked_and_obsolete(seed: int) -> None:
    w = world(50, seed)
    m = Matched(w)
    linked = set(m.companies)
    assert m.companies == w.company_links
    erp_only = [c for c in w.customers if c["Guid"] not in linked]
    assert any(not c["Obsolete"] for c in erp_only), "customers awaiting the standard import"
    assert all(c["CreatedOn"] > IMPORT_TIME for c in erp_only if not c["Obsolete"])
    crm_only = set(m.divisions) - set(m.companies.values())
    assert crm_only, "divisions with no sales ledger"
    obsolete = [c for c in w.customers if c["Obsolete"]]
    assert any(c["Guid"] in linked for c in obsolete)
    assert any(c["Guid"] not in linked for c in obsolete)


@pytest.mark.parametrize("seed", SEEDS)
def test_company_fields_differ_in_every_way(seed: int) -> None:
    w = world(50, seed)
    m = Matched(w)
    pairs = m.pairs()
    assert any(c["CustomerName"] != d["Name"] for c, d in pairs)
    phone_format_only = phone_differs = 0
    for customer, division in pairs:
        if customer["PhoneNumber"] == division["PhoneNumber"]:
            continue
        same = _e164(customer["PhoneNumber"]) == _e164(division["PhoneNumber"])
        phone_format_only += same
        phone_differs += not same
    assert phone_format_only and phone_differs
    assert any(c["Website"] != d["Website"] and _site(c["Website"]) == _site(d["Website"])
               for c, d in pairs)  # fmt: skip
    assert any(_site(c["Website"]) != _site(d["Website"]) and not website_problem(d["Website"])
               for c, d in pairs)  # fmt: skip
    # Account managers: a user code; matched to a salesperson by the user's email,
    # case-insensitive. The house user (no email) stands for "no account manager".
    sp_by_email = {s["Email"].lower(): s["Guid"] for s in w.salespersons}
    unmatched = differs = agree_on_none = 0
    for customer, division in pairs:
        email = m.manager_email(division)
        if email is not None and not m.has_salesperson(email):
            unmatched += 1
            continue
        crm_sp = sp_by_email[email.lower()] if email else None
        erp_sp = customer["SalesPerson"]["Guid"] if customer["SalesPerson"] else None
        differs += crm_sp != erp_sp
        agree_on_none += crm_sp is None and erp_sp is None
    assert unmatched, "a CRM account manager with no salesperson"
    assert differs, "account managers that differ"
    assert agree_on_none, "a customer without a salesperson: the house user in the CRM"


@pytest.mark.parametrize("seed", SEEDS)
def test_websites_unleashed_would_refuse_are_in_the_crm_only(seed: int) -> None:
    w = world(50, seed)
    assert all(website_problem(c["Website"]) is None for c in w.customers)
    refused = {d["Website"] for d in w.crm["Divisions"] if website_problem(d["Website"])}
    assert "not a url" in refused and "htp:/broken" in refused
    assert any(re.fullmatch(r"www\.\w+ \.com", site) for site in refused)
    websites = [c["Website"] for c in w.customers] + [d["Website"] for d in w.crm["Divisions"]]
    websites = [s for s in websites if s]
    assert any(s.startswith("www.") for s in websites), "no scheme"
    assert any(s.endswith("/") for s in websites), "trailing slash"
    assert any(s.startswith("http://") for s in websites)
    assert any(s.isupper() for s in websites), "upper case"


def test_phone_formats_and_countries() -> None:
    w = world()
    phones = [c["PhoneNumber"] for c in w.customers]
    phones += [d["PhoneNumber"] for d in w.crm["Divisions"]]
    phones += [k["PhoneNumber"] for c in w.customers for k in c["Contacts"]]
    phones = [p for p in phones if p]
    assert any(p.startswith("+44 ") for p in phones)
    assert any(re.fullmatch(r"0\d{2,4} \d{3,4} \d{3,4}", p) for p in phones)
    assert any(p.startswith("(0") for p in phones)
    assert any(p.startswith("+") and not p.startswith("+44") for p in phones), "non-UK numbers"
    assert all(phonenumbers.is_possible_number(phonenumbers.parse(p, "GB")) for p in phones)


@pytest.mark.parametrize("seed", SEEDS)
def test_contacts_on_one_side_only_and_matched_by_name(seed: int) -> None:
    w = world(50, seed)
    m = Matched(w)
    assert m.contacts == w.contact_links
    assert m.crm_only_contacts, "CRM-only contacts (never created in Unleashed)"
    assert m.erp_only_contacts, "Unleashed-only contacts under linked customers"
    assert "name" in m.how.values()
    erp = {k["Guid"]: k for c in w.customers for k in c["Contacts"]}
    case_only = [
        g
        for g, cid in m.contacts.items()
        if erp[g]["EmailAddress"]
        and erp[g]["EmailAddress"] != m.crm_contacts[cid]["Email"]
        and _lower(erp[g]["EmailAddress"]) == _lower(m.crm_contacts[cid]["Email"])
    ]
    assert case_only, "emails that differ in case only"
    assert any(
        erp[g]["PhoneNumber"] != m.crm_contacts[cid]["PhoneNumber"]
        or erp[g]["MobilePhone"] != m.crm_contacts[cid]["MobilePhoneNumber"]
        for g, cid in m.contacts.items()
    )


def test_one_customer_has_more_contacts_than_a_list_page_carries() -> None:
    w = world()
    m = Matched(w)
    big = [c for c in w.customers if len(c["Contacts"]) > 100]
    assert len(big) == 1 and len(big[0]["Contacts"]) == 130
    assert big[0]["Guid"] in m.companies
    beyond = {k["Guid"] for k in big[0]["Contacts"][100:]}
    assert beyond & {k["Guid"] for k in m.erp_only_contacts}, "a new contact past the 100th"
    assert not [c for c in world(9).customers if len(c["Contacts"]) > 100]


def test_users_with_and_without_a_salesperson() -> None:
    w = world()
    sp_emails = {s["Email"] for s in w.salespersons}
    lower = {e.lower() for e in sp_emails}
    people = [u for u in w.crm["Users"] if u["UserCode"] != HOUSE]
    assert all(u["EmailAddress"] for u in people)
    exact = [u for u in people if u["EmailAddress"] in sp_emails]
    case_only = [
        u for u in people if u["EmailAddress"] not in sp_emails
        and u["EmailAddress"].lower() in lower
    ]  # fmt: skip
    without = [u for u in people if u["EmailAddress"].lower() not in lower]
    assert exact and case_only and without
    names = {s["FullName"] for s in w.salespersons}
    assert any(u["UserName"] in names for u in without), "same name, another email: no match"
    # The obsolete salesperson's user is obsolete too (Obsolete is a 0/1 byte).
    obsolete = {u["UserName"] for u in w.crm["Users"] if u["Obsolete"] == 1}
    assert obsolete == {s["FullName"] for s in w.salespersons if s["Obsolete"]}
    # The house user: no email, active, and the account manager of some divisions.
    (house,) = [u for u in w.crm["Users"] if u["UserCode"] == HOUSE]
    assert house["EmailAddress"] is None and house["Obsolete"] == 0
    assert any(d["AccountManager"] == HOUSE for d in w.crm["Divisions"])


def test_unicode_names() -> None:
    w = world()
    text = " ".join(
        [c["CustomerName"] for c in w.customers]
        + [f"{k['FirstName']} {k['LastName']}" for c in w.customers for k in c["Contacts"]]
        + [f"{k['Forename']} {k['Surname']}" for k in w.crm["Contacts"]]
    )
    for ch in "éøß’":
        assert ch in text, ch
    emails = [k["EmailAddress"] for c in w.customers for k in c["Contacts"] if k["EmailAddress"]]
    assert all(e.isascii() for e in emails)


def test_differences_are_a_modest_share_and_show_in_timestamps() -> None:
    w = world(1000, 42)
    m = Matched(w)
    differing = 0
    for customer, division in m.pairs():
        differs = (
            customer["CustomerName"] != division["Name"]
            or customer["PhoneNumber"] != division["PhoneNumber"]
            or customer["Website"] != division["Website"]
        )
        differing += differs
        if differs:  # someone edited a side after the standard import copied it
            assert max(customer["LastModifiedOn"], division["LastUpdatedTimestamp"]) > IMPORT_TIME
    assert 0.05 < differing / len(m.companies) < 0.3


# --------------------------------------------------------------------------------------------
# Summary and scale
# --------------------------------------------------------------------------------------------
def test_summary_counts() -> None:
    w = world()
    s = w.summary()
    assert s["customers"] == 50 and s["salespersons_obsolete"] == 1
    assert (
        s["crm_divisions"]
        == len(w.crm["Divisions"])
        == s["linked_companies"] + len(w.variety["crm_only_divisions"])
    )
    assert s["crm_sales_ledgers"] == len(w.crm["SalesLedgers"]) == s["linked_companies"]
    assert s["crm_users"] == len(w.crm["Users"])
    assert s["crm_operating_companies"] == len(w.crm["HomeCurrencies"]) == 1
    assert s["max_contacts_per_customer"] == 130
    assert s["unleashed_contacts"] == sum(len(c["Contacts"]) for c in w.customers)
    assert all(isinstance(v, int) for v in s.values())


def test_the_documented_example_counts_are_the_generated_ones() -> None:
    """The module docstring's example (N=50, seed=42) is what a test author plans with."""
    doc = " ".join(seed_module.__doc__.split())
    example = re.search(r"At N=50, seed=42 \(`World.summary\(\)`\): (.*?)\.\s", doc)
    assert example, "the docstring's example summary"
    said = {
        name.strip(): int(n)
        for n, name in re.findall(r"(\d+) ([a-zA-Z ]+?)(?=[,;()]|$)", example[1])
    }
    s = world().summary()
    generated = {
        "customers": s["customers"], "obsolete": s["customers_obsolete"],
        "salespersons": s["salespersons"],
        "Unleashed contacts": s["unleashed_contacts"], "divisions": s["crm_divisions"],
        "sales ledgers": s["crm_sales_ledgers"], "CRM contacts": s["crm_contacts"],
        "users": s["crm_users"],
    }  # fmt: skip
    assert said == generated


@pytest.mark.parametrize("companies", [0, 1, 2, 5, 10])
def test_small_worlds(companies: int) -> None:
    w = generate_world(companies)
    assert len(w.customers) == companies
    Matched(w)  # well-formed and unambiguous


def test_large_world() -> None:
    w = world(20_000, 42)
    s = w.summary()
    assert s["customers"] == 20_000
    assert 50_000 < s["unleashed_contacts"] < 70_000
    assert len({c["CustomerCode"] for c in w.customers}) == 20_000
    counts = Counter(d["Website"] for d in w.crm["Divisions"] if website_problem(d["Website"]))
    assert counts, "refused websites scale with size"
    assert 400 < s["unleashed_only_customers"] < 1200


# --------------------------------------------------------------------------------------------
def _e164(phone: str | None) -> str | None:
    if not phone:
        return None
    number = phonenumbers.parse(phone, "GB")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _site(url: str | None) -> str | None:
    if not url:
        return None
    bare = url.lower().split("://", 1)[-1]
    return bare.rstrip("/")
