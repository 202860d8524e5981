"""The three-way diff: what gets planned for each combination of CRM, Unleashed and baseline."""

from __future__ import annotations

import json
from datetime import datetime

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync_pipeline import baseline, derived, diff, links, schema, store
from sync_pipeline.stages import StageError, Stages
from tests.diff_fixtures import World, one, rows


@pytest.fixture
def w() -> World:
    """One linked company with one linked contact, agreed on every field."""
    w = World()
    w.user(1, "ann@example.com")
    w.user(2, "bob@example.com")
    w.salesperson("sp-ann", "Ann@Example.com")
    w.crm_company(12, "Acme Ltd", phone="020 7946 0000", website="https://acme.com",
                  manager="ann@example.com", code="ACME")  # fmt: skip
    w.customer("g-acme", "ACME", "Acme Ltd", phone="020 7946 0000", website="https://acme.com",
               salesperson="ann@example.com")  # fmt: skip
    w.crm_contact(100, 12, "Jane", "Doe", email="jane@acme.com", phone="020 7946 0001")
    w.erp_contact("c-jane", "g-acme", "Jane", "Doe", email="jane@acme.com", phone="020 7946 0001")
    links.update_links(w.con, w.mappings)
    assert plan(w).empty
    return w


def plan(w: World, **kw):
    return diff.plan_changes(w.con, w.mappings, **kw)


def test_plan_has_exactly_the_contract_columns_and_is_written_to_duckdb(w):
    w.edit("crm_companies", "12", Name="Acme Limited")
    p = plan(w)
    assert list(p.columns) == diff.PLAN_COLUMNS
    stored = w.con.execute("SELECT op, field, new_value FROM sync_plan").fetchall()
    assert stored == [("update_erp", "name", "Acme Limited")]


def test_a_pass_times_its_named_stages_and_leaves_no_temporary_table_behind(w):
    w.edit("crm_companies", "12", Name="Acme Limited")
    w.edit("unleashed_contacts", "c-jane", PhoneNumber="020 7946 0999")
    timings: dict[str, float] = {}
    p = diff.plan_changes(w.con, w.mappings, timings=timings)
    assert set(p["field"]) == {"name", "phone"}
    for entity in ("company", "contact"):
        for stage in ("scan", "candidates", "normal_forms", "decisions", "refusals",
                      "plan_insert", "settle", "pending", "creations"):  # fmt: skip
            assert f"{entity}.{stage}" in timings
    assert "plan.read_back" in timings and all(sec >= 0 for sec in timings.values())
    left = w.con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE temporary "
        "UNION ALL SELECT view_name FROM duckdb_views() WHERE temporary AND NOT internal"
    ).fetchall()
    assert left == []


def test_a_stage_reading_what_no_earlier_stage_made_is_refused(w):
    st = Stages(w.con)
    st.table("one", "_made", "SELECT 1 AS x")
    st.run("two", "SELECT * FROM _made", reads=["_made"])
    with pytest.raises(StageError, match="stage three reads _never_made"):
        st.run("three", "SELECT 1", reads=["_never_made"])
    st.drop("_made")
    with pytest.raises(StageError, match="stage four reads _made"):
        st.run("four", "SELECT * FROM _made", reads=["_made"])
    with pytest.raises(StageError, match="no stage of this pass made it"):
        st.drop("sync_plan")  # a persistent table is never the runner's to drop


def test_nothing_changed_plans_nothing(w):
    assert plan(w).empty


def test_only_crm_changed_updates_unleashed(w):
    w.edit("crm_companies", "12", Name="Acme Limited")
    row = one(plan(w))
    assert (row["op"], row["field"], row["new_value"], row["erp_value"], row["baseline_value"]) == (
        "update_erp", "name", "Acme Limited", "Acme Ltd", "Acme Ltd",
    )  # fmt: skip
    assert not row["conflict"]
    assert row["reason"] == "CRM changed name from 'Acme Ltd' to 'Acme Limited'"


def test_only_unleashed_changed_updates_the_crm(w):
    w.edit("unleashed_contacts", "c-jane", PhoneNumber="020 7946 0999")
    row = one(plan(w))
    assert (row["entity"], row["op"], row["field"], row["new_value"]) == (
        "contact", "update_crm", "phone", "020 7946 0999",
    )  # fmt: skip
    assert (row["crm_parent_id"], row["erp_parent_id"]) == ("12", "g-acme")


def test_reformatting_is_not_a_change(w):
    w.edit("unleashed_customers", "g-acme", PhoneNumber="+44 20 7946 0000",
           Website="https://www.ACME.com/")  # fmt: skip
    w.edit("crm_contacts", "100", Email="  JANE@acme.com ")
    assert plan(w).empty


