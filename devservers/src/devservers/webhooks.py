"""Webhooks of the local Unleashed server: subscriptions (at most 5 per account) and signed
deliveries of customer created / updated / deleted, sent from a background thread with their
own retries, and a fault mode that drops or duplicates deliveries.

Everything here is *assumed* (docs/api-assumptions.md, "Webhooks"): the endpoint
`/WebhookSubscriptions`, its body, the payload, the headers and the signing (the product's
`sync_pipeline.webhooks.signing`), the retry policy, and that a contact change is delivered as
its customer's `customer.updated`.
"""

from __future__ import annotations

import heapq
import json
import random
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devservers.common import ADMIN_PREFIX, DocumentStore
from sync_pipeline.webhooks.signing import (
    CUSTOMER_EVENTS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)

SUBSCRIPTIONS = "webhook_subscriptions"
MAX_SUBSCRIPTIONS = 5  # Unleashed's documented cap per account


class WebhookConfig(BaseModel):
    """How the server delivers (PUT /_admin/webhooks). Rates are probabilities per delivery."""

    drop_rate: float = Field(0.0, ge=0, le=1, description="the delivery is lost: never sent")
    duplicate_rate: float = Field(
        0.0, ge=0, le=1, description="the delivery is sent again after it was accepted"
    )
    max_attempts: int = Field(6, ge=1, le=20)
    first_retry_s: float = Field(1.0, ge=0, description="doubled after each failed attempt")
    duplicate_after_s: float = Field(1.1, ge=0, description="when the duplicate follows")
    timeout_s: float = Field(5.0, gt=0)
    seed: int | None = None


class WebhookHub:
    """Subscriptions in the server's document store; deliveries from one daemon thread, so the
    API request that caused them is never slowed."""

    def __init__(self, store: DocumentStore) -> None:
        self.store = store
        self.config = WebhookConfig()
        self._rng = random.Random()
        self._lock = threading.Condition()
        self._queue: list[tuple[float, int, dict[str, Any]]] = []  # (due, seq, delivery)
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.counts: Counter[str] = Counter()
        self.recent: deque[dict[str, Any]] = deque(maxlen=50)  # what was sent, for tests

    # -- subscriptions --------------------------------------------------------------------------
    def subscriptions(self) -> list[dict[str, Any]]:
        return self.store.all(SUBSCRIPTIONS)

    def public(self, sub: dict[str, Any]) -> dict[str, Any]:
        """A subscription as listed: never its signing secret (only the create answer has it)."""
        return {k: v for k, v in sub.items() if k != "SigningSecret"}

    # -- events ---------------------------------------------------------------------------------
    def notify(self, event_type: str, customer_guid: str) -> None:
        """Queue one delivery of the event per subscription that wants it."""
        subs = [s for s in self.subscriptions() if event_type in s.get("EventTypes", [])]
        if not subs:
            return
        with self._lock:
            for sub in subs:
                payload = {
                    "id": str(uuid.uuid4()),
                    "eventType": event_type,
                    "createdOn": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "data": {"Guid": customer_guid},
                }
                self.counts["events"] += 1
                if self._rng.random() < self.config.drop_rate:
                    self.counts["dropped"] += 1
                    continue
                self._push(time.monotonic(), {"sub": sub, "payload": payload, "attempt": 1})
            self._ensure_thread()

    def _push(self, due: float, delivery: dict[str, Any]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (due, self._seq, delivery))
        self._lock.notify()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, daemon=True, name="unleashed-webhooks"
            )
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()

    def idle(self) -> bool:
        with self._lock:
            return not self._queue and not self.counts["in_flight"]

    def _run(self) -> None:
        with httpx.Client() as http:
            while True:
                with self._lock:
                    while not self._stopped and (
                        not self._queue or self._queue[0][0] > time.monotonic()
                    ):
                        wait = self._queue[0][0] - time.monotonic() if self._queue else None
                        self._lock.wait(wait)
                    if self._stopped:
                        return
                    _, _, delivery = heapq.heappop(self._queue)
                    self.counts["in_flight"] += 1
                try:
                    self._send(http, delivery)
                finally:
                    with self._lock:
                        self.counts["in_flight"] -= 1

    def _send(self, http: httpx.Client, delivery: dict[str, Any]) -> None:
        sub, config = delivery["sub"], self.config
        body = json.dumps(delivery["payload"]).encode()
        stamp = str(int(time.time()))  # signed afresh on every attempt (assumed)
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(sub["SigningSecret"], stamp, body),
            TIMESTAMP_HEADER: stamp,
        }
        try:
            status = http.post(
                sub["NotificationUrl"], content=body, headers=headers, timeout=config.timeout_s
            ).status_code
        except httpx.HTTPError:
            status = 0
        with self._lock:
            self.counts["attempts"] += 1
            self.recent.append(
                {"url": sub["NotificationUrl"], "body": body.decode(), "headers": headers,
                 "status": status}
            )  # fmt: skip
            if 200 <= status < 300:
                self.counts["delivered"] += 1
                if not delivery.get("duplicate") and self._rng.random() < config.duplicate_rate:
                    self.counts["duplicated"] += 1
                    again = {**delivery, "attempt": 1, "duplicate": True}
                    self._push(time.monotonic() + config.duplicate_after_s, again)
            elif delivery["attempt"] < config.max_attempts:
                self.counts["retries"] += 1
                wait = config.first_retry_s * 2 ** (delivery["attempt"] - 1)
                self._push(
                    time.monotonic() + wait, {**delivery, "attempt": delivery["attempt"] + 1}
                )
            else:
                self.counts["failed"] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "config": self.config.model_dump(),
                "subscriptions": len(self.subscriptions()),
                "queued": len(self._queue),
                "counts": {k: v for k, v in self.counts.items() if k != "in_flight"},
                "recent": list(self.recent),
            }

    def set_config(self, config: WebhookConfig) -> None:
        with self._lock:
            self.config = config
            self._rng = random.Random(config.seed)


