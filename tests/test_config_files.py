"""The settings file and the mapping files are read strictly: each problem is refused with a
message naming the file, the key and the problem, and quickly (no local servers needed here; the
run-level twins are in test_bad_input.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sync_pipeline.mapping import MappingError, load_mapping
from sync_pipeline.settings import SettingsError, load_settings
from tests.diff_fixtures import MAPPINGS_DIR

COMPANY = (MAPPINGS_DIR / "company.yaml").read_text()

# Eight levels of nine: 43 million strings once expanded.
ALIAS_BOMB = "\n".join(
    ['  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
)


def _settings_error(tmp_path: Path, content: str | bytes) -> str:
    file = tmp_path / "settings.yaml"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        file.write_text(content)
    with pytest.raises(SettingsError) as raised:
        load_settings(file)
    message = str(raised.value)
    assert str(file) in message
    return message


def _mapping_error(tmp_path: Path, content: str | bytes) -> str:
    file = tmp_path / "company.yaml"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        file.write_text(content)
    with pytest.raises(MappingError) as raised:
        load_mapping(file)
    message = str(raised.value)
    assert str(file) in message
    return message


# ------------------------------------------------------------------------------------------------
# Reading the files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["settings", "mapping"])
def test_a_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path, kind):
    if kind == "settings":
        message = _settings_error(tmp_path, "timezone: Europe/Zürich\n".encode("latin-1"))
        assert "not UTF-8 text (byte 0xfc at offset 18)" in message
    else:
        message = _mapping_error(tmp_path, COMPANY.replace("name", "näme", 1).encode("cp1252"))
        assert "not UTF-8 text (byte 0xe4 at offset" in message


def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_bytes(b"\xef\xbb\xbftimezone: Europe/Paris\n")
    assert load_settings(file).timezone == "Europe/Paris"


@pytest.mark.parametrize("kind", ["settings", "mapping"])
def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, kind):
    start = time.process_time()
    if kind == "settings":
        message = _settings_error(tmp_path, f"conflict_policies:\n{ALIAS_BOMB}\n")
    else:
        message = _mapping_error(tmp_path, f"{COMPANY}bomb:\n{ALIAS_BOMB}\n")
    assert time.process_time() - start < 1
    assert "anchors and aliases" in message and "line " in message, message


def test_a_single_anchor_is_refused_too(tmp_path):
    message = _settings_error(tmp_path, "imports: &window\n  every_minutes: 15\n")
    assert f"{tmp_path / 'settings.yaml'}: line 1: YAML anchors and aliases" in message


def test_a_duplicate_setting_is_refused_naming_both_lines(tmp_path):
    message = _settings_error(
        tmp_path, "two_way_sync: true\nimports:\n  start: '07:00'\n  start: '08:00'\n"
    )
    assert "imports.start: duplicate key on line 4 (first defined on line 3)" in message


def test_unquoted_times_are_the_times_they_say(tmp_path):
    """YAML 1.1 reads 19:00 unquoted as the base-60 number 1140 (which became 00:19)."""
    file = tmp_path / "settings.yaml"
    file.write_text(
        "imports:\n  start: 7:30\n  end: 19:00\novernight_fix_at: 02:15\nhistory_pruning_at: 3:00\n"
    )
    settings = load_settings(file)
    assert f"{settings.imports.start:%H:%M}-{settings.imports.end:%H:%M}" == "07:30-19:00"
    assert f"{settings.overnight_fix_at:%H:%M}" == "02:15"
    assert f"{settings.history_pruning_at:%H:%M}" == "03:00"


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
SETTINGS_CASES = [
    ("time_as_number", "overnight_fix_at: 200\n", "overnight_fix_at", "write it as HH:MM"),
    ("time_with_offset", "history_pruning_at: '03:00+01:00'\n", "history_pruning_at", "HH:MM"),
    ("time_out_of_range", "imports:\n  end: 24:00\n", "imports.end", "hour value is outside"),
    (
        "start_after_end",
        "imports:\n  start: '20:00'\n  end: '19:00'\n",
        "imports",
        "start 20:00 is after end 19:00",
    ),
    ("no_days", "imports:\n  days: []\n", "imports.days", "at least 1 item"),
    ("misspelt_day", "imports:\n  days: [mon, monkey]\n", "imports.days", "'monkey'"),
    ("unknown_region", "default_phone_region: XX\n", "default_phone_region", "'XX'"),
    ("unknown_setting", "two_way_synch: false\n", "two_way_synch", "did you mean 'two_way_sync'?"),
    (
        "unknown_nested_setting",
        "imports:\n  every_minute: 15\n",
        "imports.every_minute",
        "did you mean 'every_minutes'?",
    ),
    ("bad_policy_key_form", "conflict_policies:\n  phone: crm\n", "conflict_policies", "'phone'"),
    (
        "bad_policy",
        "conflict_policies:\n  company.phone: loudest\n",
        "conflict_policies.company.phone",
        "'loudest'",
    ),
]


@pytest.mark.parametrize(
    "case, text, key, problem", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES]
)
def test_a_bad_setting_is_refused_naming_file_key_and_problem(tmp_path, case, text, key, problem):
    message = _settings_error(tmp_path, text)
    assert f"{tmp_path / 'settings.yaml'}: {key}" in message, message
    assert problem in message, message


def test_days_accept_names_and_abbreviations_once_each(tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_text("imports:\n  days: [Monday, tue, Thurs, mon]\n")
    assert load_settings(file).imports.days == ["mon", "tue", "thu"]


def test_a_lowercase_phone_region_is_the_region(tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_text("default_phone_region: ie\n")
    assert load_settings(file).default_phone_region == "IE"


KNOWN = frozenset({"company.name", "company.phone", "company.website", "contact.phone"})


def test_a_misspelt_conflict_policy_field_names_the_closest_fields(tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_text("conflict_policies:\n  company.phnoe: crm\n  contact.phone: newest\n")
    with pytest.raises(SettingsError) as raised:
        load_settings(file, policy_fields=KNOWN)
    assert (
        f"{file}: conflict_policies: unknown field 'company.phnoe'; did you mean "
        "'company.phone' or 'company.name'" in str(raised.value)
    )
    file.write_text("conflict_policies:\n  deal.amount: crm\n")
    with pytest.raises(SettingsError) as raised:
        load_settings(file, policy_fields=KNOWN)
    assert "unknown field 'deal.amount'" in str(raised.value)
    assert "company.name, company.phone, company.website, contact.phone" in str(raised.value)
    file.write_text("conflict_policies:\n  company.phone: crm\n")
    assert load_settings(file, policy_fields=KNOWN).conflict_policies == {"company.phone": "crm"}


def test_the_resource_checks_conflict_policies_against_the_mappings(tmp_path):
    from sync_pipeline.defs.resources import SyncConfigResource

    file = tmp_path / "settings.yaml"
    file.write_text("conflict_policies:\n  contact.emial: crm\n")
    config = SyncConfigResource(settings_file=str(file), mappings_dir=str(MAPPINGS_DIR))
    with pytest.raises(SettingsError) as raised:
        config.settings()
    assert f"{file}: conflict_policies: unknown field 'contact.emial'" in str(raised.value)
    assert "did you mean 'contact.email'" in str(raised.value)
    file.write_text("conflict_policies:\n  contact.email: crm\n")
    assert config.settings().conflict_policies == {"contact.email": "crm"}


def test_only_the_default_settings_file_may_be_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SYNC_SETTINGS_FILE", raising=False)
    assert load_settings().imports.every_minutes == 15  # settings.yaml absent: the defaults
    assert load_settings("settings.yaml").timezone == "Europe/London"
    monkeypatch.setenv("SYNC_SETTINGS_FILE", str(tmp_path / "setings.yaml"))
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert f"{tmp_path / 'setings.yaml'}: no such settings file" in str(raised.value)


def test_saved_settings_read_back_the_same(tmp_path):
    from datetime import time

    from sync_pipeline.settings import ImportWindow, Settings, save_settings

    settings = Settings(
        imports=ImportWindow(start=time(6, 30), end=time.max, days=["sat", "sun"]),
        conflict_policies={"company.phone": "crm"},
    )
    assert load_settings(save_settings(settings, tmp_path / "settings.yaml")) == settings
