"""Dagster resources: the two API clients, the DuckDB store, the settings file and the mappings.

Secrets come only from environment variables (`EnvVar`), so they never sit in code, run config or
the Dagster UI.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import dagster as dg
import duckdb
import httpx
from dagster_duckdb import DuckDBResource

from sync_pipeline import store
from sync_pipeline.alerts import Secrets
from sync_pipeline.clients.base import RetrySettings, UsageBlock, UsageLog, usage_log
from sync_pipeline.clients.crm import CrmClient
from sync_pipeline.clients.unleashed import _GUID_RE, UnleashedClient
from sync_pipeline.mapping import load_mappings
from sync_pipeline.settings import Settings, load_settings, parse_settings, policy_fields

DEFAULT_DB = ".data/sync.duckdb"
DEFAULT_MAPPINGS = str(Path(__file__).resolve().parents[2] / "mappings")


class ResourceConfigError(ValueError):
    """A connection setting that cannot work; the message names the environment variable."""


def _check_url(value: str, variable: str) -> str:
    if value and not value.isprintable():
        raise ResourceConfigError(
            f"{variable} contains a line break or another control character, as an .env file "
            f"with Windows line endings leaves at the end of each value: {value!r}"
        )
    url = httpx.URL(value) if value and " " not in value else None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ResourceConfigError(
            f"{variable} must be an absolute http:// or https:// URL, got {value!r}"
        )
    return value


def _check_secret(value: str, variable: str) -> str:
    # Never put the value in a message: it would reach the Dagster event log and the UI.
    if not value or not value.strip():
        raise ResourceConfigError(f"{variable} is empty: set it to the account's credential")
    if "\r" in value or "\n" in value:
        raise ResourceConfigError(
            f"{variable} contains a line break (\\r or \\n), as an .env file with Windows line "
            "endings leaves at the end of each value: remove it (the value is not shown)"
        )
    if not all(" " <= c <= "~" for c in value):
        raise ResourceConfigError(
            f"{variable} contains a character other than printable ASCII (a control character, "
            "or a typographic quote or space from a copy): remove it (the value is not shown)"
        )
    if value != value.strip():
        raise ResourceConfigError(
            f"{variable} starts or ends with a space: remove it (the value is not shown)"
        )
    return value


class CrmResource(dg.ConfigurableResource):
    """Prospect CRM OData API. Pacing defaults to the workspace-wide 1,200 requests / 10 minutes."""

    base_url: str = "https://crm-odata-v1.prospect365.com"
    token: str
    rate_limit: int = 1200
    rate_window_s: float = 600
    # The pacing window shared by every process of the deployment (a SQLite file); empty: per
    # process. `default_resources` puts it next to the DuckDB database.
    pacing_file: str = ""
    timeout_s: float = 30
    retry_initial_wait_s: float = 0.2
    retry_max_wait_s: float = 20

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Checked as the resource is built for a run or a tick, before any request: a bad value
        # would otherwise fail every request, quoted back in each error (httpx's "Illegal header
        # value" holds the token).
        self._connection()

    def _connection(self) -> tuple[str, str]:
        return _check_url(self.base_url, "CRM_BASE_URL"), _check_secret(self.token, "CRM_TOKEN")

    def get_client(self) -> CrmClient:
        base_url, token = self._connection()
        return CrmClient(
            base_url,
            token,
            timeout=self.timeout_s,
            rate_limit=self.rate_limit,
            rate_window_s=self.rate_window_s,
            pacing_file=self.pacing_file or None,
            retry=RetrySettings(
                initial_wait=self.retry_initial_wait_s, max_wait=self.retry_max_wait_s
            ),
        )


class UnleashedResource(dg.ConfigurableResource):
    """Unleashed API (HMAC-signed)."""

    base_url: str = "https://api.unleashedsoftware.com"
    api_id: str
    api_key: str
    client_type: str = "acme/crmsync"
    requests_per_minute: int | None = None
    pacing_file: str = ""  # as for the CRM
    timeout_s: float = 30
    retry_initial_wait_s: float = 0.2
    retry_max_wait_s: float = 20

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # As for the CRM: checked before any request, naming the variable and never its value.
        self._connection()

    def _connection(self) -> tuple[str, str, str]:
        base_url = _check_url(self.base_url, "UNLEASHED_BASE_URL")
        api_id = _check_secret(self.api_id, "UNLEASHED_API_ID")
        if not _GUID_RE.match(api_id):
            # The id is treated as a secret too: say what is wrong, never echo it.
            raise ResourceConfigError("UNLEASHED_API_ID must be the account's API id, a GUID")
        return base_url, api_id, _check_secret(self.api_key, "UNLEASHED_API_KEY")

    def get_client(self) -> UnleashedClient:
        base_url, api_id, api_key = self._connection()
        return UnleashedClient(
            base_url,
            api_id,
            api_key,
            self.client_type,
            timeout=self.timeout_s,
            requests_per_minute=self.requests_per_minute,
            pacing_file=self.pacing_file or None,
            retry=RetrySettings(
                initial_wait=self.retry_initial_wait_s, max_wait=self.retry_max_wait_s
            ),
        )

    def requests_this_month(self) -> int | None:
        """Requests this deployment sent to the account this calendar month (UTC), from the
        pacing file every process adds to (None without one: not counted)."""
        log = self._usage_log()
        return None if log is None else log.this_month()

    def usage_block(self, now: datetime | None = None) -> UsageBlock | None:
        """The account's used-up monthly usage limit, as a client last saw it, if it is still in
        force at `now` (None without a pacing file: not kept)."""
        log = self._usage_log()
        return None if log is None else log.current_block(now)

    def usage_blocked_until(self, now: datetime | None = None) -> datetime | None:
        """When the block in force at `now` ends (None: no block known)."""
        block = self.usage_block(now)
        return block.resets_at if block else None

    def _usage_log(self) -> UsageLog | None:
        return usage_log(self.pacing_file or None, self.base_url)


class SyncDuckDB(DuckDBResource):
    """DuckDBResource that creates the schema and waits for other writer processes (file lock),
    so overlapping runs queue instead of failing on DuckDB's single-writer lock."""

    lock_timeout_s: float = 1800

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with store.connect(self.database, lock_timeout=self.lock_timeout_s) as con:
            yield con


