"""Unleashed → CRM through webhooks, over real sockets: the local Unleashed server delivers
signed webhooks to the receiver, which records them; the sensor turns them into a run that reads
only the named customers and pulls them to the CRM. Forged, stale and replayed deliveries are
refused with nothing queued; a duplicate is applied once; a lost one is caught by the import."""

from __future__ import annotations

import json
import socket
import time
import uuid

import dagster as dg
import httpx
import pytest

from devservers.common import ServerThread
from sync_pipeline import cli
from sync_pipeline.defs.webhooks import unleashed_webhook_sensor
from sync_pipeline.webhooks.events import EventStore, events_path
from sync_pipeline.webhooks.receiver import WEBHOOK_PATH, create_receiver
from sync_pipeline.webhooks.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from sync_pipeline.webhooks.subscriptions import subscribe


class Receiver:
    """The receiver on a free port, subscribed to the local Unleashed server."""

    def __init__(self, h, *, start: bool = True) -> None:
        self.h = h
        self.events = EventStore(events_path(h.db))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"
        self.subscription = subscribe(h.unleashed, self.url)
        self.server = None
        if start:
            self.start()

    def start(self) -> None:
        app = create_receiver(self.events, [self.subscription.signing_secret])
        self.server = ServerThread(app, port=self.port).start()

    def hub(self) -> dict:
        return httpx.get(f"{self.h.emu.unleashed_url}/_admin/webhooks", timeout=10).json()

    def set_faults(self, **config) -> None:
        url = f"{self.h.emu.unleashed_url}/_admin/webhooks"
        httpx.put(url, json=config, timeout=10).raise_for_status()

    def wait(self, predicate, what: str, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.hub()}"
            time.sleep(0.05)

    def wait_sent(self, attempts: int) -> None:
        """Until the server has made `attempts` delivery attempts and has nothing queued."""
        self.wait(
            lambda: (s := self.hub())["counts"].get("attempts", 0) >= attempts and not s["queued"],
            f"{attempts} delivery attempts",
        )

    def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(self.url, content=body, headers=headers, timeout=10)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.events.close()


@pytest.fixture
def listen(harness):
    made: list[Receiver] = []

    def start(**kwargs) -> Receiver:
        made.append(Receiver(harness, **kwargs))
        return made[-1]

    yield start
    for r in made:
        r.close()


def tick(h):
    with dg.build_sensor_context(instance=h.instance, resources=h.resources) as context:
        return unleashed_webhook_sensor(context)


def run_request(h) -> dg.RunRequest:
    request = tick(h)
    assert isinstance(request, dg.RunRequest), request
    return request


def launch(h, request: dg.RunRequest):
    """Run the job as the daemon would for the sensor's request (same config and tags)."""
    return h.run(request.job_name or "unleashed_webhook_job", run_config=request.run_config,
                 tags=request.tags)  # fmt: skip


def tick_while_waiting(h, request: dg.RunRequest):
    """A tick while the requested run has not started (so it has claimed nothing)."""
    job = h.defs.resolve_job_def("unleashed_webhook_job")
    run = h.instance.create_run_for_job(
        job, tags=request.tags, status=dg.DagsterRunStatus.NOT_STARTED
    )
    try:
        return tick(h)
    finally:
        h.instance.delete_run(run.run_id)


def unleashed_requests(h) -> dict[str, int]:
    return h.emu.stats("unleashed")["requests"]


# ------------------------------------------------------------------------------------------------
# Refused deliveries
# ------------------------------------------------------------------------------------------------
def _one_real_delivery(h, r: Receiver) -> dict:
    guid = h.unleashed.list_customers().items[0].Guid
    h.unleashed.update_customer(str(guid), {"PhoneNumber": "0113 496 7000"})
    r.wait_sent(1)
    (sent,) = r.hub()["recent"]
    assert sent["status"] == 200
    return sent


