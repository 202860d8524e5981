"""Checks: is a value acceptable to the system it is about to be written to?

Two kinds, both run by the planner before anything is written (`diff._problem`, creations in
`diff._creations`), once per distinct value:

- `check_text`, the safety check: every text value, in both directions, whatever the field.
  It refuses control characters (C0, DEL, C1: NUL, escape, ...), line breaks and tabs in a
  single-line field (every synced field unless the mapping says `multiline: true`), and the
  Unicode bidirectional controls (embeddings, overrides, isolates and the implicit marks),
  which make a value read differently from what it holds.
- the named checks a mapping field lists per direction (`checks.to_erp`, `checks.to_crm`;
  `CHECKS` below): what the target system accepts for that kind of field.

A check returns None when the value is fine, or a short reason a person can act on.
Empty values pass every check but `unleashed_required`: clearing a field is allowed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email


@dataclass(frozen=True)
class ValidationContext:
    """Facts some validators need: the active Unleashed salespersons' emails (lower-cased)."""

    salesperson_emails: frozenset[str] = field(default_factory=frozenset)


# The safety check ------------------------------------------------------------------------------

# The bidirectional classes of the explicit formatting characters (UAX #9): embeddings
# (LRE, RLE), overrides (LRO, RLO), their end (PDF) and the isolates (LRI, RLI, FSI, PDI).
_BIDI_EXPLICIT = frozenset({"LRE", "RLE", "PDF", "LRO", "RLO", "LRI", "RLI", "FSI", "PDI"})
# The implicit directional marks (LRM, RLM, ALM): format characters whose bidirectional class
# is an ordinary strong one, so the class alone does not single them out. With the explicit ones
# above they are Unicode's Bidi_Control property.
_BIDI_MARKS = frozenset({"\u200e", "\u200f", "\u061c"})
_LINE_CONTROLS = frozenset("\t\n\r")
_CONTROL_NAMES = {"\t": "tab", "\n": "line feed", "\r": "carriage return"}


def code_point(ch: str) -> str:
    """`U+0000`; with the character's name where Unicode gives one (`U+202E RIGHT-TO-LEFT
    OVERRIDE`) or the usual name of a line control (`U+0009 (tab)`)."""
    cp = f"U+{ord(ch):04X}"
    if ch in _CONTROL_NAMES:
        return f"{cp} ({_CONTROL_NAMES[ch]})"
    name = unicodedata.name(ch, "")
    return f"{cp} ({name})" if name else cp


def unsafe_kind(ch: str, *, multiline: bool = False) -> str | None:
    """What makes one character unsafe in a synced value ('control character',
    'line separator', 'bidirectional control character'), or None."""
    category = unicodedata.category(ch)
    if category == "Cc":
        if multiline and ch in _LINE_CONTROLS:
            return None
        return "control character"
    if category in ("Zl", "Zp"):
        return None if multiline else "line separator"
    if category == "Cf" and (unicodedata.bidirectional(ch) in _BIDI_EXPLICIT or ch in _BIDI_MARKS):
        return "bidirectional control character"
    return None


def escape_char(ch: str) -> str:
    """One character as a reason or a preview shows it: as itself, or (when `unsafe_kind`)
    by its code point, `\\x00` / `\\u202e`."""
    if unsafe_kind(ch) is None:
        return ch
    return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"


def visible(text: str) -> str:
    """`text` with every character the safety check refuses written as its code point, so a
    control or bidirectional character cannot hide in, or garble, what a person reads."""
    if text.isprintable():
        return text
    return "".join(escape_char(ch) for ch in text)


def check_text(value: str, *, multiline: bool = False) -> str | None:
    """The safety check every text value goes through, in both directions (see the module
    docstring). The reason names the first unsafe character by its code point."""
    if value.isprintable():  # no character of the categories C* or Z* other than the space
        return None
    for ch in value:
        if ch.isprintable():
            continue
        kind = unsafe_kind(ch, multiline=multiline)
        if kind is not None:
            return f"contains the {kind} {code_point(ch)}"
    return None


# Named checks ----------------------------------------------------------------------------------


def _web_address_problem(value: str) -> str | None:
    """An absolute http or https URL with a dotted host name and no spaces."""
    if any(ch.isspace() for ch in value):
        return "contains a space"
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return "is not an absolute http:// or https:// address"
    labels = host.strip(".").split(".")
    if len(labels) < 2 or not all(labels):
        return "has no dotted host name"
    return None


def check_unleashed_website(value: str) -> str | None:
    """The rule the (local) Unleashed server enforces: absolute http/https URL, dotted host,
    no spaces. Kept here in one place; see docs/api-assumptions.md."""
    if value == "":
        return None
    return _web_address_problem(value)


def check_crm_website(value: str) -> str | None:
    """A website the CRM shows as a link: an absolute http:// or https:// address with a dotted
    host name. Any other scheme (`javascript:`, `data:`, `vbscript:`, `file:`, ...) would run
    or open something when clicked, and an address with a user name before its host
    (`https://bank.com@evil.example`) leads elsewhere than it reads."""
    if value == "":
        return None
    why = _web_address_problem(value)
    if why is None and "@" in urlsplit(value).netloc:
        return "has a user name or password before its host name"
    return why


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


# name -> check(value, context). The mapping schema says which names each direction may list.
CHECKS: dict[str, Callable[[str, ValidationContext], str | None]] = {
    "unleashed_website": lambda value, _: check_unleashed_website(value),
    "crm_website": lambda value, _: check_crm_website(value),
    "email": lambda value, _: check_email(value),
    "salesperson_exists": check_salesperson_exists,
    "unleashed_required": lambda value, _: check_unleashed_required(value),
}


def validate(name: str, value: str, context: ValidationContext | None = None) -> str | None:
    """Run the named check on one value; returns a reason or None."""
    try:
        check = CHECKS[name]
    except KeyError:
        raise ValueError(f"unknown validator {name!r}") from None
    return check(value, context or ValidationContext())


def check_value(
    value: str,
    checks: Iterable[str],
    *,
    multiline: bool = False,
    context: ValidationContext | Callable[[], ValidationContext] | None = None,
) -> str | None:
    """The safety check, then each named check in order: the first reason, or None.

    `context` may be a function giving it, called only when a check needs it."""
    why = check_text(value, multiline=multiline)
    if why is not None:
        return why
    for name in checks:
        ctx = context() if callable(context) and name == "salesperson_exists" else context
        why = validate(name, value, ctx if isinstance(ctx, ValidationContext) else None)
        if why is not None:
            return why
    return None
