"""The shipped deployment (deploy/): what can be checked without a Docker engine.

The instance config is valid for Dagster's own schema and keeps everything in PostgreSQL; the
compose file's services refer to files that exist and share one volume for the DuckDB and pacing
files; and the image's command, run here with the same arguments, starts a code server that answers
Dagster's gRPC health check and serves the code location. The whole stack against a real PostgreSQL
server is tests/test_postgres_instance.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef
from dagster._grpc.client import DagsterGrpcClient
from dagster._grpc.types import ListRepositoriesResponse
from dagster._serdes import deserialize_value

from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
POSTGRES_ENV = {
    "DAGSTER_POSTGRES_HOST": "postgres", "DAGSTER_POSTGRES_PORT": "5432",
    "DAGSTER_POSTGRES_USER": "dagster", "DAGSTER_POSTGRES_PASSWORD": "not-a-secret",
    "DAGSTER_POSTGRES_DB": "dagster",
}  # fmt: skip


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())


def test_the_instance_config_is_valid_and_keeps_everything_in_postgres(monkeypatch, tmp_path):
    for name, value in POSTGRES_ENV.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "dagster.yaml").write_text((DEPLOY / "dagster.yaml").read_text())
    config, custom_class = dagster_instance_config(str(tmp_path))  # Dagster's schema, or raises
    assert custom_class is None
    db = config["storage"]["postgres"]["postgres_db"]
    # Every connection value from the environment, and psycopg2 named (SQLAlchemy 2.1 reads a
    # plain postgresql:// as psycopg 3, with which dagster-postgres's statements fail).
    assert {k: v for k, v in db.items() if k != "scheme"} == {
        "hostname": {"env": "DAGSTER_POSTGRES_HOST"}, "port": {"env": "DAGSTER_POSTGRES_PORT"},
        "username": {"env": "DAGSTER_POSTGRES_USER"},
        "password": {"env": "DAGSTER_POSTGRES_PASSWORD"}, "db_name": {"env": "DAGSTER_POSTGRES_DB"},
    }  # fmt: skip
    assert db["scheme"] == "postgresql+psycopg2"
    # A pool limit for `duckdb` only (set in the database), no instance-wide default; one run
    # at a time per pool.
    assert "default_limit" not in config["concurrency"]["pools"]
    assert config["concurrency"]["pools"]["granularity"] == "run"
    ref = InstanceRef.from_dir(str(tmp_path))
    storages = {
        ref.run_storage_data.class_name, ref.event_storage_data.class_name,
        ref.schedule_storage_data.class_name,
    }  # fmt: skip
    assert storages == {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}
    assert ref.run_coordinator_data.class_name == "QueuedRunCoordinator"
    assert ref.run_launcher_data.class_name == "DefaultRunLauncher"
    retention = ref.settings["retention"]
    assert retention["sensor"]["purge_after_days"]["skipped"] == 1
    assert retention["schedule"]["purge_after_days"] > 0


def test_the_compose_services_share_one_volume_and_refer_to_files_that_exist():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "code-location", "daemon", "webserver", "webhooks"}
    code = services["code-location"]
    context = (DEPLOY / code["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / code["build"]["dockerfile"]).is_file()
    # Every COPY source of the image is in the build context.
    for instruction, args in _dockerfile():
        if instruction == "COPY":
            for source in shlex.split(args)[:-1]:
                assert (context / source).exists(), source
    # Host files mounted into a service exist; named volumes are declared.
    named = set(compose["volumes"])
    data_mounts = {}
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in named, f"{name}: {source}"
                data_mounts.setdefault(source, []).append((name, target))
    # One volume for the DuckDB and pacing files, where the image's variables put them.
    env = {}
    for instruction, args in _dockerfile():
        if instruction == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(args))
    assert data_mounts["sync-data"] == [("code-location", "/data"), ("webhooks", "/data")]
    # The webhook receiver is opt-in and records into the event file next to the DuckDB file.
    assert services["webhooks"]["profiles"] == ["webhooks"]
    assert services["webhooks"]["command"][:3] == ["sync-pipeline", "webhooks", "serve"]
    assert services["webhooks"]["environment"]["UNLEASHED_WEBHOOK_SECRET"].startswith("${")
    assert Path(env["SYNC_DUCKDB_PATH"]).parent == Path(env["SYNC_PACING_FILE"]).parent
    assert Path(env["SYNC_DUCKDB_PATH"]).parent == Path("/data")
    # The webserver and daemon reach the code location where its image serves it.
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())
    grpc = workspace["load_from"][0]["grpc_server"]
    cmd = json.loads(dict(_dockerfile())["CMD"])
    assert grpc["host"] == "code-location"
    assert str(grpc["port"]) == cmd[cmd.index("--port") + 1]
    for name in ("daemon", "webserver"):
        assert "deploy/workspace.yaml" in " ".join(services[name]["command"])
    assert "dagster instance concurrency set duckdb 1" in " ".join(services["daemon"]["command"])
    # Secrets come from the environment (.env), never written in the file.
    for name in ("CRM_TOKEN", "UNLEASHED_API_KEY", "UNLEASHED_API_ID"):
        assert code["environment"][name].startswith("${" + name)


def test_the_image_holds_the_product_without_the_local_servers():
    """The image copies the product package only and installs it with the postgres extra: the
    local servers (devservers/, the dev and bench extras) stay out of it."""
    steps = _dockerfile()
    sources = [
        source
        for instruction, args in steps
        if instruction == "COPY"
        for source in shlex.split(args)[:-1]
    ]
    assert "sync_pipeline" in sources
    assert not [s for s in sources if s in (".", "./") or s.startswith("devservers")], sources
    installs = [args for instruction, args in steps if instruction == "RUN" and "pip" in args]
    assert installs == ["pip install --no-cache-dir -c constraints.txt '.[postgres]'"]


def _health(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dagster", "api", "grpc-health-check", "--port", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_the_images_command_starts_the_code_server(tmp_path):
    cmd = json.loads(dict(_dockerfile())["CMD"])
    assert cmd[:3] == ["dagster", "code-server", "start"]
    port = free_port()
    # The same command and arguments; only the port is a free one, on loopback.
    args = [*cmd[1:]]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path),
        "SYNC_DUCKDB_PATH": str(tmp_path / "data" / "sync.duckdb"),
        "SYNC_SETTINGS_FILE": str(ROOT / "settings.yaml"),
        "SYNC_MAPPINGS_DIR": str(ROOT / "mappings"),
    }
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "dagster", *args], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while (health := _health(port)).returncode != 0:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, health.stdout + health.stderr
            time.sleep(2)
        assert "gRPC connection successful" in health.stdout
        # It answers a ping and serves the code location the webserver and daemon load.
        client = DagsterGrpcClient(port=port, host="127.0.0.1")
        assert client.ping("sync")["echo"] == "sync"
        listed = deserialize_value(client.list_repositories())
        assert isinstance(listed, ListRepositoriesResponse), listed
        pointers = listed.repository_code_pointer_dict.values()
        assert [p.module for p in pointers] == ["sync_pipeline.definitions"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
