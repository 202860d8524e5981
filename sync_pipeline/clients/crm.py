"""Prospect CRM (OData v4) client: bearer auth, paced under the workspace rate limit, following
`@odata.nextLink` to the end, with OData literal escaping and the CRM's ISO 8601 timestamps.

Plain Python: the Dagster resource wraps it. Guessed API behaviour is listed in the "Prospect CRM"
section of docs/api-assumptions.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote
from uuid import UUID

import httpx

from sync_pipeline.clients.base import ApiError, BaseClient, RetrySettings
from sync_pipeline.clients.records import BadRecord, ListResult

SYSTEM = "CRM"  # the name the sync uses for this side (reasons, bad_records.system)
# Entity set -> key field (docs/architecture.md).
KEYS = {
    "Divisions": "DivisionId",
    "Contacts": "ContactId",
    "Users": "UserId",
    "SalesLedgers": "SalesLedgerId",
    "OperatingCompanies": "OperatingCompanyId",
    "SystemSettings": "SettingId",
}
TIMESTAMP_FIELD = "LastModified"
TIMESTAMPED = {"Divisions", "Contacts", "Users", "SalesLedgers"}
# Types of the fields docs/architecture.md lists. A record carrying one of them with another JSON
# type is set aside (reported with the field), so garbage never reaches the diff or the other
# side. Fields not listed here (custom or unknown ones) are kept as they come, unchecked.
_TEXT, _INT, _BOOL = "text", "integer", "true or false"
FIELD_TYPES: dict[str, dict[str, str]] = {
    "Divisions": {
        "CompanyId": _INT, "Name": _TEXT, "Phone": _TEXT, "Website": _TEXT,
        "AccountManagerId": _INT, "UnleashedGuid": _TEXT, "StatusFlag": _TEXT,
    },
    "Contacts": {
        "DivisionId": _INT, "Title": _TEXT, "Forename": _TEXT, "Surname": _TEXT, "Email": _TEXT,
        "Phone": _TEXT, "Mobile": _TEXT, "Fax": _TEXT, "UnleashedGuid": _TEXT,
        "StatusFlag": _TEXT,
    },
    "Users": {"Name": _TEXT, "Email": _TEXT, "Active": _BOOL},
    "SalesLedgers": {"DivisionId": _INT, "AccountCode": _TEXT},
}  # fmt: skip
_TYPE_OK = {
    _TEXT: lambda v: isinstance(v, str),
    _INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    _BOOL: lambda v: isinstance(v, bool),
}

# Characters left literal in query values; everything else (space, &, =, +, #, %, ;, non-ASCII)
# is percent-encoded so the server decodes exactly the expression we wrote.
_QUERY_SAFE = "(),/:'$*"
_FIELD_PATH = re.compile(r"^[A-Za-z_]\w*(?:/[A-Za-z_]\w*)*$")
# The client's pacing window is a little wider than the server's, so clock skew and network
# jitter between the two never push a burst over the server's sliding window.
_PACING_STRETCH = 1.02
_PACING_SLACK_S = 0.25


# --------------------------------------------------------------------------------------------
# Literals and timestamps
# --------------------------------------------------------------------------------------------
def format_timestamp(moment: datetime) -> str:
    """`2026-11-26T05:26:07.123Z`: UTC, milliseconds, `Z`. A naive datetime is taken as UTC.

    Sub-millisecond digits are truncated, so a cursor `LastModified gt <formatted>` can only see
    a record again, never miss one.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_timestamp(text: str) -> datetime:
    """An aware UTC datetime from an ISO 8601 timestamp (`Z` or an offset; none means UTC)."""
    if not isinstance(text, str):
        raise ValueError(f"not a timestamp: {text!r}")
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO 8601 timestamp: {text!r}") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def odata_literal(value: Any) -> str:
    """`value` as an OData v4 literal for `$filter`.

    Strings (and UUIDs, since the CRM keeps Guids in Edm.String fields) are single-quoted with
    `'` doubled; datetimes become `...Z` timestamps, dates `YYYY-MM-DD`; None is `null`.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"no OData literal for {value!r}")
        return str(value)
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str | UUID):
        return "'" + str(value).replace("'", "''") + "'"
    raise TypeError(f"no OData literal for {type(value).__name__}")


def crm_key(value: Any) -> Any:
    """An id as the CRM takes it: ids travel as text in DuckDB; the CRM's keys are integers."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def encode_query(options: list[tuple[str, str]]) -> str:
    """`$filter=Name%20eq%20'x'&$top=5`: names kept literal, values percent-encoded."""
    return "&".join(f"{name}={quote(value, safe=_QUERY_SAFE)}" for name, value in options)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TenantFacts:
    """Facts about the CRM tenant that decide whether two-way sync may run (design rule 7)."""

    operating_companies: int
    advanced_ledgers: bool

    def refusal_reason(self) -> str | None:
        """Why two-way sync must refuse this tenant, or None when it may run."""
        reasons = []
        if self.operating_companies > 1:
            reasons.append(
                f"the CRM tenant has {self.operating_companies} operating companies "
                "(two-way sync supports exactly one)"
            )
        if self.advanced_ledgers:
            reasons.append("the CRM tenant has advanced ledgers enabled")
        return "; ".join(reasons) or None


