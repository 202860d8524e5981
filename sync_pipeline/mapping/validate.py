"""Validators: is a value acceptable to the system it is about to be written to?

A validator returns None when the value is fine, or a short reason a person can act on.
Empty values pass: clearing a field is always allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email


@dataclass(frozen=True)
class ValidationContext:
    """Facts some validators need: the active Unleashed salespersons' emails (lower-cased)."""

    salesperson_emails: frozenset[str] = field(default_factory=frozenset)


def check_unleashed_website(value: str) -> str | None:
    """The rule the (local) Unleashed server enforces: absolute http/https URL, dotted host,
    no spaces. Kept here in one place; see docs/api-assumptions.md."""
    if value == "":
        return None
    if any(ch.isspace() for ch in value):
        return "contains a space"
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return "is not an absolute http:// or https:// address"
    labels = host.strip(".").split(".")
    if len(labels) < 2 or not all(labels):
        return "has no dotted host name"
    return None


# Plain addresses that email-validator certainly accepts (dot-atom local part, LDH labels, an
# alphabetic TLD that is not special-use): checked by regex, ~100x cheaper than the library
# (decide.plain_email_sql is the same check in SQL).
PLAIN_EMAIL = re.compile(
    r"^[A-Za-z0-9_+\-]+(\.[A-Za-z0-9_+\-]+)*@"
    r"([A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}$"
)
SPECIAL_TLDS = {"arpa", "invalid", "local", "localhost", "onion", "test"}


def check_email(value: str) -> str | None:
    if value.strip() == "":
        return None
    text = value.strip()
    if (
        len(text) <= 254
        and PLAIN_EMAIL.match(text)
        and len(text.split("@")[0]) <= 64
        and text.rsplit(".", 1)[-1].lower() not in SPECIAL_TLDS
    ):
        return None
    try:
        validate_email(value.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        return f"is not a valid email address: {exc}"
    return None


def check_salesperson_exists(value: str, context: ValidationContext) -> str | None:
    if value.strip() == "":
        return None
    if value.strip().casefold() not in context.salesperson_emails:
        return "matches no active Unleashed salesperson (by email)"
    return None


def check_unleashed_required(value: str) -> str | None:
    """Unleashed requires the field (e.g. CustomerName) and refuses a blank one with HTTP 400."""
    if value.strip() == "":
        return "is required by Unleashed and cannot be empty"
    return None


def validate(name: str, value: str, context: ValidationContext | None = None) -> str | None:
    """Run the named validator on one value; returns a reason or None."""
    context = context or ValidationContext()
    if name == "unleashed_website":
        return check_unleashed_website(value)
    if name == "email":
        return check_email(value)
    if name == "salesperson_exists":
        return check_salesperson_exists(value, context)
    if name == "unleashed_required":
        return check_unleashed_required(value)
    raise ValueError(f"unknown validator {name!r}")
