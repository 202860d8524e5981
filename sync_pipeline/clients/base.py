"""Shared HTTP plumbing for both API clients: pacing, retries, typed errors and secret redaction.

Retries come from tenacity and pacing from pyrate-limiter, so neither is hand-written here; this
module only wires them to httpx and to the two APIs' error conventions.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import random
import sqlite3
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import certifi
import httpx
from filelock import FileLock
from pyrate_limiter import Duration, Limiter, Rate, SQLiteBucket
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)

from sync_pipeline.clients.dates import as_utc

log = logging.getLogger("sync_pipeline.clients")

REDACTED = "***"
# A client that keeps succeeding clears a usage-limit block recorded meanwhile by another process
# within this many seconds (see BaseClient._clear_block).
BLOCK_RECHECK_S = 60.0


class ApiError(Exception):
    """A failed API call. Names the system, the endpoint, the status and the reason."""

    def __init__(
        self,
        system: str,
        method: str,
        endpoint: str,
        status: int | None,
        message: str,
        *,
        body: Any = None,
    ) -> None:
        self.system = system
        self.method = method
        self.endpoint = endpoint
        self.status = status
        self.message = message
        self.body = body
        status_text = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{system} {method} {endpoint} failed ({status_text}): {message}")


class TransientApiError(ApiError):
    """A failure worth retrying: 429, 5xx, timeouts, dropped connections, malformed bodies."""

    def __init__(
        self,
        *args: Any,
        retry_after: float | None = None,
        maybe_applied: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after
        # False when the server surely did not act on the request (429, connection refused):
        # only then may a non-idempotent request (a create) be sent again blindly.
        self.maybe_applied = maybe_applied


class UsageLimitError(ApiError):
    """The account's API usage limit for the period is used up: the service refuses every
    request until `resets_at`. Never retried: each retry is refused the same way, and the
    caller should stop using the API (apply stops its run; the rest waits in the outbox)."""

    def __init__(self, *args: Any, resets_at: datetime, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resets_at = resets_at


class AuthError(ApiError):
    """401/403: credentials missing or wrong. Never retried."""


class ValidationError(ApiError):
    """400: the server refused a value. `message` is the server's own description."""


class NotFoundError(ApiError):
    """404."""


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each non-empty secret in `text`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class RetrySettings:
    """How hard to try: exponential backoff with full jitter; a larger Retry-After wins."""

    attempts: int = 6
    initial_wait: float = 0.2
    max_wait: float = 20.0
    max_total: float = 120.0


def _wait_strategy(settings: RetrySettings) -> Callable[[RetryCallState], float]:
    rng = random.Random()

    def wait(state: RetryCallState) -> float:
        exp = min(settings.max_wait, settings.initial_wait * (2 ** (state.attempt_number - 1)))
        jittered = rng.uniform(0, exp)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(max(retry_after, jittered), settings.max_wait * 3)
        return jittered

    return wait


def _retryable(idempotent: bool) -> Callable[[BaseException], bool]:
    def check(exc: BaseException) -> bool:
        if not isinstance(exc, TransientApiError):
            return False
        return idempotent or not exc.maybe_applied

    return check


def make_retrying(settings: RetrySettings, system: str) -> Retrying:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: retrying after %s (attempt %d of %d)",
            system,
            exc,
            state.attempt_number,
            settings.attempts,
        )

    return Retrying(
        retry=retry_if_exception(_retryable(True)),
        wait=_wait_strategy(settings),
        stop=stop_after_attempt(settings.attempts) | stop_after_delay(settings.max_total),
        before_sleep=before_sleep,
        reraise=True,
    )


