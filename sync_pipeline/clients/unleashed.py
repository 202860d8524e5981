"""The Unleashed API client: HMAC-signed requests, path paging, typed records, read–merge–write.

Plain Python (no Dagster). Retries, pacing and error mapping come from `BaseClient`; this module
adds the Unleashed conventions; what is confirmed and what the public docs leave open is listed
in docs/api-assumptions.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode

import httpx
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr
from pydantic import ValidationError as PydanticValidationError

from sync_pipeline.clients.base import (
    ApiError,
    BaseClient,
    NotFoundError,
    RetrySettings,
    ValidationError,
    parse_retry_after,
)
from sync_pipeline.clients.dates import decode_date, encode_dates, next_month_start
from sync_pipeline.clients.records import BadRecord, ListResult

log = logging.getLogger("sync_pipeline.clients.unleashed")

MAX_PAGE_SIZE = 1000
REQUIRED_CUSTOMER_FIELDS = ("CustomerCode", "CustomerName")
CLIENT_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")
_GUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
# Characters that urlencode leaves alone, plus ':' (legal in a query): signed values made only of
# these read the same encoded and decoded, whichever form the live server verifies (assumed).
_QUERY_SAFE = ":"
# Assumed (not documented): a request refused because the account's monthly API usage limit is
# used up is answered 429 (or 403) with a description that says so, or with a Retry-After longer
# than any per-minute throttle would ask for. The limit resets on the 1st of each month, 00:00
# UTC (Unleashed's support pages), which is when a refusal without Retry-After is taken to end.
_USAGE_LIMIT_TEXT = re.compile(r"usage limit|quota", re.IGNORECASE)
_THROTTLE_RETRY_AFTER_MAX_S = 3600
# A listing whose unique records fall short of the server's count is read again, at most this
# many times in all (offset paging shifts when a record already read moves to the end).
_LIST_PASSES = 3


def signature(api_key: str, query: str) -> str:
    """Base64(HMAC-SHA256(key=api_key, msg=query)) — `query` exactly as sent, without `?`."""
    digest = hmac.new(api_key.encode("utf-8"), query.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def format_modified_since(value: datetime) -> str:
    """`yyyy-MM-ddTHH:mm:ss.fff` in UTC (assumed format); a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}"


