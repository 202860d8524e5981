"""OData v4 query options evaluated over in-memory records, for the local Prospect CRM server.

`$filter` text is parsed by odata-query (a real OData grammar); this module only type-checks the
resulting AST against the entity model and evaluates it per record. `$orderby`, `$select` and
`$expand` are small enough to parse here. Server paging uses keyset `$skiptoken`s (see
`encode_skiptoken`), so rows modified while a client pages through never shift a row out of view.
"""

from __future__ import annotations

import base64
import json
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from odata_query import ast
from odata_query.exceptions import ODataException
from odata_query.grammar import ODataLexer, ODataParser

# Value kinds the query evaluator works with; each Edm type maps to one.
INT, STR, BOOL, DATETIME = "int", "str", "bool", "datetime"
_NUMERIC = {INT, "float"}
EDM_KINDS = {
    "Edm.Int32": INT,
    "Edm.Int16": INT,
    "Edm.Byte": INT,
    "Edm.Int64": INT,
    "Edm.String": STR,
    "Edm.Boolean": BOOL,
    "Edm.DateTimeOffset": DATETIME,
    "Edm.Decimal": "float",
    "Edm.Double": "float",
}
# Inclusive value ranges of the integer types, checked on write.
EDM_RANGES = {
    "Edm.Byte": (0, 255),
    "Edm.Int16": (-(2**15), 2**15 - 1),
    "Edm.Int32": (-(2**31), 2**31 - 1),
    "Edm.Int64": (-(2**63), 2**63 - 1),
}


class ODataError(Exception):
    """A query option the server refuses: becomes a 400 whose message names the option."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(f"Invalid {option}: {message}")


@dataclass(frozen=True)
class Prop:
    """One structural property, as `$metadata` declares it."""

    type: str  # an Edm type name, e.g. "Edm.String"
    nullable: bool = True
    max_length: int | None = None
    default: Any = None  # what the server stores when a create leaves the property out
    computed: bool = False  # kept by the server (keys, timestamps): a write naming it is refused

    @property
    def kind(self) -> str:
        return EDM_KINDS[self.type]


@dataclass(frozen=True)
class Navigation:
    """A single-valued navigation: `fks` are this type's properties holding the target's key,
    in the order of the target's key properties."""

    target: str  # entity set
    fks: tuple[str, ...]
    nullable: bool = True


@dataclass(frozen=True)
class EntitySet:
    """One entity set: its entity type's name, key, typed properties and navigations."""

    name: str
    type_name: str
    keys: tuple[str, ...]
    props: dict[str, Prop]
    navigations: dict[str, Navigation] = field(default_factory=dict)
    writable: bool = False
    # Properties a POST must carry although the server cannot default them (checked first).
    required: tuple[str, ...] = ()
    timestamp: str | None = "LastUpdatedTimestamp"
    # Also set to the write time on every write (a second, visible copy of the timestamp).
    touched: tuple[str, ...] = ("LastUpdated",)
    created: str | None = "Created"  # set once, when the record is made
    generated_key: bool = True  # an integer key the server assigns on POST

    @property
    def fields(self) -> dict[str, str]:
        """Property name -> value kind, for the query evaluator."""
        return {name: prop.kind for name, prop in self.props.items()}

    @property
    def key(self) -> str:
        """The key property of a single-key set."""
        if len(self.keys) != 1:
            raise ValueError(f"{self.name} has a composite key {self.keys}")
        return self.keys[0]

    def doc_id(self, values: Any) -> str:
        """The store id of the record with these key values (a tuple, or one value)."""
        if not isinstance(values, tuple):
            values = (values,)
        return "\x1f".join(str(v) for v in values)

    def record_id(self, record: dict[str, Any]) -> str:
        return self.doc_id(tuple(record.get(k) for k in self.keys))


# A path to a value: ("Name",) or ("AccountManagerUser", "EmailAddress").
Path = tuple[str, ...]
Lookup = Callable[[str, Any], dict[str, Any] | None]  # (entity set, key values) -> record


