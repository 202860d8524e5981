"""The preflight as an operator meets it: `sync-pipeline check` against the local servers over
real sockets, and the `sync/sync_preflight` step every Dagster job starts with. A mapping or a
tenant that does not fit is refused before anything is read into the sync or written, with a message
naming the file, the entry, the missing name and the closest real one; fixing it is enough for
the next run to pass, and editing the mappings makes the next run check again."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest

from devservers.run import Emulators
from sync_pipeline import preflight, schema, store
from sync_pipeline.cli import main
from sync_pipeline.defs.resources import DEFAULT_MAPPINGS
from sync_pipeline.mapping import load_mappings
from sync_pipeline.settings import Settings, save_settings
from tests.harness import Harness, failure_messages, run_failing

WRITES = ("POST", "PATCH", "PUT", "DELETE", "MERGE")


@pytest.fixture
def emu():
    with Emulators(companies=8, seed=5) as emu:
        yield emu


def _mappings(tmp_path: Path, name: str = "mappings") -> Path:
    """A copy of the shipped mapping files, as an operator would keep their own."""
    target = tmp_path / name
    shutil.copytree(DEFAULT_MAPPINGS, target)
    return target


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _check(emu: Emulators, monkeypatch, capsys, mappings: Path, db: Path) -> tuple[int, str]:
    """`sync-pipeline check --database db` with the environment an operator sets."""
    for name, value in emu.env().items():  # CRM_BASE_URL, CRM_TOKEN, UNLEASHED_* ...
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SYNC_MAPPINGS_DIR", str(mappings))
    settings = db.parent / "settings.yaml"
    if not settings.exists():
        save_settings(Settings(), settings)
    monkeypatch.setenv("SYNC_SETTINGS_FILE", str(settings))
    capsys.readouterr()
    code = main(["check", "--database", str(db)])
    out, err = capsys.readouterr()
    return code, out + err


def _errors(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith("ERROR:")]


# ------------------------------------------------------------------------------------------------
# sync-pipeline check
# ------------------------------------------------------------------------------------------------
def test_shipped_mappings_pass_and_the_summary_names_what_the_sync_relies_on(
    emu, tmp_path, monkeypatch, capsys
):
    code, out = _check(emu, monkeypatch, capsys, _mappings(tmp_path), tmp_path / "sync.duckdb")
    assert code == 0, out
    assert out.startswith("Preflight passed."), out
    assert _errors(out) == []
    # The operating company divisions are created in, the role contacts are created with, and
    # the custom-field slots the Unleashed Guids are kept in.
    assert "OperatingCompanyCode 'A' exists in HomeCurrencies" in out
    assert "1 operating company" in out
    assert "RoleCode 'DECISN' exists in ContactRoles" in out
    assert "Link slot DivisionXtras.StandardTextField1" in out
    assert "Link slot ContactXtras.StandardTextField1" in out
    assert f"Result kept in {tmp_path / 'sync.duckdb'}" in out
    assert emu.crm_token not in out and emu.unleashed_api_key not in out


def test_a_misspelt_crm_field_names_file_entry_missing_and_closest_name(
    emu, tmp_path, monkeypatch, capsys
):
    mappings = _mappings(tmp_path)
    company = mappings / "company.yaml"
    _edit(company, "  phone:\n    crm: PhoneNumber\n", "  phone:\n    crm: Phone\n")
    code, out = _check(emu, monkeypatch, capsys, mappings, tmp_path / "sync.duckdb")
    assert code == 1, out
    assert out.startswith("Preflight FAILED: 1 error(s)."), out
    (error,) = _errors(out)
    assert f"{company}: fields.phone.crm" in error
    assert "'Phone' is not a property of Division" in error
    assert re.search(r"closest: .*\bPhoneNumber\b", error), error
    # The failure is kept: sync runs against this database write nothing until it passes.
    with store.connect(tmp_path / "sync.duckdb") as con:
        block = preflight.write_block(con, load_mappings(mappings))
    assert block and "fields.phone.crm" in block


def test_a_tenant_with_two_operating_companies_is_refused(emu, tmp_path, monkeypatch, capsys):
    response = httpx.put(f"{emu.crm_url}/_admin/tenant", json={"operating_companies": 2})
    assert response.status_code == 200, response.text
    code, out = _check(emu, monkeypatch, capsys, _mappings(tmp_path), tmp_path / "sync.duckdb")
    assert code == 1, out
    (error,) = _errors(out)
    assert "CRM tenant" in error and "2 operating companies" in error, error


def test_a_role_code_the_tenant_does_not_have_is_refused_with_the_closest_codes(
    emu, tmp_path, monkeypatch, capsys
):
    mappings = _mappings(tmp_path)
    contact = mappings / "contact.yaml"
    roles = {"DECISN", "ACCNTS", "OTHER"}  # the seeded tenant's ContactRoles codes
    # A near miss: the closest real code is offered.
    _edit(contact, "RoleCode: DECISN", "RoleCode: DECISM")
    code, out = _check(emu, monkeypatch, capsys, mappings, tmp_path / "a.duckdb")
    assert code == 1, out
    (error,) = _errors(out)
    assert f"{contact}: crm.create.values.RoleCode" in error
    assert "'DECISM'" in error and "ContactRoles" in error
    assert re.search(r"closest: .*\bDECISN\b", error), error
    # Nothing like any real code: the operator is still shown codes the tenant has.
    _edit(contact, "RoleCode: DECISM", "RoleCode: NOPE")
    code, out = _check(emu, monkeypatch, capsys, mappings, tmp_path / "b.duckdb")
    assert code == 1, out
    (error,) = _errors(out)
    assert f"{contact}: crm.create.values.RoleCode" in error
    assert "'NOPE'" in error and "ContactRoles" in error
    assert any(re.search(rf"\b{r}\b", error) for r in roles), f"no role code offered: {error}"


def test_a_link_slot_already_holding_other_data_is_refused(emu, tmp_path, monkeypatch, capsys):
    planted = {"DivisionId": 5, "StandardTextField1": "VIP customer"}
    response = httpx.put(f"{emu.crm_url}/_admin/raw/DivisionXtras/5", json=planted)
    assert response.status_code == 200, response.text
    mappings = _mappings(tmp_path)
    code, out = _check(emu, monkeypatch, capsys, mappings, tmp_path / "sync.duckdb")
    assert code == 1, out
    (error,) = _errors(out)
    assert f"{mappings / 'company.yaml'}: crm.link.field" in error
    assert "DivisionXtras.StandardTextField1" in error
    assert "'VIP customer'" in error and "DivisionXtras(5)" in error


def test_refused_credentials_name_the_variable_and_never_echo_the_secret(
    emu, tmp_path, monkeypatch, capsys
):
    wrong = "crm-pat-not-the-right-one-7f3a9c"
    monkeypatch.setattr(emu, "crm_token", wrong)
    code, out = _check(emu, monkeypatch, capsys, _mappings(tmp_path), tmp_path / "sync.duckdb")
    assert code == 1, out
    (error,) = _errors(out)
    assert "CRM_TOKEN" in error and wrong not in out


# ------------------------------------------------------------------------------------------------
# Through Dagster: every job starts with the preflight
# ------------------------------------------------------------------------------------------------
def _writes(emu: Emulators) -> dict[str, dict[str, int]]:
    """The write requests each server has received since its counters were reset."""
    return {
        system: {
            endpoint: n
            for endpoint, n in emu.stats(system)["requests"].items()
            if endpoint.split()[0] in WRITES
        }
        for system in ("crm", "unleashed")
    }


def _reset_counters(emu: Emulators) -> None:
    emu.reset_stats("crm")
    emu.reset_stats("unleashed")


def _snapshot_rows(h: Harness) -> dict[str, int]:
    return {
        t: int(h.query(f"SELECT count(*) AS n FROM {t}").iloc[0]["n"]) for t in schema.RAW_TABLES
    }


def _failed_steps(result) -> set[str]:
    return {e.step_key for e in result.all_events if e.is_step_failure}


def _preflight_meta(h: Harness, result) -> dict:
    return h.materialization_metadata(result, ["sync", "sync_preflight"])


def test_a_run_with_a_misspelt_mapping_stops_at_the_preflight_and_recovers_once_fixed(
    emu, tmp_path
):
    mappings = _mappings(tmp_path)
    company, contact = mappings / "company.yaml", mappings / "contact.yaml"
    _edit(company, "  phone:\n    crm: PhoneNumber\n", "  phone:\n    crm: Phone\n")
    h = Harness(emu, tmp_path, mappings_dir=str(mappings))
    try:
        crm_before = h.crm.get("Divisions", 1)
        _reset_counters(emu)
        result = run_failing(h, "sync_cycle_job")
        assert _failed_steps(result) == {"sync__sync_preflight"}
        text = failure_messages(result)
        assert f"{company}: fields.phone.crm" in text and "PhoneNumber" in text, text[:3000]
        # The preflight asked the CRM (so the counters count), and nobody wrote anything.
        assert emu.stats("crm")["requests"].get("GET /$metadata") == 1
        assert emu.stats("unleashed")["total_requests"] > 0  # its credentials were checked
        assert _writes(emu) == {"crm": {}, "unleashed": {}}
        assert h.crm.get("Divisions", 1) == crm_before
        # Nothing was read into the sync either.
        assert set(_snapshot_rows(h).values()) == {0}

        # Fixed in the file: the next run checks again by itself, passes and syncs.
        _edit(company, "  phone:\n    crm: Phone\n", "  phone:\n    crm: PhoneNumber\n")
        result = h.cycle()
        assert _preflight_meta(h, result)["checked_now"] is True
        assert _snapshot_rows(h)["crm_companies"] > 0
        assert _writes(emu)["crm"], "the first sync writes the standard import to the CRM"

        # Unchanged mappings: the kept result is used, the CRM's $metadata is not read again.
        _reset_counters(emu)
        result = h.push()
        assert _preflight_meta(h, result)["checked_now"] is False
        assert "GET /$metadata" not in emu.stats("crm")["requests"]

        # Any edit of the mappings changes their fingerprint: the next run checks again.
        _edit(contact, "  conflict_policy: newest\n", "  conflict_policy: crm\n")
        result = h.push()
        assert _preflight_meta(h, result)["checked_now"] is True
        assert emu.stats("crm")["requests"].get("GET /$metadata") == 1

        # A mistake made after a passing preflight is caught before anything is written.
        _edit(contact, "    crm: MobilePhoneNumber\n", "    crm: Mobile\n")
        h.crm.patch("Divisions", 1, {"PhoneNumber": "0161 496 0123"})  # a change to push
        _reset_counters(emu)
        result = run_failing(h, "crm_push_job")
        assert _failed_steps(result) == {"sync__sync_preflight"}
        text = failure_messages(result)
        assert f"{contact}: fields.mobile.crm" in text and "MobilePhoneNumber" in text
        assert _writes(emu) == {"crm": {}, "unleashed": {}}
    finally:
        h.close()
