"""`sync-pipeline compact`: rewrite the DuckDB file into a compact copy and put it in place.

DuckDB reuses the blocks that deleted rows free, but never gives them back to the file system:
on DuckDB 1.5.6 a 289 MB file with 90% of its rows deleted stays 290 MB after `CHECKPOINT`,
`VACUUM` and a reopen, while a copy of it is 55 MB. So after a first large pruning the only way to
get the space back is a copy, made here by DuckDB itself (`COPY FROM DATABASE`): it recreates the
catalogue as it is (primary keys, indexes, sequences, defaults, checks, and the per-column
`USING COMPRESSION` choices, which `EXPORT DATABASE`'s schema.sql drops) and copies only live rows.

The copy is made next to the original, checked against it (same tables, columns, constraints and
indexes; same row count and the same content checksum in every table), and only then moved over
the original with `os.replace`. Until that rename nothing has been written to the original but a
checkpoint; on any failure the copy is removed and the original is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
from filelock import FileLock, Timeout

BACKUP_SUFFIX = ".before-compact"
TEMP_SUFFIX = ".compact-tmp"
_COPY = "compact_copy"


class CompactError(Exception):
    """Why the database was not compacted; the message names the file. The file is unchanged."""


@dataclass
class CompactResult:
    database: Path
    size_before: int
    size_after: int
    seconds: float
    backup: Path | None
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows copied


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _size(path: Path) -> int:
    """The database's bytes on disk: the file and its write-ahead log."""
    wal = Path(str(path) + ".wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def _in_use(path: Path, holder: str) -> CompactError:
    return CompactError(
        f"{path} is in use ({holder}): stop the Dagster daemon/runs first (and anything else that "
        "has the file open), then run `sync-pipeline compact` again. The file was not changed."
    )


def _open(path: Path) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path))
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower():
            raise CompactError(f"{path} cannot be opened: {exc}") from exc
        pid = re.search(r"\(PID (\d+)\)", str(exc))
        holder = f"process {pid.group(1)} has it open" if pid else "another process has it open"
        raise _in_use(path, holder) from exc
    except duckdb.Error as exc:
        raise CompactError(f"{path} cannot be opened as a DuckDB database: {exc}") from exc


def _catalogue(con: duckdb.DuckDBPyConnection, db: str) -> dict[str, list[tuple]]:
    """What must come out the same in the copy: every table's definition and columns, the
    constraints, indexes, views, sequences and macros."""
    where = f"database_name = {_literal(db)}"
    queries = {
        "tables": f"SELECT schema_name, table_name, sql FROM duckdb_tables() WHERE {where}",
        "columns": "SELECT schema_name, table_name, column_index, column_name, data_type, "
        f"column_default, is_nullable FROM duckdb_columns() WHERE {where} AND NOT internal",
        "constraints": "SELECT schema_name, table_name, constraint_type, constraint_text "
        f"FROM duckdb_constraints() WHERE {where}",
        "indexes": "SELECT schema_name, table_name, index_name, is_unique, sql "
        f"FROM duckdb_indexes() WHERE {where}",
        "views": f"SELECT schema_name, view_name, sql FROM duckdb_views() WHERE {where} "
        "AND NOT internal",
        "sequences": f"SELECT schema_name, sequence_name FROM duckdb_sequences() WHERE {where}",
        "macros": "SELECT schema_name, function_name, macro_definition FROM duckdb_functions() "
        f"WHERE {where} AND function_type LIKE '%macro%' AND NOT internal",
    }
    return {name: sorted(con.execute(sql).fetchall(), key=repr) for name, sql in queries.items()}


def _contents(con: duckdb.DuckDBPyConnection, db: str, tables: list[tuple]) -> dict[str, tuple]:
    """Per table: (row count, checksum of every row's hash). Order-independent, so the copy may
    store rows in another order; duplicates in tables without a key are counted, not cancelled."""
    out = {}
    for schema, table, _ in tables:
        name = f"{_quote(db)}.{_quote(schema)}.{_quote(table)}"
        out[f"{schema}.{table}"] = con.execute(
            f"SELECT count(*), coalesce(sum(hash(r)::HUGEINT), 0) FROM {name} AS r"
        ).fetchone()
    return out


def _storage_options(con: duckdb.DuckDBPyConnection, db: str) -> str:
    """ATTACH options giving the copy the original's storage version and block size, so the
    compact file opens wherever the original did."""
    (tags,) = con.execute(
        "SELECT tags FROM duckdb_databases() WHERE database_name = ?", [db]
    ).fetchone()
    options = []
    version = (tags or {}).get("storage_version", "").rstrip("+")
    if version:
        options.append(f"STORAGE_VERSION {_literal(version)}")
    for (block_size,) in con.execute(
        "SELECT block_size FROM pragma_database_size() WHERE database_name = ?", [db]
    ).fetchall():
        options.append(f"BLOCK_SIZE {int(block_size)}")
    return f" ({', '.join(options)})" if options else ""


