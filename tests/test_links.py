"""Link matching: companies by account code / Guid, contacts within linked companies by Guid,
email, then name; ambiguity refused; inactive records unlinked."""

from __future__ import annotations

import pytest

from sync_pipeline import baseline, diff, links
from tests.diff_fixtures import World


def _links(w: World, table: str) -> set[tuple[str, str, str]]:
    return set(w.con.execute(f"SELECT crm_id, erp_id, method FROM {table}").fetchall())


def test_companies_link_by_account_code_and_by_unleashed_guid():
    w = World()
    w.crm_company(1, "Acme", code="ACME")
    w.customer("g-acme", "ACME", "Acme Ltd")
    w.crm_company(2, "Imported", guid="g-imp")
    w.customer("g-imp", "IMP", "Imported")
    w.crm_company(3, "No match", code="ACME2")  # codes are exact, not "starts with"
    w.customer("g-x", "ACME2X", "Other")
    result = links.update_links(w.con, w.mappings)
    assert _links(w, "company_links") == {
        ("1", "g-acme", "account_code"),
        ("2", "g-imp", "unleashed_guid"),
    }
    assert result.linked["company"] == {"unleashed_guid": 1, "account_code": 1}
    assert links.one_to_one_violations(w.con).empty


def test_contacts_link_by_guid_then_email_then_exact_name_within_linked_companies():
    w = World()
    w.crm_company(1, "Acme", code="ACME")
    w.customer("g-acme", "ACME", "Acme")
    w.crm_contact(10, 1, "Ann", "Guid", guid="c-guid")
    w.erp_contact("c-guid", "g-acme", "Anne", "Renamed")
    w.crm_contact(11, 1, "Bob", "Mail", email=" Bob@Acme.com")
    w.erp_contact("c-mail", "g-acme", "Robert", "Mail", email="bob@acme.com")
    w.crm_contact(12, 1, "Cat", "Name")
    w.erp_contact("c-name", "g-acme", "Cat", "Name")
    w.crm_contact(13, 1, "cat", "name2")
    w.erp_contact("c-case", "g-acme", "Cat", "Name2")  # names are exact: no link
    # Same email in another (unlinked) company is never a candidate.
    w.crm_company(2, "Other", code="OTHER")
    w.crm_contact(20, 2, "Dan", "Else", email="dan@acme.com")
    w.erp_contact("c-dan", "g-acme", "Dan", "Else", email="dan@acme.com")
    links.update_links(w.con, w.mappings)
    got = set(
        w.con.execute(
            "SELECT crm_id, erp_id, method, crm_parent_id, erp_parent_id FROM contact_links"
        ).fetchall()
    )
    assert got == {
        ("10", "c-guid", "unleashed_guid", "1", "g-acme"),
        ("11", "c-mail", "email", "1", "g-acme"),
        ("12", "c-name", "full_name", "1", "g-acme"),
    }


def test_ambiguous_key_is_not_linked_and_is_reported():
    w = World()
    w.crm_company(1, "Acme one", code="ACME")
    w.crm_company(2, "Acme two", code="ACME")
    w.customer("g-acme", "ACME", "Acme")
    result = links.update_links(w.con, w.mappings)
    assert _links(w, "company_links") == set()
    amb = result.ambiguous.iloc[0]
    assert (amb["entity"], amb["method"], amb["key_value"]) == ("company", "account_code", "ACME")
    assert list(amb["crm_ids"]) == ["1", "2"] and list(amb["erp_ids"]) == ["g-acme"]
    assert "shared by CRM 1, 2 and Unleashed g-acme; not linked" in amb["detail"]
    stored = w.con.execute("SELECT kind, detail FROM link_issues").fetchall()
    assert stored[0][0] == "ambiguous"
    # And the ambiguous customer is not imported as a new CRM company (no duplicate).
    plan = diff.plan_changes(w.con, w.mappings)
    assert list(plan["op"]) == ["reject"]


def test_inactive_record_is_unlinked_and_reported_and_nothing_planned():
    w = World()
    w.crm_company(1, "Acme", code="ACME")
    w.customer("g-acme", "ACME", "Acme")
    w.crm_contact(10, 1, "Ann", "A", email="ann@acme.com")
    w.erp_contact("c-ann", "g-acme", "Ann", "A", email="ann@acme.com")
    links.update_links(w.con, w.mappings)
    assert diff.plan_changes(w.con, w.mappings).empty
    w.edit("unleashed_contacts", "c-ann", active=False)
    result = links.update_links(w.con, w.mappings)
    assert _links(w, "contact_links") == set()
    assert result.unlinked.iloc[0]["detail"].startswith(
        "Unleashed contact c-ann is obsolete or removed; the link was removed"
    )
    (n,) = w.con.execute("SELECT count(*) FROM sync_baseline WHERE erp_id = 'c-ann'").fetchall()[0]
    assert n == 0
    assert diff.plan_changes(w.con, w.mappings).empty  # nothing deleted, nothing created