def test_first_sync_equal_after_normalisation_plans_nothing():
    w = World()
    w.crm_company(12, "Acme", phone="+44 20 7946 0000", website="Example.com/", code="A")
    w.customer("g-1", "A", "Acme", phone="020 7946 0000", website="https://example.com")
    links.update_links(w.con, w.mappings)
    assert plan(w).empty
    # Settled: the next pass knows both sides agreed, each side's own spelling kept.
    assert baseline.baseline_values(w.con, "company", "g-1") == {
        "name": ("Acme", "Acme"),
        "phone": ("+44 20 7946 0000", "020 7946 0000"),
        "website": ("Example.com/", "https://example.com"),
        "account_manager": ("", ""),
    }


def test_applied_change_does_not_echo(w):
    w.edit("crm_companies", "12", Name="Acme Limited")
    w.edit("unleashed_contacts", "c-jane", LastName="Smith")
    p = plan(w)
    assert len(p) == 2
    w.apply(p)  # writes into the other side's snapshot and calls record_agreement
    assert plan(w).empty


def test_edits_to_different_fields_on_both_sides_both_survive(w):
    w.edit("crm_companies", "12", Name="Acme Limited")
    w.edit("unleashed_customers", "g-acme", PhoneNumber="020 7946 1234")
    p = plan(w)
    assert one(p, field="name")["op"] == "update_erp"
    assert one(p, field="name")["new_value"] == "Acme Limited"
    assert one(p, field="phone")["op"] == "update_crm"
    assert one(p, field="phone")["new_value"] == "020 7946 1234"
    assert not p["conflict"].any()


def _conflict(w: World, crm_at: datetime, erp_at: datetime, **kw):
    w.edit("crm_companies", "12", Name="Acme CRM", modified=crm_at)
    w.edit("unleashed_customers", "g-acme", CustomerName="Acme ERP", modified=erp_at)
    return one(plan(w, **kw), field="name")


def test_conflict_newest_crm_wins_when_crm_is_later(w):
    row = _conflict(w, datetime(2026, 3, 1, 12), datetime(2026, 3, 1, 11))
    assert (row["op"], row["new_value"], row["conflict"], row["policy"]) == (
        "update_erp", "Acme CRM", True, "newest",
    )  # fmt: skip
    assert "'Acme CRM'" in row["reason"] and "'Acme ERP'" in row["reason"]
    assert "CRM wins by policy newest" in row["reason"]


def test_conflict_newest_unleashed_wins_when_later_or_tied(w):
    row = _conflict(w, datetime(2026, 3, 1, 11), datetime(2026, 3, 1, 12))
    assert (row["op"], row["new_value"], row["conflict"]) == ("update_crm", "Acme ERP", True)
    tie = datetime(2026, 3, 2, 9)
    row = _conflict(w, tie, tie)
    assert (row["op"], row["new_value"]) == ("update_crm", "Acme ERP")
    assert "Unleashed wins by policy newest" in row["reason"]


@pytest.mark.parametrize(
    ("policy", "op", "value"),
    [("crm", "update_erp", "Acme CRM"), ("erp", "update_crm", "Acme ERP")],
)
def test_conflict_fixed_policies_ignore_timestamps(w, policy, op, value):
    row = _conflict(w, datetime(2026, 3, 1, 11), datetime(2026, 3, 1, 12),
                    policy_overrides={"company.name": policy})  # fmt: skip
    later_crm = _conflict(w, datetime(2026, 3, 2, 12), datetime(2026, 3, 2, 11),
                          policy_overrides={"company.name": policy})  # fmt: skip
    for r in (row, later_crm):
        assert (r["op"], r["new_value"], r["conflict"], r["policy"]) == (op, value, True, policy)


def _refused_website_conflict_won_by_crm(w: World) -> pd.Series:
    """The CRM wins a `newest` website conflict with a value Unleashed refuses; recorded.
    Returns the plan row."""
    schema.ensure(w.con)
    w.edit("unleashed_customers", "g-acme", Website="https://acme.org",
           modified=datetime(2026, 3, 1, 11))  # fmt: skip
    w.edit("crm_companies", "12", Website="acme .org", modified=datetime(2026, 3, 1, 12))
    planned = plan(w)
    store.record_conflicts(w.con, planned, "run-1")
    return one(planned, field="website")


def _assert_crm_still_wins_after_our_own_write(w: World) -> None:
    w.edit("unleashed_customers", "g-acme", modified=datetime(2026, 3, 1, 13))  # our own write
    again = one(plan(w), field="website")
    assert (again["op"], again["new_value"]) == ("reject", "acme .org")
    assert (
        "CRM wins by policy newest (as decided when this conflict was first seen"
        in (again["reason"])
    )


