"""Notices to a person: a failed run, and values a plan newly refuses to send (rejections).

Two sensors (`defs/alerts.py`) build a `Notice` from the Dagster event log and hand it to
`Sender`, which delivers it by a Slack-compatible webhook and/or SMTP email, as the `alerts`
settings say. The secrets (the webhook address, which carries its token, and the SMTP login) come
from environment variables through the `alerts` resource and are never put in a notice, a log
line or an error message.

Delivery never touches a sync run: the sensors run in the daemon's sensor ticks, after the run.
A notice that cannot be delivered after its tries is logged on the tick (without the secret) and
not sent again; while a channel keeps failing, it is left alone for a minute, so that a tick with
several notices stays well inside Dagster's sensor time limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import dagster as dg
import httpx
import tenacity

from sync_pipeline.clients.base import REDACTED
from sync_pipeline.settings import Alerts, Settings

WRITES_CHECK = "planned_writes_written"  # the apply assets' blocking check (defs/sync.py)
WRITES_TAG_PREFIX = "sync/writes-not-made-"
TARGETS = {"unleashed": "Unleashed", "crm": "CRM"}  # the tag's suffix -> the system
# A listed reason longer than this is cut, saying how much was left out (a value can be 100,000
# characters; Slack refuses a section over 3,000).
REASON_CHARS = 2000
SECTION_CHARS = 3000  # Slack's limit for one block's text
# First wait between two tries of one notice, doubled after each.
RETRY_WAIT_S = 1.0
# After a channel failed, it is not tried again for this long (the notices meanwhile are logged).
CHANNEL_REST_S = 60.0

log = logging.getLogger("sync_pipeline.alerts")


# ------------------------------------------------------------------------------------------------
# What a notice says
# ------------------------------------------------------------------------------------------------
@dataclass
class Notice:
    """One notice: a subject, a few lines saying what happened, the listed items (failed writes
    or rejections, each whole) and a link to the Dagster UI."""

    kind: str  # "run_failure" or "rejections"
    title: str
    lines: list[str]
    items: list[str] = field(default_factory=list)
    items_heading: str = ""
    link: str | None = None
    link_label: str = "Open in Dagster"

    def text(self) -> str:
        """Plain text, as the email body and the webhook's `text` say it."""
        parts = [self.title, "", *self.lines]
        if self.items:
            parts += ["", self.items_heading, *(f"- {item}" for item in self.items)]
        if self.link:
            parts += ["", f"{self.link_label}: {self.link}"]
        return "\n".join(parts)

    def webhook_payload(self, *, blocks: bool) -> dict[str, Any]:
        """Slack-compatible JSON: `text` (what notifications and receivers without blocks show)
        and, with `blocks`, a header, a section for the summary and one per listed item."""
        body = [_slack(line) for line in self.lines]
        if self.items:
            body += ["", _slack(self.items_heading), *(f"• {_slack(i)}" for i in self.items)]
        link = f"<{self.link}|{_slack(self.link_label)}>" if self.link else ""
        payload: dict[str, Any] = {
            "text": "\n".join([f"*{_slack(self.title)}*", *body, *([link] if link else [])])
        }
        if blocks:
            out: list[dict[str, Any]] = [
                {"type": "header", "text": {"type": "plain_text", "text": _cut(self.title, 150)}},
                _section("\n".join(_slack(line) for line in self.lines)),
            ]
            if self.items:
                out.append(_section(f"*{_slack(self.items_heading)}*"))
                out += [_section(f"• {_slack(item)}") for item in self.items]
            if link:
                out.append({"type": "context", "elements": [{"type": "mrkdwn", "text": link}]})
            payload["blocks"] = out
        return payload

    def email(self, sender: str, to: Iterable[str]) -> EmailMessage:
        message = EmailMessage()
        message["Subject"] = self.title
        message["From"] = sender
        message["To"] = ", ".join(to)
        message.set_content(self.text())
        return message


