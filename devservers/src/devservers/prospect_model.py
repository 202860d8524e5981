"""The Prospect CRM entity model the local server serves and describes in `$metadata`.

Names, keys, Edm types, lengths, nullability and navigations follow a live tenant's `$metadata`
(namespace `ProspectSoft.OData`; see docs/api-assumptions.md, "Prospect CRM"). Only the
properties the sync reads or writes, the ones a create needs, and a few neighbours are served;
a live type has many more. Server defaults that the metadata does not state are the local
server's choice and are marked so in docs/api-assumptions.md.
"""

from __future__ import annotations

from devservers.odata import EntitySet, Navigation, Prop

NAMESPACE = "ProspectSoft.OData"
CONTAINER = "Container"

_I32 = Prop("Edm.Int32")
_KEY_I32 = Prop("Edm.Int32", nullable=False, computed=True)
_STAMP = Prop("Edm.DateTimeOffset", computed=True)


def _text(length: int, *, nullable: bool = True, default: str | None = None) -> Prop:
    return Prop("Edm.String", nullable=nullable, max_length=length, default=default)


def _flag(default: int = 0) -> Prop:
    return Prop("Edm.Byte", nullable=False, default=default)


_AUDIT = {"Created": _STAMP, "LastUpdated": _STAMP, "LastUpdatedTimestamp": _STAMP}
_STATUS = {"StatusFlag": _text(1, nullable=False, default="A")}  # 'A' active, 'D' deleted
# The custom-field slots of an Xtra row (StandardTextField1..10, StandardSearchTextField1..3).
_SLOTS = {
    **{f"StandardTextField{i}": _text(200) for i in range(1, 11)},
    **{f"StandardSearchTextField{i}": _text(200) for i in range(1, 4)},
}

# The user code a Division gets when a create leaves `AccountManager` out. The live column is
# NOT NULL with a server default that the metadata does not state; the local server uses the
# tenant's house account (seed data: `HSE`, a user without an email address).
DEFAULT_ACCOUNT_MANAGER = "HSE"
# Sets without change timestamps whose keys the client supplies (lookups, options, satellites).
_LOOKUP = {"timestamp": None, "touched": (), "created": None, "generated_key": False}

