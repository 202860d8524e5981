"""Preflight: prove that the configured CRM tenant and Unleashed account fit the mappings before
anything is read into the sync or written.

It checks the credentials of both systems (and Unleashed's `client-type`), reads the CRM's
`$metadata` and resolves every CRM name the mappings use (entity sets, keys, fields, navigation
paths, `$expand`s, link slots, creation values) with a compatible type, checks the tenant guards
(operating companies, advanced ledgers, Prospect's own Unleashed integration), that the creation
values name rows that exist (the contact role, the operating company) and that the link slots
hold nothing but Unleashed Guids. A mistake is reported with the mapping file, the entry, the
missing name and the closest real names.

The result is kept in DuckDB with a fingerprint of the mapping files; sync runs write only while
the last preflight passed for the mappings as they are (`write_block`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
from defusedxml import ElementTree

from sync_pipeline import schema
from sync_pipeline.clients.base import ApiError, AuthError, NotFoundError
from sync_pipeline.clients.crm import CrmClient, TenantFacts, encode_query, key_segment
from sync_pipeline.clients.unleashed import UnleashedClient
from sync_pipeline.mapping import EntityMapping

# A passing preflight is trusted this long for unchanged mappings, then run again (a tenant's
# settings, roles and users can change under the sync).
VALID_FOR = timedelta(hours=24)
STATE_TABLE = "preflight_state"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# Edm types a synced text field may have (the normalisers work on text).
_TEXT_TYPES = {"Edm.String"}
_INTEGER_TYPES = {"Edm.Int32", "Edm.Int16", "Edm.Int64", "Edm.Byte"}
# How many link-slot values are sampled to see that the slot holds Unleashed Guids only.
SLOT_SAMPLE = 50


class PreflightError(RuntimeError):
    """The preflight failed: the message lists every problem."""


@dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    where: str  # "mappings/company.yaml: fields.phone.crm", "CRM tenant", ...
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()}: {self.where}: {self.message}"


@dataclass
class PreflightReport:
    fingerprint: str
    checked_at: datetime
    findings: list[Finding] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, where: str, message: str) -> None:
        self.findings.append(Finding("error", where, message))

    def warn(self, where: str, message: str) -> None:
        self.findings.append(Finding("warning", where, message))

    def text(self) -> str:
        head = "Preflight passed." if self.ok else f"Preflight FAILED: {len(self.errors)} error(s)."
        lines = [head, *(f"  {f}" for f in self.findings), *(f"  {s}" for s in self.summary)]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# $metadata
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EntityType:
    name: str
    keys: tuple[str, ...]
    props: dict[str, tuple[str, bool]]  # name -> (Edm type, nullable)
    navs: dict[str, str]  # name -> target type name (collections as "Collection(...)")


@dataclass(frozen=True)
class Metadata:
    types: dict[str, EntityType]
    sets: dict[str, str]  # entity set -> type name

    def type_of_set(self, entity_set: str) -> EntityType | None:
        name = self.sets.get(entity_set)
        return None if name is None else self.types.get(name)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _short_type(name: str) -> str:
    inner = name[len("Collection(") : -1] if name.startswith("Collection(") else name
    return inner.rsplit(".", 1)[-1]


def parse_metadata(xml_text: str) -> Metadata:
    """Entity types (keys, properties with type and nullability, navigations) and entity sets
    of a CSDL document. Parsed with defusedxml: the document comes from the network."""
    try:
        root = ElementTree.fromstring(xml_text)
    except ElementTree.ParseError as exc:
        raise PreflightError(f"the CRM's $metadata is not valid XML: {exc}") from None
    types: dict[str, EntityType] = {}
    sets: dict[str, str] = {}
    for element in root.iter():
        tag = _local(element.tag)
        if tag == "EntityType":
            keys: list[str] = []
            props: dict[str, tuple[str, bool]] = {}
            navs: dict[str, str] = {}
            for child in element:
                child_tag = _local(child.tag)
                if child_tag == "Key":
                    keys += [
                        ref.get("Name", "") for ref in child if _local(ref.tag) == "PropertyRef"
                    ]
                elif child_tag == "Property":
                    nullable = child.get("Nullable", "true").lower() != "false"
                    props[child.get("Name", "")] = (child.get("Type", ""), nullable)
                elif child_tag == "NavigationProperty":
                    navs[child.get("Name", "")] = child.get("Type", "")
            name = element.get("Name", "")
            types[name] = EntityType(name, tuple(keys), props, navs)
        elif tag == "EntitySet":
            sets[element.get("Name", "")] = _short_type(element.get("EntityType", ""))
    if not sets:
        raise PreflightError("the CRM's $metadata declares no entity sets")
    return Metadata(types, sets)


def _closest(name: str, candidates: Iterable[str]) -> str:
    candidates = sorted(set(candidates))
    by_lower = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.5)
    hits = [by_lower[h] for h in hits]
    hits += [c for c in candidates if name.lower() in c.lower() and c not in hits][:3]
    return f"; closest: {', '.join(hits[:4])}" if hits else ""


class _Resolver:
    """Resolves mapping names against the metadata, recording a finding for each miss."""

    def __init__(self, meta: Metadata, report: PreflightReport, source: str) -> None:
        self.meta, self.report, self.source = meta, report, source

    def where(self, entry: str) -> str:
        return f"{self.source}: {entry}"

    def entity_set(self, entry: str, name: str) -> EntityType | None:
        etype = self.meta.type_of_set(name)
        if etype is None:
            self.report.error(
                self.where(entry),
                f"no entity set {name!r} in the CRM's $metadata{_closest(name, self.meta.sets)}",
            )
        return etype

    def prop(
        self, entry: str, etype: EntityType, name: str, types: set[str] | None = None
    ) -> tuple[str, bool] | None:
        found = etype.props.get(name)
        if found is None:
            hint = _closest(name, [*etype.props, *etype.navs])
            if name in etype.navs:
                hint = " (it is a navigation property: name a field of its target)"
            self.report.error(
                self.where(entry), f"{name!r} is not a property of {etype.name}{hint}"
            )
            return None
        if types is not None and found[0] not in types:
            self.report.error(
                self.where(entry),
                f"{etype.name}.{name} is {found[0]}, not {' or '.join(sorted(types))}",
            )
        return found

    def nav(self, entry: str, etype: EntityType, name: str) -> EntityType | None:
        target = etype.navs.get(name)
        if target is None:
            self.report.error(
                self.where(entry),
                f"{name!r} is not a navigation property of {etype.name}"
                f"{_closest(name, etype.navs)}",
            )
            return None
        if target.startswith("Collection("):
            self.report.error(
                self.where(entry), f"{etype.name}.{name} is a collection, not a single record"
            )
            return None
        return self.meta.types.get(_short_type(target))

    def path(
        self, entry: str, etype: EntityType, path: str, types: set[str] | None = None
    ) -> tuple[str, bool] | None:
        """A dotted path: navigations, then a property."""
        *navs, last = path.split(".")
        current: EntityType | None = etype
        for name in navs:
            current = self.nav(entry, current, name)
            if current is None:
                return None
        return self.prop(entry, current, last, types)


_EXPAND = re.compile(r"^(\w+)(?:\(\$select=([\w,]+)\))?$")


def check_mapping(meta: Metadata, mapping: EntityMapping, report: PreflightReport) -> None:
    """Every CRM name of one mapping, against the metadata."""
    r = _Resolver(meta, report, mapping.source_file or f"mappings/{mapping.entity}.yaml")
    crm = mapping.crm
    etype = r.entity_set("crm.entity_set", crm.entity_set)
    if etype is None:
        return
    if etype.keys != (crm.key,):
        report.error(
            r.where("crm.key"),
            f"the key of {crm.entity_set} is {', '.join(etype.keys) or '(none)'}, not {crm.key!r}",
        )
    r.prop("crm.modified", etype, crm.modified, {"Edm.DateTimeOffset"})
    if crm.parent_key:
        r.prop("crm.parent_key", etype, crm.parent_key, _INTEGER_TYPES)
    expanded: dict[str, set[str] | None] = {}
    for i, text in enumerate(crm.expand):
        match = _EXPAND.match(text)
        if not match:
            continue  # the loader refuses other shapes
        nav_name, selected = match.group(1), match.group(2)
        target = r.nav(f"crm.expand[{i}]", etype, nav_name)
        if target is None:
            continue
        names = selected.split(",") if selected else []
        for name in names:
            r.prop(f"crm.expand[{i}]", target, name)
        expanded[nav_name] = set(names) if names else None
    # The link slot: the record's navigation to its satellite set, and a text field there.
    link = crm.link
    slot_type = r.entity_set("crm.link.entity_set", link.entity_set)
    nav_target = r.nav("crm.link.navigation", etype, link.navigation)
    if slot_type is not None and nav_target is not None and nav_target.name != slot_type.name:
        report.error(
            r.where("crm.link.navigation"),
            f"{etype.name}.{link.navigation} leads to {nav_target.name}, not to "
            f"{link.entity_set} ({slot_type.name})",
        )
    if slot_type is not None:
        r.prop("crm.link.field", slot_type, link.field, _TEXT_TYPES)
    expanded[link.navigation] = {link.field}

    def readable(entry: str, path: str, types: set[str] | None) -> None:
        found = r.path(entry, etype, path, types)
        nav_name, _, rest = path.partition(".")
        if found is None or not rest:
            return
        selected = expanded.get(nav_name, set())
        if nav_name not in expanded:
            report.error(
                r.where(entry),
                f"{path!r} reads the navigation {nav_name!r}, which crm.expand does not expand",
            )
        elif selected is not None and "." not in rest and rest not in selected:
            report.error(
                r.where(entry), f"crm.expand selects {sorted(selected)} of {nav_name}, not {rest!r}"
            )

    for i, key in enumerate(mapping.match.keys):
        for path in key.crm:
            table_entry = f"match.keys[{i}] ({key.name}).crm"
            if key.crm_table:
                continue  # read from another extracted table; checked by its own extract
            readable(table_entry, path, _TEXT_TYPES)
    for name, spec in mapping.fields.items():
        readable(f"fields.{name}.crm", spec.crm, _TEXT_TYPES)
        writes = spec.direction in (None, "both", "erp_to_crm")
        if spec.crm_write is not None:
            ref = spec.crm_write
            prop = r.prop(f"fields.{name}.crm_write.field", etype, ref.field)
            if prop is not None and not prop[1] and ref.blank is None and writes:
                report.error(
                    r.where(f"fields.{name}.crm_write.blank"),
                    f"{etype.name}.{ref.field} cannot be empty in the CRM: set `blank` to the "
                    "value that stands for none (e.g. a house user's code)",
                )
        elif "." not in spec.crm and writes and "unleashed_required" not in spec.checks_to("erp"):
            prop = etype.props.get(spec.crm)
            if prop is not None and not prop[1]:
                report.warn(
                    r.where(f"fields.{name}.crm"),
                    f"{etype.name}.{spec.crm} cannot be empty in the CRM: an empty Unleashed value "
                    "is refused by the CRM and reported",
                )
    for field_name in crm.create.values:
        r.prop(f"crm.create.values.{field_name}", etype, field_name)
    parent = crm.create.parent
    if parent is not None:
        ptype = r.entity_set("crm.create.parent.entity_set", parent.entity_set)
        if ptype is not None:
            r.prop("crm.create.parent.key", ptype, parent.key, _INTEGER_TYPES)
            r.prop("crm.create.parent.key", etype, parent.key, _INTEGER_TYPES)
            for field_name in parent.values:
                r.prop(f"crm.create.parent.values.{field_name}", ptype, field_name)
            for field_name, source in parent.from_record.items():
                r.prop(f"crm.create.parent.from_record.{field_name}", ptype, field_name)
                r.prop(f"crm.create.parent.from_record.{field_name}", etype, source)
    # Not-null fields a create must send that nothing in the mapping supplies.
    supplied = set(crm.create.values)
    supplied |= {s.crm for s in mapping.fields.values() if "." not in s.crm}
    supplied |= {s.crm_write.field for s in mapping.fields.values() if s.crm_write}
    supplied |= {k for k in (parent.key if parent else None, crm.parent_key) if k}
    missing = [
        n
        for n, (_, nullable) in etype.props.items()
        if not nullable and n not in supplied and n not in etype.keys and _required_hint(n)
    ]
    for name in missing:
        report.warn(
            r.where("crm.create.values"),
            f"{etype.name}.{name} is NOT NULL and the mapping does not set it on create: "
            "the CRM must default it",
        )


def _required_hint(name: str) -> bool:
    """NOT NULL columns the live service is known to default itself (audit, status, address)."""
    return name not in {
        "StatusFlag",
        "Created",
        "LastUpdated",
        "LastUpdatedTimestamp",
        "AddressId",
        "AccountManager",
        "CreatedBy",
        "LastUpdatedBy",
    }


# --------------------------------------------------------------------------------------------
# The whole preflight
# --------------------------------------------------------------------------------------------
def mappings_fingerprint(mappings: dict[str, EntityMapping]) -> str:
    """A digest of the mappings as loaded (any edit of a mapping file changes it)."""
    body = json.dumps(
        {k: m.model_dump(exclude={"source_file"}) for k, m in sorted(mappings.items())},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def run_preflight(
    crm: CrmClient,
    unleashed: UnleashedClient,
    mappings: dict[str, EntityMapping],
    *,
    two_way_sync: bool = True,
) -> PreflightReport:
    report = PreflightReport(mappings_fingerprint(mappings), datetime.now(UTC))
    # Unleashed: one small signed request proves the id, the key and the client-type.
    try:
        salespersons = unleashed.list_salespersons()
        report.summary.append(
            f"Unleashed: credentials and client-type accepted; "
            f"{len(salespersons.items)} salespersons."
        )
    except AuthError as exc:
        report.error(
            "Unleashed",
            f"credentials or client-type refused ({exc.status}): {exc.message}. Check "
            "UNLEASHED_API_ID, UNLEASHED_API_KEY and UNLEASHED_CLIENT_TYPE (lowercase owner/app)",
        )
    except ApiError as exc:
        report.error("Unleashed", f"cannot be reached: {exc}")
    try:
        meta = parse_metadata(crm.metadata())
    except AuthError as exc:
        report.error("CRM", f"the personal access token is refused ({exc.status}): check CRM_TOKEN")
        return report
    except (ApiError, PreflightError) as exc:
        report.error("CRM", f"$metadata cannot be read: {exc}")
        return report
    report.summary.append(
        f"CRM: token accepted; $metadata has {len(meta.sets)} entity sets, "
        f"{len(meta.types)} entity types."
    )
    for mapping in mappings.values():
        check_mapping(meta, mapping, report)
    if "Users" not in meta.sets:
        report.error("CRM", "no entity set 'Users' (account managers are CRM users)")
    if report.errors:
        return report  # names are wrong: reading with them would fail or mislead
    _check_tenant(crm, report, two_way_sync)
    _check_creation_values(crm, meta, mappings, report)
    _check_blank_users(crm, mappings, report)
    _check_link_slots(crm, mappings, report)
    _count_records(crm, mappings, report)
    return report


def _check_tenant(crm: CrmClient, report: PreflightReport, two_way_sync: bool) -> None:
    try:
        facts: TenantFacts = crm.tenant_facts()
    except ApiError as exc:
        report.error("CRM tenant", f"tenant settings cannot be read: {exc}")
        return
    report.summary.append("CRM tenant: " + "; ".join(facts.evidence))
    reason = facts.refusal_reason()
    if reason:
        report.error("CRM tenant", f"the sync refuses this tenant: {reason}")


def _check_creation_values(
    crm: CrmClient, meta: Metadata, mappings: dict[str, EntityMapping], report: PreflightReport
) -> None:
    """A creation value that is a reference (RoleCode, OperatingCompanyCode) must name a row
    that exists: found through the navigation whose key the value fills."""
    for mapping in mappings.values():
        etype = meta.type_of_set(mapping.crm.entity_set)
        values = mapping.crm.create.values
        if etype is None or not values:
            continue
        for nav_name, target_name in etype.navs.items():
            target = meta.types.get(_short_type(target_name))
            target_set = next(
                (s for s, t in meta.sets.items() if t == _short_type(target_name)), None
            )
            if target is None or target_set is None or target_name.startswith("Collection("):
                continue
            fk = _single_fk(etype, target, nav_name)
            if fk is None or fk not in values:
                continue
            where = f"{mapping.source_file}: crm.create.values.{fk}"
            try:
                crm.get(target_set, values[fk])
                report.summary.append(f"{fk} {values[fk]!r} exists in {target_set}.")
            except NotFoundError:
                near = _closest_rows(crm, target_set, target.keys[0], values[fk])
                report.error(
                    where,
                    f"{values[fk]!r} is not a {target_set} row of this tenant "
                    f"({target.keys[0]}){near}",
                )
            except ApiError as exc:
                report.error(where, f"cannot check it in {target_set}: {exc}")


def _single_fk(etype: EntityType, target: EntityType, nav_name: str) -> str | None:
    """The property of `etype` that holds `target`'s single key through `nav_name`, by the
    naming the live model follows (Role -> RoleCode, OperatingCompany -> OperatingCompanyCode)."""
    if len(target.keys) != 1:
        return None
    key = target.keys[0]
    for candidate in (key, f"{nav_name}Code", f"{nav_name}Id"):
        if candidate in etype.props and candidate not in etype.keys:
            return candidate
    return None


def _closest_rows(crm: CrmClient, entity_set: str, key: str, value: Any) -> str:
    """The nearest values of a small lookup set; all of them when none is near."""
    try:
        rows = crm.list(entity_set).items
    except ApiError:
        return ""
    values = sorted(str(r.get(key)) for r in rows if r.get(key) is not None)
    near = _closest(str(value), values)
    if near or not values:
        return near
    shown = ", ".join(values[:12]) + (", …" if len(values) > 12 else "")
    return f"; the tenant has: {shown}"


def _check_blank_users(
    crm: CrmClient, mappings: dict[str, EntityMapping], report: PreflightReport
) -> None:
    for mapping in mappings.values():
        for name, spec in mapping.fields.items():
            ref = spec.crm_write
            if ref is None or ref.blank is None or ref.table != "crm_users":
                continue
            where = f"{mapping.source_file}: fields.{name}.crm_write.blank"
            try:
                user = crm.get("Users", ref.blank)
            except NotFoundError:
                report.error(where, f"no CRM user has the code {ref.blank!r}")
                continue
            except ApiError as exc:
                report.error(where, f"cannot check the user {ref.blank!r}: {exc}")
                continue
            if user.get(ref.match):
                report.warn(
                    where,
                    f"user {ref.blank!r} has {ref.match} {user.get(ref.match)!r}: a company it "
                    "manages reads as managed by that person, not as having no account manager",
                )


def _check_link_slots(
    crm: CrmClient, mappings: dict[str, EntityMapping], report: PreflightReport
) -> None:
    """The link slot must hold Unleashed Guids only: any other value means the tenant uses that
    custom field for something else, and the sync would overwrite it."""
    for mapping in mappings.values():
        link = mapping.crm.link
        try:
            rows = crm.list(
                link.entity_set,
                filter=f"{link.field} ne null",
                select=[link.field],
                count=True,
                page_size=SLOT_SAMPLE,
            )
        except ApiError as exc:
            report.error(f"{mapping.source_file}: crm.link", f"cannot read the slot: {exc}")
            continue
        foreign = [r for r in rows.items if r.get(link.field) and not _GUID.match(r[link.field])]
        where = f"{mapping.source_file}: crm.link.field"
        if foreign:
            sample = foreign[0]
            report.error(
                where,
                f"{link.entity_set}.{link.field} already holds other data (e.g. "
                f"{sample[link.field]!r} on {link.entity_set}"
                f"({key_segment(link.entity_set, sample.get(next(iter(sample))))})): choose a "
                "slot this tenant does not use",
            )
        else:
            report.summary.append(
                f"Link slot {link.entity_set}.{link.field}: "
                f"{rows.reported_total or len(rows.items)} Unleashed Guids kept."
            )


def _count_records(
    crm: CrmClient, mappings: dict[str, EntityMapping], report: PreflightReport
) -> None:
    counts = []
    for mapping in mappings.values():
        try:
            options = [("$filter", "StatusFlag ne 'D'"), ("$count", "true"), ("$top", "0")]
            body = crm.request(
                "GET",
                f"/{mapping.crm.entity_set}",
                query=encode_query(options),
                label=f"/{mapping.crm.entity_set}",
            )
            counts.append(f"{body.get('@odata.count')} {mapping.crm.entity_set}")
        except ApiError:
            continue
    if counts:
        report.summary.append("CRM holds " + ", ".join(counts) + " (not deleted).")


# --------------------------------------------------------------------------------------------
# Kept in DuckDB: what writers check
# --------------------------------------------------------------------------------------------
def record(con: duckdb.DuckDBPyConnection, report: PreflightReport) -> None:
    schema.ensure(con)
    con.execute(f"DELETE FROM {STATE_TABLE}")
    con.execute(
        f"INSERT INTO {STATE_TABLE} VALUES (?, ?, ?, ?)",
        [report.checked_at.replace(tzinfo=None), report.fingerprint, report.ok, report.text()],
    )


def last(con: duckdb.DuckDBPyConnection) -> tuple[datetime, str, bool, str] | None:
    schema.ensure(con)
    row = con.execute(
        f"SELECT checked_at, fingerprint, ok, report FROM {STATE_TABLE} LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    return row[0].replace(tzinfo=UTC), row[1], bool(row[2]), row[3]


def write_block(con: duckdb.DuckDBPyConnection, mappings: dict[str, EntityMapping]) -> str | None:
    """Why a sync run must not write now, or None: the last preflight failed, none ran, or the
    mappings changed since it passed."""
    kept = last(con)
    if kept is None:
        return "no preflight has run for this database: run `sync-pipeline check`"
    _, fingerprint, ok, text = kept
    if not ok:
        return "the last preflight failed; nothing is written until it passes:\n" + text
    if fingerprint != mappings_fingerprint(mappings):
        return "the mappings changed since the last preflight passed: it must run again"
    return None


def needs_run(con: duckdb.DuckDBPyConnection, mappings: dict[str, EntityMapping]) -> bool:
    """A sync run checks again when the kept result does not cover these mappings, failed, or
    is older than `VALID_FOR`."""
    kept = last(con)
    if kept is None:
        return True
    checked_at, fingerprint, ok, _ = kept
    stale = datetime.now(UTC) - checked_at > VALID_FOR
    return stale or not ok or fingerprint != mappings_fingerprint(mappings)


def ensure(
    con: duckdb.DuckDBPyConnection,
    open_crm: Callable[[], AbstractContextManager[CrmClient]],
    open_unleashed: Callable[[], AbstractContextManager[UnleashedClient]],
    mappings: dict[str, EntityMapping],
    *,
    two_way_sync: bool,
) -> tuple[PreflightReport | None, str | None]:
    """Run the preflight when the kept result does not cover these mappings (or failed, or is
    a day old), keep it, and say why writing must not happen now (None: it may)."""
    report = None
    if needs_run(con, mappings):
        with open_crm() as crm, open_unleashed() as unleashed:
            report = run_preflight(crm, unleashed, mappings, two_way_sync=two_way_sync)
        record(con, report)
    return report, write_block(con, mappings)
