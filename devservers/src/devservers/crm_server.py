"""Local Prospect CRM server: the OData v4 service the sync uses, with bearer auth, the workspace
rate limit (sliding window), client-driven paging under a server cap, durable state and fault
injection.

The entity model is `prospect_model.ENTITY_SETS` (the live names, keys and types), described at
`/$metadata` as CSDL generated from that same model, with a service document at `/`. Behaviour
the public material does not settle is listed in the "Prospect CRM" section of
docs/api-assumptions.md. Tests, the demo and development only.

Answers as the live service gives them: a list is `{"value": [...]}` of at most `MAX_PAGE_SIZE`
rows whatever `$top` asks (clients page with `$top`/`$skip`); `GET /Divisions(12)` is
`{"value": [record]}`; PATCH is 204 No Content; POST is 201 with the record; errors are
`{"error": {"code", "message", "details": [{"code", "message", "target"}]}}`.

Admin endpoints (no auth, never faulted): `/_admin/faults`, `/_admin/stats`, `/_admin/reset`,
`/_admin/seed`, `/_admin/tenant`, `/_admin/ratelimit`, `GET /_admin/raw/{EntitySet}/{key}` (a
record as stored, outside the API), and `PUT /_admin/raw/{EntitySet}/{key}`, which stores the
JSON body as that record exactly as given, without any validation (so tests can plant what the
API would never accept: wrong types, nulls, unknown fields, a malformed `LastUpdatedTimestamp`,
a record without its key). The body replaces the whole record; the timestamp is set to the next
write time only when the body leaves it out. A stored timestamp
that does not parse compares as the latest instant in `$filter` (see odata.py).
"""

from __future__ import annotations

import hmac
import math
import re
import threading
import time
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote, unquote, urlencode

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from devservers.common import (
    DocumentStore,
    FaultConfig,
    FaultMiddleware,
    FaultState,
    admin_routes,
)
from devservers.csdl import metadata_xml, service_document
from devservers.odata import (
    BOOL,
    EDM_RANGES,
    INT,
    STR,
    EntitySet,
    Model,
    ODataError,
    decode_skiptoken,
    encode_skiptoken,
    parse_expand,
    parse_filter,
    parse_orderby,
    parse_select,
    parse_timestamp,
    rows_after,
    shape,
    sort_rows,
)
from devservers.prospect_model import CONTAINER, ENTITY_SETS, NAMESPACE

LOCAL_CRM_TOKEN = "local-crm-token-3b9e6f0d2a7c4e81"  # noqa: S105 - local server only

# Rows in one answer, whatever `$top` asks: clients page on with `$skip`.
MAX_PAGE_SIZE = 500
# Query options the server understands; any other `$option` is a 400 naming it.
LIST_OPTIONS = {
    "$filter",
    "$orderby",
    "$top",
    "$skip",
    "$select",
    "$expand",
    "$count",
    "$skiptoken",
    "$format",
}
SINGLE_OPTIONS = {"$select", "$expand", "$format"}
# The option names the local server uses for the tenant switches (the live names are unknown;
# see docs/api-assumptions.md): the sync's guard reads them through `SystemOptions`.
ADVANCED_LEDGERS_OPTION = "AdvancedLedgers"
UNLEASHED_SYNC_OPTION = "UnleashedIntegrationEnabled"

_SEGMENT = re.compile(r"^/(?P<set>[A-Za-z_]\w*)(?:\((?P<key>.*)\))?/?$", re.DOTALL)
_TYPE_CHECKS = {
    INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    STR: lambda v: isinstance(v, str),
    BOOL: lambda v: isinstance(v, bool),
}


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 UTC with microseconds and `Z`."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, date):
        return value.isoformat()
    return value


def odata_error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    target: str | None = None,
) -> JSONResponse:
    detail = {"code": code, "message": message, "target": target}
    return JSONResponse(
        {"error": {"code": code, "message": message, "details": [detail]}},
        status,
        headers=headers,
    )


def endpoint_key(scope: Scope) -> str:
    """`GET /Divisions`, `PATCH /Contacts({key})`: the fault and stats counter key."""
    match = _SEGMENT.match(scope["path"])
    if not match:
        return f"{scope['method']} {scope['path']}"
    suffix = "({key})" if match.group("key") is not None else ""
    return f"{scope['method']} /{match.group('set')}{suffix}"


