"""The sync on a Dagster instance backed by a real PostgreSQL server, as a deployment runs it.

A PostgreSQL server in a temporary folder, the shipped `deploy/dagster.yaml` as the instance, and
the real `dagster-daemon` over the code location of `workspace.yaml`, pointed at the local servers:
a CRM edit reaches Unleashed through the sensor, the import schedule launches an import at its tick,
a backfill of three hourly partitions runs one run at a time under the `duckdb` pool, and every
run, tick and event is in PostgreSQL, with no SQLite file in DAGSTER_HOME."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg2
import pytest

from devservers.run import Emulators
from sync_pipeline.settings import ImportWindow
from tests.postgres import postgres_server

ROOT = Path(__file__).resolve().parents[1]
DAGSTER_CLI = [sys.executable, "-m", "dagster"]
DAEMON = str(Path(sys.executable).parent / "dagster-daemon")
# The daemon loads the code location (with the settings' times) before the schedule's tick comes:
# tens of seconds on a loaded machine. The import queues behind the backfill anyway.
DAEMON_START_S = 45
# About 100 s in all on a quiet machine; each step may take much longer on a loaded one.
WAIT_S = 300


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [*DAGSTER_CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )  # fmt: skip
    assert done.returncode == 0, f"dagster {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _wait(what: str, until, daemon_log: Path, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = until()
        if found:
            return found
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}; daemon log:\n{daemon_log.read_text()[-4000:]}")


@pytest.fixture
def emulators():
    # Few companies: the runs cost Dagster's per-run overhead more than the records they sync.
    with Emulators(companies=8, seed=7) as emu:
        yield emu


@pytest.fixture
def postgres():
    with postgres_server() as server:
        yield server


def _runs(instance: dg.DagsterInstance, **where) -> list[dg.RunRecord]:
    return list(instance.get_run_records(dg.RunsFilter(**where)))


def _succeeded(instance: dg.DagsterInstance, records: list[dg.RunRecord]) -> None:
    """Every run succeeded; else the failures as the run's event log in the UI shows them."""
    failures = [
        f"{r.dagster_run.job_name} {r.dagster_run.run_id} {r.dagster_run.status}: "
        + "\n".join(
            str(e.dagster_event.event_specific_data)[:2000]
            for e in instance.all_logs(r.dagster_run.run_id)
            if e.dagster_event is not None and e.dagster_event.is_failure
        )
        for r in records
        if not r.dagster_run.is_success
    ]
    assert not failures, "\n\n".join(failures)


def _not_overlapping(records: list[dg.RunRecord]) -> None:
    spans = sorted((r.start_time, r.end_time, r.dagster_run.job_name) for r in records)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"{second} started before {first} ended"