@pytest.mark.parametrize(
    "forgery",
    ["wrong secret", "no signature", "no timestamp", "stale timestamp", "future timestamp",
     "body changed"],
)  # fmt: skip
def test_a_forged_or_stale_delivery_is_refused_and_nothing_queued(harness, listen, forgery):
    h = harness
    r = listen()
    sent = _one_real_delivery(h, r)
    before = r.events.counts()
    body = json.dumps({**json.loads(sent["body"]), "id": str(uuid.uuid4())}).encode()
    stamp = str(int(time.time()))
    secret = r.subscription.signing_secret
    headers = {SIGNATURE_HEADER: sign(secret, stamp, body), TIMESTAMP_HEADER: stamp}
    if forgery == "wrong secret":
        headers[SIGNATURE_HEADER] = sign("not-the-secret", stamp, body)
    elif forgery == "no signature":
        del headers[SIGNATURE_HEADER]
    elif forgery == "no timestamp":
        del headers[TIMESTAMP_HEADER]
    elif forgery in ("stale timestamp", "future timestamp"):
        old = str(int(time.time()) + (-600 if forgery == "stale timestamp" else 600))
        headers = {SIGNATURE_HEADER: sign(secret, old, body), TIMESTAMP_HEADER: old}
    elif forgery == "body changed":
        body = body.replace(b"customer.updated", b"customer.deleted")
    answer = r.post(body, headers)
    assert answer.status_code == 401, answer.text
    assert r.events.counts() == before
    # The sensor sees the one real delivery only.
    assert run_request(h).tags["sync/webhook-events"] == "1"


def test_a_replayed_delivery_is_refused_and_nothing_queued(harness, listen):
    h = harness
    r = listen()
    sent = _one_real_delivery(h, r)  # accepted: one event queued
    assert r.events.counts()["pending"] == 1
    before = r.events.counts()
    # The same bytes and headers again, within the timestamp tolerance: a replay.
    again = r.post(sent["body"].encode(), sent["headers"])
    assert again.status_code == 401 and "replay" in again.json()["error"]
    assert r.events.counts() == before


# ------------------------------------------------------------------------------------------------
# Unleashed → CRM through webhook, sensor and run
# ------------------------------------------------------------------------------------------------
def test_an_unleashed_edit_reaches_the_crm_through_webhook_sensor_and_run(harness, listen):
    h = harness
    h.cycle()
    r = listen()
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0113 496 7101"})
    r.wait_sent(1)
    assert r.events.counts()["pending"] == 1
    h.emu.reset_stats("unleashed")
    request = run_request(h)
    assert request.tags["sync/webhook-customers"] == "1"
    # Launched, the run is waiting to start: a further tick launches no second run.
    waiting = tick_while_waiting(h, request)
    assert isinstance(waiting, dg.SkipReason) and "wait for run" in waiting.skip_message
    result = launch(h, request)
    meta = h.materialization_metadata(result, ["unleashed", "webhook_reads"])
    assert (meta["webhook_events"], meta["customers_read"]) == (1, 1)
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0113 496 7101"
    by_webhook = unleashed_requests(h)
    # One targeted read of the named customer, and no listing.
    assert by_webhook == {"GET /Customers/{guid}": 1}, by_webhook
    # The run succeeded: its events are consumed at the next tick, and nothing is launched again.
    again = tick(h)
    assert isinstance(again, dg.SkipReason) and "No new webhook event" in again.skip_message
    assert r.events.counts()["consumed"] == 1 and r.events.counts()["pending"] == 0
    audit = h.query("SELECT direction FROM audit_log WHERE crm_id = ? AND field = 'phone'",
                    [str(pair["crm_id"])])  # fmt: skip
    assert list(audit["direction"]) == ["erp_to_crm"]

    # The same kind of change picked up by an import costs more Unleashed requests.
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0113 496 7102"})
    r.wait_sent(2)
    h.emu.reset_stats("unleashed")
    h.cycle()
    by_import = unleashed_requests(h)
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0113 496 7102"
    assert sum(by_import.values()) > sum(by_webhook.values()), by_import


