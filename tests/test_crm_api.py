"""The CRM client against the local Prospect CRM server, over real sockets, in the live model
(docs/api-assumptions.md): auth, the 500-row cap and client paging, integer, string and
composite keys, the value-wrapped single GET, writes (204 PATCH, 201 POST, required fields,
foreign keys, Xtra rows, change timestamps), tenant facts, `$metadata`, the workspace rate
limit, injected faults, secrets and durability."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from defusedxml import ElementTree

from devservers.common import ServerThread
from devservers.crm_server import LOCAL_CRM_TOKEN, create_app
from sync_pipeline.clients.base import (
    AuthError,
    NotFoundError,
    RetrySettings,
    TransientApiError,
    ValidationError,
)
from sync_pipeline.clients.crm import (
    CrmClient,
    format_timestamp,
    odata_literal,
    parse_timestamp,
)

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]
FAST_RETRY = RetrySettings(attempts=10, initial_wait=0.01, max_wait=0.05, max_total=15)
CAP = 500  # rows in one answer of the live service, whatever $top asks
N_DIVISIONS = 12  # 1-10 have a sales ledger and a DivisionXtras row; 11 and 12 have neither
N_CONTACTS = 1203  # three answers: 500 + 500 + 203
SURNAMES = ["Smith", "O'Brien", "Müller", "Jones & Co", "Taylor+Sons", "Ng"]
DIVISION_NAMES = {7: "O'Brien & Sons Ltd", 8: "Müller GmbH"}
# UserCode, UserName, EmailAddress, Obsolete. '042' is a string key that looks like a number;
# HSE is the house account, the account manager of a division that has none.
USERS = [
    ("AB1", "Alice Brown", "alice.brown@example.com", 0),
    ("CD1", "Carl Dunn", "carl.dunn@example.com", 0),
    ("042", "Numbered Code", "n042@example.com", 0),
    ("XX1", "Xavier Xu", "xavier.xu@example.com", 1),
    ("HSE", "House account", None, 0),
]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")  # microseconds, UTC


def manager(division_id: int) -> str:
    return ("AB1", "CD1", "042")[division_id % 3] if division_id <= 10 else "HSE"


def division_name(division_id: int) -> str:
    return DIVISION_NAMES.get(division_id, f"Company {division_id}")


def contact_stamp(contact_id: int) -> datetime:
    """Distinct to the microsecond, in ContactId order."""
    return T0 + timedelta(seconds=contact_id, microseconds=contact_id)


def make_world(contacts: int = N_CONTACTS) -> SimpleNamespace:
    """A small tenant in the seed.generate_world().crm shape (timestamps as aware datetimes)."""
    users = [
        {"UserCode": code, "UserName": name, "EmailAddress": email, "Obsolete": obsolete,
         "AccountManager": 1, "Created": T0 - timedelta(days=30)}
        for code, name, email, obsolete in USERS
    ]  # fmt: skip
    ids = range(1, N_DIVISIONS + 1)
    companies = [
        {"CompanyId": d, "Name": division_name(d), "TypeId": "CUS", "AccountManagerId": manager(d),
         "LastUpdatedTimestamp": T0}
        for d in ids
    ]  # fmt: skip
    divisions = [
        {
            "DivisionId": d,
            "CompanyId": d,
            "OperatingCompanyCode": "A",
            "Name": division_name(d),
            "PhoneNumber": f"0115 496 0{d:03}",
            "Website": f"https://co{d}.example.com" if d % 2 else None,
            "AccountManager": manager(d),
            "SalesLedgerId": f"SL{d:05}" if d <= 10 else None,
            "Created": T0 - timedelta(days=1),
            "LastUpdatedTimestamp": T0 + timedelta(minutes=d),
        }
        for d in ids
    ]
    ledgers = [
        {"OperatingCompanyCode": "A", "SalesLedgerId": f"SL{d:05}", "CustomerCode": f"CUST{d:03}",
         "Name": division_name(d), "DefaultDivisionId": d, "LastUpdatedTimestamp": T0}
        for d in ids
        if d <= 10
    ]  # fmt: skip
    people = [
        {
            "ContactId": c,
            "DivisionId": c % N_DIVISIONS + 1,
            "Forename": f"First{c % 17}",
            "Surname": SURNAMES[c % len(SURNAMES)],
            "Email": f"c{c}@example.com" if c % 5 else None,
            "PhoneNumber": f"+44 115 496 {c:04}",
            "MobilePhoneNumber": f"07700 9{c:05}" if c % 4 == 0 else None,
            "RoleCode": "ACCNTS" if c % 10 == 0 else "DECISN",
            "StatusFlag": "D" if c % 9 == 0 else "A",
            "Created": T0 - timedelta(days=1),
            "LastUpdatedTimestamp": contact_stamp(c),
        }
        for c in range(1, contacts + 1)
    ]
    return SimpleNamespace(
        crm={
            "Companies": companies,
            "Divisions": divisions,
            "Contacts": people,
            "Users": users,
            "SalesLedgers": ledgers,
            "DivisionXtras": [{"DivisionId": d} for d in ids if d <= 10],
            "ContactRoles": [
                {"Code": "DECISN", "Description": "Decision maker"},
                {"Code": "ACCNTS", "Description": "Accounts"},
            ],
            "HomeCurrencies": [{"OperatingCompanyCode": "A", "Description": "Main", "Code": "GBP"}],
            "SystemOptions": [
                {
                    "Option": "DateFormat",
                    "Value": "dd/MM/yyyy",
                    "Group": "General",
                    "Description": "Date format",
                }
            ],
        }
    )


WORLD = make_world()
ALL_CONTACTS = list(range(1, N_CONTACTS + 1))


@pytest.fixture
def serve(tmp_path):
    """Start a local CRM server: serve(**create_app kwargs) -> ServerThread. Stopped at teardown."""
    started: list[ServerThread] = []

    def start(*, world=WORLD, **kwargs) -> ServerThread:
        kwargs.setdefault("store_path", str(tmp_path / f"crm-{len(started)}.db"))
        server = ServerThread(create_app(world=world, **kwargs)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def reader():
    """One server for the tests that only read: none of them writes to it."""
    with ServerThread(create_app(world=WORLD)) as server:
        yield server


def client_for(server: ServerThread, token: str = LOCAL_CRM_TOKEN, **kwargs) -> CrmClient:
    kwargs.setdefault("retry", FAST_RETRY)
    return CrmClient(server.url, token, **kwargs)


def admin(server: ServerThread, method: str, path: str, body: dict | None = None) -> dict:
    response = httpx.request(method, f"{server.url}/_admin/{path}", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


AUTH = {"Authorization": f"Bearer {LOCAL_CRM_TOKEN}"}


def api(server: ServerThread, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers=AUTH, timeout=10, **kwargs)


def only(response: httpx.Response) -> dict:
    """The one record of a GET-by-key answer (`{"value": [record]}`, as the live service)."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"@odata.context", "value"}
    assert len(body["value"]) == 1
    return body["value"][0]


