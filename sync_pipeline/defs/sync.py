"""Plan and apply assets: links, the three-way plan, push, pull and the overnight fix."""

import time

import dagster as dg
from pydantic import Field

from sync_pipeline import account_managers, apply, brake, links, preflight, queueing, shadow, store
from sync_pipeline import diff as diff_mod
from sync_pipeline.core import CREATE_OPS, UPDATE_OPS
from sync_pipeline.defs.extract import CRM_EXTRACTS, unleashed_customers, unleashed_salespersons
from sync_pipeline.defs.resources import (
    CrmResource,
    SyncConfigResource,
    SyncDuckDB,
    UnleashedResource,
)
from sync_pipeline.defs.webhook_reads import unleashed_webhook_reads
from sync_pipeline.guards import two_way_refusal
from sync_pipeline.report import (
    FILLED,
    applied_md,
    conflicts_md,
    filled_md,
    md_table,
    plan_md,
    rejections_md,
    stage_timings_md,
)

# A blocking check on each asset that writes: it fails (and so does the run) when a planned write
# was not made. In the asset's own step, so the materialization (what was written, the outbox and
# baseline moves) is recorded first; nothing in a run depends on an apply asset's data.
WRITES_CHECK = "planned_writes_written"
FIRST_FAILURES = 10  # failed operations listed in the check's metadata
NEW_REJECTIONS_LISTED = 20  # rejections a plan opened, listed whole in its metadata


def _writes_check_spec(key: list[str], target: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        WRITES_CHECK,
        asset=dg.AssetKey(key),
        blocking=True,
        description=f"Every write to {target} this run planned was made, or was rightly not made "
        "(the target changed since planning, or the plan no longer wants it). Fails the run when "
        "a write failed, was refused by the server, or was not tried because the run stopped: "
        "the count, the first failures (record, field, reason) and when each is retried.",
    )


# Links read the whole Unleashed snapshot, whichever windows filled it; the dependency names the
# latest window. With Dagster's default (every partition) each run of this step listed every hourly
# window since the start date to compute data provenance, then discarded the list (over 100
# partitions it falls back to the latest materialisation anyway): ~60 ms per partitioned input per
# run at 8,000 windows, growing by 24 a day, paid by every push the sensor launches.
_LATEST_IMPORT = [
    dg.AssetDep(spec.key, partition_mapping=dg.LastPartitionMapping())
    for spec in unleashed_customers.specs
]


# A blocking check on the plan: a plan over the mass-change brake's limits is held (nothing is
# queued, and the apply steps after it do not run), until an operator releases it by its id.
BRAKE_CHECK = "mass_change_brake"
HELD_TAG = "sync/mass-change-held"


class PlanConfig(dg.Config):
    release_plan_id: str = Field(
        default="",
        description="Only for mass_change_release_job: the id of a plan the mass-change brake "
        "held, as its check showed it. The plan is written if planning again gives the same plan; "
        "if the data changed since, nothing is written and the check names the new plan.",
    )


def _settings_metadata(sync_config: SyncConfigResource) -> dict[str, str]:
    return {f"setting: {k}": v for k, v in sync_config.settings().summary().items()}


@dg.asset(
    key=["sync", "sync_links"],
    group_name="plan",
    kinds={"duckdb"},
    pool="duckdb",
    # After a webhook run's targeted reads too, when the run has them (not in the cycle).
    deps=[*CRM_EXTRACTS, *_LATEST_IMPORT, unleashed_webhook_reads],
    description="One-to-one links: CRM company ↔ Unleashed customer, contact ↔ contact.",
)
def sync_links(duckdb: SyncDuckDB, sync_config: SyncConfigResource) -> dg.MaterializeResult:
    mappings = sync_config.mappings()
    with duckdb.get_connection() as con:
        result = links.update_links(con, mappings)
    return dg.MaterializeResult(metadata=links.link_metadata(result))