def test_a_contact_change_arrives_as_its_customer_updated(harness, listen):
    h = harness
    h.cycle()
    h.cycle()  # contacts of customers imported in the first cycle arrive in the second
    r = listen()
    pair = h.linked_company()
    contact = h.unleashed.create_contact(
        pair["erp_id"],
        {"FirstName": "Webhook", "LastName": "Contact", "EmailAddress": "hook@example.com"},
    )
    r.wait_sent(1)
    launch(h, run_request(h))
    (created,) = h.crm.find("Contacts", "ContactXtra/StandardTextField1", str(contact.Guid))
    assert created["Email"] == "hook@example.com"


def test_a_deleted_customer_is_no_longer_active_in_the_snapshot(harness, listen):
    h = harness
    h.cycle()
    r = listen()
    guid = h.linked_company()["erp_id"]
    httpx.delete(f"{h.emu.unleashed_url}/_admin/customers/{guid}", timeout=10).raise_for_status()
    r.wait_sent(1)
    launch(h, run_request(h))
    row = h.query("SELECT active FROM unleashed_customers WHERE id = ?", [guid])
    assert list(row["active"]) == [False]


def test_a_duplicate_delivery_is_applied_once(harness, listen):
    h = harness
    h.cycle()
    r = listen()
    r.set_faults(duplicate_rate=1.0, duplicate_after_s=1.1)
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0113 496 7201"})
    r.wait_sent(2)  # the delivery and its duplicate, signed afresh, both answered 200
    assert [d["status"] for d in r.hub()["recent"]] == [200, 200]
    assert r.events.counts() == {"pending": 1, "claimed": 0, "consumed": 0, "deliveries": 2}
    h.emu.reset_stats("unleashed")
    launch(h, run_request(h))
    assert unleashed_requests(h) == {"GET /Customers/{guid}": 1}
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0113 496 7201"
    assert isinstance(tick(h), dg.SkipReason)  # consumed; nothing left to run
    audit = h.query("SELECT * FROM audit_log WHERE crm_id = ? AND field = 'phone'",
                    [str(pair["crm_id"])])  # fmt: skip
    assert len(audit) == 1


def test_a_failed_run_leaves_its_events_to_be_read_again(harness, listen):
    h = harness
    h.cycle()
    r = listen()
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0113 496 7301"})
    r.wait_sent(1)
    request = run_request(h)
    h.emu.set_faults("unleashed", error_rate=1.0, error_statuses=[503])
    h.resources["unleashed"] = h.resources["unleashed"].model_copy(
        update={"retry_initial_wait_s": 0.01, "retry_max_wait_s": 0.02}
    )
    from sync_pipeline.defs import build_defs

    h.defs = build_defs(h.resources)
    result = h.defs.resolve_job_def("unleashed_webhook_job").execute_in_process(
        instance=h.instance, run_config=request.run_config, tags=request.tags,
        raise_on_error=False,
    )  # fmt: skip
    assert not result.success
    h.emu.set_faults("unleashed")
    waiting = tick(h)
    assert isinstance(waiting, dg.SkipReason) and "read again at" in waiting.skip_message
    assert r.events.counts()["consumed"] == 0
    (event,) = r.events.pending(now=time.time() + 31)  # due again after 30 s
    assert event.customer_guid == pair["erp_id"]


def test_unleashed_retries_a_delivery_until_the_receiver_answers(harness, listen):
    h = harness
    r = listen(start=False)  # subscribed, but the receiver is not running
    r.set_faults(first_retry_s=0.3, timeout_s=5)
    # First a socket that takes the connection and never answers: a delivery made inside the
    # API request would hold its answer for the 5 s timeout.
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", r.port))
    silent.listen(8)
    guid = str(h.unleashed.list_customers().items[0].Guid)
    t0 = time.monotonic()
    h.unleashed.update_customer(guid, {"PhoneNumber": "0113 496 7501"})
    assert time.monotonic() - t0 < 3
    r.wait(lambda: r.hub()["counts"].get("retries", 0) >= 1, "the timed-out attempt")
    silent.close()  # then nothing listens: refused
    r.wait(lambda: r.hub()["counts"].get("retries", 0) >= 2, "a refused attempt")
    assert r.events.counts()["pending"] == 0
    r.start()
    r.wait(lambda: r.hub()["counts"].get("delivered") == 1, "the delivery")
    (event,) = r.events.pending()
    assert (event.event_type, event.customer_guid) == ("customer.updated", guid)


