"""Backfill assets (one per configured dataset) and, beside them, their checks."""

from pcbo_dagster.dagster_defs.assets.backfill_assets import build_dataset_asset
from pcbo_dagster.dagster_defs.assets.backfill_checks import build_dataset_checks

__all__ = ["build_dataset_asset", "build_dataset_checks"]