def test_newest_conflict_keeps_its_winner_while_neither_value_changes(w):
    """The soak's flip: the CRM wins a `newest` conflict with a website Unleashed refuses; the
    sync's own write to another field then makes the Unleashed record newer. The same conflict
    must not now be won by Unleashed (overwriting the CRM and hiding the rejection). A new
    Unleashed value is a new conflict, decided afresh."""
    first = _refused_website_conflict_won_by_crm(w)
    assert (first["op"], first["conflict"], first["new_value"]) == ("reject", True, "acme .org")
    winners = w.con.execute("SELECT winner FROM conflicts WHERE field = 'website'").fetchall()
    assert winners == [("crm",)]  # who won, though nothing was sent

    _assert_crm_still_wins_after_our_own_write(w)

    w.edit("unleashed_customers", "g-acme", Website="https://acme.net",
           modified=datetime(2026, 3, 1, 14))  # fmt: skip
    fresh = one(plan(w), field="website")
    assert (fresh["op"], fresh["new_value"]) == ("update_crm", "https://acme.net")
    assert "Unleashed wins by policy newest (changed later in Unleashed" in fresh["reason"]


def test_a_kept_newest_decision_does_not_depend_on_the_conflict_history(w):
    """The conflicts log is history an operator may prune; the decision the planner keeps for
    a conflict still open is not in it."""
    _refused_website_conflict_won_by_crm(w)
    w.con.execute("DELETE FROM conflicts")
    _assert_crm_still_wins_after_our_own_write(w)


def test_a_database_from_before_the_decisions_table_keeps_its_decisions(w):
    """Upgrading a database from before versioning whose log predates the decisions table: the
    decisions its log holds are read into the table once."""
    _refused_website_conflict_won_by_crm(w)
    w.con.execute("DROP TABLE conflict_decisions")
    w.con.execute("DROP TABLE schema_version")
    schema.ensure(w.con)
    _assert_crm_still_wins_after_our_own_write(w)


def test_a_conflict_seen_again_keeps_the_time_it_was_first_seen(w):
    _refused_website_conflict_won_by_crm(w)
    (first,) = w.con.execute("SELECT seen_at FROM conflict_decisions").fetchone()
    w.edit("unleashed_customers", "g-acme", modified=datetime(2026, 3, 1, 13))  # our own write
    store.record_conflicts(w.con, plan(w), "run-2")
    assert w.con.execute("SELECT seen_at, winner FROM conflict_decisions").fetchall() == [
        (first, "crm")
    ]
    shown = f"{first:%Y-%m-%d %H:%M:%S}.{first.microsecond // 1000:03d}"
    assert f"first seen, {shown}; neither" in one(plan(w), field="website")["reason"]


def test_both_sides_changed_to_the_same_value_is_not_a_conflict(w):
    w.edit("crm_companies", "12", PhoneNumber="020 7946 5555")
    w.edit("unleashed_customers", "g-acme", PhoneNumber="+44 20 7946 5555")
    assert plan(w).empty
    w.edit("crm_companies", "12", Name="Later edit")
    assert one(plan(w))["field"] == "name"  # the phone baseline was settled


def test_invalid_website_is_rejected_and_other_fields_still_plan(w):
    w.edit("crm_companies", "12", Website="acme .com", Name="Acme Limited")
    p = plan(w)
    assert rows(p, op="update_erp", field="website").empty
    bad = one(p, op="reject")
    assert bad["field"] == "website" and bad["new_value"] == "acme .com"
    assert bad["reason"].startswith(
        "company 'Acme Limited' (CRM 12 / Unleashed g-acme): website 'acme .com' is not "
        "accepted by Unleashed: contains a space"
    )
    assert one(p, field="name")["op"] == "update_erp"
    # Fixed in the CRM: the rejection retries itself as a normal update.
    w.edit("crm_companies", "12", Website="https://acme.co.uk")
    assert one(plan(w), field="website")["op"] == "update_erp"


