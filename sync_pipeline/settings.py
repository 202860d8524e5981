"""Operator settings: one validated model, read from a YAML file at every run and sensor tick.

Changing the file takes effect on the next tick or run, with no code change or restart, except
for the times the schedules run at (the import window, the nightly times, the time zone): those
are the schedules' cron strings, read when the code location loads, so a change to them takes
effect once the code location is reloaded.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Collection, Mapping
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
import yaml
from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sync_pipeline.configfile import ConfigFileError, parse_config
from sync_pipeline.core import InitialPolicy, Policy

if TYPE_CHECKING:
    from sync_pipeline.mapping import EntityMapping

DEFAULT_SETTINGS_FILE = "settings.yaml"
SETTINGS_ENV = "SYNC_SETTINGS_FILE"

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
ENTITIES = ("company", "contact")
# The validation context key under which the loader passes the `<entity>.<field>` names the
# mappings define, so that conflict_policies can be checked against them.
POLICY_FIELDS = "policy_fields"
_POLICY_KEY = re.compile(rf"({'|'.join(ENTITIES)})\.[A-Za-z_][A-Za-z0-9_]*")
# Intervals that divide the hour, or whole hours that divide the day: the ones a cron schedule
# runs at exactly, the same minutes every hour (5 minutes at least: an import takes a while).
EVERY_MINUTES = (5, 6, 10, 12, 15, 20, 30, 60, 120, 180, 240, 360, 480, 720, 1440)
_CLOCK = re.compile(r"(\d{1,2}):\d{2}(:\d{2}(\.\d{1,6})?)?")


class SettingsError(ValueError):
    """A settings file that cannot be used; the message names the file, the setting and why."""


def _time_of_day(value: Any) -> Any:
    # Only text that looks like a time: pydantic would otherwise read a number as seconds after
    # midnight (the way an unquoted 19:00, YAML 1.1's 1140, became 00:19).
    if isinstance(value, time):
        return value
    if isinstance(value, str) and (match := _CLOCK.fullmatch(value.strip())):
        text = value.strip()
        return f"0{text}" if len(match.group(1)) == 1 else text
    raise ValueError(f"{value!r} is not a time of day: write it as HH:MM, e.g. 19:00")


def _local(value: time) -> time:
    if value.tzinfo is not None:
        raise ValueError("no UTC offset here: every time is in the `timezone` setting")
    return value


def _whole_minute(value: time) -> time:
    if value.second or value.microsecond:
        raise ValueError(f"{value} is not a whole minute: a run starts on a minute (HH:MM)")
    return value


ClockTime = Annotated[time, BeforeValidator(_time_of_day), AfterValidator(_local)]
# A time something runs at: whole minutes, as a cron schedule counts.
RunTime = Annotated[ClockTime, AfterValidator(_whole_minute)]


class ImportWindow(BaseModel):
    """When the daytime Unleashed → CRM imports run, in the configured time zone."""

    model_config = ConfigDict(extra="forbid")

    start: RunTime = time(7, 0)
    end: ClockTime = time(19, 0)
    days: list[str] = Field(
        default_factory=lambda: ["mon", "tue", "wed", "thu", "fri"], min_length=1
    )
    every_minutes: int = 15

    @field_validator("days")
    @classmethod
    def _known_days(cls, days: list[str]) -> list[str]:
        # mon, Mon, Monday, thurs: the start of a day's name, three letters at least.
        bad = [
            d for d in days if len(d) < 3 or not any(n.startswith(d.lower()) for n in _DAY_NAMES)
        ]
        if bad:
            raise ValueError(f"unknown day(s) {bad}; use {', '.join(WEEKDAYS)}")
        return list(dict.fromkeys(d.lower()[:3] for d in days))

    @field_validator("every_minutes")
    @classmethod
    def _cron_interval(cls, minutes: int) -> int:
        if minutes not in EVERY_MINUTES:
            raise ValueError(
                f"{minutes} minutes is not an interval a cron schedule can keep; use one of "
                f"{', '.join(map(str, EVERY_MINUTES))}"
            )
        return minutes

    @model_validator(mode="after")
    def _start_before_end(self) -> ImportWindow:
        if self.start > self.end:
            raise ValueError(
                f"start {self.start:%H:%M} is after end {self.end:%H:%M}: the window must start "
                "and end on the same day"
            )
        return self


class WriteRetry(BaseModel):
    """Automatic retries of writes that failed for a reason that passes (the target down or
    answering 5xx, a timeout, a dropped connection, 429s past the client's own retries): the
    operation waits in the outbox and a sensor launches a run once it is due, at any hour.
    Refusals of a value (HTTP 400/409/422) are never retried this way: they are rejections."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_attempts: int = Field(
        10, ge=1, le=100, description="failed tries of one operation before retries stop"
    )
    first_delay_minutes: float = Field(1.0, gt=0, le=1440)
    max_delay_minutes: float = Field(60.0, gt=0, le=10080)

    @model_validator(mode="after")
    def _cap_not_below_first(self) -> WriteRetry:
        if self.max_delay_minutes < self.first_delay_minutes:
            raise ValueError(
                f"max_delay_minutes {self.max_delay_minutes:g} is below first_delay_minutes "
                f"{self.first_delay_minutes:g}: the cap must be at least the first delay"
            )
        return self

    def next_attempt(self, failures: int, now: datetime) -> datetime | None:
        """When an operation that has now failed `failures` times is tried again: the first
        delay doubled per failure before this one, at most the cap; None once `max_attempts`
        failures are used up (or retries are off): it then waits for the next planned run."""
        if not self.enabled or failures >= self.max_attempts:
            return None
        minutes = min(self.max_delay_minutes, self.first_delay_minutes * 2 ** max(failures - 1, 0))
        return now + timedelta(minutes=minutes)

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        return (
            f"up to {self.max_attempts} tries, {self.first_delay_minutes:g} min apart doubling "
            f"to at most {self.max_delay_minutes:g} min"
        )


