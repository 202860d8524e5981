"""`sync-devservers serve` as a user runs it: a real process on real sockets, stopped by a signal;
plus the `demo` command, the `Emulators` helper the other tests use, and the split between the
two commands: `sync-devservers` has the local servers, `sync-pipeline` only the product's own."""

from __future__ import annotations

import base64
import hashlib
import hmac
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from devservers.cli import main
from devservers.run import (
    LOCAL_CRM_TOKEN,
    LOCAL_UNLEASHED_API_ID,
    LOCAL_UNLEASHED_API_KEY,
    Emulators,
)
from tests.harness import free_port

START_TIMEOUT_S = 60


@dataclass
class Running:
    process: subprocess.Popen[str]
    queue: queue.Queue[str | None]
    lines: list[str] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def _reader(process: subprocess.Popen[str], out: queue.Queue[str | None]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        out.put(line.rstrip("\n"))
    out.put(None)


@contextmanager
def servers_process(data_dir: Path, *extra: str) -> Iterator[Running]:
    """Start `sync-devservers serve` on free ports; wait until it prints the export lines."""
    for attempt in range(3):  # a free port can be taken between probing and binding it
        command = [
            sys.executable, "-m", "devservers.cli", "serve",
            "--unleashed-port", str(free_port()), "--crm-port", str(free_port()),
            "--data-dir", str(data_dir), "--companies", "20", *extra,
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8"
        )
        lines: queue.Queue[str | None] = queue.Queue()
        running = Running(process, lines)
        threading.Thread(target=_reader, args=(process, lines), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            running.lines.append(line)
            if match := re.fullmatch(r"\s*export (\w+)=(\S+)", line):
                running.exports[match[1]] = match[2]
            if line.strip() == "Press Ctrl-C to stop.":
                break
        if "Press Ctrl-C to stop." in running.output:
            try:
                yield running
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            return
        process.kill()
        process.wait()
        assert process.stderr is not None
        stderr = process.stderr.read()
        if "cannot start the local servers" not in stderr or attempt == 2:
            pytest.fail(f"emulators did not start:\n{running.output}\n{stderr}")


def stop(running: Running, sig: signal.Signals) -> tuple[int, str, str]:
    """Send `sig`; return the exit code, all of stdout and stderr."""
    running.process.send_signal(sig)
    code = running.process.wait(timeout=30)
    while (line := running.queue.get(timeout=10)) is not None:
        running.lines.append(line)
    assert running.process.stderr is not None
    return code, running.output, running.process.stderr.read()


def signed_headers(api_id: str, api_key: str, query: str) -> dict[str, str]:
    digest = hmac.new(api_key.encode(), query.encode(), hashlib.sha256).digest()
    return {
        "Accept": "application/json",
        "Content-Type": "application/json",
        "api-auth-id": api_id,
        "api-auth-signature": base64.b64encode(digest).decode(),
        "client-type": "acme/crmsync",
    }


def test_serve_serves_both_apis_with_the_printed_settings_and_stop_on_ctrl_c(
    tmp_path: Path,
) -> None:
    with servers_process(tmp_path / "state") as running:
        env = running.exports
        assert set(env) >= {
            "UNLEASHED_BASE_URL", "UNLEASHED_API_ID", "UNLEASHED_API_KEY", "CRM_BASE_URL",
            "CRM_TOKEN",
        }  # fmt: skip
        assert f"Unleashed server:    {env['UNLEASHED_BASE_URL']}" in running.output
        assert f"Prospect CRM server: {env['CRM_BASE_URL']}" in running.output
        assert "Unleashed holds 20 customers" in running.output
        assert "not secrets" in running.output

        query = "pageSize=5&includeObsolete=true"
        url = f"{env['UNLEASHED_BASE_URL']}/Customers/1?{query}"
        headers = signed_headers(env["UNLEASHED_API_ID"], env["UNLEASHED_API_KEY"], query)
        response = httpx.get(url, headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["Pagination"]["NumberOfItems"] == 20
        assert len(body["Items"]) == 5 and all(c["CustomerCode"] for c in body["Items"])

        wrong = signed_headers(env["UNLEASHED_API_ID"], "not-the-key", query)
        assert httpx.get(url, headers=wrong, timeout=10).status_code == 403

        crm = (
            f"{env['CRM_BASE_URL']}/Divisions?$top=3"
            "&$expand=AccountManagerUser($select=UserCode,EmailAddress)"
        )
        response = httpx.get(crm, headers={"Authorization": f"Bearer {env['CRM_TOKEN']}"})
        assert response.status_code == 200, response.text
        divisions = response.json()["value"]
        assert len(divisions) == 3
        # The account manager is a user code, expanded to the user it names.
        for division in divisions:
            assert division["AccountManagerUser"]["UserCode"] == division["AccountManager"]
        assert httpx.get(crm).status_code == 401
        metadata = httpx.get(
            f"{env['CRM_BASE_URL']}/$metadata",
            headers={"Authorization": f"Bearer {env['CRM_TOKEN']}"},
        )
        assert metadata.status_code == 200 and 'Namespace="ProspectSoft.OData"' in metadata.text

        code, output, stderr = stop(running, signal.SIGINT)
    assert code == 0, stderr
    assert "Stopped." in output
    assert "Traceback" not in stderr
    assert {p.name for p in (tmp_path / "state").iterdir()} >= {"unleashed.sqlite", "crm.sqlite"}


def test_a_restart_on_the_same_data_dir_keeps_changes(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    with servers_process(data_dir) as running:
        env = running.exports
        auth = {"Authorization": f"Bearer {env['CRM_TOKEN']}"}
        response = httpx.patch(
            f"{env['CRM_BASE_URL']}/Divisions(1)", json={"Name": "Renamed Ltd"}, headers=auth
        )
        assert response.status_code in (200, 204), response.text
        code, _, stderr = stop(running, signal.SIGTERM)
        assert code == 0, stderr
    with servers_process(data_dir) as running:
        env = running.exports
        auth = {"Authorization": f"Bearer {env['CRM_TOKEN']}"}
        response = httpx.get(f"{env['CRM_BASE_URL']}/Divisions(1)", headers=auth)
        # The live service wraps even a single entity in a `value` array.
        (division,) = response.json()["value"]
        assert division["Name"] == "Renamed Ltd"
        stop(running, signal.SIGTERM)


def test_a_monthly_usage_limit_set_on_the_command_line_refuses_requests_past_it(
    tmp_path: Path,
) -> None:
    """`--unleashed-monthly-quota N`: N signed requests a month pass, the next is refused with
    the reset time; the count survives a restart on the same data dir."""
    data_dir = tmp_path / "state"
    with servers_process(data_dir, "--unleashed-monthly-quota", "2") as running:
        assert "Unleashed's monthly API usage limit: 2 requests, 0 used" in running.output
        env = running.exports
        url = f"{env['UNLEASHED_BASE_URL']}/Salespersons/1"
        headers = signed_headers(env["UNLEASHED_API_ID"], env["UNLEASHED_API_KEY"], "")
        assert [httpx.get(url, headers=headers).status_code for _ in range(2)] == [200, 200]
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 429
        assert "API usage limit reached" in refused.json()["Description"]
        assert int(refused.headers["Retry-After"]) > 0
        stop(running, signal.SIGTERM)
    with servers_process(data_dir, "--unleashed-monthly-quota", "2") as running:
        assert "2 requests, 2 used" in running.output
        url = f"{running.exports['UNLEASHED_BASE_URL']}/Salespersons/1"
        assert httpx.get(url, headers=headers).status_code == 429
        stop(running, signal.SIGTERM)


def test_a_taken_port_is_reported_without_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "devservers.cli", "serve", "--in-memory",
             "--unleashed-port", str(port), "--crm-port", "0", "--companies", "5"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert "cannot start the local servers" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_a_cycle_and_prints_the_report(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    assert main(["demo", "--companies", "12", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # First cycle: the initial sync pulls Unleashed's values and creates what Unleashed has new.
    first = out.split("[2/3]")[0]
    assert re.search(r"Unleashed → CRM: [1-9]\d* field update", first)
    assert re.search(r"Companies created in the CRM \(standard import\): [1-9]", first)
    # The live edits: the CRM phone reached Unleashed, the new Unleashed contact reached the CRM.
    second = out.split("[2/3]")[1].split("[3/3]")[0]
    assert "CRM → Unleashed: 1 field update(s)" in second
    assert "'+44 113 496 0500'" in second
    assert re.search(r"Contacts created in the CRM: [1-9]", second)
    assert re.search(r"API requests: Unleashed \d+, CRM \d+", out)
    assert "nothing written" in out.split("[3/3]")[1]
    assert LOCAL_UNLEASHED_API_KEY not in out  # the demo has no reason to print credentials


def test_emulators_helper_env_faults_and_stats() -> None:
    with Emulators(companies=10, crm_rate_limit=50, crm_rate_window_s=60) as emu:
        env = emu.env()
        assert env["UNLEASHED_BASE_URL"] == emu.unleashed_url
        assert env["CRM_BASE_URL"] == emu.crm_url
        assert env["UNLEASHED_API_ID"] == LOCAL_UNLEASHED_API_ID == emu.unleashed_api_id
        assert env["CRM_TOKEN"] == LOCAL_CRM_TOKEN == emu.crm_token
        assert emu.world is not None and len(emu.world.customers) == 10
        held = emu.holdings()
        assert held["unleashed"]["customers"] == 10
        assert held["crm"]["divisions"] == len(emu.world.crm["Divisions"])

        emu.reset_stats("crm")  # holdings() asked each entity set once
        emu.set_faults("crm", burst_429=1)
        auth = {"Authorization": f"Bearer {emu.crm_token}"}
        assert httpx.get(f"{emu.crm_url}/Users", headers=auth).status_code == 429
        assert httpx.get(f"{emu.crm_url}/Users", headers=auth).status_code == 200
        stats = emu.stats("crm")
        assert stats["injected"].get("429") == 1
        assert stats["requests"]["GET /Users"] == 2
        emu.set_faults("crm")
        assert emu.stats("crm")["faults"]["burst_429"] == 0
    with pytest.raises(RuntimeError):
        _ = emu.crm_url


def _help(module: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _commands(help_text: str) -> set[str]:
    """The subcommand names argparse lists under `positional arguments`."""
    return set(re.findall(r"^    (\w+)\s", help_text, re.MULTILINE))


def test_sync_devservers_lists_the_local_server_commands() -> None:
    assert _commands(_help("devservers.cli")) == {"serve", "demo", "dev"}
    script = Path(sys.executable).with_name("sync-devservers")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and _commands(result.stdout) == {"serve", "demo", "dev"}


def test_sync_pipeline_lists_only_the_product_commands() -> None:
    assert _commands(_help("sync_pipeline.cli")) == {"check", "compact", "undo", "webhooks"}