class Model:
    """The entity sets plus a way to follow a navigation (look a record up by key)."""

    def __init__(self, sets: Iterable[EntitySet], lookup: Lookup) -> None:
        self.sets = {s.name: s for s in sets}
        self.lookup = lookup

    def path_type(self, entity: EntitySet, path: Path, option: str) -> str:
        """The type at the end of `path`, or ODataError naming the missing property."""
        current = entity
        for i, name in enumerate(path):
            last = i == len(path) - 1
            if name in current.navigations and not last:
                current = self.sets[current.navigations[name].target]
                continue
            if name in current.props and last:
                return current.props[name].kind
            if name in current.navigations:
                raise ODataError(option, f"'{name}' is a navigation property, not a value")
            raise ODataError(
                option,
                f"Could not find a property named '{name}' on type '{current.type_name}'.",
            )
        raise ODataError(option, "empty property path")  # pragma: no cover

    def follow(self, entity: EntitySet, record: dict[str, Any], nav: str) -> dict[str, Any] | None:
        navigation = entity.navigations[nav]
        values = tuple(record.get(f) for f in navigation.fks)
        if any(v is None for v in values):
            return None
        return self.lookup(navigation.target, values)

    def resolve(self, entity: EntitySet, record: dict[str, Any] | None, path: Path) -> Any:
        current, value = entity, record
        for name in path:
            if value is None:
                return None
            if name in current.navigations:
                value = self.follow(current, value, name)
                current = self.sets[current.navigations[name].target]
            else:
                value = value.get(name)
        return value


# --------------------------------------------------------------------------------------------
# $filter
# --------------------------------------------------------------------------------------------
Predicate = Callable[[dict[str, Any]], bool]
_Compiled = tuple[Callable[[dict[str, Any]], Any], str | None]

_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_ARITH = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}


def _str_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
    """String functions yield null when an argument is null, as OData says."""

    def call(*args: Any) -> Any:
        if any(a is None for a in args):
            return None
        if not all(isinstance(a, str) for a in args):
            raise TypeError("string function applied to a non-string value")
        return fn(*args)

    return call


_FUNCTIONS: dict[str, tuple[Callable[..., Any], str | None]] = {
    "contains": (_str_fn(lambda s, sub: sub in s), BOOL),
    "startswith": (_str_fn(lambda s, p: s.startswith(p)), BOOL),
    "endswith": (_str_fn(lambda s, p: s.endswith(p)), BOOL),
    "tolower": (_str_fn(str.lower), STR),
    "toupper": (_str_fn(str.upper), STR),
    "trim": (_str_fn(str.strip), STR),
    "length": (_str_fn(len), INT),
    "indexof": (_str_fn(lambda s, sub: s.find(sub)), INT),
    "concat": (_str_fn(lambda a, b: a + b), STR),
    "year": (lambda d: None if d is None else d.year, INT),
    "month": (lambda d: None if d is None else d.month, INT),
    "day": (lambda d: None if d is None else d.day, INT),
}


def parse_timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# A stored timestamp that does not parse (planted through `/_admin/raw`) compares as the latest
# instant: the server is taken to hold a recent value it serialises badly, so delta filters
# (`LastUpdatedTimestamp gt ...`) keep returning the record instead of failing the whole listing.
_UNPARSEABLE_TIMESTAMP = datetime.max.replace(tzinfo=UTC)


def _stored_timestamp(value: Any) -> datetime | None:
    try:
        return parse_timestamp(value)
    except (TypeError, ValueError):
        return _UNPARSEABLE_TIMESTAMP


def _literal_type(node: ast._Literal) -> str | None:
    return {
        ast.Integer: INT,
        ast.Float: "float",
        ast.Boolean: BOOL,
        ast.String: STR,
        ast.DateTime: DATETIME,
        ast.Date: "date",
        ast.GUID: STR,
    }.get(type(node))


