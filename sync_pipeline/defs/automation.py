"""Jobs, the CRM change sensor and the schedules.

The schedules are cron schedules built from the settings file when the code location loads
(`build_schedules`), so the Dagster UI shows when they really run; a change to those times takes
effect once the code location is reloaded. Everything else is read again at every tick: the
on/off options and the usage-limit pause, so an operator's change to those takes effect on the
next tick, and a tick that does nothing says why. While Unleashed's monthly usage limit is used
up, the ticks that would call Unleashed skip, saying until when, and the daytime import probes
once an hour whether it was raised."""

import json
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any

import dagster as dg
from filelock import Timeout

from sync_pipeline import pause, store
from sync_pipeline.changes import latest_modified
from sync_pipeline.clients.base import ApiError
from sync_pipeline.clients.crm import format_timestamp, parse_timestamp
from sync_pipeline.defs.extract import (
    CRM_EXTRACTS,
    IMPORT_PARTITIONS,
    UNLEASHED_EXTRACTS,
    crm_companies,
    crm_contacts,
)
from sync_pipeline.defs.preflight import preflight_job, sync_preflight
from sync_pipeline.defs.resources import (
    CrmResource,
    SyncConfigResource,
    SyncDuckDB,
    UnleashedResource,
)
from sync_pipeline.defs.sync import (
    BRAKE_CHECK,
    WRITES_CHECK,
    account_manager_candidates,
    account_manager_fix,
    pull_to_crm,
    push_to_unleashed,
    sync_history,
    sync_links,
    sync_plan,
)
from sync_pipeline.defs.undo import undo_run_job
from sync_pipeline.guards import two_way_refusal
from sync_pipeline.pause import hour_partition, usage_limit_pause
from sync_pipeline.settings import WEEKDAYS, Settings
from sync_pipeline.timetable import daily_cron, import_crons, import_times, is_due

GUARD_RECHECK = timedelta(minutes=10)
WATCHED_SETS = ("Divisions", "Contacts")


def _crm_read_job(name: str, apply_asset, description: str, direction: str):
    """A job that reads the CRM afresh, links, plans and runs one apply step, with only that
    step's check that fails the run when a planned write was not made, and the plan's
    mass-change brake. Users and sales ledgers (new links, account-manager lookups) and the
    other checks come with the cycle.

    In process: the steps share the one-slot `duckdb` pool, so they run one after another
    anyway, and a subprocess per step (the default executor) costs seconds each, which is most
    of a push."""
    return dg.define_asset_job(
        name,
        selection=dg.AssetSelection.assets(
            sync_preflight, crm_companies, crm_contacts, sync_links, sync_plan, apply_asset
        ).without_checks()
        | dg.AssetSelection.checks(
            dg.AssetCheckKey(apply_asset.key, WRITES_CHECK),
            dg.AssetCheckKey(sync_plan.key, BRAKE_CHECK),
        ),
        description=description,
        tags={"sync/direction": direction},
        executor_def=dg.in_process_executor,
    )


crm_push_job = _crm_read_job(
    "crm_push_job",
    push_to_unleashed,
    "CRM changes to Unleashed, launched by the CRM change sensor within seconds, "
    "and by the retry sensor when failed writes to Unleashed are due again.",
    "push",
)

# Failed writes to the CRM tried again between imports: the CRM read afresh and planned again
# (so a change the plan no longer wants is dropped) from the Unleashed snapshot as the last
# import left it; no Unleashed request, so it runs outside the import window and while the
# Unleashed usage limit is used up.
crm_write_retry_job = _crm_read_job(
    "crm_write_retry_job",
    pull_to_crm,
    "Failed writes to the CRM (updates and creations) tried again once due, "
    "launched by the retry sensor at any hour; imports nothing from Unleashed.",
    "pull",
)

_cycle = dg.AssetSelection.assets(
    sync_preflight, *CRM_EXTRACTS, *UNLEASHED_EXTRACTS, sync_links, sync_plan, pull_to_crm,
    push_to_unleashed, account_manager_candidates,
)  # fmt: skip

