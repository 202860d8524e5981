"""Operator settings: one validated model, read from a YAML file at every run and sensor tick.

Changing the file takes effect on the next tick or run: no code change, no restart.
"""

from __future__ import annotations

import os
from datetime import datetime, time
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sync_pipeline.configfile import ConfigFileError, read_config

DEFAULT_SETTINGS_FILE = "settings.yaml"
SETTINGS_ENV = "SYNC_SETTINGS_FILE"

Policy = Literal["newest", "crm", "erp"]
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class SettingsError(ValueError):
    """A settings file that cannot be used; the message names the file, the setting and why."""


class ImportWindow(BaseModel):
    """When the daytime Unleashed → CRM imports run, in the configured time zone."""

    model_config = ConfigDict(extra="forbid")

    start: time = time(7, 0)
    end: time = time(19, 0)
    days: list[str] = Field(default_factory=lambda: ["mon", "tue", "wed", "thu", "fri"])
    every_minutes: int = Field(15, ge=5, le=240)

    @field_validator("days")
    @classmethod
    def _known_days(cls, days: list[str]) -> list[str]:
        bad = [d for d in days if d.lower()[:3] not in WEEKDAYS]
        if bad:
            raise ValueError(f"unknown day(s) {bad}; use {', '.join(WEEKDAYS)}")
        return [d.lower()[:3] for d in days]

    @field_validator("every_minutes")
    @classmethod
    def _whole_ticks(cls, minutes: int) -> int:
        if minutes % 5:
            raise ValueError("must be a multiple of 5 (the import schedule ticks every 5 minutes)")
        return minutes

    def is_open(self, local: datetime) -> bool:
        return (
            WEEKDAYS[local.weekday()] in self.days
            and self.start <= local.time() <= self.end
            and (local.minute % self.every_minutes) < 5
        )


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
    overnight_fix_at: time = time(2, 0)
    initial_policy: Literal["crm", "erp"] = "erp"
    conflict_policies: dict[str, Policy] = Field(
        default_factory=dict,
        description="Overrides of the mapping's per-field policy, keyed 'company.phone' etc.",
    )
    default_phone_region: str = Field("GB", min_length=2, max_length=2)
    extract_overlap_seconds: int = Field(120, ge=0, le=86400)
    keep_history_days: int = Field(
        365,
        ge=0,
        le=36500,
        description="Days of finished history kept (audit log, conflict log, applied operations, "
        "resolved rejections and bad records); pruned nightly; 0 keeps everything",
    )
    history_pruning_at: time = time(3, 0)
    unleashed_monthly_request_limit: int | None = Field(
        None,
        ge=1,
        description="The Unleashed account's monthly API usage limit, if known: a check warns "
        "once this sync has used 80% of it (the account's other integrations count too)",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

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
            "initial_policy": self.initial_policy,
            "conflict_policies": ", ".join(f"{k}={v}" for k, v in self.conflict_policies.items())
            or "(mapping defaults)",
        }


def settings_path() -> Path:
    return Path(os.environ.get(SETTINGS_ENV) or DEFAULT_SETTINGS_FILE)


def load_settings(path: str | Path | None = None) -> Settings:
    """Read and validate the settings file. A missing file means all defaults."""
    path = Path(path) if path is not None else settings_path()
    if not path.exists():
        return Settings()
    try:
        raw = read_config(path) or {}
    except ConfigFileError as exc:
        raise SettingsError(str(exc)) from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping of setting: value at the top level")
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SettingsError(f"{path}: invalid settings: {problems}") from None


def save_settings(settings: Settings, path: str | Path | None = None) -> Path:
    path = Path(path) if path is not None else settings_path()
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return path
