"""The YAML mapping: loads, refuses bad entries with a message naming file/entry/problem, and a
field added only in YAML is synced end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sync_pipeline import diff, links
from sync_pipeline.mapping import MappingError, crm_side, erp_side, load_mapping, load_mappings
from sync_pipeline.mapping.normalise import normalise_phone, normalise_website
from sync_pipeline.mapping.validate import check_unleashed_website
from tests.diff_fixtures import MAPPINGS_DIR, World, one

COMPANY = (MAPPINGS_DIR / "company.yaml").read_text()


def test_shipped_mappings_load_with_the_specified_fields():
    m = load_mappings(MAPPINGS_DIR)
    assert list(m["company"].fields) == ["name", "phone", "website", "account_manager"]
    assert list(m["contact"].fields) == [
        "first_name", "last_name", "email", "phone", "mobile", "fax",
    ]  # fmt: skip
    am = m["company"].fields["account_manager"]
    assert (am.crm, am.erp, am.option) == ("AccountManager.Email", "SalesPerson.Email",
                                           "account_manager_sync")  # fmt: skip
    assert am.crm_write.field == "AccountManagerId" and am.erp_write.field == "SalesPerson"
    assert m["company"].crm.expand == ["AccountManager($select=UserId,Email)"]


def _bad(tmp_path: Path, old: str, new: str) -> str:
    text = COMPANY.replace(old, new, 1)
    assert text != COMPANY, f"fixture text {old!r} not found"
    path = tmp_path / "company.yaml"
    path.write_text(text)
    with pytest.raises(MappingError) as err:
        load_mapping(path)
    return str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "entry", "problem"),
    [
        (
            "    normaliser: phone\n",
            "    normaliser: phone\n    colour: red\n",
            "fields.phone",
            "unknown key 'colour'",
        ),
        (
            "    normaliser: name\n",
            "    normaliser: name\n    direction: sideways\n",
            "fields.name.direction",
            "bad direction 'sideways'",
        ),
        (
            "    normaliser: phone\n",
            "    normaliser: telephone\n",
            "fields.phone.normaliser",
            "bad normaliser 'telephone'",
        ),
        (
            "    validator: unleashed_website\n",
            "    validator: is_url\n",
            "fields.website.validator",
            "bad validator 'is_url'",
        ),
        (
            "  conflict_policy: newest",
            "  conflict_policy: loudest",
            "defaults.conflict_policy",
            "bad conflict_policy 'loudest'",
        ),
        (
            "    erp: PhoneNumber\n",
            '    erp: "PhoneNumber\'; DROP TABLE x; --"\n',
            "fields.phone.erp",
            "unsafe identifier",
        ),
        ("    crm: Website\n", "    crm: Web site\n", "fields.website.crm", "unsafe identifier"),
        ("  website:\n", "  phone:\n", "fields.phone", "duplicate key on line"),
    ],
)
def test_bad_mapping_entries_fail_at_load_naming_file_entry_and_problem(
    tmp_path, old, new, entry, problem
):
    message = _bad(tmp_path, old, new)
    assert str(tmp_path / "company.yaml") in message
    assert f": {entry}" in message
    assert problem in message


def test_two_fields_on_one_path_are_refused(tmp_path):
    message = _bad(tmp_path, "    erp: Website\n", "    erp: PhoneNumber\n")
    assert "'phone' and 'website' both map the erp path 'PhoneNumber'" in message


def test_projection_sql_reads_every_mapped_field_by_json_path():
    m = load_mappings(MAPPINGS_DIR)
    assert "'$.AccountManager.Email'" in crm_side(m["company"])
    assert "'$.SalesPerson.Email'" in erp_side(m["company"])
    w = World()
    w.crm_company(12, "Acme", phone="020 7946 0000", manager="ann@x.com")
    row = w.con.execute(crm_side(m["company"])).df().iloc[0]
    assert (row["crm_id"], row["name"], row["phone"], row["website"], row["account_manager"]) == (
        "12", "Acme", "020 7946 0000", "", "ann@x.com",
    )  # fmt: skip


def test_normalisers_decide_equality_only():
    assert normalise_phone("+44 20 7946 0000") == normalise_phone("020 7946 0000")
    assert normalise_phone("not a number") == "not a number"
    assert normalise_website("Example.com/") == normalise_website("https://example.com")
    assert normalise_website("https://example.com/Shop") != normalise_website("example.com/shop")


def test_unleashed_website_rule():
    assert check_unleashed_website("https://acme.com/x") is None
    assert check_unleashed_website("acme .com") == "contains a space"
    assert "absolute" in check_unleashed_website("acme.com")
    assert "dotted host" in check_unleashed_website("https://acme")


def test_a_field_added_only_in_yaml_is_synced_end_to_end(tmp_path):
    shutil.copy(MAPPINGS_DIR / "contact.yaml", tmp_path / "contact.yaml")
    (tmp_path / "company.yaml").write_text(
        COMPANY + "  fax:\n    crm: Fax\n    erp: FaxNumber\n    normaliser: phone\n"
    )
    w = World(mappings_dir=tmp_path)
    w.crm_company(12, "Acme", code="ACME", Fax="020 7946 0001")
    w.customer("g-1", "ACME", "Acme", FaxNumber="+44 20 7946 0001")
    links.update_links(w.con, w.mappings)
    assert diff.plan_changes(w.con, w.mappings).empty  # same number, different spelling
    w.edit("crm_companies", "12", Fax="020 7946 9999")
    plan = diff.plan_changes(w.con, w.mappings)
    row = one(plan, field="fax")
    assert (row["op"], row["new_value"], row["erp_value"]) == (
        "update_erp", "020 7946 9999", "+44 20 7946 0001",
    )  # fmt: skip


def test_phone_fast_path_agrees_with_phonenumbers():
    """The GB fast path in normalise_phone gives exactly what phonenumbers gives, for many
    random spellings (separators anywhere, +44 / 0 / (0) / 00 prefixes, odd lengths)."""
    import random

    import phonenumbers

    from sync_pipeline.mapping.normalise import _fast_phone, normalise_text

    def slow(text: str) -> str:
        try:
            parsed = phonenumbers.parse(text, "GB")
        except phonenumbers.NumberParseException:
            return text
        out = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
        return out + (f";ext={parsed.extension}" if parsed.extension else "")

    rng = random.Random(7)
    prefixes = ["+44", "0", "+44 (0)", "(+44)", "0044", "44", "+440", "00", "+4", "", "(0)"]
    fast_hits = 0
    for _ in range(20000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.choice([8, 9, 10, 10, 11])))
        if rng.random() < 0.7:
            digits = rng.choice("1235789") + digits[1:]
        chars = list(rng.choice(prefixes) + digits)
        for _ in range(rng.randint(0, 4)):
            chars.insert(rng.randint(0, len(chars)), rng.choice(" -.()/  "))
        text = normalise_text("".join(chars))
        if not text:
            continue
        fast = _fast_phone(text, "GB")
        if fast is not None:
            fast_hits += 1
            assert fast == slow(text), text
    assert fast_hits > 2000
    assert _fast_phone("020 7946 0000", "US") is None
    assert normalise_phone("+44 20 7946 0000", "US") == "+442079460000"
