"""The `sync-devservers` command: `serve` runs both local API servers until Ctrl-C, `demo` runs a
full sync cycle on them and prints the report, `dev` runs them beside `dagster dev`.

Each subcommand is one function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROG = "sync-devservers"
DEFAULT_UNLEASHED_PORT = 8301
DEFAULT_CRM_PORT = 8302
DEFAULT_DATA_DIR = ".data/emulators"

# The local servers' own packages (this distribution's dependencies, not the product's).
SERVER_PACKAGES = frozenset({"limits", "odata_query"})


def _say(*lines: str) -> None:
    # Flushed at once: callers (tests, tmux panes, CI logs) wait on these lines through a pipe.
    print(*lines, sep="\n", flush=True)


def _add_world_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--companies",
        type=int,
        default=50,
        metavar="N",
        help="Unleashed customers in the seed data (default: 50)",
    )
    parser.add_argument(
        "--seed", type=int, default=42, metavar="S", help="seed of the seed data (default: 42)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Local Unleashed and Prospect CRM servers for developing and demonstrating "
        "the sync (not part of the product).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the local Unleashed and Prospect CRM servers until Ctrl-C",
        description="Run the local Unleashed and Prospect CRM servers, loaded with seed data, "
        "until Ctrl-C or SIGTERM. State is kept in --data-dir between runs; delete that folder "
        "to start again from the seed data.",
    )
    _add_world_options(serve)
    serve.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"where the servers keep their state (default: {DEFAULT_DATA_DIR})",
    )
    serve.add_argument(
        "--in-memory", action="store_true", help="keep no state on disk (ignores --data-dir)"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", metavar="H", help="address to bind (default: 127.0.0.1)"
    )
    serve.add_argument(
        "--unleashed-port",
        type=int,
        default=DEFAULT_UNLEASHED_PORT,
        metavar="P",
        help=f"Unleashed server port, 0 for any free port (default: {DEFAULT_UNLEASHED_PORT})",
    )
    serve.add_argument(
        "--crm-port",
        type=int,
        default=DEFAULT_CRM_PORT,
        metavar="P",
        help=f"CRM server port, 0 for any free port (default: {DEFAULT_CRM_PORT})",
    )
    serve.add_argument(
        "--unleashed-monthly-quota",
        type=int,
        default=None,
        metavar="N",
        help="the local Unleashed account's monthly API usage limit: after N requests in a "
        "calendar month (UTC) every request is refused until the 1st (default: no limit; "
        "PUT /_admin/quota changes it while the server runs)",
    )
    serve.set_defaults(handler=run_serve)

    demo = commands.add_parser(
        "demo",
        help="run a full sync cycle through Dagster on the local servers and print the report",
    )
    _add_world_options(demo)
    demo.add_argument(
        "--workdir", default=None, metavar="DIR", help="where to keep the DuckDB file (temp dir)"
    )
    demo.set_defaults(handler=run_demo)

    dev = commands.add_parser(
        "dev",
        help="start the local servers and `dagster dev` with the sensor and schedules running",
    )
    _add_world_options(dev)
    dev.add_argument("--port", type=int, default=3000, help="Dagster UI port (default: 3000)")
    dev.add_argument(
        "--unleashed-port",
        type=int,
        default=DEFAULT_UNLEASHED_PORT,
        help=f"local Unleashed port (default: {DEFAULT_UNLEASHED_PORT})",
    )
    dev.add_argument(
        "--crm-port",
        type=int,
        default=DEFAULT_CRM_PORT,
        help=f"local CRM port (default: {DEFAULT_CRM_PORT})",
    )
    dev.set_defaults(handler=run_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in SERVER_PACKAGES:
            raise
        print(
            f"{PROG} {args.command}: the local servers need packages that are not installed "
            f"(missing: {exc.name}). Install the sync-devservers distribution with its "
            "dependencies: pip install -e ./devservers (make installs it).",
            file=sys.stderr,
        )
        return 2


# --------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------
def run_serve(args: argparse.Namespace) -> int:
    from devservers.run import Emulators

    data_dir = None if args.in_memory else Path(args.data_dir)
    emulators = Emulators(
        companies=args.companies,
        seed=args.seed,
        data_dir=data_dir,
        host=args.host,
        unleashed_port=args.unleashed_port,
        crm_port=args.crm_port,
    )
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        try:
            emulators.start()
        except OSError as exc:
            print(f"{PROG}: cannot start the local servers: {exc}", file=sys.stderr)
            return 1
        held = emulators.holdings()
        # Set once the counts are read: they are asked over the API and would use the limit.
        quota = (
            None
            if args.unleashed_monthly_quota is None
            else emulators.set_unleashed_quota(args.unleashed_monthly_quota)
        )
        _print_servers(emulators, data_dir, held, quota)
        while not stop.wait(0.5):
            pass
        _say("", "Stopping the local servers ...")
    finally:
        emulators.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _say("Stopped.")
    return 0


def _print_servers(
    emulators: Any, data_dir: Path | None, held: dict[str, Any], quota: dict[str, Any] | None
) -> None:
    limit: list[str] = []
    if quota is not None:
        limit = [
            f"Unleashed's monthly API usage limit: {quota['monthly_quota']} requests, "
            f"{quota['used']} used in {quota['month']} (UTC); past it every request is refused "
            f"until {quota['resets_at']}.",
            "",
        ]
    unleashed, crm = held["unleashed"], held["crm"]
    env = emulators.env()
    state = (
        f"{data_dir} (kept between runs; delete it to start again from the seed data)"
        if data_dir is not None
        else "in memory (lost on exit)"
    )
    _say(
        f"Unleashed server:    {emulators.unleashed_url}",
        f"Prospect CRM server: {emulators.crm_url}",
        "",
        f"Unleashed holds {unleashed['customers']} customers "
        f"({unleashed['obsolete_customers']} obsolete) and {unleashed['salespersons']} "
        "salespersons.",
        f"Prospect CRM holds {crm['divisions']} divisions (companies), {crm['contacts']} "
        f"contacts, {crm['users']} users and {crm['sales_ledgers']} sales ledgers.",
        f"State: {state}",
        "",
        "Local test credentials. These are not secrets: only these local servers accept them.",
        f"  Unleashed API id:  {emulators.unleashed_api_id}",
        f"  Unleashed API key: {emulators.unleashed_api_key}",
        f"  CRM token:         {emulators.crm_token}",
        "",
        "Point the product at these servers with:",
        *(f"  export {name}={value}" for name, value in env.items()),
        "",
        *limit,
        "Press Ctrl-C to stop.",
    )


# --------------------------------------------------------------------------------------------
# demo, dev
# --------------------------------------------------------------------------------------------
def run_demo(args: argparse.Namespace) -> int:
    """The main job on the local servers: a full sync cycle through Dagster and its report."""
    from devservers.demo import run_demo as demo

    return demo(companies=args.companies, seed=args.seed, workdir=args.workdir)


def run_dev(args: argparse.Namespace) -> int:
    """Both local servers plus `dagster dev` with the sensor and schedules running."""
    from devservers.demo import run_dev as dev

    return dev(
        companies=args.companies, seed=args.seed, port=args.port,
        unleashed_port=args.unleashed_port, crm_port=args.crm_port,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
