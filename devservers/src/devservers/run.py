"""Start the local Unleashed and Prospect CRM servers together, on one shared seed world.

Used by the `sync-devservers serve` and `demo` commands, by tests and by benchmarks:

    with Emulators(companies=200) as emu:
        os.environ.update(emu.env())
        ...
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any, Literal

import httpx

from devservers import crm_server, unleashed_server
from devservers.common import ADMIN_PREFIX, FaultConfig, ServerThread
from devservers.seed import World, generate_world

# Local, non-secret credentials: the servers accept only these unless told otherwise.
LOCAL_UNLEASHED_API_ID = unleashed_server.LOCAL_API_ID
LOCAL_UNLEASHED_API_KEY = unleashed_server.LOCAL_API_KEY
LOCAL_CRM_TOKEN = crm_server.LOCAL_CRM_TOKEN
LOCAL_CLIENT_TYPE = "acme/crmsync"

System = Literal["unleashed", "crm"]
CRM_SETS = {
    "Divisions": "divisions",
    "Contacts": "contacts",
    "Users": "users",
    "SalesLedgers": "sales_ledgers",
}


def unleashed_signature(api_key: str, query: str) -> str:
    """Base64 HMAC-SHA256 of the query string as sent (without `?`), keyed with the API key."""
    digest = hmac.new(api_key.encode(), query.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class Emulators:
    """Both local servers on background threads. Use as a context manager (or start()/stop()).

    `data_dir=None` keeps state in memory; otherwise `unleashed.sqlite` and `crm.sqlite` in that
    folder hold it, so a restart continues where the last run stopped (the seed world is loaded
    only into empty stores). Port 0 picks a free port.
    """

    def __init__(
        self,
        *,
        companies: int = 50,
        seed: int = 42,
        data_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        unleashed_port: int = 0,
        crm_port: int = 0,
        crm_rate_limit: int = 1200,
        crm_rate_window_s: float = 600,
        unleashed_requests_per_minute: int | None = None,
        unleashed_monthly_quota: int | None = None,
    ) -> None:
        self.companies = companies
        self.seed = seed
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.host = host
        self.unleashed_port = unleashed_port
        self.crm_port = crm_port
        self.crm_rate_limit = crm_rate_limit
        self.crm_rate_window_s = crm_rate_window_s
        self.unleashed_requests_per_minute = unleashed_requests_per_minute
        self.unleashed_monthly_quota = unleashed_monthly_quota
        self.unleashed_api_id = LOCAL_UNLEASHED_API_ID
        self.unleashed_api_key = LOCAL_UNLEASHED_API_KEY
        self.crm_token = LOCAL_CRM_TOKEN
        self.world: World | None = None
        self._admin_http: httpx.Client | None = None
        self._unleashed: ServerThread | None = None
        self._crm: ServerThread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Emulators:
        if self._unleashed is not None:
            return self
        self.world = generate_world(companies=self.companies, seed=self.seed)
        unleashed_store = crm_store = None
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            unleashed_store = str(self.data_dir / "unleashed.sqlite")
            crm_store = str(self.data_dir / "crm.sqlite")
        unleashed_app = unleashed_server.create_app(
            store_path=unleashed_store,
            world=self.world,
            api_id=self.unleashed_api_id,
            api_key=self.unleashed_api_key,
            requests_per_minute=self.unleashed_requests_per_minute,
            monthly_quota=self.unleashed_monthly_quota,
        )
        crm_app = crm_server.create_app(
            store_path=crm_store,
            world=self.world,
            token=self.crm_token,
            rate_limit=self.crm_rate_limit,
            rate_window_s=self.crm_rate_window_s,
        )
        self._unleashed = ServerThread(unleashed_app, host=self.host, port=self.unleashed_port)
        try:
            self._unleashed.start()
            self._crm = ServerThread(crm_app, host=self.host, port=self.crm_port).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in (self._crm, self._unleashed):
            if server is not None:
                server.stop()
        self._crm = self._unleashed = None
        if self._admin_http is not None:
            self._admin_http.close()
            self._admin_http = None

    def __enter__(self) -> Emulators:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- where and how to connect ---------------------------------------------------------------
    @property
    def unleashed_url(self) -> str:
        return self._server("unleashed").url

    @property
    def crm_url(self) -> str:
        return self._server("crm").url

    def env(self) -> dict[str, str]:
        """The environment variables the product reads, pointing at these servers."""
        return {
            "UNLEASHED_BASE_URL": self.unleashed_url,
            "UNLEASHED_API_ID": self.unleashed_api_id,
            "UNLEASHED_API_KEY": self.unleashed_api_key,
            "UNLEASHED_CLIENT_TYPE": LOCAL_CLIENT_TYPE,
            "CRM_BASE_URL": self.crm_url,
            "CRM_TOKEN": self.crm_token,
        }

    def unleashed_headers(self, query: str = "") -> dict[str, str]:
        """Headers for a signed Unleashed request whose query string is `query`."""
        return {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "api-auth-id": self.unleashed_api_id,
            "api-auth-signature": unleashed_signature(self.unleashed_api_key, query),
            "client-type": LOCAL_CLIENT_TYPE,
        }

    def crm_headers(self) -> dict[str, str]:
        return {"Accept": "application/json", "Authorization": f"Bearer {self.crm_token}"}

    def holdings(self) -> dict[str, dict[str, int]]:
        """What each server holds now, asked over its API (so it is right after a restart too):
        a handful of requests, which show in `stats()` and count against the CRM rate limit."""
        with httpx.Client(timeout=10) as http:

            def unleashed_count(path: str, query: str) -> int:
                url = f"{self.unleashed_url}{path}?{query}"
                response = http.get(url, headers=self.unleashed_headers(query))
                response.raise_for_status()
                return int(response.json()["Pagination"]["NumberOfItems"])

            def crm_count(entity_set: str) -> int:
                url = f"{self.crm_url}/{entity_set}?$count=true&$top=0"
                response = http.get(url, headers=self.crm_headers())
                response.raise_for_status()
                return int(response.json()["@odata.count"])

            customers = unleashed_count("/Customers/1", "includeObsolete=true&pageSize=1")
            return {
                "unleashed": {
                    "customers": customers,
                    "obsolete_customers": customers
                    - unleashed_count("/Customers/1", "includeObsolete=false&pageSize=1"),
                    "salespersons": unleashed_count(
                        "/Salespersons/1", "includeObsolete=true&pageSize=1"
                    ),
                },
                "crm": {key: crm_count(name) for name, key in CRM_SETS.items()},
            }

    # -- admin ----------------------------------------------------------------------------------
    def set_faults(self, system: System, **config: Any) -> dict[str, Any]:
        """Replace the fault configuration of one server (fields of `FaultConfig`; omitted fields
        take their defaults, so `set_faults(system)` clears all faults)."""
        body = FaultConfig(**config).model_dump()
        return self._admin("PUT", system, "/faults", json=body)

    def set_unleashed_quota(
        self, monthly_quota: int | None, used: int | None = None
    ) -> dict[str, Any]:
        """Set the local Unleashed account's monthly API usage limit (None: unlimited) and,
        optionally, how much of this month's is used. Returns the quota's state."""
        body = {"monthly_quota": monthly_quota, "used": used}
        return self._admin("PUT", "unleashed", "/quota", json=body)

    def stats(self, system: System) -> dict[str, Any]:
        """Request counts per endpoint, injected faults and the live fault configuration."""
        return self._admin("GET", system, "/stats")

    def reset_stats(self, system: System) -> dict[str, Any]:
        return self._admin("POST", system, "/stats/reset")

    def _admin(self, method: str, system: System, path: str, **kwargs: Any) -> dict[str, Any]:
        url = f"{self._server(system).url}{ADMIN_PREFIX}{path}"
        if self._admin_http is None:
            # One client for every admin call: a client per call builds an SSL context (loading
            # the CA bundle) and a connection each time, and tests make dozens of these calls
            # per scenario (faults on and off, request counts around every job).
            self._admin_http = httpx.Client(timeout=10)
        response = self._admin_http.request(method, url, **kwargs)
        response.raise_for_status()
        return response.json()

    def _server(self, system: System) -> ServerThread:
        server = {"unleashed": self._unleashed, "crm": self._crm}.get(system)
        if system not in ("unleashed", "crm"):
            raise ValueError(f"system must be 'unleashed' or 'crm', not {system!r}")
        if server is None:
            raise RuntimeError("the local servers are not running: use `with Emulators(...)`")
        return server
