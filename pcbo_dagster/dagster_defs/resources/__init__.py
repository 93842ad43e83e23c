"""Resources of the pcbo code location."""

from pcbo_dagster.dagster_defs.resources.engine import ENV_VARS, PcboEngineResource

__all__ = ["ENV_VARS", "PcboEngineResource"]