class _Secret:
    """Holds the token so that no repr, log line or traceback local shows it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------
class CrmClient(BaseClient):
    """Prospect CRM over OData v4. `rate_limit`/`rate_window_s` is this process's share of the
    workspace limit; requests are paced so the server never has to answer 429."""

    system = SYSTEM

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        retry: RetrySettings | None = None,
        rate_limit: int = 1200,
        rate_window_s: float = 600,
        page_size: int = 500,
        transport: httpx.BaseTransport | None = None,
        pacing_file: str | None = None,
    ) -> None:
        if not token:
            raise ValueError("a Prospect CRM personal access token is required")
        paced_window = rate_window_s * _PACING_STRETCH + _PACING_SLACK_S
        super().__init__(
            base_url,
            timeout=timeout,
            retry=retry,
            rates=[(rate_limit, paced_window)],
            transport=transport,
            pacing_file=pacing_file,
        )
        self._token = _Secret(token)
        self.page_size = max(1, min(1000, page_size))

    # -- BaseClient hooks -------------------------------------------------------------------
    def _secrets(self) -> list[str]:
        return [self._token.value]

    def _auth_headers(self, query: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.value}", "OData-MaxVersion": "4.0"}

    def _error_message(self, response: httpx.Response) -> str:
        try:
            error = response.json()["error"]
            code, message = error.get("code"), error.get("message")
        except (ValueError, KeyError, TypeError, AttributeError):
            return response.text[:500] or response.reason_phrase
        return f"{code}: {message}" if code else str(message)

    # -- reading ----------------------------------------------------------------------------
    def list(
        self,
        entity_set: str,
        *,
        filter: str | None = None,
        select: list[str] | None = None,
        expand: str | None = None,
        orderby: str | None = None,
        count: bool = True,
        page_size: int | None = None,
    ) -> ListResult[dict]:
        """Every record matching the options, following `@odata.nextLink` to the last page.

        The key (and `LastModified`, where the set has one) is always selected. A record without
        its key or with an unparseable `LastModified` goes to `bad`; the rest continue. A record
        seen twice (modified while paging) is kept once, in its later version.
        """
        key = KEYS.get(entity_set)
        options: list[tuple[str, str]] = []
        if filter:
            options.append(("$filter", filter))
        if select:
            always = [f for f in (key, self._timestamp_field(entity_set)) if f]
            options.append(("$select", ",".join(dict.fromkeys([*always, *select]))))
        if expand:
            options.append(("$expand", expand))
        if orderby:
            options.append(("$orderby", orderby))
        if count:
            options.append(("$count", "true"))
        size = max(1, min(1000, page_size or self.page_size))
        headers = {"Prefer": f"odata.maxpagesize={size}"}
        endpoint = f"GET /{entity_set}"

        result: ListResult[dict] = ListResult()
        position: dict[Any, int] = {}
        next_url: str | None = None
        while True:
            body = self.request(
                "GET",
                f"/{entity_set}",
                query=encode_query(options) if next_url is None else "",
                headers=headers,
                label=f"/{entity_set}",
                absolute_url=next_url,
            )
            if not isinstance(body, dict) or not isinstance(body.get("value"), list):
                raise ApiError(
                    SYSTEM, "GET", f"/{entity_set}", 200, "list body has no 'value' array"
                )
            result.pages += 1
            if result.reported_total is None and isinstance(body.get("@odata.count"), int):
                result.reported_total = body["@odata.count"]
            for record in body["value"]:
                problem = self._problem(entity_set, key, record)
                if problem:
                    record_id = record.get(key) if isinstance(record, dict) and key else None
                    result.bad.append(
                        BadRecord(
                            SYSTEM,
                            endpoint,
                            None if record_id is None else str(record_id),
                            problem,
                        )
                    )
                    continue
                record_key = record.get(key) if key else None
                if record_key is not None and record_key in position:
                    result.items[position[record_key]] = record
                    continue
                if record_key is not None:
                    position[record_key] = len(result.items)
                result.items.append(record)
            link = body.get("@odata.nextLink")
            if not link:
                return result
            link = self._checked_next_link(entity_set, link, next_url)
            next_url = link

    def get(self, entity_set: str, key: int | str, *, expand: str | None = None) -> dict:
        return self.request(
            "GET",
            f"/{entity_set}({_key_segment(key)})",
            query=encode_query([("$expand", expand)]) if expand else "",
            label=f"/{entity_set}({{key}})",
        )

    def find(self, entity_set: str, field: str, value: Any) -> list[dict]:
        """Records whose `field` equals `value` exactly (`field` may be a `Nav/Field` path)."""
        if not _FIELD_PATH.match(field):
            raise ValueError(f"not a field name: {field!r}")
        return self.list(entity_set, filter=f"{field} eq {odata_literal(value)}", count=False).items

    def tenant_facts(self) -> TenantFacts:
        companies = self.list("OperatingCompanies")
        settings = self.list("SystemSettings")
        return TenantFacts(
            operating_companies=len(companies.items),
            advanced_ledgers=any(bool(s.get("AdvancedLedgersEnabled")) for s in settings.items),
        )

    # -- writing ----------------------------------------------------------------------------
    def patch(self, entity_set: str, key: int | str, changes: dict) -> dict:
        """Partial update; safe to retry (the same PATCH twice leaves the same record)."""
        path = f"/{entity_set}({_key_segment(key)})"
        record = self.request(
            "PATCH",
            path,
            json_body=changes,
            headers={"Prefer": "return=representation"},
            label=f"/{entity_set}({{key}})",
            idempotent=True,
        )
        return record if record is not None else self.get(entity_set, key)

    def create(self, entity_set: str, body: dict) -> dict:
        """POST a new record; returns it with its new key. Never retried after an ambiguous
        failure (a dropped connection may have created it): the caller checks before redoing."""
        return self.request(
            "POST",
            f"/{entity_set}",
            json_body=body,
            headers={"Prefer": "return=representation"},
            label=f"/{entity_set}",
            idempotent=False,
        )

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _timestamp_field(entity_set: str) -> str | None:
        return TIMESTAMP_FIELD if entity_set in TIMESTAMPED else None

    def _problem(self, entity_set: str, key: str | None, record: Any) -> str | None:
        if not isinstance(record, dict):
            return f"{entity_set} record is not an object: {str(record)[:80]!r}"
        if key and record.get(key) is None:
            return f"{entity_set} record has no {key}: {_preview(record)}"
        stamp_field = self._timestamp_field(entity_set)
        if stamp_field:
            stamp = record.get(stamp_field)
            try:
                parse_timestamp(stamp)
            except ValueError:
                return (
                    f"{entity_set}({record.get(key)}): {stamp_field} {stamp!r} is not a timestamp"
                )
        wrong = [
            f"{name} {_short(record[name])} is not {kind}"
            for name, kind in FIELD_TYPES.get(entity_set, {}).items()
            if record.get(name) is not None and not _TYPE_OK[kind](record[name])
        ]
        if wrong:
            return f"{entity_set}({record.get(key)}): " + "; ".join(wrong)
        return None

    def _checked_next_link(self, entity_set: str, link: str, previous: str | None) -> str:
        """The absolute next-page URL; refuses other hosts (the token would go with it)."""
        url = httpx.URL(self.base_url + "/").join(link)
        base = httpx.URL(self.base_url)
        if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port):
            raise ApiError(
                SYSTEM, "GET", f"/{entity_set}", 200, f"nextLink points to another host: {url.host}"
            )
        if str(url) == previous:
            raise ApiError(SYSTEM, "GET", f"/{entity_set}", 200, "nextLink repeats the last page")
        return str(url)


def _key_segment(key: int | str) -> str:
    if isinstance(key, bool):
        raise TypeError("a key cannot be a boolean")
    if isinstance(key, int):
        return str(key)
    text = str(key).strip()
    if text.lstrip("-").isdigit():
        return str(int(text))
    return quote(odata_literal(text), safe="'")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _preview(record: dict) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in list(record.items())[:3])
    return "{" + fields + (", ..." if len(record) > 3 else "") + "}"
