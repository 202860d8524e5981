"""How long a change takes to cross under `dagster dev`, both ways: a CRM edit to Unleashed
(issue: "CRM changes reach Unleashed within seconds"; target p95 <= 15 s), and an Unleashed edit
to the CRM with webhooks on; and how many Unleashed requests each change pulled to the CRM costs
with webhooks and with the import alone.

How it works:

1. The local servers start in a child process (50 companies, state in a temp folder, the CRM's
   real rate limit on).
2. One full sync cycle runs in process against a temp DuckDB file, so the links exist.
3. `dagster dev` starts on free ports with a temp DAGSTER_HOME holding the `dagster.yaml` that
   `sync-devservers dev` writes (`concurrency: pools: default_limit: 1`, the run queue checked every
   second, telemetry off), pointed at the servers, the DuckDB file and a temp settings file; the
   CRM change sensor and the schedules start RUNNING by default.
4. A warm-up edit waits until the whole chain works (code location loaded, sensor ticking).
5. 20 edits to CRM companies' phone numbers go through the CRM API a few seconds apart; a
   poller reads each customer from the Unleashed API until the new number is there (90 s
   timeout per edit). Edits and polling overlap, as they would with people typing. The first
   edits the warm-up's company again, as a person correcting what they have just saved (no
   import comes in between: the push alone must carry it); the others are different companies.
6. The push runs are read back from Dagster's GraphQL API to split each edit's latency into:
   sensor detection (edit -> run created), queueing (created -> started), run start-up (started ->
   first step) and the steps themselves.
7. Webhooks on: the receiver (`sync-pipeline webhooks serve`) starts in a child process and is
   subscribed on the local Unleashed server, which then delivers signed events. After a warm-up,
   the same number of edits are made to Unleashed customers' phone numbers as a person makes
   them in Unleashed (the server's `/_admin` force-edit: no API request), a few seconds apart; a
   poller reads each CRM company outside the API (`GET /_admin/raw`, so it spends none of the
   CRM's rate limit) until the number is there. Unleashed requests are counted by the server.
8. Without webhooks: after `dagster dev` stops, the same number of Unleashed edits again, then
   one import (`sync_cycle_job`, in process), counting its Unleashed requests; and one more
   import with nothing changed (what every scheduled import costs).

    python benchmarks/bench_latency.py [--edits 20] [--spacing-s 3] [--companies 50]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import ROOT, ServerProcess, free_port, percentile, wait_until  # noqa: E402

from devservers.demo import DEV_DAGSTER_YAML  # noqa: E402  (what `sync-devservers dev` writes)

TARGET_P95_S = 15.0
RUNS_QUERY = """
query Runs($job: String!) {
  runsOrError(filter: {pipelineName: $job}, limit: 200) {
    ... on Runs {
      results {
        runId status creationTime startTime endTime
        stepStats { stepKey startTime endTime }
      }
    }
  }
}
"""


def initial_cycle(servers: ServerProcess, db: Path, settings_file: Path) -> float:
    """One full cycle in process (links, baseline), as `sync-devservers demo` runs it."""
    import dagster as dg

    from sync_pipeline.defs import build_defs
    from sync_pipeline.defs.resources import (
        DEFAULT_MAPPINGS,
        CrmResource,
        SyncConfigResource,
        SyncDuckDB,
        UnleashedResource,
    )

    defs = build_defs(
        {
            "crm": CrmResource(base_url=servers.crm_url, token=servers.crm_token),
            "unleashed": UnleashedResource(
                base_url=servers.unleashed_url,
                api_id=servers.unleashed_api_id,
                api_key=servers.unleashed_api_key,
            ),
            "duckdb": SyncDuckDB(database=str(db)),
            "sync_config": SyncConfigResource(
                settings_file=str(settings_file), mappings_dir=DEFAULT_MAPPINGS
            ),
        }  # fmt: skip
    )
    t0 = time.perf_counter()
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("sync_cycle_job").execute_in_process(
            instance=instance,
            partition_key=datetime.now(UTC).strftime("%Y-%m-%d-%H:00"),
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
    if not result.success:
        raise RuntimeError("the initial cycle failed")
    return time.perf_counter() - t0


def linked_companies(db: Path, n: int) -> list[tuple[int, str]]:
    from sync_pipeline import store

    with store.connect(db) as con:
        rows = con.execute(
            """SELECT l.crm_id, l.erp_id FROM company_links l
               JOIN unleashed_customers u ON u.id = l.erp_id AND u.active
               JOIN crm_companies c ON c.id = l.crm_id AND c.active
               ORDER BY CAST(l.crm_id AS INTEGER) LIMIT ?""",
            [n],
        ).fetchall()
    return [(int(c), e) for c, e in rows]


class DagsterDev:
    """`dagster dev` in its own session (it spawns the webserver, the daemon and code servers),
    so the whole group can be stopped."""

    def __init__(self, env: dict[str, str], home: Path, log: Path) -> None:
        self.port = free_port()
        self.env = env
        self.home = home
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> DagsterDev:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(DEV_DAGSTER_YAML)
        cmd = [
            sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml",
            "-h", "127.0.0.1", "-p", str(self.port),
        ]  # fmt: skip
        self._log = self.log.open("w")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            # The group may outlive its leader for a moment (code servers, run workers).
            if wait_until(lambda: not _group_alive(self.proc.pid), 5, 0.2):
                break
        self._log.close()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        import httpx

        response = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=20
        )
        response.raise_for_status()
        return response.json()["data"]

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/server_info", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Watcher:
    """Polls Unleashed for every pending edit until its value arrives or times out."""

    def __init__(self, servers: ServerProcess, timeout_s: float) -> None:
        from sync_pipeline.clients.unleashed import UnleashedClient

        self.client = UnleashedClient(
            servers.unleashed_url, servers.unleashed_api_id, servers.unleashed_api_key
        )
        self.timeout_s = timeout_s
        # erp_id -> (expected E.164, t_edit, timeout)
        self.pending: dict[str, tuple[str, float, float]] = {}
        self.arrived: dict[str, float] = {}  # erp_id -> seconds
        self.timed_out: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="watcher")

    def expect(
        self, erp_id: str, phone: str, t_edit: float, timeout_s: float | None = None
    ) -> None:
        from sync_pipeline.mapping.normalise import normalise_phone

        with self.lock:
            self.pending[erp_id] = (normalise_phone(phone), t_edit, timeout_s or self.timeout_s)

    def _run(self) -> None:
        from sync_pipeline.mapping.normalise import normalise_phone

        while not self.stop.wait(0.2):
            with self.lock:
                items = list(self.pending.items())
            for erp_id, (want, t_edit, timeout_s) in items:
                now = time.monotonic()
                got = normalise_phone(self.client.get_customer(erp_id).PhoneNumber)
                with self.lock:
                    if got == want:
                        self.arrived[erp_id] = now - t_edit
                        del self.pending[erp_id]
                    elif now - t_edit > timeout_s:
                        self.timed_out.append(erp_id)
                        del self.pending[erp_id]

    def wait_idle(self, timeout_s: float) -> bool:
        return wait_until(lambda: not self.pending, timeout_s, 0.2)

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.client.close()


def run_breakdown(dev: DagsterDev, edits: list[tuple[str, float, float]]) -> dict[str, Any]:
    """Per edit: which push run delivered it and where the time went (all in seconds).

    `edits` holds (erp_id, wall-clock time of the edit, latency). The delivering run is taken to be
    the first run created after the edit (its extract started after the edit, so it saw it)."""
    runs = dev.graphql(RUNS_QUERY, {"job": "crm_push_job"})["runsOrError"]["results"]
    runs = [r for r in runs if r["startTime"] and r["endTime"]]
    runs.sort(key=lambda r: r["creationTime"])
    parts: dict[str, list[float]] = {"detect": [], "queue": [], "startup": [], "steps": []}
    for _erp, t_edit, _lat in edits:
        run = next((r for r in runs if r["creationTime"] >= t_edit), None)
        if run is None:
            continue
        first_step = min((s["startTime"] for s in run["stepStats"] if s["startTime"]), default=None)
        parts["detect"].append(run["creationTime"] - t_edit)
        parts["queue"].append(run["startTime"] - run["creationTime"])
        if first_step:
            parts["startup"].append(first_step - run["startTime"])
            parts["steps"].append(run["endTime"] - first_step)
    steps: dict[str, list[float]] = {}
    for r in runs:
        for s in r["stepStats"]:
            if s["startTime"] and s["endTime"]:
                steps.setdefault(s["stepKey"], []).append(s["endTime"] - s["startTime"])
    durations = [r["endTime"] - r["startTime"] for r in runs]
    return {"parts": parts, "steps": steps, "runs": len(runs), "run_durations": durations}


class CrmWatcher:
    """Polls CRM companies outside the API (the local server's `GET /_admin/raw`, which spends
    none of the CRM's rate limit) until each pending edit's phone number is there."""

    def __init__(self, servers: ServerProcess, timeout_s: float) -> None:
        import httpx

        self.http = httpx.Client(base_url=servers.crm_url, timeout=10)
        self.timeout_s = timeout_s
        self.pending: dict[int, tuple[str, float, float]] = {}  # crm_id -> (E.164, t, timeout)
        self.arrived: dict[int, float] = {}
        self.timed_out: list[int] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="crm-watcher")

    def expect(self, crm_id: int, phone: str, t_edit: float, timeout_s: float | None = None):
        from sync_pipeline.mapping.normalise import normalise_phone

        with self.lock:
            self.pending[crm_id] = (normalise_phone(phone), t_edit, timeout_s or self.timeout_s)

    def _run(self) -> None:
        from sync_pipeline.mapping.normalise import normalise_phone

        while not self.stop.wait(0.1):
            with self.lock:
                items = list(self.pending.items())
            for crm_id, (want, t_edit, timeout_s) in items:
                now = time.monotonic()
                record = self.http.get(f"/_admin/raw/Divisions/{crm_id}").json()
                got = normalise_phone(record.get("PhoneNumber"))
                with self.lock:
                    if got == want:
                        self.arrived[crm_id] = now - t_edit
                        del self.pending[crm_id]
                    elif now - t_edit > timeout_s:
                        self.timed_out.append(crm_id)
                        del self.pending[crm_id]

    def wait_idle(self, timeout_s: float) -> bool:
        return wait_until(lambda: not self.pending, timeout_s, 0.2)

    def __enter__(self) -> CrmWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.http.close()


def unleashed_edit(servers: ServerProcess, erp_id: str, phone: str) -> None:
    """A person's edit in Unleashed: the server's force-edit (no API request, delivered to the
    webhook subscriptions like any change)."""
    import httpx

    httpx.put(
        f"{servers.unleashed_url}/_admin/customers/{erp_id}",
        json={"PhoneNumber": phone},
        timeout=10,
    ).raise_for_status()


def unleashed_requests(servers: ServerProcess) -> dict[str, int]:
    return servers.stats("unleashed")["requests"]


def webhooks_on(
    servers: ServerProcess,
    env: dict[str, str],
    work: Path,
    dev: DagsterDev,
    targets: list[tuple[int, str]],
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """The receiver subscribed and running; Unleashed edits timed until the CRM has them."""
    import httpx

    from sync_pipeline.clients.unleashed import UnleashedClient
    from sync_pipeline.webhooks.subscriptions import subscribe

    port = free_port()
    with UnleashedClient(
        servers.unleashed_url, servers.unleashed_api_id, servers.unleashed_api_key
    ) as client:
        made = subscribe(client, f"http://127.0.0.1:{port}/webhooks/unleashed")
    receiver_env = {**env, "UNLEASHED_WEBHOOK_SECRET": made.signing_secret}
    cmd = [sys.executable, "-m", "sync_pipeline.cli", "webhooks", "serve",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with (work / "receiver.log").open("w") as log:
        receiver = subprocess.Popen(
            cmd, cwd=ROOT, env=receiver_env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        up = wait_until(lambda: _answers(httpx, f"http://127.0.0.1:{port}/healthz"), 60, 0.2)
        if not up:
            print("the webhook receiver did not start; see", work / "receiver.log")
            return None
        with CrmWatcher(servers, args.timeout_s) as watcher:
            crm_id, erp_id = targets[0]
            t0 = time.monotonic()
            unleashed_edit(servers, erp_id, "0113 496 2000")
            watcher.expect(crm_id, "0113 496 2000", t0, args.warmup_timeout_s)
            if not watcher.wait_idle(args.warmup_timeout_s + 5) or crm_id not in watcher.arrived:
                print("the webhook warm-up edit never reached the CRM; see", work)
                return None
            print(f"Webhook warm-up edit reached the CRM {watcher.arrived[crm_id]:.1f} s after "
                  "it was made in Unleashed")  # fmt: skip
            watcher.arrived.clear()
            time.sleep(args.spacing_s)
            servers.reset_stats("unleashed")
            print(f"{args.edits} Unleashed edits, {args.spacing_s:g} s apart (webhooks on)…")
            for i, (crm_id, erp_id) in enumerate(targets[: args.edits], start=1):
                phone = f"0113 496 {2000 + i:04d}"
                t0 = time.monotonic()
                unleashed_edit(servers, erp_id, phone)
                watcher.expect(crm_id, phone, t0)
                time.sleep(args.spacing_s)
            watcher.wait_idle(args.timeout_s + 5)
            requests = unleashed_requests(servers)
            runs = dev.graphql(RUNS_QUERY, {"job": "unleashed_webhook_job"})["runsOrError"]
            durations = [
                r["endTime"] - r["startTime"]
                for r in runs["results"]
                if r["startTime"] and r["endTime"]
            ]
        return {
            "latencies": list(watcher.arrived.values()),
            "timed_out": len(watcher.timed_out),
            "requests": requests,
            "run_durations": durations,
        }
    finally:
        receiver.terminate()
        try:
            receiver.wait(timeout=15)
        except subprocess.TimeoutExpired:
            receiver.kill()


def _answers(httpx: Any, url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def import_alone(
    servers: ServerProcess,
    db: Path,
    settings_file: Path,
    targets: list[tuple[int, str]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The same number of Unleashed edits, pulled by one import; then an import with nothing
    changed."""
    for i, (_crm_id, erp_id) in enumerate(targets[: args.edits], start=1):
        unleashed_edit(servers, erp_id, f"0113 496 {3000 + i:04d}")
    servers.reset_stats("unleashed")
    initial_cycle(servers, db, settings_file)
    with_changes = unleashed_requests(servers)
    import httpx

    pulled = sum(
        httpx.get(f"{servers.crm_url}/_admin/raw/Divisions/{crm_id}", timeout=10)
        .json()
        .get("PhoneNumber", "")
        .replace(" ", "")
        .endswith(f"496{3000 + i:04d}")
        for i, (crm_id, _erp) in enumerate(targets[: args.edits], start=1)
    )
    servers.reset_stats("unleashed")
    initial_cycle(servers, db, settings_file)
    return {"requests": with_changes, "pulled": pulled, "idle": unleashed_requests(servers)}


def print_webhooks(hooks: dict[str, Any], args: argparse.Namespace) -> None:
    latencies = hooks["latencies"]
    arrived = len(latencies)
    print("\n=== Unleashed edit -> CRM latency (dagster dev, webhooks on) ===")
    print(f"arrived: {arrived}/{args.edits} (timed out after {args.timeout_s:g} s: "
          f"{hooks['timed_out']})")  # fmt: skip
    print(f"seconds until the CRM had the edit: {_fmt(latencies)}")
    print(f"  whole webhook run (started -> ended):     {_fmt(hooks['run_durations'])}")
    total = sum(hooks["requests"].values())
    imported = hooks["import"]
    import_total = sum(imported["requests"].values())
    print("\n=== Unleashed requests per change pulled to the CRM ===")
    print(
        f"webhooks: {total} requests for {arrived} changes = "
        f"{total / max(arrived, 1):.2f} per change ({_by_endpoint(hooks['requests'])})"
    )
    print(
        f"import alone: {import_total} requests for {imported['pulled']} changes = "
        f"{import_total / max(imported['pulled'], 1):.2f} per change "
        f"({_by_endpoint(imported['requests'])}); and every scheduled import costs "
        f"{sum(imported['idle'].values())} with nothing changed "
        f"({_by_endpoint(imported['idle'])})"
    )


def _by_endpoint(requests: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(requests.items())) or "none"


def _fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"p50 {percentile(values, 50):.1f}  p95 {percentile(values, 95):.1f}  max {max(values):.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--companies", type=int, default=50)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--spacing-s", type=float, default=3.0, help="seconds between edits")
    parser.add_argument("--timeout-s", type=float, default=90.0, help="per edit")
    parser.add_argument("--warmup-timeout-s", type=float, default=240.0)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    parser.add_argument(
        "--no-webhooks", action="store_true", help="measure the CRM -> Unleashed direction only"
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    from sync_pipeline.clients.crm import CrmClient
    from sync_pipeline.settings import Settings, save_settings

    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    db, settings_file = work / "sync.duckdb", work / "settings.yaml"
    save_settings(Settings(), settings_file)
    print(f"Work folder: {work}")
    with ServerProcess(companies=args.companies, data_dir=work / "servers") as servers:
        print(f"Local servers up ({args.companies} companies). Initial full cycle in process…")
        print(f"  initial cycle: {initial_cycle(servers, db, settings_file):.1f} s")
        targets = linked_companies(db, args.edits)
        if len(targets) < args.edits:
            raise SystemExit(f"only {len(targets)} linked companies; need {args.edits}")
        env = {
            **os.environ,
            **servers.env(),
            "DAGSTER_HOME": str(work / "dagster_home"),
            "SYNC_DUCKDB_PATH": str(db),
            "SYNC_SETTINGS_FILE": str(settings_file),
            "SYNC_WEBHOOK_EVENTS_PATH": str(work / "webhook-events.sqlite"),
        }
        load_before = os.getloadavg()
        t_start = time.monotonic()
        with (
            DagsterDev(env, work / "dagster_home", work / "dagster_dev.log") as dev,
            CrmClient(servers.crm_url, servers.crm_token) as crm,
            Watcher(servers, args.timeout_s) as watcher,
        ):
            if not wait_until(dev.ready, 120, 0.5):
                print("dagster dev did not come up; see", work / "dagster_dev.log")
                return 1
            print(f"dagster dev up on {dev.url} after {time.monotonic() - t_start:.1f} s")

            # Warm-up: proves the code location is loaded and the sensor ticks.
            crm_id, erp_id = targets[0]
            phone = "0113 496 1000"
            t0 = time.monotonic()
            crm.patch("Divisions", crm_id, {"PhoneNumber": phone})
            watcher.expect(erp_id, phone, t0, args.warmup_timeout_s)
            if not watcher.wait_idle(args.warmup_timeout_s + 5) or erp_id not in watcher.arrived:
                print("the warm-up edit never reached Unleashed; see", work / "dagster_dev.log")
                return 1
            print(
                f"Warm-up edit reached Unleashed {watcher.arrived[erp_id]:.1f} s after it was "
                f"made ({time.monotonic() - t_start:.1f} s after starting dagster dev)"
            )
            watcher.arrived.clear()
            time.sleep(args.spacing_s)

            print(f"{args.edits} edits, {args.spacing_s:g} s apart…")
            made: list[tuple[str, float, float]] = []  # erp_id, wall clock, monotonic
            measured = [targets[0], *targets[1 : args.edits]]  # the first: a second edit
            for i, (crm_id, erp_id) in enumerate(measured, start=1):
                phone = f"0113 496 {1000 + i:04d}"
                t_wall, t_mono = time.time(), time.monotonic()
                crm.patch("Divisions", crm_id, {"PhoneNumber": phone})
                watcher.expect(erp_id, phone, t_mono)
                made.append((erp_id, t_wall, t_mono))
                time.sleep(args.spacing_s)
            watcher.wait_idle(args.timeout_s + 5)
            breakdown = run_breakdown(
                dev, [(e, w, watcher.arrived.get(e, float("nan"))) for e, w, _ in made]
            )
            crm_requests = servers.stats("crm")["total_requests"]
            rate = servers.crm_rate()
            hooks = None
            if not args.no_webhooks:
                hooks = webhooks_on(servers, env, work, dev, targets, args)
        if hooks is not None:
            hooks["import"] = import_alone(servers, db, settings_file, targets, args)
        load_after = os.getloadavg()

    latencies = list(watcher.arrived.values())
    arrived, lost = len(latencies), args.edits - len(latencies)
    print("\n=== CRM edit -> Unleashed latency (dagster dev, sensor every 5 s) ===")
    print(f"arrived: {arrived}/{args.edits} (timed out after {args.timeout_s:g} s: {lost})")
    print(f"seconds until Unleashed had the edit: {_fmt(latencies)}")
    p95 = percentile(latencies, 95) if arrived == args.edits else float("inf")
    met = p95 <= TARGET_P95_S
    print(f"target p95 <= {TARGET_P95_S:g} s: {'MET' if met else 'NOT MET'} (p95 {p95:.1f} s)")
    parts = breakdown["parts"]
    print(f"\nWhere the time went ({breakdown['runs']} push runs; per edit, seconds):")
    print(f"  sensor detection (edit -> run created):   {_fmt(parts['detect'])}")
    print(f"  queued (created -> started):              {_fmt(parts['queue'])}")
    print(f"  run start-up (started -> first step):     {_fmt(parts['startup'])}")
    print(f"  steps (first step -> run end):            {_fmt(parts['steps'])}")
    print(f"  whole push run (started -> ended):        {_fmt(breakdown['run_durations'])}")
    for key, values in sorted(breakdown["steps"].items(), key=lambda kv: -sum(kv[1])):
        print(f"    step {key:42s} {_fmt(values)}")
    print(
        f"CRM requests during the benchmark: {crm_requests} (server-side rate limit "
        f"{rate['limit']}/{rate['window_s']} s; 429s sent: {rate['throttled']})"
    )
    if hooks is not None:
        print_webhooks(hooks, args)
    print(
        f"\nLoad average (1/5/15 min) at the start: {' '.join(f'{x:.2f}' for x in load_before)}; "
        f"at the end: {' '.join(f'{x:.2f}' for x in load_after)} ({os.cpu_count()} cores, shared)"
    )
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
