"""The declarative field mapping: YAML schema, loader, normalisers, validators, projection SQL."""

from sync_pipeline.mapping.normalise import normalise, normalise_series
from sync_pipeline.mapping.projection import crm_side, erp_side, projection_sql
from sync_pipeline.mapping.schema import (
    EntityMapping,
    FieldSpec,
    MappingError,
    load_mapping,
    load_mappings,
    parse_mapping,
)
from sync_pipeline.mapping.validate import ValidationContext, validate

__all__ = [
    "EntityMapping",
    "FieldSpec",
    "MappingError",
    "ValidationContext",
    "crm_side",
    "erp_side",
    "load_mapping",
    "load_mappings",
    "normalise",
    "normalise_series",
    "parse_mapping",
    "projection_sql",
    "validate",
]
