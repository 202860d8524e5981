"""Cheap change detection on the CRM: the newest modification time after a cursor."""

from __future__ import annotations

from datetime import datetime

from sync_pipeline.clients.crm import CrmClient, encode_query, format_timestamp, parse_timestamp


def latest_modified(client: CrmClient, entity_set: str, since: datetime | None) -> datetime | None:
    """The newest `LastModified` of `entity_set` after `since` (one request), or None."""
    options = [("$select", "LastModified"), ("$orderby", "LastModified desc"), ("$top", "1")]
    if since is not None:
        options.insert(0, ("$filter", f"LastModified gt {format_timestamp(since)}"))
    body = client.request(
        "GET", f"/{entity_set}", query=encode_query(options), label=f"/{entity_set}"
    )
    rows = body.get("value") if isinstance(body, dict) else None
    if not rows:
        return None
    return parse_timestamp(rows[0]["LastModified"])
