"""Deterministic seed data for both local servers: one Unleashed account and one Prospect CRM tenant
that the standard import once kept as a copy of Unleashed, after which both sides drifted.

`generate_world(companies=N, seed=S)` is pure: the same arguments give the same world, and nothing
reads the clock (timestamps are offsets from `BASE_TIME`, 2026-01-05T09:00Z, to the millisecond;
the last standard import ran at `IMPORT_TIME`, seven days earlier). `companies` is the number of
Unleashed customers. Empty values are `None` on both sides. Every kind below is present at
companies=50 (checked at several seeds by tests/test_seed.py); rates are of the records the kind
applies to, so the figures scale with N. At N=50, seed=42 (`World.summary()`): 50 customers
(2 obsolete), 6 salespersons, 252 Unleashed contacts; 49 divisions, 47 sales ledgers, 250 CRM
contacts, 9 users.

Unleashed (`World.salespersons`, `World.customers`):
- salespersons: max(6, N/8) capped at 60, exactly one `Obsolete`; emails unique and lower case.
- customers: unique `CustomerCode` (`[A-Z]{3,4}[0-9]{3,}`, e.g. `CAFE001`), ~8% outside the UK
  (Ireland, Germany, France, Netherlands, USA; EUR/USD), addresses, currency, tax, payment term,
  notes and other fields a full-replace update must keep; `SalesPerson` (`{Guid, FullName,
  Email}`) is an active salesperson with a CRM user, or `None` (~12%); websites are always valid
  absolute http(s) URLs (some `http://`, trailing `/`, upper case) or `None`; ~4% (at least 2)
  are `Obsolete`.
- contacts: 1-5 per customer, and one customer with 130 (when N >= 10); first+last name is unique
  within a customer (CRM-only contacts included); ~6% have no email address.

CRM (`World.crm`, keyed by entity set, in the live model of `prospect_model`; integer keys from
1, user codes of three characters; no custom-field slot holds an Unleashed Guid, so the sync must
link divisions by their sales ledger's `CustomerCode` and contacts by email, then name):
- one company group (`Companies`, `TypeId` `CUS`), one division and one sales ledger
  (`SalesLedgerId` `SL00001`…, `CustomerCode` = the Unleashed `CustomerCode`, pointed at by the
  division's `OperatingCompanyCode` + `SalesLedgerId`) per linked customer;
  ~4% of customers (at least 1) exist only in Unleashed, created after the import (the standard
  import will create them); obsolete customers are split between linked and Unleashed-only.
- ~4% extra divisions (at least 1) with no sales ledger (CRM-only, unlinked), with contacts.
- users: one per salesperson (~20%, at least one, differ in email case only; the obsolete
  salesperson's user is `Obsolete`; one salesperson's user has the same name but another email,
  so it matches nobody) plus users with no salesperson (`Tom Fletcher` is an account manager),
  plus the house account `HSE` (no email address): the account manager of a division whose
  customer has no salesperson (the CRM column cannot be empty).
- contacts carry `RoleCode` `DECISN` (one of the tenant's `ContactRoles`).
- `HomeCurrencies`: one operating company (`A`); `SystemOptions`: a few unrelated options.

Drift between linked records (the side that changed was modified after `IMPORT_TIME`):
- company: the same phone number in another format (~4%: `+44 20 7946 0123`, `020 7946 0123`,
  `(020) 7946-0123`, `02079460123`, `0044 ...`), a different number (~2%), the same website
  written differently in the CRM (~4%, at least 3: no scheme, upper case, trailing slash — as
  typed, the scheme-less ones are values Unleashed would refuse), a different website (~1.5%),
  a website Unleashed would refuse in the CRM only (~1.5%, at least 3: `www.x .com`,
  `not a url`, `htp:/broken`, then `http://x`, ...), a different name (~2%), a different
  account manager (~2%, either side), an account manager with no salesperson (~1.5%, at least 1).
- contacts: email in different case (~3%), matchable only by first+last name because the email
  is missing or differs (~3% plus those with no email), phone in another format (~4%), a different
  phone or mobile (~3%), Unleashed-only contacts to create in the CRM (~4%, plus one beyond the
  100th contact of the big customer), CRM-only contacts never to create in Unleashed (~4%).
- unicode names (é, ø, ß, ü, ’ ...; about one name part in sixteen); emails are ASCII.

`World.variety` lists the ids planted for each kind (keys as in `VARIETY_KINDS`), and
`World.company_links` / `World.contact_links` give the links a correct matcher should find.
"""

from __future__ import annotations

import random
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

BASE_TIME = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
# The tenant's house account: the account manager of a company that has none (the CRM column
# is NOT NULL). It has no email address, so the sync reads it as "no account manager".
HOUSE_ACCOUNT = "HSE"
CONTACT_ROLE = "DECISN"  # the role the seeded contacts carry, and the one the sync creates with
_CONTACT_ROLES = (
    {"Code": "DECISN", "Description": "Decision maker"},
    {"Code": "ACCNTS", "Description": "Accounts"},
    {"Code": "OTHER", "Description": "Other"},
)
_SYSTEM_OPTIONS = (
    {
        "Option": "DateFormat",
        "Value": "dd/MM/yyyy",
        "Group": "General",
        "Description": "Date format",
        "Visible": 1,
    },
    {
        "Option": "DefaultCountry",
        "Value": "United Kingdom",
        "Group": "General",
        "Description": "Default country",
        "Visible": 1,
    },
)
IMPORT_TIME = BASE_TIME - timedelta(days=7)

