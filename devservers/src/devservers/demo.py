"""The main job on the built-in local servers: one full sync cycle through Dagster, then a report.

Also the `dev` command: both local servers plus `dagster dev` with the sensor and schedules on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sync_pipeline import store
from sync_pipeline.report import cycle_report

# Dagster's console logger prints every step event; the demo's report says what matters.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

# `sync-devservers dev`'s instance: one DuckDB writer at a time (the `duckdb` pool), and the run
# queue checked every second instead of every 5 s, since a CRM change should reach Unleashed
# within seconds and every push run waits in that queue.
DEV_DAGSTER_YAML = """\
concurrency:
  pools:
    default_limit: 1
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
telemetry:
  enabled: false
"""
# Its code location: the package's definitions, wherever `sync-devservers dev` is started from.
DEV_WORKSPACE_YAML = """\
load_from:
  - python_module:
      module_name: sync_pipeline.definitions
      location_name: sync_pipeline
"""


def _requests(emu) -> dict[str, int]:
    return {
        "Unleashed": emu.stats("unleashed")["total_requests"],
        "CRM": emu.stats("crm")["total_requests"],
    }


def run_demo(companies: int = 50, seed: int = 42, workdir: str | None = None) -> int:
    """Start both local servers with seed data, run one full cycle through Dagster, print a report.

    Then make a change on each side as a person would and run the push and a second cycle, so the
    report shows both directions working on live edits too."""
    import dagster as dg

    from devservers.run import Emulators
    from sync_pipeline.defs import build_defs
    from sync_pipeline.defs.resources import (
        DEFAULT_MAPPINGS,
        CrmResource,
        SyncConfigResource,
        SyncDuckDB,
        UnleashedResource,
    )

    logging.getLogger("dagster").setLevel(logging.WARNING)
    work = Path(workdir or tempfile.mkdtemp(prefix="sync-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "sync.duckdb"
    settings_file = Path(os.environ.get("SYNC_SETTINGS_FILE") or "settings.yaml")
    print(f"Starting the local Unleashed and Prospect CRM servers ({companies} companies)…")
    with Emulators(companies=companies, seed=seed) as emu:
        print(f"  Unleashed: {emu.unleashed_url}\n  CRM:       {emu.crm_url}")
        resources = {
            "crm": CrmResource(base_url=emu.crm_url, token=emu.crm_token),
            "unleashed": UnleashedResource(
                base_url=emu.unleashed_url, api_id=emu.unleashed_api_id,
                api_key=emu.unleashed_api_key,
            ),
            "duckdb": SyncDuckDB(database=str(db)),
            "sync_config": SyncConfigResource(
                settings_file=str(settings_file), mappings_dir=DEFAULT_MAPPINGS
            ),
        }  # fmt: skip
        defs = build_defs(resources)
        partition = datetime.now(UTC).strftime("%Y-%m-%d-%H:00")
        with dg.DagsterInstance.ephemeral() as instance:
            started = store.utcnow()
            print("\n[1/3] Full sync cycle through Dagster (sync_cycle_job)…")
            result = defs.resolve_job_def("sync_cycle_job").execute_in_process(
                instance=instance, partition_key=partition, raise_on_error=False, run_config=QUIET
            )
            if not result.success:
                _print_failure(result)
                return 1
            first = _requests(emu)
            with store.connect(db) as con:
                print()
                print(cycle_report(con, since=started, requests=first))

            print(
                "\n[2/3] A person edits both systems: a CRM phone number, a new Unleashed contact"
            )
            edits = _live_edits(emu, db)
            emu.reset_stats("unleashed")
            emu.reset_stats("crm")
            started = store.utcnow()
            push = defs.resolve_job_def("crm_push_job").execute_in_process(
                instance=instance, raise_on_error=False, run_config=QUIET
            )
            cycle = defs.resolve_job_def("sync_cycle_job").execute_in_process(
                instance=instance, partition_key=partition, raise_on_error=False, run_config=QUIET
            )
            if not (push.success and cycle.success):
                _print_failure(push if not push.success else cycle)
                return 1
            with store.connect(db) as con:
                print(cycle_report(con, since=started, requests=_requests(emu)))
            print("  " + edits)

            print("\n[3/3] A cycle with nothing changed")
            emu.reset_stats("unleashed")
            emu.reset_stats("crm")
            quiet = defs.resolve_job_def("sync_cycle_job").execute_in_process(
                instance=instance, partition_key=partition, raise_on_error=False, run_config=QUIET
            )
            if not quiet.success:
                _print_failure(quiet)
                return 1
            costs = _requests(emu)
            by_endpoint = {**emu.stats("unleashed")["requests"], **emu.stats("crm")["requests"]}
            writes = sum(n for k, n in by_endpoint.items() if not k.startswith("GET"))
            most = max(by_endpoint.values(), default=0)
            print(
                "  API requests: "
                + ", ".join(f"{k} {v}" for k, v in costs.items())
                + f" over {len(by_endpoint)} endpoints (at most {most} per endpoint); "
                + ("nothing written" if writes == 0 else f"{writes} writes")
            )
    print(f"\nDuckDB file with snapshots, plan, outbox and audit log: {db}")
    return 0


def _live_edits(emu, db: Path) -> str:
    from sync_pipeline.clients.crm import CrmClient
    from sync_pipeline.clients.unleashed import UnleashedClient

    with store.connect(db) as con:
        crm_id, erp_id = con.execute(
            """SELECT l.crm_id, l.erp_id FROM company_links l
               JOIN unleashed_customers u ON u.id = l.erp_id AND u.active
               ORDER BY l.crm_id LIMIT 1"""
        ).fetchone()
    with (
        CrmClient(emu.crm_url, emu.crm_token) as crm,
        UnleashedClient(
            emu.unleashed_url, emu.unleashed_api_id, emu.unleashed_api_key
        ) as unleashed,
    ):
        crm.patch("Divisions", int(crm_id), {"PhoneNumber": "+44 113 496 0500"})
        contact = unleashed.create_contact(
            erp_id,
            {"FirstName": "Ada", "LastName": "Lovelace", "EmailAddress": "ada@example.org"},
        )
    return (
        f"(edited CRM company {crm_id}'s phone; created Unleashed contact {contact.Guid} "
        f"under customer {erp_id})"
    )


def _print_failure(result) -> None:
    for event in result.all_events:
        if event.is_failure and event.step_failure_data:
            err = event.step_failure_data.error
            print(f"FAILED {event.step_key}: {err.message if err else ''}", file=sys.stderr)


def _first_cycle(emu, db: Path, home: Path) -> bool:
    """One full cycle recorded in the instance under `home` (the DAGSTER_HOME the webserver and
    daemon use), so the UI opens on its materialisations and check results."""
    import dagster as dg

    from sync_pipeline.defs import build_defs
    from sync_pipeline.defs.resources import (
        DEFAULT_MAPPINGS,
        CrmResource,
        SyncConfigResource,
        SyncDuckDB,
        UnleashedResource,
    )

    resources = {
        "crm": CrmResource(base_url=emu.crm_url, token=emu.crm_token),
        "unleashed": UnleashedResource(
            base_url=emu.unleashed_url, api_id=emu.unleashed_api_id,
            api_key=emu.unleashed_api_key,
        ),
        "duckdb": SyncDuckDB(database=str(db.resolve())),
        "sync_config": SyncConfigResource(
            settings_file=os.environ.get("SYNC_SETTINGS_FILE") or "settings.yaml",
            mappings_dir=DEFAULT_MAPPINGS,
        ),
    }  # fmt: skip
    job = build_defs(resources).resolve_job_def("sync_cycle_job")
    with dg.DagsterInstance.from_config(str(home.resolve())) as instance:
        result = job.execute_in_process(
            instance=instance,
            partition_key=datetime.now(UTC).strftime("%Y-%m-%d-%H:00"),
            run_config=QUIET,
            raise_on_error=False,
        )
    if not result.success:
        _print_failure(result)
    return result.success


# How long `dagster dev` and the processes it started (webserver, daemon, code servers) get to
# stop after SIGTERM before they are killed.
STOP_GRACE_S = 20


class _Stopped(Exception):
    """SIGTERM arrived."""


def _raise_stopped(signum, frame) -> None:
    raise _Stopped


def _run_until_stopped(cmd: list[str], env: dict[str, str]) -> int:
    """Run `cmd` in a process group of its own until it exits, or until this process gets
    SIGTERM or Ctrl-C: then the whole group (dagster dev, its webserver, daemon and code
    servers) is asked to stop, and killed after STOP_GRACE_S."""
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    process = subprocess.Popen(cmd, env=env, start_new_session=True)  # noqa: S603
    try:
        return process.wait()
    except (KeyboardInterrupt, _Stopped):
        _stop_group(process)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_group(process: subprocess.Popen) -> None:
    group = process.pid  # start_new_session: the leader's pid is the group's id
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE_S
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_GRACE_S)
    while time.monotonic() < deadline:  # the group outlives its leader while children stop
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    process.wait()


def run_dev(
    companies: int = 50,
    seed: int = 42,
    port: int = 3000,
    unleashed_port: int = 8301,
    crm_port: int = 8302,
) -> int:
    """Both local servers (fixed ports, state kept in .data/) and `dagster dev` pointed at them."""
    from devservers.run import Emulators

    data = Path(".data")
    home = data / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(DEV_DAGSTER_YAML)
    (home / "workspace.yaml").write_text(DEV_WORKSPACE_YAML)
    with Emulators(
        companies=companies, seed=seed, data_dir=data / "emulators",
        unleashed_port=unleashed_port, crm_port=crm_port,
    ) as emu:  # fmt: skip
        env = {
            **os.environ,
            **emu.env(),
            "DAGSTER_HOME": str(home.resolve()),
            "SYNC_DUCKDB_PATH": str((data / "sync.duckdb").resolve()),
        }
        print(f"Unleashed: {emu.unleashed_url}   CRM: {emu.crm_url}")
        db = data / "sync.duckdb"
        if not db.exists():
            # Pushes need links, and links need one import; outside the daytime import window
            # the schedule would not give one, so the first start runs a full cycle itself.
            print("First start: one full sync cycle so both systems are linked…")
            _first_cycle(emu, db, home)
        print(f"Dagster UI: http://127.0.0.1:{port}  (Ctrl-C stops everything)")
        cmd = [
            sys.executable, "-m", "dagster", "dev",
            "-w", str((home / "workspace.yaml").resolve()), "-p", str(port),
        ]  # fmt: skip
        return _run_until_stopped(cmd, env)