ENTITY_SETS: dict[str, EntitySet] = {
    s.name: s
    for s in [
        EntitySet(
            "Companies",
            "Company",
            ("CompanyId",),
            {
                "CompanyId": _KEY_I32,
                "Name": _text(250, nullable=False),
                "TypeId": _text(3, nullable=False),
                "AccountManagerId": _text(3, nullable=False, default=DEFAULT_ACCOUNT_MANAGER),
                **_STATUS,
                **_AUDIT,
            },
            writable=True,
            required=("Name", "TypeId"),
        ),
        EntitySet(
            "Divisions",
            "Division",
            ("DivisionId",),
            {
                "DivisionId": _KEY_I32,
                "CompanyId": Prop("Edm.Int32", nullable=False),
                "OperatingCompanyCode": _text(1, nullable=False),
                "Name": _text(250, nullable=False),
                "PhoneNumber": _text(50),
                "Fax": _text(50),
                "Website": _text(250),
                "AccountManager": _text(3, nullable=False, default=DEFAULT_ACCOUNT_MANAGER),
                "SalesLedgerId": _text(100),
                "TerritoryCode": _text(6),
                **_STATUS,
                **_AUDIT,
            },
            navigations={
                "Company": Navigation("Companies", ("CompanyId",), nullable=False),
                "AccountManagerUser": Navigation("Users", ("AccountManager",), nullable=False),
                "SalesLedger": Navigation(
                    "SalesLedgers", ("OperatingCompanyCode", "SalesLedgerId")
                ),
                "OperatingCompany": Navigation(
                    "HomeCurrencies", ("OperatingCompanyCode",), nullable=False
                ),
                "DivisionXtra": Navigation("DivisionXtras", ("DivisionId",)),
            },
            writable=True,
            required=("Name", "CompanyId", "OperatingCompanyCode"),
        ),
        EntitySet(
            "Contacts",
            "Contact",
            ("ContactId",),
            {
                "ContactId": _KEY_I32,
                "DivisionId": Prop("Edm.Int32", nullable=False),
                "Title": _text(20),
                "Forename": _text(100),
                "Surname": _text(100),
                "Email": _text(254),
                "PhoneNumber": _text(50),
                "MobilePhoneNumber": _text(50),
                "Fax": _text(50),
                "JobTitle": _text(100),
                "RoleCode": _text(6, nullable=False),
                "AccountsId": Prop("Edm.String", max_length=100, computed=True),
                **_STATUS,
                **_AUDIT,
            },
            navigations={
                "Division": Navigation("Divisions", ("DivisionId",), nullable=False),
                "Role": Navigation("ContactRoles", ("RoleCode",), nullable=False),
                "ContactXtra": Navigation("ContactXtras", ("ContactId",)),
            },
            writable=True,
            required=("DivisionId", "RoleCode"),
        ),
        EntitySet(
            "Users",
            "User",
            ("UserCode",),
            {
                "UserCode": _text(3, nullable=False),
                "UserName": _text(100, nullable=False),
                "EmailAddress": _text(254),
                "JobTitle": _text(100),
                "Obsolete": _flag(),
                "AccountManager": _flag(),
                "AccountsId": _text(100),
                "Created": _STAMP,
            },
            timestamp=None,
            touched=(),
            generated_key=False,
        ),
        EntitySet(
            "SalesLedgers",
            "SalesLedger",
            ("OperatingCompanyCode", "SalesLedgerId"),
            {
                "OperatingCompanyCode": _text(1, nullable=False),
                "SalesLedgerId": _text(100, nullable=False),
                "CustomerCode": _text(100),
                "Name": _text(250),
                "AccountsId": _text(100),
                "DefaultDivisionId": _I32,
                "Closed": _flag(),
                **_AUDIT,
            },
            navigations={"DefaultDivision": Navigation("Divisions", ("DefaultDivisionId",))},
            generated_key=False,
        ),
        EntitySet(
            "DivisionSalesLedgers",
            "DivisionSalesLedger",
            ("DivisionId", "OperatingCompanyCode", "SalesLedgerId"),
            {
                "DivisionId": Prop("Edm.Int32", nullable=False),
                "OperatingCompanyCode": _text(1, nullable=False),
                "SalesLedgerId": _text(100, nullable=False),
                "DefaultLedger": Prop("Edm.Int16", nullable=False, default=0),
            },
            **_LOOKUP,
        ),
        EntitySet(
            "DivisionXtras",
            "DivisionXtra",
            ("DivisionId",),
            {"DivisionId": Prop("Edm.Int32", nullable=False), **_SLOTS},
            navigations={"Division": Navigation("Divisions", ("DivisionId",), nullable=False)},
            writable=True,
            required=("DivisionId",),
            **_LOOKUP,
        ),
        EntitySet(
            "ContactXtras",
            "ContactXtra",
            ("ContactId",),
            {"ContactId": Prop("Edm.Int32", nullable=False), **_SLOTS},
            navigations={"Contact": Navigation("Contacts", ("ContactId",), nullable=False)},
            writable=True,
            required=("ContactId",),
            **_LOOKUP,
        ),
        EntitySet(
            "ContactRoles",
            "ContactRole",
            ("Code",),
            {"Code": _text(6, nullable=False), "Description": _text(50, nullable=False)},
            **_LOOKUP,
        ),
        EntitySet(
            "HomeCurrencies",
            "HomeCurrency",
            ("OperatingCompanyCode",),
            {
                "OperatingCompanyCode": _text(1, nullable=False),
                "Description": _text(50, nullable=False),
                "Code": _text(3),
            },
            **_LOOKUP,
        ),
        EntitySet(
            "SystemOptions",
            "SystemOption",
            ("Option",),
            {
                "Option": _text(128, nullable=False),
                "Value": _text(1000, nullable=False),
                "Group": _text(50),
                "Description": _text(500, nullable=False, default=""),
                "Visible": _flag(1),
            },
            **_LOOKUP,
        ),
        EntitySet(
            "UnleashedContacts",
            "UnleashedContact",
            ("OperatingCompanyCode", "AccountsId"),
            {
                "OperatingCompanyCode": _text(1, nullable=False),
                "AccountsId": _text(100, nullable=False),
                "SalesLedgerId": _text(100),
                "Forename": _text(100),
                "Surname": _text(100),
                "Email": _text(254),
                "PhoneNumber": _text(50),
                "MobilePhoneNumber": _text(50),
                "Fax": _text(50),
            },
            **_LOOKUP,
        ),
    ]
}
