"""pcbo_dagster: policy-constrained backfill orchestrator."""

__version__ = "0.1.0"