class MassChangeBrake(BaseModel):
    """A plan that would change an unusual share of the linked records, or blank many values,
    is held: nothing is written in either direction until an operator releases that plan (the
    `mass_change_release_job`, with its plan id) or fixes the cause. A person's day of edits stays
    far below both limits; a bulk import gone wrong, a bad script or a broken mapping does not."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_changed_share: float = Field(
        0.10, gt=0, le=1, description="share of the linked records one plan may change"
    )
    min_changed_records: int = Field(
        25,
        ge=0,
        description="the share is held only when more records than this would change, so a "
        "small tenant's ordinary day (3 of 20 companies) is not held",
    )
    max_blanked_values: int = Field(
        20, ge=0, description="filled values one plan may replace with an empty one"
    )

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        return (
            f"hold a plan changing over {self.max_changed_share:.0%} of the linked records (and "
            f"over {self.min_changed_records}) or blanking over {self.max_blanked_values} values"
        )


def _email_address(value: str) -> str:
    try:
        return validate_email(value.strip(), check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"{value!r} is not an email address: {exc}") from None


EmailAddress = Annotated[str, AfterValidator(_email_address)]


def _base_url(value: str) -> str:
    url = value.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ValueError(
            f"{value!r} is not an absolute http:// or https:// address, e.g. "
            "http://dagster.example.com:3000"
        )
    return url


class WebhookAlerts(BaseModel):
    """Notices POSTed as Slack-compatible JSON to the address in SYNC_ALERT_WEBHOOK_URL (an
    environment variable: a webhook address usually carries its token)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    blocks: bool = Field(
        True, description="Send Slack blocks besides the text (off: only {'text': ...})"
    )
    timeout_seconds: float = Field(10.0, gt=0, le=60)
    attempts: int = Field(
        3, ge=1, le=5, description="Tries of one notice (connection errors, 429 and 5xx)"
    )


