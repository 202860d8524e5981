"""The Unleashed client against the local Unleashed server, over real sockets on free ports."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest

from devservers.common import FaultConfig, ServerThread
from devservers.unleashed_server import (
    LOCAL_API_ID,
    LOCAL_API_KEY,
    create_app,
    expected_signature,
)
from sync_pipeline.clients.base import (
    AuthError,
    RetrySettings,
    TransientApiError,
    UsageLimitError,
    ValidationError,
    usage_log,
)
from sync_pipeline.clients.dates import decode_date, encode_date, encode_dates, next_month_start
from sync_pipeline.clients.unleashed import (
    Customer,
    UnleashedClient,
    UnleashedValidationError,
    format_modified_since,
    signature,
)
from sync_pipeline.defs.resources import UnleashedResource

FAST_RETRY = RetrySettings(attempts=6, initial_wait=0.01, max_wait=0.3, max_total=15)
BASE = datetime(2025, 1, 1, 9, 0, tzinfo=UTC)
DATE_RE = re.compile(r"^/Date\(\d+\)/$")


def gid(n: int) -> str:
    return str(uuid.UUID(int=n))


SP_ACTIVE = gid(0xA1)
SP_OTHER = gid(0xA2)
SP_OBSOLETE = gid(0xA3)


def make_world(customers: int = 25, big_contacts: int = 0) -> dict:
    salespersons = [
        {"Guid": SP_ACTIVE, "FullName": "Ann Active", "Email": "ann@example.com"},
        {"Guid": SP_OTHER, "FullName": "Bob Other", "Email": "bob@example.com"},
        {
            "Guid": SP_OBSOLETE,
            "FullName": "Old Timer",
            "Email": "old@example.com",
            "Obsolete": True,
        },
    ]
    for sp in salespersons:
        sp.setdefault("Obsolete", False)
        sp["LastModifiedOn"] = BASE
    rows = []
    for i in range(customers):
        rows.append(
            {
                "Guid": gid(i + 1),
                "CustomerCode": f"C{i + 1:03d}",
                "CustomerName": f"Customer {i + 1}",
                "PhoneNumber": f"0161 000 {i:04d}",
                "Website": f"https://c{i + 1}.example.com",
                "Email": f"accounts@c{i + 1}.example.com",
                "Obsolete": i == 3,
                "SalesPerson": (
                    {"Guid": SP_ACTIVE, "FullName": "Ann Active", "Email": "ann@example.com"}
                    if i % 2 == 0
                    else None
                ),
                "CreatedOn": BASE + timedelta(minutes=i),
                "LastModifiedOn": BASE + timedelta(minutes=i, seconds=30),
                "Currency": {"CurrencyCode": "GBP"},
                "Addresses": [{"AddressType": "Postal", "City": "Leeds"}],
                "Notes": f"note {i + 1}",
                "TaxCode": "VAT 20%",
                "Contacts": [
                    {
                        "Guid": gid(10_000 + i * 1000 + j),
                        "FirstName": f"First{j}",
                        "LastName": f"Last{i}",
                        "EmailAddress": f"p{j}@c{i + 1}.example.com",
                        "PhoneNumber": None,
                        "MobilePhone": "07700 900000",
                        "FaxNumber": None,
                        "OfficePhone": None,
                    }
                    for j in range(big_contacts if i == 0 and big_contacts else 2)
                ],
            }
        )
    return {"salespersons": salespersons, "customers": rows}


def start(tmp_path, name: str = "unleashed.db", **kwargs) -> ServerThread:
    kwargs.setdefault("world", make_world())
    return ServerThread(create_app(store_path=str(tmp_path / name), **kwargs)).start()


@pytest.fixture
def server(tmp_path):
    srv = start(tmp_path)
    yield srv
    srv.stop()


def make_client(url: str, **kwargs) -> UnleashedClient:
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("page_size", 7)
    return UnleashedClient(url, LOCAL_API_ID, LOCAL_API_KEY, **kwargs)


@pytest.fixture
def client(server):
    with make_client(server.url) as c:
        yield c


def signed_get(url: str, path: str, query: str = "", **header_overrides) -> httpx.Response:
    headers = {
        "Accept": "application/json",
        "Content-Type": "application/json",
        "api-auth-id": LOCAL_API_ID,
        "api-auth-signature": signature(LOCAL_API_KEY, query),
        "client-type": "acme/crmsync",
    }
    for key, value in header_overrides.items():
        key = key.replace("_", "-")
        if value is None:
            headers.pop(key, None)
        else:
            headers[key] = value
    full = f"{url}{path}?{query}" if query else f"{url}{path}"
    return httpx.get(full, headers=headers)


def admin(server: ServerThread, method: str, path: str, body=None) -> httpx.Response:
    return httpx.request(method, f"{server.url}/_admin{path}", json=body)


# --------------------------------------------------------------------------------------------
# Signing and authentication
# --------------------------------------------------------------------------------------------
def test_signature_known_answer():
    # Computed independently: printf '%s' QUERY | openssl dgst -sha256 -hmac KEY -binary | base64
    key = "test-key-0123456789"
    query = "pageSize=7&includeObsolete=true&modifiedSince=2024-01-02T03:04:05.678"
    assert signature(key, query) == "2e9vsfQEQGs0HjW+yx33zhcYnvOVTgloKw9zs4H0jZI="
    assert signature(key, "") == "FbNEhxPIMDPFVfm4nfuqSAzRo8HgHw2Newml5VrkybY="
    assert expected_signature(key, query.encode()) == signature(key, query)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"api_auth_signature": "AAAA"}, "does not match"),
        ({"api_auth_signature": signature("another-key", "pageSize=5")}, "does not match"),
        ({"api_auth_id": gid(999)}, "api-auth-id"),
        ({"api_auth_signature": None}, "missing"),
        ({"client_type": None}, "client-type"),
        ({"client_type": "Acme/CrmSync"}, "client-type"),
        ({"client_type": "crmsync"}, "client-type"),
    ],
)
def test_bad_credentials_get_403(server, overrides, why):
    response = signed_get(server.url, "/Customers", "pageSize=5", **overrides)
    assert response.status_code == 403
    assert why in response.json()["Description"]


def test_wrong_key_is_an_auth_error_without_the_key(server):
    c = UnleashedClient(server.url, LOCAL_API_ID, "wrong-key-xyz", retry=FAST_RETRY)
    with c, pytest.raises(AuthError) as info:
        c.list_customers()
    assert info.value.status == 403
    assert c.stats.total == 1  # never retried
    assert "wrong-key-xyz" not in str(info.value)


def test_client_type_must_be_lowercase_owner_app():
    with pytest.raises(ValueError, match="client_type"):
        UnleashedClient("http://localhost", LOCAL_API_ID, LOCAL_API_KEY, "Acme/Sync")


def test_signed_raw_request_lists_customers(server):
    response = signed_get(server.url, "/Customers", "pageSize=5&includeObsolete=true")
    assert response.status_code == 200
    body = response.json()
    assert body["Pagination"] == {
        "NumberOfItems": 25,
        "PageSize": 5,
        "PageNumber": 1,
        "NumberOfPages": 5,
    }
    first = body["Items"][0]
    assert DATE_RE.match(first["CreatedOn"]) and DATE_RE.match(first["LastModifiedOn"])
    assert "Contacts" not in first
    # A GUID means one record, an integer a page.
    one = signed_get(server.url, f"/Customers/{first['Guid']}")
    assert one.status_code == 200 and one.json()["CustomerCode"] == first["CustomerCode"]
    assert signed_get(server.url, f"/Customers/{gid(777)}").status_code == 404


def test_page_size_over_the_maximum_is_refused(server):
    response = signed_get(server.url, "/Customers", "pageSize=1001")
    assert response.status_code == 400
    assert response.json()["Items"][0]["Field"] == "pageSize"
    assert signed_get(server.url, "/Customers", "pageSize=1000").status_code == 200


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------
def test_paging_sees_every_record_exactly_once(client):
    seen = []
    for chunk in client.iter_customer_pages():
        seen += [c.Guid for c in chunk.items]
    assert len(seen) == 25 and len(set(seen)) == 25
    assert client.stats.sent["GET /Customers/{page}"] == 4  # 7 + 7 + 7 + 4

    result = client.list_customers()
    assert {c.Guid for c in result.items} == set(seen)
    assert (result.reported_total, result.pages, result.bad) == (25, 4, [])
    modified = [c.LastModifiedOn for c in result.items]
    assert modified == sorted(modified)  # orderBy=LastModifiedOn
    assert all(isinstance(c.LastModifiedOn, datetime) and c.LastModifiedOn.tzinfo for c in result)


class _ModifyAfterFirstPage(httpx.HTTPTransport):
    """Real sockets, plus an edit on the server right after page 1 has been read."""

    def __init__(self, server: ServerThread) -> None:
        super().__init__()
        self.server = server
        self.done = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if not self.done and request.url.path == "/Customers/1":
            self.done = True
            admin(self.server, "PUT", f"/customers/{gid(1)}", {"PhoneNumber": "0113 000 0001"})
        return response


def test_a_record_moving_while_paging_does_not_hide_another(server):
    # gid(1) is first by LastModifiedOn; editing it after page 1 moves it to the end, which
    # shifts every later record back one place: one record of page 2 would be skipped.
    with make_client(server.url, transport=_ModifyAfterFirstPage(server)) as c:
        result = c.list_customers()
    assert len({x.Guid for x in result}) == len(result) == 25
    assert next(x for x in result if x.Guid == gid(1)).PhoneNumber == "0113 000 0001"
    assert result.pages == 8  # a second pass was needed


def test_modified_since_returns_created_or_modified_records(server, client):
    since = datetime.now(UTC)
    client.update_customer(gid(5), {"PhoneNumber": "0113 496 0000"})
    created = client.save_customer({"CustomerCode": "NEW001", "CustomerName": "New Ltd"})
    result = client.list_customers(modified_since=since)
    assert sorted(c.Guid for c in result) == sorted([gid(5), created.Guid])
    # Inclusive at millisecond precision: the exact LastModifiedOn still matches.
    again = client.list_customers(modified_since=created.LastModifiedOn)
    assert [c.Guid for c in again] == [created.Guid]
    # Seconds-only form and the ms form are both accepted; anything else is refused.
    assert (
        signed_get(server.url, "/Customers", "modifiedSince=2099-01-01T00:00:00").json()["Items"]
        == []
    )
    bad = signed_get(server.url, "/Customers", "modifiedSince=yesterday")
    assert bad.status_code == 400 and bad.json()["Items"][0]["Field"] == "modifiedSince"
    assert format_modified_since(datetime(2024, 1, 2, 3, 4, 5, 678900)) == "2024-01-02T03:04:05.678"


def test_include_obsolete_defaults_to_false_on_the_server(server, client):
    raw = signed_get(server.url, "/Customers", "pageSize=100").json()
    assert raw["Pagination"]["NumberOfItems"] == 24
    assert gid(4) not in {c["Guid"] for c in raw["Items"]}
    # The client asks for obsolete customers by default: a delta sync must see retirements.
    listed = client.list_customers()
    assert [c.Obsolete for c in listed if c.Guid == gid(4)] == [True]
    assert len(client.list_customers(include_obsolete=False)) == 24


def test_include_all_contacts_caps_at_100(tmp_path):
    srv = start(tmp_path, world=make_world(customers=3, big_contacts=130))
    try:
        with make_client(srv.url) as c:
            big = next(x for x in c.list_customers() if x.Guid == gid(1))
            assert len(big.Contacts) == 100
            assert len(c.list_contacts(gid(1))) == 130  # the contacts endpoint is not capped
            without = c.list_customers(include_all_contacts=False)
            assert all(x.Contacts is None for x in without)
    finally:
        srv.stop()


def test_customer_code_is_a_starts_with_match(client):
    for code in ("ACME1", "ACME10", "ACME2"):
        client.save_customer({"CustomerCode": code, "CustomerName": code})
    found = client.list_customers(customer_code="ACME1")
    assert sorted(c.CustomerCode for c in found) == ["ACME1", "ACME10"]
    # An exact match is the caller's own check.
    assert [c.CustomerCode for c in found if c.CustomerCode == "ACME1"] == ["ACME1"]


def test_malformed_records_are_set_aside_with_reasons(server, client):
    admin(server, "PUT", f"/customers/{gid(2)}", {"LastModifiedOn": "/Date(oops)/"})
    admin(server, "PUT", f"/customers/{gid(3)}", {"CustomerName": 123})
    contacts = [
        {"Guid": gid(50_001), "FirstName": "Good", "LastName": "One"},
        {"Guid": gid(50_002), "FirstName": 42, "LastName": "Bad"},
    ]
    admin(server, "PUT", f"/customers/{gid(6)}", {"Contacts": contacts})

    result = client.list_customers()
    assert len(result.items) == 23
    reasons = {b.record_id: b.reason for b in result.bad}
    assert "LastModifiedOn" in reasons[gid(2)] and "/Date(oops)/" in reasons[gid(2)]
    assert "CustomerName" in reasons[gid(3)] and "C003" in reasons[gid(3)]
    assert "FirstName" in reasons[gid(50_002)]
    contact_bad = next(b for b in result.bad if b.record_id == gid(50_002))
    assert contact_bad.parent_id == gid(6)
    kept = next(c for c in result if c.Guid == gid(6))
    assert [x.FirstName for x in kept.Contacts] == ["Good"]


def test_record_without_guid_is_set_aside():
    page = {
        "Pagination": {"NumberOfItems": 2, "PageSize": 7, "PageNumber": 1, "NumberOfPages": 1},
        "Items": [
            {"CustomerCode": "NOGUID", "CustomerName": "No Guid"},
            {"Guid": gid(1), "CustomerCode": "OK", "CustomerName": "Fine"},
        ],
    }
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=page))
    with make_client("http://unleashed.test", transport=transport) as c:
        result = c.list_customers()
    assert [x.CustomerCode for x in result] == ["OK"]
    assert result.bad[0].record_id is None
    assert "NOGUID" in result.bad[0].reason and "Guid" in result.bad[0].reason


def test_list_salespersons_includes_obsolete(client):
    result = client.list_salespersons()
    assert {s.Email: s.Obsolete for s in result} == {
        "ann@example.com": False,
        "bob@example.com": False,
        "old@example.com": True,
    }
    assert client.stats.sent["GET /Salespersons/{page}"] == 1


# --------------------------------------------------------------------------------------------
# Writing customers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("website", "why"),
    [
        ("htp://x", "http:// or https://"),
        ("www.example.com", "http:// or https://"),
        ("https://www.example .com", "space"),
        ("http://localhost", "dotted"),
    ],
)
def test_refused_website_names_field_value_and_record(server, client, website, why):
    with pytest.raises(ValidationError) as info:
        client.update_customer(gid(7), {"Website": website})
    error = info.value
    assert isinstance(error, UnleashedValidationError)
    text = str(error)
    assert text.startswith("Unleashed POST /Customers/{guid} failed (HTTP 400): Website")
    assert repr(website) in text and why in text
    assert gid(7) in text and "C007" in text
    assert error.fields == ["Website"] and error.record_id == gid(7)
    assert client.get_customer(gid(7)).Website == "https://c7.example.com"  # nothing written


def test_other_refusals(client):
    cases = [
        ({"CustomerName": "No code"}, "CustomerCode"),
        ({"CustomerCode": "X1", "CustomerName": ""}, "CustomerName"),
        ({"CustomerCode": "C001", "CustomerName": "Duplicate code"}, "CustomerCode"),
        (
            {"CustomerCode": "X2", "CustomerName": "n", "SalesPerson": {"Guid": gid(404)}},
            "SalesPerson",
        ),
        (  # the client sends either spelling as SalesPerson
            {"CustomerCode": "X3", "CustomerName": "n", "Salesperson": {"Guid": SP_OBSOLETE}},
            "SalesPerson",
        ),
    ]
    for body, field in cases:
        with pytest.raises(UnleashedValidationError) as info:
            client.save_customer(body)
        assert info.value.fields == [field], body


def test_post_is_a_full_replace(client):
    before = client.get_customer(gid(8))
    assert before.model_extra["Notes"] == "note 8"
    wire = before.to_wire(include_contacts=False)
    del wire["Notes"], wire["Currency"]
    saved = client.save_customer(wire)
    assert "Notes" not in saved.model_extra and "Currency" not in saved.model_extra
    assert saved.CreatedOn == before.CreatedOn  # server-owned
    assert saved.LastModifiedOn > before.LastModifiedOn
    # Contacts are kept: they have their own endpoints.
    assert len(client.list_contacts(gid(8))) == 2


def test_update_customer_keeps_unknown_fields_in_two_requests(client):
    before = client.get_customer(gid(9))
    sent_before = client.stats.total
    after = client.update_customer(
        gid(9), {"Website": "https://new.example.org", "Salesperson": {"Guid": SP_OTHER}}
    )
    assert client.stats.total - sent_before == 2
    assert after.Website == "https://new.example.org"
    assert after.SalesPerson.Guid == SP_OTHER and after.SalesPerson.FullName == "Bob Other"
    assert after.SalesPerson.Email == "bob@example.com"
    for key in ("Notes", "Currency", "Addresses", "TaxCode"):
        assert after.model_extra[key] == before.model_extra[key]
    assert (after.PhoneNumber, after.Email) == (before.PhoneNumber, before.Email)
    cleared = client.update_customer(gid(9), {"SalesPerson": None})
    assert cleared.SalesPerson is None


def test_a_retired_salesperson_stays_but_cannot_be_newly_assigned(server, client):
    customer = client.get_customer(gid(15))
    assert customer.SalesPerson is not None and customer.SalesPerson.Guid == SP_ACTIVE
    admin(
        server,
        "POST",
        "/salespersons",
        {"Guid": SP_ACTIVE, "Email": "ann@example.com", "FullName": "Ann Active", "Obsolete": True},
    )
    kept = client.update_customer(gid(15), {"PhoneNumber": "0113 496 0999"})
    assert kept.SalesPerson.Guid == SP_ACTIVE and kept.SalesPerson.Obsolete
    with pytest.raises(UnleashedValidationError, match="obsolete salesperson"):
        client.update_customer(gid(16), {"SalesPerson": {"Guid": SP_ACTIVE}})


def test_customer_model_round_trip():
    raw = {
        "Guid": gid(1),
        "CustomerCode": "A",
        "Salesperson": {"Guid": SP_ACTIVE, "LastModifiedOn": "/Date(1449745526820)/"},
        "LastModifiedOn": "/Date(1449745526820)/",
        "Custom": {"Nested": "/Date(5)/"},
    }
    customer = Customer.model_validate(raw)
    assert customer.SalesPerson.Guid == SP_ACTIVE
    assert customer.LastModifiedOn == datetime(2015, 12, 10, 11, 5, 26, 820000, tzinfo=UTC)
    wire = customer.to_wire()
    assert wire["SalesPerson"]["LastModifiedOn"] == "/Date(1449745526820)/"
    assert wire["LastModifiedOn"] == "/Date(1449745526820)/"
    assert wire["Custom"] == {"Nested": "/Date(5)/"} and "Salesperson" not in wire
    assert decode_date("/Date(1449745526820+0000)/") == customer.LastModifiedOn
    assert encode_dates({"a": [BASE]}) == {"a": [encode_date(BASE)]}
    with pytest.raises(ValueError):
        decode_date("/Date(abc)/")


# --------------------------------------------------------------------------------------------
# Contacts
# --------------------------------------------------------------------------------------------
def test_contact_create_update_delete_and_uniqueness(client):
    customer = gid(10)
    new = client.create_contact(
        customer, {"FirstName": "Zoë", "LastName": "Ångström", "EmailAddress": "zoe@x.example"}
    )
    assert new.Guid
    with pytest.raises(UnleashedValidationError) as info:
        client.create_contact(
            customer, {"FirstName": "zoë", "LastName": "Ångström", "EmailAddress": "ZOE@x.example"}
        )
    assert "not unique" in str(info.value) and customer in str(info.value)
    # The same person under another customer is fine.
    client.create_contact(
        gid(11), {"FirstName": "Zoë", "LastName": "Ångström", "EmailAddress": "zoe@x.example"}
    )

    sent_before = client.stats.total
    updated = client.update_contact(customer, new.Guid, {"MobilePhone": "07700 900123"})
    assert client.stats.total - sent_before == 2
    assert (updated.FirstName, updated.MobilePhone) == ("Zoë", "07700 900123")

    others = [c for c in client.list_contacts(customer) if c.Guid != new.Guid]
    with pytest.raises(UnleashedValidationError):  # renaming onto another contact's identity
        client.update_contact(
            customer,
            new.Guid,
            {k: getattr(others[0], k) for k in ("FirstName", "LastName", "EmailAddress")},
        )

    assert client.delete_contact(customer, new.Guid) is True
    assert new.Guid not in {c.Guid for c in client.list_contacts(customer)}
    assert client.delete_contact(customer, new.Guid) is False


def test_contact_change_bumps_customer_last_modified(client):
    before = client.get_customer(gid(12)).LastModifiedOn
    contact = client.list_contacts(gid(12))[0]
    client.update_contact(gid(12), contact.Guid, {"PhoneNumber": "0113 496 0123"})
    after_update = client.get_customer(gid(12)).LastModifiedOn
    assert after_update > before
    client.delete_contact(gid(12), contact.Guid)
    assert client.get_customer(gid(12)).LastModifiedOn > after_update


# --------------------------------------------------------------------------------------------
# Durability, throttling and faults
# --------------------------------------------------------------------------------------------
def test_state_survives_a_restart(tmp_path):
    srv = start(tmp_path)
    with make_client(srv.url) as c:
        c.update_customer(gid(13), {"Website": "https://kept.example.com"})
        contact = c.create_contact(gid(13), {"FirstName": "Kept", "LastName": "Contact"})
    srv.stop()
    srv = start(tmp_path, world=make_world(customers=2))  # same file: the world is not reloaded
    try:
        with make_client(srv.url) as c:
            assert len(c.list_customers()) == 25
            assert c.get_customer(gid(13)).Website == "https://kept.example.com"
            assert contact.Guid in {x.Guid for x in c.list_contacts(gid(13))}
    finally:
        srv.stop()


def test_paced_client_never_hits_the_server_throttle(tmp_path):
    # Server: 1,200 requests/minute counted over a 1-second moving window (20 per second).
    srv = start(tmp_path, requests_per_minute=1200, throttle_window_s=1)
    try:
        with make_client(srv.url, retry=RetrySettings(attempts=1)) as unpaced:
            with pytest.raises(TransientApiError) as info:
                for _ in range(40):
                    unpaced.get_customer(gid(1))
            assert info.value.status == 429 and info.value.retry_after >= 1
        time.sleep(1.1)
        with make_client(srv.url, requests_per_minute=1140) as paced:  # 19 per second
            started = time.monotonic()
            for _ in range(60):
                paced.get_customer(gid(1))
            elapsed = time.monotonic() - started
        assert paced.stats.statuses == {200: 60}
        assert elapsed > 2.0  # paced: 60 requests at 19/s cannot finish sooner
    finally:
        srv.stop()


def test_the_monthly_usage_limit_blocks_every_request_until_it_resets(tmp_path):
    """The Unleashed API (docs/api-assumptions.md): once the account's monthly usage limit is used,
    Unleashed blocks every request until the 1st of the next month. The server counts the account's
    requests (not those its auth check refused) per calendar month and refuses the rest; the client
    raises UsageLimitError at once, without retries (each would be refused too), naming the
    reset."""
    srv = start(tmp_path, monthly_quota=5)
    try:
        assert signed_get(srv.url, "/Customers/1", api_auth_signature="bad").status_code == 403
        with make_client(srv.url) as c:
            for _ in range(5):
                c.get_customer(gid(1))
            with pytest.raises(UsageLimitError) as info:
                c.get_customer(gid(1))
            assert c.stats.sent == {"GET /Customers/{guid}": 6}
        reset = next_month_start(datetime.now(UTC))
        assert info.value.status == 429
        assert abs((info.value.resets_at - reset).total_seconds()) < 5
        assert f"blocked until the limit resets on {reset:%Y-%m-%d} 00:00 UTC" in str(info.value)
        raw = signed_get(srv.url, "/Customers/1")
        wait = int(raw.headers["Retry-After"])
        assert raw.status_code == 429
        assert abs(datetime.now(UTC) + timedelta(seconds=wait) - reset) < timedelta(seconds=5)
        assert admin(srv, "GET", "/quota").json()["used"] == 5
    finally:
        srv.stop()
    srv = start(tmp_path, monthly_quota=5)  # the count is kept across a restart
    try:
        with make_client(srv.url) as c:
            with pytest.raises(UsageLimitError):
                c.list_salespersons()
            assert admin(srv, "PUT", "/quota", {"monthly_quota": 8}).json()["used"] == 5
            assert c.get_customer(gid(1)).Guid == gid(1)  # a raised limit lets requests through
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("status", "headers", "body", "limit"),
    [
        (429, {"Retry-After": "7200"}, {"Description": "Too many requests"}, "retry-after"),
        (429, {}, {"Description": "API usage limit reached"}, "next-month"),
        (403, {}, {"Description": "Monthly API quota exceeded"}, "next-month"),
        (429, {"Retry-After": "2"}, {"Description": "Too many requests"}, None),
        (403, {}, {"Description": "api-auth-signature does not match"}, None),
    ],
    ids=["long-retry-after", "429-text", "403-text", "throttle", "bad-signature"],
)
def test_usage_limit_answers_are_told_apart_from_throttling_and_bad_credentials(
    status, headers, body, limit
):
    """The live answer to a blocked request is not documented (docs/api-assumptions.md): a 429
    or 403 that says the usage limit or quota is used up, or a 429 asking to wait over an hour,
    is the usage limit; an ordinary throttle is retried and a bad signature is an auth error."""
    sent = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(status, headers=headers, json=body)

    client = make_client(
        "https://unleashed.test",
        transport=httpx.MockTransport(answer),
        retry=RetrySettings(attempts=2, initial_wait=0.01, max_wait=0.01),
    )
    with client, pytest.raises(Exception) as info:
        client.get_customer(gid(1))
    now = datetime.now(UTC)
    if limit is None:
        assert not isinstance(info.value, UsageLimitError)
        assert isinstance(info.value, TransientApiError if status == 429 else AuthError)
        return
    assert isinstance(info.value, UsageLimitError) and len(sent) == 1
    expected = now + timedelta(hours=2) if limit == "retry-after" else next_month_start(now)
    assert abs(info.value.resets_at - expected) < timedelta(seconds=5)


def test_requests_are_counted_per_month_in_the_pacing_file_by_every_client(tmp_path):
    """What the account's monthly limit counts, as far as this deployment goes: every client
    (every run process) adds its requests to the pacing file's count when it closes, also
    when its last request failed; another month is another count."""
    srv = start(tmp_path, monthly_quota=4)
    pacing = str(tmp_path / "pacing.sqlite")
    log = usage_log(pacing, srv.url + "/")
    try:
        with make_client(srv.url, pacing_file=pacing) as c:
            c.get_customer(gid(1))
            c.get_customer(gid(2))
        assert log.this_month() == 2
        with make_client(srv.url, pacing_file=pacing) as c:
            c.get_customer(gid(1))
            c.get_customer(gid(2))
            with pytest.raises(UsageLimitError):
                c.get_customer(gid(3))
        assert log.this_month() == 5
        assert log.this_month(datetime.now(UTC) + timedelta(days=40)) == 0
        assert usage_log(None, srv.url) is None  # no pacing file: not counted
    finally:
        srv.stop()


def test_a_used_up_limit_is_kept_in_the_pacing_file_until_a_request_succeeds(tmp_path):
    """The refusal is recorded for every process of the deployment (the automation pauses on
    it): the time it was seen and the reset, under the account's key, never the credentials.
    The next successful request clears it, from the client that was refused or from any other
    (the limit was raised, or has reset)."""
    srv = start(tmp_path, monthly_quota=2)
    pacing = str(tmp_path / "pacing.sqlite")
    mine, other_process = usage_log(pacing, srv.url), usage_log(pacing, srv.url + "/")
    try:
        with make_client(srv.url, pacing_file=pacing) as c:
            c.get_customer(gid(1))
            assert mine.blocked_until() is None
            c.get_customer(gid(1))
            before = datetime.now(UTC)
            with pytest.raises(UsageLimitError) as info:
                c.get_customer(gid(1))
            block = other_process.current_block()
            assert block is not None and block.resets_at == info.value.resets_at
            assert abs(block.resets_at - next_month_start(before)) < timedelta(seconds=5)
            assert before <= block.seen_at <= datetime.now(UTC)
            assert mine.blocked_until() == info.value.resets_at
            admin(srv, "PUT", "/quota", {"monthly_quota": 3})  # the account bought more calls
            c.get_customer(gid(1))  # the refused client itself succeeds
        assert mine.blocked_until() is None and other_process.blocked_until() is None

        with make_client(srv.url, pacing_file=pacing) as c, pytest.raises(UsageLimitError):
            c.get_customer(gid(1))
        assert other_process.blocked_until() is not None
        admin(srv, "PUT", "/quota", {"monthly_quota": None})
        with make_client(srv.url, pacing_file=pacing) as another:  # another run process
            another.list_salespersons()
        assert mine.blocked_until() is None
    finally:
        srv.stop()
    with sqlite3.connect(pacing) as con:
        accounts = {a for (a,) in con.execute("SELECT account FROM api_usage")}
        accounts |= {a for (a,) in con.execute("SELECT account FROM api_usage_block")}
    assert accounts == {hashlib.sha256(srv.url.encode()).hexdigest()[:16]}
    stored = (tmp_path / "pacing.sqlite").read_bytes()
    for secret in (LOCAL_API_KEY, LOCAL_API_ID, srv.url):
        assert secret.encode() not in stored


def test_a_pacing_file_from_the_previous_version_keeps_working(tmp_path):
    """The block table had a fourth column (the last probe) before probes were decided from the
    refusal alone: a file written then is read and written as it is."""
    pacing = tmp_path / "pacing.sqlite"
    with sqlite3.connect(pacing) as con:
        con.execute(
            """CREATE TABLE api_usage_block (account TEXT PRIMARY KEY, seen_at TEXT NOT NULL,
               resets_at TEXT NOT NULL, probed_at TEXT)"""
        )
    log = usage_log(str(pacing), "https://api.unleashedsoftware.com")
    seen, reset = datetime(2026, 11, 23, 10, 0, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    log.block(reset, now=seen)
    block = log.current_block(seen)
    assert (block.seen_at, block.resets_at) == (seen, reset)
    log.clear()
    assert log.current_block(seen) is None


def test_a_block_ends_at_its_reset_and_no_pacing_file_keeps_none(tmp_path, monkeypatch):
    """Once the reset time is reached the block is over, whether or not a request has succeeded
    since; a later refusal moves the next probe, and a new block has its own reset. Without a
    pacing file nothing is kept: the automation cannot pause, and runs stop as before."""
    log = usage_log(str(tmp_path / "pacing.sqlite"), "https://api.unleashedsoftware.com")
    seen, reset = datetime(2026, 11, 23, 10, 0, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    log.block(reset, now=seen)
    assert log.blocked_until(seen) == reset
    assert log.blocked_until(reset - timedelta(seconds=1)) == reset
    assert log.blocked_until(reset) is None and log.current_block(reset) is None
    later = seen + timedelta(hours=1, minutes=1)
    log.block(reset, now=later)  # refused again (a probe): the next probe counts from then
    assert log.current_block(seen).seen_at == later
    assert log.current_block(later).next_probe() == later + timedelta(minutes=55)
    log.block(datetime(2027, 1, 1, tzinfo=UTC), now=datetime(2026, 12, 20, tzinfo=UTC))
    assert log.current_block(datetime(2026, 12, 20, tzinfo=UTC)).resets_at == datetime(
        2027, 1, 1, tzinfo=UTC
    )

    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    refuse = httpx.MockTransport(
        lambda request: httpx.Response(429, json={"Description": "API usage limit reached"})
    )
    client = make_client("https://unleashed.test", transport=refuse)
    with client, pytest.raises(UsageLimitError):
        client.get_customer(gid(1))
    resource = UnleashedResource(
        base_url="https://unleashed.test", api_id=LOCAL_API_ID, api_key=LOCAL_API_KEY
    )
    assert resource.usage_blocked_until() is None and resource.requests_this_month() is None
    assert list(workdir.iterdir()) == []


def test_the_usage_limit_resets_on_the_first_of_the_next_month_utc():
    assert next_month_start(datetime(2026, 11, 27, 12, 0, tzinfo=UTC)) == datetime(
        2026, 12, 1, tzinfo=UTC
    )
    assert next_month_start(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)) == datetime(
        2027, 1, 1, tzinfo=UTC
    )
    # 1 Dec 10:00 in Auckland is still 30 Nov in UTC: the reset is that night, not next month.
    auckland = timezone(timedelta(hours=13))
    assert next_month_start(datetime(2026, 12, 1, 10, 0, tzinfo=auckland)) == datetime(
        2026, 12, 1, tzinfo=UTC
    )


@pytest.mark.parametrize(
    "faults",
    [
        FaultConfig(burst_429=2, retry_after_s=0.1),
        FaultConfig(error_rate=0.3, seed=1),
        FaultConfig(drop_rate=0.4, seed=3),
        FaultConfig(malformed_rate=0.4, seed=1),
    ],
    ids=["429", "5xx", "dropped", "malformed"],
)
def test_recovers_from_injected_faults(tmp_path, faults):
    srv = start(tmp_path, faults=faults)
    try:
        with make_client(srv.url) as c:
            result = c.list_customers()
            assert len(result) == 25 and result.bad == []
            retries = c.stats.total - result.pages
            assert retries > 0
            stats = admin(srv, "GET", "/stats").json()
            assert sum(stats["injected"].values()) == retries
            assert stats["requests"]["GET /Customers/{page}"] == c.stats.total
    finally:
        srv.stop()


def test_a_create_is_not_retried_blindly_after_a_dropped_connection(tmp_path):
    srv = start(tmp_path, faults=FaultConfig(drop_rate=1.0))
    try:
        with make_client(srv.url) as c:
            with pytest.raises(TransientApiError) as info:
                c.create_contact(gid(1), {"FirstName": "Only", "LastName": "Once"})
            assert info.value.maybe_applied
            assert c.stats.sent == {"POST /Customers/{guid}/Contacts": 1}
        assert admin(srv, "GET", "/stats").json()["requests"] == {
            "POST /Customers/{guid}/Contacts": 1
        }
    finally:
        srv.stop()


def test_save_customer_is_idempotent_and_retried_after_a_drop(tmp_path):
    # seed 1: the first request is dropped, the second goes through.
    srv = start(tmp_path, faults=FaultConfig(drop_rate=0.5, seed=1))
    try:
        with make_client(srv.url) as c:
            saved = c.save_customer({"CustomerCode": "RETRY1", "CustomerName": "Retried Ltd"})
            assert c.stats.sent == {"POST /Customers/{guid}": 2}
        admin(srv, "PUT", "/faults", {})
        with make_client(srv.url) as c:
            assert [x.Guid for x in c.list_customers(customer_code="RETRY1")] == [saved.Guid]
    finally:
        srv.stop()


def test_secrets_never_reach_logs_errors_or_repr(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "sync_pipeline"):
        caplog.set_level(logging.DEBUG, logger=name)  # restored after the test
    secret_key = "very-secret-unleashed-key-42"
    srv = start(tmp_path, api_key=secret_key, faults=FaultConfig(burst_429=1, retry_after_s=0.05))
    try:
        with UnleashedClient(srv.url, LOCAL_API_ID, secret_key, retry=FAST_RETRY) as c:
            c.list_customers()
            with pytest.raises(ValidationError) as refused:
                c.update_customer(gid(1), {"Website": "not a url"})
            texts = [repr(c), str(vars(c)), str(refused.value), caplog.text]
        with UnleashedClient(srv.url, LOCAL_API_ID, secret_key + "x", retry=FAST_RETRY) as bad:
            with pytest.raises(AuthError) as denied:
                bad.list_customers()
            texts += [repr(bad), str(denied.value), caplog.text]
    finally:
        srv.stop()
    assert "retrying" in caplog.text and "HTTP Request" in caplog.text  # the logs did run
    for text in texts:
        assert secret_key not in text
        assert LOCAL_API_ID not in text


# --------------------------------------------------------------------------------------------
# Seeded world and admin endpoints
# --------------------------------------------------------------------------------------------
def test_seeded_world_and_admin_endpoints(tmp_path):
    seed = pytest.importorskip("devservers.seed")
    world = seed.generate_world(companies=20, seed=3)
    srv = start(tmp_path, world=world)
    try:
        with make_client(srv.url, page_size=1000) as c:
            result = c.list_customers()
            assert len(result) == 20 and result.bad == []
            assert len(c.list_salespersons().bad) == 0
            reseeded = admin(srv, "POST", "/seed", {"companies": 12, "seed": 1}).json()
            assert reseeded["customers"] == 12
            assert len(c.list_customers()) == 12
            added = admin(
                srv, "POST", "/salespersons", {"FullName": "New Rep", "Email": "rep@example.com"}
            ).json()
            assert DATE_RE.match(added["LastModifiedOn"])
            assert "rep@example.com" in {s.Email for s in c.list_salespersons()}
            raw = admin(srv, "GET", f"/customers/{result.items[0].Guid}")
            assert raw.status_code == 404  # reseeding replaced every customer
            admin(srv, "POST", "/reset")
            assert len(c.list_customers()) == 20  # reset returns to the world the server began with
    finally:
        srv.stop()


def test_admin_requests_are_not_counted_or_faulted(server):
    assert admin(server, "PUT", "/faults", {"error_rate": 1.0}).status_code == 200
    assert admin(server, "GET", f"/customers/{gid(1)}").json()["CustomerCode"] == "C001"
    stats = admin(server, "GET", "/stats").json()
    assert stats["total_requests"] == 0
    assert json.loads(json.dumps(stats["faults"]))["error_rate"] == 1.0
