"""The catalog: runs, partition versions, lineage, discrepancies and the audit chain mirror (SQL)."""

from pcbo_dagster.catalog.store import CatalogStore, ChainTransaction, default_catalog_url

__all__ = ["CatalogStore", "ChainTransaction", "default_catalog_url"]