@dg.asset(
    key=["sync", "sync_plan"],
    group_name="plan",
    kinds={"duckdb", "pandas"},
    pool="duckdb",
    deps=[sync_links, unleashed_salespersons],
    description="The three-way field diff against the last agreed values: one row per operation.",
    check_specs=[
        dg.AssetCheckSpec(
            BRAKE_CHECK,
            asset=dg.AssetKey(["sync", "sync_plan"]),
            blocking=True,
            description="The plan changes at most the settings' share of the linked records "
            "(mass_change_brake.max_changed_share, 10% by default) and blanks at most "
            "max_blanked_values filled values (20). Over either, the plan is held: nothing is "
            "written in either direction, and this check fails with the counts, example changes "
            "and the plan id to release with mass_change_release_job.",
        )
    ],
)
def sync_plan(
    context: dg.AssetExecutionContext,
    config: PlanConfig,
    crm: CrmResource,
    duckdb: SyncDuckDB,
    sync_config: SyncConfigResource,
) -> dg.MaterializeResult:
    settings = sync_config.settings()
    mappings = sync_config.mappings()
    with duckdb.get_connection() as con:
        block = preflight.write_block(con, mappings)
    if block:
        raise dg.Failure(description=f"Nothing written: {block}")
    with crm.get_client() as client:
        refusal = two_way_refusal(client)
    timings: dict[str, float] = {}
    release = config.release_plan_id.strip()
    with duckdb.get_connection() as con:
        first = brake.is_first_connection(con)
        rows = diff_mod.plan_changes(
            con, mappings,
            initial_policy=settings.initial_policy,
            policy_overrides=settings.conflict_policies,
            account_manager_sync=settings.account_manager_sync,
            default_region=settings.default_phone_region,
            timings=timings,
        )  # fmt: skip
        t0 = time.perf_counter()
        done = queueing.queue(
            con, queueing.Plan(rows, settings.two_way_sync, refusal), settings, context.run_id,
            first_connection=first, release_plan_id=release,
        )  # fmt: skip
        timings["queue (conflicts, rejections, outbox)"] = time.perf_counter() - t0
    plan, verdict = done.plan.rows, done.verdict
    if settings.shadow_mode:
        context.log.info("Shadow mode: nothing queued or written; see shadow_preview.")
    brake_results = _brake_check(
        context, verdict, release, done.released, shadow_mode=settings.shadow_mode
    )
    if refusal:
        context.log.error(refusal)
    elif not settings.two_way_sync:
        context.log.info("Two-way sync is off: only the standard import (creations) is queued.")
    return dg.MaterializeResult(
        metadata={
            "operations_planned": len(plan),
            **{f"planned: {op}": n for op, n in sorted(done.plan.op_counts().items())},
            "operations_queued": done.queued,
            "conflicts": done.plan.conflicts(),
            "rejections_open": done.rejections["open"],
            # Rejections this plan opened (not those still open from before), whole, for the
            # notices of sync_pipeline.alerts.
            "rejections_new": done.rejections["opened"],
            "rejections_new_list": dg.MetadataValue.json(
                done.rejections["new"][:NEW_REJECTIONS_LISTED]
            ),
            "two_way": refusal or ("on" if settings.two_way_sync else "off (settings)"),
            "plan_preview": dg.MetadataValue.md(plan_md(plan)),
            "conflicts_preview": dg.MetadataValue.md(conflicts_md(plan)),
            "rejections_preview": dg.MetadataValue.md(rejections_md(plan)),
            "empty_fields_filled": int((plan["policy"] == FILLED).sum()) if len(plan) else 0,
            "filled_preview": dg.MetadataValue.md(filled_md(plan)),
            "plan_seconds": round(sum(timings.values()), 3),
            "plan_stage_seconds": dg.MetadataValue.md(stage_timings_md(timings)),
            "plan_id": verdict.plan_id or "(nothing to write)",
            "held_by_mass_change_brake": done.held and not settings.shadow_mode,
            **done.shadow,
            **_settings_metadata(sync_config),
        },
        check_results=brake_results,
    )