class Pacer:
    """Client-side pacing: blocks until a request fits every configured rate (sliding window).

    With a `state_file`, the window is kept in that SQLite file under a file lock
    (pyrate-limiter's `SQLiteBucket`), so every process of the deployment draws from the same
    window: Dagster runs are separate processes, and the server counts a ten-minute window per
    account, not per process. Without one, the window is per process."""

    def __init__(
        self, rates: list[tuple[int, float]], state_file: str | None = None, key: str = "api"
    ) -> None:
        # rates: [(requests, window_seconds)]; an empty list means unpaced.
        self._limiter: Limiter | None = None
        self._file_lock: FileLock | None = None
        if not rates:
            return
        limits = [Rate(n, Duration.SECOND * window) for n, window in rates]
        if state_file:
            Path(state_file).parent.mkdir(parents=True, exist_ok=True)
            table = "pace_" + hashlib.sha256(key.encode()).hexdigest()[:16]  # no key text in SQL
            # The check-and-record of one request is held under this file lock (see acquire).
            # pyrate-limiter's own `use_file_lock` cannot be used with its non-blocking
            # try_acquire: it calls FileLock.acquire(False), which filelock 4 refuses.
            self._file_lock = FileLock(f"{state_file}.lock")
            with self._file_lock:
                bucket = SQLiteBucket.init_from_file(limits, table=table, db_path=str(state_file))
            self._limiter = Limiter(bucket)
        else:
            self._limiter = Limiter(limits)

    def acquire(self) -> None:
        if self._limiter is None:
            return
        # Poll the library's non-blocking check: its blocking wait advances the waiting item's
        # timestamp while it sleeps, and under a short window we saw it oversleep for minutes.
        while not self._try():
            time.sleep(0.05)

    def _try(self) -> bool:
        assert self._limiter is not None
        if self._file_lock is None:
            return self._limiter.try_acquire("api", blocking=False)
        with self._file_lock:  # no other process counts and records between our two steps
            return self._limiter.try_acquire("api", blocking=False)

    _shared: dict[tuple[str, tuple[tuple[int, float], ...], str | None], Pacer] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(
        cls, key: str, rates: list[tuple[int, float]], state_file: str | None = None
    ) -> Pacer:
        """One pacer per API account and rate in this process: every client of the same account
        (one per Dagster step) draws from the same window, as the server counts them (and, with
        a `state_file`, every process sharing that file does too)."""
        with cls._shared_lock:
            ident = (key, tuple(rates), state_file or None)
            if ident not in cls._shared:
                cls._shared[ident] = cls(rates, state_file, key)
            return cls._shared[ident]


# How long no request may have been refused before the automation probes the block again. A
# probe is refused within seconds of its tick (which records the refusal anew), so with a little
# under an hour the probes come once an hour on the import ticks.
PROBE_QUIET = timedelta(minutes=55)


@dataclass(frozen=True)
class UsageBlock:
    """A used-up usage limit as the deployment last saw it: when a request was last refused
    (`seen_at`) and when the service said the limit resets (`resets_at`).

    Whether to probe is decided from these two times alone: evaluating a tick writes nothing, so
    the daemon retrying a tick, or an operator previewing one in the UI, changes nothing."""

    seen_at: datetime
    resets_at: datetime

    def next_probe(self) -> datetime:
        """The earliest time for the next probe: `PROBE_QUIET` after the last refusal."""
        return self.seen_at + PROBE_QUIET

    def probe_due(self, when: datetime) -> bool:
        """Whether a tick at `when` may probe: no request was refused for `PROBE_QUIET`."""
        return when >= self.next_probe()


