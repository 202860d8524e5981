"""Pieces both local API servers share: durable document state, fault injection, request counts,
the admin endpoints, and running a Starlette app under uvicorn on a background thread.

Used by tests, the demo and development only; the product never imports this package at run time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import uvicorn
from pydantic import BaseModel, Field, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ADMIN_PREFIX = "/_admin"


# --------------------------------------------------------------------------------------------
# Durable state
# --------------------------------------------------------------------------------------------
class DocumentStore:
    """JSON documents in named collections, cached in memory and written through to SQLite.

    With `path=None` the state lives in memory only. Insertion order is kept per collection.
    """

    def __init__(self, path: str | None = None) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path or ":memory:", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS docs (coll TEXT NOT NULL, id TEXT NOT NULL, "
            "seq INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (coll, id))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )
        self._db.commit()
        self._cache: dict[str, dict[str, dict[str, Any]]] = {}
        self._seq = 0
        for coll, doc_id, seq, body in self._db.execute(
            "SELECT coll, id, seq, body FROM docs ORDER BY seq"
        ):
            self._cache.setdefault(coll, {})[doc_id] = json.loads(body)
            self._seq = max(self._seq, seq)

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def all(self, coll: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._cache.get(coll, {}).values())

    def get(self, coll: str, doc_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._cache.get(coll, {}).get(str(doc_id))

    def put(self, coll: str, doc_id: str, doc: dict[str, Any]) -> None:
        self.put_many(coll, [(str(doc_id), doc)])

    def put_many(self, coll: str, docs: Iterable[tuple[str, dict[str, Any]]]) -> None:
        with self._lock:
            rows = []
            bucket = self._cache.setdefault(coll, {})
            for doc_id, doc in docs:
                doc_id = str(doc_id)
                self._seq += 1
                bucket[doc_id] = doc
                rows.append((coll, doc_id, self._seq, json.dumps(doc)))
            # Keep the original position of documents that already existed.
            self._db.executemany(
                "INSERT INTO docs (coll, id, seq, body) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (coll, id) DO UPDATE SET body = excluded.body",
                rows,
            )
            self._db.commit()

    def delete(self, coll: str, doc_id: str) -> bool:
        with self._lock:
            existed = self._cache.get(coll, {}).pop(str(doc_id), None) is not None
            self._db.execute("DELETE FROM docs WHERE coll = ? AND id = ?", (coll, str(doc_id)))
            self._db.commit()
            return existed

    def next_id(self, name: str) -> int:
        """A durable counter (for integer keys)."""
        with self._lock:
            row = self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
                (name,),
            ).fetchone()
            self._db.commit()
            return int(row[0])

    def counter(self, name: str) -> int:
        """A counter's value (0 when it was never set)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
            return int(row[0]) if row else 0

    def set_counter(self, name: str, value: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
            self._db.commit()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._db.execute("DELETE FROM docs")
            self._db.execute("DELETE FROM counters")
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------------------------
# Fault injection and request counting
# --------------------------------------------------------------------------------------------
class FaultConfig(BaseModel):
    """Faults applied to API requests (never to /_admin). Rates are probabilities per request."""

    error_rate: float = Field(0.0, ge=0, le=1)
    error_statuses: list[int] = Field(default_factory=lambda: [500, 502, 503])
    rate_429: float = Field(0.0, ge=0, le=1)
    burst_429: int = Field(0, ge=0, description="the next N requests get 429")
    retry_after_s: float = Field(1.0, ge=0)
    latency_ms: int = Field(0, ge=0)
    drop_rate: float = Field(0.0, ge=0, le=1)
    malformed_rate: float = Field(0.0, ge=0, le=1)
    methods: list[str] | None = Field(
        None,
        description="only requests with these HTTP methods get faults (e.g. ['POST']: "
        "reads answer, writes fail); None: every request",
    )
    seed: int | None = None

    @field_validator("methods")
    @classmethod
    def _upper(cls, methods: list[str] | None) -> list[str] | None:
        return None if methods is None else [m.upper() for m in methods]


class FaultState:
    """The live fault configuration plus counters; changeable while the server runs."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self._lock = threading.Lock()
        self.config = config or FaultConfig()
        self._rng = random.Random(self.config.seed)
        self.requests: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()  # requests answered 2xx (writes that happened)
        self.injected: Counter[str] = Counter()

    def set(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config
            self._rng = random.Random(config.seed)

    def draw(self, method: str = "GET") -> str | None:
        """Which fault (if any) hits the next request."""
        with self._lock:
            c = self.config
            if c.methods is not None and method.upper() not in c.methods:
                return None
            if c.burst_429 > 0:
                c.burst_429 -= 1
                return "429"
            r = self._rng.random
            if c.rate_429 and r() < c.rate_429:
                return "429"
            if c.error_rate and r() < c.error_rate:
                return f"status:{self._rng.choice(c.error_statuses)}"
            if c.drop_rate and r() < c.drop_rate:
                return "drop"
            if c.malformed_rate and r() < c.malformed_rate:
                return "malformed"
            return None

    def count(self, key: str, fault: str | None) -> None:
        with self._lock:
            self.requests[key] += 1
            if fault:
                self.injected[fault.split(":")[0]] += 1

    def answered(self, key: str, status: int) -> None:
        if 200 <= status < 300:
            with self._lock:
                self.accepted[key] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "faults": self.config.model_dump(),
                "requests": dict(self.requests),
                "accepted": dict(self.accepted),
                "total_requests": sum(self.requests.values()),
                "injected": dict(self.injected),
            }

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.accepted.clear()
            self.injected.clear()


class FaultMiddleware:
    """ASGI middleware: counts API requests per endpoint and injects the configured faults.

    `endpoint_key(scope)` turns a request into a counter key such as `GET /Customers`.
    Faults: an error status or 429 (with Retry-After) before the app runs; added latency; a dropped
    connection (headers and half a body sent, then the connection is cut); a malformed JSON body.
    """

    def __init__(
        self, app: ASGIApp, faults: FaultState, endpoint_key: Callable[[Scope], str]
    ) -> None:
        self.app = app
        self.faults = faults
        self.endpoint_key = endpoint_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        fault = self.faults.draw(scope["method"])
        key = self.endpoint_key(scope)
        self.faults.count(key, fault)
        latency = self.faults.config.latency_ms
        if latency:
            await asyncio.sleep(latency / 1000)
        if fault == "429":
            retry_after = self.faults.config.retry_after_s
            await _send_json(
                send,
                429,
                {"error": {"code": "TooManyRequests", "message": "Rate limit exceeded"}},
                {"retry-after": f"{retry_after:g}"},
            )
            return
        if fault and fault.startswith("status:"):
            status = int(fault.split(":")[1])
            await _send_json(
                send, status, {"error": {"code": "ServerError", "message": "Injected fault"}}
            )
            return
        if fault == "drop":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"Items": [', "more_body": True})
            raise ConnectionAbortedError("injected dropped connection")
        if fault == "malformed":
            await _send_raw(send, 200, b'{"value": [{"broken": tru', b"application/json")
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.faults.answered(key, message["status"])
            await send(message)

        await self.app(scope, receive, counted)


async def _send_json(
    send: Send, status: int, body: Any, extra_headers: dict[str, str] | None = None
) -> None:
    await _send_raw(send, status, json.dumps(body).encode(), b"application/json", extra_headers)


async def _send_raw(
    send: Send,
    status: int,
    payload: bytes,
    content_type: bytes,
    extra_headers: dict[str, str] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())]
    for k, v in (extra_headers or {}).items():
        headers.append((k.encode(), v.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def admin_routes(
    faults: FaultState,
    *,
    reset: Callable[[], None],
    seed: Callable[[dict[str, Any]], dict[str, Any]],
    extra: list[Route] | None = None,
) -> list[Route]:
    """`/_admin` endpoints: GET/PUT faults, GET stats, POST reset, POST seed {companies, seed}."""

    async def get_faults(request: Request) -> JSONResponse:
        return JSONResponse(faults.config.model_dump())

    async def put_faults(request: Request) -> JSONResponse:
        try:
            config = FaultConfig.model_validate(await request.json())
        except ValueError as exc:
            return JSONResponse({"error": {"code": "BadRequest", "message": str(exc)}}, 400)
        faults.set(config)
        return JSONResponse(config.model_dump())

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(faults.snapshot())

    async def reset_stats(request: Request) -> JSONResponse:
        faults.reset_counts()
        return JSONResponse(faults.snapshot())

    async def do_reset(request: Request) -> JSONResponse:
        reset()
        faults.reset_counts()
        return JSONResponse({"ok": True})

    async def do_seed(request: Request) -> JSONResponse:
        body = await request.json() if await request.body() else {}
        return JSONResponse(seed(body))

    return [
        Route(f"{ADMIN_PREFIX}/faults", get_faults, methods=["GET"]),
        Route(f"{ADMIN_PREFIX}/faults", put_faults, methods=["PUT"]),
        Route(f"{ADMIN_PREFIX}/stats", stats, methods=["GET"]),
        Route(f"{ADMIN_PREFIX}/stats/reset", reset_stats, methods=["POST"]),
        Route(f"{ADMIN_PREFIX}/reset", do_reset, methods=["POST"]),
        Route(f"{ADMIN_PREFIX}/seed", do_seed, methods=["POST"]),
        *(extra or []),
    ]


# --------------------------------------------------------------------------------------------
# Running a server
# --------------------------------------------------------------------------------------------
class _HideInjectedDrops(logging.Filter):
    """uvicorn logs every aborted response as an error; injected drops are expected, not errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ConnectionAbortedError)


logging.getLogger("uvicorn.error").addFilter(_HideInjectedDrops())


class ServerThread:
    """Runs an ASGI app under uvicorn on a background thread. Port 0 picks a free port.

    Binds 127.0.0.1 unless told otherwise. Use as a context manager or call start()/stop().
    """

    def __init__(self, app: Starlette | ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"local server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
