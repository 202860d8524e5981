"""The shape of the code location, held against a reviewed snapshot: every asset (group, kinds,
dependencies, partitions), asset check (blocking or not), job (assets, checks, tags), schedule
(cron, time zone, job) and sensor (interval, jobs). A rename, a dropped check or a job that
quietly stops selecting an asset shows up here as a diff, before an operator finds it in the UI.

After an intended change, regenerate the snapshot and review its diff with the code:

    UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_definitions_snapshot.py
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import dagster as dg

from sync_pipeline.definitions import defs

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.txt"


def _key(key: dg.AssetKey) -> str:
    return key.to_user_string()


def _check(check: dg.AssetCheckKey) -> str:
    return f"{_key(check.asset_key)}:{check.name}"


def render(definitions: dg.Definitions) -> str:
    graph = definitions.resolve_asset_graph()
    lines = ["# assets: key | group | kinds | partitions | upstream"]
    for key in sorted(graph.get_all_asset_keys(), key=_key):
        node = graph.get(key)
        partitions = type(node.partitions_def).__name__ if node.partitions_def else "-"
        upstream = ", ".join(sorted(_key(p) for p in node.parent_keys)) or "-"
        kinds = ", ".join(sorted(node.kinds)) or "-"
        lines.append(f"{_key(key)} | {node.group_name} | {kinds} | {partitions} | {upstream}")

    lines.append("\n# asset checks: asset:check | blocking")
    for check in sorted(graph.asset_check_keys, key=_check):
        spec = graph.get_check_spec(check)
        lines.append(f"{_check(check)} | {'blocking' if spec.blocking else 'not blocking'}")

    lines.append("\n# jobs: name | tags | partitioned | executor\n#   assets\n#   checks")
    for job in sorted(definitions.resolve_all_job_defs(), key=lambda j: j.name):
        if job.name.startswith("__"):
            continue  # Dagster's implicit job of all assets
        tags = ", ".join(f"{k}={v}" for k, v in sorted(job.tags.items())) or "-"
        partitioned = "partitioned" if job.partitions_def is not None else "unpartitioned"
        lines.append(f"{job.name} | {tags} | {partitioned} | {job.executor_def.name}")
        assets = sorted(_key(k) for k in job.asset_layer.executable_asset_keys)
        checks = sorted(_check(c) for c in job.asset_layer.asset_graph.asset_check_keys)
        lines.append("  assets: " + (", ".join(assets) or "-"))
        lines.append("  checks: " + (", ".join(checks) or "-"))

    lines.append("\n# schedules: name | cron | time zone | job | default status")
    for schedule in sorted(definitions.schedules or [], key=lambda s: s.name):
        cron = schedule.cron_schedule
        cron = " ; ".join(cron) if isinstance(cron, list | tuple) else cron
        lines.append(
            f"{schedule.name} | {cron} | {schedule.execution_timezone} | {schedule.job_name} | "
            f"{schedule.default_status.value}"
        )

    lines.append("\n# sensors: name | minimum interval s | jobs | default status")
    for sensor in sorted(definitions.sensors or [], key=lambda s: s.name):
        jobs = ", ".join(sorted(t.job_name for t in sensor.targets)) if sensor.has_jobs else "-"
        lines.append(
            f"{sensor.name} | {sensor.minimum_interval_seconds} | {jobs} | "
            f"{sensor.default_status.value}"
        )
    return "\n".join(lines) + "\n"


def test_the_definitions_match_the_reviewed_snapshot():
    current = render(defs)
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(current)
    expected = SNAPSHOT.read_text() if SNAPSHOT.exists() else ""
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            current.splitlines(keepends=True),
            fromfile=str(SNAPSHOT.relative_to(Path(__file__).parent.parent)),
            tofile="the code location now",
        )
    )
    assert not diff, (
        "The code location's definitions differ from the reviewed snapshot. If the change is "
        "intended, run `UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest "
        f"tests/test_definitions_snapshot.py` and commit the snapshot with it.\n{diff}"
    )


def test_the_snapshot_notices_a_dropped_check_and_a_job_that_loses_an_asset():
    """The rendering sees the changes this test exists for, so the snapshot test can fail."""
    push = defs.resolve_job_def("crm_push_job")
    kept = [k for k in push.asset_layer.executable_asset_keys if _key(k) != "sync/sync_links"]
    trimmed = dg.Definitions(
        assets=list(defs.assets or []),
        jobs=[dg.define_asset_job("crm_push_job", selection=kept)],
        resources=defs.resources,
    )
    push_assets = render(trimmed).split("crm_push_job |", 1)[1].splitlines()[1]
    assert "sync/sync_plan" in push_assets and "sync/sync_links" not in push_assets

    @dg.asset
    def thing() -> None: ...

    @dg.asset_check(asset=thing, blocking=True)
    def thing_is_fine() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=True)

    with_check = render(dg.Definitions(assets=[thing], asset_checks=[thing_is_fine]))
    without = render(dg.Definitions(assets=[thing]))
    assert "thing:thing_is_fine | blocking" in with_check
    assert "thing_is_fine" not in without
