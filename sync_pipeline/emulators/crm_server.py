"""Local Prospect CRM server: the OData v4 surface the sync uses, with bearer auth, the workspace
rate limit (sliding window), server paging, durable state and fault injection.

Entity sets, keys and fields follow docs/architecture.md; every behaviour we had to guess is listed
in the "Prospect CRM" section of docs/api-assumptions.md. Tests, the demo and development only.

Admin endpoints (no auth, never faulted): `/_admin/faults`, `/_admin/stats`, `/_admin/reset`,
`/_admin/seed`, `/_admin/tenant`, `/_admin/ratelimit`, and `PUT /_admin/raw/{EntitySet}/{key}`,
which stores the JSON body as that record exactly as given, without any validation (so tests can
plant what the API would never accept: wrong types, nulls, unknown fields, a malformed
`LastModified`, a record without its key). The body replaces the whole record; `LastModified` is
set to the next write time only when the body leaves it out. A stored timestamp that does not
parse compares as the latest instant in `$filter` (see odata.py).
"""

from __future__ import annotations

import hmac
import math
import re
import threading
import time
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote, urlencode

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

from sync_pipeline.emulators.common import (
    DocumentStore,
    FaultConfig,
    FaultMiddleware,
    FaultState,
    admin_routes,
)
from sync_pipeline.emulators.odata import (
    BOOL,
    DATETIME,
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

LOCAL_CRM_TOKEN = "local-crm-token-3b9e6f0d2a7c4e81"  # noqa: S105 - local server only

MAX_PAGE_SIZE = 1000
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

# The entity model of docs/architecture.md. Navigations are single-valued: name -> (set, fk).
ENTITY_SETS: dict[str, EntitySet] = {
    s.name: s
    for s in [
        EntitySet(
            "Divisions",
            "DivisionId",
            {
                "DivisionId": INT,
                "CompanyId": INT,
                "Name": STR,
                "Phone": STR,
                "Website": STR,
                "AccountManagerId": INT,
                "UnleashedGuid": STR,
                "StatusFlag": STR,
                "LastModified": DATETIME,
            },
            navigations={"AccountManager": ("Users", "AccountManagerId")},
            writable=True,
            required=("Name",),
        ),
        EntitySet(
            "Contacts",
            "ContactId",
            {
                "ContactId": INT,
                "DivisionId": INT,
                "Title": STR,
                "Forename": STR,
                "Surname": STR,
                "Email": STR,
                "Phone": STR,
                "Mobile": STR,
                "Fax": STR,
                "UnleashedGuid": STR,
                "StatusFlag": STR,
                "LastModified": DATETIME,
            },
            navigations={"Division": ("Divisions", "DivisionId")},
            writable=True,
            required=("DivisionId",),
        ),
        EntitySet(
            "Users",
            "UserId",
            {"UserId": INT, "Name": STR, "Email": STR, "Active": BOOL, "LastModified": DATETIME},
        ),
        EntitySet(
            "SalesLedgers",
            "SalesLedgerId",
            {
                "SalesLedgerId": INT,
                "DivisionId": INT,
                "AccountCode": STR,
                "LastModified": DATETIME,
            },
            navigations={"Division": ("Divisions", "DivisionId")},
            writable=True,
            required=("DivisionId", "AccountCode"),
        ),
        EntitySet(
            "OperatingCompanies",
            "OperatingCompanyId",
            {"OperatingCompanyId": INT, "Name": STR},
            timestamp=None,
        ),
        EntitySet(
            "SystemSettings",
            "SettingId",
            {"SettingId": INT, "AdvancedLedgersEnabled": BOOL},
            timestamp=None,
        ),
    ]
}
# Values a created record gets when the body leaves them out.
CREATE_DEFAULTS = {"StatusFlag": "A"}

_SEGMENT = re.compile(r"^/(?P<set>[A-Za-z_]\w*)(?:\((?P<key>[^)]*)\))?/?$")
_TYPE_CHECKS = {
    INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    STR: lambda v: isinstance(v, str),
    BOOL: lambda v: isinstance(v, bool),
}


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and `Z` (docs/architecture.md)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, date):
        return value.isoformat()
    return value


