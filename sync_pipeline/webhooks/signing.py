"""How an Unleashed webhook delivery is signed and what it carries.

*Assumed* (docs/api-assumptions.md, "Webhooks"): Unleashed's public page says deliveries are
signed with the subscription's signing secret, without a usable example. The header names, the
signed text `"{timestamp}.{rawBody}"` (timestamp in Unix seconds), Base64 of HMAC-SHA256 (as the
API's own request signature), and the payload shape below come from third-party material only.
They are kept here, in one place, so a live delivery that differs is a change to this module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any

SIGNATURE_HEADER = "x-unleashed-signature"  # assumed
TIMESTAMP_HEADER = "x-unleashed-timestamp"  # assumed: Unix seconds
# Assumed payload: {"id": delivery id, "eventType": "customer.updated",
# "createdOn": ISO time, "data": {"Guid": customer guid}}: the record's id only, so the sync
# reads the record itself (GET /Customers/{guid}); a full record in `data` is ignored.
CUSTOMER_EVENTS = ("customer.created", "customer.updated", "customer.deleted")
_GUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """Base64(HMAC-SHA256(key=secret, msg="{timestamp}.{rawBody}"))."""
    message = timestamp.encode("ascii") + b"." + body
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def signature_matches(secrets: list[str], timestamp: str, body: bytes, signature: str) -> bool:
    """Whether `signature` is the signature of the delivery under one of `secrets` (every
    subscription has its own), compared in constant time."""
    given = signature.encode()
    ok = False
    for secret in secrets:
        # Every secret is tried, so the time taken does not say which one matched.
        ok |= hmac.compare_digest(given, sign(secret, timestamp, body).encode())
    return ok


@dataclass(frozen=True)
class Event:
    """A customer event of a delivery."""

    delivery_id: str
    event_type: str
    customer_guid: str


class PayloadError(ValueError):
    """A signed delivery whose payload is not a customer event this receiver understands."""


def parse_event(payload: Any) -> Event | None:
    """The customer event of a delivery's JSON payload; None for an event type the sync does
    not use (products …): answered 2xx and not recorded."""
    if not isinstance(payload, dict):
        raise PayloadError("the payload is not a JSON object")
    delivery_id, event_type = payload.get("id"), payload.get("eventType")
    if not isinstance(delivery_id, str) or not delivery_id.strip() or len(delivery_id) > 200:
        raise PayloadError("the payload has no delivery id (`id`)")
    if not isinstance(event_type, str):
        raise PayloadError("the payload has no `eventType`")
    if event_type.lower() not in CUSTOMER_EVENTS:
        return None
    data = payload.get("data")
    guid = data.get("Guid") if isinstance(data, dict) else None
    if not isinstance(guid, str) or not _GUID_RE.match(guid):
        raise PayloadError("the payload's `data.Guid` is not a customer GUID")
    return Event(delivery_id.strip(), event_type.lower(), guid.lower())
