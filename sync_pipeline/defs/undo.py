"""The undo job: a run's audited writes written back, launched from the Dagster UI with the run
id in its config (`sync-pipeline undo RUN_ID` does the same from a shell)."""

import dagster as dg
from pydantic import Field

from sync_pipeline import preflight, undo
from sync_pipeline.defs.resources import (
    CrmResource,
    SyncConfigResource,
    SyncDuckDB,
    UnleashedResource,
)
from sync_pipeline.report import md_table


class UndoConfig(dg.Config):
    run_id: str = Field(description="The id of the run whose writes are undone (Runs in the UI).")


COLUMNS = ["system", "entity", "crm_id", "erp_id", "field", "run_wrote", "now", "before"]


def refusal(con, settings, mappings) -> str | None:
    """Why an undo must not write now: shadow mode, or the preflight does not pass."""
    if settings.shadow_mode:
        return "Shadow mode is on in settings: the undo writes nothing (turn it off first)"
    return preflight.write_block(con, mappings)


@dg.op(
    name="undo_run",
    pool="duckdb",
    description="Write back the values a run's audited writes replaced, where the field still "
    "holds what the run wrote; report what was left because someone changed it since.",
)
def undo_run_op(
    context: dg.OpExecutionContext,
    config: UndoConfig,
    crm: CrmResource,
    unleashed: UnleashedResource,
    duckdb: SyncDuckDB,
    sync_config: SyncConfigResource,
) -> dg.Output:
    mappings = sync_config.mappings()
    with duckdb.get_connection() as con:
        if why := refusal(con, sync_config.settings(), mappings):
            raise dg.Failure(description=f"Nothing written: {why}")
        with crm.get_client() as crm_client, unleashed.get_client() as unleashed_client:
            try:
                result = undo.undo_run(
                    con, crm_client, unleashed_client, mappings, config.run_id.strip(),
                    context.run_id,
                )  # fmt: skip
            except undo.UnknownRun as exc:
                raise dg.Failure(description=str(exc)) from None
    metadata = {
        "written_back": len(result.restored),
        "left_changed_since": len(result.left),
        "already_back": len(result.already),
        "not_written": len(result.failed),
        "creations_not_undone": result.creations,
        "written_back_preview": dg.MetadataValue.md(md_table(result.restored, COLUMNS)),
        "left_preview": dg.MetadataValue.md(md_table(result.left, COLUMNS)),
    }
    context.log.info(result.summary())
    if result.failed:
        raise dg.Failure(description=result.summary(), metadata=metadata)
    return dg.Output(result.summary(), metadata=metadata)


@dg.job(
    name="undo_run_job",
    description="Undo a run: launch with its run id (ops: undo_run: config: run_id). Writes "
    "back the values its writes replaced where nobody changed them since, and lists the rest.",
    tags={"sync/trigger": "undo"},
    executor_def=dg.in_process_executor,
)
def undo_run_job():
    undo_run_op()