def test_a_lost_delivery_is_caught_by_the_next_import(harness, listen):
    h = harness
    h.cycle()
    r = listen()
    r.set_faults(drop_rate=1.0)
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0113 496 7401"})
    r.wait(lambda: r.hub()["counts"].get("dropped") == 1, "the dropped delivery")
    assert r.events.counts()["pending"] == 0
    assert isinstance(tick(h), dg.SkipReason)
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] != "0113 496 7401"
    h.cycle()
    assert h.crm.get("Divisions", pair["crm_id"])["PhoneNumber"] == "0113 496 7401"


# ------------------------------------------------------------------------------------------------
# Subscriptions
# ------------------------------------------------------------------------------------------------
def test_subscribe_list_unsubscribe_and_at_most_five(emulators, monkeypatch, capsys):
    for name, value in emulators.env().items():
        monkeypatch.setenv(name, value)
    ids = []
    for i in range(5):
        assert cli.main(["webhooks", "subscribe", f"http://127.0.0.1:9/{i}"]) == 0
        out = capsys.readouterr().out
        assert "UNLEASHED_WEBHOOK_SECRET=" in out
        ids.append(out.split("(subscription ")[1].split(")")[0])
    assert cli.main(["webhooks", "subscribe", "http://127.0.0.1:9/six"]) == 1
    refused = capsys.readouterr().err
    assert "already has 5 webhook subscriptions, the most it may have (5)" in refused
    # The server refuses a sixth too, whoever asks.
    body = json.dumps({"NotificationUrl": "https://six.example.com/hook"})
    sixth = httpx.post(f"{emulators.unleashed_url}/WebhookSubscriptions", content=body,
                       headers=emulators.unleashed_headers(), timeout=10)  # fmt: skip
    assert sixth.status_code == 400 and "at most 5" in sixth.json()["Description"]
    assert cli.main(["webhooks", "list"]) == 0
    listed = capsys.readouterr().out
    assert "5 of at most 5" in listed and all(i in listed for i in ids)
    assert "SigningSecret" not in listed and "SECRET" not in listed
    assert cli.main(["webhooks", "unsubscribe", ids[0]]) == 0
    capsys.readouterr()
    assert cli.main(["webhooks", "list"]) == 0
    listed = capsys.readouterr().out
    assert "4 of at most 5" in listed and ids[0] not in listed
    # Unleashed calls only public HTTPS endpoints.
    assert cli.main(["webhooks", "subscribe", "http://hooks.example.com/x"]) == 1
    assert "not a public https:// URL" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The receiver command
# ------------------------------------------------------------------------------------------------
def test_the_receiver_command_refuses_to_start_without_a_secret(monkeypatch, capsys):
    monkeypatch.delenv("UNLEASHED_WEBHOOK_SECRET", raising=False)
    assert cli.main(["webhooks"]) == 1
    assert "UNLEASHED_WEBHOOK_SECRET is empty" in capsys.readouterr().err


def test_the_receiver_command_records_a_signed_delivery_in_the_event_file(tmp_path):
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "local-test-signing-secret"
    env = {**os.environ, "UNLEASHED_WEBHOOK_SECRET": secret,
           "SYNC_WEBHOOK_EVENTS_PATH": str(tmp_path / "events.sqlite")}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync_pipeline.cli", "webhooks", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        guid = str(uuid.uuid4())
        body = json.dumps({"id": "d-1", "eventType": "customer.created", "data": {"Guid": guid}})
        stamp = str(int(time.time()))
        answer = httpx.post(
            f"{url}{WEBHOOK_PATH}", content=body.encode(),
            headers={SIGNATURE_HEADER: sign(secret, stamp, body.encode()), TIMESTAMP_HEADER: stamp},
        )  # fmt: skip
        assert answer.status_code == 200 and answer.json() == {"status": "queued"}
        with EventStore(tmp_path / "events.sqlite") as events:
            (event,) = events.pending()
        assert (event.event_type, event.customer_guid) == ("customer.created", guid)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert secret not in proc.stdout.read()
