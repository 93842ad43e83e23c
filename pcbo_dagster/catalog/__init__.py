"""The catalog: runs, partition versions, lineage, discrepancies and the audit chain mirror (SQL)."""

from pcbo_dagster.catalog.chain import ChainTransaction
from pcbo_dagster.catalog.database import default_catalog_url
from pcbo_dagster.catalog.store import CatalogStore

__all__ = ["CatalogStore", "ChainTransaction", "default_catalog_url"]