UNSAFE_EDITS = [
    # (table, id, raw field, value, mapped field, op, what the reason must say)
    ("crm_companies", "12", "Name", "Acme\x00Ltd", "name", "update_erp",
     "name 'Acme\\x00Ltd' is not accepted by Unleashed: contains the control character U+0000"),
    ("crm_companies", "12", "Name", "Acme\x85Trading", "name", "update_erp",
     "contains the control character U+0085"),
    ("unleashed_customers", "g-acme", "CustomerName", "\u200fAcme Trading", "name", "update_crm",
     "name '\\u200fAcme Trading' cannot be written to the CRM: contains the bidirectional control "
     "character U+200F (RIGHT-TO-LEFT MARK)"),
    ("unleashed_contacts", "c-jane", "LastName", "Doe\u202egnp.exe", "last_name", "update_crm",
     "last name 'Doe\\u202egnp.exe' cannot be written to the CRM: contains the bidirectional "
     "control character U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("unleashed_contacts", "c-jane", "FirstName", "Ja\u2067ne", "first_name", "update_crm",
     "contains the bidirectional control character U+2067 (RIGHT-TO-LEFT ISOLATE)"),
    ("crm_contacts", "100", "PhoneNumber", "020 7946 0002\t", "phone", "update_erp",
     "phone '020 7946 0002\\t' is not accepted by Unleashed: contains the control character "
     "U+0009 (tab)"),
    ("crm_contacts", "100", "Email", "jane@acme.com\r\nBcc: all@example.org", "email",
     "update_erp", "contains the control character U+000D (carriage return)"),
    ("unleashed_customers", "g-acme", "PhoneNumber", "020 7946\u20280009", "phone", "update_crm",
     "contains the line separator U+2028 (LINE SEPARATOR)"),
]  # fmt: skip


@pytest.mark.parametrize(
    "table, key, raw_field, value, field, op, words",
    UNSAFE_EDITS,
    ids=[f"{e[2]}={e[3]!r}" for e in UNSAFE_EDITS],
)
def test_unsafe_characters_are_refused_both_ways_whatever_the_field(
    w, table, key, raw_field, value, field, op, words
):
    """The safety check runs on every value going either way: a control character, a tab or
    line break in a one-line field, a bidirectional control is a rejection naming the record,
    the field, the value (escaped: the reason shows no raw control character) and why."""
    from sync_pipeline.mapping.validate import unsafe_kind

    w.edit(table, key, **{raw_field: value})
    row = one(plan(w))
    assert (row["op"], row["field"], row["new_value"]) == ("reject", field, value)
    assert words in row["reason"], row["reason"]
    company = table in ("crm_companies", "unleashed_customers")
    record = "(CRM 12 / Unleashed g-acme)" if company else "(CRM 100 / Unleashed c-jane)"
    assert record in row["reason"]
    assert all(unsafe_kind(ch) is None for ch in row["reason"]), repr(row["reason"])
    intended = "CRM changed" if op == "update_erp" else "Unleashed changed"
    assert f"not sent ({intended} {field.replace('_', ' ')} from " in row["reason"]
    # Fixed at the source: a plain update, the rejection gone.
    fixed = "jane.fixed@acme.com" if field == "email" else "Fixed Value"
    w.edit(table, key, **{raw_field: fixed})
    row = one(plan(w))
    assert (row["op"], row["new_value"]) == (op, fixed)


@pytest.mark.parametrize(
    "website",
    ["javascript:alert(1)", "JavaScript:alert(document.cookie)",
     "data:text/html,<script>x</script>", "vbscript:msgbox(1)", "file:///etc/passwd",
     "//evil.example.com/x", "www.acme.example.com"],
)  # fmt: skip
def test_a_website_from_unleashed_that_is_not_an_http_address_is_not_written_to_the_crm(w, website):
    w.edit("unleashed_customers", "g-acme", Website=website)
    row = one(plan(w))
    assert (row["op"], row["field"], row["new_value"]) == ("reject", "website", website)
    assert row["reason"].startswith(
        f"company 'Acme Ltd' (CRM 12 / Unleashed g-acme): website {diff.quote(website)} cannot "
        "be written to the CRM: is not an absolute http:// or https:// address; not sent"
    ), row["reason"]
    w.edit("unleashed_customers", "g-acme", Website="https://acme.example.com/about")
    assert one(plan(w))["op"] == "update_crm"


def test_a_website_with_a_user_name_before_its_host_is_not_written_to_the_crm(w):
    w.edit("unleashed_customers", "g-acme", Website="https://acme.com@evil.example/login")
    row = one(plan(w))
    assert row["op"] == "reject"
    assert "has a user name or password before its host name" in row["reason"]


def test_an_email_going_to_the_crm_is_checked_like_one_going_to_unleashed(w):
    w.edit("unleashed_contacts", "c-jane", EmailAddress="jane@@acme.com")
    row = one(plan(w))
    assert (row["op"], row["field"]) == ("reject", "email")
    assert "cannot be written to the CRM: is not a valid email address" in row["reason"]
    w.edit("crm_contacts", "100", Email="jane@@acme.com")  # the same value the other way
    assert plan(w).empty  # the two sides agree: nothing to write either way


