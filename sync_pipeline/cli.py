"""The `sync-pipeline` command: `check` proves the configured tenant and account fit the
mappings, `compact` gives back the space that pruned history leaves in the DuckDB file, `undo`
writes back what a run replaced, `webhooks` receives and subscribes Unleashed webhooks.

Each subcommand is one function taking the parsed arguments and returning an exit code, so a new
one is a parser entry plus a function. The local API servers have a command of their own,
`sync-devservers` (devservers/), which the product never imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _say(*lines: str) -> None:
    # Flushed at once: callers (tests, tmux panes, CI logs) wait on these lines through a pipe.
    print(*lines, sep="\n", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sync-pipeline",
        description="Two-way sync between Prospect CRM and Unleashed.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


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
