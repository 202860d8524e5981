"""Link matching: companies by account code / Guid, contacts within linked companies by Guid,
email, then name; ambiguity refused; inactive records unlinked."""

from __future__ import annotations

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
