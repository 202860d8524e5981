"""The `sync-pipeline` command: `emulators` runs both local API servers, `demo` shows them off,
`compact` gives back the space that pruned history leaves in the DuckDB file, `undo` writes back
what a run replaced.

Each subcommand is one function taking the parsed arguments and returning an exit code, so a new
one (`dev`) is a parser entry plus a function.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_UNLEASHED_PORT = 8301
DEFAULT_CRM_PORT = 8302
DEFAULT_DATA_DIR = ".data/emulators"


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
        prog="sync-pipeline",
        description="Two-way sync between Prospect CRM and Unleashed.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    emulators = commands.add_parser(
        "emulators",
        help="run the local Unleashed and Prospect CRM servers until Ctrl-C",
        description="Run the local Unleashed and Prospect CRM servers, loaded with seed data, "
        "until Ctrl-C or SIGTERM. State is kept in --data-dir between runs; delete that folder "
        "to start again from the seed data.",
    )
    _add_world_options(emulators)
    emulators.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"where the servers keep their state (default: {DEFAULT_DATA_DIR})",
    )
    emulators.add_argument(
        "--in-memory", action="store_true", help="keep no state on disk (ignores --data-dir)"
    )
    emulators.add_argument(
        "--host", default="127.0.0.1", metavar="H", help="address to bind (default: 127.0.0.1)"
    )
    emulators.add_argument(
        "--unleashed-port",
        type=int,
        default=DEFAULT_UNLEASHED_PORT,
        metavar="P",
        help=f"Unleashed server port, 0 for any free port (default: {DEFAULT_UNLEASHED_PORT})",
    )
    emulators.add_argument(
        "--crm-port",
        type=int,
        default=DEFAULT_CRM_PORT,
        metavar="P",
        help=f"CRM server port, 0 for any free port (default: {DEFAULT_CRM_PORT})",
    )
    emulators.add_argument(
        "--unleashed-monthly-quota",
        type=int,
        default=None,
        metavar="N",
        help="the local Unleashed account's monthly API usage limit: after N requests in a "
        "calendar month (UTC) every request is refused until the 1st (default: no limit; "
        "PUT /_admin/quota changes it while the server runs)",
    )
    emulators.set_defaults(handler=run_emulators)

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
        "--unleashed-port", type=int, default=8301, help="local Unleashed port (default: 8301)"
    )
    dev.add_argument("--crm-port", type=int, default=8302, help="local CRM port (default: 8302)")
    dev.set_defaults(handler=run_dev)

    check = commands.add_parser(
        "check",
        help="prove the configured CRM tenant and Unleashed account fit the mappings",
        description="Check the credentials of both systems, every CRM name the mappings use "
        "against the CRM's $metadata, the tenant guards (operating companies, advanced ledgers, "
        "Prospect's own Unleashed integration), the contact role and the link slots, and print "
        "a summary. Reads the same environment variables as the Dagster code location and "
        "keeps the result in its DuckDB file: sync runs write only while the last check passed "
        "for the mappings as they are. Exits 1 when the check fails.",
    )
    check.add_argument(
        "--database",
        default=None,
        metavar="PATH",
        help="the DuckDB file to keep the result in (default: the code location's, from "
        "SYNC_DUCKDB_PATH or its default)",
    )
    check.set_defaults(handler=run_check)

    compact = commands.add_parser(
        "compact",
        help="rewrite the DuckDB file into a compact copy (gives back the space pruning freed)",
        description="Copy the sync's DuckDB database into a new file next to it, check that "
        "every table, column and row came across, and put the copy in place of the original. "
        "DuckDB reuses the space deleted rows leave but never shrinks the file, so run this "
        "once after a first large pruning. Stop the Dagster daemon and runs first: the "
        "command refuses to touch a file another process has open.",
    )
    compact.add_argument(
        "--database",
        default=None,
        metavar="PATH",
        help="the DuckDB file (default: the one the Dagster code location uses, from "
        "SYNC_DUCKDB_PATH or its default)",
    )
    compact.add_argument(
        "--no-backup",
        action="store_true",
        help="do not keep the old file as PATH.before-compact: once the copy is checked and in "
        "place, the old file is deleted and nothing is left to go back to",
    )
    compact.set_defaults(handler=run_compact)

    undo = commands.add_parser(
        "undo",
        help="write back the values a run's writes replaced (where nobody changed them since)",
        description="Undo a sync run: read each record the run wrote to, write back the value "
        "the run replaced where the field still holds what the run wrote, and list what was "
        "left because someone changed it since. Records the run created stay. Reads the same "
        "environment variables as the Dagster code location; undo_run_job does the same from "
        "the Dagster UI. Exits 1 when the run is unknown or a write failed.",
    )
    undo.add_argument("run_id", metavar="RUN_ID", help="the Dagster run id (Runs in the UI)")
    undo.add_argument(
        "--database",
        default=None,
        metavar="PATH",
        help="the DuckDB file (default: the code location's, from SYNC_DUCKDB_PATH)",
    )
    undo.set_defaults(handler=run_undo)

    from sync_pipeline.webhooks.cli import add_parser as add_webhooks

    add_webhooks(commands)
    return parser


# The local servers' own packages: the `emulators` extra, not the product's runtime dependencies.
EMULATOR_PACKAGES = frozenset({"limits", "odata_query"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in EMULATOR_PACKAGES:
            raise
        print(
            f"sync-pipeline {args.command}: the local servers need the `emulators` extra "
            f"(missing: {exc.name}). Install it with: pip install 'sync-pipeline[emulators]' "
            "(make installs every extra).",
            file=sys.stderr,
        )
        return 2


# --------------------------------------------------------------------------------------------
# emulators
# --------------------------------------------------------------------------------------------
def run_emulators(args: argparse.Namespace) -> int:
    from sync_pipeline.emulators.run import Emulators

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
            print(f"sync-pipeline: cannot start the local servers: {exc}", file=sys.stderr)
            return 1
        held = emulators.holdings()
        # Set once the counts are read: they are asked over the API and would use the limit.
        quota = (
            None
            if args.unleashed_monthly_quota is None
            else emulators.set_unleashed_quota(args.unleashed_monthly_quota)
        )
        _print_emulators(emulators, data_dir, held, quota)
        while not stop.wait(0.5):
            pass
        _say("", "Stopping the local servers ...")
    finally:
        emulators.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _say("Stopped.")
    return 0


def _print_emulators(
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
# demo
# --------------------------------------------------------------------------------------------
def run_demo(args: argparse.Namespace) -> int:
    """The main job on the local servers: a full sync cycle through Dagster and its report."""
    from sync_pipeline.demo import run_demo as demo

    return demo(companies=args.companies, seed=args.seed, workdir=args.workdir)


def run_dev(args: argparse.Namespace) -> int:
    """Both local servers plus `dagster dev` with the sensor and schedules running."""
    from sync_pipeline.demo import run_dev as dev

    return dev(
        companies=args.companies, seed=args.seed, port=args.port,
        unleashed_port=args.unleashed_port, crm_port=args.crm_port,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------
def run_check(args: argparse.Namespace) -> int:
    """The preflight against the tenant and account the environment names."""
    from sync_pipeline import preflight, store
    from sync_pipeline.defs.resources import (
        ResourceConfigError,
        connection_resources,
        duckdb_path,
    )
    from sync_pipeline.mapping import MappingError

    try:
        crm, unleashed, sync_config = connection_resources()
        mappings = sync_config.mappings()
        settings = sync_config.settings()
        with crm.get_client() as crm_client, unleashed.get_client() as unleashed_client:
            report = preflight.run_preflight(
                crm_client, unleashed_client, mappings, two_way_sync=settings.two_way_sync
            )
    except (ResourceConfigError, MappingError, ValueError) as exc:
        print(f"Preflight FAILED: {exc}", file=sys.stderr)
        return 1
    database = args.database or duckdb_path()
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    with store.connect(database) as con:
        preflight.record(con, report)
    print(report.text())
    print(f"Result kept in {database}.")
    return 0 if report.ok else 1


# --------------------------------------------------------------------------------------------
# compact
# --------------------------------------------------------------------------------------------
def run_compact(args: argparse.Namespace) -> int:
    from sync_pipeline.compact import CompactError, compact

    if args.database is None:
        from sync_pipeline.defs.resources import duckdb_path

        database = duckdb_path()
    else:
        database = args.database
    _say(f"Compacting {Path(database).absolute()} ...")
    try:
        done = compact(database, backup=not args.no_backup)
    except CompactError as exc:
        print(f"sync-pipeline compact: {exc}", file=sys.stderr, flush=True)
        return 1
    given_back = done.size_before - done.size_after
    backup = (
        f"{done.backup} (the file as it was; delete it once runs work on the compact one)"
        if done.backup is not None
        else "none (--no-backup)"
    )
    _say(
        f"Compacted {done.database} in {done.seconds:.1f} s.",
        f"  size before:   {_mb(done.size_before)}",
        f"  size after:    {_mb(done.size_after)} ({_mb(given_back)} given back)",
        f"  tables copied: {len(done.rows)} ({sum(done.rows.values()):,} rows; tables, columns, "
        "row counts and contents checked against the original)",
        f"  backup:        {backup}",
    )
    return 0


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


# --------------------------------------------------------------------------------------------
# undo
# --------------------------------------------------------------------------------------------
def run_undo(args: argparse.Namespace) -> int:
    import uuid

    from sync_pipeline import store, undo
    from sync_pipeline.defs.resources import (
        ResourceConfigError,
        connection_resources,
        duckdb_path,
    )
    from sync_pipeline.defs.undo import refusal
    from sync_pipeline.mapping import MappingError

    try:
        crm, unleashed, sync_config = connection_resources()
        mappings = sync_config.mappings()
        settings = sync_config.settings()
    except (ResourceConfigError, MappingError, ValueError) as exc:
        print(f"Undo FAILED: {exc}", file=sys.stderr)
        return 1
    database = args.database or duckdb_path()
    if not Path(database).exists():
        print(f"Undo FAILED: no database at {database}", file=sys.stderr)
        return 1
    with store.connect(database) as con:
        if why := refusal(con, settings, mappings):
            print(f"Undo FAILED: nothing written: {why}", file=sys.stderr)
            return 1
        with crm.get_client() as crm_client, unleashed.get_client() as unleashed_client:
            try:
                result = undo.undo_run(
                    con, crm_client, unleashed_client, mappings, args.run_id.strip(),
                    f"cli-undo-{uuid.uuid4()}",
                )  # fmt: skip
            except undo.UnknownRun as exc:
                print(f"Undo FAILED: {exc}", file=sys.stderr)
                return 1
    _say(*result.lines())
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
