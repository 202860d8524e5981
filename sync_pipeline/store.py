"""The DuckDB store: raw snapshots of both systems (monotonic upserts), extract cursors, the outbox,
the audit log, open rejections, recorded conflicts and records set aside as malformed.

Writers from different processes (overlapping Dagster runs) are serialised by a file lock next to
the database, because DuckDB lets only one process open a database file for writing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
from filelock import FileLock

from sync_pipeline import duck, schema
from sync_pipeline.schema import DERIVED_MARK, RAW_TABLES


def utcnow() -> datetime:
    """Naive UTC, as DuckDB TIMESTAMP columns hold it."""
    return datetime.now(UTC).replace(tzinfo=None)


def to_naive_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """One transaction for the block (rolled back if it raises), unless the caller already
    holds one: then the block is part of it."""
    try:
        con.begin()
    except duckdb.TransactionException:
        yield  # inside the caller's transaction
        return
    try:
        yield
    except BaseException:
        con.rollback()
        raise
    con.commit()


@contextmanager
def connect(
    database: str | Path, *, lock_timeout: float = 1800
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the database for writing, waiting for any other writer process to finish first."""
    database = str(database)
    if database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(database + ".lock", timeout=lock_timeout)
    else:
        lock = None
    if lock is not None:
        lock.acquire()
    try:
        con = duckdb.connect(database)
        try:
            # DuckDB draws a progress bar on stdout for statements over 2 s (a first sync's link
            # pass, an upgrade); in a Dagster run that is carriage-return noise in the compute log.
            con.execute("SET enable_progress_bar = false")
            schema.ensure(con)
            yield con
        finally:
            con.close()
    finally:
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------------------------------------
# Raw snapshots
# ------------------------------------------------------------------------------------------------
@dataclass
class SnapshotRow:
    id: str
    modified: datetime | None
    active: bool
    data: dict[str, Any]
    parent_id: str | None = None


@dataclass
class UpsertResult:
    received: int
    written: int


def upsert_snapshot(
    con: duckdb.DuckDBPyConnection, table: str, rows: Iterable[SnapshotRow]
) -> UpsertResult:
    """Insert or replace rows; an older version never overwrites a newer one (monotonic)."""
    if table not in RAW_TABLES:
        raise ValueError(f"unknown snapshot table {table!r}")
    has_parent = RAW_TABLES[table]
    now = utcnow()
    frame = pd.DataFrame(
        [
            {
                "id": str(r.id),
                **({"parent_id": r.parent_id} if has_parent else {}),
                "modified": to_naive_utc(r.modified),
                "active": bool(r.active),
                "data": json.dumps(r.data, default=str, ensure_ascii=False),
                "extracted_at": now,
            }
            for r in rows
        ],
        columns=[
            "id",
            *(["parent_id"] if has_parent else []),
            "modified",
            "active",
            "data",
            "extracted_at",
        ],
    )
    if frame.empty:
        return UpsertResult(0, 0)
    # The newest version per id within the batch wins too.
    frame = frame.sort_values("modified", na_position="first").drop_duplicates("id", keep="last")
    frame["modified"] = pd.to_datetime(frame["modified"])
    cols = list(frame.columns)
    duck.register(con, "_incoming", frame)
    try:
        changed = con.execute(
            f"""SELECT count(*) FROM _incoming i LEFT JOIN {table} t USING (id)
                WHERE t.id IS NULL OR i.modified IS NULL OR t.modified IS NULL
                   OR i.modified > t.modified
                   OR (i.modified = t.modified AND (i.data::VARCHAR <> t.data::VARCHAR
                       OR i.active <> t.active))"""
        ).fetchone()[0]
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "id")
        updates += f", {DERIVED_MARK} = NULL"  # derived.refresh recomputes the row
        con.execute(
            f"""INSERT INTO {table} ({", ".join(cols)})
                SELECT {", ".join(cols)} FROM _incoming
                ON CONFLICT (id) DO UPDATE SET {updates}
                WHERE excluded.modified IS NULL OR {table}.modified IS NULL
                   OR excluded.modified >= {table}.modified"""
        )
    finally:
        con.unregister("_incoming")
    return UpsertResult(received=len(frame), written=int(changed))