# --------------------------------------------------------------------------------------------
# Typed records
# --------------------------------------------------------------------------------------------
def _wire_date(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        return decode_date(value)
    raise ValueError(f"{value!r} is not a /Date(ms)/ value")


def _guid(value: Any) -> Any:
    if isinstance(value, str) and _GUID_RE.match(value):
        return value.lower()
    raise ValueError(f"{value!r} is not a GUID")


WireDate = Annotated[datetime | None, BeforeValidator(_wire_date)]
Guid = Annotated[str, BeforeValidator(_guid)]


class UnleashedRecord(BaseModel):
    """Unknown fields are kept (`extra="allow"`) so a full-replace round trip loses nothing."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    Guid: Guid

    def to_wire(self) -> dict[str, Any]:
        """The Unleashed JSON object, dates as `/Date(ms)/`."""
        return encode_dates(self.model_dump(mode="python"))


class Salesperson(UnleashedRecord):
    FullName: str | None = None
    Email: str | None = None
    Obsolete: bool = False
    LastModifiedOn: WireDate = None


class Contact(UnleashedRecord):
    FirstName: str | None = None
    LastName: str | None = None
    EmailAddress: str | None = None
    PhoneNumber: str | None = None
    MobilePhone: str | None = None
    FaxNumber: str | None = None  # the name is assumed
    OfficePhone: str | None = None


class Customer(UnleashedRecord):
    CustomerCode: str | None = None
    CustomerName: str | None = None
    PhoneNumber: str | None = None
    Website: str | None = None
    Email: str | None = None
    Obsolete: bool = False
    # Read from either spelling; always written as `SalesPerson`.
    SalesPerson: Salesperson | None = Field(
        None, validation_alias=AliasChoices("SalesPerson", "Salesperson")
    )
    CreatedOn: WireDate = None
    LastModifiedOn: WireDate = None
    # The first 100 contacts, present only when listed with include_all_contacts.
    Contacts: list[Contact] | None = None

    def to_wire(self, *, include_contacts: bool = True) -> dict[str, Any]:
        data = super().to_wire()
        if not include_contacts or data.get("Contacts") is None:
            data.pop("Contacts", None)
        return data


R = TypeVar("R", bound=UnleashedRecord)


def _describe_errors(exc: PydanticValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(x) for x in err["loc"]) or "record"
        value = repr(err.get("input"))
        value = value if len(value) <= 60 else value[:57] + "..."
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message} (got {value})")
    return "; ".join(parts)


def _record_name(kind: str, raw: dict[str, Any]) -> str:
    name = f"{kind} {raw.get('Guid')!r}" if raw.get("Guid") else f"{kind} without Guid"
    if raw.get("CustomerCode"):
        name += f" (CustomerCode {raw['CustomerCode']!r})"
    return name


class UnleashedValidationError(ValidationError):
    """A 400 from Unleashed, with the record it was about. `problems` is the server's list of
    {Field, Value, Description}; the message names the endpoint, record, field and reason."""

    def __init__(self, exc: ValidationError, record_id: str | None, record: str) -> None:
        super().__init__(
            exc.system,
            exc.method,
            exc.endpoint,
            exc.status,
            f"{exc.message} [{record}]",
            body=exc.body,
        )
        self.record_id = record_id
        items = exc.body.get("Items") if isinstance(exc.body, dict) else None
        self.problems: list[dict[str, Any]] = [i for i in items or [] if isinstance(i, dict)]

    @property
    def fields(self) -> list[str]:
        return [str(p.get("Field")) for p in self.problems if p.get("Field")]


def _pacing_rates(requests_per_minute: int | None) -> list[tuple[int, float]]:
    """Spread the per-minute budget over each second, so a burst never exceeds it whatever
    window the server counts in; keep the per-minute rate too when rounding loosens it."""
    if not requests_per_minute:
        return []
    per_second = math.ceil(requests_per_minute / 60)
    rates: list[tuple[int, float]] = [(per_second, 1.0)]
    if per_second * 60 != requests_per_minute:
        rates.append((requests_per_minute, 60.0))
    return rates


def _jsonable(value: Any) -> Any:
    if isinstance(value, UnleashedRecord):
        return value.to_wire()
    return encode_dates(value)


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------
class UnleashedClient(BaseClient):
    system = "Unleashed"
    monthly_limit = True  # docs/api-assumptions.md

    def __init__(
        self,
        base_url: str,
        api_id: str,
        api_key: str,
        client_type: str = "acme/crmsync",
        *,
        timeout: float = 30.0,
        retry: RetrySettings | None = None,
        requests_per_minute: int | None = None,
        page_size: int = 500,
        transport: httpx.BaseTransport | None = None,
        pacing_file: str | None = None,
    ) -> None:
        if not CLIENT_TYPE_RE.match(client_type):
            raise ValueError(f"client_type must be lowercase owner/app, got {client_type!r}")
        self._api_id = SecretStr(api_id)
        self._api_key = SecretStr(api_key)
        self.client_type = client_type
        self.page_size = max(1, min(MAX_PAGE_SIZE, page_size))
        super().__init__(
            base_url,
            timeout=timeout,
            retry=retry,
            rates=_pacing_rates(requests_per_minute),
            transport=transport,
            pacing_file=pacing_file,
        )

    # -- BaseClient hooks -----------------------------------------------------------------
    def _secrets(self) -> list[str]:
        return [self._api_key.get_secret_value(), self._api_id.get_secret_value()]

    def _auth_headers(self, query: str) -> dict[str, str]:
        return {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "api-auth-id": self._api_id.get_secret_value(),
            "api-auth-signature": signature(self._api_key.get_secret_value(), query),
            "client-type": self.client_type,
        }

    def _error_message(self, response: httpx.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            items = body.get("Items") or body.get("items")
            if isinstance(items, list):
                texts = [
                    str(i.get("Description") or i.get("description"))
                    for i in items
                    if isinstance(i, dict) and (i.get("Description") or i.get("description"))
                ]
                if texts:
                    return "; ".join(texts)
            for key in ("Description", "description", "Message", "message"):
                if isinstance(body.get(key), str) and body[key]:
                    return body[key]
            error = body.get("error")
            if isinstance(error, dict) and error.get("message"):
                return str(error["message"])
        return response.text[:500] or response.reason_phrase

    def _usage_limit_reset(self, response: httpx.Response, message: str) -> datetime | None:
        if response.status_code not in (403, 429):
            return None
        wait = parse_retry_after(response.headers.get("Retry-After"))
        long_wait = response.status_code == 429 and (wait or 0) > _THROTTLE_RETRY_AFTER_MAX_S
        if not (_USAGE_LIMIT_TEXT.search(message) or long_wait):
            return None
        now = datetime.now(UTC)
        return now + timedelta(seconds=wait) if wait else next_month_start(now)

    def __repr__(self) -> str:
        return f"UnleashedClient(base_url={self.base_url!r}, client_type={self.client_type!r})"

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _query(params: dict[str, Any]) -> str:
        pairs = []
        for key, value in params.items():
            if value is None:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            pairs.append((key, str(value)))
        return urlencode(pairs, safe=_QUERY_SAFE)

    @staticmethod
    def _check_guid(guid: str, what: str) -> str:
        if not isinstance(guid, str) or not _GUID_RE.match(guid):
            raise ValueError(f"{what} must be a GUID, got {guid!r}")
        return guid.lower()

    def _parse(
        self, model: type[R], raw: Any, endpoint: str, kind: str
    ) -> tuple[R | None, BadRecord | None]:
        if not isinstance(raw, dict):
            return None, BadRecord(
                self.system, endpoint, None, f"{kind} is not a JSON object: {raw!r:.60}"
            )
        try:
            return model.model_validate(raw), None
        except PydanticValidationError as exc:
            record_id = raw.get("Guid") if isinstance(raw.get("Guid"), str) else None
            reason = f"{_record_name(kind, raw)}: {_describe_errors(exc)}"
            return None, BadRecord(self.system, endpoint, record_id, reason)

    def _parse_customer(self, raw: Any, endpoint: str) -> tuple[Customer | None, list[BadRecord]]:
        """A customer and its embedded contacts; a bad contact is set aside on its own (with
        `parent_id`), so the customer and its other contacts still arrive."""
        contacts_raw = raw.get("Contacts") if isinstance(raw, dict) else None
        data = {k: v for k, v in raw.items() if k != "Contacts"} if isinstance(raw, dict) else raw
        customer, bad = self._parse(Customer, data, endpoint, "customer")
        if customer is None:
            return None, [bad] if bad else []
        # Unleashed requires both (docs/api-assumptions.md): a customer without them is malformed,
        # and syncing it would blank the CRM company's name or leave it without an account code.
        missing = [f for f in REQUIRED_CUSTOMER_FIELDS if not (getattr(customer, f) or "").strip()]
        if missing:
            problems = "; ".join(f"{f}: is required (got {data.get(f)!r})" for f in missing)
            reason = f"{_record_name('customer', raw)}: {problems}"
            return None, [BadRecord(self.system, endpoint, customer.Guid, reason)]
        if contacts_raw is None:
            return customer, []
        if not isinstance(contacts_raw, list):
            reason = f"{_record_name('customer', raw)}: Contacts is not a list"
            # parent_id: this customer's contact list is unknown, so none of them is read as
            # deleted.
            return customer, [
                BadRecord(self.system, endpoint, customer.Guid, reason, customer.Guid)
            ]
        contacts, bads = [], []
        for index, item in enumerate(contacts_raw):
            contact, bad = self._parse(Contact, item, endpoint, "contact")
            if contact is not None:
                contacts.append(contact)
            elif bad is not None:
                bad.reason = f"{bad.reason} [contact {index} of customer {customer.Guid}]"
                bad.parent_id = customer.Guid
                bads.append(bad)
        customer.Contacts = contacts
        return customer, bads

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[tuple[int, int | None, list]]:
        """(page number, server's NumberOfItems, raw items) for every page of a listing."""
        query = self._query({"pageSize": self.page_size, **params})
        label = f"{path}/{{page}}"
        page = 1
        while True:
            body = self.request("GET", f"{path}/{page}", query=query, label=label)
            items, pagination = self._envelope(body, label)
            yield page, pagination.get("NumberOfItems"), items
            pages = pagination.get("NumberOfPages")
            if not items or not isinstance(pages, int) or page >= pages:
                return
            page += 1

    def _envelope(self, body: Any, label: str) -> tuple[list, dict[str, Any]]:
        if not isinstance(body, dict) or not isinstance(body.get("Items"), list):
            raise ApiError(self.system, "GET", label, 200, "the list body has no Items list")
        pagination = body.get("Pagination")
        return body["Items"], pagination if isinstance(pagination, dict) else {}

    def _list_all(
        self,
        path: str,
        params: dict[str, Any],
        parse: Callable[[Any, str], tuple[Any, list[BadRecord]]],
    ) -> ListResult:
        """Every page. Offset paging is not a snapshot: when the unique records fall short of
        the server's count (a record already read moved to the end), the listing is read again
        and the passes are merged, the later copy of a record winning."""
        label = f"GET {path}/{{page}}"
        seen: dict[str, Any] = {}
        bad: dict[tuple[str | None, str], BadRecord] = {}
        result = ListResult()
        for attempt in range(_LIST_PASSES):
            total = None
            for _page, page_total, raw_items in self._pages(path, params):
                total = page_total  # the count as of the last page read
                result.pages += 1
                for raw in raw_items:
                    record, bads = parse(raw, label)
                    if record is not None:
                        seen.pop(record.Guid, None)  # keep the listing order of the latest copy
                        seen[record.Guid] = record
                    for b in bads:
                        bad[(b.record_id, b.reason)] = b
            result.reported_total = total
            whole = [b.record_id for b in bad.values() if b.parent_id is None]
            unusable = len({i for i in whole if i} - seen.keys()) + whole.count(None)
            if total is None or len(seen) + unusable >= total:
                break
            log.warning(
                "Unleashed %s: %d unique records for a reported %d (pass %d); reading again",
                path,
                len(seen),
                total,
                attempt + 1,
            )
        result.items = list(seen.values())
        result.bad = list(bad.values())
        return result

    def _with_record(self, call: Callable[[], Any], record_id: str | None, record: str) -> Any:
        try:
            return call()
        except ValidationError as exc:
            raise UnleashedValidationError(exc, record_id, record) from None

    def _one(self, model: type[R], raw: Any, method: str, label: str, kind: str) -> R:
        record, bad = self._parse(model, raw, label, kind)
        if record is None:
            reason = bad.reason if bad else f"{kind} is malformed"
            raise ApiError(self.system, method, label, 200, f"malformed {kind}: {reason}")
        return record

    # -- customers ---------------------------------------------------------------------------
    def _customer_params(
        self,
        modified_since: datetime | None,
        include_obsolete: bool,
        include_all_contacts: bool,
        order_by: str | None,
        customer_code: str | None,
    ) -> dict[str, Any]:
        if order_by is not None and order_by not in ("LastModifiedOn", "CreatedOn"):
            raise ValueError(f"order_by must be LastModifiedOn or CreatedOn, got {order_by!r}")
        return {
            "includeObsolete": include_obsolete,
            "includeAllContacts": include_all_contacts,
            "orderBy": order_by,
            "modifiedSince": format_modified_since(modified_since) if modified_since else None,
            "customerCode": customer_code,
        }

    def list_customers(
        self,
        *,
        modified_since: datetime | None = None,
        include_obsolete: bool = True,
        include_all_contacts: bool = True,
        order_by: str = "LastModifiedOn",
        customer_code: str | None = None,
    ) -> ListResult[Customer]:
        """Every customer (created or modified since `modified_since`, inclusive), all pages.

        `customer_code` is a *starts with* match on the server: compare codes yourself when you
        need an exact one. With `include_all_contacts`, each customer carries its first 100
        contacts. Malformed records land in `.bad` with the field and reason."""
        params = self._customer_params(
            modified_since, include_obsolete, include_all_contacts, order_by, customer_code
        )
        return self._list_all("/Customers", params, self._parse_customer)

    def iter_customer_pages(
        self,
        *,
        modified_since: datetime | None = None,
        include_obsolete: bool = True,
        include_all_contacts: bool = True,
        order_by: str = "LastModifiedOn",
        customer_code: str | None = None,
    ) -> Iterator[ListResult[Customer]]:
        """One ListResult per page, for callers that store as they go (no re-read pass)."""
        params = self._customer_params(
            modified_since, include_obsolete, include_all_contacts, order_by, customer_code
        )
        for page, total, raw_items in self._pages("/Customers", params):
            chunk: ListResult[Customer] = ListResult(reported_total=total, pages=page)
            for raw in raw_items:
                customer, bads = self._parse_customer(raw, "GET /Customers/{page}")
                if customer is not None:
                    chunk.items.append(customer)
                chunk.bad.extend(bads)
            yield chunk

    def get_customer(self, guid: str, *, include_all_contacts: bool = False) -> Customer:
        raw = self._get_customer_raw(guid, include_all_contacts)
        customer, bads = self._parse_customer(raw, "GET /Customers/{guid}")
        if customer is None or bads:
            reasons = "; ".join(b.reason for b in bads) or "malformed customer"
            raise ApiError(self.system, "GET", "/Customers/{guid}", 200, reasons)
        return customer

    def get_customer_and_contacts(self, guid: str) -> tuple[Customer, list[BadRecord]]:
        """The customer with its first 100 contacts (one request), and its contacts that are
        malformed (set aside, not raised: the customer itself is usable)."""
        raw = self._get_customer_raw(guid, include_all_contacts=True)
        customer, bads = self._parse_customer(raw, "GET /Customers/{guid}")
        if customer is None:
            reasons = "; ".join(b.reason for b in bads) or "malformed customer"
            raise ApiError(self.system, "GET", "/Customers/{guid}", 200, reasons)
        return customer, bads

    def _get_customer_raw(self, guid: str, include_all_contacts: bool = False) -> dict[str, Any]:
        guid = self._check_guid(guid, "customer guid")
        query = self._query({"includeAllContacts": True}) if include_all_contacts else ""
        raw = self.request("GET", f"/Customers/{guid}", query=query, label="/Customers/{guid}")
        if not isinstance(raw, dict):
            raise ApiError(self.system, "GET", "/Customers/{guid}", 200, "body is not an object")
        return raw

    def save_customer(self, customer: Customer | dict[str, Any]) -> Customer:
        """POST the whole customer (create, or full replace: fields left out are blanked).
        A customer without Guid gets a new one here, so a retried create cannot duplicate."""
        if isinstance(customer, Customer):
            data = customer.to_wire(include_contacts=False)
        else:
            data = {k: _jsonable(v) for k, v in customer.items() if k != "Contacts"}
        if "Salesperson" in data:
            salesperson = data.pop("Salesperson")
            data.setdefault("SalesPerson", salesperson)
        guid = self._check_guid(data.get("Guid") or str(uuid.uuid4()), "customer Guid")
        data["Guid"] = guid
        return self._post_customer(guid, data)

    def _post_customer(self, guid: str, data: dict[str, Any]) -> Customer:
        label = "/Customers/{guid}"

        def call() -> Any:
            return self.request(
                "POST", f"/Customers/{guid}", json_body=data, label=label, idempotent=True
            )

        raw = self._with_record(call, guid, _record_name("customer", data))
        return self._one(Customer, raw, "POST", label, "customer")

    def update_customer(self, guid: str, changes: dict[str, Any]) -> Customer:
        """Read–merge–write in exactly two requests: GET the customer, change only the given
        top-level keys (e.g. {"Website": ..., "SalesPerson": {...}}), POST the whole object."""
        raw = self._get_customer_raw(guid)
        data = {k: v for k, v in raw.items() if k != "Contacts"}
        if "SalesPerson" in changes or "Salesperson" in changes:
            data.pop("Salesperson", None)
            data.pop("SalesPerson", None)
        for key, value in changes.items():
            data["SalesPerson" if key == "Salesperson" else key] = _jsonable(value)
        if "Salesperson" in data:  # the server spelled it so; send it back the canonical way
            data["SalesPerson"] = data.pop("Salesperson")
        return self._post_customer(self._check_guid(guid, "customer guid"), data)

    # -- contacts ----------------------------------------------------------------------------
    def _raw_contacts(self, customer_guid: str) -> list[Any]:
        guid = self._check_guid(customer_guid, "customer guid")
        label = "/Customers/{guid}/Contacts"
        body = self.request("GET", f"/Customers/{guid}/Contacts", label=label)
        if isinstance(body, list):  # tolerate a bare list as well as the paged envelope
            return body
        items, pagination = self._envelope(body, label)
        if isinstance(pagination.get("NumberOfPages"), int) and pagination["NumberOfPages"] > 1:
            log.warning("Unleashed contacts of %s came in several pages; only page 1 read", guid)
        return items

    def list_contacts(self, customer_guid: str) -> list[Contact]:
        """All contacts of a customer. A malformed contact is left out with a warning."""
        contacts = []
        for raw in self._raw_contacts(customer_guid):
            contact, bad = self._parse(Contact, raw, "GET /Customers/{guid}/Contacts", "contact")
            if contact is not None:
                contacts.append(contact)
            elif bad is not None:
                log.warning("Unleashed contact set aside: %s", bad.reason)
        return contacts

    @staticmethod
    def _contact_name(customer_guid: str, contact: dict[str, Any]) -> str:
        who = " ".join(
            str(contact.get(f)) for f in ("FirstName", "LastName", "EmailAddress") if contact.get(f)
        )
        guid = f" {contact['Guid']}" if contact.get("Guid") else ""
        return f"contact{guid} {who!r} of customer {customer_guid}"

    def create_contact(self, customer_guid: str, contact: dict[str, Any] | Contact) -> Contact:
        """POST a new contact (not idempotent: never retried once the server may have acted)."""
        guid = self._check_guid(customer_guid, "customer guid")
        data = (
            _jsonable(contact)
            if isinstance(contact, Contact)
            else {k: _jsonable(v) for k, v in contact.items()}
        )
        if not data.get("Guid"):
            data.pop("Guid", None)
        label = "/Customers/{guid}/Contacts"

        def call() -> Any:
            return self.request("POST", f"/Customers/{guid}/Contacts", json_body=data, label=label)

        raw = self._with_record(call, data.get("Guid"), self._contact_name(guid, data))
        return self._one(Contact, raw, "POST", label, "contact")

    def update_contact(
        self,
        customer_guid: str,
        contact_guid: str,
        changes: dict[str, Any],
        *,
        current: dict[str, Any] | None = None,
    ) -> Contact:
        """Read the customer's contacts, merge `changes` into the one, PUT it whole (2 requests).

        A caller that has just read the contact passes it as `current` (1 request)."""
        guid = self._check_guid(customer_guid, "customer guid")
        contact_guid = self._check_guid(contact_guid, "contact guid")
        label = "/Customers/{guid}/Contacts/{contactGuid}"
        if current is None:
            current = next(
                (
                    c
                    for c in self._raw_contacts(guid)
                    if isinstance(c, dict) and str(c.get("Guid", "")).lower() == contact_guid
                ),
                None,
            )
        if current is None:
            raise NotFoundError(
                self.system,
                "PUT",
                label,
                404,
                f"contact {contact_guid} of customer {guid} was not found",
            )
        data = {**current, **{k: _jsonable(v) for k, v in changes.items()}, "Guid": contact_guid}

        def call() -> Any:
            path = f"/Customers/{guid}/Contacts/{contact_guid}"
            return self.request("PUT", path, json_body=data, label=label)

        raw = self._with_record(call, contact_guid, self._contact_name(guid, data))
        return self._one(Contact, raw, "PUT", label, "contact")

    def delete_contact(self, customer_guid: str, contact_guid: str) -> bool:
        """Delete a contact. False when it was already gone (404), the end state wanted."""
        guid = self._check_guid(customer_guid, "customer guid")
        contact_guid = self._check_guid(contact_guid, "contact guid")
        try:
            self.request(
                "DELETE",
                f"/Customers/{guid}/Contacts/{contact_guid}",
                label="/Customers/{guid}/Contacts/{contactGuid}",
            )
        except NotFoundError:
            return False
        return True

    # -- salespersons ------------------------------------------------------------------------
    def list_salespersons(self) -> ListResult[Salesperson]:
        """Every salesperson, obsolete ones included (they must be reported, not guessed)."""

        def parse(raw: Any, endpoint: str) -> tuple[Any, list[BadRecord]]:
            record, bad = self._parse(Salesperson, raw, endpoint, "salesperson")
            return record, [bad] if bad else []

        return self._list_all("/Salespersons", {"includeObsolete": True}, parse)
