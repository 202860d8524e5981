"""A local Unleashed API server (customers, contacts, salespersons) that behaves like the real one
on every point of docs/api-assumptions.md: HMAC-signed requests, path paging, .NET dates,
full-replace POST.

Every behaviour the public documentation leaves open is marked *assumed* here and listed in
docs/api-assumptions.md. Used by tests, the demo and development; the product never imports it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from devservers.common import (
    ADMIN_PREFIX,
    DocumentStore,
    FaultConfig,
    FaultMiddleware,
    FaultState,
    _send_json,
    admin_routes,
)
from devservers.webhooks import (
    WebhookHub,
    admin_webhook_routes,
    subscription_routes,
)
from sync_pipeline.clients.dates import (
    date_to_ms,
    encode_date,
    encode_dates,
    encode_ms,
    next_month_start,
    parse_wire_ms,
)

LOCAL_API_ID = "6f1c2d8e-3b4a-4c5d-9e7f-0a1b2c3d4e5f"
LOCAL_API_KEY = "local-unleashed-key-7Qm2Vx9LpR4tZc8Hn3Jw"

DEFAULT_PAGE_SIZE = 200
MAX_PAGE_SIZE = 1000
CONTACTS_PER_CUSTOMER_IN_LIST = 100
ORDER_BY_FIELDS = ("LastModifiedOn", "CreatedOn")
SERVER_OWNED = ("Guid", "CreatedOn", "LastModifiedOn")
CONTACT_TEXT_FIELDS = (
    "FirstName",
    "LastName",
    "EmailAddress",
    "PhoneNumber",
    "MobilePhone",
    "FaxNumber",
    "OfficePhone",
)

# Assumed: client-type is lowercase `owner/app`; anything else gets 403 (see AuthMiddleware).
CLIENT_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")
GUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
# Assumed: modifiedSince is `yyyy-MM-dd`, `yyyy-MM-ddTHH:mm:ss` or with `.fff` (1-7 digits), UTC
# unless it carries `Z` or an offset.
MODIFIED_SINCE_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}:\d{2}(?:\.\d{1,7})?)?(?:Z|[+-]\d{2}:\d{2})?$"
)

CUSTOMERS = "customers"
SALESPERSONS = "salespersons"


# --------------------------------------------------------------------------------------------
# Errors: one JSON shape for every refusal
# --------------------------------------------------------------------------------------------
class Refusal(Exception):
    """A refused request. Body (assumed shape): {"Description": str, "Items": [{Field, Value,
    Description}]}, where each item's Description already names the field, the value and why."""

    def __init__(self, status: int, description: str, items: list[dict[str, Any]] | None = None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.items = items or []

    def response(self) -> JSONResponse:
        return JSONResponse({"Description": self.description, "Items": self.items}, self.status)


def problem(field: str, value: Any, why: str) -> dict[str, Any]:
    shown = "" if value is None else f" {value!r}" if isinstance(value, str) else f" {value}"
    return {"Field": field, "Value": value, "Description": f"{field}{shown} {why}"}


def refuse(items: list[dict[str, Any]]) -> Refusal:
    return Refusal(400, "; ".join(i["Description"] for i in items), items)


def website_problem(value: Any) -> str | None:
    """Why a Website value is refused, or None. Rule (assumed): empty, or an absolute http/https
    URL with a dotted host name and no spaces."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        return "must be text"
    if any(ch.isspace() for ch in value):
        return "is not a valid URL: it contains a space"
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        return "is not a valid URL: it must start with http:// or https://"
    try:
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "is not a valid URL: the port is not a number"
    labels = host.split(".")
    if (
        len(labels) < 2
        or not all(labels)
        or not all(re.fullmatch(r"[a-z0-9-]+", x) for x in labels)
    ):
        return "is not a valid URL: the host name must be dotted, like www.example.com"
    return None


def normalize_guid(value: Any) -> str | None:
    if isinstance(value, str) and GUID_RE.match(value.strip()):
        return value.strip().lower()
    return None


def parse_modified_since(value: str) -> int:
    """ms since the epoch for a modifiedSince value (assumed format; naive = UTC)."""
    value = value.strip()
    if not MODIFIED_SINCE_RE.match(value):
        raise ValueError(value)
    text = value.replace("Z", "+00:00")
    frac = re.search(r"\.(\d+)", text)
    if frac:  # Python wants at most 6 fractional digits
        text = text.replace(frac.group(0), "." + frac.group(1)[:6].ljust(6, "0"))
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return date_to_ms(parsed)


def _ms_or_zero(value: Any) -> int:
    """Sort key for a stored date; a malformed one (planted through /_admin) sorts first."""
    try:
        return parse_wire_ms(value)
    except ValueError:
        return 0


def _ms_or_latest(value: Any) -> int:
    """For the modifiedSince filter: a malformed stored date (planted through /_admin) counts as
    just modified, so delta listings keep returning the record rather than hiding it."""
    try:
        return parse_wire_ms(value)
    except ValueError:
        return 2**62


def _bool_param(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise refuse([problem(name, raw, "must be true or false")])


def _page_size(request: Request) -> int:
    raw = request.query_params.get("pageSize")
    if raw is None or raw == "":
        return DEFAULT_PAGE_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        # Assumed: over the maximum is refused (400), not clamped, so a client never mis-pages.
        raise refuse(
            [problem("pageSize", raw, f"must be a whole number from 1 to {MAX_PAGE_SIZE}")]
        )
    return int(raw)


def paginate(items: list[dict[str, Any]], page: int, size: int) -> dict[str, Any]:
    if page < 1:
        raise refuse([problem("page", page, "must be 1 or more")])
    start = (page - 1) * size
    return {
        "Pagination": {
            "NumberOfItems": len(items),
            "PageSize": size,
            "PageNumber": page,
            "NumberOfPages": math.ceil(len(items) / size),
        },
        "Items": items[start : start + size],
    }


def _world_part(world: Any, name: str) -> list[dict[str, Any]]:
    if world is None:
        return []
    part = world.get(name) if isinstance(world, dict) else getattr(world, name, None)
    return list(part or [])


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------
class UnleashedState:
    """Customers (with their contacts inside) and salespersons, stored in wire shape (dates as
    `/Date(ms)/`) in a DocumentStore, so a restart with the same file keeps everything."""

    def __init__(self, store: DocumentStore, world: Any = None) -> None:
        self.store = store
        self.initial_world = world
        self.lock = threading.RLock()
        self._last_ms = 0
        if world is not None and not store.all(CUSTOMERS) and not store.all(SALESPERSONS):
            self.load_world(world)
        for doc in store.all(CUSTOMERS) + store.all(SALESPERSONS):
            self._last_ms = max(self._last_ms, _ms_or_zero(doc.get("LastModifiedOn")))

    def now_ms(self) -> int:
        """The current time in ms, strictly increasing, so every write has its own timestamp."""
        with self.lock:
            self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
            return self._last_ms

    # -- loading -------------------------------------------------------------------------
    def load_world(self, world: Any) -> dict[str, int]:
        with self.lock:
            now = encode_date(datetime.now(UTC))
            salespersons = []
            for raw in _world_part(world, "salespersons"):
                sp = encode_dates(raw)
                sp["Guid"] = normalize_guid(sp.get("Guid")) or str(uuid.uuid4())
                sp.setdefault("Obsolete", False)
                sp.setdefault("LastModifiedOn", now)
                salespersons.append((sp["Guid"], sp))
            self.store.put_many(SALESPERSONS, salespersons)
            customers = []
            for raw in _world_part(world, "customers"):
                doc = encode_dates(raw)
                doc["Guid"] = normalize_guid(doc.get("Guid")) or str(uuid.uuid4())
                sp = doc.pop("Salesperson", None) or doc.get("SalesPerson")
                doc["SalesPerson"] = self.salesperson_ref(sp) if sp else None
                doc.setdefault("Obsolete", False)
                doc.setdefault("CreatedOn", now)
                doc.setdefault("LastModifiedOn", doc["CreatedOn"])
                doc["Contacts"] = [
                    {**c, "Guid": normalize_guid(c.get("Guid")) or str(uuid.uuid4())}
                    for c in doc.get("Contacts") or []
                ]
                customers.append((doc["Guid"], doc))
            self.store.put_many(CUSTOMERS, customers)
            for doc in self.store.all(CUSTOMERS) + self.store.all(SALESPERSONS):
                self._last_ms = max(self._last_ms, _ms_or_zero(doc.get("LastModifiedOn")))
            return {"salespersons": len(salespersons), "customers": len(customers)}

    def replace_world(self, world: Any) -> dict[str, int]:
        with self.lock:
            self.store.clear()
            return self.load_world(world) if world is not None else {}

    # -- salespersons --------------------------------------------------------------------
    def salesperson_ref(self, sp: dict[str, Any]) -> dict[str, Any]:
        """The salesperson object as embedded in a customer: the current stored record if known."""
        guid = normalize_guid(sp.get("Guid"))
        stored = self.store.get(SALESPERSONS, guid) if guid else None
        source = stored or sp
        return {
            "Guid": guid or sp.get("Guid"),
            "FullName": source.get("FullName"),
            "Email": source.get("Email"),
            "Obsolete": bool(source.get("Obsolete", False)),
            "LastModifiedOn": source.get("LastModifiedOn"),
        }

    # -- customers -----------------------------------------------------------------------
    def customer_out(self, doc: dict[str, Any], include_contacts: bool) -> dict[str, Any]:
        out = {k: v for k, v in doc.items() if k != "Contacts"}
        if isinstance(out.get("SalesPerson"), dict):
            out["SalesPerson"] = self.salesperson_ref(out["SalesPerson"])
        if include_contacts:
            contacts = doc.get("Contacts") or []
            # A malformed list planted through /_admin is served as planted.
            out["Contacts"] = (
                contacts[:CONTACTS_PER_CUSTOMER_IN_LIST] if isinstance(contacts, list) else contacts
            )
        return out

    def touch(self, doc: dict[str, Any]) -> None:
        doc["LastModifiedOn"] = encode_ms(self.now_ms())
        self.store.put(CUSTOMERS, doc["Guid"], doc)


# --------------------------------------------------------------------------------------------
# Middleware: per-minute throttle and request signing
# --------------------------------------------------------------------------------------------
class ThrottleMiddleware:
    """Assumed per-minute throttling: over the limit → 429 with Retry-After (whole seconds).

    `window_s` shortens the window for fast tests; the limit scales with it
    (requests_per_minute * window_s / 60 requests per moving window)."""

    def __init__(self, app: ASGIApp, requests_per_minute: int | None, window_s: int = 60) -> None:
        self.app = app
        self.item = (
            RateLimitItemPerSecond(max(1, requests_per_minute * window_s // 60), window_s)
            if requests_per_minute
            else None
        )
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.rejected = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.item is None or scope["type"] != "http" or scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        if not self.limiter.hit(self.item, "account"):
            self.rejected += 1
            reset_at = self.limiter.get_window_stats(self.item, "account").reset_time
            retry_after = max(1, math.ceil(reset_at - time.time()))
            await _send_json(
                send,
                429,
                {"Description": "Too many requests: the per-minute request limit is exceeded"},
                {"retry-after": str(retry_after)},
            )
            return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------------------------
# Middleware: the monthly API usage limit
# --------------------------------------------------------------------------------------------
class MonthlyQuota:
    """The account's monthly API usage limit (docs/api-assumptions.md): every authenticated request
    counts in the calendar month (UTC) it arrives in; once the month's limit is used, every request
    is blocked until the 1st of the next month, 00:00 UTC (Unleashed's support pages). The counts
    live in the server's store, so a restart keeps them. `limit=None` (the default) counts nothing.
    How a blocked request is answered is *assumed* (`QuotaMiddleware`)."""

    COUNTER = "api-usage:"  # + YYYY-MM (UTC)

    def __init__(self, store: DocumentStore, limit: int | None = None) -> None:
        self.store = store
        self.limit = limit
        self.blocked = 0
        self._lock = threading.Lock()

    def _key(self, now: datetime) -> str:
        return self.COUNTER + now.astimezone(UTC).strftime("%Y-%m")

    def take(self, now: datetime | None = None) -> datetime | None:
        """Count one request, or return when the limit resets if the month's is used up."""
        now = now or datetime.now(UTC)
        with self._lock:
            if self.limit is None:
                return None
            key = self._key(now)
            if self.store.counter(key) >= self.limit:
                self.blocked += 1
                return next_month_start(now)
            self.store.next_id(key)
            return None

    def set(self, limit: int | None, used: int | None = None) -> None:
        """Change the limit (None: no limit), and optionally this month's count."""
        with self._lock:
            self.limit = limit
            if used is not None:
                self.store.set_counter(self._key(datetime.now(UTC)), used)

    def snapshot(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {
            "monthly_quota": self.limit,
            "month": now.strftime("%Y-%m"),
            "used": self.store.counter(self._key(now)),
            "resets_at": next_month_start(now).isoformat(),
            "blocked": self.blocked,
        }


class QuotaMiddleware:
    """Over the monthly limit → HTTP 429 with `Retry-After` (whole seconds until the reset) and a
    Description that says the usage limit is reached and when it resets: *assumed*, since the
    live answer is not documented (docs/api-assumptions.md). Inside the auth check, so only
    requests the account made count."""

    def __init__(self, app: ASGIApp, quota: MonthlyQuota) -> None:
        self.app = app
        self.quota = quota

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        resets_at = self.quota.take()
        if resets_at is None:
            await self.app(scope, receive, send)
            return
        wait = max(1, math.ceil((resets_at - datetime.now(UTC)).total_seconds()))
        await _send_json(
            send,
            429,
            {
                "Description": "API usage limit reached: requests are blocked until the limit "
                f"resets on {resets_at:%Y-%m-%d %H:%M} UTC",
                "Items": [],
            },
            {"retry-after": str(wait)},
        )


def expected_signature(api_key: str, query_string: bytes) -> str:
    digest = hmac.new(api_key.encode("utf-8"), query_string, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


class AuthMiddleware:
    """Checks client-type, api-auth-id and api-auth-signature on every API request.

    The signature is verified over the raw query string exactly as received (still URL-encoded):
    *assumed*; clients keep signed values to characters that need no encoding."""

    def __init__(self, app: ASGIApp, api_id: str, api_key: str) -> None:
        self.app = app
        self.api_id = api_id
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        reason = self._refusal(headers, scope.get("query_string", b""))
        if reason:
            await _send_json(send, 403, {"Description": reason, "Items": []})
            return
        await self.app(scope, receive, send)

    def _refusal(self, headers: Headers, query_string: bytes) -> str | None:
        client_type = headers.get("client-type")
        if not client_type or not CLIENT_TYPE_RE.match(client_type):
            return "client-type header is required: lowercase owner/app, e.g. acme/crmsync"
        api_id = headers.get("api-auth-id") or ""
        signature = headers.get("api-auth-signature") or ""
        if not signature:
            return "api-auth-signature header is missing"
        id_ok = hmac.compare_digest(api_id.lower().encode(), self.api_id.lower().encode())
        sig_ok = hmac.compare_digest(
            signature.encode(), expected_signature(self.api_key, query_string).encode()
        )
        if not id_ok:
            return "api-auth-id is not a known API id"
        if not sig_ok:
            return "api-auth-signature does not match the query string"
        return None


def endpoint_key(scope: Scope) -> str:
    """`POST /Customers/{guid}/Contacts/{contactGuid}`: templated, so counts stay readable."""
    parts = scope["path"].split("/")
    out = []
    for i, part in enumerate(parts):
        if GUID_RE.match(part):
            out.append("{contactGuid}" if i > 0 and parts[i - 1] == "Contacts" else "{guid}")
        elif part.isdigit():
            out.append("{page}")
        else:
            out.append(part)
    return f"{scope['method']} {'/'.join(out)}"


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------
def create_app(
    *,
    store_path: str | None = None,
    world: Any = None,
    api_id: str = LOCAL_API_ID,
    api_key: str = LOCAL_API_KEY,
    faults: FaultConfig | None = None,
    requests_per_minute: int | None = None,
    throttle_window_s: int = 60,
    monthly_quota: int | None = None,
) -> Starlette:
    """The local Unleashed server. `world` (a seed World or dict with `customers` and
    `salespersons`) is loaded only when the store at `store_path` is empty. `monthly_quota`:
    the account's monthly API usage limit (None: unlimited; `/_admin/quota` changes it)."""
    state = UnleashedState(DocumentStore(store_path), world)
    fault_state = FaultState(faults)
    quota = MonthlyQuota(state.store, monthly_quota)
    hooks = WebhookHub(state.store)
    handlers = _Handlers(state, hooks)

    async def get_quota(request: Request) -> JSONResponse:
        return JSONResponse(quota.snapshot())

    async def put_quota(request: Request) -> JSONResponse:
        body = await request.json()
        limit, used = body.get("monthly_quota"), body.get("used")
        if not all(v is None or (isinstance(v, int) and v >= 0) for v in (limit, used)):
            return JSONResponse({"Description": "monthly_quota and used: integers >= 0"}, 400)
        quota.set(limit, used)
        return JSONResponse(quota.snapshot())

    def reset() -> None:
        state.replace_world(state.initial_world)

    def seed(body: dict[str, Any]) -> dict[str, Any]:
        from devservers import seed as seed_module  # lazy: optional at import time

        world_ = seed_module.generate_world(
            companies=int(body.get("companies", 50)), seed=int(body.get("seed", 42))
        )
        return {"ok": True, **state.replace_world(world_)}

    admin_extra = [
        Route(f"{ADMIN_PREFIX}/salespersons", handlers.admin_put_salesperson, methods=["POST"]),
        Route(f"{ADMIN_PREFIX}/customers/{{guid}}", handlers.admin_get_customer, methods=["GET"]),
        Route(f"{ADMIN_PREFIX}/customers/{{guid}}", handlers.admin_put_customer, methods=["PUT"]),
        Route(
            f"{ADMIN_PREFIX}/customers/{{guid}}", handlers.admin_delete_customer, methods=["DELETE"]
        ),
        *admin_webhook_routes(hooks),
        Route(f"{ADMIN_PREFIX}/quota", get_quota, methods=["GET"]),
        Route(f"{ADMIN_PREFIX}/quota", put_quota, methods=["PUT"]),
    ]
    h = handlers
    routes = [
        Route("/Customers", h.wrap(h.list_customers), methods=["GET"]),
        Route("/Customers/{page:int}", h.wrap(h.list_customers), methods=["GET"]),
        Route("/Customers/{guid}", h.wrap(h.get_customer), methods=["GET"]),
        Route("/Customers/{guid}", h.wrap(h.save_customer), methods=["POST"]),
        Route("/Customers/{guid}/Contacts", h.wrap(h.list_contacts), methods=["GET"]),
        Route("/Customers/{guid}/Contacts", h.wrap(h.create_contact), methods=["POST"]),
        Route("/Customers/{guid}/Contacts/{contact}", h.wrap(h.replace_contact), methods=["PUT"]),
        Route("/Customers/{guid}/Contacts/{contact}", h.wrap(h.delete_contact), methods=["DELETE"]),
        Route("/Salespersons", h.wrap(h.list_salespersons), methods=["GET"]),
        Route("/Salespersons/{page:int}", h.wrap(h.list_salespersons), methods=["GET"]),
        Route("/Salespersons/{guid}", h.wrap(h.get_salesperson), methods=["GET"]),
        *subscription_routes(hooks, h.wrap, Refusal),
        *admin_routes(fault_state, reset=reset, seed=seed, extra=admin_extra),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(FaultMiddleware, faults=fault_state, endpoint_key=endpoint_key),
            Middleware(
                ThrottleMiddleware,
                requests_per_minute=requests_per_minute,
                window_s=throttle_window_s,
            ),
            Middleware(AuthMiddleware, api_id=api_id, api_key=api_key),
            Middleware(QuotaMiddleware, quota=quota),
        ],
    )
    app.state.unleashed = state
    app.state.faults = fault_state
    app.state.quota = quota
    app.state.webhooks = hooks
    return app


class _Handlers:
    def __init__(self, state: UnleashedState, hooks: WebhookHub) -> None:
        self.state = state
        self.store = state.store
        # Every change to a customer or one of its contacts is delivered to the webhook
        # subscriptions (from a background thread), whether made through the API or /_admin.
        self.hooks = hooks

    @staticmethod
    def wrap(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except Refusal as refusal:
                return refusal.response()

        return endpoint

    # -- helpers -------------------------------------------------------------------------
    async def _json_object(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Refusal(400, "The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Refusal(400, "The request body must be a JSON object")
        return body

    def _customer(self, request: Request) -> dict[str, Any]:
        raw = request.path_params["guid"]
        guid = normalize_guid(raw)
        doc = self.store.get(CUSTOMERS, guid) if guid else None
        if doc is None:
            raise Refusal(404, f"Customer {raw!r} was not found")
        return doc

    # -- customers -----------------------------------------------------------------------
    async def list_customers(self, request: Request) -> Response:
        page = request.path_params.get("page", 1)
        size = _page_size(request)
        include_obsolete = _bool_param(request, "includeObsolete", False)
        include_contacts = _bool_param(request, "includeAllContacts", False)
        q = request.query_params
        order_by = q.get("orderBy") or None
        if order_by is not None and order_by not in ORDER_BY_FIELDS:
            raise refuse([problem("orderBy", order_by, "must be LastModifiedOn or CreatedOn")])
        since_ms = None
        if q.get("modifiedSince"):
            try:
                since_ms = parse_modified_since(q["modifiedSince"])
            except ValueError:
                raise refuse(
                    [
                        problem(
                            "modifiedSince",
                            q["modifiedSince"],
                            "must be yyyy-MM-ddTHH:mm:ss[.fff] (UTC)",
                        )
                    ]
                ) from None
        code_prefix = (q.get("customerCode") or "").lower()
        docs = self.store.all(CUSTOMERS)
        if not include_obsolete:
            docs = [d for d in docs if not d.get("Obsolete")]
        if since_ms is not None:
            # Created or modified since: LastModifiedOn is never before CreatedOn. Inclusive.
            docs = [
                d
                for d in docs
                if max(_ms_or_latest(d.get("LastModifiedOn")), _ms_or_zero(d.get("CreatedOn")))
                >= since_ms
            ]
        if code_prefix:  # starts-with, case-insensitive (assumed)
            docs = [
                d for d in docs if str(d.get("CustomerCode") or "").lower().startswith(code_prefix)
            ]
        if order_by:
            docs.sort(key=lambda d: (_ms_or_zero(d.get(order_by)), d["Guid"]))
        body = paginate(docs, page, size)
        body["Items"] = [self.state.customer_out(d, include_contacts) for d in body["Items"]]
        return JSONResponse(body)

    async def get_customer(self, request: Request) -> Response:
        doc = self._customer(request)
        include_contacts = _bool_param(request, "includeAllContacts", False)
        return JSONResponse(self.state.customer_out(doc, include_contacts))

    async def save_customer(self, request: Request) -> Response:
        raw_guid = request.path_params["guid"]
        guid = normalize_guid(raw_guid)
        if guid is None:
            raise refuse([problem("Guid", raw_guid, "in the path is not a GUID")])
        body = await self._json_object(request)
        problems = self._customer_problems(guid, body)
        if problems:
            raise refuse(problems)
        with self.state.lock:
            existing = self.store.get(CUSTOMERS, guid)
            now = encode_ms(self.state.now_ms())
            sp = body.get("SalesPerson", body.get("Salesperson"))
            # Full replace (assumed): only what the body carries survives; the server owns
            # Guid/CreatedOn/LastModifiedOn, and contacts are kept (managed by their own endpoints).
            doc: dict[str, Any] = {"Guid": guid}
            for key, value in body.items():
                if key not in (*SERVER_OWNED, "Contacts", "SalesPerson", "Salesperson"):
                    doc[key] = value
            doc["CustomerCode"] = body["CustomerCode"].strip()
            doc["CustomerName"] = body["CustomerName"].strip()
            doc["Obsolete"] = bool(body.get("Obsolete") or False)
            doc["SalesPerson"] = self.state.salesperson_ref(sp) if sp else None
            doc["CreatedOn"] = existing["CreatedOn"] if existing else now
            doc["LastModifiedOn"] = now
            doc["Contacts"] = list(existing.get("Contacts") or []) if existing else []
            self.store.put(CUSTOMERS, guid, doc)
        self.hooks.notify("customer.updated" if existing else "customer.created", guid)
        return JSONResponse(self.state.customer_out(doc, include_contacts=False))

    def _customer_problems(self, guid: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        problems = []
        body_guid = body.get("Guid")
        if body_guid not in (None, "") and normalize_guid(body_guid) != guid:
            problems.append(problem("Guid", body_guid, "does not match the GUID in the path"))
        for field in ("CustomerCode", "CustomerName"):
            value = body.get(field)
            if not isinstance(value, str) or not value.strip():
                problems.append(problem(field, value, "is required"))
        for field in ("PhoneNumber", "Email"):
            if body.get(field) is not None and not isinstance(body[field], str):
                problems.append(problem(field, body[field], "must be text"))
        if not isinstance(body.get("Obsolete", False), bool | None):
            problems.append(problem("Obsolete", body["Obsolete"], "must be true or false"))
        why = website_problem(body.get("Website"))
        if why:
            problems.append(problem("Website", body.get("Website"), why))
        key = "SalesPerson" if "SalesPerson" in body else "Salesperson"
        sp = body.get(key)
        if sp is not None:
            sp_guid = normalize_guid(sp.get("Guid")) if isinstance(sp, dict) else None
            stored = self.store.get(SALESPERSONS, sp_guid) if sp_guid else None
            if not isinstance(sp, dict) or sp_guid is None:
                problems.append(problem(key, sp, "must be an object with the salesperson's Guid"))
            elif stored is None:
                problems.append(problem(key, sp_guid, "is not a known salesperson"))
            elif stored.get("Obsolete") and sp_guid != self._current_salesperson(guid):
                # Assumed: an obsolete salesperson cannot be newly assigned, but a customer that
                # already has one keeps it through an update of other fields.
                problems.append(problem(key, sp_guid, "is an obsolete salesperson"))
        code = body.get("CustomerCode")
        if isinstance(code, str) and code.strip():
            wanted = code.strip().lower()
            for other in self.store.all(CUSTOMERS):
                if other["Guid"] != guid and str(other.get("CustomerCode") or "").lower() == wanted:
                    problems.append(
                        problem(
                            "CustomerCode", code, f"is already used by customer {other['Guid']}"
                        )
                    )
                    break
        return problems

    def _current_salesperson(self, guid: str) -> str | None:
        existing = self.store.get(CUSTOMERS, guid) or {}
        sp = existing.get("SalesPerson")
        return normalize_guid(sp.get("Guid")) if isinstance(sp, dict) else None

    # -- contacts ------------------------------------------------------------------------
    async def list_contacts(self, request: Request) -> Response:
        # Assumed: not paged; every contact in one page of the usual envelope.
        contacts = list(self._customer(request).get("Contacts") or [])
        return JSONResponse(paginate(contacts, 1, max(1, len(contacts))))

    def _contact_problems(
        self, customer: dict[str, Any], body: dict[str, Any], own_guid: str | None
    ) -> list[dict[str, Any]]:
        problems = [
            problem(f, body[f], "must be text")
            for f in CONTACT_TEXT_FIELDS
            if body.get(f) is not None and not isinstance(body[f], str)
        ]
        if problems:
            return problems

        def identity(c: dict[str, Any]) -> tuple[str, ...]:
            return tuple(str(c.get(f) or "").strip().lower() for f in CONTACT_TEXT_FIELDS[:3])

        mine = identity(body)
        for other in customer.get("Contacts") or []:
            if other["Guid"] != own_guid and identity(other) == mine:
                who = " ".join(str(body.get(f) or "") for f in CONTACT_TEXT_FIELDS[:3])
                problems.append(
                    problem(
                        "EmailAddress",
                        body.get("EmailAddress"),
                        f"is not unique: contact {other['Guid']} already has the same first name,"
                        f" last name and email ({who.strip()})",
                    )
                )
                break
        return problems

    async def create_contact(self, request: Request) -> Response:
        body = await self._json_object(request)
        with self.state.lock:
            customer = self._customer(request)
            problems = self._contact_problems(customer, body, None)
            guid = str(uuid.uuid4())
            if body.get("Guid") not in (None, ""):
                guid = normalize_guid(body["Guid"]) or ""
                if not guid:
                    problems.append(problem("Guid", body["Guid"], "is not a GUID"))
                elif any(c["Guid"] == guid for c in customer.get("Contacts") or []):
                    problems.append(problem("Guid", guid, "is already used by another contact"))
            if problems:
                raise refuse(problems)
            contact = {**body, "Guid": guid}
            customer["Contacts"] = [*(customer.get("Contacts") or []), contact]
            self.state.touch(customer)
        self.hooks.notify("customer.updated", customer["Guid"])  # a contact change (assumed)
        return JSONResponse(contact, 201)

    def _contact_index(self, customer: dict[str, Any], request: Request) -> int:
        raw = request.path_params["contact"]
        guid = normalize_guid(raw)
        for i, contact in enumerate(customer.get("Contacts") or []):
            if contact["Guid"] == guid:
                return i
        raise Refusal(404, f"Contact {raw!r} was not found on customer {customer['Guid']}")

    async def replace_contact(self, request: Request) -> Response:
        body = await self._json_object(request)
        with self.state.lock:
            customer = self._customer(request)
            index = self._contact_index(customer, request)
            guid = customer["Contacts"][index]["Guid"]
            if body.get("Guid") not in (None, "") and normalize_guid(body["Guid"]) != guid:
                raise refuse([problem("Guid", body["Guid"], "does not match the GUID in the path")])
            problems = self._contact_problems(customer, body, guid)
            if problems:
                raise refuse(problems)
            contact = {**body, "Guid": guid}  # full replace of the contact
            customer["Contacts"] = list(customer["Contacts"])
            customer["Contacts"][index] = contact
            self.state.touch(customer)
        self.hooks.notify("customer.updated", customer["Guid"])
        return JSONResponse(contact)

    async def delete_contact(self, request: Request) -> Response:
        with self.state.lock:
            customer = self._customer(request)
            index = self._contact_index(customer, request)
            customer["Contacts"] = [c for i, c in enumerate(customer["Contacts"]) if i != index]
            self.state.touch(customer)
        self.hooks.notify("customer.updated", customer["Guid"])
        return Response(status_code=204)

    # -- salespersons --------------------------------------------------------------------
    async def list_salespersons(self, request: Request) -> Response:
        page = request.path_params.get("page", 1)
        size = _page_size(request)
        include_obsolete = _bool_param(request, "includeObsolete", False)
        docs = self.store.all(SALESPERSONS)
        if not include_obsolete:
            docs = [d for d in docs if not d.get("Obsolete")]
        return JSONResponse(paginate(docs, page, size))

    async def get_salesperson(self, request: Request) -> Response:
        raw = request.path_params["guid"]
        guid = normalize_guid(raw)
        doc = self.store.get(SALESPERSONS, guid) if guid else None
        if doc is None:
            raise Refusal(404, f"Salesperson {raw!r} was not found")
        return JSONResponse(doc)

    # -- admin (no auth, no validation beyond the bare minimum) ---------------------------
    async def admin_put_salesperson(self, request: Request) -> Response:
        try:
            body = await self._json_object(request)
            guid = normalize_guid(body.get("Guid")) or str(uuid.uuid4())
            email = body.get("Email")
            if not isinstance(email, str) or not email.strip():
                raise refuse([problem("Email", email, "is required")])
            for other in self.store.all(SALESPERSONS):
                if other["Guid"] != guid and str(other.get("Email")).lower() == email.lower():
                    raise refuse([problem("Email", email, "is already used by a salesperson")])
        except Refusal as refusal:
            return refusal.response()
        doc = {
            **encode_dates(body),
            "Guid": guid,
            "Obsolete": bool(body.get("Obsolete", False)),
            "LastModifiedOn": body.get("LastModifiedOn") or encode_ms(self.state.now_ms()),
        }
        self.store.put(SALESPERSONS, guid, doc)
        return JSONResponse(doc)

    async def admin_get_customer(self, request: Request) -> Response:
        guid = normalize_guid(request.path_params["guid"])
        doc = self.store.get(CUSTOMERS, guid) if guid else None
        if doc is None:
            return JSONResponse({"Description": "not found"}, 404)
        return JSONResponse(doc)

    async def admin_put_customer(self, request: Request) -> Response:
        """Force-edit: merges the given top-level fields without any validation (so tests can
        plant values the API would refuse). Creates the customer if unknown. Bumps
        LastModifiedOn unless the body sets it; `Contacts` replaces the contact list."""
        try:
            body = await self._json_object(request)
        except Refusal as refusal:
            return refusal.response()
        guid = normalize_guid(request.path_params["guid"])
        if guid is None:
            return JSONResponse({"Description": "the path must carry a GUID"}, 400)
        with self.state.lock:
            existing = self.store.get(CUSTOMERS, guid)
            now = encode_ms(self.state.now_ms())
            doc = {"Guid": guid, "Obsolete": False, "CreatedOn": now, "Contacts": []}
            doc.update(existing or {})
            doc["LastModifiedOn"] = now
            doc.update(encode_dates(body))
            doc["Guid"] = guid
            if isinstance(doc.get("Contacts") or [], list):  # anything else is kept as planted
                doc["Contacts"] = [
                    {**c, "Guid": normalize_guid(c.get("Guid")) or str(uuid.uuid4())}
                    if isinstance(c, dict)
                    else c
                    for c in doc.get("Contacts") or []
                ]
            self.store.put(CUSTOMERS, guid, doc)
        # A force-edit stands for a person's edit in Unleashed: it is delivered too.
        self.hooks.notify("customer.updated" if existing else "customer.created", guid)
        return JSONResponse(doc)

    async def admin_delete_customer(self, request: Request) -> Response:
        """A customer deleted in Unleashed (the API has no DELETE): gone from every listing,
        `customer.deleted` delivered."""
        guid = normalize_guid(request.path_params["guid"])
        if guid is None or not self.store.delete(CUSTOMERS, guid):
            return JSONResponse({"Description": "not found"}, 404)
        self.hooks.notify("customer.deleted", guid)
        return Response(status_code=204)