def test_an_unlinked_unleashed_contact_with_an_unsafe_value_is_not_created(w):
    """A creation carries every field: one unsafe value and the record is not created (rather
    than created without that field): a rejection names the record, the field, the value and
    why; fixed in Unleashed, it is created whole."""
    w.erp_contact("c-eve", "g-acme", "Eve\x1b[31m", "Evans", email="eve@acme.com")
    w.erp_contact("c-ok", "g-acme", "Olive", "Okay", email="olive@acme.com")
    p = plan(w)
    assert list(rows(p, op="create_crm_contact")["erp_id"]) == ["c-ok"]
    row = one(p, op="reject")
    assert row["erp_id"] == "c-eve" and pd.isna(row["crm_id"])
    assert row["reason"] == (
        "Unleashed contact 'Eve\\x1b[31m Evans' (Unleashed c-eve) is not created in the CRM: "
        "first name 'Eve\\x1b[31m' contains the control character U+001B"
    )
    created = w.con.execute("SELECT DISTINCT erp_id FROM sync_creation_baseline").fetchall()
    assert created == [("c-ok",)]
    w.edit("unleashed_contacts", "c-eve", FirstName="Eve")
    row = one(plan(w), erp_id="c-eve")
    assert row["op"] == "create_crm_contact"
    assert json.loads(row["payload"])["Forename"] == "Eve"


def test_an_unlinked_customer_with_a_javascript_website_is_not_created(w):
    w.customer("g-new", "NEW1", "Newco", website="javascript:alert(1)")
    row = one(plan(w))
    assert (row["op"], row["erp_id"]) == ("reject", "g-new")
    why = "website 'javascript:alert(1)' is not an absolute http:// or https:// address"
    assert why in row["reason"], row["reason"]


def test_values_sql_passes_never_reach_the_python_checks(w, monkeypatch):
    """Plain printable-ASCII values of fields whose checks have an SQL pass are passed in SQL;
    the Python checks see the rest, once per distinct (field, direction, value)."""
    seen = []
    make = diff._problem

    def counting(mapping, ctx):
        problem = make(mapping, ctx)

        def wrapped(name, op, value):
            seen.append((name, op, value))
            return problem(name, op, value)

        return wrapped

    monkeypatch.setattr(diff, "_problem", counting)
    w.edit("crm_companies", "12", Name="Acme Trading", PhoneNumber="020 7946 0999",
           Website="https://acme.example.com")  # fmt: skip
    w.edit("crm_contacts", "100", Email="jane.doe@acme.com", Forename="Janet")
    assert set(plan(w)["op"]) == {"update_erp"}
    assert seen == []
    w.edit("crm_companies", "12", Name="Acmé Trading")
    w.edit("unleashed_contacts", "c-jane", LastName="Doe\u202e")
    p = plan(w)
    assert sorted(seen) == [
        ("last_name", "update_crm", "Doe\u202e"),
        ("name", "update_erp", "Acmé Trading"),
    ]
    assert one(p, field="name")["op"] == "update_erp"
    assert one(p, field="last_name")["op"] == "reject"


BOB = {"UserCode": "U02", "EmailAddress": "bob@example.com"}  # CRM user 2, as $expand gives it


def test_account_manager_without_salesperson_is_rejected(w):
    w.edit("crm_companies", "12", AccountManagerUser=BOB)
    row = one(plan(w))
    assert row["op"] == "reject" and row["field"] == "account_manager"
    assert "'bob@example.com'" in row["reason"]
    assert "no active Unleashed salesperson" in row["reason"]


def test_salesperson_without_crm_user_is_rejected(w):
    w.salesperson("sp-zed", "zed@example.com")
    w.edit("unleashed_customers", "g-acme", SalesPerson={"Email": "zed@example.com"})
    row = one(plan(w))
    assert (row["op"], row["field"]) == ("reject", "account_manager")
    assert "cannot be written to the CRM: no active CRM user has this email" in row["reason"]


def test_account_manager_synced_case_insensitively(w):
    w.salesperson("sp-bob", "BOB@example.com")
    w.edit("crm_companies", "12", AccountManagerUser=BOB)
    row = one(plan(w))
    assert (row["op"], row["new_value"]) == ("update_erp", "bob@example.com")


def test_account_manager_left_out_when_option_off(w):
    w.edit("crm_companies", "12", AccountManagerUser=BOB, Name="New")
    p = plan(w, account_manager_sync=False)
    assert list(p["field"]) == ["name"]


