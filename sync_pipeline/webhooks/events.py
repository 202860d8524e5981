"""The durable queue of webhook events: a SQLite file (stdlib `sqlite3`, WAL), apart from the
DuckDB database, so the receiver never waits for (or blocks) the DuckDB lock a run holds.

The receiver records each delivery here before it answers 2xx; a webhook run claims the pending
events as it starts (a batch keyed by its run id), and the sensor marks them consumed once that
run succeeded; a failed run's events go back to pending and are read again by a later run.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sync_pipeline.webhooks.signing import Event

EVENTS_PATH_ENV = "SYNC_WEBHOOK_EVENTS_PATH"
EVENTS_FILE = "webhook-events.sqlite"

Recorded = Literal["queued", "duplicate", "replay"]


def events_path(database: str | os.PathLike[str]) -> str:
    """The event file: SYNC_WEBHOOK_EVENTS_PATH, else `webhook-events.sqlite` next to the DuckDB
    file (the same data volume, so the receiver and the runs see the same file)."""
    return os.environ.get(EVENTS_PATH_ENV) or str(Path(database).parent / EVENTS_FILE)


@dataclass(frozen=True, order=True)
class PendingEvent:
    seq: int
    delivery_id: str
    event_type: str
    customer_guid: str
    received_at: float


@dataclass(frozen=True)
class Batch:
    key: str
    claimed_at: float
    events: int


class EventStore:
    """One SQLite file; safe to share between the receiver's threads (one connection, a lock)
    and to open from several processes (WAL, busy timeout)."""

    def __init__(self, path: str | os.PathLike[str], *, replay_window_s: float = 600) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Signatures are kept twice as long as a timestamp is accepted: an older delivery is
        # refused as stale anyway.
        self.replay_window_s = replay_window_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=30, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a delivery answered 2xx is on disk even if the machine loses power next.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                delivery_id TEXT NOT NULL UNIQUE,
                event_type TEXT NOT NULL,
                customer_guid TEXT NOT NULL,
                received_at REAL NOT NULL,
                deliveries INTEGER NOT NULL DEFAULT 1,
                attempts INTEGER NOT NULL DEFAULT 0,
                retry_at REAL,
                batch TEXT,
                claimed_at REAL,
                consumed_at REAL,
                consumed_by TEXT
            );
            CREATE INDEX IF NOT EXISTS events_open ON events (consumed_at, batch);
            CREATE TABLE IF NOT EXISTS signatures (
                signature TEXT PRIMARY KEY,
                seen_at REAL NOT NULL
            );
            """
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- the receiver ---------------------------------------------------------------------------
    def record(self, event: Event, signature: str, now: float | None = None) -> Recorded:
        """Record a verified delivery, in one transaction: `replay` when this exact signature
        was seen before (the same bytes sent again: nothing recorded), `duplicate` when the
        delivery id is known (a redelivery, signed afresh: nothing new queued), else `queued`."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("DELETE FROM signatures WHERE seen_at < ?", (now - self.replay_window_s,))
            seen = db.execute(
                "INSERT INTO signatures (signature, seen_at) VALUES (?, ?) "
                "ON CONFLICT (signature) DO NOTHING",
                (signature, now),
            ).rowcount
            if not seen:
                return "replay"
            inserted = db.execute(
                "INSERT INTO events (delivery_id, event_type, customer_guid, received_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (delivery_id) DO UPDATE "
                "SET deliveries = deliveries + 1 RETURNING deliveries",
                (event.delivery_id, event.event_type, event.customer_guid, now),
            ).fetchone()
            return "queued" if inserted[0] == 1 else "duplicate"

    # -- the sensor -----------------------------------------------------------------------------
    def pending(self, now: float | None = None) -> list[PendingEvent]:
        """Events not consumed, not claimed by a batch, and not waiting for a retry after a
        failed run, oldest first."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, delivery_id, event_type, customer_guid, received_at FROM events "
                "WHERE consumed_at IS NULL AND batch IS NULL "
                "AND (retry_at IS NULL OR retry_at <= ?) ORDER BY seq",
                (now,),
            ).fetchall()
        return [PendingEvent(*row) for row in rows]

    def next_retry(self) -> float | None:
        """When the first event waiting after a failed run is due again."""
        with self._lock:
            row = self._db.execute(
                "SELECT min(retry_at) FROM events WHERE consumed_at IS NULL AND batch IS NULL"
            ).fetchone()
        return row[0]

    def claim(self, batch: str, limit: int, now: float | None = None) -> list[PendingEvent]:
        """Put the pending events (the oldest `limit`) into the batch `batch` (the run id of the
        run that reads them) and return them."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "UPDATE events SET batch = ?, claimed_at = ? WHERE seq IN ("
                "  SELECT seq FROM events WHERE consumed_at IS NULL AND batch IS NULL"
                "  AND (retry_at IS NULL OR retry_at <= ?) ORDER BY seq LIMIT ?) "
                "RETURNING seq, delivery_id, event_type, customer_guid, received_at",
                (batch, now, now, limit),
            ).fetchall()
        return sorted(PendingEvent(*row) for row in rows)

    def has_batch(self, batch: str) -> bool:
        """Whether the run `batch` has claimed events (consumed or not)."""
        with self._lock:
            return (
                self._db.execute(
                    "SELECT 1 FROM events WHERE batch = ? LIMIT 1", (batch,)
                ).fetchone()
                is not None
            )

    def open_batches(self) -> list[Batch]:
        with self._lock:
            rows = self._db.execute(
                "SELECT batch, min(claimed_at), count(*) FROM events "
                "WHERE batch IS NOT NULL AND consumed_at IS NULL GROUP BY batch ORDER BY 2"
            ).fetchall()
        return [Batch(*row) for row in rows]

    def consume(self, batch: str, run_id: str, now: float | None = None) -> int:
        """The batch's run succeeded: its events are done."""
        with self._tx() as db:
            return db.execute(
                "UPDATE events SET consumed_at = ?, consumed_by = ? "
                "WHERE batch = ? AND consumed_at IS NULL",
                (time.time() if now is None else now, run_id, batch),
            ).rowcount

    def release(self, batch: str, *, failed: bool, now: float | None = None) -> int:
        """The batch's run failed, or never started: its events are pending again. After a
        failed run they wait 30 s, doubled for each further failure, at most an hour, so a run
        that cannot succeed (the CRM down) is not launched every few seconds."""
        now = time.time() if now is None else now
        with self._tx() as db:
            return db.execute(
                "UPDATE events SET batch = NULL, claimed_at = NULL, "
                "attempts = attempts + ?, "
                "retry_at = CASE WHEN ? THEN ? + min(3600, 30 * (1 << min(attempts, 7))) END "
                "WHERE batch = ? AND consumed_at IS NULL",
                (int(failed), failed, now, batch),
            ).rowcount

    def counts(self) -> dict[str, int]:
        """Events by state, and deliveries received in all (duplicates included)."""
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) FILTER (WHERE consumed_at IS NULL AND batch IS NULL), "
                "count(*) FILTER (WHERE consumed_at IS NULL AND batch IS NOT NULL), "
                "count(*) FILTER (WHERE consumed_at IS NOT NULL), "
                "coalesce(sum(deliveries), 0) FROM events"
            ).fetchone()
        return dict(zip(("pending", "claimed", "consumed", "deliveries"), row, strict=True))

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Delete consumed events older than `older_than_s` (the delivery ids go with them)."""
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._tx() as db:
            return db.execute(
                "DELETE FROM events WHERE consumed_at IS NOT NULL AND consumed_at < ?", (cutoff,)
            ).rowcount
