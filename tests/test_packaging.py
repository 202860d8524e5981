"""How the project installs: runtime dependencies without the local servers' and benchmarks'
own packages (starlette and uvicorn are runtime: the webhook receiver serves with them), `dg check
defs` passing, and a clear message when a command needs a missing extra."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from sync_pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRA_ONLY = {"limits", "odata-query", "psutil"}
# The webhook receiver is product code: it serves with these, the local servers too.
RECEIVER = {"starlette", "uvicorn"}


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in requirements}


def test_the_runtime_dependencies_leave_the_local_servers_and_benchmarks_packages_to_extras():
    project = PYPROJECT["project"]
    assert _names(project["dependencies"]) & EXTRA_ONLY == set()
    assert _names(project["dependencies"]) >= RECEIVER
    extras = project["optional-dependencies"]
    assert {"limits", "odata-query"} <= _names(extras["emulators"])
    assert "psutil" in _names(extras["bench"])
    assert {"dagster-postgres", "psycopg2-binary"} <= _names(extras["postgres"])
    # `make` installs `.[dev]`, which has every extra: `make demo` and `make test` need them.
    dev = [Requirement(r) for r in extras["dev"]]
    assert {"emulators", "bench", "postgres"} <= {
        e for r in dev if r.name == "sync-pipeline" for e in r.extras
    }


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_the_product_imports_the_extras_packages_only_in_the_local_servers():
    modules = {"odata_query" if n == "odata-query" else n for n in EXTRA_ONLY}
    product = ROOT / "sync_pipeline"
    offending = {
        str(path.relative_to(ROOT)): sorted(_top_level_imports(path) & modules)
        for path in product.rglob("*.py")
        if "emulators" not in path.relative_to(product).parts
    }
    assert {p: m for p, m in offending.items() if m} == {}


def test_a_local_server_command_without_the_emulators_extra_says_how_to_install_it(
    monkeypatch, capsys
):
    def missing(args):
        raise ModuleNotFoundError("No module named 'odata_query'", name="odata_query")

    monkeypatch.setattr(cli, "run_emulators", missing)
    assert cli.main(["emulators"]) == 2
    err = capsys.readouterr().err
    assert "emulators` extra" in err and "odata_query" in err
    assert "pip install 'sync-pipeline[emulators]'" in err


def test_another_missing_module_is_not_blamed_on_the_extra(monkeypatch):
    def missing(args):
        raise ModuleNotFoundError("No module named 'nonexistent'", name="nonexistent")

    monkeypatch.setattr(cli, "run_emulators", missing)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["emulators"])


def test_dg_check_defs_passes():
    """The project's `[tool.dg]` table lets Dagster's `dg` CLI find and load the definitions."""
    dg_cli = Path(sys.executable).parent / "dg"
    result = subprocess.run(
        [str(dg_cli), "check", "defs"], cwd=ROOT, capture_output=True, text=True, timeout=240
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "All definitions loaded successfully" in result.stdout + result.stderr


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_uv_lock_pins_what_constraints_txt_pins():
    """`make` installs from constraints.txt and `uv sync` from uv.lock: the same versions."""
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        pinned[_normal(name)] = version
    locked: dict[str, set[str]] = {}
    for package in tomllib.loads((ROOT / "uv.lock").read_text())["package"]:
        locked.setdefault(_normal(package["name"]), set()).add(package.get("version"))
    assert {n: (v, locked.get(n)) for n, v in pinned.items() if v not in locked.get(n, ())} == {}
    # The lock is of this pyproject: the same runtime dependencies and extras.
    project = next(
        p
        for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]
        if p["name"] == "sync-pipeline"
    )
    assert {_normal(d["name"]) for d in project["dependencies"]} == {
        _normal(n) for n in _names(PYPROJECT["project"]["dependencies"])
    }
    assert set(project["metadata"]["provides-extras"]) == set(
        PYPROJECT["project"]["optional-dependencies"]
    )
