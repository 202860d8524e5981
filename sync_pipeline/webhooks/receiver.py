"""The webhook receiver: a small Starlette app, served by uvicorn (`sync-pipeline webhooks`).

For each delivery, in this order: both signature headers present, the timestamp within
`tolerance_s` of now, the signature right for one of the subscriptions' signing secrets
(constant-time comparison), the payload a customer event, and then the event recorded durably
(SQLite, synchronous) before the answer. Refused: 401 with nothing recorded (a missing header,
a stale or future timestamp, a wrong signature, a replay of a delivery already received with
the same signature); 400 for a signed payload the receiver cannot read; 413 for an oversized
body. A redelivery of a known delivery id (signed afresh) is answered 200 and queued once.
Nothing slow happens here: the records are read from Unleashed by the sensor's run.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sync_pipeline.webhooks.events import EventStore
from sync_pipeline.webhooks.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    PayloadError,
    parse_event,
    signature_matches,
)

log = logging.getLogger("sync_pipeline.webhooks")

WEBHOOK_PATH = "/webhooks/unleashed"
SECRET_ENV = "UNLEASHED_WEBHOOK_SECRET"  # noqa: S105 - the variable's name
DEFAULT_TOLERANCE_S = 300
MAX_BODY_BYTES = 1_000_000


def _refuse(status: int, why: str) -> JSONResponse:
    log.warning("webhook delivery refused (%s): %s", status, why)
    return JSONResponse({"error": why}, status)


def create_receiver(
    events: EventStore, secrets: list[str], *, tolerance_s: float = DEFAULT_TOLERANCE_S
) -> Starlette:
    """The receiver app. `secrets`: the signing secret of every subscription pointing here."""
    if not secrets:
        raise ValueError("at least one webhook signing secret is needed")

    async def receive(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _refuse(413, "body too large")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _refuse(413, "body too large")
        signature = request.headers.get(SIGNATURE_HEADER) or ""
        stamp = request.headers.get(TIMESTAMP_HEADER) or ""
        if not signature or not stamp:
            return _refuse(401, f"the {SIGNATURE_HEADER} and {TIMESTAMP_HEADER} headers are needed")
        if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 12:
            return _refuse(401, "the timestamp is not Unix seconds")
        age = time.time() - int(stamp)
        if abs(age) > tolerance_s:
            return _refuse(
                401, f"the timestamp is {age:+.0f} s off now (tolerance {tolerance_s:g} s)"
            )
        if not signature_matches(secrets, stamp, body, signature):
            return _refuse(401, "the signature does not match")
        try:
            event = parse_event(json.loads(body))
        except (ValueError, PayloadError) as exc:
            return _refuse(400, f"unreadable payload: {exc}")
        if event is None:
            return JSONResponse({"status": "ignored"})
        # Durable before the 2xx: the file is written synchronously (off the event loop).
        outcome = await run_in_threadpool(events.record, event, signature)
        if outcome == "replay":
            return _refuse(401, "replay: this delivery was already received with this signature")
        return JSONResponse({"status": outcome})

    async def health(request: Request) -> JSONResponse:
        counts = await run_in_threadpool(events.counts)
        return JSONResponse({"ok": True, "events": counts})

    app = Starlette(
        routes=[
            Route(WEBHOOK_PATH, receive, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
        ]
    )
    app.state.events = events
    return app


def secrets_from_env(value: str | None) -> list[str]:
    """The signing secrets in UNLEASHED_WEBHOOK_SECRET (several, comma-separated, while two
    subscriptions point here or a secret is rotated). Never shown in a message."""
    from sync_pipeline.defs.resources import ResourceConfigError, _check_secret

    if not value:
        raise ResourceConfigError(
            f"{SECRET_ENV} is empty: set it to the signing secret `sync-pipeline webhooks "
            "subscribe` printed"
        )
    return [_check_secret(part.strip(), SECRET_ENV) for part in value.split(",") if part.strip()]