class EmailAlerts(BaseModel):
    """Notices sent by SMTP. The login, if the server needs one, is SYNC_ALERT_SMTP_USERNAME and
    SYNC_ALERT_SMTP_PASSWORD (environment variables)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    smtp_host: str = ""
    smtp_port: int = Field(587, ge=1, le=65535)
    starttls: bool = Field(True, description="Upgrade the connection with STARTTLS first")
    sender: EmailAddress | None = None
    to: list[EmailAddress] = Field(default_factory=list)
    timeout_seconds: float = Field(10.0, gt=0, le=60)
    attempts: int = Field(2, ge=1, le=5)

    @model_validator(mode="after")
    def _complete_when_on(self) -> EmailAlerts:
        if self.enabled:
            missing = [
                name
                for name, value in (
                    ("smtp_host", self.smtp_host.strip()),
                    ("sender", self.sender),
                    ("to", self.to),
                )
                if not value
            ]
            if missing:
                raise ValueError(
                    f"email is enabled but {', '.join(missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} not set"
                )
        return self


class Alerts(BaseModel):
    """Notices to a person: a failed run, and values a plan newly refuses to send."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Send notices at all (off by default)")
    run_failures: bool = Field(True, description="A notice for every failed run")
    rejections: bool = Field(True, description="A notice when a plan opens new rejections")
    dagster_url: Annotated[str, AfterValidator(_base_url)] = Field(
        "http://localhost:3000",
        description="The Dagster UI's address as the reader opens it, for links to the run",
    )
    max_listed: int = Field(
        5, ge=1, le=20, description="Failed writes or rejections listed in one notice"
    )
    webhook: WebhookAlerts = Field(default_factory=WebhookAlerts)
    email: EmailAlerts = Field(default_factory=EmailAlerts)

    @model_validator(mode="after")
    def _somewhere_to_send(self) -> Alerts:
        if self.enabled and not (self.webhook.enabled or self.email.enabled):
            raise ValueError(
                "alerts are enabled but neither webhook.enabled nor email.enabled is true: "
                "say where notices go"
            )
        return self

    def describe(self) -> str:
        what = [w for w, on in (("run failures", self.run_failures),
                                ("new rejections", self.rejections)) if on]  # fmt: skip
        if not self.enabled or not what:
            return "off"
        where = ["webhook"] if self.webhook.enabled else []
        if self.email.enabled:
            where.append(f"email to {', '.join(self.email.to)}")
        return f"{' and '.join(what)} by {' and '.join(where)}"