def _brake_check(
    context: dg.AssetExecutionContext,
    verdict: brake.BrakeResult,
    release: str,
    released: bool,
    *,
    shadow_mode: bool = False,
) -> list[dg.AssetCheckResult]:
    key = dg.AssetCheckKey(context.asset_key, BRAKE_CHECK)
    held = verdict.held and not released
    if shadow_mode:
        # Nothing is written anyway: the check warns that the first live run would be held.
        if key not in context.selected_asset_check_keys:
            return []
        return [
            dg.AssetCheckResult(
                asset_key=key.asset_key,
                check_name=key.name,
                passed=not verdict.held,
                severity=dg.AssetCheckSeverity.WARN,
                description="Shadow mode (nothing written): "
                + ("a live run would be held. " if verdict.held else "")
                + verdict.summary(),
                metadata=verdict.metadata(),
            )
        ]
    if held:
        context.log.error(verdict.summary())
        context.instance.add_run_tags(context.run_id, {HELD_TAG: verdict.plan_id or ""})
    if key not in context.selected_asset_check_keys:
        return []
    meta: dict = {
        **verdict.metadata(),
        "example_changes": dg.MetadataValue.md(
            md_table(
                verdict.examples,
                ["direction", "entity", "crm_id", "erp_id", "field", "change"],
                widths={"change": 160},
                total=verdict.values_written,
            )
        ),
    }
    description = verdict.summary()
    if release:
        if released:
            note = f"plan {release} released by the operator: written as held"
        elif verdict.held:
            note = (
                f"plan {release} was not released: the data changed since it was held, and the "
                f"plan is now {verdict.plan_id} (not written)"
            )
            description = f"Plan {release} no longer matches (the data changed since it was "
            description += f"held): nothing was written. The plan now: {verdict.summary()}"
        else:
            note = (
                f"plan {release} is no longer held: the plan is now "
                f"{verdict.plan_id or '(nothing to write)'}, within the limits, written as usual"
            )
        meta["release"] = note
        context.log.info(note)
    return [
        dg.AssetCheckResult(
            asset_key=key.asset_key,
            check_name=key.name,
            passed=not held,
            severity=dg.AssetCheckSeverity.ERROR,
            description=description,
            metadata=meta,
        )
    ]


@dg.asset(
    key=["sync", "push_to_unleashed"],
    group_name="apply",
    kinds={"duckdb"},
    pool="duckdb",
    deps=[sync_plan],
    description="CRM changes written to Unleashed (read–merge–write of the whole record).",
    check_specs=[_writes_check_spec(["sync", "push_to_unleashed"], "Unleashed")],
)
def push_to_unleashed(
    context: dg.AssetExecutionContext,
    unleashed: UnleashedResource,
    duckdb: SyncDuckDB,
    sync_config: SyncConfigResource,
) -> dg.MaterializeResult:
    settings = sync_config.settings()
    mappings = sync_config.mappings()
    with duckdb.get_connection() as con:
        if block := queueing.apply_block(con, mappings, settings, "erp"):
            return _skipped(context, block, sync_config)
        with unleashed.get_client() as client:
            stats = apply.apply_writes(
                con, client, mappings, context.run_id, "erp", retry=settings.retry_failed_writes
            )
    return _apply_result(context, stats, sync_config, "Unleashed")


@dg.asset(
    key=["sync", "pull_to_crm"],
    group_name="apply",
    kinds={"duckdb"},
    pool="duckdb",
    deps=[sync_plan],
    description="Unleashed changes to the CRM; new Unleashed contacts and customers created.",
    check_specs=[_writes_check_spec(["sync", "pull_to_crm"], "the CRM")],
)
def pull_to_crm(
    context: dg.AssetExecutionContext,
    crm: CrmResource,
    duckdb: SyncDuckDB,
    sync_config: SyncConfigResource,
) -> dg.MaterializeResult:
    settings = sync_config.settings()
    mappings = sync_config.mappings()
    updates = settings.two_way_sync
    with duckdb.get_connection() as con:
        if block := queueing.apply_block(con, mappings, settings, "crm"):
            return _skipped(context, block, sync_config)
        with crm.get_client() as client:
            stats = apply.apply_writes(
                con, client, mappings, context.run_id, "crm",
                ops=(*UPDATE_OPS, *CREATE_OPS) if updates else CREATE_OPS,
                retry=settings.retry_failed_writes,
            )  # fmt: skip
    result = _apply_result(context, stats, sync_config, "the CRM")
    if not updates:
        result.metadata["updates_skipped"] = "two-way sync is off in settings"
    return result


