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