def error_of(response: httpx.Response, status: int = 400) -> dict:
    """The OData error of a refused request, checked for the live shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"code", "message", "details"} <= set(error)
    assert set(error["details"][0]) == {"code", "message", "target"}
    return error


class Recording(httpx.HTTPTransport):
    """A real socket transport that keeps the URL of each request, and may act after one."""

    def __init__(self, after=None) -> None:
        super().__init__()
        self.urls: list[httpx.URL] = []
        self.after = after

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.urls.append(request.url)
        if self.after is not None:
            self.after(request, len(self.urls))
        return response


# --------------------------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------------------------
def test_missing_or_wrong_token_gets_401_with_odata_error(serve):
    server = serve()
    response = httpx.get(f"{server.url}/Divisions")
    assert error_of(response, 401)["code"] == "Unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    wrong = httpx.get(f"{server.url}/Divisions", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401

    with client_for(server, token="not-the-token") as client, pytest.raises(AuthError) as err:
        client.list("Divisions")
    assert err.value.status == 401
    assert client.stats.sent["GET /Divisions"] == 1  # auth failures are not retried


# --------------------------------------------------------------------------------------------
# Service document and $metadata
# --------------------------------------------------------------------------------------------
ENTITY_TYPES = {
    "Companies": "Company",
    "Divisions": "Division",
    "Contacts": "Contact",
    "Users": "User",
    "SalesLedgers": "SalesLedger",
    "DivisionSalesLedgers": "DivisionSalesLedger",
    "DivisionXtras": "DivisionXtra",
    "ContactXtras": "ContactXtra",
    "ContactRoles": "ContactRole",
    "HomeCurrencies": "HomeCurrency",
    "SystemOptions": "SystemOption",
    "UnleashedContacts": "UnleashedContact",
}
EDMX = "{http://docs.oasis-open.org/odata/ns/edmx}"
EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
NS = "ProspectSoft.OData"


def test_service_document_at_the_root_lists_every_entity_set(reader):
    server = reader
    body = api(server, "GET", "/").json()
    assert body["@odata.context"] == f"{server.url}/$metadata"
    assert {e["name"]: (e["kind"], e["url"]) for e in body["value"]} == {
        name: ("EntitySet", name) for name in ENTITY_TYPES
    }


def _csdl(text: str | bytes) -> dict:
    """The parts of a CSDL document the tests read: types (keys, properties, navigations)
    and the container's sets (type, navigation bindings)."""
    root = ElementTree.fromstring(text)
    assert root.tag == f"{EDMX}Edmx" and root.get("Version") == "4.0"
    (schema,) = root.findall(f"{EDMX}DataServices/{EDM}Schema")
    types = {}
    for etype in schema.findall(f"{EDM}EntityType"):
        types[etype.get("Name")] = SimpleNamespace(
            keys=[r.get("Name") for r in etype.findall(f"{EDM}Key/{EDM}PropertyRef")],
            props={p.get("Name"): dict(p.attrib) for p in etype.findall(f"{EDM}Property")},
            navs={
                n.get("Name"): (
                    n.get("Type"),
                    [
                        (c.get("Property"), c.get("ReferencedProperty"))
                        for c in n.findall(f"{EDM}ReferentialConstraint")
                    ],
                )
                for n in etype.findall(f"{EDM}NavigationProperty")
            },
        )
    (container,) = schema.findall(f"{EDM}EntityContainer")
    sets = {
        s.get("Name"): (
            s.get("EntityType"),
            {b.get("Path"): b.get("Target") for b in s.findall(f"{EDM}NavigationPropertyBinding")},
        )
        for s in container.findall(f"{EDM}EntitySet")
    }
    return {
        "namespace": schema.get("Namespace"),
        "container": container.get("Name"),
        "types": types,
        "sets": sets,
    }


