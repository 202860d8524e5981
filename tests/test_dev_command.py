"""`sync-devservers dev` as a developer runs it: the first cycle is in the instance the UI shows,
and SIGTERM stops everything it started (dagster dev, webserver, daemon, code servers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import psutil

from devservers.demo import STOP_GRACE_S
from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
START_S = 240


def _wait_for_webserver(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no webserver answer in {START_S} s:\n{log.read_text()}")


def test_dev_records_its_first_cycle_in_the_ui_instance_and_sigterm_stops_everything(tmp_path):
    port = free_port()
    log = tmp_path / "dev.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "devservers.cli", "dev", "--companies", "5",
         "--port", str(port), "--unleashed-port", str(free_port()),
         "--crm-port", str(free_port())],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    started: list[psutil.Process] = []
    try:
        _wait_for_webserver(process, port, log)
        # The first cycle is in the instance the webserver and daemon read.
        home = tmp_path / ".data" / "dagster_home"
        with dg.DagsterInstance.from_config(str(home)) as instance:
            plan = instance.get_latest_materialization_event(dg.AssetKey(["sync", "sync_plan"]))
            assert plan is not None, "the UI's instance has no sync_plan materialisation"
            checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
                [dg.AssetCheckKey(dg.AssetKey(["sync", "sync_links"]), "links_are_one_to_one")]
            )
            assert checks, "the UI's instance has no check result"

        started = psutil.Process(process.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "dagster" in names and "webserver" in names and "daemon" in names, names
        process.send_signal(signal.SIGTERM)
        process.wait(STOP_GRACE_S + 10)
        _, alive = psutil.wait_procs(started, timeout=5)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        for leftover in started:
            if leftover.is_running():
                leftover.kill()
        if process.poll() is None:
            process.kill()