def subscription_routes(hub: WebhookHub, wrap: Any, refusal: Any) -> list[Route]:
    """The API endpoints (behind the server's auth, counted like every request). `wrap` turns
    the server's `Refusal` into its answer; `refusal(status, description)` builds one."""

    async def list_subscriptions(request: Request) -> Response:
        subs = [hub.public(s) for s in hub.subscriptions()]
        return JSONResponse(
            {"Pagination": {"NumberOfItems": len(subs), "PageSize": MAX_SUBSCRIPTIONS,
                            "PageNumber": 1, "NumberOfPages": 1 if subs else 0},
             "Items": subs}
        )  # fmt: skip

    async def create_subscription(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise refusal(400, "The request body must be a JSON object")
        url = body.get("NotificationUrl")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise refusal(400, f"NotificationUrl {url!r} must be an absolute URL")
        events = body.get("EventTypes") or list(CUSTOMER_EVENTS)
        unknown = [e for e in events if e not in CUSTOMER_EVENTS]
        if not isinstance(events, list) or unknown:
            raise refusal(400, f"EventTypes: unknown event types {unknown}")
        with hub.store.lock:
            if len(hub.subscriptions()) >= MAX_SUBSCRIPTIONS:
                raise refusal(
                    400,
                    f"An account can have at most {MAX_SUBSCRIPTIONS} webhook subscriptions; "
                    "delete one first",
                )
            sub = {
                "Guid": str(uuid.uuid4()),
                "NotificationUrl": url,
                "EventTypes": events,
                "CreatedOn": datetime.now(UTC).isoformat(timespec="seconds"),
                "SigningSecret": secrets.token_urlsafe(32),
            }
            hub.store.put(SUBSCRIPTIONS, sub["Guid"], sub)
        return JSONResponse(sub, 201)

    async def delete_subscription(request: Request) -> Response:
        guid = str(request.path_params["guid"]).lower()
        if not hub.store.delete(SUBSCRIPTIONS, guid):
            raise refusal(404, f"Webhook subscription {guid!r} was not found")
        return Response(status_code=204)

    return [
        Route("/WebhookSubscriptions", wrap(list_subscriptions), methods=["GET"]),
        Route("/WebhookSubscriptions", wrap(create_subscription), methods=["POST"]),
        Route("/WebhookSubscriptions/{guid}", wrap(delete_subscription), methods=["DELETE"]),
    ]


def admin_webhook_routes(hub: WebhookHub) -> list[Route]:
    """GET /_admin/webhooks: configuration, counts, recent deliveries; PUT: the configuration
    (fields of `WebhookConfig`; omitted ones take their defaults, so `{}` clears the faults)."""

    async def get_state(request: Request) -> JSONResponse:
        return JSONResponse(hub.snapshot())

    async def put_config(request: Request) -> JSONResponse:
        try:
            config = WebhookConfig.model_validate(await request.json())
        except ValueError as exc:
            return JSONResponse({"error": {"code": "BadRequest", "message": str(exc)}}, 400)
        hub.set_config(config)
        return JSONResponse(config.model_dump())

    return [
        Route(f"{ADMIN_PREFIX}/webhooks", get_state, methods=["GET"]),
        Route(f"{ADMIN_PREFIX}/webhooks", put_config, methods=["PUT"]),
    ]