def test_crm_to_erp_field_ignores_unleashed_edits(tmp_path):
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "mappings"
    (tmp_path / "contact.yaml").write_text((src / "contact.yaml").read_text())
    (tmp_path / "company.yaml").write_text(
        (src / "company.yaml")
        .read_text()
        .replace("    normaliser: name\n", "    normaliser: name\n    direction: crm_to_erp\n", 1)
    )
    w = World(mappings_dir=tmp_path)
    w.crm_company(12, "Acme", code="A")
    w.customer("g-1", "A", "Acme")
    links.update_links(w.con, w.mappings)
    assert plan(w).empty
    w.edit("unleashed_customers", "g-1", CustomerName="Changed in Unleashed")
    assert plan(w).empty
    w.edit("crm_companies", "12", Name="Changed in CRM")
    row = one(plan(w))
    assert (row["op"], row["new_value"], row["conflict"]) == ("update_erp", "Changed in CRM", False)


def _unagreed_world() -> World:
    w = World()
    w.crm_company(12, "Acme CRM name", code="A", modified=datetime(2026, 5, 1, 12))
    w.customer("g-1", "A", "Acme ERP name", modified=datetime(2026, 5, 1, 11))
    links.update_links(w.con, w.mappings)
    return w


def test_no_baseline_follows_initial_policy_erp_by_default():
    row = one(plan(_unagreed_world()))
    assert (row["op"], row["new_value"], row["policy"], row["conflict"]) == (
        "update_crm", "Acme ERP name", "initial:erp", False,
    )  # fmt: skip
    assert "no agreed value yet" in row["reason"]


def test_initial_policy_crm():
    row = one(plan(_unagreed_world(), initial_policy="crm"))
    assert (row["op"], row["new_value"], row["policy"]) == (
        "update_erp", "Acme CRM name", "initial:crm",
    )  # fmt: skip


def test_new_unleashed_contact_is_created_in_the_crm(w):
    w.erp_contact("c-new", "g-acme", "New", "Person", email="new@acme.com", phone="0161 496 0000")
    row = one(plan(w))
    ids = (row["erp_id"], row["erp_parent_id"], row["crm_parent_id"])
    assert row["op"] == "create_crm_contact"
    assert pd.isna(row["crm_id"])  # no CRM record yet
    assert ids == ("c-new", "g-acme", "12")
    import json

    payload = json.loads(row["payload"])
    # The Guid goes into the link slot (its own write, after the POST), not into the record.
    assert payload["DivisionId"] == 12 and "c-new" not in payload.values()
    assert payload["RoleCode"] == "DECISN"  # the tenant role the mapping creates contacts with
    assert (payload["Forename"], payload["Surname"], payload["Email"], payload["PhoneNumber"]) == (
        "New", "Person", "new@acme.com", "0161 496 0000",
    )  # fmt: skip


def test_new_crm_contact_is_never_created_in_unleashed(w):
    w.crm_contact(101, 12, "Only", "InCrm", email="only@acme.com")
    assert plan(w).empty


def test_new_unleashed_customer_is_imported_with_its_account_manager(w):
    w.customer("g-new", "NEW1", "Newco", website="https://newco.com", salesperson="ann@example.com")
    row = one(plan(w))
    import json

    payload = json.loads(row["payload"])
    assert row["op"] == "create_crm_company"
    # The account manager as the CRM user's code; the operating company the mapping names.
    # No sales ledger: ledgers come from the accounting integration, the link is the Guid slot.
    assert payload == {
        "AccountManager": "U01", "Name": "Newco", "OperatingCompanyCode": "A",
        "PhoneNumber": "", "Website": "https://newco.com",
    }  # fmt: skip


def test_contacts_of_a_new_customer_are_planned_with_it_in_the_same_pass(w):
    w.customer("g-new", "NEW1", "Newco")
    w.erp_contact("c-new", "g-new", "Nina", "New", email="nina@newco.com")
    p = plan(w)
    company = one(p, op="create_crm_company")
    contact = one(p, op="create_crm_contact")
    assert company["erp_id"] == "g-new" and contact["erp_id"] == "c-new"
    assert contact["erp_parent_id"] == "g-new" and pd.isna(contact["crm_parent_id"])
    payload = json.loads(contact["payload"])
    assert "DivisionId" not in payload  # filled in by apply from the company it creates
    assert payload["Forename"] == "Nina" and "c-new" not in payload.values()
    assert contact["reason"].endswith("under a customer created in the CRM in this same cycle")


def test_contacts_of_an_unlinked_customer_that_is_not_created_plan_nothing(w):
    # The customer matches an inactive CRM company by account code: it is not created, so
    # neither are its contacts (they have no company to go under).
    w.crm_company(13, "Old Co", code="OLD1", active=False)
    w.customer("g-old", "OLD1", "Oldco")
    w.erp_contact("c-x", "g-old", "Xavier", "X", email="x@oldco.com")
    links.update_links(w.con, w.mappings)
    assert plan(w).empty