def _apply_result(
    context: dg.AssetExecutionContext,
    stats: apply.ApplyStats,
    sync_config: SyncConfigResource,
    target: str,
) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            **stats.metadata(),
            "applied_preview": dg.MetadataValue.md(applied_md(stats.applied_rows)),
            "errors": dg.MetadataValue.md(
                "\n".join(f"- {e}" for e in stats.errors[:20]) or "_none_"
            ),
            **_settings_metadata(sync_config),
        },
        check_results=_writes_check(context, stats, target),
    )


def _skipped(
    context: dg.AssetExecutionContext,
    block: queueing.Block,
    sync_config: SyncConfigResource,
) -> dg.MaterializeResult:
    """An apply asset that wrote nothing on purpose (settings, a tenant guard, a held plan): its
    writes check passes, saying why."""
    why = block.why
    getattr(context.log, block.level)(why)
    return dg.MaterializeResult(
        metadata={"skipped": why, **_settings_metadata(sync_config)},
        check_results=_writes_check(context, None, "", skipped=why),
    )


def _writes_check(
    context: dg.AssetExecutionContext,
    stats: apply.ApplyStats | None,
    target: str,
    *,
    skipped: str | None = None,
) -> list[dg.AssetCheckResult]:
    """The blocking check of an apply asset (when the run selected it): passed unless a planned
    write failed, was refused, or was not tried because the run stopped early."""
    key = dg.AssetCheckKey(context.asset_key, WRITES_CHECK)
    if key not in context.selected_asset_check_keys:
        return []
    if stats is None:
        return [dg.AssetCheckResult(asset_key=key.asset_key, check_name=key.name, passed=True,
                                    metadata={"skipped": skipped or ""})]  # fmt: skip
    missing = stats.unwritten
    meta: dict = {
        "writes_planned": stats.planned,
        "writes_made": stats.applied,
        "writes_failed": stats.failed,
        "writes_not_tried": stats.not_tried,
        "deferred_or_set_aside": stats.deferred + stats.set_aside,
    }
    if not missing:
        return [dg.AssetCheckResult(asset_key=key.asset_key, check_name=key.name, passed=True,
                                    metadata=meta)]  # fmt: skip
    first = stats.failures[0] if stats.failures else None
    summary = (
        f"{missing} of the {stats.planned} writes to {target} this run planned were not made"
        if stats.applied or stats.deferred or stats.set_aside
        else f"None of the {stats.planned} writes to {target} this run planned was made"
    )
    summary += f" ({stats.failed} failed" + (
        f", {stats.not_tried} not tried: {stats.stopped})" if stats.not_tried else ")"
    )
    if first is not None:
        summary += (
            f". First: {first['entity']} {first['crm_id'] or '-'} / {first['erp_id'] or '-'} "
            f"{first['field']}: {first['reason']}; retry: {first['retry']}"
        )
    meta["first_failures"] = dg.MetadataValue.md(
        md_table(
            stats.failures[:FIRST_FAILURES],
            ["entity", "crm_id", "erp_id", "field", "left", "reason", "retry"],
            total=len(stats.failures),
        )
    )
    # The same rows whole, for the run-failure notice (sync_pipeline.alerts).
    meta["failures"] = dg.MetadataValue.json(stats.failures[:FIRST_FAILURES])
    if stats.stopped:
        meta["stopped_early"] = stats.stopped
    context.log.error(summary)
    _tag_run(context, target, f"{missing} of {stats.planned} not written")
    return [
        dg.AssetCheckResult(
            asset_key=key.asset_key,
            check_name=key.name,
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=summary,
            metadata=meta,
        )
    ]


def _tag_run(context: dg.AssetExecutionContext, target: str, text: str) -> None:
    """Say it on the run too: the runs list shows a run's tags next to its (failed) status."""
    name = "sync/writes-not-made-" + ("unleashed" if target == "Unleashed" else "crm")
    context.instance.add_run_tags(context.run_id, {name: text})


