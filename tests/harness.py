"""End-to-end test harness: both local servers, a DuckDB file, a settings file, and the Dagster
definitions bound to them, plus clients to change records the way a person would."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pandas as pd

from devservers.run import Emulators
from sync_pipeline import store
from sync_pipeline.clients.crm import CrmClient
from sync_pipeline.clients.unleashed import UnleashedClient
from sync_pipeline.defs import build_defs
from sync_pipeline.defs.resources import (
    DEFAULT_MAPPINGS,
    CrmResource,
    SyncConfigResource,
    SyncDuckDB,
    UnleashedResource,
)
from sync_pipeline.settings import Settings, save_settings


def free_port() -> int:
    """A local TCP port nothing listens on (for a server to take, or to stay closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def current_partition() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d-%H:00")


class Harness:
    def __init__(
        self,
        emu: Emulators,
        tmp_path: Path,
        mappings_dir: str | None = None,
        instance: dg.DagsterInstance | None = None,
    ) -> None:
        """Runs go to `instance` (one the Dagster UI can read, e.g. under a DAGSTER_HOME), an
        ephemeral in-memory one by default."""
        self.emu = emu
        self.db = tmp_path / "sync.duckdb"
        self.settings_file = tmp_path / "settings.yaml"
        save_settings(Settings(), self.settings_file)
        self.resources = {
            "crm": CrmResource(base_url=emu.crm_url, token=emu.crm_token),
            "unleashed": UnleashedResource(
                base_url=emu.unleashed_url, api_id=emu.unleashed_api_id,
                api_key=emu.unleashed_api_key,
            ),
            "duckdb": SyncDuckDB(database=str(self.db)),
            "sync_config": SyncConfigResource(
                settings_file=str(self.settings_file),
                mappings_dir=mappings_dir or DEFAULT_MAPPINGS,
            ),
        }  # fmt: skip
        self.defs = build_defs(self.resources)
        self.instance = instance or dg.DagsterInstance.ephemeral()
        self.crm = CrmClient(emu.crm_url, emu.crm_token)
        self.unleashed = UnleashedClient(
            emu.unleashed_url, emu.unleashed_api_id, emu.unleashed_api_key
        )

    # -- running ----------------------------------------------------------------------------------
    def run(
        self,
        job: str,
        partition_key: str | None = None,
        *,
        writes_may_fail: bool = False,
        **kwargs: Any,
    ):
        """Run a job that must succeed; with `writes_may_fail`, a run that failed only because
        some planned writes were not made (the apply assets' blocking check) is returned too,
        and any other failure raises `RunFailed`."""
        job_def = self.defs.resolve_job_def(job)
        if partition_key is None and job_def.partitions_def is not None:
            partition_key = current_partition()
        result = job_def.execute_in_process(
            instance=self.instance,
            partition_key=partition_key,
            raise_on_error=not writes_may_fail,
            **kwargs,
        )
        if writes_may_fail and not result.success and not only_writes_unmade(result):
            raise RunFailed(failure_messages(result))
        assert result.success or writes_may_fail
        return result

    def cycle(self, partition_key: str | None = None):
        return self.run("sync_cycle_job", partition_key)

    def push(self):
        return self.run("crm_push_job")

    def use_pacing_file(self, path: Path) -> None:
        """Give the Unleashed resource a pacing file, as a deployment has (`default_resources`):
        the month's request count and a used-up usage limit are kept there."""
        old = self.resources["unleashed"]
        self.resources["unleashed"] = UnleashedResource(
            base_url=old.base_url, api_id=old.api_id, api_key=old.api_key, pacing_file=str(path)
        )
        self.defs = build_defs(self.resources)

    def set_settings(self, **changes: Any) -> None:
        current = Settings.model_validate(
            __import__("yaml").safe_load(self.settings_file.read_text())
        )
        save_settings(current.model_copy(update=changes), self.settings_file)

    def settings_zone(self):
        """The settings file's time zone."""
        return Settings.model_validate(
            __import__("yaml").safe_load(self.settings_file.read_text())
        ).zone

    def reload(self) -> None:
        """Build the definitions again, as reloading the code location does: the schedules' cron
        strings are the settings file's times when the definitions are built."""
        self.defs = build_defs(self.resources)

    def schedule(self, name: str) -> dg.ScheduleDefinition:
        return self.defs.resolve_schedule_def(name)

    # -- looking ----------------------------------------------------------------------------------
    def query(self, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
        with store.connect(self.db) as con:
            return con.execute(sql, params or []).df()

    def linked_company(self, where: str = "TRUE") -> dict[str, Any]:
        """A linked (crm_id, erp_id) pair, with the CRM division and Unleashed customer as now."""
        row = self.query(
            f"""SELECT l.crm_id, l.erp_id FROM company_links l
                JOIN unleashed_customers u ON u.id = l.erp_id AND u.active
                JOIN crm_companies c ON c.id = l.crm_id AND c.active
                WHERE {where} ORDER BY l.crm_id LIMIT 1"""
        ).iloc[0]
        return {"crm_id": int(row["crm_id"]), "erp_id": row["erp_id"]}

    def two_contacts_of_one_customer(self) -> pd.Series:
        """Two linked contacts under one Unleashed customer, the first with an email: `b_crm`
        (the second's CRM id), `b_erp`, `cust`, and the first's `first`, `last` and `email`.
        Giving the second the first's name and email makes a change Unleashed refuses."""
        return self.query(
            """SELECT a.crm_id AS a_crm, b.crm_id AS b_crm, b.erp_id AS b_erp,
                      b.erp_parent_id AS cust, ea.data->>'$.FirstName' AS first,
                      ea.data->>'$.LastName' AS last, ea.data->>'$.EmailAddress' AS email
               FROM contact_links a JOIN contact_links b
                 ON a.erp_parent_id = b.erp_parent_id AND a.erp_id < b.erp_id
               JOIN unleashed_contacts ea ON ea.id = a.erp_id AND ea.active
               JOIN unleashed_contacts eb ON eb.id = b.erp_id AND eb.active
               WHERE coalesce(ea.data->>'$.EmailAddress', '') <> ''
               ORDER BY a.erp_id LIMIT 1"""
        ).iloc[0]

    def plant_crm(self, entity_set: str, key: int, record: dict[str, Any]) -> None:
        """Store a CRM record exactly as given (the server's admin raw write: no validation)."""
        response = httpx.put(
            f"{self.emu.crm_url}/_admin/raw/{entity_set}/{key}", json=record, timeout=30
        )
        response.raise_for_status()

    def plant_customer(self, guid: str, **fields: Any) -> dict[str, Any]:
        """Force-write top-level fields of an Unleashed customer (no validation), as older data
        or another integration can leave a record that Unleashed's own API would refuse."""
        response = httpx.put(
            f"{self.emu.unleashed_url}/_admin/customers/{guid}", json=fields, timeout=30
        )
        response.raise_for_status()
        return response.json()

    def materialization_metadata(self, result, key: list[str]) -> dict[str, Any]:
        for event in result.get_asset_materialization_events():
            mat = event.event_specific_data.materialization
            if mat.asset_key == dg.AssetKey(key):
                return {k: v.value for k, v in mat.metadata.items()}
        raise AssertionError(f"{key} was not materialised")

    def close(self) -> None:
        self.crm.close()
        self.unleashed.close()
        self.instance.dispose()


def failure_messages(result) -> str:
    """Every failure message of a run with its causes, as the Dagster UI shows them."""
    parts = []
    for event in result.all_events:
        if event.is_failure:
            parts.append(event.message or "")
            error = getattr(event.event_specific_data, "error", None)
            while error is not None:
                parts.append(error.message)
                error = error.cause or error.context
    return "\n".join(parts)


WRITES_CHECK_FAILED = "blocking asset check failed with ERROR severity"


class RunFailed(AssertionError):
    """A run failed for another reason than planned writes not made."""


def only_writes_unmade(result) -> bool:
    """The run failed, and only in the apply assets' blocking writes check."""
    failed = [e for e in result.all_events if e.is_step_failure]
    errors = [e.event_specific_data.error.message for e in failed]
    return bool(errors) and all(WRITES_CHECK_FAILED in m for m in errors)


def run_with_unwritten(h: Harness, job: str = "crm_push_job", **kwargs: Any):
    """Run a job some of whose planned writes are not made (the target fails or refuses them):
    the run fails, and only through the apply assets' blocking writes check, after each of
    them materialised (what was written is recorded)."""
    job_def = h.defs.resolve_job_def(job)
    result = job_def.execute_in_process(
        instance=h.instance,
        partition_key=current_partition() if job_def.partitions_def is not None else None,
        raise_on_error=False,
        **kwargs,
    )
    assert not result.success, "the run should have failed: a planned write was not made"
    assert only_writes_unmade(result), failure_messages(result)
    return result


def writes_check(result, asset: str) -> tuple[bool, str | None, dict[str, Any]]:
    """(passed, description, metadata) of an apply asset's writes check in a run."""
    for e in result.get_asset_check_evaluations():
        if e.asset_key.to_user_string() == asset and e.check_name == "planned_writes_written":
            meta = {k: v.value for k, v in e.metadata.items()}
            return e.passed, e.description, meta
    raise AssertionError(f"no writes check on {asset} in the run")


def run_failing(h: Harness, job: str = "sync_cycle_job", **kwargs: Any):
    """Run a job that must fail (the current hour's partition for partitioned jobs)."""
    job_def = h.defs.resolve_job_def(job)
    result = job_def.execute_in_process(
        instance=h.instance,
        partition_key=current_partition() if job_def.partitions_def is not None else None,
        raise_on_error=False,
        **kwargs,
    )
    assert not result.success
    return result
