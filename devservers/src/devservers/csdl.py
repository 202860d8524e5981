"""OData v4 CSDL (`$metadata`) and the service document, generated from the entity model the
local server serves, so what it describes is exactly what it answers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from xml.etree import ElementTree as ET

from devservers.odata import EntitySet

EDMX = "http://docs.oasis-open.org/odata/ns/edmx"
EDM = "http://docs.oasis-open.org/odata/ns/edm"


def metadata_xml(sets: Iterable[EntitySet], namespace: str, container: str) -> bytes:
    """The CSDL document: one EntityType per set, and an EntityContainer of the sets."""
    sets = list(sets)
    by_name = {s.name: s for s in sets}
    root = ET.Element("edmx:Edmx", {"Version": "4.0", "xmlns:edmx": EDMX})
    services = ET.SubElement(root, "edmx:DataServices")
    schema = ET.SubElement(services, "Schema", {"Namespace": namespace, "xmlns": EDM})
    for entity in sets:
        etype = ET.SubElement(schema, "EntityType", {"Name": entity.type_name})
        key = ET.SubElement(etype, "Key")
        for name in entity.keys:
            ET.SubElement(key, "PropertyRef", {"Name": name})
        for name, prop in entity.props.items():
            attrs = {"Name": name, "Type": prop.type}
            if not prop.nullable:
                attrs["Nullable"] = "false"
            if prop.max_length is not None:
                attrs["MaxLength"] = str(prop.max_length)
            if prop.default is not None:
                attrs["DefaultValue"] = str(prop.default)
            ET.SubElement(etype, "Property", attrs)
        for nav_name, nav in entity.navigations.items():
            target = by_name[nav.target]
            attrs = {"Name": nav_name, "Type": f"{namespace}.{target.type_name}"}
            if not nav.nullable:
                attrs["Nullable"] = "false"
            element = ET.SubElement(etype, "NavigationProperty", attrs)
            for fk, referenced in zip(nav.fks, target.keys, strict=True):
                ET.SubElement(
                    element,
                    "ReferentialConstraint",
                    {"Property": fk, "ReferencedProperty": referenced},
                )
    holder = ET.SubElement(schema, "EntityContainer", {"Name": container})
    for entity in sets:
        element = ET.SubElement(
            holder,
            "EntitySet",
            {"Name": entity.name, "EntityType": f"{namespace}.{entity.type_name}"},
        )
        for nav_name, nav in entity.navigations.items():
            ET.SubElement(
                element, "NavigationPropertyBinding", {"Path": nav_name, "Target": nav.target}
            )
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def service_document(sets: Iterable[EntitySet], base_url: str) -> dict[str, Any]:
    """The JSON service document served at the root: one entry per entity set."""
    return {
        "@odata.context": f"{base_url}/$metadata",
        "value": [{"name": s.name, "kind": "EntitySet", "url": s.name} for s in sets],
    }
