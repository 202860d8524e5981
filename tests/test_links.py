"""Link matching: companies by account code / Guid, contacts within linked companies by Guid,
email, then name; ambiguity refused; inactive records unlinked."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sync_pipeline import diff, links, schema
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


def test_a_key_shared_by_many_records_names_ten_and_counts_the_rest():
    """A placeholder email on many contacts: the report stays short and readable, and
    link_issues keeps every id. A name key reads as the name."""
    w = World()
    w.crm_company(1, "Acme", code="ACME")
    w.customer("g-acme", "ACME", "Acme")
    for i in range(12):
        w.crm_contact(100 + i, 1, f"P{i}", "X", email="none@acme.com")
    w.erp_contact("c-none", "g-acme", "Q", "Y", email="none@acme.com")
    w.crm_contact(20, 1, "Ann", "Lee")
    w.crm_contact(21, 1, "Ann", "Lee")
    w.erp_contact("c-ann", "g-acme", "Ann", "Lee")
    result = links.update_links(w.con, w.mappings)
    by_method = {r.method: r for r in result.ambiguous.itertuples(index=False)}
    email = by_method["email"]
    assert email.detail == (
        "contact email 'none@acme.com' is shared by CRM 100, 101, 102, 103, 104, 105, 106, 107, "
        "108, 109 and 2 more and Unleashed c-none; not linked: make the key unique on each side"
    )
    assert len(email.crm_ids) == 12
    stored = w.con.execute("SELECT len(crm_ids) FROM link_issues WHERE method = 'email'").fetchone()
    assert stored == (12,)
    assert "contact full_name 'Ann Lee' is shared by CRM 20, 21" in by_method["full_name"].detail
    # The planner's refusal to create the Unleashed contact in the CRM names them the same way.
    plan = diff.plan_changes(w.con, w.mappings)
    reason = plan.loc[plan["erp_id"] == "c-none", "reason"].item()
    assert (
        "CRM contact 100, 101, 102, 103, 104, 105, 106, 107, 108, 109 and 2 more matches" in reason
    )


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
    schema.ensure(w.con)
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
    w.edit("crm_contacts", "10", PhoneNumber="020 7946 0000")
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
    """The division is pointed at a sales ledger (it comes expanded with the division)."""
    w.edit("crm_companies", "5", SalesLedgerId="SL5", SalesLedger={"CustomerCode": "FIVE"})


CONTACTS_ONLY = "full for contacts; skipped for companies: no record's status or parent"


@pytest.mark.parametrize(
    ("change", "companies", "contacts", "described"),
    [
        pytest.param(
            lambda w: w.edit("unleashed_contacts", "c-bob", EmailAddress="bob@acme.com"),
            {"1", "2"}, {"10", "11"}, CONTACTS_ONLY, id="a match key edited",
        ),
        pytest.param(
            lambda w: w.erp_contact("c-bob2", "g-acme", "B", "B", email="bob@acme.com"),
            {"1", "2"}, {"10", "11"}, CONTACTS_ONLY, id="a record added",
        ),
        pytest.param(
            lambda w: w.edit("crm_contacts", "10", active=False),
            {"1", "2"}, set(), CONTACTS_ONLY, id="a record deactivated",
        ),
        pytest.param(_moved_to_two, {"1", "2"}, set(), CONTACTS_ONLY,
                     id="a contact moved to another company"),
        # A company change runs the contact pass too: it reads the company links.
        pytest.param(
            lambda w: w.edit("unleashed_customers", "g-acme", active=False),
            {"2"}, set(), "full", id="a customer made obsolete",
        ),
        pytest.param(_ledger_for_five, {"1", "2", "5"}, {"10"}, "full",
                     id="a sales ledger added"),
    ],
)  # fmt: skip
def test_each_change_link_matching_reads_makes_a_full_pass(change, companies, contacts, described):
    """A change that matching reads makes its entity's pass compare the tables; a contact-only
    change leaves the companies' pass skipped (0.85 s of a 3.7 s pass at 1M/3M records)."""
    w = _linked_world()
    change(w)
    result = links.update_links(w.con, w.mappings)
    assert not result.skipped
    assert links.link_metadata(result)["pass"].startswith(described)
    assert {c for c, _, _ in _links(w, "company_links")} == companies
    assert {c for c, _, _ in _links(w, "contact_links")} == contacts
    assert links.one_to_one_violations(w.con).empty
    # What a pass comparing every table finds: the same links, the same ambiguous keys.
    ambiguous = w.con.execute(
        "SELECT entity, key_value FROM link_issues WHERE kind = 'ambiguous' ORDER BY ALL"
    ).fetchall()
    after = _links(w, "company_links"), _links(w, "contact_links")
    found_companies, found_contacts, issues = _full_pass_result(w)
    assert (found_companies, found_contacts) == after
    assert [(e, v) for e, k, v, _, _ in issues if k == "ambiguous"] == ambiguous


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
            lambda w: w.edit("crm_companies", "1", SalesLedger__CustomerCode="ACME-B"), None,
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


