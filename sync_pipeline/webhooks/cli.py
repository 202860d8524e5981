"""`sync-pipeline webhooks [serve]|subscribe URL|list|unsubscribe ID`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_PORT = 8303


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="H",
        help="address to bind (default: 127.0.0.1, behind the HTTPS proxy; 0.0.0.0 in a container)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, metavar="P", help=f"(default: {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--events",
        default=None,
        metavar="PATH",
        help="the event file (default: SYNC_WEBHOOK_EVENTS_PATH, else webhook-events.sqlite "
        "next to the DuckDB file)",
    )


def add_parser(commands: Any) -> None:
    webhooks = commands.add_parser(
        "webhooks",
        help="receive Unleashed webhooks (the default), or manage the subscriptions",
        description="Without a subcommand (or with `serve`): run the receiver, which checks "
        "each delivery's signature (UNLEASHED_WEBHOOK_SECRET) and timestamp and records it for "
        "the sensor. `subscribe URL`, `list` and `unsubscribe ID` manage the Unleashed "
        "account's subscriptions (at most 5) with the UNLEASHED_* credentials.",
    )
    _serve_options(webhooks)
    webhooks.set_defaults(handler=run_serve)
    sub = webhooks.add_subparsers(dest="webhooks_command", metavar="SUBCOMMAND")
    serve = sub.add_parser("serve", help="run the receiver until Ctrl-C (the default)")
    _serve_options(serve)
    serve.set_defaults(handler=run_serve)
    subscribe = sub.add_parser(
        "subscribe", help="subscribe a public HTTPS URL to customer created/updated/deleted"
    )
    subscribe.add_argument("url", help="the receiver's public URL, ending in /webhooks/unleashed")
    subscribe.set_defaults(handler=run_subscribe)
    sub.add_parser("list", help="list the account's subscriptions").set_defaults(handler=run_list)
    unsubscribe = sub.add_parser("unsubscribe", help="remove a subscription")
    unsubscribe.add_argument("id", help="the subscription's id (from `list`)")
    unsubscribe.set_defaults(handler=run_unsubscribe)


def _fail(message: str) -> int:
    print(f"sync-pipeline webhooks: {message}", file=sys.stderr, flush=True)
    return 1


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sync_pipeline.defs.resources import ResourceConfigError, duckdb_path
    from sync_pipeline.webhooks.events import EventStore, events_path
    from sync_pipeline.webhooks.receiver import (
        SECRET_ENV,
        WEBHOOK_PATH,
        create_receiver,
        secrets_from_env,
    )

    try:
        secrets = secrets_from_env(os.environ.get(SECRET_ENV))
    except ResourceConfigError as exc:
        return _fail(str(exc))
    path = args.events or events_path(duckdb_path())
    events = EventStore(path)
    print(
        f"Receiving Unleashed webhooks on http://{args.host}:{args.port}{WEBHOOK_PATH} "
        f"({len(secrets)} signing secret(s)); events recorded in {path}.",
        flush=True,
    )
    try:
        uvicorn.run(
            create_receiver(events, secrets), host=args.host, port=args.port, log_level="info"
        )
    finally:
        events.close()
    return 0


def _client():
    from sync_pipeline.defs.resources import connection_resources

    _, unleashed, _ = connection_resources()
    return unleashed.get_client()


def run_subscribe(args: argparse.Namespace) -> int:
    from sync_pipeline.clients.base import ApiError
    from sync_pipeline.defs.resources import ResourceConfigError
    from sync_pipeline.webhooks.receiver import SECRET_ENV
    from sync_pipeline.webhooks.subscriptions import SubscriptionError, subscribe

    try:
        with _client() as client:
            made = subscribe(client, args.url)
    except (SubscriptionError, ResourceConfigError, ApiError, ValueError) as exc:
        return _fail(str(exc))
    print(
        f"Subscribed {made.url} to {', '.join(made.event_types)} (subscription {made.guid}).",
        "Its signing secret is shown this once: give it to the receiver, e.g. in .env:",
        "",
        f"{SECRET_ENV}={made.signing_secret}",
        sep="\n",
        flush=True,
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    from sync_pipeline.clients.base import ApiError
    from sync_pipeline.defs.resources import ResourceConfigError
    from sync_pipeline.webhooks.subscriptions import MAX_SUBSCRIPTIONS, list_subscriptions

    try:
        with _client() as client:
            subs = list_subscriptions(client)
    except (ResourceConfigError, ApiError, ValueError) as exc:
        return _fail(str(exc))
    print(f"{len(subs)} of at most {MAX_SUBSCRIPTIONS} webhook subscriptions:", flush=True)
    for s in subs:
        print(f"  {s.guid}  {s.url}  {', '.join(s.event_types)}", flush=True)
    return 0


def run_unsubscribe(args: argparse.Namespace) -> int:
    from sync_pipeline.clients.base import ApiError
    from sync_pipeline.defs.resources import ResourceConfigError
    from sync_pipeline.webhooks.subscriptions import unsubscribe

    try:
        with _client() as client:
            unsubscribe(client, args.id)
    except (ResourceConfigError, ApiError, ValueError) as exc:
        return _fail(str(exc))
    print(f"Removed webhook subscription {args.id}.", flush=True)
    return 0
