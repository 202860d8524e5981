"""`sync-pipeline compact` as an operator runs it after a first large pruning: the file gets smaller
and holds exactly what it held; a file another process has open, or a copy that fails or comes
out different, leaves the original as it was and no copy behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest

from devservers.run import Emulators
from sync_pipeline import compact as compact_module
from sync_pipeline import store
from sync_pipeline.cli import main
from tests.harness import Harness

HOLD_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Emulators, Path]]:
    """The local servers, and a sync database after one real cycle on them that was then given a
    year of history and pruned by the product (`store.prune_history`): most of its blocks are
    free. Tests work on copies of the file."""
    work = tmp_path_factory.mktemp("pruned")
    with Emulators(companies=30, seed=7) as emu:
        harness = Harness(emu, work)
        try:
            harness.cycle()
        finally:
            harness.close()
        with store.connect(harness.db) as con:
            add_old_history(con)
            con.execute("CHECKPOINT")
            grown = harness.db.stat().st_size
            pruned = store.prune_history(con, keep_days=30)
        assert sum(pruned.deleted.values()) > 250_000
        assert harness.db.stat().st_size > 0.8 * grown  # DuckDB keeps most freed blocks in the file
        yield emu, harness.db


def add_old_history(con: duckdb.DuckDBPyConnection) -> None:
    """A year of audit log, conflicts and applied operations, as a busy deployment keeps before
    its first pruning; plus a plan large enough for its column compression choice to show."""
    con.execute(
        """INSERT INTO audit_log
           SELECT logged_at - INTERVAL (40 + i % 300) DAY, run_id, op_id || '-' || i, entity,
                  crm_id, erp_id, field, old_value || repeat('.', 60), new_value || i, direction,
                  reason
           FROM audit_log, range(5000) AS r(i)"""
    )
    con.execute(
        """INSERT INTO conflicts
           SELECT now()::TIMESTAMP - INTERVAL (40 + i % 300) DAY, 'old-run', 'company', 'c' || i,
                  'e' || i, 'name', 'CRM name ' || i, 'ERP name ' || i, 'Old name ' || i, 'crm',
                  'newest', NULL, NULL, 'old-conflict-' || i
           FROM range(50000) AS r(i)"""
    )
    con.execute(
        """INSERT INTO outbox (op_id, op_key, run_id, created_at, entity, op, erp_id, field,
                               new_value, status, attempts, applied_at)
           SELECT 'old-op-' || i, 'old-key-' || i, 'old-run',
                  now()::TIMESTAMP - INTERVAL (41 + i % 300) DAY, 'company', 'update', 'e' || i,
                  'name', 'value ' || i, 'applied', 1,
                  now()::TIMESTAMP - INTERVAL (40 + i % 300) DAY
           FROM range(50000) AS r(i)"""
    )
    con.execute(
        """INSERT INTO sync_plan (entity, op, field, reason)
           SELECT 'company', 'update', 'name', 'changed in the CRM' FROM range(20000)"""
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def contents(path: Path) -> dict[str, object]:
    """Every table's definition, columns and rows (sorted), the indexes and sequences."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = [t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        out: dict[str, object] = {
            f"rows of {t}": sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
            for t in tables
        }
        for what, sql in {
            "tables": "SELECT table_name, sql FROM duckdb_tables()",
            "columns": "SELECT table_name, column_index, column_name, data_type, column_default, "
            "is_nullable FROM duckdb_columns() WHERE NOT internal",
            "constraints": "SELECT table_name, constraint_type, constraint_text "
            "FROM duckdb_constraints()",
            "indexes": "SELECT index_name, sql FROM duckdb_indexes()",
            "sequences": "SELECT sequence_name FROM duckdb_sequences()",
        }.items():
            out[what] = sorted(con.execute(sql).fetchall(), key=repr)
        return out
    finally:
        con.close()


def leftovers(path: Path) -> set[str]:
    """Files next to the database other than it and the lock file the sync runs share."""
    return {p.name for p in path.parent.iterdir()} - {path.name, path.name + ".lock"}


def copy_of(world: tuple[Emulators, Path], tmp_path: Path) -> Path:
    db = tmp_path / "sync.duckdb"
    shutil.copyfile(world[1], db)
    return db


