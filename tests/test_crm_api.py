"""The CRM client against the local Prospect CRM server, over real sockets: auth, OData query
options, paging, writes, the workspace rate limit, injected faults, secrets, durability."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from sync_pipeline.clients.base import (
    AuthError,
    NotFoundError,
    RetrySettings,
    TransientApiError,
    ValidationError,
)
from sync_pipeline.clients.crm import (
    CrmClient,
    TenantFacts,
    format_timestamp,
    odata_literal,
    parse_timestamp,
)
from sync_pipeline.emulators.common import ServerThread
from sync_pipeline.emulators.crm_server import LOCAL_CRM_TOKEN, create_app

T0 = datetime(2025, 1, 1, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]
SURNAMES = ["Smith", "O'Brien", "Müller", "Jones & Co", "Taylor+Sons", "Ng"]
FAST_RETRY = RetrySettings(attempts=10, initial_wait=0.01, max_wait=0.05, max_total=15)
N_CONTACTS = 250
N_DIVISIONS = 10


def _manager(division_id: int) -> int | None:
    return None if division_id == N_DIVISIONS else division_id % 3 + 1


def make_world(contacts: int = N_CONTACTS) -> SimpleNamespace:
    """A small tenant in the seed.generate_world().crm shape (timestamps as aware datetimes)."""
    users = [
        {
            "UserId": u,
            "Name": f"User {u}",
            "Email": f"user{u}@example.com",
            "Active": u != 3,
            "LastModified": T0,
        }
        for u in (1, 2, 3)
    ]
    divisions = [
        {
            "DivisionId": d,
            "CompanyId": d,
            "Name": f"Company {d}",
            "Phone": f"0115 496 0{d:03}",
            "Website": f"https://co{d}.example.com" if d % 2 else None,
            "AccountManagerId": _manager(d),
            "UnleashedGuid": None,
            "StatusFlag": "A",
            "LastModified": T0 + timedelta(minutes=d),
        }
        for d in range(1, N_DIVISIONS + 1)
    ]
    people = [
        {
            "ContactId": c,
            "DivisionId": c % N_DIVISIONS + 1,
            "Title": None,
            "Forename": f"First{c % 17}",
            "Surname": SURNAMES[c % len(SURNAMES)],
            "Email": f"c{c}@example.com" if c % 5 else None,
            "Phone": f"+44 115 496 {c:04}",
            "Mobile": None,
            "Fax": None,
            "UnleashedGuid": None,
            "StatusFlag": "A" if c % 9 else "I",
            "LastModified": T0 + timedelta(seconds=c),
        }
        for c in range(1, contacts + 1)
    ]
    ledgers = [
        {"SalesLedgerId": d, "DivisionId": d, "AccountCode": f"CUST{d:03}", "LastModified": T0}
        for d in range(1, N_DIVISIONS + 1)
    ]
    return SimpleNamespace(
        crm={"Users": users, "Divisions": divisions, "Contacts": people, "SalesLedgers": ledgers}
    )


WORLD = make_world()


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


def client_for(server: ServerThread, token: str = LOCAL_CRM_TOKEN, **kwargs) -> CrmClient:
    kwargs.setdefault("retry", FAST_RETRY)
    return CrmClient(server.url, token, **kwargs)


def admin(server: ServerThread, method: str, path: str, body: dict | None = None) -> dict:
    response = httpx.request(method, f"{server.url}/_admin/{path}", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


AUTH = {"Authorization": f"Bearer {LOCAL_CRM_TOKEN}"}


# --------------------------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------------------------
def test_missing_or_wrong_token_gets_401_with_odata_error(serve):
    server = serve()
    response = httpx.get(f"{server.url}/Divisions")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "Unauthorized"

    with client_for(server, token="not-the-token") as client, pytest.raises(AuthError) as err:
        client.list("Divisions")
    assert err.value.status == 401
    assert client.stats.sent["GET /Divisions"] == 1  # auth failures are not retried


# --------------------------------------------------------------------------------------------
# Paging
# --------------------------------------------------------------------------------------------
def test_server_paging_follows_next_links_to_every_record_exactly_once(serve):
    server = serve(page_size=40)
    # Raw: the server's own page size, absolute nextLinks.
    ids, url, pages = [], f"{server.url}/Contacts?$count=true", 0
    while url:
        body = httpx.get(url, headers=AUTH).json()
        assert body["@odata.count"] == N_CONTACTS
        ids += [r["ContactId"] for r in body["value"]]
        url, pages = body.get("@odata.nextLink"), pages + 1
        assert url is None or url.startswith(server.url)
    assert pages == 7
    assert sorted(ids) == list(range(1, N_CONTACTS + 1))

    # Client: Prefer odata.maxpagesize decides the page size.
    with client_for(server, page_size=40) as client:
        result = client.list("Contacts")
    assert result.pages == 7
    assert result.reported_total == N_CONTACTS
    assert [r["ContactId"] for r in result.items] == list(range(1, N_CONTACTS + 1))
    assert result.bad == []


def test_paging_with_filter_and_multi_key_orderby(serve):
    server = serve(page_size=40)
    with client_for(server, page_size=30) as client:
        result = client.list(
            "Contacts",
            filter="StatusFlag eq 'A' and ContactId ne 7",
            orderby="Surname desc, Forename asc",
        )
    expected = [c for c in WORLD.crm["Contacts"] if c["StatusFlag"] == "A" and c["ContactId"] != 7]
    expected.sort(key=lambda c: (c["Forename"], c["ContactId"]))
    expected.sort(key=lambda c: c["Surname"], reverse=True)
    assert [r["ContactId"] for r in result.items] == [c["ContactId"] for c in expected]
    assert result.reported_total == len(expected)
    assert result.pages == -(-len(expected) // 30)


def test_prefer_maxpagesize_is_capped_at_1000(serve):
    server = serve()
    response = httpx.get(
        f"{server.url}/Contacts", headers={**AUTH, "Prefer": "odata.maxpagesize=5000"}
    )
    assert len(response.json()["value"]) == N_CONTACTS
    assert response.headers["Preference-Applied"] == "odata.maxpagesize=1000"


def test_a_record_modified_while_paging_is_neither_lost_nor_duplicated(serve):
    server = serve()
    with client_for(server) as client:
        first = httpx.get(
            f"{server.url}/Contacts?$orderby=LastModified",
            headers={**AUTH, "Prefer": "odata.maxpagesize=50"},
        ).json()
        client.patch("Contacts", 10, {"Phone": "moved to the end"})  # was on page one
        seen = [r["ContactId"] for r in first["value"]]
        url = first["@odata.nextLink"]
        while url:
            body = httpx.get(url, headers={**AUTH, "Prefer": "odata.maxpagesize=50"}).json()
            seen += [r["ContactId"] for r in body["value"]]
            url = body.get("@odata.nextLink")
    assert set(seen) == set(range(1, N_CONTACTS + 1))  # nothing skipped
    assert seen.count(10) == 2  # seen again in its new place; the client keeps the later one


# --------------------------------------------------------------------------------------------
# Query options
# --------------------------------------------------------------------------------------------
def _division_of(contact):
    return contact["DivisionId"]


FILTERS = [
    ("ContactId eq 7", lambda c: c["ContactId"] == 7),
    ("ContactId ne 7", lambda c: c["ContactId"] != 7),
    ("ContactId gt 240", lambda c: c["ContactId"] > 240),
    ("ContactId ge 240", lambda c: c["ContactId"] >= 240),
    ("ContactId lt 5", lambda c: c["ContactId"] < 5),
    ("ContactId le 5", lambda c: c["ContactId"] <= 5),
    (
        "Surname eq 'O''Brien' and StatusFlag eq 'A'",
        lambda c: c["Surname"] == "O'Brien" and c["StatusFlag"] == "A",
    ),
    ("ContactId lt 3 or ContactId gt 248", lambda c: c["ContactId"] < 3 or c["ContactId"] > 248),
    (
        "(ContactId lt 10 or ContactId gt 240) and not (DivisionId eq 2)",
        lambda c: (c["ContactId"] < 10 or c["ContactId"] > 240) and c["DivisionId"] != 2,
    ),
    ("contains(Email,'c1')", lambda c: c["Email"] is not None and "c1" in c["Email"]),
    ("contains(Surname,'ü')", lambda c: "ü" in c["Surname"]),
    ("Surname eq 'Jones & Co'", lambda c: c["Surname"] == "Jones & Co"),
    ("Surname eq 'Taylor+Sons'", lambda c: c["Surname"] == "Taylor+Sons"),
    ("Email eq null", lambda c: c["Email"] is None),
    ("Email ne null", lambda c: c["Email"] is not None),
    (
        "LastModified gt 2025-01-01T00:03:20.000Z",
        lambda c: c["LastModified"] > T0 + timedelta(seconds=200),
    ),
    (
        "LastModified le 2025-01-01T00:00:10Z",
        lambda c: c["LastModified"] <= T0 + timedelta(seconds=10),
    ),
    (
        "Division/AccountManager/Email eq 'user2@example.com'",
        lambda c: _manager(c["DivisionId"]) == 2,
    ),
]


@pytest.mark.parametrize(("expression", "expected"), FILTERS, ids=[f for f, _ in FILTERS])
def test_filter_operators(serve, expression, expected):
    server = serve()
    with client_for(server) as client:
        result = client.list("Contacts", filter=expression)
    want = sorted(c["ContactId"] for c in WORLD.crm["Contacts"] if expected(c))
    assert want, "the filter should select something"
    assert sorted(r["ContactId"] for r in result.items) == want
    assert result.reported_total == len(want)


def test_filter_on_booleans_and_navigation_of_divisions(serve):
    server = serve()
    with client_for(server) as client:
        inactive = client.list("Users", filter="Active eq false")
        managed_by_1 = client.list("Divisions", filter="AccountManager/UserId eq 1")
        unmanaged = client.list("Divisions", filter="AccountManagerId eq null")
    assert [u["UserId"] for u in inactive.items] == [3]
    assert sorted(d["DivisionId"] for d in managed_by_1.items) == [
        d for d in range(1, N_DIVISIONS + 1) if _manager(d) == 1
    ]
    assert [d["DivisionId"] for d in unmanaged.items] == [N_DIVISIONS]


def test_select_expand_count_top_skip(serve):
    server = serve()
    with client_for(server) as client:
        selected = client.list("Divisions", select=["Name"], count=False)
        expanded = client.list("Divisions", expand="AccountManager")
        narrow = client.list("Divisions", expand="AccountManager($select=UserId,Email)")
    # The client always adds the key and LastModified to a $select.
    assert set(selected.items[0]) == {"DivisionId", "LastModified", "Name"}
    assert selected.reported_total is None
    first = expanded.items[0]
    assert first["AccountManager"]["UserId"] == first["AccountManagerId"]
    assert first["AccountManager"]["Email"] == f"user{first['AccountManagerId']}@example.com"
    assert expanded.items[-1]["AccountManager"] is None  # division 10 has no manager
    assert set(narrow.items[0]["AccountManager"]) == {"UserId", "Email"}

    body = httpx.get(
        f"{server.url}/Contacts?$top=5&$skip=10&$count=true&$orderby=ContactId desc",
        headers=AUTH,
    ).json()
    assert [r["ContactId"] for r in body["value"]] == [240, 239, 238, 237, 236]
    assert body["@odata.count"] == N_CONTACTS
    assert "@odata.nextLink" not in body

    # $top larger than a page: paging stops exactly at $top.
    ids, url = [], f"{server.url}/Contacts?$top=95&$skip=3"
    while url:
        page = httpx.get(url, headers={**AUTH, "Prefer": "odata.maxpagesize=40"}).json()
        ids += [r["ContactId"] for r in page["value"]]
        url = page.get("@odata.nextLink")
    assert ids == list(range(4, 99))

    single = httpx.get(
        f"{server.url}/Divisions(2)?$select=Name&$expand=AccountManager($select=Email)",
        headers=AUTH,
    ).json()
    assert single == {"Name": "Company 2", "AccountManager": {"Email": "user3@example.com"}}


@pytest.mark.parametrize(
    ("query", "option"),
    [
        ("$filter=Surname eq", "$filter"),
        ("$filter=Nickname eq 'x'", "$filter"),
        ("$filter=Surname eq 5", "$filter"),
        ("$orderby=Surname sideways", "$orderby"),
        ("$select=Nickname", "$select"),
        ("$expand=Manager", "$expand"),
        ("$top=-1", "$top"),
        ("$count=maybe", "$count"),
        ("$search=smith", "$search"),
    ],
)
def test_invalid_query_options_get_400_naming_the_option(serve, query, option):
    server = serve()
    response = httpx.get(f"{server.url}/Contacts?{query}", headers=AUTH)
    assert response.status_code == 400
    assert option in response.json()["error"]["message"]


def test_client_surfaces_a_bad_filter_as_a_clear_validation_error(serve):
    server = serve()
    with client_for(server) as client, pytest.raises(ValidationError) as err:
        client.list("Contacts", filter="Surname eq")
    assert err.value.status == 400
    assert "$filter" in str(err.value)
    assert client.stats.sent["GET /Contacts"] == 1  # a 400 is not retried


def test_find_escapes_literals(serve):
    server = serve()
    with client_for(server) as client:
        for surname in ("O'Brien", "Jones & Co", "Taylor+Sons", "Müller"):
            found = client.find("Contacts", "Surname", surname)
            assert found and {c["Surname"] for c in found} == {surname}
        assert client.find("Contacts", "Surname", "Nobody's") == []
        assert [d["DivisionId"] for d in client.find("Divisions", "AccountManagerId", None)] == [
            N_DIVISIONS
        ]
        with pytest.raises(ValueError):
            client.find("Contacts", "Surname eq 'x' or true", "y")


def test_get_single_record_and_404(serve):
    server = serve()
    with client_for(server) as client:
        assert client.get("Divisions", 3)["Name"] == "Company 3"
        assert client.get("Divisions", "3")["DivisionId"] == 3  # DuckDB ids are text
        with pytest.raises(NotFoundError):
            client.get("Divisions", 999)


# --------------------------------------------------------------------------------------------
# Writes
# --------------------------------------------------------------------------------------------
def test_patch_is_partial_and_bumps_last_modified_for_a_cursor(serve):
    server = serve()
    with client_for(server) as client:
        before = client.get("Contacts", 17)
        cursor = max(parse_timestamp(c["LastModified"]) for c in client.list("Contacts").items)
        after = client.patch("Contacts", 17, {"Phone": "+44 115 496 9999"})
        changed = client.list("Contacts", filter=f"LastModified gt {odata_literal(cursor)}")
    assert after["Phone"] == "+44 115 496 9999"
    assert {k: v for k, v in after.items() if k not in ("Phone", "LastModified")} == {
        k: v for k, v in before.items() if k not in ("Phone", "LastModified")
    }
    assert parse_timestamp(after["LastModified"]) > parse_timestamp(before["LastModified"])
    assert [c["ContactId"] for c in changed.items] == [17]


def test_back_to_back_writes_get_strictly_increasing_timestamps(serve):
    server = serve()
    with client_for(server) as client:
        stamps = [
            client.patch("Divisions", 1 + i % 3, {"Phone": str(i)})["LastModified"]
            for i in range(25)
        ]
    parsed = [parse_timestamp(s) for s in stamps]
    assert all(a < b for a, b in zip(parsed, parsed[1:], strict=False))
    assert all(s.endswith("Z") and len(s) == 24 for s in stamps)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"Nickname": "x"}, "Nickname"),
        ({"ContactId": 5}, "ContactId"),
        ({"LastModified": "2030-01-01T00:00:00.000Z"}, "LastModified"),
        ({"DivisionId": "two"}, "DivisionId"),
        ({"DivisionId": 999}, "DivisionId"),
    ],
)
def test_patch_refuses_unknown_read_only_or_mistyped_fields(serve, body, fragment):
    server = serve()
    with client_for(server) as client:
        with pytest.raises(ValidationError) as err:
            client.patch("Contacts", 4, body)
        assert fragment in err.value.message
        assert client.get("Contacts", 4)["DivisionId"] == 5  # nothing written


def test_users_are_read_only(serve):
    server = serve()
    response = httpx.patch(f"{server.url}/Users(1)", headers=AUTH, json={"Name": "x"})
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "MethodNotAllowed"


def test_post_creates_with_201_and_a_new_key(serve):
    server = serve()
    response = httpx.post(
        f"{server.url}/Contacts",
        headers=AUTH,
        json={"DivisionId": 2, "Forename": "Ada", "Surname": "Lovelace", "UnleashedGuid": "g-1"},
    )
    assert response.status_code == 201
    created = response.json()
    assert created["ContactId"] == N_CONTACTS + 1
    assert response.headers["Location"].endswith(f"/Contacts({N_CONTACTS + 1})")
    assert created["StatusFlag"] == "A" and created["Email"] is None
    with client_for(server) as client:
        second = client.create("Divisions", {"Name": "New Co", "Website": "https://new.example"})
        assert second["DivisionId"] == N_DIVISIONS + 1
        assert client.get("Divisions", second["DivisionId"])["Name"] == "New Co"
        assert client.find("Contacts", "UnleashedGuid", "g-1")[0]["Forename"] == "Ada"
        with pytest.raises(ValidationError, match="requires DivisionId"):
            client.create("Contacts", {"Forename": "Orphan"})


# --------------------------------------------------------------------------------------------
# Rate limit
# --------------------------------------------------------------------------------------------
def test_paced_client_bursts_without_a_single_429(serve):
    server = serve(rate_limit=20, rate_window_s=2)
    started = time.monotonic()
    with client_for(server, rate_limit=20, rate_window_s=2) as client:
        for i in range(60):
            client.get("Divisions", 1 + i % N_DIVISIONS)
    elapsed = time.monotonic() - started
    limits = admin(server, "GET", "ratelimit")
    assert limits["throttled"] == 0
    assert limits["admitted"] == 60
    assert client.stats.statuses == {200: 60}
    assert admin(server, "GET", "stats")["total_requests"] == 60
    assert elapsed >= 4.0  # three windows' worth, paced by the client


# Two processes (two Dagster runs) of one deployment, each sending 30 requests at the same
# moment to a server that admits 20 per 2 s window.
_BURST = """
import sys, time
from sync_pipeline.clients.base import RetrySettings
from sync_pipeline.clients.crm import CrmClient
url, token, pacing, start = sys.argv[1], sys.argv[2], sys.argv[3] or None, float(sys.argv[4])
retry = RetrySettings(attempts=20, initial_wait=0.05, max_wait=0.5, max_total=60)
client = CrmClient(url, token, rate_limit=20, rate_window_s=2, retry=retry, pacing_file=pacing)
time.sleep(max(0.0, start - time.time()))
for i in range(30):
    client.get("Divisions", 1 + i % 10)
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shared-window", "per-process"])
def test_runs_in_separate_processes_share_the_pacing_window(serve, tmp_path, shared):
    server = serve(rate_limit=20, rate_window_s=2)
    pacing = str(tmp_path / "pacing" / "api-pacing.sqlite") if shared else ""
    start = str(time.time() + 3)  # both processes have imported by then
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
        assert limits["admitted"] == 60
    else:
        assert limits["throttled"] > 0  # each paced alone: together they overran the window