class UsageLog:
    """Requests sent to one API account per calendar month (UTC), in the deployment's pacing file
    (SQLite, under the pacer's file lock), so every process of the deployment adds to one count.
    It is what an account's monthly usage limit counts (Unleashed: docs/api-assumptions.md), as
    far as this deployment's share goes: other integrations of the account are not in it.

    The same file keeps the block: when the service last refused a request because the limit is
    used up, and until when. Any later successful request clears it (the limit was raised or has
    reset), whichever process sends it."""

    def __init__(self, state_file: str, key: str) -> None:
        self._path = state_file
        self._account = hashlib.sha256(key.encode()).hexdigest()[:16]  # no key text stored
        self._lock = FileLock(f"{state_file}.lock")

    def _connect(self) -> sqlite3.Connection:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self._path, timeout=30)
        con.execute(
            """CREATE TABLE IF NOT EXISTS api_usage (account TEXT NOT NULL, month TEXT NOT NULL,
               requests INTEGER NOT NULL, PRIMARY KEY (account, month))"""
        )
        # Times as ISO 8601 text in UTC.
        con.execute(
            """CREATE TABLE IF NOT EXISTS api_usage_block (account TEXT PRIMARY KEY,
               seen_at TEXT NOT NULL, resets_at TEXT NOT NULL)"""
        )
        return con

    @staticmethod
    def _month(now: datetime | None) -> str:
        return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m")

    def add(self, requests: int, now: datetime | None = None) -> None:
        if requests <= 0:
            return
        with self._lock, contextlib.closing(self._connect()) as con, con:
            con.execute(
                """INSERT INTO api_usage VALUES (?, ?, ?) ON CONFLICT (account, month)
                   DO UPDATE SET requests = requests + excluded.requests""",
                (self._account, self._month(now), requests),
            )

    def this_month(self, now: datetime | None = None) -> int:
        with self._lock, contextlib.closing(self._connect()) as con:
            row = con.execute(
                "SELECT requests FROM api_usage WHERE account = ? AND month = ?",
                (self._account, self._month(now)),
            ).fetchone()
        return int(row[0]) if row else 0

    # -- the block ------------------------------------------------------------------------------
    def block(self, resets_at: datetime, now: datetime | None = None) -> None:
        """Record that the service refused a request at `now` because the limit is used up until
        `resets_at`."""
        now = as_utc(now or datetime.now(UTC))
        with self._lock, contextlib.closing(self._connect()) as con, con:
            # Columns named: a file written by an earlier version has a fourth (unused) column.
            con.execute(
                """INSERT OR REPLACE INTO api_usage_block (account, seen_at, resets_at)
                   VALUES (?, ?, ?)""",
                (self._account, now.isoformat(), as_utc(resets_at).isoformat()),
            )

    def current_block(self, now: datetime | None = None) -> UsageBlock | None:
        """The block in force at `now`, if any: None once `now` has reached its reset time."""
        now = as_utc(now or datetime.now(UTC))
        with self._lock, contextlib.closing(self._connect()) as con:
            block = self._read(con)
        return block if block is not None and now < block.resets_at else None

    def blocked_until(self, now: datetime | None = None) -> datetime | None:
        """When the block in force at `now` ends (None: no block)."""
        block = self.current_block(now)
        return block.resets_at if block else None

    def clear(self) -> None:
        """Forget the block: a request went through, so the limit was raised or has reset."""
        with self._lock, contextlib.closing(self._connect()) as con, con:
            con.execute("DELETE FROM api_usage_block WHERE account = ?", (self._account,))

    def _read(self, con: sqlite3.Connection) -> UsageBlock | None:
        row = con.execute(
            "SELECT seen_at, resets_at FROM api_usage_block WHERE account = ?",
            (self._account,),
        ).fetchone()
        if row is None:
            return None
        seen, resets = row
        return UsageBlock(
            seen_at=datetime.fromisoformat(seen), resets_at=datetime.fromisoformat(resets)
        )


def usage_log(pacing_file: str | None, base_url: str) -> UsageLog | None:
    """The usage log of the account behind `base_url` (None without a pacing file)."""
    return UsageLog(pacing_file, base_url.rstrip("/")) if pacing_file else None