def deactivate_missing_children(
    con: duckdb.DuckDBPyConnection,
    table: str,
    parent_ids: list[str],
    present_ids: list[str],
    parent_modified: dict[str, datetime | None],
) -> int:
    """Mark children of the given parents that the source no longer lists as inactive."""
    if not parent_ids:
        return 0
    parents = pd.DataFrame(
        {
            "parent_id": parent_ids,
            "pmod": pd.to_datetime([to_naive_utc(parent_modified.get(p)) for p in parent_ids]),
        }
    )
    present = pd.DataFrame({"id": present_ids or []}, dtype="string")
    duck.register(con, "_parents", parents)
    duck.register(con, "_present", present)
    try:
        gone = con.execute(
            f"""SELECT t.id FROM {table} t JOIN _parents p USING (parent_id)
                WHERE t.active AND t.id NOT IN (SELECT id FROM _present)
                  AND (p.pmod IS NULL OR t.modified IS NULL OR p.pmod >= t.modified)"""
        ).fetchall()
        if gone:
            ids = [g[0] for g in gone]
            con.execute(
                # The mark is cleared so that derived.refresh puts the record on the planner's
                # next pass, as for any other write.
                f"UPDATE {table} SET active = FALSE, extracted_at = ?, {DERIVED_MARK} = NULL "
                "WHERE id IN "
                f"(SELECT unnest(?::VARCHAR[]))",
                [utcnow(), ids],
            )
        return len(gone)
    finally:
        con.unregister("_parents")
        con.unregister("_present")


def get_high_water(con: duckdb.DuckDBPyConnection, source: str) -> datetime | None:
    row = con.execute("SELECT high_water FROM extract_state WHERE source = ?", [source]).fetchone()
    return row[0] if row else None


def set_extract_state(
    con: duckdb.DuckDBPyConnection,
    source: str,
    *,
    high_water: datetime | None,
    reported_total: int | None,
    rows_received: int,
) -> None:
    con.execute(
        """INSERT INTO extract_state VALUES (?, ?, ?, ?, ?)
           ON CONFLICT (source) DO UPDATE SET
             high_water = greatest(coalesce(extract_state.high_water, excluded.high_water),
                                   coalesce(excluded.high_water, extract_state.high_water)),
             last_run_at = excluded.last_run_at,
             reported_total = excluded.reported_total,
             rows_received = excluded.rows_received""",
        [source, to_naive_utc(high_water), utcnow(), reported_total, rows_received],
    )


def set_state(con: duckdb.DuckDBPyConnection, key: str, value: str | None) -> None:
    con.execute(
        """INSERT INTO sync_state VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE
           SET value = excluded.value, updated_at = excluded.updated_at""",
        [key, value, utcnow()],
    )