sync_cycle_job = dg.define_asset_job(
    "sync_cycle_job",
    selection=_cycle,
    partitions_def=IMPORT_PARTITIONS,
    description="One import window from Unleashed, then plan and apply both ways.",
    tags={"sync/direction": "both"},
)

full_resync_job = dg.define_asset_job(
    "full_resync_job",
    selection=_cycle,
    partitions_def=IMPORT_PARTITIONS,
    description="Re-read both systems in full (no cursors), then plan and apply both ways.",
    config={
        "ops": {
            name: {"config": {"full_refresh": True}}
            for name in (
                "crm__crm_companies",
                "crm__crm_contacts",
                "crm__crm_users",
                "unleashed_customers",
            )
        }
    },  # fmt: skip
    tags={"sync/direction": "both", "sync/full": "true"},
)

account_manager_fix_job = dg.define_asset_job(
    "account_manager_fix_job",
    selection=dg.AssetSelection.assets(
        sync_preflight, *CRM_EXTRACTS, *UNLEASHED_EXTRACTS, sync_links, account_manager_fix
    ),
    partitions_def=IMPORT_PARTITIONS,
    description="Nightly: CRM account managers set to the Unleashed salespersons.",
)

# The operator's release of a plan the mass-change brake held: the CRM read again, the plan made
# again (from the Unleashed snapshot the held run imported), and written both ways if it is still
# the plan released (`release_plan_id`, from the brake check); if the data changed since, nothing
# is written and the check names the plan as it is now.
_RELEASE_ASSETS = (
    sync_preflight, crm_companies, crm_contacts, sync_links, sync_plan, push_to_unleashed,
    pull_to_crm,
)  # fmt: skip
mass_change_release_job = dg.define_asset_job(
    "mass_change_release_job",
    selection=dg.AssetSelection.assets(*_RELEASE_ASSETS).without_checks()
    | dg.AssetSelection.checks(
        dg.AssetCheckKey(sync_plan.key, BRAKE_CHECK),
        dg.AssetCheckKey(push_to_unleashed.key, WRITES_CHECK),
        dg.AssetCheckKey(pull_to_crm.key, WRITES_CHECK),
    ),
    description="Release a plan the mass-change brake held: launch it with the plan id from "
    "the sync/sync_plan check mass_change_brake (ops: sync__sync_plan: config: "
    "release_plan_id). Writes that plan both ways if planning again gives the same plan; else "
    "writes nothing and names the plan as it is now.",
    tags={"sync/direction": "both", "sync/trigger": "mass-change-release"},
    executor_def=dg.in_process_executor,
)

history_pruning_job = dg.define_asset_job(
    "history_pruning_job",
    selection=dg.AssetSelection.assets(sync_history),
    description="Nightly: finished history older than keep_history_days deleted.",
    tags={"sync/trigger": "history-pruning"},
)

JOBS = [
    crm_push_job,
    mass_change_release_job,
    undo_run_job,
    crm_write_retry_job,
    sync_cycle_job,
    full_resync_job,
    account_manager_fix_job,
    history_pruning_job,
    preflight_job,
]