def test_metadata_is_well_formed_csdl_of_the_live_model(reader):
    server = reader
    response = api(server, "GET", "/$metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    with client_for(server) as client:
        assert client.metadata() == response.text
    doc = _csdl(response.content)
    types, sets = doc["types"], doc["sets"]
    assert doc["namespace"] == NS
    assert doc["container"] == "Container"
    assert {name: t for name, (t, _) in sets.items()} == {
        name: f"{NS}.{t}" for name, t in ENTITY_TYPES.items()
    }
    # Keys, as the live tenant declares them; every key property is non-nullable.
    assert types["Division"].keys == ["DivisionId"]
    assert types["Contact"].keys == ["ContactId"]
    assert types["User"].keys == ["UserCode"]
    assert types["SalesLedger"].keys == ["OperatingCompanyCode", "SalesLedgerId"]
    assert types["ContactRole"].keys == ["Code"]
    assert types["HomeCurrency"].keys == ["OperatingCompanyCode"]
    assert types["DivisionSalesLedger"].keys == [
        "DivisionId",
        "OperatingCompanyCode",
        "SalesLedgerId",
    ]
    for name, etype in types.items():
        for key in etype.keys:
            assert etype.props[key].get("Nullable") == "false", f"{name}.{key}"
    # Property types and nullability a client depends on.
    division, contact, user = types["Division"], types["Contact"], types["User"]
    assert division.props["AccountManager"] == {
        "Name": "AccountManager",
        "Type": "Edm.String",
        "Nullable": "false",
        "MaxLength": "3",
        "DefaultValue": "HSE",
    }
    assert division.props["DivisionId"]["Type"] == "Edm.Int32"
    assert division.props["PhoneNumber"]["Type"] == "Edm.String"
    assert "Nullable" not in division.props["PhoneNumber"]  # nullable by default
    assert division.props["LastUpdatedTimestamp"]["Type"] == "Edm.DateTimeOffset"
    assert contact.props["RoleCode"]["Type"] == "Edm.String"
    assert contact.props["RoleCode"]["Nullable"] == "false"
    assert {"PhoneNumber", "MobilePhoneNumber", "Fax"} <= set(contact.props)
    assert user.props["UserCode"]["MaxLength"] == "3"
    assert user.props["Obsolete"]["Type"] == "Edm.Byte"
    assert {"UserName", "EmailAddress"} <= set(user.props)
    assert "LastUpdatedTimestamp" not in user.props  # users have no change timestamp
    for old in ("UnleashedGuid", "LastModified", "Phone", "AccountManagerId"):
        assert old not in division.props
    # Navigations with their referential constraints.
    assert division.navs["AccountManagerUser"] == (f"{NS}.User", [("AccountManager", "UserCode")])
    assert division.navs["SalesLedger"] == (
        f"{NS}.SalesLedger",
        [("OperatingCompanyCode", "OperatingCompanyCode"), ("SalesLedgerId", "SalesLedgerId")],
    )
    assert division.navs["Company"] == (f"{NS}.Company", [("CompanyId", "CompanyId")])
    assert contact.navs["Role"] == (f"{NS}.ContactRole", [("RoleCode", "Code")])
    assert sets["Divisions"][1]["AccountManagerUser"] == "Users"
    assert sets["Divisions"][1]["SalesLedger"] == "SalesLedgers"
    # Every navigation resolves: its type exists, each constraint pairs a property of this type
    # with a key property of the target, of the same Edm type.
    for name, etype in types.items():
        for nav, (target_name, constraints) in etype.navs.items():
            target = types[target_name.removeprefix(f"{NS}.")]
            assert [ref for _, ref in constraints] == target.keys, f"{name}.{nav}"
            for prop, ref in constraints:
                assert etype.props[prop]["Type"] == target.props[ref]["Type"], f"{name}.{nav}"


# --------------------------------------------------------------------------------------------
# Paging: at most 500 rows an answer; the client pages with $top/$skip in key order
# --------------------------------------------------------------------------------------------
def test_an_answer_is_capped_at_500_rows_whatever_top_asks(reader):
    server = reader
    body = api(server, "GET", "/Contacts?$top=1000&$count=true").json()
    assert len(body["value"]) == CAP
    assert body["@odata.count"] == N_CONTACTS
    assert "@odata.nextLink" not in body  # the live service sends none: clients page on
    assert len(api(server, "GET", "/Contacts").json()["value"]) == CAP  # no $top: the same
    rest = api(server, "GET", "/Contacts?$top=1000&$skip=1000&$orderby=ContactId").json()
    assert [r["ContactId"] for r in rest["value"]] == ALL_CONTACTS[1000:]
    assert len(api(server, "GET", "/Contacts?$top=7").json()["value"]) == 7
    assert api(server, "GET", f"/Contacts?$skip={N_CONTACTS}").json()["value"] == []


def test_client_lists_every_record_once_in_key_order_over_top_skip_pages(reader):
    server = reader
    recording = Recording()
    with client_for(server, transport=recording) as client:
        result = client.list("Contacts")
    assert [r["ContactId"] for r in result.items] == ALL_CONTACTS
    assert result.bad == []
    assert result.reported_total == N_CONTACTS
    assert result.pages == client.stats.sent["GET /Contacts"] == math.ceil(N_CONTACTS / CAP)
    sent = [dict(url.params) for url in recording.urls]
    assert [(q["$top"], q.get("$skip")) for q in sent] == [
        ("500", None),
        ("500", "500"),
        ("500", "1000"),
    ]
    assert all(q["$orderby"] == "ContactId" for q in sent)  # a stable order: the key


@pytest.mark.parametrize(("count", "requests"), [(True, 2), (False, 3)], ids=["count", "no-count"])
def test_a_total_that_fills_the_last_page_costs_an_empty_page_only_without_a_count(
    reader, count, requests
):
    server = reader
    with client_for(server) as client:
        result = client.list("Contacts", filter="ContactId le 1000", count=count)
    assert [r["ContactId"] for r in result.items] == ALL_CONTACTS[:1000]
    # @odata.count says when to stop; without it only an empty (or short) page does.
    assert client.stats.sent["GET /Contacts"] == requests


def test_with_next_links_on_the_client_gets_the_same_set(serve):
    server = serve(next_links=True)
    first = api(server, "GET", "/Contacts?$count=true").json()
    assert len(first["value"]) == CAP
    assert first["@odata.nextLink"].startswith(f"{server.url}/Contacts?")
    with client_for(server) as client:
        result = client.list("Contacts")
    # The client asks $top=500, which the cap fills exactly: no link is due, $skip pages on.
    assert [r["ContactId"] for r in result.items] == ALL_CONTACTS
    assert result.pages == client.stats.sent["GET /Contacts"] == 3


def test_client_follows_next_links_from_a_service_with_smaller_pages(serve):
    server = serve(next_links=True, page_size=200)
    recording = Recording()
    with client_for(server, transport=recording) as client:
        result = client.list("Contacts")
    sent = [dict(url.params) for url in recording.urls]
    followed = sent[1:3]
    assert [(q["$top"], "$skiptoken" in q, "$skip" in q) for q in followed] == [
        ("300", True, False),
        ("100", True, False),
    ]  # the service's links, each carrying what is left of the $top asked
    ids = [r["ContactId"] for r in result.items]
    assert result.reported_total == N_CONTACTS
    assert len(ids) == N_CONTACTS, (
        "PRODUCT BUG (sync_pipeline/clients/crm.py CrmClient.list, 'a server-driven listing ends "
        "where its links end'): the links end when the $top=500 asked is delivered, not when "
        f"the listing ends; the client returned {len(ids)} of {N_CONTACTS} contacts after "
        f"{len(sent)} requests although @odata.count said {result.reported_total}"
    )
    assert ids == ALL_CONTACTS


def _patch_after_first_page(server: ServerThread, contact_id: int):
    def after(request: httpx.Request, n: int) -> None:
        if n == 1:  # between the first and the second page
            response = api(server, "PATCH", f"/Contacts({contact_id})", json={"Fax": "moved"})
            assert response.status_code == 204

    return after


def test_an_edit_between_pages_neither_loses_nor_repeats_a_record(serve):
    server = serve()
    recording = Recording(after=_patch_after_first_page(server, 10))
    with client_for(server, transport=recording) as client:
        result = client.list("Contacts")
    ids = [r["ContactId"] for r in result.items]
    assert ids == ALL_CONTACTS  # each once, nothing skipped
    assert len(recording.urls) == 3
    # Contact 10 was read before the edit; the edit moved its timestamp past the read, so the
    # next delta read (LastUpdatedTimestamp gt <newest seen>) brings it.
    newest = max(parse_timestamp(r["LastUpdatedTimestamp"]) for r in result.items)
    with client_for(server) as client:
        delta = client.list(
            "Contacts", filter=f"LastUpdatedTimestamp gt {format_timestamp(newest)}"
        )
    assert [(r["ContactId"], r["Fax"]) for r in delta.items] == [(10, "moved")]


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/Divisions('12')", "'DivisionId' '12' is not an integer"),
        ("/Divisions(abc)", "'DivisionId' abc is not an integer"),
        ("/Users(42)", "'UserCode' takes a quoted string"),
        ("/Users(XX1)", "'UserCode' takes a quoted string"),
        (
            "/SalesLedgers('SL00001')",
            "composite key: name each of OperatingCompanyCode, SalesLedgerId",
        ),
        ("/SalesLedgers(OperatingCompanyCode='A')", "is OperatingCompanyCode, SalesLedgerId"),
        ("/Divisions(Nope=1)", "'Nope' is not a key property"),
        ("/Divisions()", "the key of 'Divisions' is DivisionId"),
    ],
)
def test_malformed_keys_get_400_with_details_naming_the_problem(reader, path, fragment):
    server = reader
    error = error_of(api(server, "GET", path))
    assert error["code"] == "BadRequest"
    assert fragment in error["details"][0]["message"]


def test_two_values_for_a_single_key_are_refused_as_such(reader):
    server = reader
    message = error_of(api(server, "GET", "/Divisions(1,2)"))["details"][0]["message"]
    assert "DivisionId" in message
    assert "composite" not in message, (
        "PRODUCT BUG (devservers/src/devservers/crm_server.py parse_key): GET /Divisions(1,2) "
        f"answers {message!r}, but Divisions has a single key: the second value is the problem"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/Divisions(999999)",
        "/Users('ZZZ')",
        "/SalesLedgers(OperatingCompanyCode='A',SalesLedgerId='NOPE')",
        "/DivisionXtras(11)",
    ],
)
def test_a_missing_record_gets_404(reader, path):
    server = reader
    assert error_of(api(server, "GET", path), 404)["code"] == "NotFound"