@pytest.mark.xdist_group("postgres-instance")
@pytest.mark.timeout(900)
def test_the_daemon_runs_the_sync_on_a_postgres_instance(harness, postgres, tmp_path, monkeypatch):
    h = harness
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")

    # The import schedule's tick: the first whole minute at least DAEMON_START_S away, in UTC,
    # every day; the nightly jobs twelve hours away, out of the way.
    now = datetime.now(UTC)
    tick = (now + timedelta(seconds=DAEMON_START_S + 59)).replace(second=0, microsecond=0)
    night = (tick + timedelta(hours=12)).time()
    h.set_settings(
        timezone="UTC",
        imports=ImportWindow(
            start=tick.time(), end=tick.time(), every_minutes=60,
            days=["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
        ),
        overnight_fix_at=night,
        history_pruning_at=night.replace(minute=(night.minute + 1) % 60),
    )  # fmt: skip
    for name, value in postgres.env().items():  # the instance as this process sees it too
        monkeypatch.setenv(name, value)
    env = {
        **os.environ,
        **h.emu.env(),
        "DAGSTER_HOME": str(home),
        "SYNC_DUCKDB_PATH": str(h.db),
        "SYNC_SETTINGS_FILE": str(h.settings_file),
    }
    instance = dg.DagsterInstance.from_config(str(home))
    # The pool's one slot, as `dagster instance concurrency set duckdb 1` (the deployment's daemon
    # service) sets it: kept in the instance's database.
    instance.event_log_storage.set_concurrency_slots("duckdb", 1)

    daemon_log = tmp_path / "daemon.log"
    with daemon_log.open("w") as log:
        daemon = subprocess.Popen(
            [DAEMON, "run", "-w", "workspace.yaml"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        # Three missed hourly windows, backfilled as an operator does it from the CLI or the UI.
        hours = [(now - timedelta(hours=n)).strftime("%Y-%m-%d-%H:00") for n in (3, 2, 1)]
        _cli(
            env, "job", "backfill", "-w", "workspace.yaml", "-j", "sync_cycle_job",
            "--partitions", ",".join(hours), "--noprompt",
        )  # fmt: skip

        def backfill(finished: int):
            runs = [
                r for r in _runs(instance, job_name="sync_cycle_job")
                if "dagster/backfill" in r.dagster_run.tags
            ]  # fmt: skip
            return runs if sum(r.dagster_run.is_finished for r in runs) >= finished else None

        # Once the first window is in, the companies are linked: a person edits one in the CRM,
        # and the sensor launches a push that takes it to Unleashed.
        first = _wait("the backfill's first run", lambda: backfill(1), daemon_log)
        _succeeded(instance, [r for r in first if r.dagster_run.is_finished])
        pair = h.linked_company()
        edited_at = time.time()
        h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "+44 113 496 0777"})

        def pushed():
            return [
                r for r in _runs(instance, job_name="crm_push_job")
                if r.create_timestamp.timestamp() >= edited_at and r.dagster_run.is_finished
                and r.dagster_run.tags.get("sync/trigger") == "crm-change"
            ]  # fmt: skip

        push = _wait("a push launched by the CRM change sensor after the edit", pushed, daemon_log)
        _succeeded(instance, push)
        assert h.unleashed.get_customer(pair["erp_id"]).PhoneNumber == "+44 113 496 0777"

        all_three = _wait("the backfill's three runs", lambda: backfill(3), daemon_log)
        assert len(all_three) == 3
        _succeeded(instance, all_three)
        assert sorted(r.dagster_run.tags["dagster/partition"] for r in all_three) == hours

        # The import schedule's tick launches the import of the tick's hour.
        def imported():
            runs = _runs(instance, tags={"dagster/schedule_name": "daytime_import_schedule"})
            return [r for r in runs if r.dagster_run.is_finished]

        scheduled = _wait(
            f"the import schedule's tick at {tick:%H:%M} UTC", imported, daemon_log,
            timeout_s=tick.timestamp() - time.time() + WAIT_S,
        )  # fmt: skip
        _succeeded(instance, scheduled)
        run = scheduled[0].dagster_run
        assert run.tags["sync/trigger"] == "daytime-import"
        assert run.tags["dagster/partition"] == tick.strftime("%Y-%m-%d-%H:00")
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    # Runs the daemon launched go on in their own processes: let them end before the server goes,
    # then end what is left of the daemon's process group (its code server).
    active = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    try:
        _wait("the runs in progress to end", lambda: not _runs(instance, statuses=active),
              daemon_log)  # fmt: skip
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGKILL)

    # One run at a time under the pool: no two runs of the instance overlapped.
    records = [r for r in _runs(instance) if r.dagster_run.is_finished]
    assert len(records) >= 5
    _not_overlapping(records)

    # Everything the instance keeps is in PostgreSQL: its tables hold the runs, events and ticks,
    # and DAGSTER_HOME has no SQLite database (Dagster's default storage) at all.
    counted = {}
    con = psycopg2.connect(postgres.url)
    try:
        with con.cursor() as cur:
            for table in ("runs", "event_logs", "job_ticks", "bulk_actions", "concurrency_limits"):
                cur.execute(f"SELECT count(*) FROM {table}")  # noqa: S608
                counted[table] = cur.fetchone()[0]
    finally:
        con.close()
    assert counted["runs"] == len(_runs(instance)), counted
    assert counted["event_logs"] > 0 and counted["job_ticks"] > 0 and counted["bulk_actions"] == 1
    assert counted["concurrency_limits"] == 1
    instance.dispose()
    sqlite = [
        p for p in home.rglob("*")
        if p.is_file() and p.read_bytes()[:16] == b"SQLite format 3\x00"
    ]  # fmt: skip
    assert sqlite == [], sqlite
    assert not (home / "history").exists() and not (home / "schedules").exists()
