"""Alerts as an operator meets them: a failed run and a plan's new rejections become one notice
each, delivered to a webhook receiver and an SMTP server on real local sockets, with the job, the
run, why it failed (or the whole reason of each rejection) and a link to the run; a rejection
still open is not sent again; a receiver that is down fails no sync run; and the webhook's token
never shows in a log or a notice. The alert sensors are ticked as the daemon ticks them, over the
runs' real event log."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import re
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from devservers.common import ServerThread
from sync_pipeline import alerts as alerts_module
from sync_pipeline.definitions import defs
from sync_pipeline.defs.alerts import rejection_alert_sensor, run_failure_alert_sensor
from sync_pipeline.defs.resources import AlertsResource, alerts_resource, default_resources
from sync_pipeline.settings import (
    Alerts,
    EmailAlerts,
    SettingsError,
    WebhookAlerts,
    parse_settings,
)
from tests.harness import (
    current_partition,
    free_port,
    run_with_unwritten,
    writes_check,
)

TOKEN = "xoxb-T0KEN-s3cr3t-9f8e7d6c"
DAGSTER_URL = "http://dagster.example.com:3000"
PUSH = "sync/push_to_unleashed"
PULL = "sync/pull_to_crm"


# ------------------------------------------------------------------------------------------------
# Receivers
# ------------------------------------------------------------------------------------------------
class WebhookReceiver:
    """A Slack-like incoming webhook (Starlette under uvicorn on a real socket): keeps each POST
    and answers the statuses queued in `answers`, then 200 "ok". With `echo`, an error answer
    quotes the address it was sent to, as some services do."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.answers: list[int] = []
        self.echo = False
        app = Starlette(routes=[Route("/{path:path}", self._post, methods=["POST"])])
        self.server = ServerThread(app)

    async def _post(self, request: Request) -> PlainTextResponse:
        body = await request.body()
        self.received.append({"path": request.url.path, "json": json.loads(body)})
        status = self.answers.pop(0) if self.answers else 200
        if status < 300:
            return PlainTextResponse("ok")
        text = f"no_service for {request.url}" if self.echo else "error"
        return PlainTextResponse(text, status_code=status)

    def url(self) -> str:
        return f"{self.server.url}/services/T0001/B0001/{TOKEN}"

    def texts(self) -> list[str]:
        return [r["json"]["text"] for r in self.received]