def test_inactive_unlinked_records_plan_nothing(w):
    w.customer("g-old", "OLD", "Oldco", active=False)
    w.erp_contact("c-old", "g-acme", "Gone", "Away", active=False)
    assert plan(w).empty


def test_unleashed_contact_matching_an_unlinkable_crm_contact_is_reported_not_duplicated(w):
    # Two CRM contacts with one email: the Unleashed contact cannot be linked, nor created.
    w.crm_contact(101, 12, "Sam", "One", email="sam@acme.com")
    w.crm_contact(102, 12, "Sam", "Two", email="sam@acme.com")
    w.erp_contact("c-sam", "g-acme", "Samuel", "X", email="sam@acme.com")
    links.update_links(w.con, w.mappings)
    row = one(plan(w))
    assert row["op"] == "reject" and row["erp_id"] == "c-sam"
    assert "CRM contact 101, 102 matches it by email" in row["reason"]


def test_database_from_before_the_pending_set_is_migrated_and_looked_at_in_full(w):
    """A database written by the earlier layout (baseline one row per field, a digest table, no
    pending set) is folded into the one-row baseline, and its first pass looks at every record,
    so an edit extracted before the upgrade is still planned."""
    w.edit("crm_companies", "12", Name="Acme Renamed")  # extracted before the upgrade
    derived.refresh(w.con, w.mappings)  # (its mark on the pending set is dropped below)
    old = w.con.execute(
        """SELECT entity, erp_id, unnest(json_keys(crm_values)) AS field, crm_values, erp_values,
                  agreed_at FROM sync_baseline"""
    ).fetchall()
    w.con.execute("DROP TABLE sync_baseline")
    w.con.execute("DROP TABLE sync_pending")
    w.con.execute("DROP TABLE sync_pending_state")
    w.con.execute("DROP TABLE schema_version")  # it came before schema versioning too
    w.con.execute(
        """CREATE TABLE sync_baseline (entity VARCHAR, erp_id VARCHAR, field VARCHAR,
           crm_value VARCHAR, erp_value VARCHAR, agreed_at TIMESTAMP)"""
    )
    w.con.execute("CREATE TABLE sync_baseline_digest (entity VARCHAR, erp_id VARCHAR)")
    for entity, erp_id, field, crm, erp, at in old:
        w.con.execute(
            "INSERT INTO sync_baseline VALUES (?, ?, ?, ?, ?, ?)",
            [entity, erp_id, field, json.loads(crm)[field], json.loads(erp)[field], at],
        )
    p = plan(w)
    r = one(p)
    assert (r["op"], r["field"], r["new_value"]) == ("update_erp", "name", "Acme Renamed")
    assert baseline.baseline_values(w.con, "company", "g-acme")["name"] == ("Acme Ltd", "Acme Ltd")
    tables = {r[0] for r in w.con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert "sync_baseline_digest" not in tables
    assert plan(w).equals(p)  # still planned (not yet applied), nothing else appears


QUOTED = [
    (None, "''"), ("", "''"), ("plain", "'plain'"), ("it's", "'it\\'s'"), ("a\\b", "'a\\\\b'"),
    ("x\ny", "'x\\ny'"), ("tab\there", "'tab\\there'"), ("cr\rx", "'cr\\rx'"),
    ("mix\\'\n", "'mix\\\\\\'\\n'"), ("é'", "'é\\''"), ("a\x00b", "'a\\x00b'"),
    ("\x1b[31mred", "'\\x1b[31mred'"), ("del\x7f\x85", "'del\\x7f\\x85'"),
    ("Doe\u202egnp.exe", "'Doe\\u202egnp.exe'"), ("\u2066\u200e\u061c", "'\\u2066\\u200e\\u061c'"),
    ("line\u2028sep", "'line\\u2028sep'"), ("Søren\u00a0K \U0001f469\u200d\U0001f4bb", None),
]  # fmt: skip


@pytest.mark.parametrize("value, shown", QUOTED, ids=[repr(v) for v, _ in QUOTED])
def test_reasons_quote_values_the_same_way_in_sql_and_python(value, shown):
    """Plan reasons are built in SQL (`_q`) and in Python (`quote`); a person reading them sees
    one rule: the value in single quotes, with quotes, backslashes, tabs and line breaks
    escaped, and any other character the safety check refuses shown by its code point (`\\x00`,
    `\\u202e`), so no raw control or bidirectional character reaches a reason."""
    import duckdb

    from sync_pipeline.decide import Q_MACRO, quote

    con = duckdb.connect()
    con.execute(Q_MACRO)
    assert con.execute("SELECT _q(?)", [value]).fetchone()[0] == quote(value)
    assert quote(value) == (shown if shown is not None else f"'{value}'")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12))
