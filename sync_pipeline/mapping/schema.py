"""Declarative field mapping: pydantic models for `mappings/*.yaml` and a strict loader.

Every identifier in a mapping reaches SQL (DuckDB JSON paths, column aliases) and OData
(`$select`, `$filter`), so each one is checked against a conservative pattern at load time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from sync_pipeline.configfile import ConfigFileError, read_config
from sync_pipeline.core import Policy, Side

PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# An OData navigation to expand, optionally with a $select of plain names.
EXPAND_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\(\$select=[A-Za-z_]\w*(,[A-Za-z_]\w*)*\))?$")

Direction = Literal["both", "crm_to_erp", "erp_to_crm"]
Normaliser = Literal["text", "name", "phone", "email", "website", "exact"]
# The named checks (mapping/validate.py) a field may list for each direction: what Unleashed
# accepts, and what the CRM may be given.
ErpCheck = Literal["unleashed_website", "email", "salesperson_exists", "unleashed_required"]
CrmCheck = Literal["crm_website", "email"]
MatchCompare = Literal["exact", "email", "text"]
Option = Literal["account_manager_sync"]

# Columns the projection SQL adds itself; a field may not take one of these names.
RESERVED_COLUMNS = frozenset(
    {
        "crm_id",
        "crm_parent_id",
        "crm_modified",
        "crm_active",
        "erp_id",
        "erp_parent_id",
        "erp_modified",
        "erp_active",
        "data",
        "id",
        "parent_id",
        "modified",
        "active",
    }
)


class MappingError(ValueError):
    """A mapping file is malformed; the message names the file, the entry and the problem."""


def _path(value: str) -> str:
    if not isinstance(value, str) or not PATH_RE.match(value):
        raise ValueError(
            f"unsafe identifier {value!r}: a field path is dot-separated names of letters, "
            "digits and underscores"
        )
    return value


def _name(value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(
            f"unsafe identifier {value!r}: use letters, digits and underscores, not starting "
            "with a digit"
        )
    return value


def _expand(value: str) -> str:
    if not isinstance(value, str) or not EXPAND_RE.match(value):
        raise ValueError(
            f"unsafe $expand {value!r}: expected Name or Name($select=A,B) with plain names"
        )
    return value


FieldPath = Annotated[str, AfterValidator(_path)]
Name = Annotated[str, AfterValidator(_name)]
Expand = Annotated[str, AfterValidator(_expand)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkSlot(_Model):
    """The CRM custom-field slot that keeps a record's Unleashed Guid: a field of the record's
    satellite row (`DivisionXtras` / `ContactXtras`, keyed by the record's own id), read through
    the record's navigation to it and written with a PATCH of its own."""

    entity_set: Name  # e.g. DivisionXtras
    navigation: Name  # e.g. DivisionXtra (the record's navigation property to the row)
    field: Name  # e.g. StandardTextField1

    @property
    def path(self) -> str:
        """The slot as a field path of the expanded record (`DivisionXtra.StandardTextField1`)."""
        return f"{self.navigation}.{self.field}"


Scalar = str | int


class ParentCreate(_Model):
    """A record the CRM needs before this one can be created (a Division needs its company
    group): created first, its key written into the new record's field of the same name."""

    entity_set: Name  # e.g. Companies
    key: Name  # e.g. CompanyId
    values: dict[Name, Scalar] = Field(default_factory=dict)  # fixed values, e.g. TypeId: CUS
    from_record: dict[Name, Name] = Field(default_factory=dict)  # parent field: record field


class CreateSpec(_Model):
    """What the CRM needs to create a record beyond the synced fields."""

    values: dict[Name, Scalar] = Field(default_factory=dict)  # e.g. RoleCode: DECISN
    parent: ParentCreate | None = None


class CrmSource(_Model):
    """Where the CRM side of an entity is read from and written to."""

    entity_set: Name
    table: Name
    key: Name
    modified: Name
    expand: list[Expand] = Field(default_factory=list)
    parent_key: Name | None = None  # e.g. DivisionId on a contact
    link: LinkSlot  # where the CRM keeps the Unleashed Guid
    create: CreateSpec = Field(default_factory=CreateSpec)


class ErpSource(_Model):
    """Where the Unleashed side of an entity is read from and written to."""

    resource: Name
    parent_resource: Name | None = None  # contacts live under /Customers/{guid}/Contacts
    table: Name
    key: Name
    modified: FieldPath


class MatchKey(_Model):
    """One rule for pairing unlinked records; rules are tried in order."""

    name: Name
    crm: list[FieldPath] = Field(min_length=1)
    erp: list[FieldPath] = Field(min_length=1)
    compare: MatchCompare = "exact"
    # When set, the CRM values come from this table's rows whose parent_id is the record id
    # (the company's sales ledger carries the account code).
    crm_table: Name | None = None
    crm_entity: Name | None = None  # the CRM entity written on import, e.g. SalesLedger

    @model_validator(mode="after")
    def _same_arity(self) -> MatchKey:
        if len(self.crm) != len(self.erp):
            raise ValueError("crm and erp must list the same number of fields")
        return self


class Match(_Model):
    within_linked_parent: bool = False
    keys: list[MatchKey] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Match:
        names = [k.name for k in self.keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate match key name(s): {', '.join(dupes)}")
        return self


class Reference(_Model):
    """How a reference field is written: look the value up in a raw table, write what it finds.

    `value` is the path of the field to write (e.g. UserCode); null writes the whole record
    object (Unleashed wants the full SalesPerson object). `blank` is what to write for an
    empty value where the target cannot hold none (the CRM's AccountManager is NOT NULL: the
    code of a user that stands for "no account manager"); without it an empty value is not
    written and the record is reported.
    """

    field: Name
    table: Name
    match: FieldPath
    value: FieldPath | None = None
    blank: str | None = None


# The checks a field gets for a direction it does not list, by its normaliser: websites and
# emails are checked both ways; every value also goes through the safety check (always on).
DEFAULT_CHECKS: dict[str, dict[str, tuple[str, ...]]] = {
    "website": {"erp": ("unleashed_website",), "crm": ("crm_website",)},
    "email": {"erp": ("email",), "crm": ("email",)},
}


class Checks(_Model):
    """Which named checks a field's values go through, per direction: `to_erp` for values going
    to Unleashed, `to_crm` for values going to the CRM (updates and creations). A direction
    left out takes the normaliser's default (`DEFAULT_CHECKS`); `[]` runs none but the safety
    check."""

    to_erp: list[ErpCheck] | None = None
    to_crm: list[CrmCheck] | None = None


class FieldSpec(_Model):
    crm: FieldPath
    erp: FieldPath
    direction: Direction | None = None
    normaliser: Normaliser = "text"
    checks: Checks = Field(default_factory=Checks)
    multiline: bool = False  # tabs and line breaks allowed (the safety check refuses them)
    conflict_policy: Policy | None = None
    option: Option | None = None
    crm_write: Reference | None = None
    erp_write: Reference | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_validator_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "validator" in data:
            raise ValueError(
                "unknown key 'validator': list the checks per direction under `checks` "
                "(to_erp: values going to Unleashed, to_crm: values going to the CRM), "
                "e.g. checks: {to_erp: [unleashed_website], to_crm: [crm_website]}"
            )
        return data

    def checks_to(self, target: Side) -> tuple[str, ...]:
        """The named checks a value of this field goes through on its way to `target`."""
        listed = self.checks.to_erp if target == "erp" else self.checks.to_crm
        if listed is not None:
            return tuple(listed)
        return DEFAULT_CHECKS.get(self.normaliser, {}).get(target, ())


class Defaults(_Model):
    direction: Direction = "both"
    conflict_policy: Policy = "newest"


class EntityMapping(_Model):
    entity: Literal["company", "contact"]
    defaults: Defaults = Field(default_factory=Defaults)
    crm: CrmSource
    erp: ErpSource
    match: Match
    fields: dict[Name, FieldSpec] = Field(min_length=1)
    source_file: str = ""

    @model_validator(mode="after")
    def _check_fields(self) -> EntityMapping:
        for name in self.fields:
            if name in RESERVED_COLUMNS:
                raise ValueError(f"field name {name!r} is reserved for a projection column")
        for side in ("crm", "erp"):
            seen: dict[str, str] = {}
            for name, spec in self.fields.items():
                path = getattr(spec, side)
                if path in seen:
                    raise ValueError(
                        f"fields {seen[path]!r} and {name!r} both map the {side} path {path!r}"
                    )
                seen[path] = name
        return self

    # Resolved settings (defaults applied) -------------------------------------------------

    def direction(self, field: str) -> str:
        return self.fields[field].direction or self.defaults.direction

    def policy(self, field: str) -> str:
        return self.fields[field].conflict_policy or self.defaults.conflict_policy

    def active_fields(self, *, account_manager_sync: bool = True) -> list[str]:
        """Fields in play given the operator options."""
        out = []
        for name, spec in self.fields.items():
            if spec.option == "account_manager_sync" and not account_manager_sync:
                continue
            out.append(name)
        return out


# Loading ----------------------------------------------------------------------------------


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    loc = [str(p) for p in err["loc"]]
    kind = err["type"]
    if kind == "extra_forbidden":
        return ".".join(loc[:-1]) or "(top level)", f"unknown key {loc[-1]!r}"
    entry = ".".join(loc) or "(top level)"
    if kind == "missing":
        return entry, "required key is missing"
    if kind == "literal_error":
        names = [p for p in loc if not p.isdigit()]  # a list item is named by its list
        what = names[-1] if names else "value"
        expected = err.get("ctx", {}).get("expected", "")
        return entry, f"bad {what} {err['input']!r}: expected {expected}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return entry, msg


def parse_mapping(data: Any, source: str) -> EntityMapping:
    """Validate an already-parsed mapping document (`source` names it in errors)."""
    if not isinstance(data, dict):
        raise MappingError(f"{source}: (top level): expected a mapping of keys, got {data!r}")
    try:
        return EntityMapping.model_validate({**data, "source_file": source})
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        lines = [f"{source}: {entry}: {problem}" for entry, problem in problems]
        raise MappingError("\n".join(lines)) from None


def load_mapping(path: str | Path) -> EntityMapping:
    """Load and validate one mapping file; any problem raises MappingError."""
    try:
        data = read_config(path)
    except ConfigFileError as exc:
        raise MappingError(str(exc)) from None
    return parse_mapping(data, str(path))


def load_mappings(directory: str | Path) -> dict[str, EntityMapping]:
    """Load `company.yaml` and `contact.yaml` (and any other *.yaml) from a directory.

    Re-read whenever a file changes (name, size or modification time), otherwise served from a
    cache: every asset of every run asks for the mappings, and parsing them is not free."""
    directory = Path(directory)
    files = sorted(directory.glob("*.yaml"))
    stamp = (str(directory.resolve()), tuple((str(f), *_stat(f)) for f in files))
    cached = _MAPPINGS_CACHE.get(stamp[0])
    if cached is not None and cached[0] == stamp:
        return dict(cached[1])
    out = _load_mappings(directory)
    _MAPPINGS_CACHE[stamp[0]] = (stamp, out)
    return dict(out)


_MAPPINGS_CACHE: dict[str, tuple[Any, dict[str, EntityMapping]]] = {}


def _stat(file: Path) -> tuple[int, int]:
    st = file.stat()
    return st.st_size, st.st_mtime_ns


def _load_mappings(directory: Path) -> dict[str, EntityMapping]:
    out: dict[str, EntityMapping] = {}
    for file in sorted(directory.glob("*.yaml")):
        mapping = load_mapping(file)
        if mapping.entity in out:
            raise MappingError(
                f"{file}: entity: {mapping.entity!r} is already defined in "
                f"{out[mapping.entity].source_file}"
            )
        if file.stem != mapping.entity:
            raise MappingError(
                f"{file}: entity: {mapping.entity!r} does not match the file name {file.name!r}"
            )
        out[mapping.entity] = mapping
    missing = {"company", "contact"} - out.keys()
    if missing:
        raise MappingError(f"{directory}: missing mapping file(s): {', '.join(sorted(missing))}")
    return out