def test_client_get_unwraps_the_value_and_writes_each_kind_of_key(reader):
    server = reader
    recording = Recording()
    with client_for(server, transport=recording) as client:
        assert client.get("Divisions", 12)["Name"] == "Company 12"
        assert client.get("Divisions", "12")["DivisionId"] == 12  # DuckDB ids are text
        assert client.get("Users", "XX1")["EmailAddress"] == "xavier.xu@example.com"
        assert client.get("Users", "042")["UserName"] == "Numbered Code"
        key = {"OperatingCompanyCode": "A", "SalesLedgerId": "SL00003"}
        assert client.get("SalesLedgers", key)["CustomerCode"] == "CUST003"
        expanded = client.get("Divisions", 3, expand="AccountManagerUser($select=EmailAddress)")
        assert expanded["AccountManagerUser"] == {"EmailAddress": "alice.brown@example.com"}
        with pytest.raises(NotFoundError):
            client.get("Divisions", 999999)
        with pytest.raises(NotFoundError):
            client.get("Users", "ZZZ")
    paths = [url.raw_path.decode().split("?")[0] for url in recording.urls]
    assert paths[:5] == [
        "/Divisions(12)",
        "/Divisions(12)",
        "/Users('XX1')",
        "/Users('042')",
        "/SalesLedgers(OperatingCompanyCode='A',SalesLedgerId='SL00003')",
    ]


def test_client_get_takes_an_empty_value_as_not_found_and_a_bare_entity_as_is():
    answers = {
        "/Divisions(1)": {"value": []},
        "/Divisions(2)": {"DivisionId": 2, "Name": "Bare"},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answers[request.url.path])

    client = CrmClient("http://crm.test", "t0k", transport=httpx.MockTransport(handler))
    with pytest.raises(NotFoundError):
        client.get("Divisions", 1)
    assert client.get("Divisions", 2) == {"DivisionId": 2, "Name": "Bare"}


def test_contact_roles_are_listed_by_their_key_code(reader):
    server = reader
    with client_for(server) as client:
        assert client.get("ContactRoles", "ACCNTS")["Description"] == "Accounts"
        try:
            roles = client.list("ContactRoles")
        except ValidationError as exc:
            pytest.fail(
                "PRODUCT BUG (sync_pipeline/clients/crm.py KEYS['ContactRoles'] = ('RoleCode',); "
                "the ContactRole key is Code): list() orders by RoleCode and the service "
                f"refuses it: {exc}"
            )
    assert sorted(r["Code"] for r in roles.items) == ["ACCNTS", "DECISN"]
    assert roles.bad == []


# --------------------------------------------------------------------------------------------
# Query options
# --------------------------------------------------------------------------------------------
def _stamp_literal(contact_id: int) -> str:
    return format_timestamp(contact_stamp(contact_id))


FILTERS = [
    ("ContactId eq 7", lambda c: c["ContactId"] == 7),
    ("ContactId gt 1190", lambda c: c["ContactId"] > 1190),
    ("ContactId le 5", lambda c: c["ContactId"] <= 5),
    (
        "Surname eq 'O''Brien' and StatusFlag eq 'A'",
        lambda c: c["Surname"] == "O'Brien" and c["StatusFlag"] == "A",
    ),
    (
        "(ContactId lt 10 or ContactId gt 1195) and not (DivisionId eq 2)",
        lambda c: (c["ContactId"] < 10 or c["ContactId"] > 1195) and c["DivisionId"] != 2,
    ),
    ("contains(Email,'c11')", lambda c: c["Email"] is not None and "c11" in c["Email"]),
    ("contains(Surname,'ü')", lambda c: "ü" in c["Surname"]),
    ("Surname eq 'Jones & Co'", lambda c: c["Surname"] == "Jones & Co"),
    ("Surname eq 'Taylor+Sons'", lambda c: c["Surname"] == "Taylor+Sons"),
    ("Email eq null", lambda c: c["Email"] is None),
    ("MobilePhoneNumber ne null", lambda c: c["MobilePhoneNumber"] is not None),
    ("RoleCode eq 'ACCNTS'", lambda c: c["RoleCode"] == "ACCNTS"),
    # Unquoted DateTimeOffset literals to the microsecond: contact c is stamped T0 + c s + c µs.
    (f"LastUpdatedTimestamp gt {_stamp_literal(1100)}", lambda c: c["ContactId"] > 1100),
    (f"LastUpdatedTimestamp le {_stamp_literal(10)}", lambda c: c["ContactId"] <= 10),
    (
        "Division/AccountManagerUser/EmailAddress eq 'alice.brown@example.com'",
        lambda c: manager(c["DivisionId"]) == "AB1",
    ),
    ("Division/SalesLedger/CustomerCode eq 'CUST003'", lambda c: c["DivisionId"] == 3),
]


@pytest.mark.parametrize(("expression", "expected"), FILTERS, ids=[f for f, _ in FILTERS])
def test_filter_operators(reader, expression, expected):
    server = reader
    with client_for(server) as client:
        result = client.list("Contacts", filter=expression)
    want = [c["ContactId"] for c in WORLD.crm["Contacts"] if expected(c)]
    assert want, "the filter should select something"
    assert [r["ContactId"] for r in result.items] == want
    assert result.reported_total == len(want)


def test_filters_on_user_flags_account_managers_and_navigation(reader):
    server = reader
    with client_for(server) as client:
        obsolete = client.list("Users", filter="Obsolete eq 1")
        house = client.list("Divisions", filter="AccountManager eq 'HSE'")
        by_name = client.list("Divisions", filter="AccountManagerUser/UserName eq 'Carl Dunn'")
        unledgered = client.list("Divisions", filter="SalesLedgerId eq null")
    assert [u["UserCode"] for u in obsolete.items] == ["XX1"]
    assert [d["DivisionId"] for d in house.items] == [11, 12]
    assert [d["DivisionId"] for d in by_name.items] == [
        d for d in range(1, N_DIVISIONS + 1) if manager(d) == "CD1"
    ]
    assert [d["DivisionId"] for d in unledgered.items] == [11, 12]


