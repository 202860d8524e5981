"""Webhook subscriptions of the Unleashed account, through the API with its normal signed
requests (`sync-pipeline webhooks subscribe|list|unsubscribe`).

*Assumed* (docs/api-assumptions.md, "Webhooks"): the endpoint `/WebhookSubscriptions` (GET
lists, POST `{"NotificationUrl", "EventTypes"}` creates and answers the subscription with its
`SigningSecret`, shown only then; DELETE `/WebhookSubscriptions/{guid}` removes one). The cap of
5 subscriptions per account is Unleashed's own; it is checked here before asking, and the server
refuses a sixth as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from sync_pipeline.clients.unleashed import UnleashedClient
from sync_pipeline.webhooks.signing import CUSTOMER_EVENTS

PATH = "/WebhookSubscriptions"
MAX_SUBSCRIPTIONS = 5
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class SubscriptionError(ValueError):
    """A subscription request that cannot be made (the cap, a URL Unleashed would not call)."""


@dataclass(frozen=True)
class Subscription:
    guid: str
    url: str
    event_types: list[str]
    created_on: str | None = None
    signing_secret: str | None = None  # only in the answer to a create

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Subscription:
        return cls(
            guid=str(raw.get("Guid")),
            url=str(raw.get("NotificationUrl")),
            event_types=list(raw.get("EventTypes") or []),
            created_on=raw.get("CreatedOn"),
            signing_secret=raw.get("SigningSecret"),
        )


def list_subscriptions(client: UnleashedClient) -> list[Subscription]:
    body = client.request("GET", PATH, label=PATH)
    items = body.get("Items") if isinstance(body, dict) else body
    return [Subscription.from_wire(i) for i in items or [] if isinstance(i, dict)]


def check_url(url: str) -> str:
    """Unleashed calls only a public HTTPS URL with a valid certificate; plain http is allowed
    for this machine alone (the local Unleashed server and tests)."""
    parsed = httpx.URL(url)
    if parsed.scheme == "https" and parsed.host:
        return url
    if parsed.scheme == "http" and parsed.host in LOCAL_HOSTS:
        return url
    raise SubscriptionError(
        f"{url!r} is not a public https:// URL: Unleashed delivers webhooks only to HTTPS "
        "endpoints with a valid certificate (plain http is accepted for 127.0.0.1 alone)"
    )


def subscribe(client: UnleashedClient, url: str) -> Subscription:
    """Subscribe `url` to customer created / updated / deleted. Refused before asking when the
    account already has the most it may have."""
    check_url(url)
    existing = list_subscriptions(client)
    if len(existing) >= MAX_SUBSCRIPTIONS:
        listed = "; ".join(f"{s.guid} -> {s.url}" for s in existing)
        raise SubscriptionError(
            f"The Unleashed account already has {len(existing)} webhook subscriptions, the most "
            f"it may have ({MAX_SUBSCRIPTIONS}): remove one with `sync-pipeline webhooks "
            f"unsubscribe ID` first. Existing: {listed}"
        )
    body = {"NotificationUrl": url, "EventTypes": list(CUSTOMER_EVENTS)}
    # Not idempotent: a create whose answer was lost is not sent again (list to see it).
    raw = client.request("POST", PATH, json_body=body, label=PATH, idempotent=False)
    return Subscription.from_wire(raw)


def unsubscribe(client: UnleashedClient, guid: str) -> None:
    guid = UnleashedClient._check_guid(guid, "subscription id")
    client.request("DELETE", f"{PATH}/{guid}", label=PATH + "/{guid}")