@dg.sensor(
    job=crm_push_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls the CRM for companies and contacts changed since the cursor; then a push.",
)
def crm_change_sensor(
    context: dg.SensorEvaluationContext,
    crm: CrmResource,
    unleashed: UnleashedResource,
    sync_config: SyncConfigResource,
):
    settings = sync_config.settings()
    if not settings.two_way_sync:
        return dg.SkipReason(
            "Two-way sync is off in the settings (two_way_sync: false): CRM changes are not "
            "pushed to Unleashed. The daytime import of new Unleashed records continues."
        )
    block = unleashed.usage_block()
    if block is not None:
        # The cursor stays where it is, so the changes made meanwhile are pushed afterwards.
        return dg.SkipReason(
            usage_limit_pause(
                block,
                settings,
                "CRM changes are not pushed meanwhile; they wait in the CRM. The sensor resumes "
                "on its own at the reset, or as soon as an Unleashed request succeeds again "
                "(the daytime import probes once an hour, so a raised limit is noticed), and "
                "then pushes every change made meanwhile.",
            )
        )
    cursor = json.loads(context.cursor) if context.cursor else {}
    now = datetime.now(UTC)
    with crm.get_client() as client:
        checked = cursor.get("guard_checked_at")
        if not checked or now - datetime.fromisoformat(checked) > GUARD_RECHECK:
            cursor["refusal"] = two_way_refusal(client)
            cursor["guard_checked_at"] = now.isoformat()
        if cursor.get("refusal"):
            context.update_cursor(json.dumps(cursor))
            return dg.SkipReason(cursor["refusal"])
        latest = {}
        try:
            for entity_set in WATCHED_SETS:
                since = cursor.get(entity_set)
                latest[entity_set] = latest_modified(
                    client, entity_set, parse_timestamp(since) if since else None
                )
        except ApiError as exc:
            return dg.SkipReason(f"Could not poll the CRM this tick: {exc}")
    changed = {k: v for k, v in latest.items() if v is not None}
    if not changed:
        context.update_cursor(json.dumps(cursor))
        return dg.SkipReason("No CRM company or contact changed since the last push.")
    for entity_set, when in changed.items():
        cursor[entity_set] = format_timestamp(when)
    run_key = "crm-push:" + ",".join(f"{k}={cursor.get(k)}" for k in WATCHED_SETS)
    context.update_cursor(json.dumps(cursor))
    return dg.RunRequest(
        run_key=run_key,
        tags={"sync/trigger": "crm-change", **{f"sync/{k}": cursor[k] for k in changed}},
    )


def _import_window(settings: Settings) -> str:
    w = settings.imports
    return (
        f"{','.join(w.days)} {w.start:%H:%M}-{w.end:%H:%M} every {w.every_minutes} min, "
        f"{settings.timezone}"
    )


def _reload_note(loaded: str, now: str) -> str:
    """What a tick adds when the settings file's times are no longer those the schedule was
    built from: they take effect only once the code location is reloaded."""
    if loaded == now:
        return ""
    return (
        f" The settings file's times changed since the code location loaded (this schedule "
        f"still runs at {loaded}): reload the code location for the schedule to follow them."
    )


