"""A real PostgreSQL server in a temporary folder, for tests of a Postgres-backed Dagster instance.

The server binaries are Debian's `postgresql` package (`.ci/run` installs it when missing).
PostgreSQL refuses to run as root, so as root (CI) the cluster belongs to the package's `postgres`
user and every server command runs through `runuser`. A server that cannot be found or started
fails the test: it is not skipped."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.harness import free_port

SERVER_USER = "postgres"  # created by Debian's postgresql package


def server_binaries() -> Path:
    """The folder with `initdb` and `pg_ctl`: on PATH, else Debian's newest version."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if debian:
        return Path(debian[-1]).parent
    raise AssertionError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under "
        "/usr/lib/postgresql/*/bin: install Debian's `postgresql` package (.ci/run does)"
    )


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    db_name: str

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.db_name}"

    def env(self) -> dict[str, str]:
        """The variables deploy/dagster.yaml reads."""
        return {
            "DAGSTER_POSTGRES_HOST": self.host,
            "DAGSTER_POSTGRES_PORT": str(self.port),
            "DAGSTER_POSTGRES_USER": self.user,
            "DAGSTER_POSTGRES_PASSWORD": self.password,
            "DAGSTER_POSTGRES_DB": self.db_name,
        }


@contextmanager
def postgres_server(db_name: str = "dagster") -> Iterator[Postgres]:
    """initdb a cluster in a new temporary folder, start it on a free loopback port with password
    authentication, create `db_name`, and stop and remove it all afterwards."""
    bin_dir = server_binaries()
    root = Path(tempfile.mkdtemp(prefix="sync-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError as exc:
            raise AssertionError(
                f"running as root, and there is no `{SERVER_USER}` user to run PostgreSQL as: "
                "install Debian's `postgresql` package (it creates one)"
            ) from exc
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", SERVER_USER, "--"]
    data, log = root / "data", root / "server.log"
    password = secrets.token_urlsafe(16)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if as_user:
        os.chown(pwfile, account.pw_uid, account.pw_gid)
    pwfile.chmod(0o600)

    def run(*cmd: str) -> None:
        done = subprocess.run(
            [*as_user, *cmd], capture_output=True, text=True, timeout=120, cwd=root
        )  # fmt: skip
        if done.returncode != 0:
            extra = log.read_text() if log.exists() else ""
            raise AssertionError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}{extra}")

    user = "sync"
    run(
        str(bin_dir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}",
        "--auth=scram-sha-256", "-E", "UTF8", "--no-sync",
    )  # fmt: skip
    pwfile.unlink()
    started = False
    try:
        for _ in range(3):  # a free port can be taken between probing and binding it
            port = free_port()
            options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
            try:
                run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                    "-w", "-t", "60", "start")  # fmt: skip
                started = True
                break
            except AssertionError:
                if "could not bind" not in (log.read_text() if log.exists() else ""):
                    raise
        assert started, log.read_text()
        server = Postgres("127.0.0.1", port, user, password, db_name)
        import psycopg2  # dagster-postgres's own driver (the `postgres` extra)

        con = psycopg2.connect(
            host=server.host, port=port, user=user, password=password, dbname="postgres"
        )
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{db_name}"')
        finally:
            con.close()
        yield server
    finally:
        if started:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