def odata_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def endpoint_key(scope: Scope) -> str:
    """`GET /Divisions`, `PATCH /Contacts({key})`: the fault and stats counter key."""
    match = _SEGMENT.match(scope["path"])
    if not match:
        return f"{scope['method']} {scope['path']}"
    suffix = "({key})" if match.group("key") is not None else ""
    return f"{scope['method']} /{match.group('set')}{suffix}"


class _BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message


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
    operating_companies: int | None = Field(None, ge=1)
    advanced_ledgers: bool | None = None


class RateLimitBody(BaseModel):
    limit: int = Field(ge=1)
    window_s: float = Field(gt=0)


class CrmState:
    """The records, the write clock and the entity model, over a DocumentStore."""

    def __init__(self, store: DocumentStore, initial_world: Any = None) -> None:
        self.store = store
        self.initial_world = initial_world
        self.model = Model(ENTITY_SETS.values(), self.lookup)
        self._last_ms = 0
        # Bumped on every change, so cached sorted listings know when they are stale.
        self.version = 0
        if not any(store.all(name) for name in ENTITY_SETS) and initial_world is not None:
            self.load(initial_world.crm)
        self._ensure_tenant_rows()
        self._last_ms = self._max_timestamp_ms()

    # -- reading ----------------------------------------------------------------------------
    def lookup(self, set_name: str, key: Any) -> dict[str, Any] | None:
        if key is None:
            return None
        return self.store.get(set_name, str(key))

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
                    record = {f: None for f in entity.fields}
                    record.update({k: _to_json(v) for k, v in raw.items()})
                    records.append(record)
                self.store.put_many(name, ((str(r[entity.key]), r) for r in records))
                self.store.set_counter(name, max((r[entity.key] for r in records), default=0))
                counts[name] = len(records)
            self._ensure_tenant_rows()
            self._last_ms = max(self._last_ms, self._max_timestamp_ms())
        return counts

    def reset(self) -> None:
        self.load(self.initial_world.crm if self.initial_world is not None else {})

    def _ensure_tenant_rows(self) -> None:
        if not self.store.all("OperatingCompanies"):
            self.store.put(
                "OperatingCompanies", "1", {"OperatingCompanyId": 1, "Name": "Main company"}
            )
            self.store.set_counter("OperatingCompanies", 1)
        if not self.store.all("SystemSettings"):
            self.store.put("SystemSettings", "1", {"SettingId": 1, "AdvancedLedgersEnabled": False})

    def _max_timestamp_ms(self) -> int:
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
                    latest = max(latest, int(moment.timestamp() * 1000))
        return latest

    # -- writing ----------------------------------------------------------------------------
    def next_timestamp(self) -> str:
        """Now, but strictly after the previous write even within one millisecond, so that a
        client cursor `LastModified gt <last seen>` never misses a write."""
        with self.store.lock:
            self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
            return format_timestamp(datetime.fromtimestamp(self._last_ms / 1000, UTC))

    def validate_changes(self, entity: EntitySet, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _BadRequest(400, "BadRequest", "the request body must be a JSON object")
        changes = {}
        for name, value in body.items():
            if name.startswith("@"):
                continue  # OData annotations such as @odata.type
            if name == entity.key or name == entity.timestamp:
                message = f"the property '{name}' is read-only on '{entity.name}'"
                raise _BadRequest(400, "ReadOnlyProperty", message)
            if name in entity.navigations:
                fk = entity.navigations[name][1]
                raise _BadRequest(
                    400,
                    "BadRequest",
                    f"navigation property '{name}' cannot be written; set '{fk}' instead",
                )
            if name not in entity.fields:
                raise _BadRequest(
                    400,
                    "UnknownProperty",
                    f"the property '{name}' does not exist on type '{entity.name}'",
                )
            kind = entity.fields[name]
            if value is not None and not _TYPE_CHECKS[kind](value):
                raise _BadRequest(
                    400,
                    "InvalidValue",
                    f"the property '{name}' expects Edm.{_EDM[kind]}, got {value!r}",
                )
            changes[name] = value
        for nav, (target, fk) in entity.navigations.items():
            if changes.get(fk) is not None and self.lookup(target, changes[fk]) is None:
                raise _BadRequest(
                    400,
                    "InvalidValue",
                    f"'{fk}' {changes[fk]} does not match any {target} (via {nav})",
                )
        return changes

    def patch(self, entity: EntitySet, key: int, changes: dict[str, Any]) -> dict[str, Any] | None:
        with self.store.lock:
            current = self.lookup(entity.name, key)
            if current is None:
                return None
            updated = {**current, **changes}
            if entity.timestamp:
                updated[entity.timestamp] = self.next_timestamp()
            self.store.put(entity.name, str(key), updated)
            self.version += 1
            return updated

    def create(self, entity: EntitySet, changes: dict[str, Any]) -> dict[str, Any]:
        missing = [f for f in entity.required if changes.get(f) is None]
        if missing:
            raise _BadRequest(
                400, "MissingProperty", f"'{entity.name}' requires {', '.join(missing)}"
            )
        with self.store.lock:
            key = self.store.next_id(entity.name)
            record = {f: CREATE_DEFAULTS.get(f) for f in entity.fields}
            record.update(changes)
            record[entity.key] = key
            if entity.timestamp:
                record[entity.timestamp] = self.next_timestamp()
            self.store.put(entity.name, str(key), record)
            self.version += 1
            return record

    # -- tenant facts -----------------------------------------------------------------------
    def tenant_facts(self) -> dict[str, Any]:
        settings = self.store.get("SystemSettings", "1") or {}
        return {
            "operating_companies": len(self.store.all("OperatingCompanies")),
            "advanced_ledgers": bool(settings.get("AdvancedLedgersEnabled")),
        }

    def set_tenant_facts(self, body: TenantFactsBody) -> dict[str, Any]:
        with self.store.lock:
            self.version += 1
            if body.operating_companies is not None:
                rows = sorted(
                    self.store.all("OperatingCompanies"), key=lambda r: r["OperatingCompanyId"]
                )
                for extra in rows[body.operating_companies :]:
                    self.store.delete("OperatingCompanies", str(extra["OperatingCompanyId"]))
                for _ in range(len(rows), body.operating_companies):
                    key = self.store.next_id("OperatingCompanies")
                    self.store.put(
                        "OperatingCompanies",
                        str(key),
                        {"OperatingCompanyId": key, "Name": f"Operating company {key}"},
                    )
            if body.advanced_ledgers is not None:
                self.store.put(
                    "SystemSettings",
                    "1",
                    {"SettingId": 1, "AdvancedLedgersEnabled": body.advanced_ledgers},
                )
        return self.tenant_facts()


_EDM = {INT: "Int32", STR: "String", BOOL: "Boolean", DATETIME: "DateTimeOffset"}


def _parse_key(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise _BadRequest(400, "BadRequest", f"the key '{raw}' is not an integer") from None


def _max_page_size(request: Request, default: int) -> int:
    """`Prefer: odata.maxpagesize=N` (capped at 1000); other or unparseable preferences ignored."""
    for preference in request.headers.get("prefer", "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "odata.maxpagesize":
            try:
                return max(1, min(MAX_PAGE_SIZE, int(value.strip().strip('"'))))
            except ValueError:
                return default
    return default


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
    page_size: int = 100,
) -> Starlette:
    """A Starlette app serving the CRM entity sets under `/` and admin endpoints under `/_admin`.

    `world` (an object with `.crm`) is loaded only when the store is empty, so a restart with the
    same `store_path` keeps the state.
    """
    state = CrmState(DocumentStore(store_path), world)
    fault_state = FaultState(faults)
    rate = WorkspaceRateLimit(rate_limit, rate_window_s)
    expected_auth = f"Bearer {token}".encode()
    listings: dict[tuple, Any] = {}

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
        match = _SEGMENT.match(request.url.path)
        entity = ENTITY_SETS.get(match.group("set")) if match else None
        if entity is None:
            return odata_error(
                404, "NotFound", f"no resource found for the segment '{request.url.path}'"
            )
        raw_key = match.group("key")
        try:
            if raw_key is None:
                if request.method == "GET":
                    return _list(request, entity)
                if request.method == "POST":
                    return await _create(request, entity)
            else:
                key = _parse_key(raw_key)
                if request.method == "GET":
                    return _get(request, entity, key)
                if request.method == "PATCH":
                    return await _patch(request, entity, key)
        except ODataError as exc:
            return odata_error(400, "BadRequest", str(exc))
        except _BadRequest as exc:
            return odata_error(exc.status, exc.code, exc.message)
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
        max_page = _max_page_size(request, page_size)

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
            after = decode_skiptoken(params["$skiptoken"], len(orderby) + 1)
            keyed = rows_after(keyed, after, compare)
        else:
            keyed = keyed[skip:]
        limit = max_page if top is None else min(max_page, top)
        page = keyed[:limit]

        body: dict[str, Any] = {"@odata.context": f"{_base(request)}/$metadata#{entity.name}"}
        if count == "true":
            body["@odata.count"] = total
        body["value"] = [shape(r, model, entity, select, expand) for _, r in page]
        more = len(keyed) > len(page) and (top is None or top > len(page))
        if more and page:
            follow = [(k, v) for k, v in params.items() if k not in ("$skip", "$skiptoken", "$top")]
            if top is not None:
                follow.append(("$top", str(top - len(page))))
            follow.append(("$skiptoken", encode_skiptoken(page[-1][0])))
            query = urlencode(follow, quote_via=quote, safe="$(),/:'")
            body["@odata.nextLink"] = str(request.url.replace(query=query))
        headers = {}
        if max_page != page_size:
            headers["Preference-Applied"] = f"odata.maxpagesize={max_page}"
        return JSONResponse(body, headers=headers)

    def _get(request: Request, entity: EntitySet, key: int) -> Response:
        params = _query_options(request, SINGLE_OPTIONS)
        select = parse_select(params["$select"], entity) if "$select" in params else []
        expand = parse_expand(params["$expand"], state.model, entity) if "$expand" in params else []
        record = state.lookup(entity.name, key)
        if record is None:
            return _not_found(entity, key)
        return JSONResponse(shape(record, state.model, entity, select, expand))

    async def _body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise _BadRequest(400, "BadRequest", "the request body is not valid JSON") from None

    async def _patch(request: Request, entity: EntitySet, key: int) -> Response:
        _require_writable(entity, request.method)
        changes = state.validate_changes(entity, await _body(request))
        record = state.patch(entity, key, changes)
        if record is None:
            return _not_found(entity, key)
        if "return=minimal" in request.headers.get("prefer", ""):
            return Response(status_code=204, headers={"Preference-Applied": "return=minimal"})
        return JSONResponse(record)

    async def _create(request: Request, entity: EntitySet) -> Response:
        _require_writable(entity, request.method)
        changes = state.validate_changes(entity, await _body(request))
        record = state.create(entity, changes)
        location = f"{_base(request)}/{entity.name}({record[entity.key]})"
        return JSONResponse(record, 201, headers={"Location": location})

    # -- admin ------------------------------------------------------------------------------
    def do_reset() -> None:
        state.reset()
        rate.configure(rate.limit, rate.window_s)
        rate.reset_counts()

    def do_seed(body: dict[str, Any]) -> dict[str, Any]:
        from sync_pipeline.emulators import seed  # lazily: only the admin endpoint needs it

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
        with state.store.lock:
            if entity.timestamp and entity.timestamp not in body:
                body[entity.timestamp] = state.next_timestamp()
            state.store.put(entity.name, raw_key, body)
            keys = [r[entity.key] for r in state.rows(entity.name) if _is_int(r.get(entity.key))]
            keys += [int(raw_key)] if raw_key.isdigit() else []
            # Records are never deleted, so the highest key is the counter: creations after a
            # planted record never reuse its key.
            state.store.set_counter(entity.name, max(keys, default=0))
            state.version += 1
        return JSONResponse(body)

    extra = [
        Route("/_admin/raw/{entity_set}/{key}", put_raw, methods=["PUT"]),
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


def _not_found(entity: EntitySet, key: int) -> JSONResponse:
    return odata_error(404, "NotFound", f"{entity.name}({key}) does not exist")


def _require_writable(entity: EntitySet, method: str) -> None:
    if not entity.writable:
        raise _BadRequest(405, "MethodNotAllowed", f"{method} is not allowed on '{entity.name}'")