def _import_schedule(loaded: Settings) -> dg.ScheduleDefinition:
    crons = import_crons(loaded.imports)

    @dg.schedule(
        name="daytime_import_schedule",
        job=sync_cycle_job,
        cron_schedule=crons[0] if len(crons) == 1 else crons,
        execution_timezone=loaded.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Daytime imports from Unleashed: {_import_window(loaded)} (the imports "
        "settings when the code location loaded; reload it after changing them). The usage-limit "
        "pause is decided at each tick.",
    )
    def daytime_import_schedule(
        context: dg.ScheduleEvaluationContext,
        sync_config: SyncConfigResource,
        unleashed: UnleashedResource,
    ):
        settings = sync_config.settings()
        when = context.scheduled_execution_time or datetime.now(UTC)
        local = when.astimezone(settings.zone)
        if not is_due(import_times(settings.imports), settings.imports.days, settings.zone, when):
            return dg.SkipReason(
                f"Outside the import window ({_import_window(settings)}); local time "
                f"{local:%a %H:%M}."
                + _reload_note(_import_window(loaded), _import_window(settings))
            )
        return _import_or_probe(context, settings, unleashed, when)

    return daytime_import_schedule


def _import_or_probe(
    context: dg.ScheduleEvaluationContext,
    settings: Settings,
    unleashed: UnleashedResource,
    when: datetime,
) -> dg.RunRequest | dg.SkipReason:
    """An import tick: the import, or while the usage limit is used up a skip or a probe."""
    block = unleashed.usage_block(when)
    if block is None:
        return dg.RunRequest(
            run_key=f"import:{when.astimezone(UTC):%Y-%m-%dT%H:%M}",
            partition_key=hour_partition(when),
            tags={"sync/trigger": "daytime-import"},
        )
    if not block.probe_due(when):
        return dg.SkipReason(pause.not_yet(settings, block, when))
    # The probe is the normal import. While one waits in the run queue the ticks launch no
    # other (a schedule's run key only dedupes within one tick, so the run is looked up), and if
    # it ends without reaching Unleashed (say the CRM was down), another comes an hour later.
    # Nothing is written here, so previewing the tick changes nothing.
    probe = pause.Probe(block, when)
    launched = context.instance.get_runs(
        dg.RunsFilter(tags={pause.PROBE_KEY_TAG: probe.key}), limit=1
    )
    if launched:
        return dg.SkipReason(probe.still_waiting(settings, launched[0].run_id))
    return dg.RunRequest(run_key=probe.key, partition_key=hour_partition(when), tags=probe.tags())


def _nightly_schedule(
    loaded: Settings,
    job: Any,
    name: str,
    what: str,
    off: Callable[[Settings], str | None],
    at: Callable[[Settings], time],
    request: Callable[[datetime, datetime], dg.RunRequest],
    while_usage_limited: str | None = None,
) -> dg.ScheduleDefinition:
    """A nightly schedule: it runs once a day at its set local time (`at`, read from `loaded`,
    the settings when the code location loaded), unless the settings switch it off (`off` says
    why). `request(when, local)` is the run to launch. A job that calls Unleashed passes
    `while_usage_limited` (what happens to it while the account's monthly usage limit is used
    up): it is then skipped, saying so."""

    def run_at(settings: Settings) -> str:
        return f"{at(settings):%H:%M} {settings.timezone}"

    def evaluate(
        context: dg.ScheduleEvaluationContext,
        settings: Settings,
        unleashed: UnleashedResource | None,
    ) -> dg.RunRequest | dg.SkipReason:
        why = off(settings)
        if why:
            return dg.SkipReason(why)
        when = context.scheduled_execution_time or datetime.now(UTC)
        local = when.astimezone(settings.zone)
        if not is_due([at(settings)], WEEKDAYS, settings.zone, when):
            return dg.SkipReason(
                f"Runs at {run_at(settings)}; now {local:%H:%M}."
                + _reload_note(run_at(loaded), run_at(settings))
            )
        block = unleashed.usage_block(when) if unleashed is not None else None
        if block is not None and while_usage_limited:
            return dg.SkipReason(usage_limit_pause(block, settings, while_usage_limited))
        return request(when, local)

    spec: dict[str, Any] = dict(
        name=name,
        job=job,
        cron_schedule=daily_cron(at(loaded)),
        execution_timezone=loaded.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"{what} at {run_at(loaded)} (the settings when the code location loaded; "
        "reload it after changing the time). Whether it runs is decided at each tick.",
    )
    # Only a schedule whose job calls Unleashed asks for the Unleashed resource.
    if while_usage_limited:

        @dg.schedule(**spec)
        def _limited(
            context: dg.ScheduleEvaluationContext,
            sync_config: SyncConfigResource,
            unleashed: UnleashedResource,
        ):
            return evaluate(context, sync_config.settings(), unleashed)

        return _limited

    @dg.schedule(**spec)
    def _schedule(context: dg.ScheduleEvaluationContext, sync_config: SyncConfigResource):
        return evaluate(context, sync_config.settings(), None)

    return _schedule


def build_schedules(settings: Settings) -> list[dg.ScheduleDefinition]:
    """The three schedules, their cron strings and time zone from `settings`."""
    overnight_fix = _nightly_schedule(
        settings,
        account_manager_fix_job,
        "overnight_account_manager_fix_schedule",
        "Overnight account-manager fix",
        off=lambda s: (
            None
            if s.overnight_account_manager_fix
            else "The overnight account-manager fix is off in the settings "
            "(overnight_account_manager_fix: false)."
        ),
        at=lambda s: s.overnight_fix_at,
        request=lambda when, local: dg.RunRequest(
            run_key=f"account-manager-fix:{local:%Y-%m-%d}",
            partition_key=hour_partition(when),
            tags={"sync/trigger": "overnight-fix"},
        ),
        while_usage_limited="The overnight account-manager fix is skipped tonight; it runs again "
        "on the first night after the limit resets or is raised.",
    )
    history_pruning = _nightly_schedule(
        settings,
        history_pruning_job,
        "history_pruning_schedule",
        "Nightly pruning of finished history",
        off=lambda s: (
            "All history is kept (keep_history_days: 0 in the settings)."
            if s.keep_history_days == 0
            else None
        ),
        at=lambda s: s.history_pruning_at,
        request=lambda when, local: dg.RunRequest(run_key=f"history-pruning:{local:%Y-%m-%d}"),
    )
    return [_import_schedule(settings), overnight_fix, history_pruning]


# What each retry run writes, its job, and the jobs that also try those writes (a run of any of
# them queued or in progress makes a retry run pointless until it has finished).
RETRIES = {
    "Unleashed": (("update_erp",), crm_push_job, ("crm_push_job", "sync_cycle_job",
                                                  "full_resync_job")),
    "the CRM": (("update_crm", "create_crm_contact", "create_crm_company"), crm_write_retry_job,
                ("crm_write_retry_job", "sync_cycle_job", "full_resync_job",
                 "unleashed_webhook_job")),
}  # fmt: skip
RETRY_TRIGGER = "failed-write-retry"
# How long a tick waits for the database when a run holds it: a run holds it for seconds to
# minutes, and the next tick looks again.
RETRY_LOCK_WAIT_S = 2.0
UNFINISHED_RUNS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


@dg.sensor(
    jobs=[crm_push_job, crm_write_retry_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Failed writes retried on their own (settings: retry_failed_writes): when an "
    "operation's retry time in the outbox has come, a push (writes to Unleashed) or a CRM "
    "write retry run; at any hour, not while a run that would try them is queued or running.",
)
def failed_write_retry_sensor(
    context: dg.SensorEvaluationContext,
    duckdb: SyncDuckDB,
    unleashed: UnleashedResource,
    sync_config: SyncConfigResource,
):
    settings = sync_config.settings()
    retry = settings.retry_failed_writes
    if not retry.enabled:
        return dg.SkipReason(
            "Automatic retries are off (retry_failed_writes.enabled: false): failed writes wait "
            "for the next planned run."
        )
    busy = {
        target: [
            run.run_id
            for name in jobs
            for run in context.instance.get_runs(
                dg.RunsFilter(job_name=name, statuses=UNFINISHED_RUNS), limit=1
            )
        ]
        for target, (_, _, jobs) in RETRIES.items()
    }
    if all(busy.values()):
        return dg.SkipReason("Runs that try the failed writes are queued or in progress.")
    try:
        with store.connect(duckdb.database, lock_timeout=RETRY_LOCK_WAIT_S) as con:
            due = {target: store.due_retries(con, ops) for target, (ops, _, _) in RETRIES.items()}
    except Timeout:
        return dg.SkipReason("A run holds the database; the next tick looks again.")
    requests, notes = [], []
    for target, (_, job, _) in RETRIES.items():
        found = due[target]
        if not found.count:
            if found.next_at is not None:
                notes.append(f"writes to {target}: the next retry is due at "
                             f"{found.next_at:%Y-%m-%d %H:%M:%S} UTC")  # fmt: skip
            continue
        if any(busy[target]):
            notes.append(f"{found.count} writes to {target} are due; a run that tries them is "
                         "queued or in progress")  # fmt: skip
            continue
        if target == "Unleashed":
            if not settings.two_way_sync:
                notes.append(f"{found.count} writes to Unleashed are due; two-way sync is off")
                continue
            block = unleashed.usage_block()
            if block is not None:
                notes.append(usage_limit_pause(block, settings, "Retries to Unleashed wait."))
                continue
        requests.append(
            dg.RunRequest(
                job_name=job.name,
                # The same due operations, untouched by any run since, are one request: a run
                # that could not try them (its plan step failed) is not launched over and over.
                run_key=f"write-retry:{job.name}:{found.marker}",
                tags={"sync/trigger": RETRY_TRIGGER, "sync/retry-writes-due": str(found.count)},
            )
        )
    if requests:
        return requests
    return dg.SkipReason(
        "No failed write is due for a retry" + (": " + "; ".join(notes) + "." if notes else ".")
    )


SENSORS = [crm_change_sensor, failed_write_retry_sensor]