class SyncConfigResource(dg.ConfigurableResource):
    """Where the operator settings and the field mappings live; both are re-read on every use."""

    settings_file: str = "settings.yaml"
    mappings_dir: str = DEFAULT_MAPPINGS

    def settings(self) -> Settings:
        """The settings as the file says now, conflict_policies checked against the mappings.
        Parsed again only when its bytes (or the mapped fields) change: every asset of a run asks
        (about ten times a cycle) and YAML parsing costs milliseconds, while reading the bytes
        costs microseconds. Keyed on content, not on modification time, so two writes within one
        clock tick can never serve a stale copy."""
        path = Path(self.settings_file)
        fields = policy_fields(self.mappings())
        try:
            raw = path.read_bytes()
        except OSError:
            # Missing: the defaults if it is the default file, else an error; unreadable: why.
            return load_settings(path, policy_fields=fields)
        key = (raw, fields)
        cached = _SETTINGS_CACHE.get(str(path))
        if cached is not None and cached[0] == key:
            return cached[1].model_copy(deep=True)
        settings = parse_settings(raw, str(path), policy_fields=fields)
        _SETTINGS_CACHE[str(path)] = (key, settings.model_copy(deep=True))
        return settings

    def mappings(self) -> dict:
        return load_mappings(self.mappings_dir)


_SETTINGS_CACHE: dict[str, tuple[tuple[bytes, frozenset[str]], Settings]] = {}


class AlertsResource(dg.ConfigurableResource):
    """The secrets of the notices (settings: alerts), from environment variables: the webhook
    address (it usually carries its token) and the SMTP login. Empty: not set."""

    webhook_url: str = ""
    smtp_username: str = ""
    smtp_password: str = ""

    def secrets(self) -> Secrets:
        return Secrets(self.webhook_url, self.smtp_username, self.smtp_password)


ALERT_SECRETS = {
    "webhook_url": "SYNC_ALERT_WEBHOOK_URL",
    "smtp_username": "SYNC_ALERT_SMTP_USERNAME",
    "smtp_password": "SYNC_ALERT_SMTP_PASSWORD",
}


def alerts_resource() -> AlertsResource:
    """Each secret through `EnvVar` when its variable is set (the UI shows the variable's name,
    never its value); one not set is empty, since notices are optional."""
    import os

    return AlertsResource(
        **{key: dg.EnvVar(var) for key, var in ALERT_SECRETS.items() if os.environ.get(var)}
    )


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """Resources for the code location, wired to environment variables."""
    database = duckdb_path()
    pacing = _env_or("SYNC_PACING_FILE", str(Path(database).parent / "api-pacing.sqlite"))
    return {
        "crm": CrmResource(
            base_url=dg.EnvVar("CRM_BASE_URL"),
            token=dg.EnvVar("CRM_TOKEN"),
            pacing_file=pacing,
        ),
        "unleashed": UnleashedResource(
            base_url=dg.EnvVar("UNLEASHED_BASE_URL"),
            api_id=dg.EnvVar("UNLEASHED_API_ID"),
            api_key=dg.EnvVar("UNLEASHED_API_KEY"),
            client_type=_env_or("UNLEASHED_CLIENT_TYPE", "acme/crmsync"),
            pacing_file=pacing,
        ),
        "duckdb": SyncDuckDB(database=database),
        "sync_config": SyncConfigResource(
            settings_file=_env_or("SYNC_SETTINGS_FILE", "settings.yaml"),
            mappings_dir=_env_or("SYNC_MAPPINGS_DIR", DEFAULT_MAPPINGS),
        ),
        "alerts": alerts_resource(),
    }


def connection_resources() -> tuple[CrmResource, UnleashedResource, SyncConfigResource]:
    """The two API resources and the configuration, from the environment as it is now (for
    commands that run outside Dagster, such as `sync-pipeline check`)."""
    return (
        CrmResource(
            base_url=_env_or("CRM_BASE_URL", CrmResource.model_fields["base_url"].default),
            token=_env_or("CRM_TOKEN", ""),
        ),
        UnleashedResource(
            base_url=_env_or(
                "UNLEASHED_BASE_URL", UnleashedResource.model_fields["base_url"].default
            ),
            api_id=_env_or("UNLEASHED_API_ID", ""),
            api_key=_env_or("UNLEASHED_API_KEY", ""),
            client_type=_env_or("UNLEASHED_CLIENT_TYPE", "acme/crmsync"),
        ),
        SyncConfigResource(
            settings_file=_env_or("SYNC_SETTINGS_FILE", "settings.yaml"),
            mappings_dir=_env_or("SYNC_MAPPINGS_DIR", DEFAULT_MAPPINGS),
        ),
    )


def duckdb_path() -> str:
    """The DuckDB file the code location uses (also what `sync-pipeline compact` works on)."""
    return _env_or("SYNC_DUCKDB_PATH", DEFAULT_DB)


def _env_or(name: str, default: str) -> str:
    import os

    return os.environ.get(name) or default