class _BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str, target: str | None = None) -> None:
        self.status, self.code, self.message, self.target = status, code, message, target


_KEY_PART = re.compile(r"\s*(?:(?P<name>[A-Za-z_]\w*)\s*=\s*)?(?P<value>'(?:[^']|'')*'|[^,']+)\s*")


def parse_key(entity: EntitySet, raw: str) -> tuple[Any, ...]:
    """Key values from `12`, `'DL'` or `OperatingCompanyCode='A',SalesLedgerId='X'`, in the
    order of the set's key properties, each checked against its Edm type."""
    text = unquote(raw)
    parts: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _KEY_PART.match(text, position)
        if not match or not match.group("value").strip():
            raise _BadRequest(400, "BadRequest", f"the key segment '({raw})' cannot be parsed")
        name = match.group("name")
        if name is None:
            if len(entity.keys) == 1 and parts:
                raise _BadRequest(
                    400,
                    "BadRequest",
                    f"'{entity.name}' has a single key ({entity.keys[0]}): give one value",
                )
            if len(entity.keys) != 1:
                raise _BadRequest(
                    400,
                    "BadRequest",
                    f"'{entity.name}' has a composite key: name each of {', '.join(entity.keys)}",
                )
            name = entity.keys[0]
        if name not in entity.keys or name in parts:
            raise _BadRequest(400, "BadRequest", f"'{name}' is not a key property here")
        parts[name] = match.group("value").strip()
        position = match.end()
        if position < len(text):
            if text[position] != ",":
                raise _BadRequest(400, "BadRequest", f"the key segment '({raw})' is malformed")
            position += 1
    if set(parts) != set(entity.keys):
        raise _BadRequest(
            400, "BadRequest", f"the key of '{entity.name}' is {', '.join(entity.keys)}"
        )
    values = []
    for name in entity.keys:
        literal = parts[name]
        kind = entity.props[name].kind
        if kind == STR:
            if not (literal.startswith("'") and literal.endswith("'")):
                raise _BadRequest(400, "BadRequest", f"the key '{name}' takes a quoted string")
            values.append(literal[1:-1].replace("''", "'"))
        else:
            try:
                values.append(int(literal))
            except ValueError:
                raise _BadRequest(
                    400, "BadRequest", f"the key '{name}' {literal} is not an integer"
                ) from None
    return tuple(values)


def key_segment(entity: EntitySet, record: dict[str, Any]) -> str:
    """`12`, `'DL'` or `OperatingCompanyCode='A',SalesLedgerId='X'` for a record."""

    def literal(name: str) -> str:
        value = record.get(name)
        if entity.props[name].kind == STR:
            return "'" + str(value).replace("'", "''") + "'"
        return str(value)

    if len(entity.keys) == 1:
        return literal(entity.keys[0])
    return ",".join(f"{k}={literal(k)}" for k in entity.keys)


class WorkspaceRateLimit:
    """The workspace-wide sliding window (limits' moving-window limiter), changeable at run time.

    `limits` counts windows in whole seconds, so the window is rounded to at least one second.
    """

    def __init__(self, limit: int, window_s: float) -> None:
        self._lock = threading.Lock()
        self.admitted = 0
        self.throttled = 0
        self.configure(limit, window_s)

    def configure(self, limit: int, window_s: float) -> None:
        with self._lock:
            self.limit = int(limit)
            self.window_s = max(1, round(window_s))
            self._item = RateLimitItemPerSecond(self.limit, self.window_s)
            self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self) -> float | None:
        """None when admitted, else the seconds until a slot frees (for Retry-After)."""
        with self._lock:
            if self._limiter.hit(self._item, "workspace"):
                self.admitted += 1
                return None
            self.throttled += 1
            reset_at = self._limiter.get_window_stats(self._item, "workspace").reset_time
            return max(0.0, reset_at - time.time())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            remaining = self._limiter.get_window_stats(self._item, "workspace").remaining
            return {
                "limit": self.limit,
                "window_s": self.window_s,
                "remaining": remaining,
                "admitted": self.admitted,
                "throttled": self.throttled,
            }

    def reset_counts(self) -> None:
        with self._lock:
            self.admitted = self.throttled = 0


class TenantFactsBody(BaseModel):
    operating_companies: int | None = Field(None, ge=1, le=26)
    advanced_ledgers: bool | None = None
    unleashed_sync: bool | None = None


class RateLimitBody(BaseModel):
    limit: int = Field(ge=1)
    window_s: float = Field(gt=0)


