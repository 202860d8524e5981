"""Security: secrets only from the environment and never written anywhere, servers that refuse bad
credentials and bind to loopback, identifiers from YAML checked before they reach SQL or OData,
and YAML that cannot run code."""

from __future__ import annotations

import inspect
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import httpx
import pytest
from dagster._serdes import serialize_value

import sync_pipeline.clients.unleashed as unleashed_module
from devservers.cli import build_parser
from devservers.common import ServerThread
from devservers.run import Emulators
from sync_pipeline import store
from sync_pipeline.defs.resources import DEFAULT_MAPPINGS
from sync_pipeline.mapping import MappingError, load_mapping, load_mappings
from tests.harness import Harness, current_partition

API_ID = "0badc0de-5eed-4cab-9d1e-a11ce5ec7e75"
API_KEY = "ulk-9f2Qx7ZpWv3RtY8LmN4bK6hJdS1cA5eU"
CRM_TOKEN = "crm-pat-Zq4Wm8Rt2Yx6Vn0Lp3Kj7Hs5Df9Ga1Bc"


# ------------------------------------------------------------------------------------------------
# Secrets come from the environment only
# ------------------------------------------------------------------------------------------------
def test_code_location_reads_secrets_from_environment_variables():
    from sync_pipeline.definitions import defs

    crm, unleashed = defs.resources["crm"], defs.resources["unleashed"]
    expected = {
        (crm, "token"): "CRM_TOKEN",
        (unleashed, "api_id"): "UNLEASHED_API_ID",
        (unleashed, "api_key"): "UNLEASHED_API_KEY",
        (crm, "base_url"): "CRM_BASE_URL",
        (unleashed, "base_url"): "UNLEASHED_BASE_URL",
    }
    for (resource, attr), variable in expected.items():
        value = getattr(resource, attr)
        assert isinstance(value, dg.EnvVar), (attr, type(value))
        assert value.env_var_name == variable