class Settings(BaseModel):
    """Everything an operator may change without touching code."""

    model_config = ConfigDict(extra="forbid")

    two_way_sync: bool = Field(True, description="Sync updates both ways between CRM and Unleashed")
    account_manager_sync: bool = Field(
        True, description="Include account managers (CRM users ↔ Unleashed salespersons)"
    )
    overnight_account_manager_fix: bool = Field(
        True, description="Nightly: set every linked CRM company's account manager from Unleashed"
    )
    timezone: str = "Europe/London"
    imports: ImportWindow = Field(default_factory=ImportWindow)
    overnight_fix_at: RunTime = time(2, 0)
    initial_policy: InitialPolicy = "erp"
    conflict_policies: dict[str, Policy] = Field(
        default_factory=dict,
        description="Overrides of the mapping's per-field policy, keyed 'company.phone' etc.",
    )
    default_phone_region: str = "GB"
    extract_overlap_seconds: int = Field(120, ge=0, le=86400)
    keep_history_days: int = Field(
        365,
        ge=0,
        le=36500,
        description="Days of finished history kept (audit log, conflict log, applied operations, "
        "resolved rejections and bad records); pruned nightly; 0 keeps everything",
    )
    history_pruning_at: RunTime = time(3, 0)
    unleashed_monthly_request_limit: int | None = Field(
        None,
        ge=1,
        description="The Unleashed account's monthly API usage limit, if known: a check warns "
        "once this sync has used 80% of it (the account's other integrations count too)",
    )
    retry_failed_writes: WriteRetry = Field(default_factory=WriteRetry)
    mass_change_brake: MassChangeBrake = Field(default_factory=MassChangeBrake)
    shadow_mode: bool = Field(
        False,
        description="Extract, plan and report what every run would write, and write nothing "
        "(no change in either system); turn it off to go live",
    )
    alerts: Alerts = Field(default_factory=Alerts)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("conflict_policies")
    @classmethod
    def _known_fields(cls, policies: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        known: Collection[str] | None = (info.context or {}).get(POLICY_FIELDS)
        problems = [_policy_key_problem(key, known) for key in policies]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError("; ".join(problems))
        return policies

    @field_validator("default_phone_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        # The region phonenumbers parses national numbers in, so its list is the one that counts.
        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(
                f"unknown phone region {value!r}: use a two-letter ISO 3166 country code, "
                "e.g. GB, IE, US"
            )
        return value.upper()

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def summary(self) -> dict[str, str]:
        """Flat, readable view for run metadata."""
        return {
            "two_way_sync": str(self.two_way_sync),
            "account_manager_sync": str(self.account_manager_sync),
            "overnight_account_manager_fix": str(self.overnight_account_manager_fix),
            "timezone": self.timezone,
            "imports": (
                f"{','.join(self.imports.days)} {self.imports.start:%H:%M}-"
                f"{self.imports.end:%H:%M} every {self.imports.every_minutes} min"
            ),
            "overnight_fix_at": f"{self.overnight_fix_at:%H:%M}",
            "keep_history_days": str(self.keep_history_days)
            + (" (keep everything)" if self.keep_history_days == 0 else ""),
            "history_pruning_at": f"{self.history_pruning_at:%H:%M}",
            "unleashed_monthly_request_limit": str(
                self.unleashed_monthly_request_limit or "(not set)"
            ),
            "retry_failed_writes": self.retry_failed_writes.describe(),
            "mass_change_brake": self.mass_change_brake.describe(),
            "shadow_mode": "on: nothing is written" if self.shadow_mode else "off",
            "alerts": self.alerts.describe(),
            "initial_policy": self.initial_policy,
            "conflict_policies": ", ".join(f"{k}={v}" for k, v in self.conflict_policies.items())
            or "(mapping defaults)",
        }


def _policy_key_problem(key: str, known: Collection[str] | None) -> str | None:
    """Why `key` is not a conflict_policies key (None: it is one). Without the mappings' field
    names at hand only its form is checked."""
    form = (
        "keys are <entity>.<field>, the entity company or contact and the field one of "
        "mappings/<entity>.yaml"
    )
    if known is None:
        return None if _POLICY_KEY.fullmatch(key) else f"bad key {key!r}: {form}"
    if key in known:
        return None
    close = difflib.get_close_matches(key, sorted(known), n=3)
    if close:
        return f"unknown field {key!r}; did you mean {' or '.join(map(repr, close))}?"
    return f"unknown field {key!r}: {form} ({', '.join(sorted(known))})"


def policy_fields(mappings: Mapping[str, EntityMapping]) -> frozenset[str]:
    """The keys conflict_policies may use: `<entity>.<field>` for every mapped field."""
    return frozenset(f"{entity}.{name}" for entity, m in mappings.items() for name in m.fields)


# The models whose keys a misspelt key is compared with, by where it stands in the file.
_KEYS_AT: dict[tuple[str, ...], type[BaseModel]] = {
    (): Settings,
    ("imports",): ImportWindow,
    ("retry_failed_writes",): WriteRetry,
    ("mass_change_brake",): MassChangeBrake,
    ("alerts",): Alerts,
    ("alerts", "webhook"): WebhookAlerts,
    ("alerts", "email"): EmailAlerts,
}


def _describe(err: Any) -> tuple[str, str]:
    loc = tuple(str(p) for p in err["loc"])
    entry = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = list(_KEYS_AT[loc[:-1]].model_fields) if loc[:-1] in _KEYS_AT else []
        close = difflib.get_close_matches(loc[-1], valid, n=2)
        if close:
            return entry, f"unknown setting; did you mean {' or '.join(map(repr, close))}?"
        return entry, f"unknown setting; the settings here are {', '.join(valid)}"
    if err["type"] == "literal_error":
        return entry, f"bad value {err['input']!r}: expected {err['ctx']['expected']}"
    msg = err["msg"]
    return entry, msg.removeprefix("Value error, ")


def settings_path() -> Path:
    return Path(os.environ.get(SETTINGS_ENV) or DEFAULT_SETTINGS_FILE)


def parse_settings(
    data: bytes, source: str, *, policy_fields: Collection[str] | None = None
) -> Settings:
    """Validate the bytes of a settings file (`source` names it in errors). `policy_fields`, the
    fields the mappings define (see `policy_fields()`), checks the conflict_policies keys."""
    try:
        raw = parse_config(data, source)
    except ConfigFileError as exc:
        raise SettingsError(str(exc)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{source}: (top level): expected a mapping of setting: value")
    try:
        return Settings.model_validate(raw, context={POLICY_FIELDS: policy_fields})
    except ValidationError as exc:
        lines = [f"{source}: {entry}: {problem}" for entry, problem in map(_describe, exc.errors())]
        raise SettingsError("\n".join(lines)) from None


def load_settings(
    path: str | Path | None = None, *, policy_fields: Collection[str] | None = None
) -> Settings:
    """Read and validate the settings file. Only the default file may be missing (then every
    setting has its default): a file named explicitly that is not there is a mistake."""
    path = Path(path) if path is not None else settings_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if path == Path(DEFAULT_SETTINGS_FILE):
            return Settings()
        raise SettingsError(
            f"{path}: no such settings file (only the default, {DEFAULT_SETTINGS_FILE} in the "
            "working directory, may be missing: then every setting has its default)"
        ) from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_settings(data, str(path), policy_fields=policy_fields)


def save_settings(settings: Settings, path: str | Path | None = None) -> Path:
    path = Path(path) if path is not None else settings_path()
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return path