def _slack(text: str) -> str:
    """Text for Slack's mrkdwn: &, < and > escaped, so a value never turns into a link or a
    mention (Slack's documented escaping)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _cut(text, SECTION_CHARS)}}


def _whole(reason: str) -> str:
    """A reason as listed: whole, unless it is longer than REASON_CHARS (then it says so)."""
    if len(reason) <= REASON_CHARS:
        return reason
    return f"{reason[:REASON_CHARS]}… ({len(reason) - REASON_CHARS:,} more characters)"


def _record(row: Mapping[str, Any]) -> str:
    return (
        f"{row.get('entity') or 'record'} CRM {row.get('crm_id') or '-'} / "
        f"Unleashed {row.get('erp_id') or '-'}, {row.get('field') or '-'}"
    )


def _item(row: Mapping[str, Any]) -> str:
    """One listed failed write or rejection: the record, the field and the whole reason. A
    rejection's reason names its record and field itself ("company 'Acme' (CRM 12 / Unleashed
    9f…): website ..."), so it stands alone."""
    reason = str(row.get("reason") or "")
    ids = [(side, row.get(key)) for side, key in (("CRM", "crm_id"), ("Unleashed", "erp_id"))]
    named = any(v for _, v in ids) and all(f"{side} {v}" in reason for side, v in ids if v)
    return _whole(reason) if named else f"{_record(row)}: {_whole(reason)}"


def run_link(settings: Alerts, run_id: str) -> str:
    return f"{settings.dagster_url}/runs/{run_id}"


def run_failure_notice(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    failure: dg.DagsterEvent | None,
    settings: Alerts,
) -> Notice:
    """The notice for a failed run: job, run id, partition, why it failed (a failed check's
    description, else the first step's error, else the run's), the `sync/writes-not-made-*`
    tags, the first failed writes, and the link to the run."""
    checks = failed_checks(instance, run.run_id)
    why = [
        f"check {c['check']} on {c['asset']} failed: {c['description'] or 'no description'}"
        for c in checks
    ] or [first_error(instance, run.run_id, failure)]
    partition = run.tags.get("dagster/partition")
    lines = [
        f"Job: {run.job_name}",
        f"Run: {run.run_id}" + (f" (partition {partition})" if partition else ""),
    ]
    if trigger := run.tags.get("sync/trigger"):
        lines.append(f"Launched by: {trigger}")
    lines += [f"Why: {_whole(w)}" for w in why]
    lines += [
        f"Tag {name}: {value}"
        for name, value in sorted(run.tags.items())
        if name.startswith(WRITES_TAG_PREFIX)
    ]
    failures = [f for c in checks for f in c["failures"]]
    failed = sum(c["failed"] for c in checks)
    shown = failures[: settings.max_listed]
    # "sync/writes-not-made-unleashed: 2 of 5 not written" -> "Unleashed: 2 of 5 not written"
    unwritten = [
        f"{TARGETS.get(name.removeprefix(WRITES_TAG_PREFIX), name)}: {value}"
        for name, value in sorted(run.tags.items())
        if name.startswith(WRITES_TAG_PREFIX)
    ]
    title = f"Sync run failed: {run.job_name}" + (f" ({'; '.join(unwritten)})" if unwritten else "")
    return Notice(
        kind="run_failure",
        title=title,
        lines=lines,
        items=[_item(f) + (f" (retry: {f['retry']})" if f.get("retry") else "") for f in shown],
        items_heading=f"Failed writes, the first {len(shown)} of {max(failed, len(failures))}:",
        link=run_link(settings, run.run_id),
        link_label="Open the run",
    )