# ------------------------------------------------------------------------------------------------
# A full faulty cycle leaves no secret anywhere
# ------------------------------------------------------------------------------------------------
class _SecretEmulators(Emulators):
    """The local servers, started with this test's own distinctive credentials."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.unleashed_api_id = API_ID
        self.unleashed_api_key = API_KEY
        self.crm_token = CRM_TOKEN


class _DiskHarness(Harness):
    """The harness with a Dagster instance on disk, so the event log is a file we can scan."""

    def __init__(self, emu, tmp_path: Path) -> None:
        super().__init__(emu, tmp_path)
        self.instance.dispose()
        self.home = tmp_path / "dagster_home"
        self.home.mkdir()
        self.instance = dg.DagsterInstance.local_temp(str(self.home))


def _run(h: Harness, job: str):
    """Run a job that may fail (faults are injected); its events are scanned either way."""
    return h.defs.resolve_job_def(job).execute_in_process(
        instance=h.instance,
        partition_key=None if job == "crm_push_job" else current_partition(),
        raise_on_error=False,
    )


def _texts_on_disk(root: Path) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def test_no_secret_in_output_logs_events_or_tables(tmp_path, caplog, capfd, monkeypatch):
    signatures: set[str] = set()
    real_signature = unleashed_module.signature

    def recording_signature(api_key: str, query: str) -> str:
        value = real_signature(api_key, query)
        signatures.add(value)
        return value

    monkeypatch.setattr(unleashed_module, "signature", recording_signature)
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "sync_pipeline", "dagster"):
        caplog.set_level(logging.DEBUG, logger=name)

    with _SecretEmulators(companies=12, seed=11) as emu:
        h = _DiskHarness(emu, tmp_path)
        try:
            runs = [h.cycle()]
            pair = h.linked_company()
            h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0100"})
            # Seed 1: the first six draws after the two 429s hold a 500 and a dropped
            # connection, however many requests the cycle makes after them.
            for system in ("unleashed", "crm"):
                emu.set_faults(
                    system, burst_429=2, error_rate=0.15, error_statuses=[500],
                    drop_rate=0.1, retry_after_s=0.05, seed=1,
                )  # fmt: skip
            runs.append(_run(h, "sync_cycle_job"))
            injected = {s: emu.stats(s)["injected"] for s in ("unleashed", "crm")}
            # A 400 rejection from Unleashed on the next push.
            h.crm.patch("Divisions", pair["crm_id"], {"PhoneNumber": "0113 496 0200"})
            emu.set_faults("crm")
            emu.set_faults("unleashed", error_rate=1.0, error_statuses=[400])
            runs.append(_run(h, "crm_push_job"))
            errors = h.query("SELECT last_error FROM outbox WHERE last_error IS NOT NULL")
            emu.set_faults("unleashed")
            runs.append(h.push())
            tables = h.query(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            )["table_name"]
            with store.connect(h.db) as con:
                table_text = "\n".join(
                    con.execute(f'SELECT * FROM "{t}"').df().to_csv() for t in tables
                )
            run_ids = [r.run_id for r in runs]
            events = [serialize_value(e) for rid in run_ids for e in h.instance.all_logs(rid)]
        finally:
            h.close()

    # The error paths ran: throttling, server errors, dropped connections, a 400 rejection.
    for system in ("unleashed", "crm"):
        assert injected[system].get("429") and injected[system].get("status"), injected
    assert any(injected[s].get("drop") for s in injected), injected
    assert any("HTTP 400" in e for e in errors["last_error"]), errors
    assert signatures, "no signed request was recorded"

    out, err = capfd.readouterr()
    haystacks = {
        "stdout": out,
        "stderr": err,
        "log records": "\n".join(
            f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
        ),
        "dagster events": "\n".join(events),
        "duckdb tables": table_text,
    }
    disk = _texts_on_disk(tmp_path / "dagster_home")
    assert events and disk
    secrets = {"api key": API_KEY, "api id": API_ID, "crm token": CRM_TOKEN}
    secrets.update({f"signature {s}": s for s in signatures})
    for where, text in haystacks.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} found in {where}"
    for path, data in disk + [(str(h.db), h.db.read_bytes())]:
        for what, secret in secrets.items():
            assert secret.encode() not in data, f"{what} found in {path}"


# ------------------------------------------------------------------------------------------------
# The local servers refuse missing or wrong credentials (deeper tests live with each API)
# ------------------------------------------------------------------------------------------------
def test_the_product_connection_draws_no_progress_bar_in_run_logs(tmp_path):
    """DuckDB draws a progress bar on stdout for statements over 2 s (a first sync's link pass);
    in a Dagster run's compute log that is carriage-return noise. Checked in a process of its
    own with stdout a pipe, as a run worker has it (under pytest's capture DuckDB has it off
    anyway), and as the setting: drawing one on demand needs `SET progress_bar_time`, which
    turns the bar back on."""
    code = (
        "import sys\n"
        "from sync_pipeline import store\n"
        "with store.connect(sys.argv[1]) as con:\n"
        "    print(con.execute(\"SELECT current_setting('enable_progress_bar')\").fetchone()[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "sync.duckdb")],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert out.stdout.strip() == "False"


def test_local_servers_refuse_missing_or_wrong_credentials(emulators):
    url = f"{emulators.unleashed_url}/Customers/1"
    assert httpx.get(url).status_code in (401, 403)
    wrong = {**emulators.unleashed_headers(""), "api-auth-signature": "AAAA"}
    assert httpx.get(url, headers=wrong).status_code == 403
    crm = f"{emulators.crm_url}/Divisions"
    assert httpx.get(crm).status_code == 401
    assert httpx.get(crm, headers={"Authorization": "Bearer not-the-token"}).status_code == 401


# ------------------------------------------------------------------------------------------------
# Identifiers from YAML are checked at load time
# ------------------------------------------------------------------------------------------------
INJECTIONS = [
    ("fields.name.crm", "    crm: Name\n", '    crm: "Name\'); DROP TABLE crm_companies; --"\n'),
    ("fields.name.crm", "    crm: Name\n", '    crm: "Name) OR 1=1"\n'),
    ("fields.name.erp", "    erp: CustomerName\n", '    erp: "$.x"\n'),
    ("crm.table", "  table: crm_companies\n", '  table: "crm_companies; DROP TABLE x"\n'),
    ("crm.entity_set", "  entity_set: Divisions\n", '  entity_set: "Divisions?$top=1"\n'),
    (
        "crm.link.field",
        "    field: StandardTextField1\n",
        "    field: \"StandardTextField1 eq 'a' or 1 eq 1\"\n",
    ),
    (
        "crm.link.entity_set",
        "    entity_set: DivisionXtras\n",
        '    entity_set: "DivisionXtras(1)/Division"\n',
    ),
    (
        "crm.expand.0",
        '    - "AccountManagerUser($select=UserCode,EmailAddress)"\n',
        '    - "AccountManagerUser($filter=1 eq 1)"\n',
    ),
    (
        "match.keys.1.crm.0",
        "      crm: [SalesLedger.CustomerCode]\n",
        '      crm: ["SalesLedger.CustomerCode\') OR 1=1 --"]\n',
    ),
    (
        "crm.create.values",
        "    values: {OperatingCompanyCode: A}\n",
        "    values: {\"OperatingCompanyCode eq 'A' or 1 eq 1\": A}\n",
    ),
    (
        "fields.account_manager.crm_write.value",
        "      value: UserCode\n",
        '      value: "UserCode; DROP TABLE crm_users"\n',
    ),
]


@pytest.mark.parametrize(
    "entry, original, evil", INJECTIONS, ids=[i[2].strip() for i in INJECTIONS]
)
def test_injection_in_a_mapping_identifier_is_refused_at_load(tmp_path, entry, original, evil):
    mappings = tmp_path / "mappings"
    shutil.copytree(DEFAULT_MAPPINGS, mappings)
    company = mappings / "company.yaml"
    text = company.read_text()
    assert original in text
    company.write_text(text.replace(original, evil, 1))
    with pytest.raises(MappingError) as raised:
        load_mappings(mappings)
    message = str(raised.value)
    assert str(company) in message and entry in message, message


# ------------------------------------------------------------------------------------------------
# YAML is safe-loaded
# ------------------------------------------------------------------------------------------------
def test_mapping_with_python_object_tag_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    mapping = tmp_path / "company.yaml"
    mapping.write_text(
        (Path(DEFAULT_MAPPINGS) / "company.yaml")
        .read_text()
        .replace(
            "entity: company\n",
            f'entity: !!python/object/apply:os.system ["touch {marker}"]\n',
        )
    )
    with pytest.raises(MappingError) as raised:
        load_mapping(mapping)
    assert str(mapping) in str(raised.value)
    assert not marker.exists()


# (the settings-file twin lives in test_bad_input.py: test_settings_file_with_python_tag_...)


# ------------------------------------------------------------------------------------------------
# Local servers bind to loopback unless told otherwise
# ------------------------------------------------------------------------------------------------
def test_local_servers_bind_to_loopback_by_default():
    assert inspect.signature(ServerThread).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(Emulators).parameters["host"].default == "127.0.0.1"
    server = ServerThread(lambda scope, receive, send: None)
    try:
        assert server._sock.getsockname()[0] == "127.0.0.1"
    finally:
        server._sock.close()
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"