VARIETY_KINDS = (
    "unleashed_only_customers",  # customer Guids with no CRM division yet
    "crm_only_divisions",  # DivisionIds with no sales ledger
    "obsolete_customers_linked",  # customer Guids
    "obsolete_customers_unlinked",  # customer Guids
    "big_customers",  # customer Guids with more than 100 contacts
    "company_phone_format_only",  # DivisionIds: same number, another format
    "company_phone_differs",  # DivisionIds
    "company_website_format_only",  # DivisionIds
    "company_website_differs",  # DivisionIds
    "company_website_invalid_in_crm",  # DivisionIds
    "company_name_differs",  # DivisionIds
    "account_manager_differs",  # DivisionIds: another user that has a salesperson
    "account_manager_unmatched",  # DivisionIds whose account manager has no salesperson
    "users_without_salesperson",  # UserCodes
    "users_email_case_differs",  # UserCodes matching a salesperson only case-insensitively
    "salespersons_without_user",  # salesperson Guids
    "contact_email_case_differs",  # Unleashed contact Guids
    "contacts_matched_by_name_only",  # Unleashed contact Guids
    "contact_phone_format_only",  # Unleashed contact Guids
    "contact_phone_differs",  # Unleashed contact Guids (phone or mobile)
    "unleashed_only_contacts",  # Unleashed contact Guids under linked customers
    "crm_only_contacts",  # ContactIds under linked divisions
    "unicode_names",  # customer Guids and Unleashed contact Guids with non-ASCII names
)


@dataclass
class World:
    """Seed data for both servers; see the module docstring for what it contains."""

    salespersons: list[dict[str, Any]]
    customers: list[dict[str, Any]]
    crm: dict[str, list[dict[str, Any]]]
    variety: dict[str, list[Any]] = field(default_factory=dict)
    company_links: dict[str, int] = field(default_factory=dict)  # customer Guid -> DivisionId
    contact_links: dict[str, int] = field(default_factory=dict)  # contact Guid -> ContactId

    def summary(self) -> dict[str, int]:
        """Counts per kind: records on each side, then each planted variety."""
        contacts_per_customer = [len(c["Contacts"]) for c in self.customers]
        counts = {
            "salespersons": len(self.salespersons),
            "salespersons_obsolete": sum(1 for s in self.salespersons if s["Obsolete"]),
            "customers": len(self.customers),
            "customers_obsolete": sum(1 for c in self.customers if c["Obsolete"]),
            "unleashed_contacts": sum(contacts_per_customer),
            "max_contacts_per_customer": max(contacts_per_customer, default=0),
            "crm_divisions": len(self.crm["Divisions"]),
            "crm_contacts": len(self.crm["Contacts"]),
            "crm_users": len(self.crm["Users"]),
            "crm_sales_ledgers": len(self.crm["SalesLedgers"]),
            "crm_operating_companies": len(self.crm["HomeCurrencies"]),
            "linked_companies": len(self.company_links),
            "linked_contacts": len(self.contact_links),
        }
        counts.update({kind: len(ids) for kind, ids in self.variety.items()})
        return counts


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    return tuple(text.split(sep))


# --------------------------------------------------------------------------------------------
# Built-in name lists (no Faker: small lists are enough and keep generation fast)
# --------------------------------------------------------------------------------------------
_FEMALE = _words(
    "Olivia Amelia Isla Ava Emily Sophie Grace Lily Freya Ella Charlotte Hannah Priya Aisha Sarah "
    "Rachel Laura Fiona Niamh Siobhán Chloé Zoë Renée Ingrid Astrid Mette Anaïs Mei Fatima Joanna "
    "Claire Helen Ruth Megan Katie"
)
_MALE = _words(
    "Oliver George Harry Jack Noah Leo Oscar Charlie Thomas James William Daniel Mohammed Arjun "
    "Tom David Michael Peter Stephen Liam Ciarán Søren Bjørn José François Jürgen Luca Kenji Omar "
    "Rhys Gareth Callum Finlay Ewan Dominic"
)
_SURNAMES = _words(
    "Smith Jones Taylor Brown Williams Wilson Johnson Davies Robinson Wright Thompson Evans Walker "
    "White Roberts Green Hall Wood Jackson Clarke Patel Khan Lewis Harris Martin Cooper Hughes "
    "Edwards Turner Hill Moore Ward Morris King Baker Price Bennett Gray Fletcher Shah Chen Nowak "
    "Kowalski Müller Strauß Weiß Ødegaard Jørgensen Håkansson Lefèvre Moreau Núñez O’Brien O’Neill "
    "D’Souza MacDonald McAllister Fitzgerald Murphy Kelly Byrne Campbell Stewart Reid Morgan Lloyd "
    "Pryce Okafor Adeyemi Nakamura Rossi Bianchi Ferreira Santos Novak"
)
# Accented names (é, ø, ß, ’ ...) are drawn about one time in sixteen: a mostly British base.
_FIRST = {
    (female, accented): [n for n in (_FEMALE if female else _MALE) if n.isascii() != accented]
    for female in (True, False)
    for accented in (True, False)
}
_LAST = {accented: [n for n in _SURNAMES if n.isascii() != accented] for accented in (True, False)}
_COMPANY_WORDS = _words(
    "Northern Apex Summit Harbour Meridian Oakwood Riverside Highland Crown Anchor Beacon Granite "
    "Silverline Bluebell Kestrel Falcon Heron Thistle Ivy Orchard Millstone Ironbridge Pennine "
    "Cotswold Severn Thames Mersey Tyne Clyde Atlas Pioneer Sterling Regent Vanguard Evergreen "
    "Copperfield Ashford Brightwater Lakeside Westgate Eastbrook Kingsway Foxglove Hawthorn"
)
_TRADES = _words(
    "Engineering|Supplies|Packaging|Foods|Logistics|Hardware|Interiors|Electrical|Plumbing|"
    "Print|Textiles|Trading|Building Supplies|Garden Centre|Pharmacy|Bakery|Brewing Co|Coffee|"
    "Outdoor|Cycles|Marine|Farm Supplies|Office Supplies|Laboratories|Tools|Furniture|Hotels",
    sep="|",
)
_UK_SUFFIXES = ("Ltd", "Ltd", "Ltd", "Limited", "plc", "LLP", "& Co", "Group Ltd", "(UK) Ltd")
_FORCED_NAMES = (  # the first customers, so every special character is present at any size
    "Café Lumière Ltd",
    "Brøndby Marine Ltd",
    "Großmann & Weiß Tools Ltd",
    "O’Sullivan’s Bakery",
)

