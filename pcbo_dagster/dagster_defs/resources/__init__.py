"""Resources of the pcbo code location: the engine's adapters, and the engine composing them."""

from pcbo_dagster.dagster_defs.resources.adapters import (
    AuditResource,
    CatalogResource,
    LakeResource,
    SourcesResource,
)
from pcbo_dagster.dagster_defs.resources.engine import ENV_VARS, PcboEngineResource

__all__ = [
    "ENV_VARS",
    "AuditResource",
    "CatalogResource",
    "LakeResource",
    "PcboEngineResource",
    "SourcesResource",
]
