"""The code location Dagster loads (`dagster dev` reads it through workspace.yaml)."""

from sync_pipeline.defs import build_defs
from sync_pipeline.defs.resources import default_resources

defs = build_defs(default_resources())