@dataclass
class RequestStats:
    """Requests actually sent (including retries), by method and path template."""

    sent: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.sent.values())


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying TLS context per process (certifi's bundle, as httpx uses by default):
    building it loads every CA certificate, which cost more than a whole quiet API call."""
    return ssl.create_default_context(cafile=certifi.where())


class BaseClient:
    """An httpx.Client with pacing, retries and error mapping. Subclasses add auth and paging."""

    system = "API"
    monthly_limit = False  # the account has a monthly usage limit: requests are counted

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        retry: RetrySettings | None = None,
        rates: list[tuple[int, float]] | None = None,
        transport: httpx.BaseTransport | None = None,
        pacing_key: str | None = None,
        pacing_file: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            headers={"Accept": "application/json"},
            verify=_ssl_context(),
        )
        self._retrying = make_retrying(retry or RetrySettings(), self.system)
        # Clients of one account share a pacer (the server's window is per account, not per
        # client); `pacing_key` names the account without holding a secret.
        # `pacing_file` shares the window with other processes (see Pacer).
        self._pacer = Pacer.shared(pacing_key or self.base_url, rates or [], pacing_file)
        self.stats = RequestStats()
        # Requests sent are added to the month's count when the client closes (`close`), for
        # an API whose account has a monthly usage limit.
        self._usage = usage_log(pacing_file, self.base_url) if self.monthly_limit else None
        self._usage_recorded = 0
        # When this client last cleared the recorded block (monotonic; None: not since its last
        # refusal). A success clears it at most once a minute: any success shows the limit was
        # raised or has reset, whichever process recorded the block, but a write per request
        # would cost a file lock and a SQLite transaction each.
        self._block_cleared_at: float | None = None

    # -- to be provided by subclasses -------------------------------------------------------
    def _secrets(self) -> list[str]:
        return []

    def _auth_headers(self, query: str) -> dict[str, str]:
        return {}

    def _error_message(self, response: httpx.Response) -> str:
        return response.text[:500]

    def _usage_limit_reset(self, response: httpx.Response, message: str) -> datetime | None:
        """When the account's usage limit resets, if this error answer says it is used up."""
        return None

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()
        if self._usage is not None:
            self._usage.add(self.stats.total - self._usage_recorded)
            self._usage_recorded = self.stats.total

    def __enter__(self):  # noqa: D105
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def request(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        label: str | None = None,
        absolute_url: str | None = None,
        idempotent: bool | None = None,
        as_text: bool = False,
    ) -> Any:
        """Send one logical request (retried as needed) and return the decoded JSON body.

        `query` is the exact query string to send (without `?`); it is never re-encoded, so a
        signature computed over it stays valid. `label` names the endpoint in errors and stats.
        A non-idempotent request (POST unless told otherwise) is retried only when the server
        surely did not act on it; otherwise the caller decides (the outbox checks before redoing).
        `as_text` returns the body as text instead (an XML document such as `$metadata`).
        """
        label = label or path
        if idempotent is None:
            idempotent = method.upper() != "POST"
        retrying = self._retrying.copy(retry=retry_if_exception(_retryable(idempotent)))
        for attempt in retrying:
            with attempt:
                return self._send_once(
                    method, path, query, json_body, headers, label, absolute_url, as_text
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def _send_once(
        self,
        method: str,
        path: str,
        query: str,
        json_body: Any,
        headers: dict[str, str] | None,
        label: str,
        absolute_url: str | None,
        as_text: bool = False,
    ) -> Any:
        if absolute_url is not None:
            url = httpx.URL(absolute_url)
            query = url.query.decode("ascii")
        else:
            url = httpx.URL(self.base_url + path)
            if query:
                url = url.copy_with(query=query.encode("ascii"))
        all_headers = {"Content-Type": "application/json", **self._auth_headers(query)}
        if headers:
            all_headers.update(headers)
        content = json.dumps(json_body).encode() if json_body is not None else None
        self._pacer.acquire()
        self.stats.sent[f"{method} {label}"] += 1
        try:
            response = self._http.request(method, url, content=content, headers=all_headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            reason = redact(str(exc) or type(exc).__name__, self._secrets())
            raise TransientApiError(
                self.system, method, label, None, f"cannot connect: {reason}", maybe_applied=False
            ) from None
        except httpx.TimeoutException as exc:
            raise TransientApiError(
                self.system, method, label, None, f"timed out ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            reason = redact(str(exc) or type(exc).__name__, self._secrets())
            raise TransientApiError(
                self.system, method, label, None, f"connection failed: {reason}"
            ) from None
        self.stats.statuses[response.status_code] += 1
        if as_text and response.status_code < 400:
            return response.text
        return self._decode(method, label, response)

    def _clear_block(self) -> None:
        now = time.monotonic()
        if self._block_cleared_at is None or now - self._block_cleared_at >= BLOCK_RECHECK_S:
            assert self._usage is not None
            self._usage.clear()
            self._block_cleared_at = now

    def _decode(self, method: str, label: str, response: httpx.Response) -> Any:
        status = response.status_code
        if status >= 400:
            message = redact(self._error_message(response), self._secrets())
            args = (self.system, method, label, status, message)
            resets_at = self._usage_limit_reset(response, message)
            if resets_at is not None:
                if self._usage is not None:
                    self._usage.block(resets_at)
                    self._block_cleared_at = None
                raise UsageLimitError(*args, resets_at=resets_at)
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                raise TransientApiError(*args, retry_after=retry_after, maybe_applied=status != 429)
            if status in (401, 403):
                raise AuthError(*args)
            if status == 404:
                raise NotFoundError(*args)
            if status in (400, 409, 422):
                raise ValidationError(*args, body=_safe_json(response))
            raise ApiError(*args)
        if self._usage is not None and 200 <= status < 300:
            self._clear_block()
        if status == 204 or not response.content:
            return None
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TransientApiError(
                self.system, method, label, status, "response body is not valid JSON"
            ) from None


def _safe_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