def _differences(before: dict, after: dict) -> list[str]:
    return [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compact(database: str | Path, *, backup: bool = True) -> CompactResult:
    """Replace `database` by a compact copy of itself, keeping the old file as
    `<name>.before-compact` unless `backup` is false. Raises `CompactError` (file unchanged, no
    copy left behind) when the file is missing, in use, or the copy fails or differs."""
    started = time.monotonic()
    path = Path(database).absolute()
    if path.is_symlink():
        raise CompactError(
            f"{path} is a symbolic link: pass the file it points to with --database "
            "(the copy replaces a file, not a link)"
        )
    if not path.is_file():
        raise CompactError(
            f"{path}: no database there (set SYNC_DUCKDB_PATH or pass --database PATH)"
        )
    backup_path = path.with_name(path.name + BACKUP_SUFFIX)
    if backup and (backup_path.exists() or backup_path.is_symlink()):
        raise CompactError(
            f"{backup_path} already exists (the backup of an earlier compaction): move it away "
            f"or delete it, or pass --no-backup. {path} was not changed."
        )
    temp = path.with_name(path.name + TEMP_SUFFIX)
    temp_wal = Path(str(temp) + ".wal")
    size_before = _size(path)

    # The lock file every sync run takes before opening the database (store.connect): holding it
    # makes a run that starts meanwhile wait, and then open the compact file.
    lock = FileLock(str(path) + ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise _in_use(path, f"a sync run holds {path}.lock") from None
    linked = replaced = False
    try:
        con = _open(path)  # DuckDB's own lock: refuses if any other process has the file open
        try:
            rows = _copy_and_check(con, temp)
        finally:
            con.close()
        if temp_wal.exists() or Path(str(path) + ".wal").exists():
            raise _Failed("a write-ahead log was left after the checkpoint")
        original = path.stat()
        os.chmod(temp, stat.S_IMODE(original.st_mode))
        with contextlib.suppress(PermissionError):  # only root may give a file away
            os.chown(temp, original.st_uid, original.st_gid)
        if backup:
            os.link(path, backup_path)  # the original stays whole under the backup name
            linked = True
        os.replace(temp, path)
        replaced = True
        with contextlib.suppress(OSError):
            _fsync_dir(path.parent)  # the rename itself on disk
    except BaseException as exc:
        if not replaced:
            _remove(temp, temp_wal)
            if linked:
                _remove(backup_path)
        if isinstance(exc, _Failed | duckdb.Error | OSError):
            reason = str(exc) if isinstance(exc, _Failed) else f"{type(exc).__name__}: {exc}"
            raise CompactError(f"{path} was not compacted and was not changed: {reason}") from exc
        raise
    finally:
        lock.release()
    return CompactResult(
        database=path,
        size_before=size_before,
        size_after=_size(path),
        seconds=time.monotonic() - started,
        backup=backup_path if backup else None,
        rows=rows,
    )


class _Failed(Exception):
    """The copy cannot replace the original; the message says why."""


def _copy_and_check(con: duckdb.DuckDBPyConnection, temp: Path) -> dict[str, int]:
    """Copy the open database into `temp` and check the copy, as written, against it."""
    _remove(temp, Path(str(temp) + ".wal"))  # left by a killed compaction: ours, under the lock
    con.execute("SET enable_progress_bar = false")
    con.execute("CHECKPOINT")  # the write-ahead log into the file, so the copy has it all
    (source,) = con.execute("SELECT current_database()").fetchone()
    before = _catalogue(con, source)
    expected = _contents(con, source, before["tables"])
    con.execute(f"ATTACH {_literal(str(temp))} AS {_COPY}{_storage_options(con, source)}")
    _copy_database(con, source, _COPY)
    con.execute(f"DETACH {_COPY}")  # checkpoints and closes the copy
    con.execute(f"ATTACH {_literal(str(temp))} AS {_COPY} (READ_ONLY)")
    try:
        after = _catalogue(con, _COPY)
        got = _contents(con, _COPY, after["tables"])
    finally:
        con.execute(f"DETACH {_COPY}")
    if wrong := _differences(before, after):
        raise _Failed(f"the copy's {', '.join(wrong)} differ from the original's")
    if wrong := _differences(expected, got):
        raise _Failed("the copy's rows differ from the original's in " + ", ".join(wrong))
    return {table: int(count) for table, (count, _) in got.items()}


def _copy_database(con: duckdb.DuckDBPyConnection, source: str, target: str) -> None:
    """DuckDB's own copy of everything in `source` (the attached `target` is empty)."""
    con.execute(f"COPY FROM DATABASE {_quote(source)} TO {_quote(target)}")