def failed_checks(instance: dg.DagsterInstance, run_id: str) -> list[dict[str, Any]]:
    """The run's failed ERROR checks (the blocking `planned_writes_written` among them), with the
    failed writes a writes check lists."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records
    found = []
    for record in records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        if evaluation.passed or evaluation.severity != dg.AssetCheckSeverity.ERROR:
            continue
        meta = {k: v.value for k, v in evaluation.metadata.items()}
        failures = meta.get("failures") if evaluation.check_name == WRITES_CHECK else None
        found.append(
            {
                "asset": evaluation.asset_key.to_user_string(),
                "check": evaluation.check_name,
                "description": evaluation.description,
                "failures": failures if isinstance(failures, list) else [],
                "failed": int(meta.get("writes_failed") or 0),
            }
        )
    return found


def first_error(instance: dg.DagsterInstance, run_id: str, failure: dg.DagsterEvent | None) -> str:
    """Why a run failed, as a person reads it: the first failed step's own error (the innermost
    cause, past Dagster's wrappers), else the run failure's message and error."""
    steps = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in steps:
        event = record.event_log_entry.dagster_event
        data = event.event_specific_data
        user = getattr(data, "user_failure_data", None)
        if user is not None and user.description:
            return f"step {event.step_key}: {user.description}"
        if (error := getattr(data, "error", None)) is not None:
            return f"step {event.step_key}: {_innermost(error)}"
    if failure is not None:
        error = getattr(failure.event_specific_data, "error", None)
        message = failure.message or "the run failed"
        return f"{message} {_innermost(error)}" if error is not None else message
    return "the run failed (no failure event recorded)"


def _innermost(error: Any) -> str:
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    # "package.module.Class: text" -> "Class: text"
    head, sep, rest = message.partition(": ")
    if sep and head.endswith(error.cls_name):
        message = f"{error.cls_name}: {rest}"
    return message


def rejections_notice(
    run: dg.DagsterRun | None,
    run_id: str,
    opened: int,
    still_open: int | None,
    rows: list[Mapping[str, Any]],
    settings: Alerts,
) -> Notice:
    """The notice for a plan that opened new rejections: how many, how many are open in all, the
    first few (record, field, the whole reason) and the link to the run."""
    job = run.job_name if run is not None else "a run"
    partition = run.tags.get("dagster/partition") if run is not None else None
    lines = [
        f"The plan of {job} (run {run_id}"
        + (f", partition {partition}" if partition else "")
        + f") found {opened} new value{'s' if opened != 1 else ''} it does not send.",
        "Each waits until the value is fixed at its source, then syncs by itself.",
    ]
    if still_open is not None:
        lines.append(f"Rejections open in all: {still_open}.")
    shown = rows[: settings.max_listed]
    return Notice(
        kind="rejections",
        title=f"Sync: {opened} new rejection{'s' if opened != 1 else ''}",
        lines=lines,
        items=[_item(r) for r in shown],
        items_heading=f"The first {len(shown)} of {opened}:",
        link=run_link(settings, run_id),
        link_label="Open the run",
    )


# ------------------------------------------------------------------------------------------------
# The sensors' work
# ------------------------------------------------------------------------------------------------
# The alert settings each settings file held when last read (per process: the code server's).
_LAST_READ: dict[str, Alerts] = {}


def alert_settings(read: Callable[[], Settings], source: str, logger: logging.Logger) -> Alerts:
    """The `alerts` settings as the file says now. A file that cannot be read fails every run
    (each reads it first): its notices then go where the file said when it was last read, so the
    failures it causes are still sent."""
    try:
        settings = read().alerts
    except ValueError as exc:
        last = _LAST_READ.get(source)
        if last is None:
            raise
        logger.error(
            f"The settings cannot be read ({exc}); notices go where they said when last read."
        )
        return last
    _LAST_READ[source] = settings
    return settings


@dataclass(frozen=True)
class Secrets:
    """From environment variables (the `alerts` resource); never shown."""

    webhook_url: str = ""
    smtp_username: str = ""
    smtp_password: str = ""


def notify_run_failure(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    failure: dg.DagsterEvent | None,
    settings: Alerts,
    secrets: Secrets,
    logger: logging.Logger,
) -> list[str]:
    """Send the notice of one failed run (if alerts and run-failure notices are on); returns
    what became of it per channel."""
    if not (settings.enabled and settings.run_failures):
        return []
    notice = run_failure_notice(instance, run, failure, settings)
    return Sender(settings, secrets, logger).send(notice)


REJECTIONS_PER_TICK = 50  # plan materializations read per tick


def notify_new_rejections(
    instance: dg.DagsterInstance,
    plan_key: dg.AssetKey,
    cursor: str | None,
    settings: Alerts,
    secrets: Secrets,
    logger: logging.Logger,
) -> tuple[str, str]:
    """One tick of the rejections sensor: a notice for each materialization of the plan asset
    (`plan_key`) since `cursor` that opened rejections. Returns the new cursor and what the tick
    did.

    The cursor is the last plan materialization looked at (its event log storage id), so each
    plan is noticed once; a rejection that stays open is not opened again by the next plan, so
    it is never sent twice in a row. The first tick, and every tick while rejection notices
    are off, only moves the cursor to the latest plan: turning them on sends what comes next,
    not the history."""
    after = json.loads(cursor)["after"] if cursor else None
    on = settings.enabled and settings.rejections
    if after is None or not on:
        latest = instance.fetch_materializations(plan_key, limit=1).records
        mark = latest[0].storage_id if latest else 0
        if after is not None:
            mark = max(mark, after)
        why = (
            "Rejection notices are off (alerts.enabled / alerts.rejections)."
            if not on
            else "Started: plans from now on are looked at."
        )
        return json.dumps({"after": mark}), why
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=plan_key, after_storage_id=after),
        limit=REJECTIONS_PER_TICK,
        ascending=True,
    ).records
    sent = []
    sender = Sender(settings, secrets, logger)
    for record in records:
        after = record.storage_id
        materialization = record.asset_materialization
        entries = materialization.metadata if materialization is not None else {}
        meta = {k: v.value for k, v in entries.items()}
        opened = int(meta.get("rejections_new") or 0)
        if not opened:
            continue
        run_id = record.event_log_entry.run_id
        rows = meta.get("rejections_new_list")
        notice = rejections_notice(
            instance.get_run_by_id(run_id),
            run_id,
            opened,
            int(meta["rejections_open"]) if "rejections_open" in meta else None,
            rows if isinstance(rows, list) else [],
            settings,
        )
        outcome = sender.send(notice)
        sent.append(f"run {run_id[:8]}: {opened} new ({'; '.join(outcome)})")
    summary = (
        "Notices: " + ", ".join(sent)
        if sent
        else f"No new rejections in {len(records)} plan(s) since the last tick."
    )
    return json.dumps({"after": after}), summary


# ------------------------------------------------------------------------------------------------
# Delivery
# ------------------------------------------------------------------------------------------------
class DeliveryError(Exception):
    """A notice that did not reach a channel; the message holds no secret."""


class _Transient(DeliveryError):
    """Worth another try: no answer, 429 or 5xx."""


# Channel -> monotonic time until which it is left alone after failing (see CHANNEL_REST_S).
_RESTING: dict[str, float] = {}
_RESTING_LOCK = threading.Lock()


class Sender:
    """Delivers notices to the channels the settings turn on; never raises: what became of a
    notice on each channel is logged and returned."""

    def __init__(self, settings: Alerts, secrets: Secrets, logger: logging.Logger) -> None:
        self.settings = settings
        self.secrets = secrets
        self.log = logger

    def send(self, notice: Notice) -> list[str]:
        outcome = []
        channels = []
        if self.settings.webhook.enabled:
            channels.append(("webhook", self._webhook))
        if self.settings.email.enabled:
            channels.append(("email", self._email))
        for name, deliver in channels:
            key = self._channel_key(name)
            with _RESTING_LOCK:
                resting = _RESTING.get(key, 0.0) - time.monotonic()
            if resting > 0:
                result = (
                    f"{name}: not sent ({notice.title!r}): the {name} channel failed less than "
                    f"{CHANNEL_REST_S:.0f} s ago; it is tried again in {resting:.0f} s"
                )
                self.log.error(result)
                outcome.append(result)
                continue
            try:
                deliver(notice)
            except DeliveryError as exc:
                with _RESTING_LOCK:
                    _RESTING[key] = time.monotonic() + CHANNEL_REST_S
                result = f"{name}: not delivered ({notice.title!r}): {self._clean(str(exc))}"
                self.log.error(result)
            else:
                with _RESTING_LOCK:
                    _RESTING.pop(key, None)
                result = f"{name}: delivered"
                self.log.info(f"{result}: {notice.title}")
            outcome.append(result)
        return outcome

    def _channel_key(self, name: str) -> str:
        if name == "webhook":
            where = self.secrets.webhook_url
        else:
            where = f"{self.settings.email.smtp_host}:{self.settings.email.smtp_port}"
        return name + ":" + hashlib.sha256(where.encode()).hexdigest()[:16]

    def _secret_parts(self) -> list[tuple[str, str]]:
        """Every piece of a secret that could show up in an error, with what replaces it: the
        webhook address (its scheme, host and port stay: they say where it went), its path and
        query (where a token sits), its user info, and the SMTP password."""
        return _secret_parts(self.secrets)

    def _clean(self, text: str) -> str:
        return _hide(text, self._secret_parts())

    # -- webhook ---------------------------------------------------------------------------------
    def _webhook(self, notice: Notice) -> None:
        config = self.settings.webhook
        url = self.secrets.webhook_url
        if not url:
            raise DeliveryError(
                "alerts.webhook.enabled is true but SYNC_ALERT_WEBHOOK_URL is not set"
            )
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise DeliveryError(
                "SYNC_ALERT_WEBHOOK_URL is not an absolute http:// or https:// address "
                "(the value is not shown)"
            )
        _HTTPX_LOG_FILTER.hide(self._secret_parts())
        payload = notice.webhook_payload(blocks=config.blocks)
        where = f"the webhook at {parsed.host}"
        try:
            with httpx.Client(timeout=config.timeout_seconds, follow_redirects=False) as client:
                for attempt in _tries(config.attempts):
                    with attempt:
                        try:
                            response = client.post(url, json=payload)
                        except httpx.HTTPError as exc:
                            raise _Transient(
                                f"{where}: {type(exc).__name__}: {exc or 'no answer'}"
                            ) from None
                        if response.status_code == 429 or response.status_code >= 500:
                            raise _Transient(f"{where} answered HTTP {response.status_code}")
                        if response.status_code >= 300:
                            raise DeliveryError(
                                f"{where} refused the notice: HTTP {response.status_code} "
                                f"{response.text[:200]!r}"
                            )
        except _Transient as exc:
            raise DeliveryError(f"{exc} ({config.attempts} tries)") from None

    # -- email -----------------------------------------------------------------------------------
    def _email(self, notice: Notice) -> None:
        config = self.settings.email
        username, password = self.secrets.smtp_username, self.secrets.smtp_password
        if bool(username) != bool(password):
            raise DeliveryError(
                "only one of SYNC_ALERT_SMTP_USERNAME and SYNC_ALERT_SMTP_PASSWORD is set: set "
                "both for a server that needs a login, or neither"
            )
        assert config.sender is not None  # the settings refuse email on without one
        message = notice.email(config.sender, config.to)
        where = f"the SMTP server {config.smtp_host}:{config.smtp_port}"
        try:
            for attempt in _tries(config.attempts):
                with attempt:
                    try:
                        with smtplib.SMTP(
                            config.smtp_host, config.smtp_port, timeout=config.timeout_seconds
                        ) as smtp:
                            if config.starttls:
                                smtp.starttls(context=ssl.create_default_context())
                            if username:
                                smtp.login(username, password)
                            smtp.send_message(message)
                    except smtplib.SMTPResponseException as exc:
                        text = exc.smtp_error
                        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                        error = f"{where} answered {exc.smtp_code} {text}"
                        if 400 <= exc.smtp_code < 500:
                            raise _Transient(error) from None
                        raise DeliveryError(error) from None
                    except smtplib.SMTPRecipientsRefused as exc:
                        raise DeliveryError(
                            f"{where} refused the recipients {sorted(exc.recipients)}"
                        ) from None
                    except (smtplib.SMTPException, OSError) as exc:
                        raise _Transient(
                            f"{where}: {type(exc).__name__}: {exc or 'no answer'}"
                        ) from None
        except _Transient as exc:
            raise DeliveryError(f"{exc} ({config.attempts} tries)") from None


def _secret_parts(secrets: Secrets) -> list[tuple[str, str]]:
    parts = [(secrets.webhook_url, REDACTED), (secrets.smtp_password, REDACTED)]
    if secrets.webhook_url:
        try:
            url = httpx.URL(secrets.webhook_url)
        except (httpx.InvalidURL, ValueError):
            pass
        else:
            port = f":{url.port}" if url.port else ""
            where = f"{url.scheme}://{url.host}{port}/{REDACTED}"
            parts = [
                (secrets.webhook_url, where),
                (str(url), where),
                (url.raw_path.decode("ascii", "replace"), f"/{REDACTED}"),
                (url.path, f"/{REDACTED}"),
                (url.query.decode(), REDACTED),
                (url.userinfo.decode(), REDACTED),
                (url.password or "", REDACTED),
                (secrets.smtp_password, REDACTED),
            ]
    # Longest first, and never a bare "/" (it would blank every path in a message).
    found = {s: r for s, r in reversed(parts) if s and s != "/"}
    return sorted(found.items(), key=lambda p: len(p[0]), reverse=True)


def _hide(text: str, parts: Iterable[tuple[str, str]]) -> str:
    for secret, replacement in parts:
        text = text.replace(secret, replacement)
    return text


def _tries(attempts: int) -> tenacity.Retrying:
    """Up to `attempts` tries of one delivery, 1 s apart doubling, again only for what may pass
    (tenacity)."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=RETRY_WAIT_S, max=8 * RETRY_WAIT_S),
        retry=tenacity.retry_if_exception_type(_Transient),
        reraise=True,
    )


class _HideSecrets(logging.Filter):
    """httpx logs each request with its full address at INFO ("HTTP Request: POST <url>"); the
    webhook's address carries its token, so the line is logged with it replaced."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: dict[str, str] = {}

    def hide(self, parts: Iterable[tuple[str, str]]) -> None:
        self._secrets.update(parts)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            clean = _hide(message, sorted(self._secrets.items(), key=lambda p: -len(p[0])))
            if clean != message:
                record.msg, record.args = clean, None
        return True


_HTTPX_LOG_FILTER = _HideSecrets()
logging.getLogger("httpx").addFilter(_HTTPX_LOG_FILTER)
