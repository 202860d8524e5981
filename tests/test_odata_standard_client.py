"""The local Prospect CRM server through a standard OData v4 client (python-odata, from PyPI),
over real sockets: entities reflected from `$metadata`, filtered queries, gets by integer,
string and composite key, listings, `$expand`, errors and a PATCH.

Where the live service departs from plain OData and the server copies it (an answer capped at
500 rows with no `@odata.nextLink`; a single entity wrapped in `{"value": [...]}`), the tests pin
what python-odata then does, so a user of it against the live API knows what to expect."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
import requests
from odata import ODataService
from odata.exceptions import NoResultsFound, ODataError
from odata.navproperty import NavigationProperty
from odata.property import DatetimeProperty, IntegerProperty, StringProperty

from devservers.common import ServerThread
from devservers.crm_server import LOCAL_CRM_TOKEN, create_app
from sync_pipeline.clients.crm import parse_timestamp
from tests.test_crm_api import (
    ALL_CONTACTS,
    CAP,
    ENTITY_TYPES,
    SURNAMES,
    T0,
    WORLD,
    contact_stamp,
    manager,
)

NS = "ProspectSoft.OData"


def session_for(token: str = LOCAL_CRM_TOKEN) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def reflect(server: ServerThread) -> ODataService:
    return ODataService(
        server.url, reflect_entities=True, session=session_for(), quiet_progress=True
    )


def requests_to(server: ServerThread) -> dict[str, int]:
    response = httpx.get(f"{server.url}/_admin/stats", timeout=10)
    return response.json()["requests"]


@pytest.fixture(scope="module")
def server():
    """One server for the tests that only read: none of them writes to it."""
    with ServerThread(create_app(world=WORLD)) as running:
        yield running


@pytest.fixture(scope="module")
def service(server):
    return reflect(server)


@pytest.fixture
def serve(tmp_path):
    started: list[ServerThread] = []

    def start(**kwargs) -> ServerThread:
        server = ServerThread(create_app(world=WORLD, **kwargs)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def key_names(entity_class) -> list[str]:
    return [prop.name for _, prop in entity_class().__odata__.primary_key_properties]


def test_reflects_every_entity_set_with_its_keys_types_and_navigations(service):
    assert set(service.entities) == set(ENTITY_TYPES)
    assert {name: cls.__odata_type__ for name, cls in service.entities.items()} == {
        name: f"{NS}.{t}" for name, t in ENTITY_TYPES.items()
    }
    division = service.entities["Divisions"]
    user = service.entities["Users"]
    assert key_names(division) == ["DivisionId"]
    assert key_names(user) == ["UserCode"]
    assert key_names(service.entities["SalesLedgers"]) == ["OperatingCompanyCode", "SalesLedgerId"]
    assert key_names(service.entities["ContactRoles"]) == ["Code"]
    assert isinstance(division.DivisionId, IntegerProperty)
    assert isinstance(division.AccountManager, StringProperty)
    assert isinstance(division.LastUpdatedTimestamp, DatetimeProperty)
    assert isinstance(user.UserCode, StringProperty)
    nav = division.AccountManagerUser
    assert isinstance(nav, NavigationProperty)
    assert nav.entitycls.__odata_type__ == f"{NS}.User"
    assert nav.foreign_key == "AccountManager"
    assert division.SalesLedger.entitycls.__odata_type__ == f"{NS}.SalesLedger"


def test_a_filtered_query_reads_typed_fields(service):
    Division = service.entities["Divisions"]
    (found,) = service.query(Division).filter(Division.Name == "O'Brien & Sons Ltd").all()
    assert found.DivisionId == 7
    assert found.AccountManager == manager(7)
    assert found.SalesLedgerId == "SL00007"
    assert found.PhoneNumber == "0115 496 0007"
    assert found.LastUpdatedTimestamp == T0 + timedelta(minutes=7)  # an aware datetime

    Contact = service.entities["Contacts"]
    query = (
        service.query(Contact)
        .filter((Contact.Surname == "Müller") & (Contact.DivisionId == 3))
        .order_by(Contact.ContactId.desc())
    )
    want = [
        c["ContactId"]
        for c in WORLD.crm["Contacts"]
        if c["Surname"] == "Müller" and c["DivisionId"] == 3
    ]
    assert [c.ContactId for c in query] == sorted(want, reverse=True)
    assert {c.Surname for c in query} == {SURNAMES[2]}


def test_a_timestamp_filter_written_by_python_odata_is_exact_to_the_microsecond(service):
    Contact = service.entities["Contacts"]
    query = service.query(Contact).filter(Contact.LastUpdatedTimestamp > contact_stamp(1150))
    # python-odata writes the literal with an offset (...001150+00:00), percent-encoded.
    assert "+00:00" in query.as_string()
    assert [c.ContactId for c in query] == ALL_CONTACTS[1150:]


def test_get_by_integer_string_and_composite_key(server, service):
    Division, User = service.entities["Divisions"], service.entities["Users"]
    SalesLedger = service.entities["SalesLedgers"]
    division = service.query(Division).get(12)
    assert (division.DivisionId, division.Name) == (12, "Company 12")
    xavier = service.query(User).get("XX1")
    assert (xavier.UserName, xavier.EmailAddress) == ("Xavier Xu", "xavier.xu@example.com")
    numbered = service.query(User).get("042")  # a string key that looks like a number
    assert numbered.UserCode == "042"
    ledger = service.query(SalesLedger).get(OperatingCompanyCode="A", SalesLedgerId="SL00003")
    assert ledger.CustomerCode == "CUST003"
    with pytest.raises(NoResultsFound):
        service.query(Division).get(999999)
    with pytest.raises(NoResultsFound):
        service.query(User).get("ZZZ")

    # The entity addresses python-odata writes are ones the service answers, with the live
    # service's single-entity shape: the record inside a `value` array.
    connection = service.default_context.connection
    expected = [
        (division, f"{server.url}/Divisions(12)", "DivisionId", 12),
        (numbered, f"{server.url}/Users('042')", "UserCode", "042"),
        (
            ledger,
            f"{server.url}/SalesLedgers(OperatingCompanyCode='A',SalesLedgerId='SL00003')",
            "SalesLedgerId",
            "SL00003",
        ),
    ]
    for entity, url, field, value in expected:
        assert entity.__odata__.instance_url == url
        body = connection.execute_get(url)
        assert set(body) == {"@odata.context", "value"}
        assert [record[field] for record in body["value"]] == [value]


def test_iterating_a_listing_ends_at_the_500_row_cap_and_pages_with_limit_offset(service):
    User, Contact = service.entities["Users"], service.entities["Contacts"]
    assert sorted(u.UserCode for u in service.query(User)) == ["042", "AB1", "CD1", "HSE", "XX1"]

    # No @odata.nextLink comes (as from the live service): python-odata stops after the first
    # answer, without a word, at the cap.
    assert [c.ContactId for c in service.query(Contact)] == ALL_CONTACTS[:CAP]

    # Paging by hand in key order gets every record exactly once.
    seen: list[int] = []
    while True:
        page = (
            service.query(Contact)
            .order_by(Contact.ContactId.asc())
            .limit(CAP)
            .offset(len(seen))
            .all()
        )
        seen += [c.ContactId for c in page]
        if len(page) < CAP:
            break
    assert seen == ALL_CONTACTS


def test_with_next_links_python_odata_follows_them_to_the_end(serve):
    server = serve(next_links=True)
    service = reflect(server)
    Contact = service.entities["Contacts"]
    assert [c.ContactId for c in service.query(Contact)] == ALL_CONTACTS
    assert requests_to(server)["GET /Contacts"] == 3


def test_expand_brings_the_account_manager_in_the_same_request(server, service):
    Division = service.entities["Divisions"]
    before = requests_to(server).get("GET /Divisions", 0)
    division = (
        service.query(Division)
        .expand(Division.AccountManagerUser)
        .filter(Division.DivisionId == 3)
        .first()
    )
    assert division.AccountManager == "AB1"
    assert division.AccountManagerUser.UserCode == "AB1"
    assert division.AccountManagerUser.EmailAddress == "alice.brown@example.com"
    assert requests_to(server)["GET /Divisions"] == before + 1


def test_errors_reach_python_odata_with_code_message_and_details(server, service):
    Contact, Division = service.entities["Contacts"], service.entities["Divisions"]
    with pytest.raises(ODataError) as err:
        service.query(Contact).raw({"$filter": "Phone eq '1'"})
    assert err.value.status_code == "HTTP 400"
    assert err.value.code == "BadRequest"
    assert "Could not find a property named 'Phone'" in err.value.message
    assert err.value.detailed_message.startswith("(BadRequest): ")

    stranger = service.create_context(session=session_for("not-the-token"))
    with pytest.raises(ODataError) as err:
        stranger.query(Division).first()
    assert (err.value.status_code, err.value.code) == ("HTTP 401", "Unauthorized")


def test_save_patches_with_204_but_the_refresh_is_not_unwrapped(serve):
    server = serve()
    service = reflect(server)
    Division = service.entities["Divisions"]
    division = service.query(Division).get(5)
    old = division.LastUpdatedTimestamp
    division.PhoneNumber = "0115 496 0555"
    service.save(division)

    stored = httpx.get(
        f"{server.url}/Divisions(5)",
        headers={"Authorization": f"Bearer {LOCAL_CRM_TOKEN}"},
        timeout=10,
    ).json()["value"][0]
    assert stored["PhoneNumber"] == "0115 496 0555"  # the PATCH (204) was applied
    assert parse_timestamp(stored["LastUpdatedTimestamp"]) > old
    assert requests_to(server)["PATCH /Divisions({key})"] == 1
    # After a 204, python-odata reads the entity back from /Divisions(5); the live shape
    # `{"value": [record]}` is merged as it is, so the fields keep their values from before
    # the save (the server-set timestamp does not move) and the record sits under "value".
    assert division.PhoneNumber == "0115 496 0555"
    assert division.LastUpdatedTimestamp == old
    assert division.__odata__.data["value"] == [stored]
    # A fresh query sees the server's values.
    again = service.query(Division).get(5)
    assert again.LastUpdatedTimestamp == parse_timestamp(stored["LastUpdatedTimestamp"])