def test_server_answers_429_with_retry_after_when_the_window_is_full(serve):
    server = serve()
    admin(server, "PUT", "ratelimit", {"limit": 5, "window_s": 2})
    statuses = []
    for _ in range(6):
        response = httpx.get(f"{server.url}/Users", headers=AUTH)
        statuses.append(response.status_code)
    assert statuses == [200] * 5 + [429]
    assert response.json()["error"]["code"] == "TooManyRequests"
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
    with client_for(server, page_size=50) as client:
        result = client.list("Contacts")
        patched = client.patch("Contacts", 3, {"Mobile": "07700 900123"})
    assert [r["ContactId"] for r in result.items] == list(range(1, N_CONTACTS + 1))
    assert patched["Mobile"] == "07700 900123"
    assert admin(server, "GET", "stats")["injected"].get(kind, 0) >= 1


def test_create_is_not_retried_blindly_after_a_dropped_connection(serve):
    server = serve()
    admin(server, "PUT", "faults", {"drop_rate": 1.0})
    with client_for(server) as client:
        with pytest.raises(TransientApiError) as err:
            client.create("Contacts", {"DivisionId": 1, "Forename": "Once"})
        assert err.value.maybe_applied
        assert client.stats.sent["POST /Contacts"] == 1
        assert admin(server, "GET", "stats")["requests"] == {"POST /Contacts": 1}

        # A 429 means the server did not act, so the create may be sent again.
        admin(server, "PUT", "faults", {"burst_429": 1, "retry_after_s": 0.05})
        created = client.create("Contacts", {"DivisionId": 1, "Forename": "Once"})
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
        client.patch("Divisions", 1, {"Phone": "1"})
        for call in (
            lambda: client.get("Divisions", 999),
            lambda: client.list("Divisions", filter="Name eq"),
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
# Durability, tenant facts, admin
# --------------------------------------------------------------------------------------------
def test_state_survives_a_restart(serve, tmp_path):
    store = str(tmp_path / "durable.db")
    first = serve(store_path=store)
    with client_for(first) as client:
        patched = client.patch("Divisions", 4, {"Website": "https://kept.example.com"})
        created = client.create("Contacts", {"DivisionId": 4, "Forename": "Kept"})
    first.stop()

    second = serve(store_path=store)  # same world offered again: must not overwrite
    with client_for(second) as client:
        assert client.get("Divisions", 4)["Website"] == "https://kept.example.com"
        assert client.get("Contacts", created["ContactId"])["Forename"] == "Kept"
        again = client.create("Contacts", {"DivisionId": 4, "Forename": "Next"})
        assert again["ContactId"] == created["ContactId"] + 1
        assert parse_timestamp(again["LastModified"]) > parse_timestamp(patched["LastModified"])


def test_tenant_facts_follow_the_admin_settings(serve):
    server = serve()
    with client_for(server) as client:
        facts = client.tenant_facts()
        assert facts == TenantFacts(operating_companies=1, advanced_ledgers=False)
        assert facts.refusal_reason() is None

        assert admin(server, "PUT", "tenant", {"operating_companies": 3}) == {
            "operating_companies": 3,
            "advanced_ledgers": False,
        }
        admin(server, "PUT", "tenant", {"advanced_ledgers": True})
        facts = client.tenant_facts()
        assert facts == TenantFacts(operating_companies=3, advanced_ledgers=True)
        assert "3 operating companies" in facts.refusal_reason()
        assert "advanced ledgers" in facts.refusal_reason()

        admin(server, "PUT", "tenant", {"operating_companies": 1, "advanced_ledgers": False})
        assert client.tenant_facts().refusal_reason() is None


def test_admin_seed_and_reset(serve):
    server = serve()
    seeded = admin(server, "POST", "seed", {"companies": 5, "seed": 1})
    with client_for(server) as client:
        divisions = client.list("Divisions")
        assert len(divisions.items) == seeded["counts"]["Divisions"] > 0
        assert divisions.bad == []
        assert all(d["LastModified"].endswith("Z") for d in divisions.items)
        admin(server, "POST", "reset")
        assert len(client.list("Contacts").items) == N_CONTACTS


# --------------------------------------------------------------------------------------------
# Client-side parsing (no server needed)
# --------------------------------------------------------------------------------------------
def test_bad_records_are_set_aside_with_a_reason():
    page = {
        "value": [
            {"ContactId": 1, "LastModified": "2025-01-01T00:00:00.000Z"},
            {"Forename": "No key", "LastModified": "2025-01-01T00:00:00.000Z"},
            {"ContactId": 3, "LastModified": "yesterday"},
            {"ContactId": 4, "LastModified": "2025-01-01T00:00:04.000Z"},
        ],
        "@odata.count": 4,
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=page)

    client = CrmClient("http://crm.test", "t0k", transport=httpx.MockTransport(handler))
    result = client.list("Contacts")
    assert [r["ContactId"] for r in result.items] == [1, 4]
    assert [(b.system, b.record_id, b.endpoint) for b in result.bad] == [
        ("CRM", None, "GET /Contacts"),
        ("CRM", "3", "GET /Contacts"),
    ]
    assert "ContactId" in result.bad[0].reason
    assert "LastModified" in result.bad[1].reason and "Contacts(3)" in result.bad[1].reason


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
    assert sent == ["$filter=Surname%20eq%20'Jones%20%26%20Co%2B1%20%C3%BC'"]


def test_literals_and_timestamps():
    assert odata_literal("O'Brien") == "'O''Brien'"
    assert odata_literal(None) == "null"
    assert odata_literal(True) == "true"
    assert odata_literal(42) == "42"
    assert odata_literal(1.5) == "1.5"
    moment = datetime(2026, 11, 26, 5, 26, 7, 123456, tzinfo=UTC)
    assert odata_literal(moment) == "2026-11-26T05:26:07.123Z"
    assert format_timestamp(moment) == "2026-11-26T05:26:07.123Z"
    assert parse_timestamp("2026-11-26T05:26:07.123Z") == moment.replace(microsecond=123000)
    assert parse_timestamp("2026-11-26T06:26:07+01:00").hour == 5
    with pytest.raises(ValueError):
        parse_timestamp("26/11/2026")
    with pytest.raises(TypeError):
        odata_literal(object())
    assert json.loads(json.dumps(odata_literal("ü"))) == "'ü'"