class SmtpReceiver:
    """An SMTP server (aiosmtpd) that keeps each message and each login."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.logins: list[tuple[str, str]] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's hook
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append(message)
        return "250 Message accepted for delivery"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        self.logins.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=True)


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    with receiver.server:
        yield receiver


@pytest.fixture
def smtp():
    receiver = SmtpReceiver()
    port = free_port()
    controller = Controller(
        receiver,
        hostname="127.0.0.1",
        port=port,
        authenticator=receiver.authenticate,
        auth_require_tls=False,  # a local test server without a certificate
    )
    controller.start()
    receiver.port = port
    yield receiver
    controller.stop()


@pytest.fixture
def quick_retries(monkeypatch):
    """Tries of one notice 50 ms apart, and a failed channel tried again at the next notice."""
    monkeypatch.setattr(alerts_module, "RETRY_WAIT_S", 0.05)
    monkeypatch.setattr(alerts_module, "CHANNEL_REST_S", 0.0)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _alerts(**changes: Any) -> Alerts:
    return Alerts(enabled=True, dagster_url=DAGSTER_URL, **changes)


class Alerting:
    """The two alert sensors over the harness's instance, ticked as the daemon does, each with
    the cursor its last tick left."""

    SENSORS = (run_failure_alert_sensor, rejection_alert_sensor)

    def __init__(self, h, alerts: AlertsResource) -> None:
        self.h = h
        self.resources = {**h.resources, "alerts": alerts}
        self.cursors: dict[str, str | None] = {}
        self.skips: list[str] = []
        self.tick()  # the first tick of each starts from the event log as it is

    def tick(self) -> None:
        for sensor in self.SENSORS:
            with dg.build_sensor_context(
                instance=self.h.instance,
                cursor=self.cursors.get(sensor.name),
                resources=self.resources,
            ) as context:
                data = sensor.evaluate_tick(context)
            self.cursors[sensor.name] = data.cursor
            if data.skip_message:
                self.skips.append(data.skip_message)


def _fail_a_push(h) -> tuple[Any, list[Any]]:
    """A push of two CRM phone edits while Unleashed answers 5xx to everything: it fails through
    its blocking writes check."""
    pairs = list(
        h.query("SELECT crm_id, erp_id FROM company_links ORDER BY crm_id LIMIT 2").itertuples(
            index=False
        )
    )
    for n, p in enumerate(pairs):
        h.crm.patch("Divisions", int(p.crm_id), {"PhoneNumber": f"0113 496 07{n:02d}"})
    h.emu.set_faults("unleashed", error_rate=1.0)
    try:
        return run_with_unwritten(h, "crm_push_job"), pairs
    finally:
        h.emu.set_faults("unleashed")


def _as_slack_text(text: str) -> str:
    """Text as a Slack message carries it (&, < and > escaped, as Slack's API requires)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _open_rejection(h, crm_id: int, field: str) -> str:
    (reason,) = h.query(
        """SELECT reason FROM rejections
           WHERE resolved_at IS NULL AND crm_id = ? AND field = ?""",
        [str(crm_id), field],
    )["reason"]
    return reason


# ------------------------------------------------------------------------------------------------
# Failed runs
# ------------------------------------------------------------------------------------------------
def test_a_failed_push_sends_one_webhook_notice_naming_the_job_the_run_and_why(harness, webhook):
    h = harness
    h.set_settings(alerts=_alerts(webhook=WebhookAlerts(enabled=True), rejections=False))
    alerting = Alerting(h, AlertsResource(webhook_url=webhook.url()))
    h.cycle()
    alerting.tick()
    assert webhook.received == []  # a green run: no notice

    result, pairs = _fail_a_push(h)
    alerting.tick()
    alerting.tick()  # the next tick does not send it again

    assert len(webhook.received) == 1, webhook.texts()
    payload = webhook.received[0]["json"]
    text = payload["text"]
    _, description, _ = writes_check(result, PUSH)
    assert f"Job: crm_push_job\nRun: {result.run_id}\n" in text
    assert f"Why: check planned_writes_written on {PUSH} failed: {description}" in text
    assert description.startswith("None of the 2 writes to Unleashed this run planned was made")
    assert "Tag sync/writes-not-made-unleashed: 2 of 2 not written" in text
    # The first failed writes, each with its record, field and reason.
    assert "Failed writes, the first 2 of 2:" in text
    for p in pairs:
        assert f"company CRM {p.crm_id} / Unleashed {p.erp_id}, phone: Unleashed " in text
    assert len(re.findall(r"\(HTTP 50\d\): Injected fault", text)) >= 2
    assert f"<{DAGSTER_URL}/runs/{result.run_id}|Open the run>" in text
    # Slack blocks: a header naming the job and what was not written, the link at the end.
    header, *_, link = payload["blocks"]
    assert header["text"]["text"] == "Sync run failed: crm_push_job (Unleashed: 2 of 2 not written)"
    assert link["elements"][0]["text"] == f"<{DAGSTER_URL}/runs/{result.run_id}|Open the run>"
    assert TOKEN not in json.dumps(payload)


def test_a_failed_import_cycle_sends_one_email_with_the_partition_and_logs_in(
    harness, smtp, monkeypatch
):
    """The CRM refuses every write: the cycle fails in its pull. One email names the job, the
    run, the partition, the count and the first failed write; the SMTP login comes from the
    environment variables."""
    h = harness
    monkeypatch.setenv("SYNC_ALERT_SMTP_USERNAME", "sync-alerts")
    monkeypatch.setenv("SYNC_ALERT_SMTP_PASSWORD", "smtp-pa55-s3cret")
    h.set_settings(
        alerts=_alerts(
            email=EmailAlerts(
                enabled=True, smtp_host="127.0.0.1", smtp_port=smtp.port, starttls=False,
                sender="sync@example.com", to=["ops@example.com", "it@example.com"],
            ),
            rejections=False,
        )
    )  # fmt: skip
    alerting = Alerting(h, alerts_resource())
    h.cycle()
    pair = h.linked_company()
    h.unleashed.update_customer(pair["erp_id"], {"PhoneNumber": "0113 496 0755"})
    h.emu.set_faults("crm", error_rate=1.0, methods=["PATCH", "POST"])
    result = run_with_unwritten(h, "sync_cycle_job")
    h.emu.set_faults("crm")
    alerting.tick()
    alerting.tick()

    assert len(smtp.messages) == 1
    assert smtp.envelopes == [("sync@example.com", ["ops@example.com", "it@example.com"])]
    assert smtp.logins == [("sync-alerts", "smtp-pa55-s3cret")]
    message = smtp.messages[0]
    tag = h.instance.get_run_by_id(result.run_id).tags["sync/writes-not-made-crm"]
    assert message["Subject"] == f"Sync run failed: sync_cycle_job (CRM: {tag})"
    assert message["To"] == "ops@example.com, it@example.com"
    body = message.get_content()
    _, description, _ = writes_check(result, PULL)
    assert f"Run: {result.run_id} (partition {current_partition()})" in body
    assert f"Why: check planned_writes_written on {PULL} failed: {description}" in body
    assert f"Tag sync/writes-not-made-crm: {tag}" in body
    assert f"company CRM {pair['crm_id']} / Unleashed {pair['erp_id']}, phone: " in body
    assert f"Open the run: {DAGSTER_URL}/runs/{result.run_id}" in body
    assert "smtp-pa55-s3cret" not in message.as_string()


def test_a_run_failing_for_another_reason_is_sent_with_its_own_error(harness, webhook):
    """A broken settings file stops every run at its first step: the notice says so, naming
    the file and the setting, and still reaches the receiver the file named when last read."""
    h = harness
    h.set_settings(alerts=_alerts(webhook=WebhookAlerts(enabled=True), rejections=False))
    alerting = Alerting(h, AlertsResource(webhook_url=webhook.url()))
    good = h.settings_file.read_text()
    h.settings_file.write_text(good.replace("two_way_sync: true", "two_way_sync: maybe"))
    result = h.defs.resolve_job_def("crm_push_job").execute_in_process(
        instance=h.instance, raise_on_error=False
    )
    assert not result.success
    alerting.tick()
    (text,) = webhook.texts()
    assert f"Run: {result.run_id}\n" in text
    (step,) = [e.step_key for e in result.all_events if e.is_step_failure]  # the preflight
    assert (
        f"Why: step {step}: SettingsError: {h.settings_file}: two_way_sync: Input should be a "
        "valid boolean"
    ) in text


def test_alerts_are_off_by_default(harness, webhook):
    h = harness
    alerting = Alerting(h, AlertsResource(webhook_url=webhook.url()))
    h.cycle()
    _fail_a_push(h)
    alerting.tick()
    assert webhook.received == []
    assert "Rejection notices are off (alerts.enabled / alerts.rejections)." in alerting.skips


# ------------------------------------------------------------------------------------------------
# Rejections
# ------------------------------------------------------------------------------------------------
def test_a_new_rejection_is_sent_once_with_its_whole_reason(harness, webhook):
    """A website Unleashed holds but the CRM must not get: one notice with the record, the
    field and the whole reason. The next cycles keep it open and send nothing; another new
    rejection is sent alone. A value that would be a link in Slack is shown as text."""
    h = harness
    h.set_settings(alerts=_alerts(webhook=WebhookAlerts(enabled=True)))
    alerting = Alerting(h, AlertsResource(webhook_url=webhook.url()))
    h.cycle()
    alerting.tick()
    first_cycle = len(webhook.received)  # whatever the seed world's first plan opened
    first = h.linked_company()
    second = h.linked_company(f"l.erp_id <> '{first['erp_id']}'")
    bad = "javascript:alert(document.cookie)//<https://evil.example|click>"
    h.plant_customer(first["erp_id"], Website=bad)

    result = h.cycle()
    alerting.tick()

    assert len(webhook.received) == first_cycle + 1, webhook.texts()
    payload = webhook.received[-1]["json"]
    text = payload["text"]
    reason = _open_rejection(h, first["crm_id"], "website")
    assert "cannot be written to the CRM: is not an absolute http:// or https:// address" in reason
    assert f"(CRM {first['crm_id']} / Unleashed {first['erp_id']}): website " in reason
    assert f"\n• {_as_slack_text(reason)}\n" in text
    assert "<https://evil.example" not in text  # the value is text, never a Slack link
    assert f"The plan of sync_cycle_job (run {result.run_id}, partition " in text
    assert "found 1 new value it does not send." in text
    assert payload["blocks"][0]["text"]["text"] == "Sync: 1 new rejection"
    assert f"<{DAGSTER_URL}/runs/{result.run_id}|Open the run>" in text

    h.cycle()  # still open: not new
    h.cycle()
    alerting.tick()
    assert len(webhook.received) == first_cycle + 1, webhook.texts()[first_cycle + 1 :]

    h.plant_customer(second["erp_id"], Website="javascript:void(0)")
    h.cycle()
    alerting.tick()
    assert len(webhook.received) == first_cycle + 2
    text = webhook.received[-1]["json"]["text"]
    assert f"\n• {_as_slack_text(_open_rejection(h, second['crm_id'], 'website'))}\n" in text
    assert f"CRM {first['crm_id']} / " not in text


# ------------------------------------------------------------------------------------------------
# Delivery failures and secrets
# ------------------------------------------------------------------------------------------------
def test_a_receiver_that_is_down_fails_no_run_and_its_token_is_never_logged(
    harness, webhook, quick_retries, caplog, capfd
):
    """The receiver answers 503 to each of the three tries, then an address answers nothing at
    all, then the receiver refuses the notice quoting its own address: each is logged on the
    sensor's tick, the sync runs go on green, and the token appears nowhere: not in the log
    lines (httpx's included), the tick results, the notices or the runs' event logs."""
    caplog.set_level(logging.DEBUG)
    h = harness
    h.set_settings(alerts=_alerts(webhook=WebhookAlerts(enabled=True, attempts=3)))
    alerting = Alerting(h, AlertsResource(webhook_url=webhook.url()))
    h.cycle()
    alerting.tick()
    webhook.received.clear()
    pairs = h.query("SELECT crm_id, erp_id FROM company_links ORDER BY crm_id LIMIT 3")
    pairs = [(int(c), e) for c, e in pairs.itertuples(index=False)]

    # 1. Three tries, each answered 503: not delivered; the run that opened the rejection is green.
    webhook.answers = [503, 503, 503]
    h.plant_customer(pairs[0][1], Website="javascript:void(1)")
    runs = [h.cycle().run_id]
    alerting.tick()
    assert len(webhook.received) == 3
    assert webhook.received[0]["json"] == webhook.received[2]["json"]

    # 2. Nothing listens at the address.
    closed = f"http://127.0.0.1:{free_port()}/services/T0001/B0001/{TOKEN}"
    down = Alerting(h, AlertsResource(webhook_url=closed))
    h.plant_customer(pairs[1][1], Website="javascript:void(2)")
    runs.append(h.cycle().run_id)
    down.tick()

    # 3. The receiver refuses the notice and quotes the address back.
    webhook.echo, webhook.answers = True, [404]
    h.plant_customer(pairs[2][1], Website="javascript:void(3)")
    runs.append(h.cycle().run_id)
    alerting.tick()

    assert all(h.instance.get_run_by_id(r).status == dg.DagsterRunStatus.SUCCESS for r in runs)
    out, err = capfd.readouterr()
    logged = out + err + caplog.text
    assert "webhook: not delivered ('Sync: 1 new rejection'): the webhook at 127.0.0.1 " in logged
    assert "answered HTTP 503 (3 tries)" in logged
    assert "ConnectError" in logged and "(3 tries)" in logged
    assert "refused the notice: HTTP 404 'no_service for http://127.0.0.1:" in logged
    assert f"no_service for {webhook.server.url}/***" in logged
    # httpx logs every request it sends: with the address's path (its token) hidden.
    assert any(
        r.getMessage().startswith(f"HTTP Request: POST {webhook.server.url}/*** ")
        for r in caplog.records
    )
    events = [e.message or "" for r in runs for e in h.instance.all_logs(r)]
    notices = json.dumps([r["json"] for r in webhook.received])
    everything = [logged, *alerting.skips, *down.skips, *events, notices]
    assert not [t for t in everything if TOKEN in t]
    # 4. The receiver is back: the next notice arrives.
    webhook.received.clear()
    _fail_a_push(h)
    alerting.tick()
    assert [t.splitlines()[0] for t in webhook.texts()] == [
        "*Sync run failed: crm_push_job (Unleashed: 2 of 2 not written)*"
    ]


def test_a_webhook_turned_on_without_its_address_says_which_variable_is_missing(
    harness, webhook, capfd
):
    h = harness
    h.set_settings(alerts=_alerts(webhook=WebhookAlerts(enabled=True)))
    alerting = Alerting(h, AlertsResource())
    h.cycle()
    _fail_a_push(h)
    alerting.tick()
    assert (
        "webhook: not delivered ('Sync run failed: crm_push_job (Unleashed: 2 of 2 not "
        "written)'): "
        "alerts.webhook.enabled is true but SYNC_ALERT_WEBHOOK_URL is not set"
    ) in capfd.readouterr().err


def test_a_retry_delivers_a_notice_the_receiver_failed_once(harness, webhook, quick_retries):
    h = harness
    h.set_settings(alerts=_alerts(webhook=WebhookAlerts(enabled=True), rejections=False))
    alerting = Alerting(h, AlertsResource(webhook_url=webhook.url()))
    h.cycle()
    webhook.answers = [500]
    result, _ = _fail_a_push(h)
    alerting.tick()
    assert len(webhook.received) == 2  # the failed try and the one that went through
    assert result.run_id in webhook.received[1]["json"]["text"]
    alerting.tick()
    assert len(webhook.received) == 2


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("alerts: {enabled: true}", "alerts: alerts are enabled but neither webhook.enabled nor "
         "email.enabled is true"),
        ("alerts: {email: {enabled: true, smtp_host: mail}}", "alerts.email: email is enabled "
         "but sender, to are not set"),
        ("alerts: {email: {to: [ops]}}", "alerts.email.to.0: 'ops' is not an email address"),
        ("alerts: {dagster_url: 'dagster:3000'}", "alerts.dagster_url: 'dagster:3000' is not an "
         "absolute http:// or https:// address"),
        ("alerts: {webhook: {url: 'https://hooks'}}", "alerts.webhook.url: unknown setting"),
    ],
)  # fmt: skip
def test_alert_settings_are_checked_naming_the_setting(text, message):
    with pytest.raises(SettingsError) as raised:
        parse_settings(text.encode(), "settings.yaml")
    assert f"settings.yaml: {message}" in str(raised.value)


def test_the_shipped_settings_file_leaves_alerts_off():
    shipped = Path(__file__).resolve().parents[1] / "settings.yaml"
    settings = parse_settings(shipped.read_bytes(), "settings.yaml")
    assert not settings.alerts.enabled
    assert settings.summary()["alerts"] == "off"


def test_the_code_location_runs_both_sensors_and_takes_the_secrets_from_the_environment(
    monkeypatch,
):
    for name in ("run_failure_alert_sensor", "rejection_alert_sensor"):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING
    monkeypatch.setenv("SYNC_ALERT_WEBHOOK_URL", f"https://hooks.example.com/services/{TOKEN}")
    monkeypatch.delenv("SYNC_ALERT_SMTP_USERNAME", raising=False)
    monkeypatch.delenv("SYNC_ALERT_SMTP_PASSWORD", raising=False)
    alerts = default_resources()["alerts"]
    # By reference: what the Dagster UI shows of the resource is the variable's name.
    assert alerts.webhook_url == dg.EnvVar("SYNC_ALERT_WEBHOOK_URL")
    assert TOKEN not in repr(alerts)
    assert (alerts.smtp_username, alerts.smtp_password) == ("", "")
