"""Shared pieces of the latency and load benchmarks: the local servers in a child process, free
ports, a peak-RSS sampler and percentiles.

The servers run in their own process (`python benchmarks/_common.py serve ...`), so the figures of
the process under test (its RSS, its CPU, the GIL) are its own, not the emulators'. The child
prints one JSON line with its URLs and seed-world counts, then serves until its stdin closes or it
gets SIGTERM, so it never outlives the benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Mean of the seed's per-customer draw `rng.choice((1, 1, 2, 2, 3, 3, 4, 5))` (seed.py).
SEED_CONTACTS_PER_CUSTOMER = 2.625


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class PeakRss:
    """Samples a process's resident set size in a daemon thread; `peak` in bytes."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.2) -> None:
        import psutil

        self._proc = psutil.Process(pid or os.getpid())
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except Exception:  # the process ended  # noqa: BLE001
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# The local servers in a child process
# --------------------------------------------------------------------------------------------
class ServerProcess:
    """Both local servers (devservers.run.Emulators) in a child process.

    Mirrors the parts of `Emulators` a benchmark needs: URLs, credentials, `env()`, `stats()`,
    `reset_stats()`, plus the CRM server's rate-limit counters (`crm_rate()`)."""

    def __init__(
        self,
        *,
        companies: int,
        data_dir: Path | None = None,
        seed: int = 42,
        contacts_per_company: float | None = None,
        crm_rate_limit: int = 1200,
        crm_rate_window_s: float = 600,
        start_timeout_s: float = 600,
    ) -> None:
        self.args = [
            sys.executable, __file__, "serve",
            "--companies", str(companies), "--seed", str(seed),
            "--crm-rate-limit", str(crm_rate_limit), "--crm-rate-window-s", str(crm_rate_window_s),
        ]  # fmt: skip
        if data_dir is not None:
            self.args += ["--data-dir", str(data_dir)]
        if contacts_per_company is not None:
            self.args += ["--contacts-per-company", str(contacts_per_company)]
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        ready = threading.Event()

        def read() -> None:
            line = self.proc.stdout.readline()
            if line:
                self.info = json.loads(line)
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(self.start_timeout_s) or not self.info:
            self.__exit__()
            raise RuntimeError("the local servers did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=15)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.proc = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def crm_url(self) -> str:
        return self.info["crm_url"]

    @property
    def unleashed_url(self) -> str:
        return self.info["unleashed_url"]

    def env(self) -> dict[str, str]:
        return dict(self.info["env"])

    @property
    def crm_token(self) -> str:
        return self.info["env"]["CRM_TOKEN"]

    @property
    def unleashed_api_id(self) -> str:
        return self.info["env"]["UNLEASHED_API_ID"]

    @property
    def unleashed_api_key(self) -> str:
        return self.info["env"]["UNLEASHED_API_KEY"]

    def _url(self, system: str) -> str:
        return self.crm_url if system == "crm" else self.unleashed_url

    def stats(self, system: str) -> dict[str, Any]:
        return httpx.get(f"{self._url(system)}/_admin/stats", timeout=10).json()

    def reset_stats(self, system: str) -> None:
        httpx.post(f"{self._url(system)}/_admin/stats/reset", timeout=10).raise_for_status()

    def crm_rate(self) -> dict[str, Any]:
        """limit, window_s, remaining, admitted, throttled (429s sent by the sliding window)."""
        return httpx.get(f"{self.crm_url}/_admin/ratelimit", timeout=10).json()

    def reset_crm_rate_counts(self) -> None:
        httpx.post(f"{self.crm_url}/_admin/ratelimit/reset", timeout=10).raise_for_status()


def _scale_seed_contacts(per_company: float) -> None:
    """Make the seed draw about `per_company` Unleashed contacts per customer instead of 2.625.

    The seed has no option for it, so this wraps `_Builder.unleashed_contacts` and scales each
    customer's count (rounded with the builder's own RNG, so the world stays deterministic). The
    CRM copies, links and planted drift follow from the contacts as usual."""
    from devservers import seed

    factor = per_company / SEED_CONTACTS_PER_CUSTOMER
    original = seed._Builder.unleashed_contacts

    def scaled(self, customer, count, taken):  # noqa: ANN001, ANN202
        if count > 100:  # the one big customer stays as it is
            return original(self, customer, count, taken)
        exact = count * factor
        whole = int(exact)
        if self.rng.random() < exact - whole:
            whole += 1
        return original(self, customer, max(1, whole), taken)

    seed._Builder.unleashed_contacts = scaled


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="_common.py serve")
    parser.add_argument("--companies", type=int, required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--contacts-per-company", type=float, default=None)
    parser.add_argument("--crm-rate-limit", type=int, default=1200)
    parser.add_argument("--crm-rate-window-s", type=float, default=600)
    args = parser.parse_args(argv)
    if args.contacts_per_company is not None:
        _scale_seed_contacts(args.contacts_per_company)
    from devservers.run import Emulators

    emu = Emulators(
        companies=args.companies, seed=args.seed, data_dir=args.data_dir,
        crm_rate_limit=args.crm_rate_limit, crm_rate_window_s=args.crm_rate_window_s,
    )  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with emu:
        info = {
            "crm_url": emu.crm_url,
            "unleashed_url": emu.unleashed_url,
            "env": emu.env(),
            "world": emu.world.summary() if emu.world else {},
        }
        if args.data_dir and emu.world:
            # The seed's truth, for checks (written before the servers change anything).
            summary = emu.world.summary()
            truth = {
                "company_links": emu.world.company_links,
                "contact_links": emu.world.contact_links,
                **{k: summary[k] for k in ("customers", "unleashed_contacts")},
                "crm_divisions": summary["crm_divisions"],
                "crm_contacts": summary["crm_contacts"],
            }
            (Path(args.data_dir) / "world.json").write_text(json.dumps(truth))
        print(json.dumps(info), flush=True)
        # Serve until the parent closes our stdin (it ended, or is done with us) or SIGTERM.
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        while not stop.wait(0.5):
            pass
    return 0


def wait_until(predicate, timeout_s: float, interval_s: float = 0.25) -> bool:  # noqa: ANN001
    """Poll `predicate()` until it is truthy or `timeout_s` passes; True if it became truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.exit(_serve(sys.argv[2:]))
    sys.exit("usage: python benchmarks/_common.py serve --companies N [...]")