# The rules against a model ------------------------------------------------------------------
# A pass as the rules read (module docstring of links.py), in plain Python over small worlds:
# links kept while both records are active (contacts: while their companies are linked to each
# other), then each rule in order pairs unlinked records holding the same key (contacts: under
# linked companies), a pair links when each record has exactly one partner, and the rules run
# again while a round linked a record of a key found ambiguous.

_CODES = ["A", "B", ""]  # "" = no sales ledger (CRM) / empty code (Unleashed)
_EMAILS = ["x@a.com", " X@A.com", "y@a.com", ""]
_NAMES = [("Ann", "A"), ("Bob", "B"), ("", "")]
_company = st.tuples(st.sampled_from(_CODES), st.booleans())  # code, active
_contact = st.tuples(
    st.integers(0, 2), st.sampled_from(_EMAILS), st.sampled_from(_NAMES), st.booleans()
)  # company slot, email, name, active
_state = st.fixed_dictionaries(
    {
        "crm_co": st.lists(_company, min_size=3, max_size=3),
        "erp_co": st.lists(_company, min_size=3, max_size=3),
        "crm_ct": st.lists(_contact, min_size=0, max_size=5),
        "erp_ct": st.lists(_contact, min_size=0, max_size=5),
    }
)


def _write(w: World, state: dict, before: dict | None) -> None:
    """The state's records, as extracts write them (only the rows that changed)."""

    def changed(kind: str, i: int) -> bool:
        return before is None or i >= len(before[kind]) or before[kind][i] != state[kind][i]

    for i, (code, active) in enumerate(state["crm_co"]):
        if changed("crm_co", i):
            # An empty code: a division without a sales ledger.
            w.crm_company(i + 1, f"Co {i}", active=active, code=code or None)
    for i, (code, active) in enumerate(state["erp_co"]):
        if changed("erp_co", i):
            w.customer(f"g{i}", code, f"Cu {i}", active=active)
    for i, (parent, email, (first, last), active) in enumerate(state["crm_ct"]):
        if changed("crm_ct", i):
            w.crm_contact(10 + i, parent + 1, first, last, email=email, active=active)
    for i, (parent, email, (first, last), active) in enumerate(state["erp_ct"]):
        if changed("erp_ct", i):
            w.erp_contact(f"c{i}", f"g{parent}", first, last, email=email, active=active)


def _model_rounds(links, crm, erp, rules, parent_ok):
    """Matching as the rules read, from `links` (crm_id, erp_id, method); returns the links and
    the last round's ambiguous keys {(method, key): (crm ids, erp ids)}."""
    links = dict(links)  # (crm, erp) -> method
    while True:
        ambiguous = {}
        for method, crm_keys, erp_key in rules:
            linked_c = {c for c, _ in links}
            linked_e = {e for _, e in links}
            rows = {
                (c, e, k)
                for c, crec in crm.items()
                if crec["active"] and c not in linked_c
                for k in crm_keys(crec)
                for e, erec in erp.items()
                if erec["active"] and e not in linked_e and erp_key(erec) == k and parent_ok(c, e)
            }
            n_crm = {e: sum(1 for r in rows if r[1] == e) for _, e, _ in rows}
            n_erp = {c: sum(1 for r in rows if r[0] == c) for c, _, _ in rows}
            for c, e, _ in rows:
                if n_crm[e] == 1 and n_erp[c] == 1:
                    links[(c, e)] = method
            for c, e, k in rows:
                if n_crm[e] > 1 or n_erp[c] > 1:
                    cs, es = ambiguous.setdefault((method, k), (set(), set()))
                    cs.add(c)
                    es.add(e)
        members = {x for cs, es in ambiguous.values() for x in cs | es}
        if not members & {x for pair in links for x in pair}:
            return links, ambiguous