def test_select_expand_count_top_skip(reader):
    server = reader
    with client_for(server) as client:
        selected = client.list("Divisions", select=["Name"], count=False)
        expanded = client.list("Divisions", expand="AccountManagerUser,SalesLedger")
        narrow = client.list(
            "Divisions", expand="AccountManagerUser($select=UserCode,EmailAddress)"
        )
    # The client always adds the key and the change timestamp to a $select.
    assert set(selected.items[0]) == {"DivisionId", "LastUpdatedTimestamp", "Name"}
    assert selected.reported_total is None
    first = expanded.items[0]
    assert first["AccountManagerUser"]["UserCode"] == first["AccountManager"] == "CD1"
    assert first["SalesLedger"]["CustomerCode"] == "CUST001"
    assert expanded.items[-1]["SalesLedger"] is None  # division 12 has no sales ledger
    assert expanded.items[-1]["AccountManagerUser"]["EmailAddress"] is None  # the house account
    assert narrow.items[0]["AccountManagerUser"] == {
        "UserCode": "CD1",
        "EmailAddress": "carl.dunn@example.com",
    }

    body = api(
        server, "GET", "/Contacts?$top=5&$skip=10&$count=true&$orderby=ContactId desc"
    ).json()
    assert [r["ContactId"] for r in body["value"]] == [1193, 1192, 1191, 1190, 1189]
    assert body["@odata.count"] == N_CONTACTS

    single = api(
        server, "GET", "/Divisions(3)?$select=Name&$expand=AccountManagerUser($select=EmailAddress)"
    ).json()
    assert single["value"] == [
        {"Name": "Company 3", "AccountManagerUser": {"EmailAddress": "alice.brown@example.com"}}
    ]


@pytest.mark.parametrize(
    ("query", "option"),
    [
        ("$filter=Surname eq", "$filter"),
        ("$filter=Nickname eq 'x'", "$filter"),
        ("$filter=Surname eq 5", "$filter"),
        ("$filter=LastUpdatedTimestamp gt '2026-01-05T09:00:00Z'", "$filter"),  # quoted: a string
        ("$orderby=Surname sideways", "$orderby"),
        ("$select=Phone", "$select"),
        ("$expand=AccountManager", "$expand"),
        ("$top=-1", "$top"),
        ("$count=maybe", "$count"),
        ("$search=smith", "$search"),
    ],
)
def test_invalid_query_options_get_400_naming_the_option(reader, query, option):
    server = reader
    error = error_of(api(server, "GET", f"/Contacts?{query}"))
    assert option in error["message"]
    assert error["details"][0]["target"] == option


def test_client_surfaces_a_bad_filter_as_a_clear_validation_error(reader):
    server = reader
    with client_for(server) as client, pytest.raises(ValidationError) as err:
        client.list("Contacts", filter="Phone eq '1'")
    assert err.value.status == 400
    assert "Could not find a property named 'Phone'" in str(err.value)
    assert client.stats.sent["GET /Contacts"] == 1  # a 400 is not retried


def test_find_escapes_literals(reader):
    server = reader
    with client_for(server) as client:
        for surname in ("O'Brien", "Jones & Co", "Taylor+Sons", "Müller"):
            found = client.find("Contacts", "Surname", surname)
            assert found and {c["Surname"] for c in found} == {surname}
        assert client.find("Contacts", "Surname", "Nobody's") == []
        assert [
            d["DivisionId"] for d in client.find("Divisions", "Name", "O'Brien & Sons Ltd")
        ] == [7]
        assert [d["DivisionId"] for d in client.find("Divisions", "SalesLedgerId", None)] == [
            11,
            12,
        ]
        assert [u["UserCode"] for u in client.find("Users", "UserCode", "042")] == ["042"]
        with pytest.raises(ValueError):
            client.find("Contacts", "Surname eq 'x' or true", "y")


# --------------------------------------------------------------------------------------------
# Writes
# --------------------------------------------------------------------------------------------
def test_patch_answers_204_and_the_client_returns_none(serve):
    server = serve()
    before = only(api(server, "GET", "/Contacts(17)"))
    response = api(server, "PATCH", "/Contacts(17)", json={"PhoneNumber": "0115 496 0999"})
    assert (response.status_code, response.content) == (204, b"")
    with client_for(server) as client:
        assert client.patch("Contacts", 17, {"MobilePhoneNumber": "07700 900999"}) is None
        after = client.get("Contacts", 17)
    assert (after["PhoneNumber"], after["MobilePhoneNumber"]) == ("0115 496 0999", "07700 900999")
    moved = {"PhoneNumber", "MobilePhoneNumber", "LastUpdated", "LastUpdatedTimestamp"}
    assert {k: v for k, v in after.items() if k not in moved} == {
        k: v for k, v in before.items() if k not in moved
    }  # partial: nothing else changed


