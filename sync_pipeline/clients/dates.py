"""The .NET JSON date codec Unleashed uses on the wire: `"/Date(1449745526820)/"` (ms, UTC).

Shared by the Unleashed client and the local Unleashed server, so both agree on one parser.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# An optional +hhmm / -hhmm suffix exists in .NET output; the instant is still the ms value.
_DATE_RE = re.compile(r"^/Date\((-?\d{1,15})(?:[+-]\d{4})?\)/$")


def is_wire_date(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("/Date(")


def as_utc(when: datetime) -> datetime:
    """`when` in UTC; a naive datetime is taken as UTC."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def date_to_ms(value: datetime) -> int:
    """Milliseconds since the epoch. A naive datetime is taken as UTC."""
    return (as_utc(value) - EPOCH) // timedelta(milliseconds=1)


def ms_to_date(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def encode_date(value: datetime) -> str:
    """An aware (or naive = UTC) datetime as `/Date(ms)/`, truncated to milliseconds."""
    return f"/Date({date_to_ms(value)})/"


def parse_wire_ms(value: str) -> int:
    """The ms value of a `/Date(ms)/` string. ValueError names the bad value."""
    match = _DATE_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a /Date(ms)/ value")
    return int(match.group(1))


def decode_date(value: str) -> datetime:
    """`/Date(ms)/` as an aware UTC datetime. ValueError names the bad value."""
    return ms_to_date(parse_wire_ms(value))


def encode_dates(value: Any) -> Any:
    """A JSON-ready copy of `value` with every datetime (at any depth) encoded as `/Date(ms)/`."""
    if isinstance(value, datetime):
        return encode_date(value)
    if isinstance(value, dict):
        return {k: encode_dates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode_dates(v) for v in value]
    return value


def encode_ms(ms: int) -> str:
    """A ms-since-epoch value as `/Date(ms)/`."""
    return f"/Date({int(ms)})/"


def next_month_start(now: datetime) -> datetime:
    """The first instant of the calendar month after `now`, in UTC: when Unleashed resets an
    account's monthly API usage limit (its support pages: the 1st of each month, 00:00 UTC).
    A naive `now` is taken as UTC."""
    now = as_utc(now)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)