def _compatible(a: str | None, b: str | None) -> bool:
    if a is None or b is None or a == b:
        return True
    if a in _NUMERIC and b in _NUMERIC:
        return True
    return {a, b} == {DATETIME, "date"}


class _FilterCompiler:
    def __init__(self, model: Model, entity: EntitySet) -> None:
        self.model = model
        self.entity = entity

    def compile(self, node: ast._Node) -> _Compiled:
        method = getattr(self, f"_c_{type(node).__name__}", None)
        if method is None:
            raise ODataError("$filter", f"unsupported expression {type(node).__name__}")
        return method(node)

    def _path(self, node: ast._Node) -> Path:
        if isinstance(node, ast.Identifier):
            if node.namespace:
                raise ODataError("$filter", f"unsupported qualified name '{node.full_name()}'")
            return (node.name,)
        if isinstance(node, ast.Attribute):
            return (*self._path(node.owner), node.attr)
        raise ODataError("$filter", f"unsupported member access on {type(node).__name__}")

    def _member(self, node: ast._Node) -> _Compiled:
        path = self._path(node)
        kind = self.model.path_type(self.entity, path, "$filter")
        model, entity = self.model, self.entity
        if kind == DATETIME:
            return (lambda r: _stored_timestamp(model.resolve(entity, r, path))), kind
        if len(path) == 1:
            name = path[0]
            return (lambda r: r.get(name)), kind
        return (lambda r: model.resolve(entity, r, path)), kind

    _c_Identifier = _member
    _c_Attribute = _member

    def _literal(self, node: ast._Literal) -> _Compiled:
        if isinstance(node, ast.Null):
            return (lambda r: None), None
        if isinstance(node, ast.DateTime):
            value: Any = parse_timestamp(node.val)
        elif isinstance(node, ast.GUID):
            value = node.val
        else:
            try:
                value = node.py_val
            except (ValueError, NotImplementedError) as exc:
                raise ODataError("$filter", f"bad literal {node}: {exc}") from None
        return (lambda r: value), _literal_type(node)

    _c_Null = _c_Integer = _c_Float = _c_Boolean = _literal
    _c_String = _c_DateTime = _c_Date = _c_GUID = _literal

    def _c_List(self, node: ast.List) -> _Compiled:
        items = [self.compile(v)[0] for v in node.val]
        return (lambda r: [f(r) for f in items]), "list"

    def _c_Compare(self, node: ast.Compare) -> _Compiled:
        left, ltype = self.compile(node.left)
        right, rtype = self.compile(node.right)
        if isinstance(node.comparator, ast.In):
            return (lambda r: left(r) in right(r)), BOOL
        if not _compatible(ltype, rtype):
            raise ODataError("$filter", f"cannot compare Edm {ltype} with Edm {rtype}")
        op = _COMPARE[type(node.comparator)]
        equality = op in (operator.eq, operator.ne)

        def compare(r: dict[str, Any]) -> bool:
            a, b = left(r), right(r)
            if isinstance(a, datetime) and isinstance(b, date) and not isinstance(b, datetime):
                a = a.date()
            elif isinstance(b, datetime) and isinstance(a, date) and not isinstance(a, datetime):
                b = b.date()
            if a is None or b is None:
                # null equals only null; ordering against null is false (OData semantics).
                return op(a, b) if equality else False
            try:
                return bool(op(a, b))
            except TypeError:
                raise ODataError("$filter", f"cannot compare {a!r} with {b!r}") from None

        return compare, BOOL

    def _c_BoolOp(self, node: ast.BoolOp) -> _Compiled:
        left, _ = self.compile(node.left)
        right, _ = self.compile(node.right)
        if isinstance(node.op, ast.And):
            return (lambda r: bool(left(r)) and bool(right(r))), BOOL
        return (lambda r: bool(left(r)) or bool(right(r))), BOOL

    def _c_UnaryOp(self, node: ast.UnaryOp) -> _Compiled:
        operand, kind = self.compile(node.operand)
        if isinstance(node.op, ast.Not):
            return (lambda r: not operand(r)), BOOL
        return (lambda r: None if operand(r) is None else -operand(r)), kind

    def _c_BinOp(self, node: ast.BinOp) -> _Compiled:
        left, ltype = self.compile(node.left)
        right, rtype = self.compile(node.right)
        if ltype not in _NUMERIC | {None} or rtype not in _NUMERIC | {None}:
            raise ODataError("$filter", "arithmetic needs numeric operands")
        op = _ARITH[type(node.op)]

        def arith(r: dict[str, Any]) -> Any:
            a, b = left(r), right(r)
            if a is None or b is None:
                return None
            try:
                return op(a, b)
            except ZeroDivisionError:
                return None

        return arith, "float"

    def _c_Call(self, node: ast.Call) -> _Compiled:
        name = node.func.full_name()
        if name not in _FUNCTIONS:
            raise ODataError("$filter", f"function '{name}' is not supported")
        fn, kind = _FUNCTIONS[name]
        args = [self.compile(a)[0] for a in node.args]

        def call(r: dict[str, Any]) -> Any:
            try:
                return fn(*(a(r) for a in args))
            except TypeError as exc:
                raise ODataError("$filter", f"{name}(): {exc}") from None

        return call, kind


