"""Cheap change detection on the CRM: the newest change timestamp after a cursor."""

from __future__ import annotations

from datetime import datetime

from sync_pipeline.clients.crm import (
    TIMESTAMP_FIELD,
    CrmClient,
    encode_query,
    format_timestamp,
    parse_timestamp,
)


def latest_modified(client: CrmClient, entity_set: str, since: datetime | None) -> datetime | None:
    """The newest `LastUpdatedTimestamp` of `entity_set` after `since` (one request), or None."""
    options = [
        ("$select", TIMESTAMP_FIELD),
        ("$orderby", f"{TIMESTAMP_FIELD} desc"),
        ("$top", "1"),
    ]
    if since is not None:
        options.insert(0, ("$filter", f"{TIMESTAMP_FIELD} gt {format_timestamp(since)}"))
    body = client.request(
        "GET", f"/{entity_set}", query=encode_query(options), label=f"/{entity_set}"
    )
    rows = body.get("value") if isinstance(body, dict) else None
    if not rows:
        return None
    return parse_timestamp(rows[0][TIMESTAMP_FIELD])