def get_state(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    row = con.execute("SELECT value FROM sync_state WHERE key = ?", [key]).fetchone()
    return row[0] if row else None


def bad_record_id(bad: Any) -> str:
    """The id a malformed record is reported under: its own id, or for a record without one,
    '?' and a digest of the reason (which names the record by its other fields), so that two
    keyless records are two reports, and the same one seen again is the same report."""
    if bad.record_id:
        return str(bad.record_id)
    return "?" + hashlib.sha256(bad.reason.encode()).hexdigest()[:16]


def set_aside_sql(system: str, endpoint: str | None = None, *, children: bool = False) -> str:
    """SELECT id, reason: the records of `system` (and `endpoint`) set aside as malformed and not
    yet read clean. Their snapshot is stale, so the planner and the overnight fix leave them
    alone in both directions until they read clean.

    A customer whose contact list is malformed is itself read (reported under its own id with
    itself as parent): it is not in this set, only with `children`, which gives the records
    whose children were not read (that customer, and a customer that is malformed itself)."""
    where = f"system = '{system}'"
    if endpoint is not None:
        if "'" in endpoint:
            raise ValueError(f"unexpected endpoint label {endpoint!r}")
        where += f" AND endpoint = '{endpoint}'"
    which = (
        "(parent_id IS NULL OR parent_id = record_id)"
        if children
        else "parent_id IS DISTINCT FROM record_id"
    )
    return f"""SELECT record_id AS id, any_value(reason) AS reason FROM bad_records
               WHERE resolved_at IS NULL AND {where} AND {which} GROUP BY record_id"""


def record_bad_records(con: duckdb.DuckDBPyConnection, bad: Iterable[Any]) -> int:
    """Remember malformed source records (set aside, reported) until a good version arrives."""
    now = utcnow()
    n = 0
    for b in bad:
        n += 1
        con.execute(
            """INSERT INTO bad_records (system, endpoint, record_id, reason, first_seen,
                                        last_seen, resolved_at, parent_id)
               VALUES (?, ?, ?, ?, ?, ?, NULL, ?)
               ON CONFLICT (system, endpoint, record_id) DO UPDATE SET
                 reason = excluded.reason, last_seen = excluded.last_seen, resolved_at = NULL,
                 parent_id = excluded.parent_id""",
            [
                b.system,
                b.endpoint,
                bad_record_id(b),
                b.reason,
                now,
                now,
                getattr(b, "parent_id", None),
            ],
        )
    return n


def resolve_bad_records(
    con: duckdb.DuckDBPyConnection,
    system: str,
    endpoint: str,
    good_ids: Iterable[str],
    *,
    still_bad: Iterable[Any] = (),
    complete: bool = False,
) -> None:
    """Close the reports of records that arrived in good shape in a listing of `endpoint`.

    `still_bad` are the listing's own malformed records: a report under an id that is also
    good here (a customer whose contact list is malformed) stays open. A `complete` listing
    (a full read, not a delta) also closes every other report of the endpoint, including those
    of records without an id, which no good version can ever name: the record is fixed or
    gone."""
    bad_ids = sorted({bad_record_id(b) for b in still_bad})
    good = sorted(set(good_ids) - set(bad_ids))
    now = utcnow()
    if good:
        con.execute(
            """UPDATE bad_records SET resolved_at = ? WHERE system = ? AND endpoint = ?
               AND resolved_at IS NULL AND record_id IN (SELECT unnest(?::VARCHAR[]))""",
            [now, system, endpoint, good],
        )
    if complete:
        con.execute(
            """UPDATE bad_records SET resolved_at = ? WHERE system = ? AND endpoint = ?
               AND resolved_at IS NULL AND record_id NOT IN (SELECT unnest(?::VARCHAR[]))""",
            [now, system, endpoint, bad_ids],
        )


# ------------------------------------------------------------------------------------------------
# Outbox and audit
# ------------------------------------------------------------------------------------------------
OP_COLUMNS = [
    "entity", "op", "crm_id", "erp_id", "crm_parent_id", "erp_parent_id", "field",
    "crm_value", "erp_value", "baseline_value", "new_value", "conflict", "policy", "reason",
    "crm_modified", "erp_modified", "payload",
]  # fmt: skip


# The plan columns an operation's key is made of, in `_key`'s argument order.
_KEY_COLUMNS = ("entity", "op", "crm_id", "erp_id", "field", "crm_value", "erp_value",
                "new_value", "baseline_value")  # fmt: skip


def op_key(row: dict[str, Any]) -> str:
    """A stable identity for one planned change: same change planned twice → same key."""
    return _key(*(None if _isna(row.get(n)) else str(row.get(n)) for n in _KEY_COLUMNS))


def _key(
    entity: str | None, op: str | None, crm_id: str | None, erp_id: str | None,
    field: str | None, crm_value: str | None, erp_value: str | None, new_value: str | None,
    base: str | None,
) -> str:  # fmt: skip
    """The key of one change from its values as text (None when missing): a creation is known by
    its Unleashed record; an update by record, field, the value it replaces, the new value and
    the baseline."""
    if (op or "").startswith("create_"):
        parts = [entity, op, erp_id]
    else:
        old = erp_value if op == "update_erp" else crm_value
        parts = [entity, op, crm_id, erp_id, field, old, new_value, base]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _texts(frame: pd.DataFrame, name: str) -> list[str | None]:
    """A column as str-or-None values, as `_s` gives them (vectorised: plans are large)."""
    if name not in frame:
        return [None] * len(frame)
    col = frame[name]
    missing = col.isna().to_numpy()
    return [None if m else str(v) for v, m in zip(col.to_numpy(dtype=object), missing, strict=True)]


def _text_frame(frame: pd.DataFrame, names: Iterable[str]) -> pd.DataFrame:
    """The columns `names` of `frame` as text (str or missing), indexed 0..n-1. A column that
    already holds text is passed on as it is (plans read from DuckDB hold Arrow strings):
    turning 465k values into Python objects and back cost seconds a column set."""
    out: dict[str, Any] = {}
    for name in names:
        col = frame.get(name)
        if col is not None and isinstance(col.dtype, pd.StringDtype):
            out[name] = col.reset_index(drop=True)
        else:
            out[name] = pd.Series(_texts(frame, name), dtype=object)
    return pd.DataFrame(out)


def for_register(frame: pd.DataFrame) -> Any:
    """A frame for `con.register`, as an Arrow table when it converts: DuckDB scans Arrow string
    columns as they are, while a pandas frame's are turned into Python objects first (3 s for a
    465k-row plan, and about 3x slower for a wide one)."""
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return frame  # mixed types in an object column: let DuckDB convert it


# Printable ASCII without `"` and `\`: the characters `json.dumps` writes as they are, so a key's
# JSON text can be built in SQL for values made of them only.
_JSON_PLAIN = r"[ !#-\[\]-~]*"


def _json_list_sql(items: Iterable[str]) -> str:
    """SQL: the list of text expressions `items` as `json.dumps` writes it, NULL when an item is
    not plain (`||` with a NULL is NULL)."""
    parts = [
        f"""(CASE WHEN {i} IS NULL THEN 'null'
                  WHEN regexp_full_match({i}, '{_JSON_PLAIN}') THEN '"' || {i} || '"' END)"""
        for i in items
    ]
    return "'[' || " + " || ', ' || ".join(parts) + " || ']'"


def op_keys(frame: pd.DataFrame) -> list[str]:
    """`op_key` of every row of a plan frame, computed column-wise: the JSON text and its
    sha256 in DuckDB for plain values, `_key` in Python for the few others (non-ASCII text,
    quotes, backslashes, control characters). The same keys as `op_key`, row by row (tested
    on generated values); 465k rows in under a second, where Python took 2-5 s."""
    if frame.empty:
        return []
    texts = _text_frame(frame, _KEY_COLUMNS)
    texts["_pos"] = range(len(texts))
    cast = ", ".join(f"CAST({c} AS VARCHAR) AS {c}" for c in _KEY_COLUMNS)
    old = "CASE WHEN op = 'update_erp' THEN erp_value ELSE crm_value END"
    create = _json_list_sql(["entity", "op", "erp_id"])
    update = _json_list_sql(
        ["entity", "op", "crm_id", "erp_id", "field", old, "new_value", "baseline_value"]
    )
    con = duckdb.connect()
    try:
        duck.register(con, "_key_rows", for_register(texts))
        rows = con.execute(
            f"""WITH t AS (SELECT _pos, {cast} FROM _key_rows)
                SELECT left(sha256(CASE WHEN starts_with(coalesce(op, ''), 'create_')
                                        THEN {create} ELSE {update} END), 24)
                FROM t ORDER BY _pos"""
        ).fetchall()
    finally:
        con.close()
    keys: list[str] = [k for (k,) in rows]
    missing = [i for i, k in enumerate(keys) if k is None]
    if missing:
        others = texts.iloc[missing][list(_KEY_COLUMNS)]
        for i, values in zip(missing, others.itertuples(index=False), strict=True):
            keys[i] = _key(*(_s(v) for v in values))
    return keys


def _isna(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def enqueue(
    con: duckdb.DuckDBPyConnection,
    ops: pd.DataFrame,
    run_id: str,
    keys: list[str] | None = None,
) -> int:
    """Write planned operations to the outbox before any API call; returns how many operations
    are now waiting in it for this plan (new or reused).

    An operation already in the outbox and not yet applied (pending, in flight after a crash,
    failed, deferred, superseded) is reused, not duplicated; deferred and superseded ones become
    pending again. One applied earlier with the same key is a new
    occurrence of the same change and gets a new row. Set-based: a first sync queues thousands
    of operations, which one statement each made slow. `keys` are the rows' `op_keys` when the
    caller has them already.
    """
    if ops.empty:
        return 0
    keys = op_keys(ops) if keys is None else keys
    frame = _text_frame(
        ops,
        ["entity", "op", "crm_id", "erp_id", "crm_parent_id", "erp_parent_id", "field",
         "crm_value", "erp_value", "new_value", "policy", "reason"],
    )  # fmt: skip
    frame["pos"] = range(len(ops))
    frame["op_key"] = keys
    payload = ops.get("payload")
    if payload is not None and isinstance(payload.dtype, pd.StringDtype):
        frame["payload"] = payload.reset_index(drop=True)
    else:
        frame["payload"] = pd.Series(
            [None] * len(ops) if payload is None else [_json(v) for v in payload], dtype=object
        )
    conflict = ops["conflict"] if "conflict" in ops else pd.Series(False, index=ops.index)
    frame["conflict"] = conflict.fillna(False).astype(bool).to_numpy()
    duck.register(con, "_enq_rows", for_register(frame))
    try:
        # The same change twice in one plan is one operation (the later row's values win).
        con.execute(
            """CREATE OR REPLACE TEMP TABLE _enq AS
               SELECT e.*, x.op_id AS existing_id, coalesce(c.n, 0) AS n
               FROM (SELECT pos, op_key, entity::VARCHAR AS entity, op::VARCHAR AS op,
                            crm_id::VARCHAR AS crm_id, erp_id::VARCHAR AS erp_id,
                            crm_parent_id::VARCHAR AS crm_parent_id,
                            erp_parent_id::VARCHAR AS erp_parent_id, field::VARCHAR AS field,
                            (CASE WHEN op = 'update_erp' THEN erp_value ELSE crm_value END
                            )::VARCHAR AS old_value,
                            new_value::VARCHAR AS new_value, payload::VARCHAR AS payload,
                            conflict, policy::VARCHAR AS policy, reason::VARCHAR AS reason
                     FROM _enq_rows QUALIFY row_number() OVER
                       (PARTITION BY op_key ORDER BY pos DESC) = 1) e
               LEFT JOIN (SELECT op_key, arg_max(op_id, created_at) AS op_id FROM outbox
                          WHERE status <> 'applied'
                            AND op_key IN (SELECT op_key FROM _enq_rows)
                          GROUP BY op_key) x ON x.op_key = e.op_key
               -- The next occurrence's number: one past the highest kept (not a count: a
               -- pruned early occurrence would make a count reuse a kept row's id).
               LEFT JOIN (SELECT op_key,
                                 max(CAST(substr(op_id, length(op_key) + 2) AS BIGINT)) + 1 AS n
                          FROM outbox
                          WHERE op_key IN (SELECT op_key FROM _enq_rows)
                          GROUP BY op_key) c ON c.op_key = e.op_key"""
        )
    finally:
        con.unregister("_enq_rows")
    con.execute(
        # Planned again: a deferred or superseded operation is wanted again (superseded ones
        # come from a run with two-way sync off; leaving them superseded lost the edit).
        """UPDATE outbox SET new_value = e.new_value, payload = e.payload, reason = e.reason,
             status = CASE WHEN outbox.status IN ('deferred', 'superseded') THEN 'pending'
                           WHEN outbox.status = 'in_doubt' THEN 'in_flight'
                           ELSE outbox.status END
           FROM _enq e WHERE outbox.op_id = e.existing_id"""
    )
    con.execute(
        """INSERT INTO outbox (op_id, op_key, run_id, created_at, entity, op, crm_id, erp_id,
             crm_parent_id, erp_parent_id, field, old_value, new_value, payload, conflict,
             policy, reason, status, attempts)
           SELECT op_key || '-' || n, op_key, ?, ?, entity, op, crm_id, erp_id, crm_parent_id,
                  erp_parent_id, field, old_value, new_value, payload, conflict, policy, reason,
                  'pending', 0
           FROM _enq WHERE existing_id IS NULL ORDER BY pos""",
        [run_id, utcnow()],
    )
    (n,) = con.execute("SELECT count(*) FROM _enq").fetchone()
    con.execute("DROP TABLE _enq")
    return int(n)


def supersede(con: duckdb.DuckDBPyConnection, keep_keys: Iterable[str], ops: Iterable[str]) -> int:
    """Operations of these kinds still waiting but no longer planned are dropped: the data moved
    on (for example the other side changed again).

    One in flight is not dropped: its write may have landed, and then it must still be recorded.
    It becomes `in_doubt`: apply reads the target and completes it if the value is there, else
    sets it aside unsent, since the source no longer wants it (an edit undone, A → B → A)."""
    kinds = list(ops)
    # The keys as a registered table, not a list parameter: binding a 465k-element list cost
    # about half a second per statement.
    duck.register(con, "_keep_keys", pa.table({"op_key": pa.array(list(keep_keys), pa.string())}))
    try:
        con.execute(
            """UPDATE outbox SET status = 'in_doubt'
               WHERE status = 'in_flight'
                 AND op IN (SELECT unnest(?::VARCHAR[]))
                 AND op_key NOT IN (SELECT op_key FROM _keep_keys)""",
            [kinds],
        )
        res = con.execute(
            """UPDATE outbox SET status = 'superseded', next_attempt_at = NULL
               WHERE status IN ('pending', 'failed', 'deferred')
                 AND op IN (SELECT unnest(?::VARCHAR[]))
                 AND op_key NOT IN (SELECT op_key FROM _keep_keys)""",
            [kinds],
        ).fetchone()
    finally:
        con.unregister("_keep_keys")
    return int(res[0]) if res else 0


def _s(value: Any) -> str | None:
    return None if _isna(value) else str(value)


def _json(value: Any) -> str | None:
    if _isna(value):
        return None
    return value if isinstance(value, str) else json.dumps(value, default=str)


def mark(
    con: duckdb.DuckDBPyConnection,
    op_id: str,
    status: str,
    error: str | None = None,
    *,
    sending: bool = True,
) -> None:
    """Set an operation's status (and last error). Marking it in flight counts an attempt,
    unless `sending` is False: it stays in flight after a failure, the send already counted.
    Any retry time is cleared: a failure sets the next one with `schedule_retry`."""
    con.execute(
        """UPDATE outbox SET status = ?, last_error = ?, next_attempt_at = NULL,
             attempts = attempts + CASE WHEN ? = 'in_flight' AND ? THEN 1 ELSE 0 END
           WHERE op_id = ?""",
        [status, error, status, sending, op_id],
    )


def count_failure(con: duckdb.DuckDBPyConnection, op_id: str) -> int:
    """One more failed try of an operation; returns how many it has had."""
    row = con.execute(
        """UPDATE outbox SET failures = coalesce(failures, 0) + 1 WHERE op_id = ?
           RETURNING failures""",
        [op_id],
    ).fetchone()
    return int(row[0]) if row else 0


def schedule_retry(
    con: duckdb.DuckDBPyConnection, op_ids: Iterable[str], when: datetime | None
) -> None:
    """When the retry sensor should launch a run for these operations (None: not on its own)."""
    ids = list(op_ids)
    if ids:
        con.execute(
            "UPDATE outbox SET next_attempt_at = ? WHERE op_id IN (SELECT unnest(?::VARCHAR[]))",
            [to_naive_utc(when), ids],
        )


# What a retry can still act on: the statuses of `unfinished`.
RETRY_STATUSES = ("pending", "in_flight", "in_doubt", "failed")


@dataclass
class DueRetries:
    count: int  # operations whose retry time has come
    marker: str | None  # their latest retry time and count: the same while no run tried them
    first_error: str | None
    next_at: datetime | None  # the earliest retry time still to come


def due_retries(
    con: duckdb.DuckDBPyConnection, ops: Iterable[str], now: datetime | None = None
) -> DueRetries:
    """Operations of these kinds waiting for a retry whose time has come, and the next one."""
    now = to_naive_utc(now) or utcnow()
    n, latest, first_error, next_at = con.execute(
        """SELECT count(*) FILTER (WHERE next_attempt_at <= $now),
                  max(next_attempt_at) FILTER (WHERE next_attempt_at <= $now),
                  arg_min(last_error, next_attempt_at) FILTER (WHERE next_attempt_at <= $now),
                  min(next_attempt_at) FILTER (WHERE next_attempt_at > $now)
           FROM outbox
           WHERE next_attempt_at IS NOT NULL AND status IN (SELECT unnest($statuses::VARCHAR[]))
             AND op IN (SELECT unnest($ops::VARCHAR[]))""",
        {"now": now, "statuses": list(RETRY_STATUSES), "ops": list(ops)},
    ).fetchone()
    marker = None if not n else f"{latest:%Y-%m-%dT%H:%M:%S.%f}/{n}"
    return DueRetries(int(n or 0), marker, first_error, next_at)


def note_progress(con: duckdb.DuckDBPyConnection, op_id: str, note: str) -> None:
    """Keep what a creation in several steps has made so far (`Key=id` of the parent record it
    created first) in `result_id`, so a run that redoes it after a crash does not make it
    twice; the finished creation overwrites it with the new record's id."""
    con.execute("UPDATE outbox SET result_id = ? WHERE op_id = ?", [note, op_id])


def refused(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """op_key -> the server's reason, for changes the target system refused (not resent)."""
    return dict(
        con.execute(
            """SELECT op_key, arg_max(last_error, created_at) FROM outbox
               WHERE status = 'refused' GROUP BY op_key"""
        ).fetchall()
    )


def unfinished(con: duckdb.DuckDBPyConnection, ops: Iterable[str]) -> pd.DataFrame:
    return con.execute(
        """SELECT * FROM outbox WHERE status IN ('pending', 'in_flight', 'in_doubt', 'failed')
           AND op IN (SELECT unnest(?::VARCHAR[])) ORDER BY created_at""",
        [list(ops)],
    ).df()


def complete(
    con: duckdb.DuckDBPyConnection,
    op: dict[str, Any],
    *,
    run_id: str,
    direction: str,
    result_id: str | None = None,
    audit_rows: list[dict[str, Any]] | None = None,
) -> None:
    """Mark an operation applied and append its audit rows. Call inside the caller's transaction
    together with the baseline update, so the three move together or not at all."""
    now = utcnow()
    con.execute(
        """UPDATE outbox SET status = 'applied', applied_at = ?, last_error = NULL,
             next_attempt_at = NULL, result_id = coalesce(?, result_id) WHERE op_id = ?""",
        [now, result_id, op["op_id"]],
    )
    rows = audit_rows or [
        {
            "entity": op["entity"],
            "crm_id": _s(op.get("crm_id")) or result_id,
            "erp_id": _s(op.get("erp_id")),
            "field": _s(op.get("field")),
            "old_value": _s(op.get("old_value")),
            "new_value": _s(op.get("new_value")),
            "reason": _s(op.get("reason")),
        }
    ]
    for a in rows:
        con.execute(
            "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                now, run_id, op["op_id"], a["entity"], a.get("crm_id"), a.get("erp_id"),
                a.get("field"), a.get("old_value"), a.get("new_value"), direction,
                a.get("reason"),
            ],
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Rejections and conflicts
# ------------------------------------------------------------------------------------------------
def sync_rejections(con: duckdb.DuckDBPyConnection, plan: pd.DataFrame) -> dict[str, Any]:
    """Open a rejection for each new `reject` row; resolve those no longer planned (fixed).
    Returns the counts opened, resolved and open, and the rows opened (`new`)."""
    now = utcnow()
    rejects = plan[plan["op"] == "reject"] if not plan.empty else plan
    current = pd.DataFrame(
        {
            "entity": rejects.get("entity", pd.Series(dtype="string")).astype("string"),
            "crm_id": rejects.get("crm_id", pd.Series(dtype="string")).astype("string"),
            "erp_id": rejects.get("erp_id", pd.Series(dtype="string")).astype("string"),
            "field": rejects.get("field", pd.Series(dtype="string")).astype("string"),
            "value": rejects.get("new_value", pd.Series(dtype="string")).astype("string"),
            "reason": rejects.get("reason", pd.Series(dtype="string")).astype("string"),
        }
    )
    duck.register(con, "_rej", current)
    try:
        resolved = con.execute(
            """UPDATE rejections r SET resolved_at = ? WHERE resolved_at IS NULL AND NOT EXISTS (
                 SELECT 1 FROM _rej c WHERE c.entity = r.entity
                   AND c.erp_id IS NOT DISTINCT FROM r.erp_id
                   AND c.crm_id IS NOT DISTINCT FROM r.crm_id
                   AND c.field IS NOT DISTINCT FROM r.field)""",
            [now],
        ).fetchone()[0]
        con.execute(
            """UPDATE rejections r SET last_seen = ?, reason = c.reason, value = c.value
               FROM _rej c WHERE r.resolved_at IS NULL AND c.entity = r.entity
                 AND c.erp_id IS NOT DISTINCT FROM r.erp_id
                 AND c.crm_id IS NOT DISTINCT FROM r.crm_id
                 AND c.field IS NOT DISTINCT FROM r.field""",
            [now],
        )
        opened = con.execute(
            """INSERT INTO rejections
               SELECT c.entity, c.crm_id, c.erp_id, c.field, c.value, c.reason, ?, ?, NULL
               FROM _rej c WHERE NOT EXISTS (
                 SELECT 1 FROM rejections r WHERE r.resolved_at IS NULL AND c.entity = r.entity
                   AND c.erp_id IS NOT DISTINCT FROM r.erp_id
                   AND c.crm_id IS NOT DISTINCT FROM r.crm_id
                   AND c.field IS NOT DISTINCT FROM r.field)
               RETURNING entity, crm_id, erp_id, field, reason""",
            [now, now],
        ).fetchall()
    finally:
        con.unregister("_rej")
    open_count = con.execute("SELECT count(*) FROM rejections WHERE resolved_at IS NULL").fetchone()
    # What a notice lists (sync_pipeline.alerts): the rejections this plan opened, in a stable
    # order; one still open from an earlier plan is not new.
    new = sorted(
        (dict(zip(("entity", "crm_id", "erp_id", "field", "reason"), row, strict=True))
         for row in opened),
        key=lambda r: tuple(str(r[k] or "") for k in ("entity", "crm_id", "erp_id", "field")),
    )  # fmt: skip
    return {
        "opened": len(new),
        "resolved": int(resolved),
        "open": int(open_count[0]),
        "new": new,
    }


def record_conflicts(con: duckdb.DuckDBPyConnection, plan: pd.DataFrame, run_id: str) -> int:
    """Keep every conflict decision with both values (once per distinct conflict), including one
    whose winning value is refused (a `reject` row: the winner is the side whose value it is);
    returns how many are new. The planner keeps a `newest` decision while neither value
    changes (`decide._prior_decisions`), so `winner` must say who won, not what was sent.

    `conflicts` is the history. The decision the planner reads is also kept per field in
    `conflict_decisions`, replaced only by a different conflict (other values), so that a
    conflict seen again keeps the winner and the time of its first sighting."""
    if plan.empty or "conflict" not in plan:
        return 0
    mask = plan["conflict"].fillna(False).astype(bool).to_numpy()
    rows = plan[mask]
    if rows.empty:
        return 0
    ops, news, crms = _texts(rows, "op"), _texts(rows, "new_value"), _texts(rows, "crm_value")
    winners = [
        "crm" if op == "update_erp" or (op == "reject" and new == crm) else "erp"
        for op, new, crm in zip(ops, news, crms, strict=True)
    ]
    frame = pd.DataFrame(
        {
            "entity": _texts(rows, "entity"),
            "crm_id": _texts(rows, "crm_id"),
            "erp_id": _texts(rows, "erp_id"),
            "field": _texts(rows, "field"),
            "crm_value": _texts(rows, "crm_value"),
            "erp_value": _texts(rows, "erp_value"),
            "baseline_value": _texts(rows, "baseline_value"),
            "winner": winners,
            "policy": _texts(rows, "policy"),
            "crm_modified": _naive_utc_column(rows, "crm_modified"),
            "erp_modified": _naive_utc_column(rows, "erp_modified"),
            "op_key": op_keys(rows),
        }
    ).drop_duplicates("op_key")
    now = utcnow()
    duck.register(con, "_conflict_rows", frame)
    decisions = frame.drop_duplicates(["entity", "erp_id", "field"], keep="last")
    duck.register(con, "_decision_rows", decisions)
    try:
        res = con.execute(
            """INSERT INTO conflicts
               SELECT ?, ?, entity, crm_id, erp_id, field, crm_value, erp_value, baseline_value,
                      winner, policy, crm_modified, erp_modified, op_key
               FROM _conflict_rows
               ON CONFLICT (op_key) DO NOTHING""",
            [now, run_id],
        ).fetchone()
        con.execute(
            """INSERT INTO conflict_decisions
               SELECT entity, erp_id, field, crm_value, erp_value, baseline_value, winner, ?
               FROM _decision_rows WHERE policy = 'newest' AND erp_id IS NOT NULL
               ON CONFLICT (entity, erp_id, field) DO UPDATE
               SET crm_value = excluded.crm_value, erp_value = excluded.erp_value,
                   baseline_value = excluded.baseline_value, winner = excluded.winner,
                   seen_at = excluded.seen_at
               WHERE conflict_decisions.crm_value IS DISTINCT FROM excluded.crm_value
                  OR conflict_decisions.erp_value IS DISTINCT FROM excluded.erp_value
                  OR conflict_decisions.baseline_value IS DISTINCT FROM excluded.baseline_value""",
            [now],
        )
    finally:
        con.unregister("_conflict_rows")
        con.unregister("_decision_rows")
    return int(res[0]) if res else 0


def _naive_utc_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A timestamp column as naive UTC (what the TIMESTAMP columns hold)."""
    if name not in frame:
        return pd.Series([pd.NaT] * len(frame), dtype="datetime64[us]")
    values = pd.to_datetime(frame[name], utc=True).dt.tz_localize(None)
    return values.reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# History retention
# ------------------------------------------------------------------------------------------------
# The tables that only grow, each with the time a row became history and which rows are finished:
# anything a run still acts on (an operation pending, deferred, failed, in flight, in doubt or
# refused; a rejection or a bad record not yet resolved) is kept whatever its age.
HISTORY = (
    ("audit_log", "logged_at", "TRUE"),
    ("conflicts", "seen_at", "TRUE"),
    ("outbox", "coalesce(applied_at, created_at)", "status IN ('applied', 'superseded')"),
    ("rejections", "resolved_at", "resolved_at IS NOT NULL"),
    ("bad_records", "resolved_at", "resolved_at IS NOT NULL"),
)


@dataclass
class PruneResult:
    cutoff: datetime | None  # None: retention is off (keep_days 0)
    deleted: dict[str, int]
    kept: dict[str, int]


def prune_history(
    con: duckdb.DuckDBPyConnection, keep_days: int, *, now: datetime | None = None
) -> PruneResult:
    """Delete finished history older than `keep_days` days (0 keeps everything), in one
    transaction. No run needs these rows: the planner reads a `newest` conflict's kept decision
    from `conflict_decisions`, apply reads an applied creation only until the next cycle's link
    step links the created record, and `enqueue` numbers a new occurrence past the ones still
    kept."""
    if keep_days < 0:
        raise ValueError(f"keep_days must be 0 (keep everything) or more, not {keep_days}")
    cutoff = None if keep_days == 0 else (now or utcnow()) - timedelta(days=keep_days)
    deleted = {table: 0 for table, _, _ in HISTORY}
    if cutoff is not None:
        with transaction(con):
            for table, when, finished in HISTORY:
                (n,) = con.execute(
                    f"DELETE FROM {table} WHERE {finished} AND {when} < ?", [cutoff]
                ).fetchone()
                deleted[table] = int(n)
    kept = {
        table: int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        for table, _, _ in HISTORY
    }
    return PruneResult(cutoff, deleted, kept)
