"""Named SQL stages: how a planning pass runs its statements.

A pass is a chain of statements that hand temporary tables and views to each other by name.
Each statement runs here as a stage with a name (`company.scan`), the temporary objects it reads
declared, and the one it makes (if any). The runner

- refuses a stage that reads a temporary object no earlier stage of the pass made (or one
  already dropped), so the hand-offs between modules are checked rather than assumed;
- owns every temporary object the stages make, and drops them itself (`drop`, `close`): no
  module drops a table another created;
- times each stage; `timings()` sums them by name for the run metadata and the benchmark.

A view costs nothing when it is made; its time lands in the stages that read it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import duckdb


class StageError(RuntimeError):
    """A stage read a temporary object that no earlier stage made."""


class Stages:
    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self._made: dict[str, str] = {}  # name -> TABLE or VIEW, in the order made
        self._seconds: dict[str, float] = {}
        self._order: list[str] = []

    # -- running ---------------------------------------------------------------------------------
    def table(self, stage: str, name: str, sql: str, *, reads: Sequence[str] = ()) -> None:
        """`CREATE OR REPLACE TEMP TABLE name AS sql`."""
        self._check(stage, reads)
        with self.timed(stage):
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {sql}")
        self._made[name] = "TABLE"

    def empty_table(self, stage: str, name: str, columns: str) -> None:
        """`CREATE OR REPLACE TEMP TABLE name (columns)`, for a stage to fill later."""
        with self.timed(stage):
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} ({columns})")
        self._made[name] = "TABLE"

    def view(self, stage: str, name: str, sql: str, *, reads: Sequence[str] = ()) -> None:
        """`CREATE OR REPLACE TEMP VIEW name AS sql`."""
        self._check(stage, reads)
        with self.timed(stage):
            self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")
        self._made[name] = "VIEW"

    def run(
        self,
        stage: str,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        reads: Sequence[str] = (),
    ) -> list[tuple]:
        """Any other statement (INSERT, DELETE, a query); returns its rows, if any."""
        self._check(stage, reads)
        with self.timed(stage):
            cursor = self.con.execute(sql, params or [])
            try:
                return cursor.fetchall()
            except duckdb.InvalidInputException:
                return []  # a statement without a result set

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Time a stage that is Python work between statements (or several statements)."""
        if stage not in self._seconds:
            self._seconds[stage] = 0.0
            self._order.append(stage)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[stage] += time.perf_counter() - t0

    # -- ownership -------------------------------------------------------------------------------
    def made(self, name: str) -> bool:
        return name in self._made

    def drop(self, *names: str) -> None:
        """Drop temporary objects the stages made (views first: they may read the tables)."""
        for name in sorted(names, key=lambda n: self._made.get(n) != "VIEW"):
            kind = self._made.pop(name, None)
            if kind is None:
                raise StageError(f"drop {name}: no stage of this pass made it")
            self.con.execute(f"DROP {kind} IF EXISTS {name}")

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Drop, when the block ends, the temporary objects its stages made."""
        before = set(self._made)
        try:
            yield
        finally:
            self.drop(*[n for n in self._made if n not in before])

    def close(self) -> None:
        """Drop everything still held, the last made first."""
        for name in reversed(list(self._made)):
            kind = self._made.pop(name)
            self.con.execute(f"DROP {kind} IF EXISTS {name}")

    def _check(self, stage: str, reads: Sequence[str]) -> None:
        missing = [r for r in reads if r.startswith("_") and r not in self._made]
        if missing:
            raise StageError(
                f"stage {stage} reads {', '.join(missing)}, which no earlier stage of this pass "
                "made (or which was dropped)"
            )

    # -- figures ---------------------------------------------------------------------------------
    def timings(self) -> dict[str, float]:
        """Seconds per stage, in the order the stages first ran."""
        return {name: self._seconds[name] for name in self._order}