def test_compact_gives_the_space_back_and_keeps_every_table_and_row(
    world: tuple[Emulators, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = copy_of(world, tmp_path)
    before_bytes, before_size, before = digest(db), db.stat().st_size, contents(db)

    assert main(["compact", "--database", str(db)]) == 0

    out = capsys.readouterr().out
    after_size = db.stat().st_size
    assert after_size < before_size * 0.6, (before_size, after_size)
    assert contents(db) == before
    backup = tmp_path / "sync.duckdb.before-compact"
    assert digest(backup) == before_bytes  # the original, byte for byte
    assert leftovers(db) == {backup.name}
    tables = len([k for k in before if k.startswith("rows of ")])
    assert f"Compacted {db} in " in out
    assert f"size before:   {before_size / 1e6:,.1f} MB" in out
    assert f"size after:    {after_size / 1e6:,.1f} MB" in out
    assert f"tables copied: {tables} (" in out
    assert f"backup:        {backup} " in out

    con = duckdb.connect(str(db))
    try:
        for duplicate in (
            "INSERT INTO crm_companies SELECT * FROM crm_companies LIMIT 1",
            "INSERT INTO outbox SELECT * FROM outbox LIMIT 1",
            "INSERT INTO conflicts (op_key) VALUES ('k'), ('k')",
            "INSERT INTO conflict_decisions (entity, erp_id, field) "
            "VALUES ('company', 'e', 'name'), ('company', 'e', 'name')",
        ):
            with pytest.raises(duckdb.ConstraintException):
                con.execute(duplicate)
        # The plan's text columns stay as the product declared them (USING COMPRESSION
        # uncompressed), which a schema re-created from EXPORT DATABASE would not keep.
        compression = con.execute(
            """SELECT DISTINCT compression FROM pragma_storage_info('sync_plan')
               WHERE column_name = 'entity' AND segment_type = 'VARCHAR'"""
        ).fetchall()
        assert compression == [("Uncompressed",)]
    finally:
        con.close()

    # The product goes on with the compact file: a sync cycle runs on it.
    harness = Harness(world[0], tmp_path)
    try:
        harness.cycle()
    finally:
        harness.close()


def test_no_backup_keeps_only_the_compact_file_and_the_path_comes_from_the_environment(
    world: tuple[Emulators, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = copy_of(world, tmp_path)
    before = contents(db)
    db.chmod(0o640)
    if os.geteuid() == 0:  # the daemon's user keeps its file when root compacts it
        os.chown(db, 65534, 65534)
    owner = db.stat()
    monkeypatch.setenv("SYNC_DUCKDB_PATH", str(db))

    assert main(["compact", "--no-backup"]) == 0

    assert "backup:        none (--no-backup)" in capsys.readouterr().out
    assert leftovers(db) == set()
    assert contents(db) == before
    after = db.stat()
    assert after.st_ino != owner.st_ino  # a new file ...
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        owner.st_mode, owner.st_uid, owner.st_gid,
    )  # fmt: skip


def test_the_installed_command_compacts(world: tuple[Emulators, Path], tmp_path: Path) -> None:
    db = copy_of(world, tmp_path)
    size = db.stat().st_size
    command = Path(sys.executable).with_name("sync-pipeline")
    result = subprocess.run(
        [str(command), "compact", "--database", str(db)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"Compacted {db} in " in result.stdout
    assert db.stat().st_size < size
    assert (tmp_path / "sync.duckdb.before-compact").stat().st_size == size


HOLDERS = {
    # a Dagster run: store.connect takes the lock file, then DuckDB's lock
    "a sync run": "from sync_pipeline import store\n"
    "with store.connect(sys.argv[1]):\n"
    "    print('holding', flush=True)\n"
    "    sys.stdin.readline()\n",
    # someone looking at the file with DuckDB: DuckDB's lock alone
    "a read-only DuckDB session": "import duckdb\n"
    "con = duckdb.connect(sys.argv[1], read_only=True)\n"
    "print('holding', flush=True)\n"
    "sys.stdin.readline()\n",
}


@contextmanager
def held(db: Path, code: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys\n" + code, str(db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "holding", (
            process.stderr.read() if process.stderr else ""
        )
        yield process
    finally:
        if process.stdin is not None:
            process.stdin.close()  # the holder reads end of file and lets go
        try:
            process.wait(timeout=HOLD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize("holder", sorted(HOLDERS))
def test_a_file_in_use_is_refused_and_left_alone(
    holder: str,
    world: tuple[Emulators, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = copy_of(world, tmp_path)
    with held(db, HOLDERS[holder]) as process:
        before = digest(db)
        assert main(["compact", "--database", str(db)]) == 1
        err = capsys.readouterr().err
        assert process.poll() is None  # still holding it
        assert digest(db) == before
        assert leftovers(db) == set()
    assert f"{db} is in use" in err
    assert "stop the Dagster daemon/runs first" in err
    if holder == "a read-only DuckDB session":
        assert f"process {process.pid} has it open" in err


RUN_STARTING = (
    "import os, sys\n"
    "from sync_pipeline import store\n"
    "print('starting', flush=True)\n"
    "with store.connect(sys.argv[1], lock_timeout=120) as con:\n"
    "    print(os.stat(sys.argv[1]).st_ino, flush=True)\n"
)


def test_a_run_that_starts_during_the_compaction_waits_and_opens_the_compact_file(
    world: tuple[Emulators, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = copy_of(world, tmp_path)
    real_copy = compact_module._copy_database
    runs: list[subprocess.Popen[str]] = []

    def copy_while_a_run_starts(con: duckdb.DuckDBPyConnection, source: str, target: str) -> None:
        real_copy(con, source, target)
        run = subprocess.Popen(
            [sys.executable, "-c", RUN_STARTING, str(db)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        runs.append(run)
        assert run.stdout is not None and run.stdout.readline().strip() == "starting"
        time.sleep(1)  # the run is now at the sync runs' lock file

    monkeypatch.setattr(compact_module, "_copy_database", copy_while_a_run_starts)
    assert main(["compact", "--database", str(db)]) == 0

    (run,) = runs
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err  # it waited instead of failing on DuckDB's lock
    assert int(out) == db.stat().st_ino  # and then opened the compact file
    assert int(out) != (tmp_path / "sync.duckdb.before-compact").stat().st_ino


def copy_that_fails(con: duckdb.DuckDBPyConnection, source: str, target: str) -> None:
    con.execute(f'CREATE TABLE "{target}".audit_log AS SELECT * FROM "{source}".audit_log')
    raise duckdb.IOException("IO Error: No space left on device")


def copy_that_loses_rows(con: duckdb.DuckDBPyConnection, source: str, target: str) -> None:
    con.execute(f'COPY FROM DATABASE "{source}" TO "{target}"')
    con.execute(
        f'DELETE FROM "{target}".outbox WHERE op_id = (SELECT min(op_id) FROM "{source}".outbox)'
    )


def copy_without_keys(con: duckdb.DuckDBPyConnection, source: str, target: str) -> None:
    tables = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [source]
    ).fetchall()
    for (table,) in tables:
        con.execute(f'CREATE TABLE "{target}".{table} AS SELECT * FROM "{source}".{table}')


@pytest.mark.parametrize(
    ("copy", "reason"),
    [
        (copy_that_fails, "IOException: IO Error: No space left on device"),
        (copy_that_loses_rows, "the copy's rows differ from the original's in main.outbox"),
        (copy_without_keys, "the copy's columns, constraints, tables differ"),
    ],
)
def test_a_failed_copy_leaves_the_original_and_no_copy(
    copy: object,
    reason: str,
    world: tuple[Emulators, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = copy_of(world, tmp_path)
    before = digest(db)
    monkeypatch.setattr(compact_module, "_copy_database", copy)

    assert main(["compact", "--database", str(db)]) == 1

    err = capsys.readouterr().err
    assert f"{db} was not compacted and was not changed: {reason}" in err
    assert digest(db) == before
    assert leftovers(db) == set()


def test_a_missing_file_or_an_old_backup_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.duckdb"
    assert main(["compact", "--database", str(missing)]) == 1
    assert f"{missing}: no database there" in capsys.readouterr().err
    assert not missing.exists()

    db = tmp_path / "sync.duckdb"
    with store.connect(db):
        pass
    (tmp_path / "sync.duckdb.before-compact").write_bytes(b"an earlier backup")
    before = digest(db)
    assert main(["compact", "--database", str(db)]) == 1
    assert "sync.duckdb.before-compact already exists" in capsys.readouterr().err
    assert digest(db) == before
    assert (tmp_path / "sync.duckdb.before-compact").read_bytes() == b"an earlier backup"


def test_rows_still_in_the_write_ahead_log_are_kept(
    world: tuple[Emulators, Path], tmp_path: Path
) -> None:
    db = copy_of(world, tmp_path)
    crashed = (
        "import os, sys\n"
        "from sync_pipeline import store\n"
        "with store.connect(sys.argv[1]) as con:\n"
        "    con.execute(\"INSERT INTO sync_state VALUES ('after-the-checkpoint', 'x', NULL)\")\n"
        "    os._exit(0)  # a run killed before DuckDB checkpointed: the row is only in the WAL\n"
    )
    subprocess.run([sys.executable, "-c", crashed, str(db)], check=True, timeout=120)
    assert Path(str(db) + ".wal").exists()

    assert main(["compact", "--database", str(db)]) == 0

    assert leftovers(db) == {"sync.duckdb.before-compact"}  # no .wal left next to either
    for path in (db, tmp_path / "sync.duckdb.before-compact"):
        con = duckdb.connect(str(path), read_only=True)
        try:
            assert con.execute(
                "SELECT value FROM sync_state WHERE key = 'after-the-checkpoint'"
            ).fetchall() == [("x",)]
        finally:
            con.close()