def test_existing_links_are_kept_even_when_keys_change():
    w = World()
    w.crm_company(1, "Acme", code="ACME")
    w.customer("g-acme", "ACME", "Acme")
    links.update_links(w.con, w.mappings)
    w.edit("unleashed_customers", "g-acme", CustomerCode="RENAMED")
    result = links.update_links(w.con, w.mappings)
    assert _links(w, "company_links") == {("1", "g-acme", "account_code")}
    assert result.kept["company"] == 1


def test_one_to_one_violations_finds_a_double_link():
    w = World()
    links.ensure_schema(w.con)
    baseline.ensure_schema(w.con)
    w.con.execute(
        "INSERT INTO company_links VALUES ('1', 'g-a', 'x', now()), ('1', 'g-b', 'x', now())"
    )
    bad = links.one_to_one_violations(w.con)
    assert bad.to_dict("records") == [{"entity": "company", "side": "crm", "id": "1", "links": 2}]


# A pass over unchanged inputs ----------------------------------------------------------------


def _linked_world() -> World:
    """Acme linked, with contact Ann linked by email; an ambiguous account code ACME2; contact
    Bob in the CRM and Unleashed contact c-bob that nothing pairs yet."""
    w = World()
    w.crm_company(1, "Acme", code="ACME")
    w.customer("g-acme", "ACME", "Acme")
    w.crm_company(2, "Two", code="TWO")
    w.customer("g-two", "TWO", "Two")
    w.crm_company(3, "Dup one", code="ACME2")
    w.crm_company(4, "Dup two", code="ACME2")
    w.customer("g-acme2", "ACME2", "Acme 2")
    w.crm_company(5, "Five")  # no sales ledger yet
    w.customer("g-five", "FIVE", "Five")
    w.crm_contact(10, 1, "Ann", "A", email="ann@acme.com")
    w.erp_contact("c-ann", "g-acme", "Ann", "A", email="ann@acme.com")
    w.crm_contact(11, 1, "Bob", "B", email="bob@acme.com")
    w.erp_contact("c-bob", "g-acme", "Robert", "Bee", email="robert@acme.com")
    first = links.update_links(w.con, w.mappings)
    assert not first.skipped
    assert _links(w, "company_links") == {
        ("1", "g-acme", "account_code"),
        ("2", "g-two", "account_code"),
    }
    assert _links(w, "contact_links") == {("10", "c-ann", "email")}
    return w


def test_a_field_edit_reuses_the_links_and_keeps_reporting_ambiguity():
    w = _linked_world()
    diff.plan_changes(w.con, w.mappings)  # the linked pairs agree: their baseline is set
    w.edit("crm_contacts", "10", Phone="020 7946 0000")
    w.edit("unleashed_customers", "g-acme", CustomerName="Acme Ltd")
    result = links.update_links(w.con, w.mappings)
    assert result.skipped
    assert links.link_metadata(result)["pass"].startswith("skipped: no record's status")
    assert result.kept == {"company": 2, "contact": 1}
    assert _links(w, "contact_links") == {("10", "c-ann", "email")}
    # The ambiguous account code is still reported, in the result and in link_issues.
    assert list(result.ambiguous["key_value"]) == ["ACME2"]
    stored = w.con.execute("SELECT kind, key_value FROM link_issues").fetchall()
    assert stored == [("ambiguous", "ACME2")]
    # And the edits are planned as usual.
    plan = diff.plan_changes(w.con, w.mappings)
    plan = plan[plan["op"].str.startswith("update_")]
    assert sorted(zip(plan["op"], plan["field"], plan["new_value"], strict=True)) == [
        ("update_crm", "name", "Acme Ltd"),
        ("update_erp", "phone", "020 7946 0000"),
    ]


def _moved_to_two(w: World) -> None:
    """As the extract's upsert writes it: the same row, with its new parent."""
    w.edit("crm_contacts", "10", DivisionId=2)
    w.con.execute("UPDATE crm_contacts SET parent_id = '2' WHERE id = '10'")


def _ledger_for_five(w: World) -> None:
    w._put("crm_sales_ledgers", "L5", {"SalesLedgerId": 5, "DivisionId": 5, "AccountCode": "FIVE"},
           parent="5")  # fmt: skip


@pytest.mark.parametrize(
    ("change", "companies", "contacts"),
    [
        pytest.param(
            lambda w: w.edit("unleashed_contacts", "c-bob", EmailAddress="bob@acme.com"),
            {"1", "2"}, {"10", "11"}, id="a match key edited",
        ),
        pytest.param(
            lambda w: w.erp_contact("c-bob2", "g-acme", "B", "B", email="bob@acme.com"),
            {"1", "2"}, {"10", "11"}, id="a record added",
        ),
        pytest.param(
            lambda w: w.edit("crm_contacts", "10", active=False),
            {"1", "2"}, set(), id="a record deactivated",
        ),
        pytest.param(_moved_to_two, {"1", "2"}, set(), id="a contact moved to another company"),
        pytest.param(
            lambda w: w.edit("unleashed_customers", "g-acme", active=False),
            {"2"}, set(), id="a customer made obsolete",
        ),
        pytest.param(_ledger_for_five, {"1", "2", "5"}, {"10"}, id="a sales ledger added"),
    ],
)  # fmt: skip
def test_each_change_link_matching_reads_makes_a_full_pass(change, companies, contacts):
    w = _linked_world()
    change(w)
    result = links.update_links(w.con, w.mappings)
    assert not result.skipped
    assert links.link_metadata(result)["pass"] == "full"
    assert {c for c, _, _ in _links(w, "company_links")} == companies
    assert {c for c, _, _ in _links(w, "contact_links")} == contacts
    assert links.one_to_one_violations(w.con).empty