def _model_pass(state: dict, co_links: dict, ct_links: dict):
    crm_co = {str(i + 1): {"active": a, "code": c} for i, (c, a) in enumerate(state["crm_co"])}
    erp_co = {f"g{i}": {"active": a, "code": c} for i, (c, a) in enumerate(state["erp_co"])}
    crm_ct = {
        str(10 + i): {"active": a, "parent": str(p + 1), "email": m, "name": n}
        for i, (p, m, n, a) in enumerate(state["crm_ct"])
    }
    erp_ct = {
        f"c{i}": {"active": a, "parent": f"g{p}", "email": m, "name": n}
        for i, (p, m, n, a) in enumerate(state["erp_ct"])
    }
    unlinked = set()
    kept = {}
    for (c, e), method in co_links.items():
        if crm_co[c]["active"] and erp_co[e]["active"]:
            kept[(c, e)] = method
        else:
            unlinked.add(("company", c, e))
    rules = [("account_code", lambda r: {r["code"]} - {""}, lambda r: r["code"] or None)]
    co, co_amb = _model_rounds(kept, crm_co, erp_co, rules, lambda c, e: True)
    kept = {}
    for (c, e), method in ct_links.items():
        ok = crm_ct[c]["active"] and erp_ct[e]["active"]
        if ok and (crm_ct[c]["parent"], erp_ct[e]["parent"]) in co:
            kept[(c, e)] = method
        else:
            unlinked.add(("contact", c, e))

    def email(r):
        return r["email"].strip().lower() or None

    def name(r):
        return None if r["name"] == ("", "") else "\x1f".join(r["name"])

    rules = [
        ("email", lambda r: {email(r)} - {None}, email),
        ("full_name", lambda r: {name(r)} - {None}, name),
    ]
    ct, ct_amb = _model_rounds(
        kept, crm_ct, erp_ct, rules, lambda c, e: (crm_ct[c]["parent"], erp_ct[e]["parent"]) in co
    )
    issues = {
        (entity, method, key, tuple(sorted(cs)), tuple(sorted(es)))
        for entity, amb in (("company", co_amb), ("contact", ct_amb))
        for (method, key), (cs, es) in amb.items()
    }
    return co, ct, unlinked, issues


def _found(w: World, result: links.LinkResult):
    co = {(c, e): m for c, e, m in _links(w, "company_links")}
    ct = {(c, e): m for c, e, m in _links(w, "contact_links")}
    rows = w.con.execute(
        "SELECT entity, kind, method, key_value, crm_ids, erp_ids FROM link_issues"
    ).fetchall()
    issues = {
        (e, m, k, tuple(cs), tuple(es)) for e, kind, m, k, cs, es in rows if kind == "ambiguous"
    }
    unlinked = {(e, cs[0], es[0]) for e, kind, _, _, cs, es in rows if kind == "unlinked"}
    if result.skipped:
        unlinked = set()  # reported by the pass that unlinked them
    return co, ct, unlinked, issues


_BOTH_LINKED = [("A", True), ("B", True), ("", False)]  # companies 1 = g0 and 2 = g1


@settings(max_examples=100, deadline=None)
@given(first=_state, second=_state)
@example(  # an email ambiguity that the name rule settles (another round links it)
    first={
        "crm_co": _BOTH_LINKED,
        "erp_co": _BOTH_LINKED,
        "crm_ct": [(0, "x@a.com", ("Ann", "A"), True), (0, "x@a.com", ("Bob", "B"), True)],
        "erp_ct": [(0, "x@a.com", ("", ""), True), (0, "y@a.com", ("Bob", "B"), True)],
    },
    second={"crm_co": _BOTH_LINKED, "erp_co": _BOTH_LINKED, "crm_ct": [], "erp_ct": []},
)
@example(  # a linked contact moved to the other linked company pair on both sides
    first={
        "crm_co": _BOTH_LINKED,
        "erp_co": _BOTH_LINKED,
        "crm_ct": [(0, "x@a.com", ("Ann", "A"), True)],
        "erp_ct": [(0, "x@a.com", ("Ann", "A"), True)],
    },
    second={
        "crm_co": _BOTH_LINKED,
        "erp_co": _BOTH_LINKED,
        "crm_ct": [(1, "x@a.com", ("Ann", "A"), True)],
        "erp_ct": [(1, "x@a.com", ("Ann", "A"), True)],
    },
)
def test_link_passes_do_what_the_rules_say(first, second):
    """Two passes (a world, then the same records changed and added to as extracts write them)
    give the links, the unlinked records and the ambiguous keys of the model above, and each
    contact link names its contacts' current companies."""
    w = World()
    _write(w, first, None)
    model = _model_pass(first, {}, {})
    assert _found(w, links.update_links(w.con, w.mappings)) == model
    assert links.one_to_one_violations(w.con).empty
    # Records are never deleted: contacts beyond the second list keep their first state.
    second = {k: v + first[k][len(v) :] for k, v in second.items()}
    _write(w, second, first)
    model = _model_pass(second, model[0], model[1])
    assert _found(w, links.update_links(w.con, w.mappings)) == model
    assert links.one_to_one_violations(w.con).empty
    (stale,) = w.con.execute(
        """SELECT count(*) FROM contact_links l
           JOIN crm_contacts c ON c.id = l.crm_id JOIN unleashed_contacts e ON e.id = l.erp_id
           WHERE l.crm_parent_id IS DISTINCT FROM c.parent_id
              OR l.erp_parent_id IS DISTINCT FROM e.parent_id"""
    ).fetchone()
    assert stale == 0
