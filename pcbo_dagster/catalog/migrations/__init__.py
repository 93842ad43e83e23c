"""Alembic environment of the catalog, run programmatically by `CatalogStore.migrate`."""