@dg.asset(
    key=["crm", "account_manager_candidates"],
    group_name="plan",
    kinds={"duckdb"},
    pool="duckdb",
    deps=[*CRM_EXTRACTS, unleashed_salespersons],
    description="CRM users who may be account managers (they match an active salesperson).",
)
def account_manager_candidates(duckdb: SyncDuckDB) -> dg.MaterializeResult:
    with duckdb.get_connection() as con:
        frame = account_managers.candidates(con)
    usable = frame[frame["salesperson_guid"].notna()]
    return dg.MaterializeResult(
        metadata={
            "users": len(frame),
            "usable_as_account_manager": len(usable),
            "preview": dg.MetadataValue.md(
                md_table(frame.to_dict("records"), ["user_code", "name", "email", "salesperson"])
            ),
        }
    )


@dg.asset(
    key=["sync", "account_manager_fix"],
    group_name="apply",
    kinds={"duckdb"},
    pool="duckdb",
    deps=[sync_links, unleashed_salespersons],
    description="Overnight: each linked CRM company's account manager set from Unleashed.",
    check_specs=[_writes_check_spec(["sync", "account_manager_fix"], "the CRM")],
)
def account_manager_fix(
    context: dg.AssetExecutionContext,
    crm: CrmResource,
    duckdb: SyncDuckDB,
    sync_config: SyncConfigResource,
) -> dg.MaterializeResult:
    settings = sync_config.settings()
    if not settings.overnight_account_manager_fix:
        why = "The overnight account-manager fix is off in settings."
        return _skipped(context, queueing.Block(why), sync_config)
    mappings = sync_config.mappings()
    with crm.get_client() as client:
        refusal = two_way_refusal(client)
    with duckdb.get_connection() as con:
        refusal = refusal or preflight.write_block(con, mappings) or queueing.held(con)
        if refusal:
            return _skipped(context, queueing.Block(refusal, "error"), sync_config)
        fixes = account_managers.plan_fix(con, mappings)
        todo = fixes[fixes["op"] == "update_crm"]
        if settings.shadow_mode:
            result = _skipped(context, queueing.Block(queueing.SHADOW_SKIP), sync_config)
            result.metadata.update(shadow.metadata(shadow.writes(todo)))
            return result
        if len(todo):
            store.enqueue(con, todo, context.run_id)
        with crm.get_client() as client:
            stats = apply.apply_writes(
                con, client, mappings, context.run_id, "crm", ops=("update_crm",),
                retry=settings.retry_failed_writes,
            )  # fmt: skip
    result = _apply_result(context, stats, sync_config, "the CRM")
    result.metadata["companies_corrected"] = int(len(todo))
    result.metadata["rejected"] = dg.MetadataValue.md(rejections_md(fixes))
    return result


@dg.asset(
    key=["sync", "sync_history"],
    group_name="maintenance",
    kinds={"duckdb"},
    pool="duckdb",
    description="Finished history older than keep_history_days deleted (audit and conflict logs, "
    "applied operations, resolved rejections and bad records); what a run still acts on is kept.",
)
def sync_history(
    context: dg.AssetExecutionContext, duckdb: SyncDuckDB, sync_config: SyncConfigResource
) -> dg.MaterializeResult:
    days = sync_config.settings().keep_history_days
    with duckdb.get_connection() as con:
        result = store.prune_history(con, days)
    if result.cutoff is None:
        context.log.info("keep_history_days is 0 in the settings: all history is kept.")
    else:
        context.log.info(
            "Deleted history older than %s (%d days): %s",
            f"{result.cutoff:%Y-%m-%d %H:%M} UTC",
            days,
            ", ".join(f"{t} {n:,}" for t, n in result.deleted.items()),
        )
    rows = [
        {"table": t, "deleted": f"{result.deleted[t]:,}", "kept": f"{result.kept[t]:,}"}
        for t in result.kept
    ]
    return dg.MaterializeResult(
        metadata={
            "cutoff": "none (keep_history_days: 0)"
            if result.cutoff is None
            else f"{result.cutoff:%Y-%m-%d %H:%M} UTC",
            "rows_deleted": sum(result.deleted.values()),
            "tables": dg.MetadataValue.md(md_table(rows, ["table", "deleted", "kept"])),
            **_settings_metadata(sync_config),
        }
    )


SYNC_ASSETS = [
    sync_links,
    sync_plan,
    push_to_unleashed,
    pull_to_crm,
    account_manager_candidates,
    account_manager_fix,
    sync_history,
]