def test_sql_and_python_quoting_agree_on_any_text(value):
    import duckdb

    from sync_pipeline.decide import Q_MACRO, quote

    con = duckdb.connect()
    con.execute(Q_MACRO)
    assert con.execute("SELECT _q(?)", [value]).fetchone()[0] == quote(value)


def test_the_sql_escape_class_is_what_the_safety_check_refuses():
    """`decide.UNSAFE_CLASS` (an RE2 class: `_q` escapes what it matches) against
    `validate.unsafe_kind`, over every code point."""
    import duckdb

    from sync_pipeline.decide import UNSAFE_CLASS
    from sync_pipeline.mapping.validate import unsafe_kind

    con = duckdb.connect()
    matched = {
        cp
        for (cp,) in con.execute(
            f"""SELECT cp FROM range(0, 1114112) t(cp)
                WHERE (cp < 55296 OR cp > 57343) AND regexp_matches(chr(cp::INTEGER),
                                                                    '[{UNSAFE_CLASS}]')"""
        ).fetchall()
    }
    refused = {cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF and unsafe_kind(chr(cp))}
    assert matched == refused


def test_operation_keys_computed_column_wise_equal_the_per_row_key(w):
    """The outbox, conflicts and refusals identify a change by `store.op_key`; for a whole plan
    it is computed column-wise (`op_keys`). Both must give the same key for every row, or a
    queued change would be queued twice."""
    from sync_pipeline import store

    w.edit("crm_companies", "12", Name="Acme Renamed", Website="bad site")
    w.edit("unleashed_customers", "g-acme", PhoneNumber="+44 20 7946 0999")
    p = plan(w)
    extra = pd.DataFrame(
        [{"entity": "company", "op": "update_crm", "crm_id": 5, "erp_id": "g", "field": "name",
          "crm_value": "Zoë", "erp_value": "Zoe\n'\"", "new_value": "Zoe",
          "baseline_value": float("nan")}]
    )  # fmt: skip
    frame = pd.concat([p, extra], ignore_index=True)
    assert len(frame) >= 4
    assert store.op_keys(frame) == [store.op_key(r) for r in frame.to_dict("records")]


_KEY_TEXT = st.one_of(
    st.none(),
    st.sampled_from(["", "Acme", "g-1", "name", "0161 496 0000", "a\\b", 'say "hi"', "Zoë"]),
    st.text(max_size=12),
)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "entity": st.sampled_from(["company", "contact"]),
                "op": st.sampled_from(
                    ["update_erp", "update_crm", "create_crm_contact", "reject", None]
                ),
                **{
                    c: _KEY_TEXT
                    for c in ("crm_id", "erp_id", "field", "crm_value", "erp_value", "new_value",
                              "baseline_value")
                },
            }
        ),
        min_size=1,
        max_size=20,
    ),
    as_text=st.booleans(),
)  # fmt: skip
def test_operation_keys_in_sql_equal_the_python_key_for_any_text(rows, as_text):
    """`op_keys` builds the key's JSON text in SQL for plain values and leaves the rest to
    Python: for any text (unicode, quotes, backslashes, control characters, missing values),
    in text or object columns, it must give `op_key`'s key, or a change would be queued twice."""
    frame = pd.DataFrame(rows)
    if as_text:
        frame = frame.astype("str").where(frame.notna())
        frame = frame.astype({c: "str" for c in frame.columns})
    assert store.op_keys(frame) == [store.op_key(r) for r in frame.to_dict("records")]


def test_values_only_python_can_normalise_are_compared_in_python(w):
    """Non-ASCII text and phone numbers outside the UK fast path have no SQL normal form; the
    planner must fill them with the Python normalisers (decide.fill_python), or they would
    neither agree nor plan. Both sides edited to equal spellings: nothing planned, and the
    baseline takes both spellings; a real difference is still planned."""
    w.edit("crm_companies", "12", Name="Zoë   Trading", PhoneNumber="+33 1 42 68 53 00")
    w.edit("unleashed_customers", "g-acme", CustomerName=" Zoë Trading", PhoneNumber="+33142685300")
    assert plan(w).empty
    agreed = baseline.baseline_values(w.con, "company", "g-acme")
    assert agreed["name"] == ("Zoë   Trading", " Zoë Trading")
    assert agreed["phone"] == ("+33 1 42 68 53 00", "+33142685300")
    w.edit("crm_companies", "12", Name="Zoé Trading")
    r = one(plan(w))
    assert (r["op"], r["field"], r["new_value"]) == ("update_erp", "name", "Zoé Trading")