def test_timestamps_move_on_every_patch_strictly_increasing_to_the_microsecond(serve):
    server = serve()
    order = [5, 900, 3, 1200, 44, 12, 600, 8, 501, 77] * 2
    with client_for(server) as client:
        before = {c: client.get("Contacts", c) for c in set(order)}
        stamps = []
        for i, contact_id in enumerate(order):  # back to back, no read between
            client.patch("Contacts", contact_id, {"Fax": str(i)})
        for contact_id in order[len(order) // 2 :]:
            record = client.get("Contacts", contact_id)
            stamps.append(record["LastUpdatedTimestamp"])
            assert record["LastUpdated"] == record["LastUpdatedTimestamp"]
            old = parse_timestamp(before[contact_id]["LastUpdatedTimestamp"])
            assert parse_timestamp(record["LastUpdated"]) > old
    assert all(TIMESTAMP.match(s) for s in stamps), stamps
    parsed = [parse_timestamp(s) for s in stamps]
    assert all(a < b for a, b in zip(parsed, parsed[1:], strict=False))  # in the order written


def test_a_delta_filter_returns_exactly_the_records_changed_after_the_cursor(serve):
    server = serve()
    with client_for(server) as client:
        cursor = max(parse_timestamp(c["LastUpdatedTimestamp"]) for c in client.list("Contacts"))
        for contact_id in (700, 3, 1201):
            client.patch("Contacts", contact_id, {"Title": "Dr"})
        literal = format_timestamp(cursor)
        changed = client.list("Contacts", filter=f"LastUpdatedTimestamp gt {literal}")
        assert [c["ContactId"] for c in changed.items] == [3, 700, 1201]
        stamp = parse_timestamp(client.get("Contacts", 1201)["LastUpdatedTimestamp"])
        edge = format_timestamp(stamp)
        before_edge = format_timestamp(stamp - timedelta(microseconds=1))
        assert client.list("Contacts", filter=f"LastUpdatedTimestamp gt {edge}").items == []
        last = client.list("Contacts", filter=f"LastUpdatedTimestamp gt {before_edge}")
        assert [c["ContactId"] for c in last.items] == [1201]  # one microsecond tells them apart


def test_an_unknown_property_is_refused_naming_it(serve):
    server = serve()
    error = error_of(api(server, "PATCH", "/Contacts(4)", json={"Nickname": "x"}))
    assert error["details"][0]["target"] == "Nickname"
    assert error["message"] == (
        "Could not find a property named 'Nickname' on type 'ProspectSoft.OData.Contact'."
    )
    with client_for(server) as client:
        with pytest.raises(ValidationError) as err:
            client.patch("Divisions", 4, {"Phone": "1"})  # the old name
        assert "Could not find a property named 'Phone'" in err.value.message
        assert client.stats.sent["PATCH /Divisions({key})"] == 1  # a 400 is not retried


@pytest.mark.parametrize(
    ("path", "body", "code", "target"),
    [
        ("/Divisions(1)", {"AccountManager": None}, "NullValue", "AccountManager"),
        ("/Contacts(4)", {"RoleCode": None}, "NullValue", "RoleCode"),
        ("/Divisions(1)", {"Name": None}, "NullValue", "Name"),
        ("/Divisions(1)", {"AccountManager": "ZZZ"}, "-194", "AccountManager"),
        ("/Divisions(1)", {"AccountManager": "ABCD"}, "InvalidValue", "AccountManager"),
        ("/Contacts(4)", {"RoleCode": "NOPE"}, "-194", "RoleCode"),
        ("/Contacts(4)", {"DivisionId": 999999}, "-194", "DivisionId"),
        ("/Contacts(4)", {"DivisionId": "two"}, "InvalidValue", "DivisionId"),
        (
            "/Divisions(1)",
            {"AccountManagerUser": {"UserCode": "AB1"}},
            "BadRequest",
            "AccountManagerUser",
        ),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_patch_refuses_a_bad_value_naming_the_property_and_writes_nothing(
    serve, path, body, code, target
):
    server = serve()
    before = only(api(server, "GET", path))
    error = error_of(api(server, "PATCH", path, json=body))
    assert (error["code"], error["details"][0]["target"]) == (code, target)
    assert only(api(server, "GET", path)) == before


def test_post_refuses_a_record_without_its_required_fields(serve):
    server = serve()
    error = error_of(api(server, "POST", "/Contacts", json={"DivisionId": 1, "Forename": "Ada"}))
    assert (error["code"], error["details"][0]["target"]) == ("MissingProperty", "RoleCode")
    assert "RoleCode" in error["message"]
    error = error_of(api(server, "POST", "/Divisions", json={"Name": "New Co"}))
    assert error["code"] == "MissingProperty"
    assert "CompanyId" in error["message"] and "OperatingCompanyCode" in error["message"]
    with client_for(server) as client:
        with pytest.raises(ValidationError, match="RoleCode"):
            client.create("Contacts", {"DivisionId": 1, "Forename": "Orphan"})
        assert client.list("Contacts", filter="Forename eq 'Orphan'").items == []


@pytest.mark.parametrize(
    ("entity_set", "body", "target"),
    [
        ("Contacts", {"DivisionId": 1, "RoleCode": "NOPE"}, "RoleCode"),
        ("Contacts", {"DivisionId": 999999, "RoleCode": "DECISN"}, "DivisionId"),
        ("Divisions", {"Name": "X", "CompanyId": 999999, "OperatingCompanyCode": "A"}, "CompanyId"),
        (
            "Divisions",
            {"Name": "X", "CompanyId": 1, "OperatingCompanyCode": "Z"},
            "OperatingCompanyCode",
        ),
    ],
    ids=["role", "division", "company", "operating-company"],
)
def test_post_with_a_foreign_key_to_a_missing_row_gets_minus_194(serve, entity_set, body, target):
    server = serve()
    error = error_of(api(server, "POST", f"/{entity_set}", json=body))
    assert error["code"] == "-194"
    assert error["message"].startswith("No primary key value for foreign key")
    assert error["details"][0]["target"] == target
    total = api(server, "GET", f"/{entity_set}?$count=true&$top=0").json()["@odata.count"]
    assert total == len(WORLD.crm[entity_set])  # nothing created


def test_post_creates_with_201_and_the_record_gets_its_xtra_row(serve):
    server = serve()
    response = api(
        server,
        "POST",
        "/Divisions",
        json={"Name": "New Co", "CompanyId": 1, "OperatingCompanyCode": "A", "PhoneNumber": "1"},
    )
    assert response.status_code == 201
    created = response.json()
    new_id = N_DIVISIONS + 1
    assert created["DivisionId"] == new_id
    assert response.headers["Location"] == f"{server.url}/Divisions({new_id})"
    assert created["AccountManager"] == "HSE"  # NOT NULL: the server default
    assert created["StatusFlag"] == "A"
    assert TIMESTAMP.match(created["LastUpdatedTimestamp"])
    assert created["Created"] == created["LastUpdated"] == created["LastUpdatedTimestamp"]
    xtra = only(api(server, "GET", f"/DivisionXtras({new_id})"))
    assert xtra["DivisionId"] == new_id and xtra["StandardTextField1"] is None

    with client_for(server) as client:
        contact = client.create(
            "Contacts", {"DivisionId": new_id, "RoleCode": "DECISN", "Forename": "Ada"}
        )
        assert contact["ContactId"] == N_CONTACTS + 1
        assert client.get("ContactXtras", contact["ContactId"])["StandardTextField1"] is None
        assert client.get("Divisions", new_id)["Name"] == "New Co"


def test_upsert_satellite_patches_an_existing_xtra_row_and_posts_a_missing_one(serve):
    server = serve()
    guid = "0b7f4c8e-2a41-4f6e-9d3c-5e8a1b2c3d4e"
    with client_for(server) as client:
        assert client.upsert_satellite("DivisionXtras", 1, {"StandardTextField1": guid}) is None
        assert client.stats.sent["PATCH /DivisionXtras({key})"] == 1
        assert client.stats.sent["POST /DivisionXtras"] == 0
        assert client.get("DivisionXtras", 1)["StandardTextField1"] == guid

        with pytest.raises(NotFoundError):
            client.get("DivisionXtras", 11)  # division 11 has no Xtra row yet
        client.upsert_satellite("DivisionXtras", 11, {"StandardTextField2": guid})
        assert client.stats.sent["PATCH /DivisionXtras({key})"] == 2  # refused: 404
        assert client.stats.sent["POST /DivisionXtras"] == 1
        row = client.get("DivisionXtras", 11)
        assert (row["DivisionId"], row["StandardTextField2"]) == (11, guid)
        found = client.find("Divisions", "DivisionXtra/StandardTextField2", guid)
        assert [d["DivisionId"] for d in found] == [11]


# --------------------------------------------------------------------------------------------
# Tenant facts
# --------------------------------------------------------------------------------------------
def test_a_default_tenant_may_sync(serve):
    server = serve()
    with client_for(server) as client:
        facts = client.tenant_facts()
    assert facts.operating_companies == 1
    assert facts.advanced_ledgers is False
    assert facts.unleashed_sync is False
    assert facts.refusal_reason() is None
    assert facts.evidence == ("1 operating company (HomeCurrencies)",)
    # The operating companies, the options, and one row of each set that gives a switch away.
    assert set(client.stats.sent) == {
        "GET /HomeCurrencies",
        "GET /SystemOptions",
        "GET /DivisionSalesLedgers",
        "GET /UnleashedContacts",
    }


def test_operating_companies_are_the_home_currencies(serve):
    server = serve()
    assert admin(server, "PUT", "tenant", {"operating_companies": 2})["operating_companies"] == 2
    with client_for(server) as client:
        codes = [r["OperatingCompanyCode"] for r in client.list("HomeCurrencies")]
        facts = client.tenant_facts()
    assert codes == ["A", "B"]
    assert facts.operating_companies == 2
    assert "2 operating companies (HomeCurrencies)" in facts.evidence
    assert "the CRM tenant has 2 operating companies" in facts.refusal_reason()


def test_the_tenant_switches_show_in_the_facts_and_the_refusal(serve):
    server = serve()
    with client_for(server) as client:
        admin(server, "PUT", "tenant", {"advanced_ledgers": True})
        facts = client.tenant_facts()
        assert (facts.advanced_ledgers, facts.unleashed_sync) == (True, False)
        assert "SystemOptions 'AdvancedLedgers' is on" in facts.evidence
        assert facts.refusal_reason() == "the CRM tenant has advanced ledgers enabled"

        admin(server, "PUT", "tenant", {"advanced_ledgers": False, "unleashed_sync": True})
        facts = client.tenant_facts()
        assert (facts.advanced_ledgers, facts.unleashed_sync) == (False, True)
        assert "SystemOptions 'UnleashedIntegrationEnabled' is on" in facts.evidence
        assert "Prospect's own Unleashed integration is on" in facts.refusal_reason()

        admin(server, "PUT", "tenant", {"operating_companies": 3, "advanced_ledgers": True})
        reason = client.tenant_facts().refusal_reason()
        assert "3 operating companies" in reason
        assert "advanced ledgers" in reason
        assert "Unleashed integration" in reason

        admin(
            server,
            "PUT",
            "tenant",
            {"operating_companies": 1, "advanced_ledgers": False, "unleashed_sync": False},
        )
        assert client.tenant_facts().refusal_reason() is None


def test_without_the_options_the_rows_in_use_give_the_switches_away(serve):
    server = serve()
    with client_for(server) as client:
        admin(
            server,
            "PUT",
            "raw/DivisionSalesLedgers/DivisionId=1,OperatingCompanyCode='A',SalesLedgerId='SL00001'",
            {
                "DivisionId": 1,
                "OperatingCompanyCode": "A",
                "SalesLedgerId": "SL00001",
                "DefaultLedger": 1,
            },
        )
        facts = client.tenant_facts()
        assert (facts.advanced_ledgers, facts.unleashed_sync) == (True, False)
        assert "DivisionSalesLedgers has rows (advanced ledgers in use)" in facts.evidence
        assert "advanced ledgers" in facts.refusal_reason()

        admin(
            server,
            "PUT",
            "raw/UnleashedContacts/OperatingCompanyCode='A',AccountsId='5a1e6f3c'",
            {"OperatingCompanyCode": "A", "AccountsId": "5a1e6f3c", "Forename": "Ada"},
        )
        facts = client.tenant_facts()
        assert facts.unleashed_sync is True
        assert "UnleashedContacts has rows (Prospect's Unleashed import has run)" in facts.evidence
        assert "Unleashed integration" in facts.refusal_reason()


# --------------------------------------------------------------------------------------------
# Rate limit
# --------------------------------------------------------------------------------------------
def test_paced_client_bursts_without_a_single_429(serve):
    server = serve(rate_limit=10, rate_window_s=1)
    started = time.monotonic()
    with client_for(server, rate_limit=10, rate_window_s=1) as client:
        for i in range(25):
            client.get("Divisions", 1 + i % N_DIVISIONS)
    elapsed = time.monotonic() - started
    limits = admin(server, "GET", "ratelimit")
    assert limits["throttled"] == 0
    assert limits["admitted"] == 25
    assert client.stats.statuses == {200: 25}
    assert admin(server, "GET", "stats")["total_requests"] == 25
    assert elapsed >= 2.0  # three windows' worth, paced by the client


# Two processes (two Dagster runs) of one deployment, each sending 15 requests at the same
# moment to a server that admits 10 per 1 s window.
_BURST = """
import sys, time
from sync_pipeline.clients.base import RetrySettings
from sync_pipeline.clients.crm import CrmClient
url, token, pacing, start = sys.argv[1], sys.argv[2], sys.argv[3] or None, float(sys.argv[4])
retry = RetrySettings(attempts=20, initial_wait=0.05, max_wait=0.5, max_total=60)
client = CrmClient(url, token, rate_limit=10, rate_window_s=1, retry=retry, pacing_file=pacing)
time.sleep(max(0.0, start - time.time()))
for i in range(15):
    client.get("Divisions", 1 + i % 10)
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shared-window", "per-process"])
def test_runs_in_separate_processes_share_the_pacing_window(serve, tmp_path, shared):
    server = serve(rate_limit=10, rate_window_s=1)
    pacing = str(tmp_path / "pacing" / "api-pacing.sqlite") if shared else ""
    start = str(time.time() + 1.5)  # both processes have imported by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BURST, server.url, LOCAL_CRM_TOKEN, pacing, start],
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    limits = admin(server, "GET", "ratelimit")
    if shared:
        assert limits["throttled"] == 0  # paced together: the server never had to say 429
        assert limits["admitted"] == 30
    else:
        assert limits["throttled"] > 0  # each paced alone: together they overran the window


def test_server_answers_429_with_retry_after_when_the_window_is_full(serve):
    server = serve()
    admin(server, "PUT", "ratelimit", {"limit": 5, "window_s": 2})
    statuses = []
    for _ in range(6):
        response = api(server, "GET", "/Users")
        statuses.append(response.status_code)
    assert statuses == [200] * 5 + [429]
    assert error_of(response, 429)["code"] == "TooManyRequests"
    assert 1 <= int(response.headers["Retry-After"]) <= 2
    assert admin(server, "GET", "ratelimit")["throttled"] == 1


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("faults", "kind"),
    [
        ({"burst_429": 3, "retry_after_s": 0.05}, "429"),
        ({"error_rate": 0.5, "seed": 3}, "status"),
        ({"drop_rate": 0.5, "seed": 1}, "drop"),
        ({"malformed_rate": 0.5, "seed": 7}, "malformed"),
    ],
    ids=["429", "5xx", "dropped", "malformed"],
)
def test_client_recovers_from_injected_faults(serve, faults, kind):
    server = serve()
    admin(server, "PUT", "faults", faults)
    with client_for(server) as client:
        result = client.list("Contacts")
        assert client.patch("Contacts", 3, {"MobilePhoneNumber": "07700 900123"}) is None
        patched = client.get("Contacts", 3)
    assert [r["ContactId"] for r in result.items] == ALL_CONTACTS
    assert patched["MobilePhoneNumber"] == "07700 900123"
    assert admin(server, "GET", "stats")["injected"].get(kind, 0) >= 1


def test_create_is_not_retried_blindly_after_a_dropped_connection(serve):
    server = serve()
    admin(server, "PUT", "faults", {"drop_rate": 1.0})
    body = {"DivisionId": 1, "RoleCode": "DECISN", "Forename": "Once"}
    with client_for(server) as client:
        with pytest.raises(TransientApiError) as err:
            client.create("Contacts", body)
        assert err.value.maybe_applied
        assert client.stats.sent["POST /Contacts"] == 1
        assert admin(server, "GET", "stats")["requests"] == {"POST /Contacts": 1}

        # A 429 means the server did not act, so the create may be sent again.
        admin(server, "PUT", "faults", {"burst_429": 1, "retry_after_s": 0.05})
        created = client.create("Contacts", body)
        assert client.stats.sent["POST /Contacts"] == 3
        assert [c["ContactId"] for c in client.find("Contacts", "Forename", "Once")] == [
            created["ContactId"]
        ]
        # The server's count of what it took: only the create that happened (a 2xx).
        assert admin(server, "GET", "stats")["accepted"]["POST /Contacts"] == 1


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------
def test_token_never_appears_in_logs_errors_or_repr(serve, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "sync_pipeline"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    server = serve()
    admin(server, "PUT", "faults", {"burst_429": 2, "retry_after_s": 0.01})
    errors = []
    with client_for(server) as client:
        client.list("Divisions")
        client.patch("Divisions", 1, {"PhoneNumber": "1"})
        for call in (
            lambda: client.get("Divisions", 999),
            lambda: client.list("Divisions", filter="Name eq"),
            lambda: client.patch("Divisions", 1, {"AccountManager": None}),
        ):
            with pytest.raises(Exception) as err:  # noqa: B017, PT011 - any failure will do
                call()
            errors.append(err.value)
        text = repr(client) + repr(vars(client))
    with client_for(server, token=LOCAL_CRM_TOKEN + "x") as wrong:
        with pytest.raises(AuthError) as err:
            wrong.list("Divisions")
        errors.append(err.value)
    unreachable = CrmClient("http://127.0.0.1:9", LOCAL_CRM_TOKEN, retry=RetrySettings(attempts=1))
    with pytest.raises(TransientApiError) as err:
        unreachable.get("Divisions", 1)
    errors.append(err.value)

    assert any("httpx" in r.name or "httpcore" in r.name for r in caplog.records)
    assert any("retrying" in r.getMessage() for r in caplog.records)
    for blob in [caplog.text, text, *(f"{e} {e!r} {vars(e)}" for e in errors)]:
        assert LOCAL_CRM_TOKEN not in blob


# --------------------------------------------------------------------------------------------
# Durability, admin
# --------------------------------------------------------------------------------------------
def test_state_survives_a_restart(serve, tmp_path):
    store = str(tmp_path / "durable.db")
    first = serve(store_path=store)
    with client_for(first) as client:
        client.patch("Divisions", 4, {"Website": "https://kept.example.com"})
        patched = client.get("Divisions", 4)
        created = client.create(
            "Contacts", {"DivisionId": 4, "RoleCode": "DECISN", "Forename": "Kept"}
        )
        client.upsert_satellite("DivisionXtras", 12, {"StandardTextField1": "kept"})
    first.stop()

    second = serve(store_path=store)  # same world offered again: must not overwrite
    with client_for(second) as client:
        assert client.get("Divisions", 4)["Website"] == "https://kept.example.com"
        assert client.get("Contacts", created["ContactId"])["Forename"] == "Kept"
        assert client.get("DivisionXtras", 12)["StandardTextField1"] == "kept"
        again = client.create(
            "Contacts", {"DivisionId": 4, "RoleCode": "DECISN", "Forename": "Next"}
        )
        assert again["ContactId"] == created["ContactId"] + 1
        later = parse_timestamp(again["LastUpdatedTimestamp"])
        assert later > parse_timestamp(patched["LastUpdatedTimestamp"])


def test_admin_seed_and_reset(serve):
    server = serve()
    seeded = admin(server, "POST", "seed", {"companies": 5, "seed": 1})
    with client_for(server) as client:
        divisions = client.list("Divisions")
        assert len(divisions.items) == seeded["counts"]["Divisions"] > 0
        assert divisions.bad == []
        assert all(TIMESTAMP.match(d["LastUpdatedTimestamp"]) for d in divisions.items)
        assert {c["RoleCode"] for c in client.list("Contacts")} == {"DECISN"}
        admin(server, "POST", "reset")
        assert len(client.list("Contacts").items) == N_CONTACTS


# --------------------------------------------------------------------------------------------
# Client-side parsing (no server needed)
# --------------------------------------------------------------------------------------------
def test_bad_records_are_set_aside_with_a_reason():
    page = {
        "value": [
            {"ContactId": 1, "LastUpdatedTimestamp": "2026-01-01T00:00:00.000001Z"},
            {"Forename": "No key", "LastUpdatedTimestamp": "2026-01-01T00:00:00.000002Z"},
            {"ContactId": 3, "LastUpdatedTimestamp": "yesterday"},
            {"ContactId": 4, "LastUpdatedTimestamp": "2026-01-01T00:00:04.000000Z"},
            {"ContactId": 5, "LastUpdatedTimestamp": "2026-01-01T00:00:05Z", "RoleCode": 7},
        ],
        "@odata.count": 5,
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=page)

    client = CrmClient("http://crm.test", "t0k", transport=httpx.MockTransport(handler))
    result = client.list("Contacts")
    assert [r["ContactId"] for r in result.items] == [1, 4]
    assert [(b.system, b.record_id, b.endpoint) for b in result.bad] == [
        ("CRM", None, "GET /Contacts"),
        ("CRM", "3", "GET /Contacts"),
        ("CRM", "5", "GET /Contacts"),
    ]
    assert "ContactId" in result.bad[0].reason
    assert "LastUpdatedTimestamp" in result.bad[1].reason and "Contacts(3)" in result.bad[1].reason
    assert "RoleCode 7 is not text" in result.bad[2].reason


def test_next_link_to_another_host_is_refused():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"value": [], "@odata.nextLink": "https://evil.test/Contacts?$skip=1"}
        )

    client = CrmClient("http://crm.test", "t0k", transport=httpx.MockTransport(handler))
    with pytest.raises(Exception, match="another host"):
        client.list("Contacts")


def test_query_string_is_percent_encoded_as_sent():
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.query.decode())
        return httpx.Response(200, json={"value": []})

    client = CrmClient("http://crm.test", "t0k", transport=httpx.MockTransport(handler))
    client.find("Contacts", "Surname", "Jones & Co+1 ü")
    assert sent == [
        "$filter=Surname%20eq%20'Jones%20%26%20Co%2B1%20%C3%BC'"
        "&$orderby=ContactId&$count=true&$top=500"
    ]


def test_literals_and_timestamps():
    assert odata_literal("O'Brien") == "'O''Brien'"
    assert odata_literal(None) == "null"
    assert odata_literal(True) == "true"
    assert odata_literal(42) == "42"
    assert odata_literal(1.5) == "1.5"
    moment = datetime(2026, 11, 26, 5, 26, 7, 123456, tzinfo=UTC)
    assert odata_literal(moment) == "2026-11-26T05:26:07.123456Z"  # unquoted, microseconds
    assert format_timestamp(moment) == "2026-11-26T05:26:07.123456Z"
    assert format_timestamp(moment.replace(tzinfo=None)) == "2026-11-26T05:26:07.123456Z"
    assert parse_timestamp("2026-11-26T05:26:07.123456Z") == moment
    assert parse_timestamp("2026-11-26T05:26:07.123Z") == moment.replace(microsecond=123000)
    assert parse_timestamp("2026-11-26T06:26:07+01:00").hour == 5
    with pytest.raises(ValueError):
        parse_timestamp("26/11/2026")
    with pytest.raises(TypeError):
        odata_literal(object())
    assert json.loads(json.dumps(odata_literal("ü"))) == "'ü'"
