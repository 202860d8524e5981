"""SQL that projects the raw snapshot tables (JSON `data`) onto the mapping's canonical fields.

Identifiers were validated when the mapping loaded; they are still passed through `ident` /
`json_path` here so nothing unchecked is ever spliced into SQL. Missing or JSON-null values
read as '' so that "absent" and "empty" compare equal.
"""

from __future__ import annotations

from collections.abc import Sequence

from sync_pipeline.mapping.schema import NAME_RE, PATH_RE, EntityMapping, MatchKey


def ident(name: str) -> str:
    """A double-quoted SQL identifier, after checking it is a plain name."""
    if not NAME_RE.match(name):
        raise ValueError(f"unsafe SQL identifier {name!r}")
    return f'"{name}"'


def json_path(path: str) -> str:
    """The DuckDB JSON path literal for a dotted field path, e.g. '$.SalesPerson.Email'."""
    if not PATH_RE.match(path):
        raise ValueError(f"unsafe field path {path!r}")
    return f"'$.{path}'"


def value_expr(path: str, alias: str = "") -> str:
    """One field of a raw row as text ('' when missing)."""
    col = f"{alias}.data" if alias else "data"
    return f"coalesce(json_extract_string({col}, {json_path(path)}), '')"


def values_list_expr(paths: Sequence[str], alias: str = "") -> str:
    """All the given fields as one VARCHAR[] (one JSON parse per row, '' when missing)."""
    col = f"{alias}.data" if alias else "data"
    listed = ", ".join(json_path(p) for p in paths)
    return f"list_transform(json_extract_string({col}, [{listed}]), lambda x: coalesce(x, ''))"


def _side(mapping: EntityMapping, side: str, fields: Sequence[str] | None) -> str:
    names = list(fields) if fields is not None else list(mapping.fields)
    src = mapping.crm if side == "crm" else mapping.erp
    has_parent = (
        mapping.crm.parent_key if side == "crm" else mapping.erp.parent_resource
    ) is not None
    paths = [getattr(mapping.fields[n], side) for n in names]
    parent = "parent_id" if has_parent else "CAST(NULL AS VARCHAR)"
    cols = ", ".join(f"v[{i + 1}] AS {ident(n)}" for i, n in enumerate(names))
    inner_v = f", {values_list_expr(paths)} AS v" if names else ""
    cols = f", {cols}" if cols else ""
    inner = (
        f"SELECT id AS {side}_id, {parent} AS {side}_parent_id, modified AS {side}_modified, "
        f"active AS {side}_active{inner_v} FROM {ident(src.table)}"
    )
    return (
        f"SELECT {side}_id, {side}_parent_id, {side}_modified, {side}_active{cols} FROM ({inner})"
    )


def crm_side(mapping: EntityMapping, fields: Sequence[str] | None = None) -> str:
    """SELECT crm_id, crm_parent_id, crm_modified, crm_active, <field>... from the CRM table."""
    return _side(mapping, "crm", fields)


def erp_side(mapping: EntityMapping, fields: Sequence[str] | None = None) -> str:
    """SELECT erp_id, erp_parent_id, erp_modified, erp_active, <field>... from Unleashed."""
    return _side(mapping, "erp", fields)


def projection_sql(mapping: EntityMapping, side: str, fields: Sequence[str] | None = None) -> str:
    if side not in ("crm", "erp"):
        raise ValueError(f"side must be 'crm' or 'erp', not {side!r}")
    return _side(mapping, side, fields)


# Match keys ------------------------------------------------------------------------------------


def _compare_sql(expr: str, compare: str) -> str:
    if compare == "email":
        return f"lower(trim({expr}))"
    if compare == "text":
        return f"trim(regexp_replace({expr}, '\\s+', ' ', 'g'))"
    return expr


def _key_sql(paths: list[str], compare: str, alias: str) -> str:
    parts = [_compare_sql(value_expr(p, alias), compare) for p in paths]
    if len(parts) == 1:
        return parts[0]
    # chr(31) (unit separator) cannot be typed into a name field, so parts cannot run together.
    return " || chr(31) || ".join(parts)


def _empty_key(paths: list[str]) -> str:
    return "" if len(paths) == 1 else chr(31) * (len(paths) - 1)


def key_expr(key: MatchKey, side: str) -> str:
    """The key value of one raw row (its `data`) as it is compared, NULL when empty. Stored in
    the derived column `_key_<name>` of the table the key reads (see derived.py); the link
    step and the creation search compare these."""
    paths = key.crm if side == "crm" else key.erp
    empty = _empty_key(paths).replace("'", "''")
    return f"nullif({_key_sql(paths, key.compare, '')}, '{empty}')"
