"""The preflight asset: every job starts with it, so a tenant or a mapping that does not fit stops
the run before anything is read into the sync or written (see sync_pipeline/preflight.py)."""

import dagster as dg

from sync_pipeline import preflight
from sync_pipeline.defs.resources import (
    CrmResource,
    SyncConfigResource,
    SyncDuckDB,
    UnleashedResource,
)
from sync_pipeline.report import md_table

PREFLIGHT_KEY = dg.AssetKey(["sync", "sync_preflight"])


class PreflightConfig(dg.Config):
    # Check again now even though a passing result for these mappings is kept.
    force: bool = False


def _findings_md(findings: list[preflight.Finding]) -> str:
    rows = [{"level": f.level, "where": f.where, "problem": f.message} for f in findings]
    return md_table(rows, ["level", "where", "problem"]) if rows else "_none_"


@dg.asset(
    key=PREFLIGHT_KEY,
    group_name="extract",
    kinds={"duckdb"},
    pool="duckdb",
    description="Proves the CRM tenant and the Unleashed account fit the mappings (credentials, "
    "every CRM name against $metadata, tenant guards, role code, link slots). Kept for a day "
    "while the mappings do not change; a failure stops the run before anything is read or "
    "written.",
)
def sync_preflight(
    context: dg.AssetExecutionContext,
    config: PreflightConfig,
    crm: CrmResource,
    unleashed: UnleashedResource,
    duckdb: SyncDuckDB,
    sync_config: SyncConfigResource,
) -> dg.MaterializeResult:
    settings = sync_config.settings()
    mappings = sync_config.mappings()
    with duckdb.get_connection() as con:
        if config.force:
            with crm.get_client() as crm_client, unleashed.get_client() as unleashed_client:
                report = preflight.run_preflight(
                    crm_client, unleashed_client, mappings, two_way_sync=settings.two_way_sync
                )
            preflight.record(con, report)
            block = preflight.write_block(con, mappings)
        else:
            report, block = preflight.ensure(
                con, crm.get_client, unleashed.get_client, mappings,
                two_way_sync=settings.two_way_sync,
            )  # fmt: skip
        kept = preflight.last(con)
    if report is not None:
        (context.log.info if report.ok else context.log.error)(report.text())
    if block:
        raise dg.Failure(
            description=f"Nothing read or written: {block}",
            metadata={
                "problems": dg.MetadataValue.md(_findings_md(report.findings if report else []))
            },
        )
    checked_at, fingerprint, _, text = kept
    return dg.MaterializeResult(
        metadata={
            "checked_at": f"{checked_at:%Y-%m-%d %H:%M:%S} UTC",
            "checked_now": report is not None,
            "mappings_fingerprint": fingerprint,
            "report": dg.MetadataValue.md(f"```\n{text}\n```"),
        }
    )


preflight_job = dg.define_asset_job(
    "preflight_job",
    selection=dg.AssetSelection.assets(sync_preflight),
    config={"ops": {"sync__sync_preflight": {"config": {"force": True}}}},
    description="Check now that the CRM tenant and the Unleashed account fit the mappings "
    "(same as `sync-pipeline check`).",
)