# (city, region, postcode prefixes, (area, subscriber template)) in the UK; abroad also the
# country, (code, trunk, area, template), currency, TLD. UK numbers are in the ranges Ofcom
# reserves for drama; US numbers use 555-01xx.
_PLACES_UK = (
    ("London", "Greater London", ("EC1A", "SE1", "N1", "W1D", "E14"), ("20", ("7946", "0###"))),
    ("Leeds", "West Yorkshire", ("LS1", "LS2", "LS11"), ("113", ("496", "0###"))),
    ("Sheffield", "South Yorkshire", ("S1", "S3", "S10"), ("114", ("496", "0###"))),
    ("Nottingham", "Nottinghamshire", ("NG1", "NG7"), ("115", ("496", "0###"))),
    ("Bristol", "Bristol", ("BS1", "BS8"), ("117", ("496", "0###"))),
    ("Reading", "Berkshire", ("RG1", "RG2"), ("118", ("496", "0###"))),
    ("Manchester", "Greater Manchester", ("M1", "M4", "M15"), ("161", ("496", "0###"))),
    ("Birmingham", "West Midlands", ("B1", "B5", "B15"), ("121", ("496", "0###"))),
    ("Glasgow", "Glasgow City", ("G1", "G2"), ("141", ("496", "0###"))),
    ("Edinburgh", "City of Edinburgh", ("EH1", "EH3"), ("131", ("496", "0###"))),
    ("Cardiff", "South Glamorgan", ("CF10", "CF11"), ("29", ("2018", "0###"))),
    ("Belfast", "County Antrim", ("BT1", "BT2"), ("28", ("9018", "0###"))),
)
_PLACES_ABROAD = (
    ("Dublin", "Leinster", "Ireland", "D02 ###", ("353", "0", "1", ("555", "0###")), "EUR", ".ie"),
    ("Berlin", "Berlin", "Germany", "10###", ("49", "0", "30", ("9018", "####")), "EUR", ".de"),
    (
        "Paris",
        "Île-de-France",
        "France",
        "750##",
        ("33", "0", "1", ("42", "68", "##", "##")),
        "EUR",
        ".fr",
    ),  # fmt: skip
    (
        "Amsterdam",
        "Noord-Holland",
        "Netherlands",
        "1012 ##",
        ("31", "0", "20", ("555", "0###")),
        "EUR",
        ".nl",
    ),  # fmt: skip
    ("New York", "NY", "United States", "100##", ("1", "", "212", ("555", "01##")), "USD", ".com"),
)
_STREETS = _words(
    "High Street|Station Road|Church Lane|Mill Lane|Victoria Road|King Street|Queen Street|"
    "Park Road|Albert Road|Bridge Street|Market Place|Canal Wharf|Enterprise Way|Riverside Drive",
    sep="|",
)
_INVALID_WEBSITES = (
    "www.{slug} .com",
    "not a url",
    "htp:/broken",
    "http://{slug}",
    "{slug}.co.uk / shop",
    "https://www.{slug}..co.uk",
)
_CURRENCY_NAMES = {"GBP": "United Kingdom, Pounds", "EUR": "Euro Member Countries, Euro",
                   "USD": "United States of America, Dollars"}  # fmt: skip
_PAYMENT_TERMS = ("30 days", "30 days", "20th Month following", "14 days", "7 days", "60 days")
_TENANTS = (
    ("Northwind Supplies Ltd", "northwind-supplies.co.uk"),
    ("Kingfisher Wholesale Ltd", "kingfisher-wholesale.co.uk"),
    ("Bramble & Finch Distribution Ltd", "bramblefinch.co.uk"),
)
_STAFF_WITHOUT_SALESPERSON = (
    ("Tom Fletcher", "Account Manager"),
    ("Office Admin", None),
    ("Hannah Ødegaard", "Customer Services"),
    ("Rob Finance", None),
)

_ASCII_FOLD = str.maketrans({"ø": "o", "Ø": "O", "ß": "ss", "æ": "ae", "Æ": "AE", "’": "", "'": ""})


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text.translate(_ASCII_FOLD))
    return folded.encode("ascii", "ignore").decode()


def _slug(text: str) -> str:
    return "".join(ch for ch in _ascii(text).lower() if ch.isalnum())


def _ms(dt: datetime) -> datetime:
    """Millisecond precision: both APIs carry milliseconds only."""
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


# --------------------------------------------------------------------------------------------
# Phone numbers: one number, many spellings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Phone:
    cc: str  # country calling code, "44"
    trunk: str  # national prefix, "0" ("" in the US)
    area: str  # "20"
    parts: tuple[str, ...]  # subscriber number groups, ("7946", "0123")

    def format(self, style: str) -> str:
        sub, area, national_area = " ".join(self.parts), self.area, self.trunk + self.area
        if style == "intl":
            return f"+{self.cc} {area} {sub}"
        if style == "national":
            if self.cc == "1":
                return f"({area}) {self.parts[0]}-{''.join(self.parts[1:])}"
            return f"{national_area} {sub}"
        if style == "paren":
            return f"({national_area}) {'-'.join(self.parts)}"
        if style == "compact":
            return f"{national_area}{''.join(self.parts)}"
        if style == "compact_intl":
            return f"+{self.cc}{area}{''.join(self.parts)}"
        if style == "00":
            return f"00{self.cc} {area} {sub}"
        raise ValueError(style)


_STYLES = ("intl", "national", "paren", "compact", "compact_intl", "00")


