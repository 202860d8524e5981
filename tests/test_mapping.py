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
    assert (am.crm, am.erp, am.option) == ("AccountManagerUser.EmailAddress", "SalesPerson.Email",
                                           "account_manager_sync")  # fmt: skip
    # The CRM gets the 3-character user code of the user with that email; the column is NOT
    # NULL, so "no account manager" is written as the house user.
    w = am.crm_write
    assert (w.field, w.table, w.match, w.value, w.blank) == (
        "AccountManager", "crm_users", "EmailAddress", "UserCode", "HSE",
    )  # fmt: skip
    assert am.erp_write.field == "SalesPerson"
    company, contact = m["company"].crm, m["contact"].crm
    assert company.expand == [
        "AccountManagerUser($select=UserCode,EmailAddress)", "SalesLedger($select=CustomerCode)",
    ]  # fmt: skip
    assert (company.modified, contact.modified) == ("LastUpdatedTimestamp",) * 2
    # The Unleashed Guid lives in a custom-field slot of the record's Xtra row.
    assert (company.link.entity_set, company.link.path) == (
        "DivisionXtras", "DivisionXtra.StandardTextField1",
    )  # fmt: skip
    assert (contact.link.entity_set, contact.link.path) == (
        "ContactXtras", "ContactXtra.StandardTextField1",
    )  # fmt: skip
    keys = {k.name: k.crm for k in m["company"].match.keys}
    assert keys == {
        "unleashed_guid": ["DivisionXtra.StandardTextField1"],
        "account_code": ["SalesLedger.CustomerCode"],
    }
    assert m["contact"].match.keys[0].crm == ["ContactXtra.StandardTextField1"]
    # A division is created under a new company group; a contact with the tenant's role.
    assert company.create.values == {"OperatingCompanyCode": "A"}
    parent = company.create.parent
    assert (parent.entity_set, parent.key, parent.values, parent.from_record) == (
        "Companies", "CompanyId", {"TypeId": "CUS"}, {"Name": "Name"},
    )  # fmt: skip
    assert contact.create.values == {"RoleCode": "DECISN"} and contact.create.parent is None


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
            "      to_erp: [unleashed_website]",
            "      to_erp: [unleashed_website, is_url]",
            "fields.website.checks.to_erp.1",
            "bad to_erp 'is_url'",
        ),
        (
            "      to_crm: [crm_website]",
            "      to_crm: [unleashed_website]",  # an Unleashed rule, not one for the CRM
            "fields.website.checks.to_crm.0",
            "bad to_crm 'unleashed_website': expected 'crm_website' or 'email'",
        ),
        (
            "    checks:\n      to_erp: [unleashed_website]",
            "    validator: unleashed_website\n    checks:\n      to_erp: [unleashed_website]",
            "fields.website",
            "unknown key 'validator': list the checks per direction under `checks`",
        ),
        (
            "    normaliser: phone\n",
            "    normaliser: phone\n    multiline: sometimes\n",
            "fields.phone.multiline",
            "valid boolean",
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
        (
            "  link:                      # the Unleashed Guid, kept in a custom-field slot of "
            "the division\n    entity_set: DivisionXtras\n    navigation: DivisionXtra\n"
            "    field: StandardTextField1\n",
            "",
            "crm.link",
            "required key is missing",
        ),
        (
            "      key: CompanyId\n",
            "      key: CompanyId\n      colour: red\n",
            "crm.create.parent",
            "unknown key 'colour'",
        ),
        (
            "    values: {OperatingCompanyCode: A}\n",
            "    values: {OperatingCompanyCode: [A]}\n",
            "crm.create.values.OperatingCompanyCode",
            "valid string",
        ),
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
    assert "'$.AccountManagerUser.EmailAddress'" in crm_side(m["company"])
    assert "'$.PhoneNumber'" in crm_side(m["company"])
    assert "'$.MobilePhoneNumber'" in crm_side(m["contact"])
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


# Unicode's Bidi_Control property (UAX #9): the characters the safety check refuses as
# bidirectional controls, listed here independently of how validate.py finds them.
BIDI_CONTROLS = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def test_safety_check_refuses_exactly_controls_line_breaks_and_bidi_controls():
    """Over every code point: refused in a one-line field are the control characters (C0, DEL,
    C1), the line and paragraph separators and the bidirectional controls; nothing else (other
    format characters such as the zero-width joiner of emoji sequences, no-break spaces, letters
    of every script pass). A multi-line field also takes tab, line feed, carriage return and the
    separators."""
    import unicodedata

    from sync_pipeline.mapping.validate import check_text

    refused, refused_multiline = set(), set()
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        if check_text(chr(cp)) is not None:
            refused.add(cp)
        if check_text(chr(cp), multiline=True) is not None:
            refused_multiline.add(cp)
    controls = {cp for cp in range(0x110000) if unicodedata.category(chr(cp)) == "Cc"}
    assert controls == {*range(0x20), *range(0x7F, 0xA0)}
    assert refused == controls | {0x2028, 0x2029} | BIDI_CONTROLS
    assert refused_multiline == refused - {0x09, 0x0A, 0x0D, 0x2028, 0x2029}


@pytest.mark.parametrize(
    "value, multiline, reason",
    [
        ("Acme\x00", False, "contains the control character U+0000"),
        ("Acme\x1b[2J", True, "contains the control character U+001B"),
        ("Acme\x7f", False, "contains the control character U+007F"),
        ("a\x9bb", False, "contains the control character U+009B"),
        ("two\nlines", False, "contains the control character U+000A (line feed)"),
        ("a\tb", False, "contains the control character U+0009 (tab)"),
        ("a\r\nb", False, "contains the control character U+000D (carriage return)"),
        ("a\u2029b", False, "contains the line separator U+2029 (PARAGRAPH SEPARATOR)"),
        ("invoice\u202efdp.exe", True,
         "contains the bidirectional control character U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("\u2066x\u2069", False,
         "contains the bidirectional control character U+2066 (LEFT-TO-RIGHT ISOLATE)"),
        ("\u061c1", False,
         "contains the bidirectional control character U+061C (ARABIC LETTER MARK)"),
        ("two\nlines\r\n\tindented\u2028", True, None),
        ("Søren Kierkegaard", False, None),
        ("שלום עולם", False, None),  # right-to-left text itself is fine
        ("\U0001f469\u200d\U0001f4bb", False, None),  # the zero-width joiner of an emoji
        ("Jean\u00a0Dupont", False, None),  # a no-break space
        ("", False, None),
    ],
)  # fmt: skip
def test_safety_check_names_the_character_by_its_code_point(value, multiline, reason):
    from sync_pipeline.mapping.validate import check_text

    assert check_text(value, multiline=multiline) == reason


@pytest.mark.parametrize(
    "value, reason",
    [
        ("https://acme.com", None),
        ("HTTP://www.Acme.co.uk/about?x=1#top", None),
        ("https://acme.com:8443/", None),
        ("", None),
        ("javascript:alert(1)", "is not an absolute http:// or https:// address"),
        ("JAVASCRIPT:alert(1)", "is not an absolute http:// or https:// address"),
        ("data:text/html;base64,PHNjcmlwdD4=", "is not an absolute http:// or https:// address"),
        ("vbscript:msgbox", "is not an absolute http:// or https:// address"),
        ("file:///c:/windows", "is not an absolute http:// or https:// address"),
        ("ftp://files.acme.com", "is not an absolute http:// or https:// address"),
        ("acme.com", "is not an absolute http:// or https:// address"),
        ("//acme.com", "is not an absolute http:// or https:// address"),
        (" javascript:alert(1)", "contains a space"),
        ("https://acme", "has no dotted host name"),
        ("https://", "has no dotted host name"),
        ("https://acme.com:port", "is not a valid URL ("),  # then the library's own words
        ("https://acme.com@evil.example", "has a user name or password before its host name"),
    ],
)  # fmt: skip
def test_crm_website_rule(value, reason):
    from sync_pipeline.mapping.validate import check_crm_website

    found = check_crm_website(value)
    assert found == reason or (reason and found and found.startswith(reason)), found


def test_check_value_runs_the_safety_check_first_then_the_named_checks_in_order():
    from sync_pipeline.mapping.validate import ValidationContext, check_value

    assert check_value("javascript:\x00", ["crm_website"]) == (
        "contains the control character U+0000"
    )
    assert check_value("javascript:x", ["crm_website"]) == (
        "is not an absolute http:// or https:// address"
    )
    assert check_value("", ["unleashed_required", "email"]) == (
        "is required by Unleashed and cannot be empty"
    )
    asked = []

    def context():
        asked.append(1)
        return ValidationContext(salesperson_emails=frozenset({"ann@example.com"}))

    assert check_value("Ann@Example.com", ["email", "salesperson_exists"], context=context) is None
    assert check_value("bob@example.com", ["salesperson_exists"], context=context) == (
        "matches no active Unleashed salesperson (by email)"
    )
    assert check_value("x@example.com", ["email"], context=context) is None
    assert len(asked) == 2  # the context is built only for the check that needs it


def test_checks_per_direction_default_by_normaliser_and_the_shipped_mappings_check_both_ways(
    tmp_path,
):
    m = load_mappings(MAPPINGS_DIR)
    company, contact = m["company"].fields, m["contact"].fields
    assert company["website"].checks_to("erp") == ("unleashed_website",)
    assert company["website"].checks_to("crm") == ("crm_website",)
    assert company["name"].checks_to("erp") == ("unleashed_required",)
    assert company["name"].checks_to("crm") == ()
    assert company["account_manager"].checks_to("erp") == ("salesperson_exists",)
    assert contact["email"].checks_to("erp") == contact["email"].checks_to("crm") == ("email",)
    assert not any(spec.multiline for mapping in m.values() for spec in mapping.fields.values())
    # A field that lists no checks takes its normaliser's; `[]` turns a direction's off.
    (tmp_path / "company.yaml").write_text(
        COMPANY
        + "  other_site:\n    crm: Fax\n    erp: FaxNumber\n    normaliser: website\n"
        + "  other_mail:\n    crm: Zz1\n    erp: Zz1\n    normaliser: email\n"
        + "    checks: {to_crm: []}\n"
    )
    fields = load_mapping(tmp_path / "company.yaml").fields
    assert fields["other_site"].checks_to("erp") == ("unleashed_website",)
    assert fields["other_site"].checks_to("crm") == ("crm_website",)
    assert fields["other_mail"].checks_to("erp") == ("email",)
    assert fields["other_mail"].checks_to("crm") == ()


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


def _sql_vs_python(values: list[tuple[str, str]], region: str = "GB") -> tuple[set, list]:
    """Normalise (kind, value) pairs with decide.py's SQL rules and with the Python normalisers;
    returns the pairs the SQL rules decided and those where the two disagree."""
    import duckdb
    import pandas as pd

    from sync_pipeline import decide
    from sync_pipeline.mapping.normalise import normalise

    con = duckdb.connect()
    frame = pd.DataFrame(values, columns=["kind", "v"]).drop_duplicates()
    con.register("vals", frame)
    sql_only = con.execute(decide.canon_select("SELECT kind, v FROM vals", region)).fetchall()
    decided = [(k, v, n) for k, v, n in sql_only if n is not None]
    wrong = [
        (k, v, n, normalise(k, v, region)) for k, v, n in decided if n != normalise(k, v, region)
    ]
    both = decide.canonical(con, frame, region)  # SQL, then Python for what SQL left
    wrong += [
        (k, v, n, normalise(k, v, region))
        for k, v, n in zip(both["kind"], both["v"], both["n"], strict=True)
        if n != normalise(k, v, region)
    ]
    return {(k, v) for k, v, _ in decided}, wrong


def test_sql_normalisers_agree_with_python_on_generated_values():
    """The planner decides equality in SQL for printable-ASCII values (decide.py) and in Python
    for the rest; both must give exactly what mapping/normalise.py gives. 30,000 generated
    values: random printable ASCII, and website and phone spellings built from the parts that
    matter (schemes, www., case, trailing dots and slashes, paths, queries, separators,
    prefixes), plus non-ASCII text that must fall back to Python."""
    import random
    import string

    rng = random.Random(11)
    printable = string.printable[:95]  # space .. ~
    values: list[tuple[str, str]] = []
    kinds = ["text", "name", "email", "website", "phone", "exact"]
    for _ in range(6000):
        s = "".join(rng.choice(printable) for _ in range(rng.randint(0, 30)))
        values.append((rng.choice(kinds), s))
    for _ in range(8000):
        scheme = rng.choice(["", "http://", "HTTPS://", "ftp://", "a+b.c-d://", "1x://", "://"])
        www = rng.choice(["", "www.", "WWW.", "www", "ww."])
        host = rng.choice(["Example.com", "example.co.uk.", "a.b", "localhost", "ex ample.com"])
        rest = rng.choice(["", "/", "//", "/Path/", "/a?b=/#c/", "?q", "#frag/", "/x.", "/ "])
        pad = rng.choice(["", " ", "  "])
        values.append(("website", pad + scheme + www + host + rest + pad))
    for _ in range(8000):
        prefix = rng.choice(["+44", "0", "+44 (0)", "(+44)", "0044", "44", "", "(0)", "+1", "+"])
        digits = "".join(rng.choice("0123456789") for _ in range(rng.choice([8, 9, 10, 11, 12])))
        chars = list(prefix + digits)
        for _ in range(rng.randint(0, 5)):
            chars.insert(rng.randint(0, len(chars)), rng.choice(" -.()/  x#"))
        values.append(("phone", "".join(chars)))
    for _ in range(8000):
        words = [
            rng.choice(
                [
                    "Zoë",
                    "ÉMILE",
                    "straße",
                    "STRASSE",
                    "李记",
                    "a\tb",
                    "x\u00a0y",
                    "Acme",
                    "  ",
                    "O'Brien",
                    "ﬁne",
                    "İstanbul",
                    "ΣΑΣ",
                ]
            )
            for _ in range(rng.randint(1, 4))
        ]
        values.append((rng.choice(kinds), rng.choice([" ", "  ", "\t"]).join(words)))
    decided, wrong = _sql_vs_python(values)
    assert wrong == [], wrong[:10]
    # Every printable-ASCII value is decided in SQL, except phones outside the UK fast path.
    plain = {(k, v) for k, v in values if k != "phone" and all(" " <= c <= "~" for c in v)}
    assert plain <= decided
    assert ("phone", "+44 (20) 7946-0000") in _sql_vs_python([("phone", "+44 (20) 7946-0000")])[0]
    # Other regions: phones always go through phonenumbers.
    decided, wrong = _sql_vs_python([("phone", "020 7946 0000"), ("phone", "(212) 555-0100")], "US")
    assert wrong == []


def test_sql_plain_email_check_passes_only_what_the_email_validator_passes():
    """The planner skips the email library for plain addresses in SQL
    (decide.plain_email_sql); every address it passes must pass `check_email`, and the common
    ones must be passed (or the shortcut does nothing)."""
    import random

    import duckdb

    from sync_pipeline.decide import plain_email_sql
    from sync_pipeline.mapping.validate import check_email

    rng = random.Random(5)
    locals_ = ["a", "Jo.Bloggs", "x_y+z", "-", "a..b", ".a", "a.", "é", "a b", "a" * 64, "a" * 65]
    domains = ["example.com", "Ex-ample.co.uk", "example.test", "a.LOCAL", "x.invalid", "-a.com",
               "a-.com", "example", "example.c", "e.x" + "a" * 25, "ex_ample.com", "münchen.de",
               "a." + "b" * 63 + ".com", "localhost", "example.com."]  # fmt: skip
    pads = ["", " ", "\t", "\n"]
    values = [
        rng.choice(pads) + rng.choice(locals_) + rng.choice(["@", "@@", ""]) + rng.choice(domains)
        + rng.choice(pads)
        for _ in range(4000)
    ]  # fmt: skip
    common = ["Person12@Example.com", "new3.77@example.net", "jo.bloggs+crm@mail.co.uk"]
    values += ["x" * 245 + "@ab.com", "y" * 64 + "@" + "z" * 190 + ".com", *common]
    con = duckdb.connect()
    passed = [
        v
        for v in sorted(set(values))
        if con.execute(f"SELECT coalesce({plain_email_sql('$1')}, false)", [v]).fetchone()[0]
    ]
    wrongly = [v for v in passed if check_email(v) is not None]
    assert not wrongly, wrongly[:5]
    assert set(common) <= set(passed) and len(passed) > 20


def test_sql_plain_website_check_passes_only_what_the_website_rule_passes():
    """Likewise for Unleashed's website rule (decide.plain_website_sql)."""
    import random

    import duckdb

    from sync_pipeline.decide import plain_website_sql
    from sync_pipeline.mapping.validate import check_unleashed_website

    rng = random.Random(6)
    schemes = ["http://", "https://", "HTTPS://", "ftp://", "", "https:/", "https:///"]
    hosts = ["example.com", "a.b", "localhost", "ex ample.com", "-x.com", ".a.com", "a..com",
             "münchen.de", "[::1]", "a.com:80", "user@a.com", "a.com."]  # fmt: skip
    rests = ["", "/", "/p?q=1#f", "/ x", "?q", "/[", "/\t", "/é"]
    values = [rng.choice(schemes) + rng.choice(hosts) + rng.choice(rests) for _ in range(3000)]
    common = ["https://www.example.com", "http://c12.example.com/", "https://new-7.example.org"]
    con = duckdb.connect()
    passed = [
        v
        for v in sorted(set(values + common))
        if con.execute(f"SELECT coalesce({plain_website_sql('$1')}, false)", [v]).fetchone()[0]
    ]
    wrongly = [v for v in passed if check_unleashed_website(v) is not None]
    assert not wrongly, wrongly[:5]
    assert set(common) <= set(passed) and len(passed) > 20
    # The CRM's website rule is passed by the same SQL (`decide._SQL_PASSES`).
    from sync_pipeline.mapping.validate import check_crm_website

    assert not [v for v in passed if check_crm_website(v) is not None]


def test_sql_passes_a_value_only_where_every_python_check_of_its_field_and_direction_does():
    """The planner passes in SQL what it can (`decide.sql_pass`), and asks Python about the rest.
    For every field and direction of the shipped mappings, over values with control characters,
    tabs, line breaks, bidirectional controls, non-ASCII text and malformed addresses: nothing
    SQL passes is refused by `check_value`, and nothing with a character the safety check
    refuses is passed by SQL."""
    import random

    import duckdb

    from sync_pipeline.decide import sql_pass
    from sync_pipeline.mapping.validate import check_text, check_value

    rng = random.Random(11)
    pieces = ["Acme", "Ltd", " ", "  ", "jo.bloggs", "@", "example.com", "https://", "http://",
              "www.", "acme.co.uk", "/about", "javascript:", "data:", "020 7946 0000", "+44",
              "é", "ü", "\u00a0", "\x00", "\x1b", "\x7f", "\x85", "\t", "\n", "\r",
              "\u2028", "\u200e", "\u200f", "\u061c", "\u202a", "\u202e", "\u2066",
              "\u2069", "\u200d", "'", "\\", "%", ""]  # fmt: skip
    values = {"".join(rng.choice(pieces) for _ in range(rng.randint(0, 5))) for _ in range(3000)}
    values |= {"Acme Ltd", "jo.bloggs@example.com", "https://www.acme.co.uk/about", "", " "}
    con = duckdb.connect()
    con.execute("CREATE TABLE v (v VARCHAR)")
    con.executemany("INSERT INTO v VALUES (?)", [[v] for v in sorted(values)])
    checked = 0
    for mapping in load_mappings(MAPPINGS_DIR).values():
        for name, spec in mapping.fields.items():
            for target in ("erp", "crm"):
                cond = sql_pass(spec, target, "v")
                if cond is None:
                    continue
                passed = [r[0] for r in con.execute(f"SELECT v FROM v WHERE {cond}").fetchall()]
                wrongly = [
                    v for v in passed
                    if check_value(v, spec.checks_to(target), multiline=spec.multiline)
                ]  # fmt: skip
                assert not wrongly, (mapping.entity, name, target, wrongly[:5])
                assert not [v for v in passed if check_text(v, multiline=True)]
                assert "Acme Ltd" in passed or spec.checks_to(target)  # it does pass something
                checked += 1
    assert checked >= 10
