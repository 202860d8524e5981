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

from sync_pipeline.clients.base import ApiError, BaseClient, NotFoundError, RetrySettings
from sync_pipeline.clients.records import BadRecord, ListResult

SYSTEM = "CRM"  # the name the sync uses for this side (reasons, bad_records.system)
# Entity set -> key properties, as the live `$metadata` declares them (docs/api-assumptions.md).
KEYS: dict[str, tuple[str, ...]] = {
    "Companies": ("CompanyId",),
    "Divisions": ("DivisionId",),
    "Contacts": ("ContactId",),
    "Users": ("UserCode",),
    "SalesLedgers": ("OperatingCompanyCode", "SalesLedgerId"),
    "DivisionSalesLedgers": ("DivisionId", "OperatingCompanyCode", "SalesLedgerId"),
    "DivisionXtras": ("DivisionId",),
    "ContactXtras": ("ContactId",),
    "ContactRoles": ("Code",),
    "HomeCurrencies": ("OperatingCompanyCode",),
    "SystemOptions": ("Option",),
    "UnleashedContacts": ("OperatingCompanyCode", "AccountsId"),
}
# The change timestamp: moved by every write, filterable and orderable (an unquoted
# DateTimeOffset literal). Users, options and the Xtra rows have none.
TIMESTAMP_FIELD = "LastUpdatedTimestamp"
TIMESTAMPED = {"Companies", "Divisions", "Contacts", "SalesLedgers"}
# Rows the live service returns in one answer at most, whatever `$top` asks.
MAX_PAGE_SIZE = 500
# Types of the fields the sync reads. A record carrying one of them with another JSON type is
# set aside (reported with the field), so garbage never reaches the diff or the other side.
# Fields not listed here (custom or unknown ones) are kept as they come, unchecked.
_TEXT, _INT = "text", "integer"
FIELD_TYPES: dict[str, dict[str, str]] = {
    "Divisions": {
        "CompanyId": _INT, "Name": _TEXT, "PhoneNumber": _TEXT, "Website": _TEXT,
        "AccountManager": _TEXT, "SalesLedgerId": _TEXT, "OperatingCompanyCode": _TEXT,
        "StatusFlag": _TEXT,
    },
    "Contacts": {
        "DivisionId": _INT, "Title": _TEXT, "Forename": _TEXT, "Surname": _TEXT, "Email": _TEXT,
        "PhoneNumber": _TEXT, "MobilePhoneNumber": _TEXT, "Fax": _TEXT, "RoleCode": _TEXT,
        "StatusFlag": _TEXT,
    },
    "Users": {"UserCode": _TEXT, "UserName": _TEXT, "EmailAddress": _TEXT, "Obsolete": _INT},
}  # fmt: skip
# `SystemOptions` rows that say a tenant switch is on. The live option names are not public
# (docs/api-assumptions.md): these are the names checked, and each guard has a second,
# structural sign as well.
ADVANCED_LEDGERS_OPTIONS = ("AdvancedLedgers", "AdvancedLedgersEnabled", "UseAdvancedLedgers")
UNLEASHED_SYNC_OPTIONS = (
    "UnleashedIntegrationEnabled",
    "UnleashedTwoWaySync",
    "UnleashedSyncEnabled",
    "ErpTwoWaySync",
)
_TRUE_OPTION_VALUES = {"1", "true", "yes", "y", "on"}
_TYPE_OK = {
    _TEXT: lambda v: isinstance(v, str),
    _INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
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
    """`2026-11-26T05:26:07.123456Z`: UTC, microseconds, `Z`, as a `$filter` literal (unquoted).
    A naive datetime is taken as UTC.

    Finer digits a server may keep are truncated, so a cursor `LastUpdatedTimestamp gt
    <formatted>` can only see a record again, never miss one.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    """An id as the CRM takes it: ids travel as text in DuckDB; the record keys the sync writes
    through (DivisionId, ContactId, CompanyId) are integers."""
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
    """Facts about the CRM tenant that decide whether two-way sync may run (design rule 7), and
    how each was found (shown by the preflight)."""

    operating_companies: int
    advanced_ledgers: bool
    unleashed_sync: bool = False
    evidence: tuple[str, ...] = ()

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
        if self.unleashed_sync:
            reasons.append(
                "Prospect's own Unleashed integration is on for this tenant: two syncs would "
                "overwrite each other's edits (turn one of them off)"
            )
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
        self.page_size = max(1, min(MAX_PAGE_SIZE, page_size))

    # -- BaseClient hooks -------------------------------------------------------------------
    def _secrets(self) -> list[str]:
        return [self._token.value]

    def _auth_headers(self, query: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.value}", "OData-MaxVersion": "4.0"}

    def _error_message(self, response: httpx.Response) -> str:
        """`code: message`, then each of `details` (`target: message`) the service adds."""
        try:
            error = response.json()["error"]
            code, message = error.get("code"), error.get("message")
        except (ValueError, KeyError, TypeError, AttributeError):
            return response.text[:500] or response.reason_phrase
        text = f"{code}: {message}" if code else str(message)
        details = error.get("details") if isinstance(error, dict) else None
        extra = [
            f"{d.get('target')}: {d.get('message')}" if d.get("target") else str(d.get("message"))
            for d in details or []
            if isinstance(d, dict) and d.get("message") and d.get("message") != message
        ]
        return "; ".join([text, *extra])

    # -- reading ----------------------------------------------------------------------------
    def list(
        self,
        entity_set: str,
        *,
        filter: str | None = None,
        select: list[str] | None = None,
        expand: str | None = None,
        count: bool = True,
        page_size: int | None = None,
    ) -> ListResult[dict]:
        """Every record matching the options, paged with `$top`/`$skip` in key order.

        Key order is the one order a write cannot change, so no record moves across a page
        boundary while the pages are read (a timestamp order would shift every later row when
        one is edited, and `$skip` would then jump a row). The service returns at most
        `MAX_PAGE_SIZE` rows whatever `$top` says; paging goes on until a page comes back
        empty, the reported `@odata.count` is reached, or (without a count) a page is shorter
        than the pages before it. An `@odata.nextLink`, if the service sends one, is followed
        to the end of that request's rows before `$skip` moves on. The key (and the change
        timestamp, where the set has one) is always selected. A record without its key or with
        an unparseable timestamp goes to `bad`; the rest continue. A record seen twice is kept
        once, in its later version.
        """
        keys = KEYS.get(entity_set, ())
        options: list[tuple[str, str]] = []
        if filter:
            options.append(("$filter", filter))
        if select:
            always = [*keys, *filter_none([self._timestamp_field(entity_set)])]
            options.append(("$select", ",".join(dict.fromkeys([*always, *select]))))
        if expand:
            options.append(("$expand", expand))
        if keys:
            options.append(("$orderby", ",".join(keys)))
        if count:
            options.append(("$count", "true"))
        size = max(1, min(MAX_PAGE_SIZE, page_size or self.page_size))
        endpoint = f"GET /{entity_set}"

        result: ListResult[dict] = ListResult()
        position: dict[Any, int] = {}
        offset = longest = 0
        while True:
            query = [*options, ("$top", str(size))] + ([("$skip", str(offset))] if offset else [])
            got, reported, next_url = 0, None, None
            while True:  # one `$top`/`$skip` request, and the nextLinks it leads to
                body = self.request(
                    "GET",
                    f"/{entity_set}",
                    query=encode_query(query) if next_url is None else "",
                    label=f"/{entity_set}",
                    absolute_url=next_url,
                )
                if not isinstance(body, dict) or not isinstance(body.get("value"), list):
                    raise ApiError(
                        SYSTEM, "GET", f"/{entity_set}", 200, "list body has no 'value' array"
                    )
                result.pages += 1
                count_here = body.get("@odata.count")
                if isinstance(count_here, int) and not isinstance(count_here, bool):
                    reported = result.reported_total = count_here
                for record in body["value"]:
                    self._collect(entity_set, keys, record, result, position, endpoint)
                got += len(body["value"])
                link = body.get("@odata.nextLink")
                if not link:
                    break
                next_url = self._checked_next_link(entity_set, link, next_url)
            if got == 0:
                return result
            offset += got
            if reported is not None and offset >= reported:
                return result
            if reported is None and got < longest:
                return result
            longest = max(longest, got)

    def _collect(
        self,
        entity_set: str,
        keys: tuple[str, ...],
        record: Any,
        result: ListResult[dict],
        position: dict[Any, int],
        endpoint: str,
    ) -> None:
        problem = self._problem(entity_set, keys, record)
        if problem:
            record_id = _record_id(record, keys) if isinstance(record, dict) else None
            result.bad.append(BadRecord(SYSTEM, endpoint, record_id, problem))
            return
        record_key = tuple(record.get(k) for k in keys) if keys else None
        if record_key is not None and record_key in position:
            result.items[position[record_key]] = record
            return
        if record_key is not None:
            position[record_key] = len(result.items)
        result.items.append(record)

    def get(self, entity_set: str, key: Any, *, expand: str | None = None) -> dict:
        """One record by key (an integer, a string, or a dict of the composite key's parts).

        The live service wraps even a single entity in `{"value": [record]}`; a bare entity is
        accepted too. An empty `value` is a NotFoundError."""
        path = f"/{entity_set}({key_segment(entity_set, key)})"
        label = f"/{entity_set}({{key}})"
        body = self.request(
            "GET",
            path,
            query=encode_query([("$expand", expand)]) if expand else "",
            label=label,
        )
        if isinstance(body, dict) and isinstance(body.get("value"), list):
            if not body["value"]:
                raise NotFoundError(SYSTEM, "GET", label, 404, f"{entity_set}({key}) not found")
            body = body["value"][0]
        if not isinstance(body, dict):
            raise ApiError(SYSTEM, "GET", label, 200, "the answer is not an entity")
        return body

    def find(self, entity_set: str, field: str, value: Any) -> list[dict]:
        """Records whose `field` equals `value` exactly (`field` may be a `Nav/Field` path)."""
        if not _FIELD_PATH.match(field):
            raise ValueError(f"not a field name: {field!r}")
        return self.list(entity_set, filter=f"{field} eq {odata_literal(value)}").items

    def any_rows(self, entity_set: str, filter: str | None = None) -> bool | None:
        """Whether `entity_set` has a row (matching `filter`): one request of one row. None when
        the tenant has no such entity set (404)."""
        options = [("$top", "1")] + ([("$filter", filter)] if filter else [])
        try:
            body = self.request(
                "GET", f"/{entity_set}", query=encode_query(options), label=f"/{entity_set}"
            )
        except NotFoundError:
            return None
        return bool(isinstance(body, dict) and body.get("value"))

    def metadata(self) -> str:
        """The service's `$metadata` document (CSDL XML), as text."""
        return self.request("GET", "/$metadata", label="/$metadata", as_text=True)

    def tenant_facts(self) -> TenantFacts:
        """Operating companies, advanced ledgers and Prospect's own Unleashed integration, from
        `HomeCurrencies`, `SystemOptions`, `DivisionSalesLedgers` and `UnleashedContacts`:
        three or four requests."""
        companies = self.list("HomeCurrencies").items
        options = {
            str(o.get("Option")): str(o.get("Value") or "").strip().lower()
            for o in self.list("SystemOptions").items
        }
        plural = "company" if len(companies) == 1 else "companies"
        evidence = [f"{len(companies)} operating {plural} (HomeCurrencies)"]

        def option_on(names: tuple[str, ...]) -> str | None:
            return next((n for n in names if options.get(n) in _TRUE_OPTION_VALUES), None)

        advanced = option_on(ADVANCED_LEDGERS_OPTIONS)
        if advanced:
            evidence.append(f"SystemOptions '{advanced}' is on")
        elif self.any_rows("DivisionSalesLedgers"):
            advanced = "DivisionSalesLedgers"
            evidence.append("DivisionSalesLedgers has rows (advanced ledgers in use)")
        native = option_on(UNLEASHED_SYNC_OPTIONS)
        if native:
            evidence.append(f"SystemOptions '{native}' is on")
        elif self.any_rows("UnleashedContacts"):
            native = "UnleashedContacts"
            evidence.append("UnleashedContacts has rows (Prospect's Unleashed import has run)")
        return TenantFacts(
            operating_companies=len(companies),
            advanced_ledgers=advanced is not None,
            unleashed_sync=native is not None,
            evidence=tuple(evidence),
        )

    # -- writing ----------------------------------------------------------------------------
    def patch(self, entity_set: str, key: Any, changes: dict) -> dict | None:
        """Partial update; safe to retry (the same PATCH twice leaves the same record). The
        live answer is 204 No Content (None here); a body, if one comes, is returned."""
        return self.request(
            "PATCH",
            f"/{entity_set}({key_segment(entity_set, key)})",
            json_body=changes,
            label=f"/{entity_set}({{key}})",
            idempotent=True,
        )

    def create(self, entity_set: str, body: dict) -> dict:
        """POST a new record; returns it with its new key. Never retried after an ambiguous
        failure (a dropped connection may have created it): the caller checks before redoing."""
        record = self.request(
            "POST",
            f"/{entity_set}",
            json_body=body,
            headers={"Prefer": "return=representation"},
            label=f"/{entity_set}",
            idempotent=False,
        )
        if isinstance(record, dict) and isinstance(record.get("value"), list) and record["value"]:
            record = record["value"][0]
        if not isinstance(record, dict):
            raise ApiError(SYSTEM, "POST", f"/{entity_set}", 201, "the answer has no record")
        return record

    def upsert_satellite(self, entity_set: str, key: Any, changes: dict) -> None:
        """Write a record's satellite row (an `Xtra` row of custom fields, keyed by its owner's
        id): PATCH it, and POST it when it does not exist yet (404)."""
        try:
            self.patch(entity_set, key, changes)
        except NotFoundError:
            (key_name,) = KEYS[entity_set]
            self.create(entity_set, {key_name: key, **changes})

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _timestamp_field(entity_set: str) -> str | None:
        return TIMESTAMP_FIELD if entity_set in TIMESTAMPED else None

    def _problem(self, entity_set: str, keys: tuple[str, ...], record: Any) -> str | None:
        if not isinstance(record, dict):
            return f"{entity_set} record is not an object: {str(record)[:80]!r}"
        missing = [k for k in keys if record.get(k) is None]
        if missing:
            return f"{entity_set} record has no {', '.join(missing)}: {_preview(record)}"
        shown = _record_id(record, keys)
        stamp_field = self._timestamp_field(entity_set)
        if stamp_field:
            stamp = record.get(stamp_field)
            try:
                parse_timestamp(stamp)
            except ValueError:
                return f"{entity_set}({shown}): {stamp_field} {stamp!r} is not a timestamp"
        wrong = [
            f"{name} {_short(record[name])} is not {kind}"
            for name, kind in FIELD_TYPES.get(entity_set, {}).items()
            if record.get(name) is not None and not _TYPE_OK[kind](record[name])
        ]
        if wrong:
            return f"{entity_set}({shown}): " + "; ".join(wrong)
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


def key_segment(entity_set: str, key: Any) -> str:
    """The key in a resource path: `12`, `'DL'`, or `OperatingCompanyCode='A',SalesLedgerId='X'`
    (a composite key given as a dict of its parts). Ids that travel as text in DuckDB are turned
    back into integers for the integer-keyed sets."""
    if isinstance(key, bool):
        raise TypeError("a key cannot be a boolean")
    if isinstance(key, dict):
        names = KEYS.get(entity_set) or tuple(key)
        return ",".join(f"{n}={_key_literal(key[n])}" for n in names)
    if entity_set not in _STRING_KEYED:
        key = crm_key(str(key).strip()) if isinstance(key, str) else key
    return _key_literal(key)


# Single-key sets whose key is a string (quoted in the path even when it looks like a number).
_STRING_KEYED = {"Users", "ContactRoles", "HomeCurrencies", "SystemOptions"}


def _key_literal(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return quote(odata_literal(str(value)), safe="'")


def _record_id(record: dict, keys: tuple[str, ...]) -> str | None:
    values = [record.get(k) for k in keys]
    if not values or all(v is None for v in values):
        return None
    return str(values[0]) if len(values) == 1 else "|".join(str(v) for v in values)


def filter_none(values: list[Any]) -> list[Any]:
    return [v for v in values if v is not None]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _preview(record: dict) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in list(record.items())[:3])
    return "{" + fields + (", ..." if len(record) > 3 else "") + "}"