def _full_pass_result(w: World) -> tuple[set, set, list]:
    """What a pass that compares the tables finds, whatever the skip marker says."""
    w.con.execute("DELETE FROM link_state")
    links.update_links(w.con, w.mappings)
    issues = w.con.execute(
        "SELECT entity, kind, key_value, crm_ids, erp_ids FROM link_issues ORDER BY ALL"
    ).fetchall()
    return _links(w, "company_links"), _links(w, "contact_links"), issues


@pytest.mark.parametrize(
    ("change", "planned"),
    [
        pytest.param(
            lambda w: w.edit("crm_contacts", "10", Email="ann.new@acme.com"), "email",
            id="a linked CRM contact's email",
        ),
        pytest.param(
            lambda w: w.edit("unleashed_contacts", "c-ann", FirstName="Anna"), "first_name",
            id="a linked Unleashed contact's name",
        ),
        pytest.param(
            # Now the same as the unlinked Unleashed contact's: matching never reads it.
            lambda w: w.edit("crm_contacts", "10", Email="robert@acme.com"), "email",
            id="a linked contact's email equal to an unlinked one's",
        ),
        pytest.param(
            lambda w: w.edit("unleashed_customers", "g-two", CustomerCode="TWO-B"), None,
            id="a linked customer's code",
        ),
        pytest.param(
            lambda w: w.edit("crm_sales_ledgers", "L1", AccountCode="ACME-B"), None,
            id="a linked company's sales ledger code",
        ),
    ],
)  # fmt: skip
def test_a_linked_records_new_match_key_reuses_the_links(change, planned):
    """Matching pairs unlinked records only, and a link is kept while both records are active:
    a linked record's new email, name or code cannot change what a pass does, so the pass is
    skipped (at 1M/3M records it is 4 s of a push) and the result is the full pass's."""
    w = _linked_world()
    diff.plan_changes(w.con, w.mappings)
    before = _links(w, "company_links"), _links(w, "contact_links")
    change(w)
    result = links.update_links(w.con, w.mappings)
    assert result.skipped
    assert (_links(w, "company_links"), _links(w, "contact_links")) == before
    assert list(result.ambiguous["key_value"]) == ["ACME2"]
    companies, contacts, issues = _full_pass_result(w)
    assert (companies, contacts) == before
    assert [(e, k, v) for e, k, v, _, _ in issues] == [("company", "ambiguous", "ACME2")]
    # The edit itself is planned as usual (a code is not a synced field).
    plan = diff.plan_changes(w.con, w.mappings)
    updates = set(plan[plan["op"].str.startswith("update_")]["field"])
    assert updates == ({planned} if planned else set())


def test_changed_matching_rules_make_a_full_pass():
    w = _linked_world()
    contact = w.mappings["contact"]
    reordered = dict(w.mappings)
    reordered["contact"] = contact.model_copy(
        update={"match": contact.match.model_copy(update={"keys": contact.match.keys[::-1]})}
    )
    assert not links.update_links(w.con, reordered).skipped
    assert links.update_links(w.con, reordered).skipped


def test_an_ambiguity_a_later_rule_settles_is_linked_in_the_same_pass():
    """Two CRM contacts share an email that one Unleashed contact has: ambiguous by email. The
    name rule then links one of them elsewhere, so the email is held by one unlinked record on
    each side and links them, in this pass: no ambiguity is left to report, and a later pass
    over the same records has nothing to add (a pass is skipped when its inputs are unchanged)."""
    w = World()
    w.crm_company(1, "Acme", code="ACME")
    w.customer("g-acme", "ACME", "Acme")
    w.crm_contact(10, 1, "Ann", "A", email="shared@acme.com")
    w.crm_contact(11, 1, "Bob", "B", email="shared@acme.com")
    w.erp_contact("c-ann", "g-acme", "Ann", "Alder", email="shared@acme.com")
    w.erp_contact("c-bob", "g-acme", "Bob", "B", email="bob@acme.com")
    result = links.update_links(w.con, w.mappings)
    assert _links(w, "contact_links") == {("11", "c-bob", "full_name"), ("10", "c-ann", "email")}
    assert result.linked["contact"] == {"unleashed_guid": 0, "email": 1, "full_name": 1}
    assert result.ambiguous.empty
    assert w.con.execute("SELECT count(*) FROM link_issues").fetchone() == (0,)
    companies, contacts, issues = _full_pass_result(w)
    assert contacts == _links(w, "contact_links") and issues == []
    # Nothing is left for the planner to refuse as "matches but could not be linked".
    plan = diff.plan_changes(w.con, w.mappings)
    assert "reject" not in set(plan["op"])