def _fill(rng: random.Random, template: str) -> str:
    """Replace each `#` with a random digit."""
    k = template.count("#")
    if not k:
        return template
    digits = iter(f"{rng.randrange(10**k):0{k}d}")
    return "".join(next(digits) if ch == "#" else ch for ch in template)


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, companies: int, seed: int) -> None:
        self.n = companies
        self.rng = random.Random(seed)
        self.variety: dict[str, list[Any]] = {kind: [] for kind in VARIETY_KINDS}
        self.company_links: dict[str, int] = {}
        self.contact_links: dict[str, int] = {}
        self.salespersons: list[dict[str, Any]] = []
        self.customers: list[dict[str, Any]] = []
        self.divisions: list[dict[str, Any]] = []
        self.crm_contacts: list[dict[str, Any]] = []
        self.users: list[dict[str, Any]] = []
        self.ledgers: list[dict[str, Any]] = []
        self.companies: list[dict[str, Any]] = []
        self.codes: dict[str, int] = {}
        self.names: set[str] = set()
        self.tenant_name, self.tenant_domain = self.rng.choice(_TENANTS)

    # ---- small helpers ------------------------------------------------------------------------
    def guid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def pick(self, population: int, rate: float, minimum: int = 1) -> set[int]:
        """Indices of a planted kind: about `rate` of the population, at least `minimum`."""
        if population <= 0:
            return set()
        k = min(population, max(minimum, round(rate * population)))
        return set(self.rng.sample(range(population), k))

    def pick_among(self, candidates: list[int], expected: float, minimum: int = 1) -> set[int]:
        """About `expected` of `candidates` (at least `minimum`, if there are any)."""
        chosen = self.pick(len(candidates), expected / max(1, len(candidates)), minimum)
        return {candidates[j] for j in chosen}

    def before_import(self, earliest: datetime) -> datetime:
        span = max(1.0, (IMPORT_TIME - earliest).total_seconds())
        return _ms(earliest + timedelta(seconds=self.rng.uniform(0, span)))

    def after_import(self) -> datetime:
        span = (BASE_TIME - IMPORT_TIME).total_seconds()
        return _ms(IMPORT_TIME + timedelta(seconds=self.rng.uniform(60, span - 60)))

    def phone(self, place: tuple[str, str, str, tuple[str, ...]]) -> _Phone:
        cc, trunk, area, template = place
        return _Phone(cc, trunk, area, tuple(_fill(self.rng, t) for t in template))

    def other_phone(self, place: tuple[str, str, str, tuple[str, ...]], old: _Phone) -> _Phone:
        while (new := self.phone(place)) == old:
            pass
        return new

    def mobile(self) -> _Phone:
        return _Phone("44", "0", "7700", ("900", _fill(self.rng, "###")))

    def other_style(self, style: str) -> str:
        return self.rng.choice([s for s in _STYLES if s != style])

    def person_name(self, taken: set[tuple[str, str]]) -> tuple[str, str, str]:
        """(title, first, last), unique within `taken`."""
        while True:
            rng = self.rng
            female = rng.random() < 0.5
            first = rng.choice(_FIRST[female, rng.random() < 0.06])
            last = rng.choice(_LAST[rng.random() < 0.06])
            if (first, last) not in taken:
                taken.add((first, last))
                title = self.rng.choice(("Ms", "Mrs", "Miss", "Dr") if female else ("Mr", "Dr"))
                return (title if self.rng.random() < 0.8 else None), first, last

    def company_name(self, index: int, foreign: str | None) -> str:
        if 0 <= index < len(_FORCED_NAMES):
            name = _FORCED_NAMES[index]
        else:
            rng = self.rng
            style = rng.random()
            if style < 0.45:
                name = f"{rng.choice(_COMPANY_WORDS)} {rng.choice(_TRADES)}"
            elif style < 0.75:
                name = f"{rng.choice(_SURNAMES)} & {rng.choice(_SURNAMES)}"
            else:
                name = f"{rng.choice(_SURNAMES)} {rng.choice(_TRADES)}"
            suffix = {"Germany": "GmbH", "France": "SARL", "Netherlands": "B.V.",
                      "United States": "Inc.", "Ireland": "Ltd"}.get(foreign or "")  # fmt: skip
            name = f"{name} {suffix or rng.choice(_UK_SUFFIXES)}"
        base, n = name, 2
        while name in self.names:
            name = f"{base} ({n})"
            n += 1
        self.names.add(name)
        return name

    def customer_code(self, name: str) -> str:
        words = [w for w in _ascii(name).upper().split() if w not in {"THE", "&"}]
        prefix = "".join(ch for ch in "".join(words) if ch.isalpha())[:4].ljust(3, "X")
        self.codes[prefix] = self.codes.get(prefix, 0) + 1
        return f"{prefix}{self.codes[prefix]:03d}"

    @staticmethod
    def renamed(name: str, rng: random.Random) -> str:
        for old, new in ((" Ltd", " Limited"), (" Limited", " Ltd"), (" & ", " and ")):
            if old in name and rng.random() < 0.5:
                return name.replace(old, new, 1)
        head, _, suffix = name.split(" (")[0].rpartition(" ")
        word = rng.choice(("Group", "Holdings", "International"))
        return f"{head} {word} {suffix}" if head else f"{suffix} {word}"

    # ---- people ------------------------------------------------------------------------------
    def build_staff(self) -> None:
        rng = self.rng
        n_sp = min(60, max(6, self.n // 8))
        taken: set[tuple[str, str]] = set()
        for i in range(n_sp):
            _, first, last = self.person_name(taken)
            email = f"{_ascii(first).lower()}.{_ascii(last).lower()}@{self.tenant_domain}"
            self.salespersons.append(
                {
                    "Guid": self.guid(),
                    "FullName": f"{first} {last}",
                    "Email": email,
                    "Obsolete": i == n_sp - 1,
                    "LastModifiedOn": _ms(BASE_TIME - timedelta(days=rng.uniform(30, 900))),
                }
            )
        # Users: one per salesperson; a few differ in email case, one has another email entirely.
        no_user = 0  # this salesperson's user has the same name but another email address
        case_differs = self.pick(n_sp - 1, 0.2) - {no_user}
        case_differs = case_differs or {1}
        for i, sp in enumerate(self.salespersons):
            email = sp["Email"]
            if i == no_user:
                first, last = sp["FullName"].split(" ", 1)
                email = f"{_ascii(first)[0].lower()}{_ascii(last).lower()}@{self.tenant_domain}"
            elif i in case_differs:
                local, domain = email.split("@")
                email = f"{local.title()}@{domain}"
            user = self.add_user(sp["FullName"], email, active=not sp["Obsolete"])
            sp["_user"] = None if i == no_user else user["UserCode"]
            if i == no_user:
                self.variety["salespersons_without_user"].append(sp["Guid"])
                self.variety["users_without_salesperson"].append(user["UserCode"])
            elif i in case_differs:
                self.variety["users_email_case_differs"].append(user["UserCode"])
        extra = max(2, n_sp // 5)
        self.unmatched_manager_ids: list[str] = []
        for i in range(extra):
            name, role = _STAFF_WITHOUT_SALESPERSON[i % len(_STAFF_WITHOUT_SALESPERSON)]
            if i >= len(_STAFF_WITHOUT_SALESPERSON):
                _, first, last = self.person_name(taken)
                name, role = f"{first} {last}", "Account Manager"
            local = ".".join(_slug(part) for part in name.split())
            user = self.add_user(name, f"{local}@{self.tenant_domain}", active=True)
            self.variety["users_without_salesperson"].append(user["UserCode"])
            if role == "Account Manager":
                self.unmatched_manager_ids.append(user["UserCode"])
        self.users.append(
            {"UserCode": HOUSE_ACCOUNT, "UserName": "House account", "EmailAddress": None,
             "Obsolete": 0, "AccountManager": 1, "Created": _ms(BASE_TIME - timedelta(days=900))}
        )  # fmt: skip
        # Salespersons customers can have: active, and with a CRM user (the one whose user has
        # another email keeps no customers, so the unmatched account managers stay few).
        self.unmatched_users = set(self.variety["users_without_salesperson"])
        self.active_sps = [sp for sp in self.salespersons if sp["_user"] and not sp["Obsolete"]]

    def add_user(self, name: str, email: str | None, *, active: bool) -> dict[str, Any]:
        """A CRM user; its code is the initials and a number, three characters, unique."""
        initials = "".join(_ascii(part)[0].upper() for part in name.split()[:2])
        taken = {u["UserCode"] for u in self.users}
        code = next(c for c in (f"{initials}{n}"[:3] for n in range(1, 100)) if c not in taken)
        user = {
            "UserCode": code,
            "UserName": name,
            "EmailAddress": email,
            "Obsolete": 0 if active else 1,
            "AccountManager": 1,
            "Created": _ms(BASE_TIME - timedelta(days=self.rng.uniform(20, 700))),
        }
        self.users.append(user)
        return user

    # ---- Unleashed customers -----------------------------------------------------------------
    def build_customers(self) -> None:
        rng, n = self.rng, self.n
        foreign = self.pick(n, 0.08, minimum=0 if n < 10 else 1)
        obsolete = self.pick(n, 0.04, minimum=2 if n >= 4 else 0)
        # Half of the obsolete customers are linked; the rest of the Unleashed-only ones are new.
        obsolete_unlinked = set(sorted(obsolete)[::2])
        others = [i for i in range(n) if i not in obsolete]
        new_ones = self.pick_among(others, 0.04 * n)
        unlinked = obsolete_unlinked | new_ones
        linked = [i for i in range(n) if i not in unlinked]
        live_linked = [i for i in linked if i not in obsolete]
        self.big_index = rng.choice(live_linked) if n >= 10 and live_linked else None
        for i in range(n):
            place_abroad = rng.choice(_PLACES_ABROAD) if i in foreign else None
            customer = self.customer(i, place_abroad, new=i in new_ones)
            customer["Obsolete"] = i in obsolete
            self.customers.append(customer)
            if i in obsolete:
                kind = "unlinked" if i in unlinked else "linked"
                self.variety[f"obsolete_customers_{kind}"].append(customer["Guid"])
            if i in new_ones:
                self.variety["unleashed_only_customers"].append(customer["Guid"])
        self.linked_indices = linked

    def customer(self, i: int, abroad: tuple[Any, ...] | None, *, new: bool) -> dict[str, Any]:
        rng = self.rng
        if abroad:
            city, region, country, postcode, phone_place, currency, tld = abroad
            postcode = _fill(rng, postcode)
        else:
            city, region, prefixes, (area, template) = rng.choice(_PLACES_UK)
            country, currency, tld = (
                "United Kingdom",
                "GBP",
                rng.choice((".co.uk",) * 3 + (".com",)),
            )
            postcode = f"{rng.choice(prefixes)} {rng.randrange(1, 10)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"  # noqa: E501
            phone_place = ("44", "0", area, template)
        name = self.company_name(i, country if abroad else None)
        slug = _slug(name.split(" (")[0].rsplit(" ", 1)[0]) or "company"
        domain = f"{slug[:24]}{tld}"
        phone = self.phone(phone_place)
        style = rng.choice(("national", "national", "intl")) if not abroad else "intl"
        created = (
            self.after_import() if new else _ms(IMPORT_TIME - timedelta(days=rng.uniform(1, 2000)))
        )
        website = rng.choices(
            (
                f"https://www.{domain}",
                f"http://{domain}",
                f"https://{domain}/",
                f"https://www.{domain}/shop",
                f"HTTPS://WWW.{domain.upper()}",
                None,
            ),
            (50, 12, 10, 5, 3, 20),
        )[0]
        sp = rng.choice(self.active_sps) if rng.random() > 0.12 else None
        guid = self.guid()
        return {
            "Guid": guid,
            "CustomerCode": self.customer_code(name),
            "CustomerName": name,
            "PhoneNumber": phone.format(style),
            "Website": website,
            "Email": f"{rng.choice(('accounts', 'sales', 'info', 'orders'))}@{domain}",
            "Obsolete": False,
            "SalesPerson": (
                {"Guid": sp["Guid"], "FullName": sp["FullName"], "Email": sp["Email"]}
                if sp
                else None
            ),
            "Currency": {"CurrencyCode": currency, "Description": _CURRENCY_NAMES[currency]},
            "Addresses": [
                {
                    "AddressType": kind,
                    "AddressName": kind,
                    "StreetAddress": f"{rng.randrange(1, 250)} {rng.choice(_STREETS)}",
                    "StreetAddress2": None
                    if rng.random() < 0.7
                    else f"Unit {rng.randrange(1, 40)}",
                    "Suburb": None,
                    "City": city,
                    "Region": region,
                    "Country": country,
                    "PostalCode": postcode,
                    "IsDefault": True,
                }
                for kind in ("Postal", "Physical")
            ],
            "TaxCode": "VAT 20%" if currency == "GBP" else "Zero Rated",
            "TaxRate": 0.2 if currency == "GBP" else 0.0,
            "GSTVATNumber": f"GB{_fill(rng, '#########')}" if currency == "GBP" else None,
            "PaymentTerm": rng.choice(_PAYMENT_TERMS),
            "DiscountRate": rng.choice((0.0, 0.0, 0.0, 0.025, 0.05, 0.1)),
            "CreditLimit": float(rng.choice((0, 1000, 2500, 5000, 10000, 25000))),
            "StopCredit": rng.random() < 0.03,
            "CustomerType": rng.choice(("Trade", "Trade", "Retail", "Distributor")),
            "SellPriceTier": rng.choice(("", "Sell Price Tier 1", "Sell Price Tier 2")),
            "Notes": rng.choice(
                (
                    None,
                    None,
                    "Deliveries before 10am only.",
                    "PO number required on invoices.",
                    "Goods in via rear entrance.",
                    "Statement by email monthly.",
                )
            ),  # fmt: skip
            "CreatedOn": created,
            "LastModifiedOn": self.before_import(created) if not new else created,
            "Contacts": [],
            # Generation-only state, removed before the world is returned.
            "_phone": phone,
            "_phone_style": style,
            "_place": phone_place,
            "_domain": domain,
            "_slug": slug,
        }

    def unleashed_contacts(
        self, customer: dict[str, Any], count: int, taken: set[tuple[str, str]]
    ) -> None:
        rng = self.rng
        for _ in range(count):
            title, first, last = self.person_name(taken)
            has_email = rng.random() > 0.06
            phone = self.phone(customer["_place"])
            style = rng.choice(("national", "intl"))
            contact = {
                "Guid": self.guid(),
                "FirstName": first,
                "LastName": last,
                "EmailAddress": (
                    f"{_ascii(first).lower()}.{_ascii(last).lower()}@{customer['_domain']}"
                    if has_email
                    else None
                ),
                "PhoneNumber": phone.format(style) if rng.random() < 0.8 else None,
                "MobilePhone": self.mobile().format(style) if rng.random() < 0.5 else None,
                "FaxNumber": self.phone(customer["_place"]).format(style)
                if rng.random() < 0.1
                else None,
                "OfficePhone": customer["PhoneNumber"] if rng.random() < 0.3 else None,
                "_title": title,
                "_phone": phone,
                "_style": style,
            }
            customer["Contacts"].append(contact)
            if not (first + last).isascii():
                self.variety["unicode_names"].append(contact["Guid"])

    # ---- CRM copies --------------------------------------------------------------------------
    def division(self, name: str, phone: str | None, website: str | None, manager: str | None,
                 modified: datetime) -> dict[str, Any]:  # fmt: skip
        """A company group and its one division (what the CRM screen calls a company)."""
        division_id = len(self.divisions) + 1
        self.companies.append(
            {"CompanyId": division_id, "Name": name, "TypeId": "CUS",
             "AccountManagerId": manager or HOUSE_ACCOUNT, "StatusFlag": "A",
             "LastUpdatedTimestamp": modified}
        )  # fmt: skip
        division = {
            "DivisionId": division_id,
            "CompanyId": division_id,
            "OperatingCompanyCode": "A",
            "Name": name,
            "PhoneNumber": phone,
            "Website": website,
            "AccountManager": manager or HOUSE_ACCOUNT,
            "SalesLedgerId": None,
            "StatusFlag": "A",
            "Created": modified,
            "LastUpdatedTimestamp": modified,
        }
        self.divisions.append(division)
        return division

    def crm_contact(self, division_id: int, title: str | None, first: str, last: str,
                    email: str | None, phone: str | None, mobile: str | None, fax: str | None,
                    modified: datetime) -> dict[str, Any]:  # fmt: skip
        contact = {
            "ContactId": len(self.crm_contacts) + 1,
            "DivisionId": division_id,
            "Title": title,
            "Forename": first,
            "Surname": last,
            "Email": email,
            "PhoneNumber": phone,
            "MobilePhoneNumber": mobile,
            "Fax": fax,
            "RoleCode": CONTACT_ROLE,
            "StatusFlag": "A",
            "Created": modified,
            "LastUpdatedTimestamp": modified,
        }
        self.crm_contacts.append(contact)
        return contact

    def build_crm(self) -> None:
        rng = self.rng
        n_linked = len(self.linked_indices)
        # Company-level kinds, as positions in the list of linked customers.
        phone_format = self.pick(n_linked, 0.04)
        phone_differs = self.pick(n_linked, 0.02)
        # One website kind per division, so each planted kind stays visible.
        invalid = sorted(self.pick(n_linked, 0.015, minimum=min(3, n_linked)))
        web_invalid = {pos: slot for slot, pos in enumerate(invalid)}
        rest = [p for p in range(n_linked) if p not in web_invalid]
        web_differs = self.pick_among(rest, 0.015 * n_linked)
        with_site = [
            p
            for p in rest
            if p not in web_differs and self.customers[self.linked_indices[p]]["Website"]
        ]
        web_format = self.pick_among(with_site, 0.04 * n_linked, minimum=3)
        name_differs = self.pick(n_linked, 0.02)
        manager_differs = self.pick(n_linked, 0.02)
        manager_unmatched = self.pick(n_linked, 0.015)
        crm_only_after = self.pick(n_linked, 0.04)
        by_sp = {sp["Guid"]: sp for sp in self.salespersons}
        taken_by_customer: dict[int, set[tuple[str, str]]] = {}

        for i, customer in enumerate(self.customers):
            taken = taken_by_customer.setdefault(i, set())
            count = 130 if i == self.big_index else rng.choice((1, 1, 2, 2, 3, 3, 4, 5))
            self.unleashed_contacts(customer, count, taken)
            if i == self.big_index:
                self.variety["big_customers"].append(customer["Guid"])
            if not customer["CustomerName"].isascii():
                self.variety["unicode_names"].append(customer["Guid"])

        for pos, i in enumerate(self.linked_indices):
            customer = self.customers[i]
            erp_changed = crm_changed = False
            kinds: list[str] = []
            name, phone, website = (
                customer["CustomerName"],
                customer["PhoneNumber"],
                customer["Website"],
            )
            crm_name, crm_phone, crm_website = name, phone, website
            sp = customer["SalesPerson"]
            manager = by_sp[sp["Guid"]]["_user"] if sp else None
            if pos in name_differs:
                kinds.append("company_name_differs")
                new = self.renamed(name, rng)
                if rng.random() < 0.5:
                    crm_name, crm_changed = new, True
                else:
                    customer["CustomerName"], erp_changed = new, True
            if pos in phone_format and pos not in phone_differs:
                kinds.append("company_phone_format_only")
                crm_phone = customer["_phone"].format(self.other_style(customer["_phone_style"]))
                crm_changed = True
            if pos in phone_differs:
                kinds.append("company_phone_differs")
                new = self.other_phone(customer["_place"], customer["_phone"])
                new = new.format(customer["_phone_style"])
                if rng.random() < 0.5:
                    crm_phone, crm_changed = new, True
                else:
                    customer["PhoneNumber"], erp_changed = new, True
            invalid_slot = web_invalid.get(pos)
            if invalid_slot is not None:
                kinds.append("company_website_invalid_in_crm")
                template = _INVALID_WEBSITES[invalid_slot % len(_INVALID_WEBSITES)]
                crm_website, crm_changed = template.format(slug=customer["_slug"]), True
            elif pos in web_differs:
                kinds.append("company_website_differs")
                new = f"https://www.{customer['_slug']}-{rng.choice(('online', 'shop', 'uk'))}.com"
                if rng.random() < 0.5:
                    crm_website, crm_changed = new, True
                else:
                    customer["Website"], erp_changed = new, True
            elif pos in web_format:
                kinds.append("company_website_format_only")
                crm_website = self.restyled_website(website, len(self.variety[kinds[-1]]))
                crm_changed = True
            if pos in manager_unmatched and self.unmatched_manager_ids:
                manager, crm_changed = rng.choice(self.unmatched_manager_ids), True
            elif pos in manager_differs and len(self.active_sps) > 1:
                other = rng.choice(
                    [s for s in self.active_sps if not sp or s["Guid"] != sp["Guid"]]
                )
                if rng.random() < 0.5 and other["_user"] is not None:
                    manager, crm_changed = other["_user"], True
                else:
                    customer["SalesPerson"] = {k: other[k] for k in ("Guid", "FullName", "Email")}
                    erp_changed = True
            crm_modified = self.after_import() if crm_changed else self.before_import(
                customer["CreatedOn"]
            )  # fmt: skip
            division = self.division(crm_name, crm_phone, crm_website, manager, crm_modified)
            division_id = division["DivisionId"]
            self.company_links[customer["Guid"]] = division_id
            ledger_id = f"SL{len(self.ledgers) + 1:05d}"
            self.ledgers.append(
                {
                    "OperatingCompanyCode": "A",
                    "SalesLedgerId": ledger_id,
                    "CustomerCode": customer["CustomerCode"],
                    "Name": customer["CustomerName"],
                    "DefaultDivisionId": division_id,
                    "LastUpdatedTimestamp": self.before_import(customer["CreatedOn"]),
                }
            )
            division["SalesLedgerId"] = ledger_id
            for kind in kinds:
                self.variety[kind].append(division_id)
            if manager in self.unmatched_users:
                self.variety["account_manager_unmatched"].append(division_id)
            elif manager != (by_sp[customer["SalesPerson"]["Guid"]]["_user"]
                             if customer["SalesPerson"] else None):  # fmt: skip
                self.variety["account_manager_differs"].append(division_id)
            erp_changed |= self.copy_contacts(customer, division_id, taken_by_customer[i])
            if erp_changed:
                customer["LastModifiedOn"] = max(customer["LastModifiedOn"], self.after_import())
            if pos in crm_only_after:
                self.crm_only_division(taken=set())

    @staticmethod
    def restyled_website(website: str, turn: int) -> str:
        """The same site written another way; successive turns cycle through the ways."""
        bare = website.split("://", 1)[1]
        variants = [bare.rstrip("/"), website.upper(), website.rstrip("/") + "/", bare]
        variants = [v for v in variants if v != website]
        return variants[turn % len(variants)]

    def copy_contacts(
        self, customer: dict[str, Any], division_id: int, taken: set[tuple[str, str]]
    ) -> bool:
        """CRM copies of a linked customer's contacts, with drift. True if Unleashed changed."""
        rng = self.rng
        contacts = customer["Contacts"]
        n = len(contacts)
        erp_changed = False
        only_erp = {j for j in range(n) if rng.random() < 0.04}
        if len(contacts) > 100:  # one new contact beyond what includeAllContacts returns
            only_erp.add(n - 1 - rng.randrange(min(10, n - 100)))
        for j, c in enumerate(contacts):
            if j in only_erp:
                self.variety["unleashed_only_contacts"].append(c["Guid"])
                erp_changed = True
                continue
            email, phone, mobile = c["EmailAddress"], c["PhoneNumber"], c["MobilePhone"]
            crm_changed = False
            roll = rng.random()
            if roll < 0.03 and email:
                local, domain = email.split("@")
                email, crm_changed = f"{local.title()}@{domain.upper()}", True
                self.variety["contact_email_case_differs"].append(c["Guid"])
            elif roll < 0.06:
                email = rng.choice(
                    (None, f"{_slug(c['FirstName'])[0]}{_slug(c['LastName'])}@{rng.choice(('gmail.com', 'outlook.com', 'btinternet.com'))}")  # noqa: E501
                )  # fmt: skip
                crm_changed = True
            roll = rng.random()
            if roll < 0.04 and phone:
                phone, crm_changed = c["_phone"].format(self.other_style(c["_style"])), True
                self.variety["contact_phone_format_only"].append(c["Guid"])
            elif roll < 0.07:
                if rng.random() < 0.5:
                    mobile, crm_changed = self.mobile().format(c["_style"]), True
                else:
                    c["PhoneNumber"] = self.other_phone(customer["_place"], c["_phone"]).format(
                        c["_style"]
                    )
                    erp_changed = True
                self.variety["contact_phone_differs"].append(c["Guid"])
            modified = self.after_import() if crm_changed else self.before_import(
                customer["CreatedOn"]
            )  # fmt: skip
            copy = self.crm_contact(division_id, c["_title"], c["FirstName"], c["LastName"],
                                    email, phone, mobile, c["FaxNumber"], modified)  # fmt: skip
            self.contact_links[c["Guid"]] = copy["ContactId"]
        # Contacts someone added in the CRM only.
        extra = sum(1 for _ in range(n) if rng.random() < 0.04)
        for _ in range(extra):
            self.variety["crm_only_contacts"].append(
                self.new_crm_contact(customer, division_id, taken)["ContactId"]
            )
        return erp_changed

    def new_crm_contact(
        self, customer: dict[str, Any], division_id: int, taken: set[tuple[str, str]]
    ) -> dict[str, Any]:
        title, first, last = self.person_name(taken)
        return self.crm_contact(
            division_id,
            title,
            first,
            last,
            f"{_ascii(first).lower()}.{_ascii(last).lower()}@{customer['_domain']}",
            self.phone(customer["_place"]).format("national"),
            self.mobile().format("national") if self.rng.random() < 0.4 else None,
            None,
            self.after_import(),
        )

    def crm_only_division(self, taken: set[tuple[str, str]]) -> None:
        """A division someone created in the CRM; no sales ledger, so not linked to Unleashed."""
        rng = self.rng
        prospect = self.customer(-1, None, new=True)
        managers = [sp["_user"] for sp in self.active_sps] + self.unmatched_manager_ids + [None]
        manager = rng.choice(managers)
        website = prospect["Website"]
        if website and rng.random() < 0.4:
            website = website.split("://", 1)[1]
        division = self.division(
            prospect["CustomerName"], prospect["PhoneNumber"], website, manager,
            self.after_import() if rng.random() < 0.5 else self.before_import(prospect["CreatedOn"]
            - timedelta(days=400)),
        )  # fmt: skip
        self.variety["crm_only_divisions"].append(division["DivisionId"])
        for _ in range(rng.randrange(1, 4)):
            self.new_crm_contact(prospect, division["DivisionId"], taken)

    # ---- finish ------------------------------------------------------------------------------
    def world(self) -> World:
        self.build_staff()
        self.build_customers()
        self.build_crm()
        if self.n and not self.variety["crm_only_divisions"]:
            self.crm_only_division(taken=set())
        if self.n and not self.variety["crm_only_contacts"] and self.company_links:
            customer = next(c for c in self.customers if c["Guid"] in self.company_links)
            division_id = self.company_links[customer["Guid"]]
            taken = {(c["FirstName"], c["LastName"]) for c in customer["Contacts"]}
            taken |= {(c["Forename"], c["Surname"]) for c in self.crm_contacts
                      if c["DivisionId"] == division_id}  # fmt: skip
            contact = self.new_crm_contact(customer, division_id, taken)
            self.variety["crm_only_contacts"].append(contact["ContactId"])
        # Contacts a matcher can pair only by name: an email missing or different on either side.
        crm_emails = {c["ContactId"]: c["Email"] for c in self.crm_contacts}
        for customer in self.customers:
            for contact in customer["Contacts"]:
                contact_id = self.contact_links.get(contact["Guid"])
                if contact_id is None:
                    continue
                erp, crm = contact["EmailAddress"], crm_emails[contact_id]
                if not erp or not crm or erp.lower() != crm.lower():
                    self.variety["contacts_matched_by_name_only"].append(contact["Guid"])
        for sp in self.salespersons:
            del sp["_user"]
        for customer in self.customers:
            for key in [k for k in customer if k.startswith("_")]:
                del customer[key]
            for contact in customer["Contacts"]:
                for key in [k for k in contact if k.startswith("_")]:
                    del contact[key]
        return World(
            salespersons=self.salespersons,
            customers=self.customers,
            crm={
                "Divisions": self.divisions,
                "Contacts": self.crm_contacts,
                "Companies": self.companies,
                "Users": self.users,
                "SalesLedgers": self.ledgers,
                "ContactRoles": [dict(r) for r in _CONTACT_ROLES],
                "HomeCurrencies": [
                    {"OperatingCompanyCode": "A", "Description": self.tenant_name, "Code": "GBP"}
                ],
                "SystemOptions": [dict(o) for o in _SYSTEM_OPTIONS],
            },
            variety=self.variety,
            company_links=self.company_links,
            contact_links=self.contact_links,
        )


def generate_world(companies: int = 50, seed: int = 42) -> World:
    """A deterministic Unleashed account and CRM tenant with `companies` Unleashed customers."""
    if companies < 0:
        raise ValueError("companies must be >= 0")
    return _Builder(companies, seed).world()