_lexer = ODataLexer()
_parser = ODataParser()


def parse_filter(text: str, model: Model, entity: EntitySet) -> Predicate:
    """Compile `$filter` text into a predicate over records of `entity`."""
    try:
        tree = _parser.parse(_lexer.tokenize(text))
    except ODataException as exc:
        raise ODataError("$filter", f"syntax error in '{text}': {exc}") from None
    if tree is None:
        raise ODataError("$filter", "empty expression")
    fn, kind = _FilterCompiler(model, entity).compile(tree)
    if kind not in (BOOL, None):
        raise ODataError("$filter", f"'{text}' is not a boolean expression")
    return lambda r: bool(fn(r))


# --------------------------------------------------------------------------------------------
# $orderby, $select, $expand
# --------------------------------------------------------------------------------------------
_PATH = re.compile(r"^[A-Za-z_]\w*(?:/[A-Za-z_]\w*)*$")


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on `sep` outside parentheses."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_orderby(text: str, model: Model, entity: EntitySet) -> list[tuple[Path, bool]]:
    """`Name desc, AccountManagerUser/EmailAddress` -> [(path, descending)]."""
    keys: list[tuple[Path, bool]] = []
    for item in _split_top_level(text, ","):
        words = item.split()
        if not words or len(words) > 2 or not _PATH.match(words[0]):
            raise ODataError("$orderby", f"cannot parse '{item}'")
        direction = words[1].lower() if len(words) == 2 else "asc"
        if direction not in ("asc", "desc"):
            raise ODataError("$orderby", f"direction must be asc or desc, not '{words[1]}'")
        path = tuple(words[0].split("/"))
        model.path_type(entity, path, "$orderby")
        keys.append((path, direction == "desc"))
    return keys


def parse_select(text: str, entity: EntitySet, option: str = "$select") -> list[str]:
    names = _split_top_level(text, ",")
    for name in names:
        if name == "*":
            continue
        if name not in entity.props:
            raise ODataError(
                option, f"Could not find a property named '{name}' on type '{entity.type_name}'."
            )
    return [] if "*" in names else names


@dataclass(frozen=True)
class ExpandItem:
    navigation: str
    select: list[str]


_EXPAND = re.compile(r"^(\w+)(?:\((.*)\))?$", re.DOTALL)


