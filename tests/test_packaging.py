"""How the project installs: the product's runtime dependencies (starlette and uvicorn among them:
the webhook receiver serves with them), the local servers as a distribution of their own
(sync-devservers, in devservers/) that the product never imports and its wheel never contains,
`dg check defs` passing, and a clear message when a local-server command misses a package."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from devservers import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEVSERVERS = tomllib.loads((ROOT / "devservers" / "pyproject.toml").read_text())
# The local servers' and benchmarks' own packages: never the product's.
NOT_PRODUCT = {"sync-devservers", "limits", "odata-query", "psutil"}
# The webhook receiver is product code: it serves with these, the local servers too.
RECEIVER = {"starlette", "uvicorn"}


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in requirements}


def test_the_runtime_dependencies_leave_out_the_local_servers_and_benchmarks_packages():
    project = PYPROJECT["project"]
    assert _names(project["dependencies"]) & NOT_PRODUCT == set()
    assert _names(project["dependencies"]) >= RECEIVER
    extras = project["optional-dependencies"]
    assert "emulators" not in extras
    assert {"sync-devservers", "psutil"} <= _names(extras["bench"])
    assert {"dagster-postgres", "psycopg2-binary"} <= _names(extras["postgres"])
    # `make` installs `.[dev]` and ./devservers: `make demo` and `make test` need every extra.
    dev = [Requirement(r) for r in extras["dev"]]
    assert "sync-devservers" in {r.name for r in dev}
    assert {"bench", "postgres"} <= {e for r in dev if r.name == "sync-pipeline" for e in r.extras}
    # uv takes sync-devservers from its folder (it is on no index).
    assert PYPROJECT["tool"]["uv"]["sources"]["sync-devservers"] == {
        "path": "devservers",
        "editable": True,
    }


def test_the_local_servers_are_a_distribution_that_depends_on_the_product():
    project = DEVSERVERS["project"]
    assert project["name"] == "sync-devservers"
    assert {"sync-pipeline", "limits", "odata-query"} | RECEIVER <= _names(project["dependencies"])
    assert project["scripts"] == {"sync-devservers": "devservers.cli:main"}
    assert (ROOT / "devservers" / "src" / "devservers" / "run.py").is_file()


def _imports(path: Path) -> set[str]:
    """Top-level names of every import in the file, function-level ones included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_the_product_never_imports_the_local_servers_or_their_packages():
    modules = {"devservers", "limits", "odata_query", "psutil"}
    product = ROOT / "sync_pipeline"
    offending = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & modules)
        for path in product.rglob("*.py")
    }
    assert {p: m for p, m in offending.items() if m} == {}
    assert not (product / "emulators").exists() and not (product / "demo.py").exists()


_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".data", ".dagster_home", "__pycache__", "*.egg-info", "build", "dist",
    "*.duckdb*", ".pytest_cache", ".ruff_cache", ".hypothesis", "tmp*",
)  # fmt: skip


def test_the_product_wheel_contains_no_local_server_module(tmp_path):
    """The wheel pip builds from the repository (devservers/ beside sync_pipeline/ included)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sync_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sync_pipeline/cli.py" in names and "sync_pipeline/schema/__init__.py" in names
    packages = {n.partition("/")[0] for n in names if not n.startswith("sync_pipeline-")}
    assert packages == {"sync_pipeline"}
    servers = ("emulators", "demo.py", "crm_server", "unleashed_server", "devservers")
    assert [n for n in names if any(s in n for s in servers)] == []


def test_a_local_server_command_missing_a_server_package_says_how_to_install_it(
    monkeypatch, capsys
):
    def missing(args):
        raise ModuleNotFoundError("No module named 'odata_query'", name="odata_query")

    monkeypatch.setattr(cli, "run_serve", missing)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "sync-devservers serve" in err and "odata_query" in err
    assert "pip install -e ./devservers" in err


def test_another_missing_module_is_not_blamed_on_the_server_packages(monkeypatch):
    def missing(args):
        raise ModuleNotFoundError("No module named 'nonexistent'", name="nonexistent")

    monkeypatch.setattr(cli, "run_serve", missing)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["serve"])


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