class CrmState:
    """The records, the write clock and the entity model, over a DocumentStore."""

    def __init__(self, store: DocumentStore, initial_world: Any = None) -> None:
        self.store = store
        self.initial_world = initial_world
        self.model = Model(ENTITY_SETS.values(), self.lookup)
        self._last_us = 0
        # Bumped on every change, so cached sorted listings know when they are stale.
        self.version = 0
        if not any(store.all(name) for name in ENTITY_SETS) and initial_world is not None:
            self.load(initial_world.crm)
        self._ensure_tenant_rows()
        self._last_us = self._max_timestamp_us()

    # -- reading ----------------------------------------------------------------------------
    def lookup(self, set_name: str, key: Any) -> dict[str, Any] | None:
        if key is None:
            return None
        return self.store.get(set_name, ENTITY_SETS[set_name].doc_id(key))

    def rows(self, set_name: str) -> list[dict[str, Any]]:
        return self.store.all(set_name)

    # -- loading ----------------------------------------------------------------------------
    def load(self, crm: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
        """Replace all state with `crm` (entity set -> records, timestamps as datetimes)."""
        counts = {}
        with self.store.lock:
            self.version += 1
            self.store.clear()
            for name, entity in ENTITY_SETS.items():
                records = []
                for raw in crm.get(name, []):
                    record = {f: p.default for f, p in entity.props.items()}
                    record.update({k: _to_json(v) for k, v in raw.items()})
                    if entity.timestamp:
                        for copy in entity.touched:
                            record[copy] = record[entity.timestamp]
                    records.append(record)
                self.store.put_many(name, ((entity.record_id(r), r) for r in records))
                if entity.generated_key:
                    self.store.set_counter(name, max((r[entity.key] for r in records), default=0))
                counts[name] = len(records)
            self._ensure_tenant_rows()
            self._last_us = max(self._last_us, self._max_timestamp_us())
        return counts

    def reset(self) -> None:
        self.load(self.initial_world.crm if self.initial_world is not None else {})

    def _ensure_tenant_rows(self) -> None:
        if not self.store.all("HomeCurrencies"):
            self._put(
                "HomeCurrencies",
                {"OperatingCompanyCode": "A", "Description": "Main", "Code": "GBP"},
            )

    def _put(self, set_name: str, record: dict[str, Any]) -> None:
        entity = ENTITY_SETS[set_name]
        full = {f: p.default for f, p in entity.props.items()}
        full.update(record)
        self.store.put(set_name, entity.record_id(full), full)

    def _max_timestamp_us(self) -> int:
        latest = 0
        for name, entity in ENTITY_SETS.items():
            if entity.timestamp is None:
                continue
            for record in self.store.all(name):
                try:
                    moment = parse_timestamp(record.get(entity.timestamp))
                except ValueError:
                    continue
                if moment is not None:
                    latest = max(latest, int(moment.timestamp() * 1_000_000))
        return latest

    # -- writing ----------------------------------------------------------------------------
    def next_timestamp(self) -> str:
        """Now, but strictly after the previous write even within one microsecond, so that a
        client cursor `LastUpdatedTimestamp gt <last seen>` never misses a write."""
        with self.store.lock:
            self._last_us = max(time.time_ns() // 1000, self._last_us + 1)
            return format_timestamp(datetime.fromtimestamp(self._last_us / 1_000_000, UTC))

    def stamp(self, entity: EntitySet, record: dict[str, Any], *, created: bool) -> None:
        if entity.timestamp is None and not (created and entity.created):
            return
        now = self.next_timestamp()
        if entity.timestamp:
            record[entity.timestamp] = now
            for copy in entity.touched:
                record[copy] = now
        if created and entity.created:
            record[entity.created] = now

    def validate_changes(self, entity: EntitySet, body: Any, *, creating: bool) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _BadRequest(400, "BadRequest", "the request body must be a JSON object")
        changes = {}
        for name, value in body.items():
            if name.startswith("@"):
                continue  # OData annotations such as @odata.type
            prop = entity.props.get(name)
            if name in entity.navigations:
                fks = ", ".join(entity.navigations[name].fks)
                raise _BadRequest(
                    400,
                    "BadRequest",
                    f"navigation property '{name}' cannot be written; set '{fks}' instead",
                    name,
                )
            if prop is None:
                raise _BadRequest(
                    400,
                    "BadRequest",
                    f"Could not find a property named '{name}' on type "
                    f"'{NAMESPACE}.{entity.type_name}'.",
                    name,
                )
            writable_key = creating and not entity.generated_key and name in entity.keys
            if (prop.computed or name in entity.keys) and not writable_key:
                raise _BadRequest(
                    400, "ReadOnlyProperty", f"the property '{name}' cannot be written", name
                )
            if value is None:
                if not prop.nullable:
                    raise _BadRequest(
                        400, "NullValue", f"the property '{name}' cannot be null", name
                    )
            elif not _TYPE_CHECKS.get(prop.kind, lambda v: True)(value):
                raise _BadRequest(
                    400,
                    "InvalidValue",
                    f"the property '{name}' expects {prop.type}, got {value!r}",
                    name,
                )
            elif prop.type in EDM_RANGES and not (
                EDM_RANGES[prop.type][0] <= value <= EDM_RANGES[prop.type][1]
            ):
                raise _BadRequest(
                    400, "InvalidValue", f"{value} is out of range for {prop.type}", name
                )
            elif prop.max_length is not None and len(value) > prop.max_length:
                raise _BadRequest(
                    400,
                    "InvalidValue",
                    f"the property '{name}' is at most {prop.max_length} characters long",
                    name,
                )
            changes[name] = value
        return changes

    def check_references(self, entity: EntitySet, record: dict[str, Any]) -> None:
        """Every navigation whose foreign key is set must find its target (the live error
        for a missing one is code -194)."""
        for nav_name, nav in entity.navigations.items():
            if set(nav.fks) & set(entity.keys) and nav.nullable:
                continue  # the record's own satellite (an Xtra row): may not exist yet
            values = tuple(record.get(f) for f in nav.fks)
            if any(v is None for v in values):
                continue
            if self.lookup(nav.target, values) is None:
                shown = ", ".join(f"{f}={v!r}" for f, v in zip(nav.fks, values, strict=True))
                raise _BadRequest(
                    400,
                    "-194",
                    f"No primary key value for foreign key '{nav_name}' ({shown}) in {nav.target}",
                    nav.fks[0],
                )

    def patch(
        self, entity: EntitySet, key: tuple[Any, ...], changes: dict[str, Any]
    ) -> dict[str, Any] | None:
        with self.store.lock:
            current = self.lookup(entity.name, key)
            if current is None:
                return None
            updated = {**current, **changes}
            self.check_references(entity, updated)
            self.stamp(entity, updated, created=False)
            self.store.put(entity.name, entity.doc_id(key), updated)
            self.version += 1
            return updated

    def create(self, entity: EntitySet, changes: dict[str, Any]) -> dict[str, Any]:
        missing = [
            f
            for f in entity.required
            if changes.get(f) is None and not (entity.generated_key and f in entity.keys)
        ]
        if missing:
            raise _BadRequest(
                400,
                "MissingProperty",
                f"'{entity.name}' requires {', '.join(missing)}",
                missing[0],
            )
        with self.store.lock:
            record = {f: p.default for f, p in entity.props.items()}
            record.update(changes)
            if entity.generated_key:
                record[entity.key] = self.store.next_id(entity.name)
            elif self.lookup(entity.name, tuple(record[k] for k in entity.keys)) is not None:
                raise _BadRequest(
                    409, "Conflict", f"{entity.name}({key_segment(entity, record)}) exists"
                )
            self.check_references(entity, record)
            self.stamp(entity, record, created=True)
            self.store.put(entity.name, entity.record_id(record), record)
            if entity.name == "Divisions":  # the live server makes a Division's Xtra row too
                self._put("DivisionXtras", {"DivisionId": record["DivisionId"]})
            elif entity.name == "Contacts":
                self._put("ContactXtras", {"ContactId": record["ContactId"]})
            self.version += 1
            return record

    # -- tenant facts -----------------------------------------------------------------------
    def _option(self, name: str) -> bool:
        row = self.store.get("SystemOptions", name) or {}
        return str(row.get("Value") or "").strip().lower() in ("1", "true", "yes", "y", "on")

    def tenant_facts(self) -> dict[str, Any]:
        return {
            "operating_companies": len(self.store.all("HomeCurrencies")),
            "advanced_ledgers": self._option(ADVANCED_LEDGERS_OPTION),
            "unleashed_sync": self._option(UNLEASHED_SYNC_OPTION),
        }

    def set_tenant_facts(self, body: TenantFactsBody) -> dict[str, Any]:
        with self.store.lock:
            self.version += 1
            if body.operating_companies is not None:
                codes = sorted(r["OperatingCompanyCode"] for r in self.rows("HomeCurrencies"))
                for extra in codes[body.operating_companies :]:
                    self.store.delete("HomeCurrencies", extra)
                for i in range(len(codes), body.operating_companies):
                    code = chr(ord("A") + i)
                    self._put(
                        "HomeCurrencies",
                        {"OperatingCompanyCode": code, "Description": f"Operating company {code}"},
                    )
            for option, value in (
                (ADVANCED_LEDGERS_OPTION, body.advanced_ledgers),
                (UNLEASHED_SYNC_OPTION, body.unleashed_sync),
            ):
                if value is not None:
                    self._put(
                        "SystemOptions",
                        {
                            "Option": option,
                            "Value": "1" if value else "0",
                            "Group": "Accounts",
                            "Description": option,
                        },
                    )
        return self.tenant_facts()


def _non_negative_int(params: dict[str, str], option: str) -> int | None:
    if option not in params:
        return None
    try:
        value = int(params[option])
    except ValueError:
        value = -1
    if value < 0:
        raise ODataError(option, f"'{params[option]}' is not a non-negative integer")
    return value


def _query_options(request: Request, allowed: set[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if not name.startswith("$"):
            continue
        if name not in allowed:
            raise ODataError(name, f"the query option '{name}' is not supported here")
        if name in params:
            raise ODataError(name, f"the query option '{name}' is given more than once")
        params[name] = value
    return params


def create_app(
    *,
    store_path: str | None = None,
    world: Any = None,
    token: str = LOCAL_CRM_TOKEN,
    rate_limit: int = 1200,
    rate_window_s: float = 600,
    faults: FaultConfig | None = None,
    page_size: int = MAX_PAGE_SIZE,
    next_links: bool = False,
) -> Starlette:
    """A Starlette app serving the CRM entity sets under `/` and admin endpoints under `/_admin`.

    `page_size` caps the rows of one answer (`$top` asks for fewer, never more). With
    `next_links` a truncated answer also carries `@odata.nextLink` (the live service is not
    known to send one; clients page with `$skip` either way). `world` (an object with `.crm`)
    is loaded only when the store is empty, so a restart with the same `store_path` keeps the
    state.
    """
    state = CrmState(DocumentStore(store_path), world)
    fault_state = FaultState(faults)
    rate = WorkspaceRateLimit(rate_limit, rate_window_s)
    expected_auth = f"Bearer {token}".encode()
    listings: dict[tuple, Any] = {}
    metadata = metadata_xml(ENTITY_SETS.values(), NAMESPACE, CONTAINER)

    async def api(request: Request) -> Response:
        supplied = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(supplied, expected_auth):
            return odata_error(
                401,
                "Unauthorized",
                "a valid personal access token is required (Authorization: Bearer <token>)",
                {"WWW-Authenticate": "Bearer"},
            )
        wait = rate.hit()
        if wait is not None:
            return odata_error(
                429,
                "TooManyRequests",
                f"workspace rate limit of {rate.limit} requests per {rate.window_s} s exceeded",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        path = request.url.path
        if path in ("/", "") and request.method == "GET":
            return JSONResponse(service_document(ENTITY_SETS.values(), _base(request)))
        if path == "/$metadata" and request.method == "GET":
            return Response(metadata, media_type="application/xml")
        match = _SEGMENT.match(path)
        entity = ENTITY_SETS.get(match.group("set")) if match else None
        if entity is None:
            return odata_error(404, "NotFound", f"No HTTP resource was found for '{path}'.")
        raw_key = match.group("key")
        try:
            if raw_key is None:
                if request.method == "GET":
                    return _list(request, entity)
                if request.method == "POST":
                    return await _create(request, entity)
            else:
                key = parse_key(entity, raw_key)
                if request.method == "GET":
                    return _get(request, entity, key)
                if request.method == "PATCH":
                    return await _patch(request, entity, key)
        except ODataError as exc:
            return odata_error(400, "BadRequest", str(exc), target=exc.option)
        except _BadRequest as exc:
            return odata_error(exc.status, exc.code, exc.message, target=exc.target)
        return odata_error(
            405, "MethodNotAllowed", f"{request.method} is not supported on {request.url.path}"
        )

    def _list(request: Request, entity: EntitySet) -> Response:
        params = _query_options(request, LIST_OPTIONS)
        model = state.model
        predicate = parse_filter(params["$filter"], model, entity) if "$filter" in params else None
        orderby = parse_orderby(params["$orderby"], model, entity) if "$orderby" in params else []
        select = parse_select(params["$select"], entity) if "$select" in params else []
        expand = parse_expand(params["$expand"], model, entity) if "$expand" in params else []
        top = _non_negative_int(params, "$top")
        skip = _non_negative_int(params, "$skip") or 0
        count = params.get("$count", "false").lower()
        if count not in ("true", "false"):
            raise ODataError("$count", f"must be true or false, not '{params['$count']}'")

        # Paging through a large set asks for the same sorted listing once per page: keep the
        # last few, keyed on the state version so any write makes them stale.
        cache_key = (entity.name, params.get("$filter"), params.get("$orderby"), state.version)
        cached = listings.get(cache_key)
        if cached is None:
            rows = state.rows(entity.name)
            if predicate is not None:
                rows = [r for r in rows if predicate(r)]
            cached = listings[cache_key] = sort_rows(rows, model, entity, orderby)
            while len(listings) > 8:
                listings.pop(next(iter(listings)))
        keyed, compare = cached
        total = len(keyed)
        if "$skiptoken" in params:
            after = decode_skiptoken(params["$skiptoken"], len(orderby) + len(entity.keys))
            keyed = rows_after(keyed, after, compare)
        else:
            keyed = keyed[skip:]
        limit = page_size if top is None else min(page_size, top)
        page = keyed[:limit]

        body: dict[str, Any] = {"@odata.context": f"{_base(request)}/$metadata#{entity.name}"}
        if count == "true":
            body["@odata.count"] = total
        body["value"] = [shape(r, model, entity, select, expand) for _, r in page]
        more = len(keyed) > len(page) and (top is None or top > len(page))
        if next_links and more and page:
            follow = [(k, v) for k, v in params.items() if k not in ("$skip", "$skiptoken", "$top")]
            if top is not None:
                follow.append(("$top", str(top - len(page))))
            follow.append(("$skiptoken", encode_skiptoken(page[-1][0])))
            query = urlencode(follow, quote_via=quote, safe="$(),/:'")
            body["@odata.nextLink"] = str(request.url.replace(query=query))
        return JSONResponse(body)

    def _get(request: Request, entity: EntitySet, key: tuple[Any, ...]) -> Response:
        params = _query_options(request, SINGLE_OPTIONS)
        select = parse_select(params["$select"], entity) if "$select" in params else []
        expand = parse_expand(params["$expand"], state.model, entity) if "$expand" in params else []
        record = state.lookup(entity.name, key)
        if record is None:
            return _not_found(entity, key)
        # The live service wraps even a single entity in a `value` array.
        return JSONResponse(
            {
                "@odata.context": f"{_base(request)}/$metadata#{entity.name}",
                "value": [shape(record, state.model, entity, select, expand)],
            }
        )

    async def _body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise _BadRequest(400, "BadRequest", "the request body is not valid JSON") from None

    async def _patch(request: Request, entity: EntitySet, key: tuple[Any, ...]) -> Response:
        _require_writable(entity, request.method)
        changes = state.validate_changes(entity, await _body(request), creating=False)
        record = state.patch(entity, key, changes)
        if record is None:
            return _not_found(entity, key)
        return Response(status_code=204)

    async def _create(request: Request, entity: EntitySet) -> Response:
        _require_writable(entity, request.method)
        changes = state.validate_changes(entity, await _body(request), creating=True)
        record = state.create(entity, changes)
        location = f"{_base(request)}/{entity.name}({key_segment(entity, record)})"
        return JSONResponse(record, 201, headers={"Location": location})

    # -- admin ------------------------------------------------------------------------------
    def do_reset() -> None:
        state.reset()
        rate.configure(rate.limit, rate.window_s)
        rate.reset_counts()

    def do_seed(body: dict[str, Any]) -> dict[str, Any]:
        from devservers import seed  # lazily: only the admin endpoint needs it

        world = seed.generate_world(
            companies=int(body.get("companies", 50)), seed=int(body.get("seed", 42))
        )
        return {"ok": True, "counts": state.load(world.crm)}

    async def get_tenant(request: Request) -> JSONResponse:
        return JSONResponse(state.tenant_facts())

    async def put_tenant(request: Request) -> JSONResponse:
        try:
            body = TenantFactsBody.model_validate(await request.json())
        except ValueError as exc:
            return odata_error(400, "BadRequest", str(exc))
        return JSONResponse(state.set_tenant_facts(body))

    async def get_rate(request: Request) -> JSONResponse:
        return JSONResponse(rate.snapshot())

    async def put_rate(request: Request) -> JSONResponse:
        try:
            body = RateLimitBody.model_validate(await request.json())
        except ValueError as exc:
            return odata_error(400, "BadRequest", str(exc))
        rate.configure(body.limit, body.window_s)
        return JSONResponse(rate.snapshot())

    async def reset_rate_counts(request: Request) -> JSONResponse:
        rate.reset_counts()
        return JSONResponse(rate.snapshot())

    async def get_raw(request: Request) -> JSONResponse:
        """A record as stored, outside the API (not counted, not rate-limited): benchmarks watch
        for a value to arrive without spending the tenant's request budget."""
        entity = ENTITY_SETS.get(request.path_params["entity_set"])
        if entity is None:
            return odata_error(
                404, "NotFound", f"no entity set {request.path_params['entity_set']}"
            )
        raw_key = request.path_params["key"]
        try:
            doc_id = entity.doc_id(parse_key(entity, raw_key))
        except _BadRequest:
            doc_id = raw_key
        doc = state.store.get(entity.name, doc_id)
        if doc is None:
            return odata_error(404, "NotFound", f"no {entity.name} {raw_key}")
        return JSONResponse(doc)

    async def put_raw(request: Request) -> JSONResponse:
        entity = ENTITY_SETS.get(request.path_params["entity_set"])
        if entity is None:
            return odata_error(
                404, "NotFound", f"no entity set {request.path_params['entity_set']}"
            )
        try:
            body = await request.json()
        except ValueError:
            return odata_error(400, "BadRequest", "the request body is not valid JSON")
        if not isinstance(body, dict):
            return odata_error(400, "BadRequest", "the request body must be a JSON object")
        raw_key = request.path_params["key"]
        try:
            doc_id = entity.doc_id(parse_key(entity, raw_key))
        except _BadRequest:
            doc_id = raw_key  # a key the API could never address: planted as given
        with state.store.lock:
            if entity.timestamp and entity.timestamp not in body:
                body[entity.timestamp] = state.next_timestamp()
            state.store.put(entity.name, doc_id, body)
            if entity.generated_key:
                rows = state.rows(entity.name)
                keys = [r[entity.key] for r in rows if _is_int(r.get(entity.key))]
                keys += [int(doc_id)] if doc_id.isdigit() else []
                # Records are never deleted, so the highest key is the counter: creations after
                # a planted record never reuse its key.
                state.store.set_counter(entity.name, max(keys, default=0))
            state.version += 1
        return JSONResponse(body)

    extra = [
        Route("/_admin/raw/{entity_set}/{key:path}", put_raw, methods=["PUT"]),
        Route("/_admin/raw/{entity_set}/{key:path}", get_raw, methods=["GET"]),
        Route("/_admin/tenant", get_tenant, methods=["GET"]),
        Route("/_admin/tenant", put_tenant, methods=["PUT"]),
        Route("/_admin/ratelimit", get_rate, methods=["GET"]),
        Route("/_admin/ratelimit", put_rate, methods=["PUT"]),
        Route("/_admin/ratelimit/reset", reset_rate_counts, methods=["POST"]),
    ]
    routes = [
        *admin_routes(fault_state, reset=do_reset, seed=do_seed, extra=extra),
        Route("/{path:path}", api, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(FaultMiddleware, faults=fault_state, endpoint_key=endpoint_key),
        ],
    )
    app.state.crm = state
    app.state.faults = fault_state
    app.state.rate_limit = rate
    return app


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _not_found(entity: EntitySet, key: tuple[Any, ...]) -> JSONResponse:
    shown = ",".join(repr(k) if isinstance(k, str) else str(k) for k in key)
    return odata_error(404, "NotFound", f"{entity.name}({shown}) does not exist")


def _require_writable(entity: EntitySet, method: str) -> None:
    if not entity.writable:
        raise _BadRequest(405, "MethodNotAllowed", f"{method} is not allowed on '{entity.name}'")