def parse_expand(text: str, model: Model, entity: EntitySet) -> list[ExpandItem]:
    """`AccountManagerUser($select=UserCode,EmailAddress)` -> [ExpandItem]. Only `$select` may
    be nested."""
    items = []
    for part in _split_top_level(text, ","):
        match = _EXPAND.match(part)
        if not match:
            raise ODataError("$expand", f"cannot parse '{part}'")
        nav, nested = match.group(1), match.group(2)
        if nav not in entity.navigations:
            raise ODataError(
                "$expand",
                f"Could not find a navigation property named '{nav}' on type '{entity.type_name}'.",
            )
        target = model.sets[entity.navigations[nav].target]
        select: list[str] = []
        for option in _split_top_level(nested, ";") if nested else []:
            name, _, value = option.partition("=")
            if name.strip() != "$select":
                raise ODataError("$expand", f"nested option '{name.strip()}' is not supported")
            select = parse_select(value, target, "$expand")
        items.append(ExpandItem(nav, select))
    return items


def shape(
    record: dict[str, Any],
    model: Model,
    entity: EntitySet,
    select: list[str],
    expand: list[ExpandItem],
) -> dict[str, Any]:
    """The record as the client sees it: selected fields plus expanded navigations."""
    out = {k: record.get(k) for k in select} if select else dict(record)
    for item in expand:
        target = model.follow(entity, record, item.navigation)
        if target is not None and item.select:
            target = {k: target.get(k) for k in item.select}
        out[item.navigation] = dict(target) if target is not None else None
    return out


# --------------------------------------------------------------------------------------------
# Ordering and keyset paging
# --------------------------------------------------------------------------------------------
def _compare_values(a: list[Any], b: list[Any], descending: list[bool]) -> int:
    for x, y, desc in zip(a, b, descending, strict=True):
        if x == y:
            continue
        if x is None:
            result = -1  # null sorts first ascending, as OData says
        elif y is None:
            result = 1
        else:
            try:
                result = -1 if x < y else 1
            except TypeError:
                result = -1 if str(x) < str(y) else 1
        return -result if desc else result
    return 0


def _sort_value(value: Any) -> tuple:
    return (0, 0) if value is None else (1, value)  # null sorts first ascending, as OData says


def sort_rows(
    rows: list[dict[str, Any]],
    model: Model,
    entity: EntitySet,
    orderby: list[tuple[Path, bool]],
) -> tuple[list[tuple[list[Any], dict[str, Any]]], Callable[[list[Any], list[Any]], int]]:
    """Rows sorted by the orderby keys then the entity key, with their sort values.

    Sorted with one stable C-level sort per key (last key first), so a page of a large set costs
    a few sorts rather than a Python comparison per pair.
    """
    paths = [p for p, _ in orderby] + [(k,) for k in entity.keys]
    descending = [d for _, d in orderby] + [False] * len(entity.keys)
    keyed = [([model.resolve(entity, r, p) for p in paths], r) for r in rows]
    for i in reversed(range(len(paths))):
        try:
            keyed.sort(key=lambda kr, i=i: _sort_value(kr[0][i]), reverse=descending[i])
        except TypeError:  # mixed types in one column: fall back to text order
            keyed.sort(key=lambda kr, i=i: _sort_value(str(kr[0][i])), reverse=descending[i])

    def compare(a: list[Any], b: list[Any]) -> int:
        return _compare_values(a, b, descending)

    return keyed, compare


def rows_after(
    keyed: list[tuple[list[Any], dict[str, Any]]],
    after: list[Any],
    compare: Callable[[list[Any], list[Any]], int],
) -> list[tuple[list[Any], dict[str, Any]]]:
    """The sorted rows strictly after the sort values `after` (binary search)."""
    lo, hi = 0, len(keyed)
    while lo < hi:
        mid = (lo + hi) // 2
        if compare(keyed[mid][0], after) > 0:
            hi = mid
        else:
            lo = mid + 1
    return keyed[lo:]


def encode_skiptoken(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def decode_skiptoken(token: str, expected_len: int) -> list[Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError:
        raise ODataError("$skiptoken", "not a token this server issued") from None
    if not isinstance(values, list) or len(values) != expected_len:
        raise ODataError("$skiptoken", "token does not match the $orderby of this query")
    return values
